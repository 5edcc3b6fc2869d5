"""A job's `promote`: checked when the job is made, run when it has trained (the gate itself is
lorag.improve.promotion's, given to the service by the server, since it needs the pipeline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from lorag.errors import LoragError
from lorag.finetune.jobs import PROMOTION_DATA, JobStore, add_event


class Gate(Protocol):
    """What promotes a finished job's adapter into a domain (lorag.improve.promotion.Promoter)."""

    def check(self, domain: str) -> str: ...

    async def promote(self, job_id: str, adapter_dir: Path, spec: dict[str, Any], cases_path: Path,
                      owner: str | None) -> Any: ...


def held_out_file(gate: Gate | None, request: Any) -> str:
    """The file id of the items a `promote` job is judged on; a 400 when the job cannot be promoted."""
    if gate is None:
        raise LoragError("promote: this server cannot promote jobs.", param="promote")
    gate.check(request.promote.domain)
    eval_file: str | None = request.promote.eval_file or request.validation_file
    if eval_file is None:
        raise LoragError("promote needs held-out items: a validation_file, or promote.eval_file.",
                         param="promote.eval_file")
    return eval_file


async def run_gate(gate: Gate | None, store: JobStore, record: dict[str, Any], adapter_dir: Path) -> None:
    """Run the gate; its comparison goes into the job's events and its `promotion` field. A gate that
    fails leaves the job succeeded (it trained) and says why nothing was promoted."""
    job_id, spec = record["id"], record["promote"]
    job_dir = store.dir_of(job_id)
    add_event(job_dir, f"Promotion into domain {spec['domain']!r}: comparing the new adapter with the current one "
                       "on the held-out items.")
    try:
        if gate is None:
            raise LoragError("this server cannot promote jobs")
        verdict = await gate.promote(job_id, adapter_dir, spec, job_dir / PROMOTION_DATA, record["owner"])
    except LoragError as err:
        add_event(job_dir, f"Promotion failed: {err.message}", level="error")
        store.update(job_id, promotion={"promoted": False, "reason": err.message})
        return
    comparison = (f"{verdict.items} items, graders {', '.join(verdict.graders)}: new {verdict.candidate_score:.4f}, "
                  f"current ({verdict.previous or 'no adapter'}) {verdict.previous_score:.4f}; {verdict.reason}")
    new = f"{verdict.adapter}@{verdict.candidate}"
    if verdict.promoted:
        rollback = (f" Roll back with `lorag adapters activate {verdict.adapter} {verdict.previous}`."
                    if verdict.previous else "")
        add_event(job_dir, f"Promoted {new} in domain {verdict.domain}: {comparison}.{rollback}")
    else:
        add_event(job_dir, f"Not promoted: {comparison}. {new} stays registered, inactive.", level="warn")
    store.update(job_id, promotion=verdict.to_dict())
