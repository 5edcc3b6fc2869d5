"""A thin wrapper over vLLM's public AsyncLLM API, with per-request LoRA adapters.

Why a wrapper at all:
- Adapter isolation. vLLM CPU 0.32's LoRA kernels (vllm/lora/ops/torch_ops) index
  the stacked adapter weights with the request's slot, and a request with no
  adapter has slot -1, which Python indexing turns into the *last* slot: in a
  batch where that slot holds an adapter, a base-model request is answered by
  that adapter. lorag therefore sends base-model requests through a "null"
  adapter whose B matrices are zero (exactly the base model's output), so no
  request ever carries slot -1. The null adapter is never pinned: a pinned
  adapter takes a slot the scheduler does not know about, and a batch with
  max_loras other adapters then evicts one mid-step (KeyError in the worker).
- The null adapter only when needed ("auto" on CPU). It is not free: any batch
  with a LoRA request runs the LoRA kernels on every token, and on CPU that made
  base-only batches 1.6-1.9x as costly (benchmarks/serving.py, lorag-null vs
  lorag-nonull). Slot -1 reads the engine's *last* slot, and vLLM 0.32 gives an
  adapter the first free slot (evicting only when all are taken), so the last
  slot stays empty (zero weights) while at most max_loras distinct adapters have
  ever reached the engine (it has max_loras + 1 slots). Until then base requests
  go without an adapter, as in raw vLLM; the adapter that would be one too many
  first waits for those requests to finish, and from then on base requests use
  the null adapter. "on" uses the null adapter from the start.
- Hot swap. An adapter version that requests hold (from resolve to their last token,
  lorag.adapters.leases) is only removed from the engine, and its files deleted, after
  the last of them gives it back.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorag.adapters.leases import AdapterLeases, Lease
from lorag.adapters.registry import AdapterVersion
from lorag.config import Settings
from lorag.errors import EngineUnavailable
from lorag.logging import get_logger

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.outputs import RequestOutput

log = get_logger("lorag.engine")

NULL_ADAPTER_ID = 2_000_000_000  # far above any id the registry hands out
NULL_ADAPTER_NAME = "lorag-null"
DEFAULT_CPU_KV_BYTES = 512 << 20


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def engine_args(settings: Settings, use_null_adapter: bool) -> Any:
    """Translate lorag settings into vLLM AsyncEngineArgs (the `extra` table passes through)."""
    from vllm import AsyncEngineArgs

    engine = settings.engine
    model = settings.model
    cpu = on_cpu()
    dtype = model.dtype
    if cpu and dtype in ("auto", "bfloat16"):
        dtype = "float32"  # bfloat16 kernels die with SIGILL on the CPUs we run on
    max_loras = engine.max_loras + (1 if use_null_adapter else 0)
    kwargs: dict[str, Any] = {
        "model": model.path,
        "tokenizer": model.tokenizer,
        "served_model_name": model.served_name,
        "dtype": dtype,
        "max_model_len": model.max_model_len,
        "trust_remote_code": model.trust_remote_code,
        "enable_lora": True,
        "max_loras": max_loras,
        "max_lora_rank": engine.max_lora_rank,
        # A generous CPU cache: evicting an adapter from it mid-step is how vLLM
        # loses one that the same batch still needs.
        "max_cpu_loras": engine.max_cpu_loras or max(2 * max_loras, 8),
        "tensor_parallel_size": engine.tensor_parallel_size,
        "pipeline_parallel_size": engine.pipeline_parallel_size,
        "seed": engine.seed,
    }
    optional = {
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "kv_cache_memory_bytes": engine.kv_cache_memory_bytes,
        "max_num_seqs": engine.max_num_seqs,
        "max_num_batched_tokens": engine.max_num_batched_tokens,
        "enforce_eager": engine.enforce_eager,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if cpu and engine.kv_cache_memory_bytes is None and engine.gpu_memory_utilization is None:
        kwargs["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_BYTES
    kwargs.update(engine.extra)
    return AsyncEngineArgs(**{k: v for k, v in kwargs.items() if v is not None})


def wants_null_adapter(settings: Settings) -> bool:
    mode = settings.engine.base_via_null_adapter
    return mode == "on" or (mode == "auto" and on_cpu())


def write_null_adapter_for(settings: Settings) -> Path:
    """The served model's null adapter, under the state directory (written once)."""
    out_dir = settings.state_path / "adapters" / ".null" / _slug(settings.model.path)
    return write_null_adapter(settings.model.path, out_dir, rank=min(8, settings.engine.max_lora_rank))


def write_null_adapter(model_path: str, out_dir: Path, rank: int) -> Path:
    """A PEFT LoRA directory on one attention projection with A = B = 0: the base model exactly."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (out_dir / "adapter_model.safetensors").exists():
        return out_dir
    root = resolve_model_dir(model_path)
    key, shape = _first_projection(root, safe_open)
    out_features, in_features = shape
    prefix = "base_model.model." + key[: -len(".weight")]
    module = prefix.rsplit(".", 1)[-1]
    tensors = {
        f"{prefix}.lora_A.weight": torch.zeros(rank, in_features, dtype=torch.float32),
        f"{prefix}.lora_B.weight": torch.zeros(out_features, rank, dtype=torch.float32),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": [module],
        "bias": "none",
        "base_model_name_or_path": model_path,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def resolve_model_dir(model_path: str) -> Path:
    """A local directory for the model: the path itself, or the HF cache's snapshot of an id."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_path, local_files_only=True))


def _first_projection(root: Path, safe_open: Any) -> tuple[str, tuple[int, int]]:
    for shard in sorted(root.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                if key.endswith(("q_proj.weight", "qkv_proj.weight")):
                    return key, tuple(handle.get_slice(key).get_shape())  # type: ignore[return-value]
    raise RuntimeError(f"No attention projection found in {root}; set engine.base_via_null_adapter = 'off'.")


class Engine:
    """One vLLM AsyncLLM serving the base model and every registered adapter."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.llm: Any = None
        self.null_request: LoRARequest | None = None
        self.leases = AdapterLeases(self._release)
        self._loaded: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # unloads under way (a task needs a kept reference)
        # Base requests without the null adapter while the last LoRA slot is provably empty (see above).
        self._raw_base = False
        self._raw_capacity = 0
        self._raw_in_flight = 0
        self._engine_lora_ids: set[int] = set()  # every adapter id the engine has seen

    # -- life cycle --------------------------------------------------------------

    async def start(self) -> None:
        from lorag.models.check import check_model

        check_model(self.settings.model)  # a one-line error now, not a traceback after vLLM's start-up
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        use_null = wants_null_adapter(self.settings)
        args = engine_args(self.settings, use_null)
        log.info("engine_starting", model=self.settings.model.path, max_loras=args.max_loras,
                 null_adapter=use_null)
        self.llm = AsyncLLM.from_engine_args(args)
        if use_null:
            null_dir = write_null_adapter_for(self.settings)
            self.null_request = LoRARequest(NULL_ADAPTER_NAME, NULL_ADAPTER_ID, str(null_dir))
            if self.settings.engine.base_via_null_adapter == "on":
                await self.llm.add_lora(self.null_request)
            else:
                self._raw_base = True
                self._raw_capacity = int(args.max_loras) - 1
        log.info("engine_ready", max_model_len=self.max_model_len)

    async def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    @property
    def tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

    @property
    def max_model_len(self) -> int:
        return int(self.llm.model_config.max_model_len)

    @property
    def loaded_adapters(self) -> int:
        """Adapter versions lorag loaded and has not unloaded (the null adapter not counted)."""
        return len(self._loaded)

    @property
    def started(self) -> bool:
        return self.llm is not None

    @property
    def alive(self) -> bool:
        return self.llm is not None and not self.llm.errored

    async def check_health(self) -> None:
        if self.llm is None:
            raise EngineUnavailable("The engine is not running.")
        try:
            await self.llm.check_health()
        except Exception as err:
            raise EngineUnavailable(f"The engine is not healthy: {err}") from None

    # -- adapters ----------------------------------------------------------------

    def lora_request(self, adapter: AdapterVersion | None) -> LoRARequest | None:
        from vllm.lora.request import LoRARequest

        if adapter is None:
            return self.null_request
        return LoRARequest(adapter.ref, adapter.lora_int_id, adapter.path)

    async def load_adapter(self, adapter: AdapterVersion) -> None:
        """Load weights into the engine's adapter cache ahead of the first request."""
        await self._admit(adapter.lora_int_id)
        await self.llm.add_lora(self.lora_request(adapter))
        self._loaded.add(adapter.lora_int_id)

    async def _admit(self, lora_int_id: int) -> None:
        """Before the engine first sees an adapter: if it might take the last slot, end raw base requests."""
        if lora_int_id in self._engine_lora_ids:
            return
        if self._raw_base and len(self._engine_lora_ids) >= self._raw_capacity:
            self._raw_base = False  # base requests from now on: the null adapter
            log.info("null_adapter_on", adapters=len(self._engine_lora_ids) + 1, waiting_for=self._raw_in_flight)
        while self._raw_in_flight:  # once per engine: they may share a batch with this adapter in the last slot
            await asyncio.sleep(0.005)
        self._engine_lora_ids.add(lora_int_id)

    def hold(self, adapter: AdapterVersion | None) -> Lease:
        """A request's lease on its adapter version, from resolve to its last token (lorag.adapters.leases)."""
        return self.leases.hold(adapter)

    def retire_adapter(self, adapter: AdapterVersion, on_released: Callable[[], Any] | None = None) -> None:
        """Unload once no request holds it; `on_released()` then runs in a thread (e.g. delete files)."""
        self.leases.retire(adapter, on_released)

    def _release(self, adapter: AdapterVersion, on_released: Callable[[], Any] | None) -> None:
        async def unload() -> None:
            try:
                if self.llm is not None and not self.llm.errored:
                    await self.llm.remove_lora(adapter.lora_int_id)
            finally:
                self._loaded.discard(adapter.lora_int_id)
                if on_released is not None:
                    await asyncio.to_thread(on_released)  # rmtree: not on the event loop
                log.info("adapter_unloaded", adapter=adapter.ref, lora_int_id=adapter.lora_int_id)

        task = asyncio.get_running_loop().create_task(unload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- generation --------------------------------------------------------------

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        adapter: AdapterVersion | None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream engine outputs; closing the iterator (client gone) aborts the engine request."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if not self.alive:
            raise EngineUnavailable("The engine is not running; retry later.")
        finished = False
        raw = False
        with self.leases.hold(adapter):  # given back however this ends, an abort that raises included
            try:
                if adapter is not None:
                    await self._admit(adapter.lora_int_id)
                raw = adapter is None and self._raw_base
                if raw:
                    self._raw_in_flight += 1
                stream = self.llm.generate(
                    {"prompt_token_ids": prompt_token_ids},
                    params,
                    request_id,
                    lora_request=None if raw else self.lora_request(adapter),
                )
                async for output in stream:
                    finished = output.finished
                    yield output
            except EngineDeadError:
                raise EngineUnavailable("The engine stopped while generating; retry later.") from None
            finally:
                try:
                    if not finished and self.llm is not None and not self.llm.errored:
                        await self.llm.abort(request_id)
                finally:
                    if raw:
                        self._raw_in_flight -= 1


def _slug(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]
