"""The model a single query runs through.

One short query is latency-bound: a chain of small matmuls and a few hundred Python-level
module calls. Two things make it faster on CPU without changing what it retrieves:
bfloat16 weights where the CPU multiplies them natively, and a traced, frozen copy of the
transformer (TorchScript), which drops the per-module Python overhead and lets torch
optimise the frozen graph for inference. The trace is only used after it gave the eager model's vectors on probe texts of
several lengths; otherwise (another architecture, an export error) queries run eagerly.
Imported only when a process embeds its first query (torch is heavy).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch

from lorag.logging import get_logger

log = get_logger("lorag.knowledge.query_model")

# Probe texts for the trace's check: short, medium and long queries.
_PROBES = (
    "lease",
    "notice period for ending a commercial lease early",
    " ".join(["the effect of a protein on cell growth in mice, measured over weeks"] * 12),
)
_AGREEMENT = 0.9999  # least cosine between traced and eager vectors of a probe


class QueryModel:
    """Sentence embeddings (float32, as the model's own modules make them) of tokenized queries."""

    def __init__(self, model: Any, dtype: str, tokenize: Any) -> None:
        """`model`: the sentence-transformers model (copied when `dtype` is bfloat16);
        `tokenize(text)`: the features of one query, as encode_query makes them."""
        self.eager = model if dtype == "float32" else copy.deepcopy(model).to(torch.bfloat16)
        self.eager.eval()
        self.dtype = dtype
        self.traced: Any = None
        self._head: Any = None
        try:
            self._trace(tokenize)
        except Exception as err:  # an architecture the tracer cannot follow: eager is correct, only slower
            self.traced = None
            log.warning("kb.embedding.trace_failed", error=f"{type(err).__name__}: {err}"[:300])

    def __call__(self, features: dict[str, Any]) -> torch.Tensor:
        return self.eager_embedding(features) if self.traced is None else self.traced_embedding(features)

    def eager_embedding(self, features: dict[str, Any]) -> torch.Tensor:
        """Through sentence-transformers' own modules (the fallback, and what the trace must match)."""
        with torch.inference_mode():
            output: torch.Tensor = self.eager.forward(dict(features))["sentence_embedding"]
            return output.float()

    def traced_embedding(self, features: dict[str, Any]) -> torch.Tensor:
        with torch.inference_mode():
            tokens = self.traced(features["input_ids"], features["attention_mask"])
            output: torch.Tensor = self._head({"token_embeddings": tokens, "attention_mask": features["attention_mask"]})[
                "sentence_embedding"
            ]
            return output.float()

    def _trace(self, tokenize: Any) -> None:
        modules = list(self.eager.children())
        transformer = getattr(modules[0], "auto_model", None) if modules else None
        if transformer is None:
            raise TypeError("the first module has no auto_model to trace")
        self._head = torch.nn.Sequential(*modules[1:])
        example = tokenize(_PROBES[1])
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation notices
            traced = torch.jit.trace(TokenEmbeddings(transformer), (example["input_ids"], example["attention_mask"]))
            self.traced = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        for text in _PROBES:
            features = tokenize(text)
            eager = torch.nn.functional.normalize(self.eager_embedding(features), dim=-1)
            for _ in range(2):  # the first runs of a frozen graph optimise it; check what stays
                fast = torch.nn.functional.normalize(self.traced_embedding(features), dim=-1)
            agreement = float((eager * fast).sum())
            if agreement < _AGREEMENT:
                raise ValueError(f"traced and eager vectors differ (cosine {agreement:.6f} on a probe)")


class TokenEmbeddings(torch.nn.Module):
    """The transformer's last hidden state from ids and mask alone (a plain tensor to trace)."""

    def __init__(self, transformer: Any) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.transformer(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]
        return hidden
