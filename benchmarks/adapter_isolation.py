"""Reproduce vLLM CPU's adapter mix-up and show lorag's workaround, on raw AsyncLLM.

    .venv/bin/python benchmarks/adapter_isolation.py [--max-loras 2] [--rounds 3]

Base model + 4 adapters, greedy. Each request is first run alone (the
reference), then all five together, several rounds. Prints how many batched
answers differ from the solo ones:
- "vllm":   base requests without an adapter (what vLLM's own server does);
- "lorag":  base requests through lorag's zero-weight null adapter.
Cause (vllm/lora/ops/torch_ops/lora_ops.py): a request without an adapter has
slot index -1, and `lora_b_weights[-1]` selects the last slot's adapter.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorag.demo.devmodel import build_tiny_model  # noqa: E402
from lorag.engine import NULL_ADAPTER_ID, write_null_adapter  # noqa: E402
from tests.random_adapter import build_random_adapter  # noqa: E402


async def greedy(llm, prompt: list[int], lora, request_id: str) -> tuple[int, ...]:  # type: ignore[no-untyped-def]
    from vllm import SamplingParams

    final = None
    async for output in llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=24, temperature=0),
                                     request_id, lora_request=lora):
        final = output
    assert final is not None
    return tuple(final.outputs[0].token_ids)


async def probe(mode: str, model: Path, adapters: list[Path], null_dir: Path, max_loras: int, rounds: int) -> int:
    from vllm import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    slots = max_loras + (1 if mode == "lorag" else 0)
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(model), dtype="float32", enable_lora=True, max_loras=slots, max_lora_rank=8,
        max_cpu_loras=16, max_model_len=512, enforce_eager=True, kv_cache_memory_bytes=256 << 20))
    try:
        base = LoRARequest("null", NULL_ADAPTER_ID, str(null_dir)) if mode == "lorag" else None
        loras = [base] + [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
        prompt = [5, 60, 61, 62, 63, 64]
        solo = [await greedy(llm, prompt, lora, f"solo-{i}") for i, lora in enumerate(loras)]
        wrong = 0
        for r in range(rounds):
            batched = await asyncio.gather(*(greedy(llm, prompt, lora, f"b{r}-{i}") for i, lora in enumerate(loras)))
            wrong += sum(a != b for a, b in zip(batched, solo, strict=True))
        return wrong
    finally:
        llm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-loras", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lorag-isolation-"))
    model = build_tiny_model(work / "tiny")
    adapters = [build_random_adapter(model, work / f"a{i}", seed=i + 1) for i in range(4)]
    null_dir = write_null_adapter(str(model), work / "null", rank=8)
    total = args.rounds * (len(adapters) + 1)
    for mode in ("vllm", "lorag"):
        wrong = asyncio.run(probe(mode, model, adapters, null_dir, args.max_loras, args.rounds))
        print(f"{mode:<6} max_loras={args.max_loras}: {wrong} of {total} batched answers differ from solo", flush=True)


if __name__ == "__main__":
    main()
