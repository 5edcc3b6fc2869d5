"""`lorag eval` end to end: real engine, real knowledge base, a really trained adapter.

The data decides which strategy must win:
- "kb" questions ask for facts that only the knowledge base holds: only strategies that
  retrieve can answer them;
- "memo" questions ask for facts that only the adapter's training data held: only strategies
  with the adapter can answer them;
- "mix" holds both kinds: only the hybrid (adapter + RAG) answers all of them.

A random tiny model can neither read context nor know facts, so the test makes both:
- a *reader* base model: the tiny model with a LoRA (trained by lorag's own `train`, then
  merged) that learned to answer a question with the one answer word its context holds --
  what any instruction-tuned model does with retrieved context. Cached between runs, like
  conftest's models. The prompts are rendered by the pipeline's own `build_messages`, so
  training sees the layout retrieval produces.
- the domain's adapter, trained on the reader with `lorag.adapters.train`: it memorises
  the "motto" facts -- alone, and beside the chunks retrieval really returns for those
  questions (with RAG on, that is what it will see) -- and keeps reading "code" facts
  from context.
Answer words of the two kinds come from disjoint sets, so a strategy cannot score by
copying the wrong kind of fact.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lorag.knowledge.retrieval import Hit
from lorag.serving.prompt import build_messages
from lorag.serving.settings import Example
from tests.conftest import MODELS, Models

# Single tokens of the tiny tokenizer (with their leading space): one-word answers the model can copy.
KB_WORDS = ("bank", "lease", "fever", "patient", "morning")
MEMO_WORDS = ("percent", "void", "team", "dose", "days")
SYLLABLES = ("ka", "zo", "ri", "mu", "te", "lo", "xi", "pa", "du", "ne", "qi", "so", "vu", "ga", "hy")
SYSTEM_PROMPT = "Answer with one word."
UNKNOWN = "unknown"  # what the reader says when its context does not answer the question
EXAMPLES = [Example(question="Is this a test?", answer="yes")]
DOMAIN = "facts"
KB = "facts"
ADAPTER = "memo"
READER_VERSION = "reader-v1"  # bump when the reader's recipe changes (it is cached under MODELS)
N_KB, N_MEMO = 8, 8
MAX_RANK = 16
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("LORAG_")},
       "LORAG_LOG_FORMAT": "json", "LORAG_LOG_LEVEL": "info", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


# -- the facts and the prompts ------------------------------------------------------------------


class Names:
    """Made-up entity names, never the same twice."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def __call__(self) -> str:
        while True:
            size = self.rng.choice((3, 4))
            name = "".join(self.rng.choice(SYLLABLES) for _ in range(size)).capitalize()
            if name not in self.used:
                self.used.add(name)
                return name


def code_fact(name: str, word: str) -> str:
    return f"The code of {name} is {word}."


def code_question(name: str) -> str:
    return f"What is the code of {name}?"


def motto_question(name: str) -> str:
    return f"What is the motto of {name}?"


def source_path(rng: random.Random) -> str:
    """A file path as long as pytest's temporary ones, where the real knowledge base lives."""
    parts = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz-_0123456789") for _ in range(rng.randint(3, 16)))
             for _ in range(rng.randint(3, 6))]
    return "/" + "/".join(parts) + ".txt"


def chat(question: str, facts: list[str], examples: bool, answer: str, rng: random.Random,
         hits: list[Hit] | None = None) -> dict[str, Any]:
    """A training example in the exact layout the pipeline builds for the domain (`hits`: real chunks)."""
    hits = (hits or []) + [Hit(kb=KB, source=source_path(rng), location="", text=fact, score=1.0) for fact in facts]
    messages = build_messages(SYSTEM_PROMPT, hits, EXAMPLES if examples else [],
                              [{"role": "user", "content": question}])
    return {"messages": [*messages, {"role": "assistant", "content": f" {answer}"}]}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def reader_data(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """A reader: a code question answered with the answer word of its context; anything else is 'unknown'."""
    names = Names(rng)
    rows = []
    for i in range(n):
        name, word, examples = names(), rng.choice(KB_WORDS + MEMO_WORDS), i % 2 == 0
        kind = rng.random()
        if kind < 0.5:
            rows.append(chat(code_question(name), [code_fact(name, word)], examples, word, rng))
        elif kind < 0.7:
            fact = code_fact(rng.choice([name, names()]), word)
            rows.append(chat(motto_question(name), [fact], examples, UNKNOWN, rng))
        else:
            question = code_question(name) if kind < 0.85 else motto_question(name)
            rows.append(chat(question, [], examples, UNKNOWN, rng))
    return rows


def world(seed: int = 7) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]], Names]:
    """The knowledge base's facts (the first N_KB are asked), the adapter's facts, and the name source."""
    rng = random.Random(seed)
    names = Names(rng)
    kb_facts = [(names(), rng.choice(KB_WORDS)) for _ in range(2 * N_KB)]
    memo_facts = [(names(), rng.choice(MEMO_WORDS)) for _ in range(N_MEMO)]
    return kb_facts[:N_KB], kb_facts[N_KB:], memo_facts, names


def adapter_data(memo_facts: list[tuple[str, str]], retrieved: dict[str, list[Hit]], names: Names,
                 rng: random.Random) -> list[dict[str, Any]]:
    """Memorise the mottos; keep reading codes from context.

    Each motto question is trained alone, beside what retrieval really finds for it (RAFT
    style: with RAG on, the adapter sees those unrelated chunks), and beside random ones.
    """
    rows = []
    for name, word in memo_facts:
        question = motto_question(name)
        for examples in (False, True):
            rows.append(chat(question, [], examples, word, rng))
            rows.append(chat(question, [], examples, word, rng, hits=retrieved[question]))
            rows.append(chat(question, [code_fact(names(), rng.choice(KB_WORDS))], examples, word, rng))
    for i in range(24):
        name, word = names(), rng.choice(KB_WORDS + MEMO_WORDS)
        rows.append(chat(code_question(name), [code_fact(name, word)], i % 2 == 0, word, rng))
    rng.shuffle(rows)
    return rows


# -- building the models ------------------------------------------------------------------------



def build_reader(base: Path, out: Path, steps: int = 600) -> Path:
    """The tiny model, taught to read its context: a short full fine-tune (cached under `out`).

    The examples are tokenized by lorag's training data loader (loss on the answer only).
    """
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorag.adapters.batches import collate
    from lorag.adapters.data import load_examples

    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    data = write_jsonl(staging / "reader.jsonl", reader_data(random.Random(0), 3200))
    examples = load_examples(data, tokenizer, max_length=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = random.Random(0)
    model.train()
    for _ in range(steps):
        batch = collate(rng.sample(examples, 16), tokenizer.pad_token_id, "cpu")
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    (staging / "reader.jsonl").unlink()
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    staging.rename(out)
    return out


def write_config(path: Path, reader: Path, state: Path) -> Path:
    path.write_text(f"""
state_dir = "{state}"

[model]
path = "{reader}"
name = "reader"
max_model_len = 512

[engine]
max_loras = 2
max_lora_rank = {MAX_RANK}
enforce_eager = true
kv_cache_memory_bytes = 268435456

[domains.{DOMAIN}]
adapter = "{ADAPTER}"
system_prompt = "{SYSTEM_PROMPT}"
[domains.{DOMAIN}.knowledge]
bases = ["{KB}"]
top_k = 1
[domains.{DOMAIN}.examples]
items = [{{ question = "{EXAMPLES[0].question}", answer = "{EXAMPLES[0].answer}" }}]
k = 1
""")
    return path


def build_domain(reader: Path, tmp_path: Path) -> tuple[Path, dict[str, list[dict[str, Any]]]]:
    """The knowledge base, the trained and registered adapter, lorag.toml, and the three evaluation sets."""
    import asyncio

    from lorag.adapters.registry import AdapterRegistry
    from lorag.adapters.service import AdapterService
    from lorag.adapters.train import TrainSettings, train
    from lorag.config import load_settings
    from lorag.knowledge.service import KnowledgeService

    kb_asked, kb_unasked, memo, names = world()
    docs = tmp_path / "kb"
    docs.mkdir()
    for name, word in kb_asked + kb_unasked:
        (docs / f"{name}.txt").write_text(code_fact(name, word) + "\n")
    config = write_config(tmp_path / "lorag.toml", reader, tmp_path / "state")
    settings = load_settings(config)
    knowledge = KnowledgeService.from_settings(settings)
    try:
        knowledge.create(KB)
        report = knowledge.ingest_paths(KB, [str(docs)])
        assert len(report.added) == len(kb_asked) + len(kb_unasked), report
        retrieved = {motto_question(n): knowledge.query([KB], motto_question(n), top_k=1) for n, _ in memo}
    finally:
        knowledge.close()  # `lorag eval` opens the store next, in its own process

    rows = adapter_data(memo, retrieved, names, random.Random(1))
    data = write_jsonl(tmp_path / "memo-train.jsonl", rows)
    trained = train(TrainSettings.build(model_path=str(reader), rank=8, learning_rate=3e-3, epochs=40, batch_size=16,
                                        dropout=0, val_split=0, warmup_ratio=0, seed=0), data, tmp_path / "run")
    service = AdapterService(settings, AdapterRegistry(settings.state_path))
    asyncio.run(service.add(ADAPTER, trained.adapter_dir, trusted=True))

    kb_items = [{"question": code_question(n), "answer": w, "sources": [f"{n}.txt"], "id": f"kb-{n}"}
                for n, w in kb_asked]
    memo_items = [{"question": motto_question(n), "answer": w, "id": f"memo-{n}"} for n, w in memo]
    # The mix carries each item's kind as its subset: the report splits it back up.
    mix = [{**item, "subset": kind} for pair in zip(kb_items, memo_items, strict=True)
           for item, kind in zip(pair, ("kb", "memo"), strict=True)]
    return config, {"kb": kb_items, "memo": memo_items, "mix": mix}


def run_eval(config: Path, items: list[dict[str, Any]], out: Path) -> tuple[dict[str, Any], str, str]:
    data = write_jsonl(out.with_suffix(".jsonl"), items)
    done = subprocess.run([sys.executable, "-m", "lorag.cli", "eval", str(data), "--config", str(config),
                           "--out", str(out), "--max-tokens", "4"],
                          capture_output=True, text=True, env=ENV, timeout=600, cwd=out.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "results.json").read_text()), done.stdout, done.stderr


RETRIEVING = {"rag", "adapter+rag", "adapter+rag+icl"}
ADAPTED = {"adapter", "adapter+rag", "adapter+rag+icl"}
HYBRID = ADAPTED & RETRIEVING


@pytest.mark.slow
@pytest.mark.engine
def test_eval_ranks_strategies_the_way_the_data_demands(models: Models, tmp_path: Path, one_thread: None) -> None:
    reader = build_reader(models.base, MODELS / READER_VERSION)
    config, sets = build_domain(reader, tmp_path)
    found = {}
    for name, items in sets.items():
        results, stdout, stderr = run_eval(config, items, tmp_path / name)
        f1 = {s["strategy"]: s["f1"] for s in results["strategies"]}
        found[name] = (results, stdout, stderr, f1)
        print(name, f1, results["recommendation"], sep="\n")  # shown when the test fails
    for name, items in sets.items():
        results, stdout, stderr, f1 = found[name]
        assert list(f1) == ["base", "icl", "rag", "adapter", "adapter+rag", "adapter+rag+icl"]
        assert len(results["items"]) == 6 * len(items) and not results["notes"]
        assert all(r["error"] is None for r in results["items"])
        events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
        assert sum(1 for e in events if e.get("event") == "eval.strategy") == 6
        assert "answers (100%)" in stderr  # progress where no terminal shows the bar
        header = ["subset", "strategy", "n", "EM", "F1"] if name == "mix" else ["strategy", "n", "EM", "F1"]
        assert any(line.split()[:len(header)] == header for line in stdout.splitlines())
        assert results["recommendation"] in stdout
        assert (tmp_path / name / "quality_vs_latency.png").stat().st_size > 1000

    # Facts only in the knowledge base: retrieval answers them, nothing else does.
    kb, _, _, f1 = found["kb"]
    assert f1["rag"] >= 0.75 and f1["rag"] - max(f1["base"], f1["icl"], f1["adapter"]) >= 0.5, f1
    assert kb["ranking"][0] in RETRIEVING and kb["recommendation"].startswith(kb["ranking"][0])
    rag = next(s for s in kb["strategies"] if s["strategy"] == "rag")
    assert rag["hit_rate"] >= 0.75 and rag["mrr"] == rag["hit_rate"]  # top_k = 1
    assert next(s for s in kb["strategies"] if s["strategy"] == "adapter")["hit_rate"] is None

    # Facts only in the adapter's training data: the adapter answers them, retrieval does not.
    memo, _, _, f1 = found["memo"]
    assert f1["adapter"] >= 0.75 and f1["adapter"] - max(f1["base"], f1["icl"], f1["rag"]) >= 0.5, f1
    assert memo["ranking"][0] in ADAPTED and memo["recommendation"].startswith(memo["ranking"][0])

    # Both kinds: only the hybrid answers both, and the recommendation says so with numbers.
    mix, _, _, f1 = found["mix"]
    assert f1["adapter+rag"] >= 0.75 and f1["adapter+rag"] - max(f1["rag"], f1["adapter"]) >= 0.25, f1
    assert mix["ranking"][0] in HYBRID
    best = mix["ranking"][0]
    assert mix["recommendation"].startswith(best) and f"F1 {f1[best]:.2f}" in mix["recommendation"]
    # Per subset, the same verdicts as on the separate sets, each printed after the overall one.
    assert mix["subsets"]["kb"]["ranking"][0] in RETRIEVING and mix["subsets"]["memo"]["ranking"][0] in ADAPTED
    assert all(s["subset"] == "kb" and s["items"] == len(sets["kb"]) for s in mix["subsets"]["kb"]["strategies"])
    stdout = found["mix"][1]
    assert f"kb: {mix['subsets']['kb']['recommendation']}" in stdout
    assert f"memo: {mix['subsets']['memo']['recommendation']}" in stdout
