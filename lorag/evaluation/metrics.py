"""Answer and retrieval metrics, each the standard implementation (so numbers compare with papers).

- exact match and token F1: the SQuAD v1.1 evaluation script's normalisation (lower case,
  punctuation and the articles a/an/the removed, whitespace collapsed); an empty answer
  against an empty reference counts as a match (SQuAD v2's rule);
- ROUGE-L (and ROUGE-N for graders): Google's `rouge-score` package, F-measure, its default
  tokenizer, no stemming;
- BLEU: `sacrebleu` (corpus BLEU for a strategy, sentence BLEU per item), 0-100 like sacrebleu;
- retrieval hit rate and MRR against the item's relevant sources, matched on a cited hit's
  full source or its file name;
- schema validity: the answer parses as JSON and validates against the item's JSON schema;
- format: the whole answer, stripped of surrounding whitespace, matches the item's regular
  expression (`re.fullmatch`, no flags: `.` stops at a line break unless the pattern says `(?s)`).

Several references per item: EM, F1 and ROUGE-L take the best reference (as SQuAD does),
BLEU uses them all.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n(.*?)\n?```$", re.DOTALL)


# -- SQuAD ------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return max(float(normalize_answer(prediction) == normalize_answer(ref)) for ref in references)


def _f1(prediction: str, reference: str) -> float:
    predicted = normalize_answer(prediction).split()
    expected = normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = Counter(predicted) & Counter(expected)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(predicted)
    recall = same / len(expected)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    return max(_f1(prediction, ref) for ref in references)


# -- ROUGE-L, BLEU ------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _rouge_scorer(kind: str) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind], use_stemmer=False)


def rouge(prediction: str, references: Sequence[str], kind: str = "rougeL") -> float:
    """ROUGE F-measure of one kind ("rouge1".."rouge9" n-grams, "rougeL"), best over the references."""
    scorer = _rouge_scorer(kind)
    return max(float(scorer.score(ref, prediction)[kind].fmeasure) for ref in references)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens), best over the references."""
    return rouge(prediction, references, "rougeL")


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: one stream per reference slot; items with fewer references get None."""
    width = max(len(refs) for refs in references)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU (0-100) with its default 13a tokenizer."""
    import sacrebleu

    if not predictions:
        return 0.0
    streams = _reference_streams(references)
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)  # type: ignore[arg-type]


def sentence_bleu(prediction: str, references: Sequence[str]) -> float:
    """sacrebleu's sentence BLEU (0-100, exponential smoothing): a per-item view, not the headline."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(prediction, list(references)).score)


# -- retrieval ------------------------------------------------------------------------------


def _file_name(source: str) -> str:
    return source.removeprefix("upload:").replace("\\", "/").rsplit("/", 1)[-1]


def source_matches(cited: str, relevant: str) -> bool:
    """A cited source matches a relevant one given as the same full path or the same file name."""
    return cited == relevant or _file_name(cited) == relevant


def reciprocal_rank(cited_sources: Sequence[str], relevant: Sequence[str]) -> float:
    """1 / rank of the first cited hit from a relevant source (0 when none is cited)."""
    for rank, cited in enumerate(cited_sources, start=1):
        if any(source_matches(cited, rel) for rel in relevant):
            return 1.0 / rank
    return 0.0


def retrieval_hit(cited_sources: Sequence[str], relevant: Sequence[str]) -> float:
    return float(reciprocal_rank(cited_sources, relevant) > 0)


# -- structured output --------------------------------------------------------------------


def parse_json_answer(text: str) -> Any:
    """The answer as JSON: the whole text, or the inside of one ``` fenced block around it."""
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    return json.loads(fenced.group(1) if fenced else stripped)


def schema_valid(prediction: str, schema: dict[str, Any]) -> bool:
    import jsonschema

    try:
        instance = parse_json_answer(prediction)
    except ValueError:
        return False
    validator_class = jsonschema.validators.validator_for(schema)
    return bool(validator_class(schema).is_valid(instance))


def format_match(prediction: str, pattern: str) -> bool:
    """The whole answer (surrounding whitespace stripped) matches `pattern`; flags go inline, e.g. (?s)."""
    return _compiled(pattern).fullmatch(prediction.strip()) is not None


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


# -- aggregation -----------------------------------------------------------------------------


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that apply (None: the metric does not apply to that item)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
