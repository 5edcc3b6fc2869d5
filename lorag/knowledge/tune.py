"""`lorag kb tune`: fit one base's fusion weights on its own judged queries.

The queries are split once, by a hash of their ids (the same split every run): the
weights are fitted on one part and reported on the other (`held_out`), so the figure a
user sees is not the one the fit was chosen on. Only the weights of the configured
fusion family are fitted (the vector share for `convex`, the weights and rrf_k for
`rrf`): few knobs, little room to overfit a small judged set.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from lorag.errors import LoragError
from lorag.knowledge.evaluate import DEFAULT_DEPTH, ProgressFn, Runs, collect
from lorag.knowledge.fusion import Fusion
from lorag.knowledge.judged import JudgedSet
from lorag.logging import get_logger

if TYPE_CHECKING:
    from lorag.knowledge.service import KnowledgeService

log = get_logger("lorag.knowledge.tune")
ALPHAS = [round(0.05 * i, 2) for i in range(21)]
RRF_KS = [10, 20, 40, 60, 100]
MIN_QUERIES = 4


def split(qids: list[str], held_out: float) -> tuple[set[str], set[str]]:
    """(fit, held-out) query ids: a stable hash split, each side at least one query."""
    if len(qids) < MIN_QUERIES:
        raise LoragError(f"tuning needs at least {MIN_QUERIES} judged queries, got {len(qids)}", param="queries")
    ordered = sorted(qids, key=lambda q: hashlib.sha256(q.encode()).hexdigest())
    n_held = min(len(ordered) - 1, max(1, round(len(ordered) * held_out)))
    return set(ordered[n_held:]), set(ordered[:n_held])


def candidates(base: Fusion) -> list[Fusion]:
    """The fusions tried: the base's family, its weights varied."""
    if base.method == "convex":
        return [base.with_alpha(alpha) for alpha in ALPHAS]
    return [replace(base.with_alpha(alpha), rrf_k=k) for k in RRF_KS for alpha in ALPHAS[2:-2:2]]


def fit(runs: Runs, qrels: dict[str, dict[str, int]], base: Fusion, fit_ids: set[str]) -> Fusion:
    """The candidate with the best mean nDCG@10 on `fit_ids` (ties: the one closest to even weights)."""
    best: tuple[float, float, Fusion] | None = None
    for fusion in candidates(base):
        score = runs.score(qrels, "hybrid", fusion, fit_ids)["ndcg@10"]
        key = (round(score, 6), -abs(fusion.alpha - 0.5))
        if best is None or key > best[:2]:
            best = (key[0], key[1], fusion)
    assert best is not None
    return best[2]


def tune(
    service: KnowledgeService,
    kb: str,
    judged: JudgedSet,
    *,
    held_out: float = 0.3,
    depth: int = DEFAULT_DEPTH,
    method: str | None = None,
    store: bool = True,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Fit, report on the held-out queries (default vs tuned vs each retriever), store."""
    if not 0.05 <= held_out <= 0.8:
        raise LoragError("held_out must be between 0.05 and 0.8", param="held_out")
    fit_ids, held_ids = split(list(judged.queries), held_out)
    default = Fusion.from_settings(service.settings.retrieval)
    if method is not None:
        default = Fusion.from_settings(service.settings.retrieval, {"fusion": method})
    runs = collect(service, kb, judged, depth, progress)
    tuned = fit(runs, judged.qrels, default, fit_ids)

    def report(ids: set[str]) -> dict[str, dict[str, float]]:
        rows = {
            "vector": runs.score(judged.qrels, "vector", only=ids),
            "keyword": runs.score(judged.qrels, "keyword", only=ids),
            "hybrid (default)": runs.score(judged.qrels, "hybrid", default, ids),
            "hybrid (tuned)": runs.score(judged.qrels, "hybrid", tuned, ids),
        }
        return {mode: {m: round(v, 4) for m, v in row.items()} for mode, row in rows.items()}

    if store:
        service.set_fusion(kb, tuned)
    result = {
        "kb": kb,
        "queries": {"fit": len(fit_ids), "held_out": len(held_ids)},
        "default": default.to_settings(),
        "tuned": tuned.to_settings(),
        "stored": store,
        "held_out": report(held_ids),
        "fit": report(fit_ids),
    }
    log.info("kb.tune.done", kb=kb, tuned=tuned.describe(), stored=store)
    return result
