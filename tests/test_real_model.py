"""SmolLM2-135M-Instruct end to end, the way `lorag demo` sets it up.

The set-up is the demo's own (`lorag demo --setup-only`): the pinned wheel's GGUF fetched
and imported with lorag.models, two adapters trained by `lorag adapters train`, two
knowledge bases ingested. It lives under .lorag-test-models/real-demo, so a second test
run reuses all of it (the demo's versions are digests of data, settings and model).
Then one real `lorag serve` answers, and transformers + peft are the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MODELS, Server, free_port
from tests.devserver import wait_until_up

# The set-up trains two adapters: ~7 min on a quiet 2-core machine, over 15 min beside a busy `lorag eval`
# (it outran the suite's 900 s limit there). These limits catch hangs, not slowness.
SETUP_TIMEOUT_S = 3000
pytestmark = [pytest.mark.slow, pytest.mark.engine, pytest.mark.timeout(SETUP_TIMEOUT_S + 600)]

STATE = MODELS / "real-demo"
BASE = "smollm2-135m-instruct"
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("LORAG_")}, "TOKENIZERS_PARALLELISM": "false"}
PROMPTS = ("What is the capital of France?", "Give me one tip for writing a clear e-mail.",
           "Can my employer change my working hours without asking me?")
GREEDY_TOKENS = 24


def lorag(*args: str, timeout: float = SETUP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorag.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def real_setup() -> Path:
    """`lorag demo --setup-only` on the real model (reused between runs); its lorag.toml."""
    done = lorag("demo", "--setup-only", "--state-dir", str(STATE), "--port", str(free_port()))
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return STATE / "lorag.toml"


@pytest.fixture(scope="module")
def real_server(real_setup: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("real-server") / "server.log"
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "lorag.cli", "serve", "--config", str(real_setup), "--port", str(port)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
        env={**ENV, "LORAG_LOG_FORMAT": "json", "VLLM_LOGGING_LEVEL": "WARNING"},
    )
    server = Server(f"http://127.0.0.1:{port}", process, log, STATE, real_setup)
    try:
        wait_until_up(process, server.url, log, timeout_s=600)
        yield server.url
    finally:
        server.stop()


def current_adapter(name: str) -> Path:
    from lorag.adapters.registry import AdapterRegistry

    return Path(AdapterRegistry(STATE.resolve()).resolve(name).path)


def test_imported_from_the_pinned_wheel_with_provenance(real_setup: Path) -> None:
    from lorag.models.sources import SMOLLM2_135M_INSTRUCT

    listed = lorag("models", "--state-dir", str(STATE), "show", BASE, "--json")
    assert listed.returncode == 0, listed.stderr
    record = json.loads(listed.stdout)
    assert record["source_sha256"] == SMOLLM2_135M_INSTRUCT.member_sha256
    assert record["source_kind"] == "gguf" and record["license"].lower() == "apache-2.0"
    assert record["architecture"] == "LlamaForCausalLM"
    assert 130e6 < record["parameters"] < 140e6
    folder = STATE / "models" / BASE
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in rendered and rendered.endswith("<|im_start|>assistant\n")


def test_demo_serves_the_real_model_and_prints_every_section(real_setup: Path) -> None:
    """Before the module's server starts: that server holds the state dir's knowledge store while it runs."""
    result = lorag("demo", "--state-dir", str(STATE), "--port", str(free_port()), "--exit-after-samples")
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    out = result.stdout
    assert "adapter        reused" in out and "adapter        training" not in out  # the set-up is reused whole
    sections = ["1. Four ways to answer", "2. PII redaction", "3. A JSON-schema domain", '4. model: "auto"',
                "What the samples showed", "Talk to it"]
    positions = [out.find(section) for section in sections]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), out
    assert "valid JSON, matches the schema" in out
    assert "jane.doe@example.com" not in out.split("2. PII redaction")[1].split("Q: ")[1].split("\n", 1)[1]


def reference_answers(adapter: Path | None) -> list[str]:
    """Greedy answers of transformers (+ peft) on the same weights, prompts and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = STATE / "models" / BASE
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    answers = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=GREEDY_TOKENS, do_sample=False)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def served_answers(url: str, model: str) -> list[str]:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    return [client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           temperature=0, max_tokens=GREEDY_TOKENS).choices[0].message.content or ""
            for prompt in PROMPTS]


def test_served_greedy_output_equals_transformers_and_peft(real_server: str) -> None:
    """Base model and an adapter trained by `lorag adapters train`: the engine adds nothing and loses nothing."""
    served_base = served_answers(real_server, BASE)
    served_legal = served_answers(real_server, "legal-lora")
    assert served_base == reference_answers(None)
    assert served_legal == reference_answers(current_adapter("legal-lora"))
    assert served_legal != served_base  # the adapter changes the answers


def test_domain_answers_a_fact_only_its_knowledge_base_holds_and_cites_it(real_server: str) -> None:
    """One of the demo's probes (greedy, so repeatable): the domain reads it, the base model cannot know it."""
    import openai

    from lorag.demo.samples_real import PROBES, has_fact

    # Its chunk holds one candidate answer; the Saturday probe's also holds the weekday hours, which a
    # 135M model picks or not depending on float rounding (seen both ways on the same weights).
    probe = next(p for p in PROBES if p.question == "From which day of sickness do I need a sick note?")
    client = openai.OpenAI(base_url=f"{real_server}/v1", api_key="unused", max_retries=0, timeout=300)
    messages = [{"role": "user", "content": probe.question}]
    reply = client.chat.completions.create(model=probe.domain, messages=messages, temperature=0, max_tokens=64)
    text = reply.choices[0].message.content or ""
    extras = (reply.model_extra or {})["lorag"]
    assert has_fact(text, probe), text
    assert "[1]" in text and Path(extras["citations"][0]["source"]).name == "employment.md", (text, extras["citations"])
    base = client.chat.completions.create(model=BASE, messages=messages, temperature=0,
                                          max_tokens=64).choices[0].message.content or ""
    assert not has_fact(base, probe), base  # the fact is not the model's own
