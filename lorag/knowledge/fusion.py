"""Hybrid fusion: one ranked list from a vector list and a keyword list of the same base.

Two families, both measured on judged sets (docs/knowledge.md, benchmarks/retrieval.py). The
default is llama-index's own: `QueryFusionRetriever(mode="dist_based_score")` with equal weights,
computed on lorag's lists. lorag's `tmm` was not ahead of it on held-out judged sets (+0.0004
nDCG@10 on average, within noise), so lorag does not keep a fusion of its own by default.

* `rrf`: weighted reciprocal rank fusion, sum_i w_i / (rrf_k + rank_i), divided by its
  maximum so 1.0 means "first in both lists". Uses ranks only, so it cannot tell a
  near-tie from a landslide, and it can lose to its better part.
* `convex`: w_v * norm(cosine) + w_k * norm(BM25) with w_v + w_k = 1 (Bruch et al., 2022).
  Normalisations: `minmax` over each retriever's list, `zscore`, and `tmm` (theoretical
  min-max: cosine from -1, BM25 from 0, up to the list's best), which does not depend on
  how deep the lists go. For these, a chunk found by one retriever only gets its exact BM25
  score when the caller can look it up (bm25s scores every chunk anyway), and the lowest
  cosine of the vector list otherwise (its true cosine is at most that).
* `dist` (convex too, the default): llama-index's `dist_based_score`, exactly: each list scaled
  from its mean - 3 standard deviations to its mean + 3, weighted, summed; a chunk adds nothing
  for a list it is not in (tests/test_knowledge_eval.py checks it against llama-index itself).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from lorag.errors import LoragError

if TYPE_CHECKING:
    from lorag.knowledge.retrieval import Candidate
    from lorag.knowledge.settings import RetrievalSettings

METHODS = ("rrf", "convex")
NORMS = ("minmax", "zscore", "tmm", "dist")
FUSION_KEYS = ("fusion", "fusion_norm", "rrf_k", "vector_weight", "keyword_weight")
Scored = list[tuple["Candidate", float]]


@dataclass(frozen=True)
class Fusion:
    """How a base's two lists become one; stored per base by `lorag kb tune`."""

    method: Literal["rrf", "convex"] = "convex"
    norm: Literal["minmax", "zscore", "tmm", "dist"] = "dist"
    rrf_k: int = 60
    vector_weight: float = 1.0
    keyword_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LoragError(f"unknown fusion {self.method!r} (use {', '.join(METHODS)})", param="fusion")
        if self.norm not in NORMS:
            raise LoragError(f"unknown fusion_norm {self.norm!r} (use {', '.join(NORMS)})", param="fusion_norm")
        if self.rrf_k < 1 or self.vector_weight < 0 or self.keyword_weight < 0:
            raise LoragError("rrf_k must be >= 1 and fusion weights >= 0", param="fusion")
        if self.vector_weight + self.keyword_weight <= 0:
            raise LoragError("at least one fusion weight must be positive", param="fusion")

    @property
    def alpha(self) -> float:
        """The vector list's share of the weight."""
        return self.vector_weight / (self.vector_weight + self.keyword_weight)

    def to_settings(self) -> dict[str, Any]:
        """The RetrievalSettings keys (what a base stores and `kb show` prints)."""
        values = asdict(self)
        return {
            "fusion": values["method"],
            "fusion_norm": values["norm"],
            "rrf_k": values["rrf_k"],
            "vector_weight": round(values["vector_weight"], 4),
            "keyword_weight": round(values["keyword_weight"], 4),
        }

    def describe(self) -> str:
        if self.method == "rrf":
            return f"rrf (k={self.rrf_k}, weights {self.vector_weight:g}/{self.keyword_weight:g})"
        return f"convex {self.norm} (vector weight {self.alpha:.2f})"

    @classmethod
    def from_settings(cls, settings: RetrievalSettings, stored: Mapping[str, Any] | None = None) -> Fusion:
        """The configured default, overridden by what `kb tune` stored in the base."""
        values: dict[str, Any] = {key: getattr(settings, key) for key in FUSION_KEYS}
        values.update({k: v for k, v in (stored or {}).items() if k in FUSION_KEYS})
        return cls(
            method=values["fusion"],
            norm=values["fusion_norm"],
            rrf_k=int(values["rrf_k"]),
            vector_weight=float(values["vector_weight"]),
            keyword_weight=float(values["keyword_weight"]),
        )

    @classmethod
    def from_settings_dict(cls, values: Mapping[str, Any]) -> Fusion:
        """The inverse of to_settings (missing keys: the configured defaults)."""
        from lorag.knowledge.settings import RetrievalSettings

        return cls.from_settings(RetrievalSettings(), values)

    def with_alpha(self, alpha: float) -> Fusion:
        return replace(self, vector_weight=round(alpha, 4), keyword_weight=round(1 - alpha, 4))


def fuse(
    vector: list[Candidate],
    keyword: list[Candidate],
    fusion: Fusion,
    keyword_score: Callable[[str], float | None] | None = None,
) -> Scored:
    """Best-first (candidate, fused score) over the union of both lists (each best-first)."""
    if fusion.method == "rrf":
        return rrf([(fusion.vector_weight, vector), (fusion.keyword_weight, keyword)], fusion.rrf_k)
    if fusion.norm == "dist":
        return dist_based(vector, keyword, fusion)
    return convex(vector, keyword, fusion, keyword_score)


def rrf(ranked_lists: list[tuple[float, list[Candidate]]], rrf_k: int) -> Scored:
    """Weighted RRF over (weight, best-first list) pairs; scores normalised to (0, 1]."""
    total_weight = sum(weight for weight, ranked in ranked_lists if ranked and weight > 0) or 1.0
    best = total_weight / (rrf_k + 1)
    fused: dict[tuple[str, str], tuple[Candidate, float]] = {}
    for weight, ranked in ranked_lists:
        if weight <= 0:
            continue
        for rank, candidate in enumerate(ranked, start=1):
            key = candidate.key()
            previous = fused.get(key)
            gain = weight / (rrf_k + rank)
            fused[key] = (previous[0] if previous else candidate, (previous[1] if previous else 0.0) + gain)
    ordered = sorted(fused.values(), key=_order)
    return [(candidate, score / best) for candidate, score in ordered]


def dist_based(vector: list[Candidate], keyword: list[Candidate], fusion: Fusion) -> Scored:
    """llama-index's dist_based_score: sum over lists of weight * (x - (mean - 3 std)) / (6 std).

    A list whose scores are all equal scales them to 1 (0 when they are not positive), as
    llama-index does. When one list is empty the other decides alone, at full weight (so
    score thresholds mean the same with one retriever as with two).
    """
    alpha = fusion.alpha if vector and keyword else 1.0
    fused: dict[tuple[str, str], tuple[Candidate, float]] = {}
    for weight, ranked in ((alpha, vector), (1 - alpha, keyword)):  # keyword last: its candidates carry payloads
        if not ranked:
            continue
        scores = [candidate.score for candidate in ranked]
        mean = sum(scores) / len(scores)
        std = math.sqrt(sum((x - mean) ** 2 for x in scores) / len(scores))
        lo, hi = mean - 3 * std, mean + 3 * std
        for candidate in ranked:
            scaled = (candidate.score - lo) / (hi - lo) if hi != lo else (1.0 if hi > 0 else 0.0)
            previous = fused.get(candidate.key())
            fused[candidate.key()] = (candidate, (previous[1] if previous else 0.0) + weight * scaled)
    return sorted(fused.values(), key=_order)


def convex(
    vector: list[Candidate],
    keyword: list[Candidate],
    fusion: Fusion,
    keyword_score: Callable[[str], float | None] | None = None,
) -> Scored:
    """alpha * norm(cosine) + (1 - alpha) * norm(BM25) over the union of both lists."""
    vec = {c.key(): c.score for c in vector}
    kw = {c.key(): c.score for c in keyword}
    pool = {c.key(): c for c in vector}
    pool.update((c.key(), c) for c in keyword)  # a keyword candidate carries its payload
    if not pool:
        return []
    floor_v = min(vec.values()) if vec else 0.0
    missing_kw = 0.0 if keyword_score is not None or not kw else min(kw.values())
    alpha = fusion.alpha if vector and keyword else (1.0 if vector else 0.0)
    v_lo, v_scale, v_clip = _affine(list(vec.values()), fusion.norm, theoretical_min=-1.0)
    k_lo, k_scale, k_clip = _affine(list(kw.values()), fusion.norm, theoretical_min=0.0)
    scored: Scored = []
    for key, candidate in pool.items():
        v = (vec.get(key, floor_v) - v_lo) * v_scale
        k = kw.get(key)
        if k is None:
            looked_up = keyword_score(candidate.id) if keyword_score is not None else None
            k = missing_kw if looked_up is None else looked_up
        k = (k - k_lo) * k_scale
        if v_clip:
            v = 0.0 if v < 0.0 else (1.0 if v > 1.0 else v)
        if k_clip:
            k = 0.0 if k < 0.0 else (1.0 if k > 1.0 else k)
        scored.append((candidate, alpha * v + (1 - alpha) * k))
    scored.sort(key=_order)
    return scored


def _order(pair: tuple[Candidate, float]) -> tuple[float, str, str]:
    """Best first; equal scores by chunk id, so ties rank the same whatever order the lists came in."""
    return (-pair[1], pair[0].kb, pair[0].id)


def _affine(values: list[float], norm: str, theoretical_min: float) -> tuple[float, float, bool]:
    """(lo, scale, clip) so that norm(x) = (x - lo) * scale, clipped to [0, 1] if clip."""
    if not values:
        return 0.0, 0.0, False
    if norm == "zscore":
        mean = sum(values) / len(values)
        std = math.sqrt(sum((x - mean) ** 2 for x in values) / len(values))
        return mean, (1.0 / std if std > 1e-12 else 0.0), False
    lo = min(values) if norm == "minmax" else theoretical_min
    hi = max(values)
    return lo, (1.0 / (hi - lo) if hi - lo > 1e-12 else 0.0), True
