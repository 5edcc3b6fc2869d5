"""Ranking metrics with trec_eval's definitions (checked against ir-measures in the tests).

* nDCG@k: gain = the judged grade (0 or less counts as not relevant), discount
  1/log2(rank + 1), divided by the DCG of the ideal ranking of *all* judged documents
  (trec_eval's ndcg_cut.k, what BEIR reports);
* recall@k: relevant documents in the first k / all relevant documents (recall.k);
* MRR@k: 1 / rank of the first relevant document within k, else 0 (RR@k).

Means are over the judged queries that have at least one relevant document; a query
that retrieved nothing scores 0 (trec_eval -c).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

METRICS = ("ndcg@10", "recall@100", "mrr@10")


def ndcg(ranked: Sequence[str], judged: Mapping[str, int], k: int = 10) -> float:
    dcg = sum(max(judged.get(doc, 0), 0) / math.log2(rank + 2) for rank, doc in enumerate(_dedup(ranked)[:k]))
    ideal = sorted((grade for grade in judged.values() if grade > 0), reverse=True)[:k]
    idcg = sum(grade / math.log2(rank + 2) for rank, grade in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall(ranked: Sequence[str], judged: Mapping[str, int], k: int = 100) -> float:
    relevant = {doc for doc, grade in judged.items() if grade > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(_dedup(ranked)[:k])) / len(relevant)


def mrr(ranked: Sequence[str], judged: Mapping[str, int], k: int = 10) -> float:
    for rank, doc in enumerate(_dedup(ranked)[:k], start=1):
        if judged.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


def per_query(ranked: Sequence[str], judged: Mapping[str, int]) -> dict[str, float]:
    """The three reported metrics of one query."""
    return {"ndcg@10": ndcg(ranked, judged, 10), "recall@100": recall(ranked, judged, 100), "mrr@10": mrr(ranked, judged, 10)}


def mean_scores(
    runs: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]
) -> dict[str, float]:
    """Mean of each metric over the queries of `qrels` with a relevant document."""
    scored = [per_query(runs.get(qid, ()), judged) for qid, judged in qrels.items() if any(g > 0 for g in judged.values())]
    if not scored:
        return dict.fromkeys(METRICS, 0.0)
    return {metric: sum(row[metric] for row in scored) / len(scored) for metric in METRICS}


def _dedup(ranked: Sequence[str]) -> list[str]:
    """A document counts once, at its best rank (a run names each document once)."""
    return list(dict.fromkeys(ranked))
