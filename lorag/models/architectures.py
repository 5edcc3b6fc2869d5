"""Which model architectures vLLM can serve, asked of vLLM itself.

Why: a model vLLM cannot serve fails only after the engine has spent half a minute
starting; asking the registry first turns that into an immediate one-line error.
vLLM is imported lazily (seconds) and only here; where it is not installed (e.g. a
training-only machine) the check is skipped rather than guessed.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable
from functools import lru_cache

from lorag.models.errors import UnsupportedArchitecture


@lru_cache(maxsize=1)
def supported_architectures() -> frozenset[str] | None:
    """vLLM's registered architecture names, or None when vLLM is not installed."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # Importing vLLM prints platform notes (e.g. about Triton) on stderr: not ours to show.
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            from vllm.model_executor.models.registry import ModelRegistry
        except ImportError:
            return None
        return frozenset(ModelRegistry.get_supported_archs())


def check_architectures(architectures: Iterable[str] | None, where: str) -> str:
    """The first architecture vLLM serves; UnsupportedArchitecture when none is."""
    names = [a for a in (architectures or []) if isinstance(a, str)]
    if not names:
        raise UnsupportedArchitecture(f"{where}: config.json names no `architectures`; cannot tell how to serve it")
    supported = supported_architectures()
    if supported is None:
        return names[0]
    for name in names:
        if name in supported:
            return name
    raise UnsupportedArchitecture(
        f"{where}: architecture {', '.join(names)} is not one vLLM can serve "
        f"(vLLM knows {len(supported)}, e.g. LlamaForCausalLM, Qwen2ForCausalLM)"
    )
