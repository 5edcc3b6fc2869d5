"""Fine-tuning jobs as the OpenAI API sees them: create, list, retrieve, cancel, pause, resume,
events and checkpoints, each key seeing only its own jobs (admins see all).

Training runs in worker processes (lorag.finetune.runner); this class decides what a job is
(files, starting model, hyperparameters), checks its data, and when a worker has trained an
adapter, runs the canary and registers the result as `ft:<base>:<org>:<suffix>:<job-id>`
(and each kept checkpoint as `…:ckpt-step-N`), hot-loaded by the engine or by every server of
the fleet, through the same AdapterService as `lorag adapters add`.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorag.adapters.checkpoints import checkpoint_dirs, copy_adapter
from lorag.adapters.data import TrainingDataError, check_training_file
from lorag.errors import LoragError, NotFoundError
from lorag.finetune import canary
from lorag.finetune.gate import Gate, held_out_file, run_gate
from lorag.finetune.jobs import (
    FINISHED,
    INIT_ADAPTER,
    PROMOTION_DATA,
    RUN_DIR,
    TRAINING_DATA,
    VALIDATION_DATA,
    JobNotFound,
    add_event,
    copy_data,
    data_error,
    public,
    read_worker,
)
from lorag.finetune.naming import checkpoint_model_id, ft_model_id, new_id
from lorag.finetune.request import (
    BASE_LEARNING_RATE,
    Hyperparameters,
    method_json,
    new_seed,
    parse_create,
    resolve,
)
from lorag.finetune.runner import JobRunner
from lorag.finetune.stores import open_job_store
from lorag.logging import get_logger
from lorag.serving.resolution import may_name
from lorag.state.leader import jobs_leadership

if TYPE_CHECKING:
    from lorag.adapters.service import AdapterService
    from lorag.config import Settings
    from lorag.finetune.files import FileStore
    from lorag.serving.principal import Principal

log = get_logger("lorag.finetune")
RESULTS_PURPOSE = "fine-tune-results"
METRIC_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")


class JobStateError(LoragError):
    code = "invalid_job_state"


class FineTuningService:
    def __init__(self, settings: Settings, files: FileStore, adapters: AdapterService, engine: Any) -> None:
        self.settings = settings
        self.files = files
        self.adapters = adapters
        self.engine = engine
        self.store = open_job_store(settings)  # the state directory's, or shared by every replica
        # Workers sharing the state directory: one runner works the queue, the others stand by.
        self.runner = JobRunner(settings.fine_tuning, self.store, self._validate, self._finish, self._fail,
                                jobs_leadership(settings))
        self.promoter: Gate | None = None  # set by the server (lorag.improve.promotion.Promoter)

    # -- create ----------------------------------------------------------------------------

    async def create(self, body: dict[str, Any], principal: Principal) -> dict[str, Any]:
        """A new job in `validating_files`; the runner checks its data and queues it."""
        request = parse_create(body)
        training = self._data_file(request.training_file, principal, "training_file")
        validation = (self._data_file(request.validation_file, principal, "validation_file")
                      if request.validation_file else None)
        start_from = self._starting_adapter(request.model, principal)
        promote = self._promotion(request, principal)
        job_id = new_id("ftjob")
        asked = request.asked.model_dump(exclude_none=True)
        shown = {key: asked.get(key, "auto") for key in ("batch_size", "learning_rate_multiplier", "n_epochs")}
        record: dict[str, Any] = {
            "id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "model": request.model,
            "organization_id": self.settings.fine_tuning.organization, "status": "validating_files",
            "training_file": request.training_file, "validation_file": request.validation_file,
            "hyperparameters": shown,
            "method": method_json(request.method_type, {**shown, **({"beta": asked.get("beta", "auto")}
                                                                    if request.method_type == "dpo" else {})}),
            "seed": request.seed if request.seed is not None else new_seed(), "suffix": request.suffix,
            "user_provided_suffix": request.suffix, "metadata": request.metadata, "fine_tuned_model": None,
            "finished_at": None, "error": None, "result_files": [], "trained_tokens": None,
            "estimated_finish": None, "integrations": [],
            # lorag's own, never shown
            "owner": principal.key_id, "created_ns": time.time_ns(), "asked": asked, "method_type": request.method_type, "crashes": 0,
            "ft_model": ft_model_id(self.settings.model.served_name, self.settings.fine_tuning.organization,
                                    request.suffix, job_id),
            "limits": {"threads": self.settings.fine_tuning.threads,
                       "gpu_memory_fraction": self.settings.fine_tuning.gpu_memory_fraction},
            "canary": {"prompts": self.settings.fine_tuning.canary_prompts,
                       "max_tokens": self.settings.fine_tuning.canary_max_tokens},
            "promote": request.promote.model_dump() if request.promote else None, "promotion": None,
        }

        def fill(staging: Path) -> None:
            copy_data(training, staging / TRAINING_DATA)
            if validation is not None:
                copy_data(validation, staging / VALIDATION_DATA)
            if start_from is not None:
                (staging / INIT_ADAPTER).mkdir()
                copy_adapter(Path(start_from), staging / INIT_ADAPTER)
            if promote is not None:
                copy_data(promote, staging / PROMOTION_DATA)

        await asyncio.to_thread(self.store.create, record, fill)
        job_dir = self.store.dir_of(job_id)
        add_event(job_dir, f"Created fine-tuning job: {job_id}")
        add_event(job_dir, f"Validating training file: {request.training_file}"
                  + (f" and validation file: {request.validation_file}" if request.validation_file else ""))
        log.info("fine_tuning_job_created", job=job_id, model=request.model, method=request.method_type,
                 key_id=principal.key_id)
        self.runner.poke()
        return public(record)

    def _promotion(self, request: Any, principal: Principal) -> Path | None:
        """The held-out file a `promote` job is gated on (checked now: a job that cannot be promoted is a 400)."""
        if request.promote is None:
            return None
        return self._data_file(held_out_file(self.promoter, request), principal, "promote.eval_file")

    def _data_file(self, file_id: str, principal: Principal, param: str) -> Path:
        try:
            meta = self.files.get(file_id, principal)
        except NotFoundError:
            raise NotFoundError(f"The {param.replace('_', ' ')} '{file_id}' does not exist.", param=param,
                                code="file_not_found") from None
        if meta["purpose"] != "fine-tune":
            raise LoragError(f"File {file_id} has purpose '{meta['purpose']}'; a fine-tuning job needs a file "
                             "uploaded with purpose 'fine-tune'.", param=param, code="invalid_file_purpose")
        return self.files.path_of(file_id, principal)

    def _starting_adapter(self, model: str, principal: Principal) -> str | None:
        """None to start from the base model; else the adapter (an `ft:` model too) to continue from."""
        if model in (self.settings.model.served_name, self.settings.model.path):
            return None
        try:
            entry = self.adapters.registry.resolve(model)
            if not may_name(principal, entry):
                raise NotFoundError(model)
        except NotFoundError:
            raise NotFoundError(
                f"The model '{model}' cannot be fine-tuned here: use the served base model "
                f"'{self.settings.model.served_name}', an adapter, or one of your ft: models.",
                param="model") from None
        return entry.path

    # -- the runner's hooks ---------------------------------------------------------------

    async def _validate(self, record: dict[str, Any]) -> None:
        """validating_files -> queued with every hyperparameter a number, or failed naming the line."""
        job_id, method = record["id"], record["method_type"]
        job_dir = self.store.dir_of(job_id)
        checks = [("training_file", job_dir / TRAINING_DATA), ("validation_file", job_dir / VALIDATION_DATA)]
        counts = {}
        for param, path in checks:
            if not path.is_file():
                continue
            try:
                counts[param] = await asyncio.to_thread(check_training_file, path, method)
            except TrainingDataError as err:
                await self._fail(job_id, data_error(err, param, record[param]))
                return
        try:
            resolved = resolve(Hyperparameters(**record["asked"]), method, counts["training_file"])
        except LoragError as err:
            await self._fail(job_id, {"code": err.code or "invalid_hyperparameters", "message": err.message,
                                      "param": err.param})
            return
        shown = {k: resolved[k] for k in ("batch_size", "learning_rate_multiplier", "n_epochs")}
        self.store.update(job_id, status="queued", hyperparameters=shown, method=method_json(method, resolved),
                          n_examples=counts["training_file"], train_settings=self._train_settings(record, resolved))
        add_event(job_dir, f"Files validated ({counts['training_file']} examples), moving job to queued state.")

    def _train_settings(self, record: dict[str, Any], resolved: dict[str, Any]) -> dict[str, Any]:
        """What the worker trains with: `lorag adapters train`'s settings."""
        model, tuning = self.settings.model, self.settings.fine_tuning
        rank = min(tuning.rank, self.settings.engine.max_lora_rank)
        init = self.store.dir_of(record["id"]) / INIT_ADAPTER
        return {
            "model_path": model.path, "tokenizer_path": model.tokenizer, "trust_remote_code": model.trust_remote_code,
            "rank": rank, "alpha": 2 * rank, "learning_rate": BASE_LEARNING_RATE * resolved["learning_rate_multiplier"],
            "epochs": resolved["n_epochs"], "batch_size": resolved["batch_size"], "val_split": 0.0,
            "seed": record["seed"], "save_steps": tuning.save_steps, "keep_checkpoints": tuning.keep_checkpoints,
            "max_length": tuning.max_length, "method": record["method_type"], "beta": resolved.get("beta", 0.1),
            "init_adapter": str(init) if init.is_dir() else None,
            "gradient_checkpointing": tuning.gradient_checkpointing, "qlora": tuning.qlora,
        }

    async def _fail(self, job_id: str, error: dict[str, Any]) -> None:
        record = self.store.update(job_id, status="failed", error=error, finished_at=int(time.time()),
                                   estimated_finish=None, worker_pid=None)
        await self._unregister(record)
        add_event(self.store.dir_of(job_id), f"Fine-tuning job failed: {error['message']}", level="error")
        log.warning("fine_tuning_job_failed", job=job_id, code=error.get("code"))

    async def _finish(self, record: dict[str, Any]) -> None:
        """A trained adapter: the canary, then the checkpoints and the model registered and loaded."""
        job_id, owner, model_id = record["id"], record["owner"], record["ft_model"]
        job_dir = self.store.dir_of(job_id)
        trained = read_worker(job_dir)
        adapter_dir = Path(trained["adapter"])
        try:
            if trained.get("canary"):
                why = await self._canary(job_id, adapter_dir, trained["canary"], record)
                if why:
                    await self._fail(job_id, {"code": "canary_failed", "param": None, "message": (
                        f"The fine-tuned adapter was not activated: {why}. It is kept at {adapter_dir}.")})
                    return
                add_event(job_dir, f"Canary passed: the served adapter answers as transformers + peft on "
                                   f"{len(trained['canary'])} of the job's prompts.")
            served = []
            for step, path in checkpoint_dirs(job_dir / RUN_DIR):
                served.append(await self._register(checkpoint_model_id(model_id, step), path, owner))
            served.append(await self._register(model_id, adapter_dir, owner))
        except LoragError as err:
            await self._fail(job_id, {"code": "registration_failed", "param": None,
                                      "message": f"The trained adapter could not be served: {err.message}"})
            return
        results = self.files.add_bytes(metrics_csv(self.store.events(job_id)), filename=f"{job_id}-results.csv",
                                       purpose=RESULTS_PURPOSE, owner=owner)
        if self.store.get(job_id)["status"] == "cancelled":  # cancelled while it was being registered
            await self._unregister(record)
            return
        if record.get("promote") and not self.store.get(job_id).get("promotion"):
            await run_gate(self.promoter, self.store, record, adapter_dir)
        self.store.update(job_id, status="succeeded", fine_tuned_model=model_id, finished_at=int(time.time()),
                          trained_tokens=trained.get("total_tokens"), result_files=[results["id"]],
                          estimated_finish=None, served=served)
        add_event(job_dir, f"New fine-tuned model created: {model_id}")
        add_event(job_dir, "The job has successfully completed.")
        log.info("fine_tuning_job_succeeded", job=job_id, model=model_id, checkpoints=len(served) - 1)

    async def _register(self, name: str, path: Path, owner: str) -> str:
        """Registered and loaded (once: a finish redone after a restart skips what is there)."""
        try:
            self.adapters.registry.resolve(name)
            return name
        except NotFoundError:
            pass
        await self.adapters.add(name, path, trusted=True, owner=owner)
        return name

    async def _unregister(self, record: dict[str, Any]) -> None:
        """Whatever of this job is registered goes (a failed or cancelled job serves nothing)."""
        prefix = record.get("ft_model")
        if not prefix:
            return
        names = {v.name for v in self.adapters.registry.all_versions()
                 if v.name == prefix or v.name.startswith(prefix + ":ckpt-step-")}
        for name in names:
            await self.adapters.remove(name)

    async def _canary(self, job_id: str, adapter_dir: Path, expected: list[dict[str, Any]],
                      record: dict[str, Any]) -> str | None:
        """Load the candidate under an engine id no version will get, ask for each prompt greedily, compare."""
        from lorag.adapters.registry import AdapterVersion

        _, info = await asyncio.to_thread(self.adapters.validate, "canary", adapter_dir, None, True)
        candidate = AdapterVersion(
            name=f"canary-{job_id}", version="candidate", lora_int_id=self.adapters.registry.reserve_id(),
            path=str(adapter_dir), source=str(adapter_dir), rank=info.rank, alpha=info.alpha,
            target_modules=info.target_modules, base_model=info.base_model, created_at=time.time(), owner=job_id)
        stops = canary.stop_ids(self.settings.model.path, self.engine.tokenizer)
        max_tokens = int(record["canary"]["max_tokens"])
        await self.engine.load_adapter(candidate)
        try:
            for number, case in enumerate(expected, start=1):
                served = await self._greedy(case["prompt_ids"], max_tokens, candidate)
                why = canary.judge(case, served, stops, max_tokens)
                if why:
                    return f"{why} on prompt {number} of {len(expected)}"
            return None
        finally:
            self.engine.retire_adapter(candidate)

    async def _greedy(self, prompt_ids: list[int], max_tokens: int, adapter: Any) -> list[int]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA)
        tokens: list[int] = []
        async for output in self.engine.generate(prompt_ids, params, f"canary-{uuid.uuid4().hex[:12]}", adapter):
            for completion in output.outputs:
                tokens += list(completion.token_ids)
        return tokens

    # -- reading and control ---------------------------------------------------------------

    def get(self, job_id: str, principal: Principal) -> dict[str, Any]:
        return public(self._own(job_id, principal))

    def _own(self, job_id: str, principal: Principal) -> dict[str, Any]:
        record = self.store.get(job_id)
        if not (principal.admin or record.get("owner") == principal.key_id):
            raise JobNotFound(f"No fine-tuning job '{job_id}'.", param="fine_tuning_job_id")
        return record

    def list_jobs(self, principal: Principal, metadata: dict[str, str]) -> list[dict[str, Any]]:
        """The caller's jobs, newest first, with every `metadata[k]=v` given."""
        mine = [r for r in self.store.all() if principal.admin or r.get("owner") == principal.key_id]
        chosen = [r for r in mine if all((r.get("metadata") or {}).get(k) == v for k, v in metadata.items())]
        return [public(r) for r in reversed(chosen)]

    def events(self, job_id: str, principal: Principal) -> list[dict[str, Any]]:
        self._own(job_id, principal)
        return self.store.events(job_id)

    def checkpoints(self, job_id: str, principal: Principal) -> list[dict[str, Any]]:
        """Kept checkpoints, newest first: served as `…:ckpt-step-N` once the job has succeeded."""
        record = self._own(job_id, principal)
        job_dir = self.store.dir_of(job_id)
        on_disk = {step for step, _ in checkpoint_dirs(job_dir / RUN_DIR)}
        found = [c for c in read_worker(job_dir).get("checkpoints", []) if c["step"] in on_disk]
        return [{
            "object": "fine_tuning.job.checkpoint",
            "id": "ftckpt_" + hashlib.sha256(f"{job_id}:{c['step']}".encode()).hexdigest()[:24],
            "created_at": c["created_at"], "fine_tuning_job_id": job_id, "step_number": c["step"],
            "fine_tuned_model_checkpoint": checkpoint_model_id(record["ft_model"], c["step"]),
            "metrics": {k: v for k, v in c.get("metrics", {}).items() if v is not None},
        } for c in sorted(found, key=lambda c: -c["step"])]

    async def cancel(self, job_id: str, principal: Principal) -> dict[str, Any]:
        record = self._own(job_id, principal)
        if record["status"] in FINISHED:
            raise JobStateError(f"Job {job_id} has already {record['status']}; it cannot be cancelled.",
                                param="fine_tuning_job_id")
        record = self.store.update(job_id, status="cancelled", finished_at=int(time.time()), estimated_finish=None)
        self.runner.signal(job_id, "cancel")
        add_event(self.store.dir_of(job_id), "Fine-tuning job cancelled.")
        log.info("fine_tuning_job_cancelled", job=job_id)
        return public(record)

    async def pause(self, job_id: str, principal: Principal) -> dict[str, Any]:
        """A running job stops at its next step, after a checkpoint; a waiting one just waits."""
        record = self._own(job_id, principal)
        if record["status"] in ("validating_files", "queued"):
            record = self.store.update(job_id, status="paused")
            add_event(self.store.dir_of(job_id), "Fine-tuning job paused.")
        elif record["status"] == "running":
            self.runner.signal(job_id, "pause")
            add_event(self.store.dir_of(job_id), "Pausing: the job stops after its current step, with a checkpoint.")
        elif record["status"] != "paused":
            raise JobStateError(f"Job {job_id} has {record['status']}; only a queued or running job can be paused.",
                                param="fine_tuning_job_id")
        return public(record)

    async def resume(self, job_id: str, principal: Principal) -> dict[str, Any]:
        record = self._own(job_id, principal)
        if record["status"] != "paused":
            raise JobStateError(f"Job {job_id} is {record['status']}, not paused; there is nothing to resume.",
                                param="fine_tuning_job_id")
        back = "queued" if record.get("train_settings") else "validating_files"
        record = self.store.update(job_id, status=back)
        add_event(self.store.dir_of(job_id), "Fine-tuning job resumed; it continues from its last checkpoint.")
        self.runner.poke()
        return public(record)


def metrics_csv(events: list[dict[str, Any]]) -> bytes:
    """The job's metrics per step (OpenAI's results file columns), from its metrics events."""
    rows: dict[int, dict[str, Any]] = {}
    for event in reversed(events):  # oldest first: later values for a step win
        data = event.get("data") or {}
        if event.get("type") != "metrics" or "step" not in data:
            continue
        row = rows.setdefault(int(data["step"]), {"step": int(data["step"])})
        found = {"train_loss": data.get("train_loss"), "train_accuracy": data.get("train_mean_token_accuracy"),
                 "valid_loss": data.get("valid_loss"), "valid_mean_token_accuracy": data.get("valid_mean_token_accuracy")}
        row.update({k: v for k, v in found.items() if v is not None})  # a step's training and validation events
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=METRIC_COLUMNS)
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow({k: ("" if rows[step].get(k) is None else rows[step][k]) for k in METRIC_COLUMNS})
    return out.getvalue().encode()
