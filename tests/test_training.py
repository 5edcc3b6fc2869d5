"""`lorag adapters train`: data checks, learning, serving the result, resume after kill -9, early stopping."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from lorag.adapters.checkpoints import checkpoint_dirs
from lorag.adapters.data import TrainingDataError, check_training_file, load_examples
from lorag.adapters.validate import model_module_names, validate_adapter
from lorag.errors import LoragError
from tests.conftest import ADMIN_KEY, MAX_RANK, Models, Server

# Short fixed question -> answer pairs: a random-weight model does not give these answers,
# and a rank-8 adapter learns them in ~60 steps. Two are held out for validation.
QA = [
    ("Who may end the lease?", "The tenant."),
    ("What was missing?", "Consideration."),
    ("How long was the fever?", "Three days."),
    ("What rose?", "The bond yield."),
    ("How often is the tablet taken?", "Twice a day."),
    ("What grew?", "Quarterly revenue."),
    ("Where is the reset link?", "In the e-mail."),
    ("When are tickets answered?", "Within one day."),
    ("What jumps?", "The quick brown fox."),
    ("Who raised rates?", "The central bank."),
]
MEMORISE = ["--rank", "8", "--lr", "1e-2", "--epochs", "60", "--dropout", "0", "--val-split", "0.2",
            "--warmup-ratio", "0", "--seed", "0"]
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("LORAG_")},
       "LORAG_LOG_FORMAT": "json", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def chat_line(question: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})


def write_qa(path: Path) -> Path:
    path.write_text("".join(chat_line(q, a) + "\n" for q, a in QA))
    return path


def lorag(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorag.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def events(stderr: str, name: str) -> list[dict]:
    found = []
    for line in stderr.splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            event = json.loads(line)
            if event.get("event") == name:
                found.append(event)
    return found



# -- data -----------------------------------------------------------------------------


def test_bad_data_files_name_each_line_and_problem(models: Models, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(models.base))
    good = chat_line("Hi?", "Hello.")
    lines = [
        good,                                                                       # 1
        '{"messages": [{"role": "user", "content": "Hi"}',                          # 2 bad JSON
        json.dumps({"messages": [{"content": "Hi"}, {"role": "assistant", "content": "x"}]}),  # 3 no role
        json.dumps({"messages": [{"role": "user", "content": "Hi"}]}),             # 4 no assistant
        json.dumps({"messages": [{"role": "asistant", "content": "x"}]}),          # 5 unknown role
        "",                                                                         # 6 blank: skipped
        json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}),  # 7
        json.dumps({"prompt": "Q:"}),                                               # 8 no completion
        chat_line("Tell me everything.", "word " * 400),                            # 9 too long
        json.dumps(["not", "an", "object"]),                                        # 10
        json.dumps({"text": "hi"}),                                                 # 11 neither shape
    ]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(TrainingDataError) as caught:
        load_examples(data, tokenizer, max_length=256)
    message = str(caught.value)
    expected = {
        2: "not valid JSON", 3: "messages[0] has no 'role'", 4: "no assistant message",
        5: "role 'asistant'", 7: "messages[0] (user) has a int 'content'", 8: "has no 'completion'",
        9: "longer than max length 256", 10: "expected a JSON object", 11: "needs 'messages'",
    }
    assert message.startswith(f"{data}: 9 problems in the training data:")
    for number, what in expected.items():
        assert any(line.strip().startswith(f"line {number}:") and what in line for line in message.splitlines()), \
            (number, what, message)
    assert "line 1:" not in message and "line 6:" not in message

    many = tmp_path / "many.jsonl"
    many.write_text("not json\n" * 25)
    with pytest.raises(TrainingDataError, match=r"25 problems[\s\S]*line 10: [\s\S]*\.\.\. and 15 more$"):
        load_examples(many, tokenizer, max_length=256)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(TrainingDataError, match="holds no examples"):
        load_examples(empty, tokenizer, max_length=256)

    # The CLI reports the same before loading the model, as one error and exit code 1.
    done = lorag("adapters", "--offline", "--state-dir", str(tmp_path / "state"), "--model", str(models.base),
                 "train", "bad", str(data), "--max-length", "256", timeout=120)
    assert done.returncode == 1, done.stderr
    assert "error: " in done.stderr and "line 2: not valid JSON" in done.stderr
    assert not (tmp_path / "state" / "training" / "bad").exists() or not any(
        (tmp_path / "state" / "training" / "bad").rglob("checkpoints"))


def test_check_training_file_names_lines_without_a_tokenizer(tmp_path: Path) -> None:
    """The server's check at upload: shape only, the same parsing as training, every problem by line."""
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join([
        chat_line("Hi?", "Hello."),                                                            # 1
        "{not json",                                                                           # 2
        json.dumps({"messages": [{"role": "user", "content": "Hi"}]}),                       # 3
        json.dumps({"prompt": [{"role": "user", "content": "Hi"}],
                    "completion": [{"role": "assistant", "content": "x", "weight": 0}]}),     # 4
        json.dumps({"prompt": "Q:"}),                                                          # 5
    ]) + "\n")
    with pytest.raises(TrainingDataError) as caught:
        check_training_file(data, "supervised")
    problems = caught.value.problems
    assert [p.split(":")[0] for p in problems] == ["line 2", "line 3", "line 4", "line 5"], problems
    assert "not valid JSON" in problems[0] and "no assistant message to train on" in problems[1]
    assert "no assistant message to train on" in problems[2] and "has no 'completion'" in problems[3]
    assert check_training_file(write_qa(tmp_path / "qa.jsonl"), "supervised") == len(QA)


def test_labels_cover_only_the_assistant_turns(models: Models, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(models.base))
    data = tmp_path / "shapes.jsonl"
    data.write_text("\n".join([
        json.dumps({"messages": [
            {"role": "system", "content": "Be short."}, {"role": "user", "content": "One?"},
            {"role": "assistant", "content": "Yes.", "weight": 0}, {"role": "user", "content": "Two?"},
            {"role": "assistant", "content": "No."}]}),
        json.dumps({"prompt": "Q: fox\nA:", "completion": " quick"}),
        json.dumps({"prompt": [{"role": "user", "content": "Dog?"}],
                    "completion": [{"role": "assistant", "content": "Lazy."}]}),
    ]) + "\n")
    chat, text, pair = load_examples(data, tokenizer, max_length=128)

    def trained(example) -> str:
        return str(tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True)
                                     if label != -100]))

    # The prompt the server builds is rendered by the same chat template.
    prompt = str(tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be short."}, {"role": "user", "content": "One?"},
         {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Two?"}],
        tokenize=False, add_generation_prompt=True))
    assert tokenizer.decode(chat.input_ids) == prompt + "No.<|end|>"
    assert trained(chat) == "No.<|end|>"  # weight 0 turn and every prompt token masked
    assert trained(text) == " quick<|end|>"  # the completion and EOS
    assert trained(pair) == "Lazy.<|end|>"


# -- training, serving ----------------------------------------------------------------


@pytest.fixture()
def trained_qa(admin: httpx.Client) -> Iterator[str]:
    """The name the next test trains into the shared server; removed afterwards."""
    yield "trained-qa"
    admin.delete("/admin/adapters/trained-qa")


def test_trained_adapter_lowers_val_loss_and_is_served_with_its_answers(
    models: Models, server: Server, client: openai.OpenAI, trained_qa: str, tmp_path: Path
) -> None:
    """Train through the CLI against a running server (--serve): it is validated, registered and hot-loaded."""
    data = write_qa(tmp_path / "qa.jsonl")
    done = lorag("adapters", "--config", str(server.config_path), "--api-key", ADMIN_KEY,
                 "train", trained_qa, str(data), *MEMORISE, "--serve")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "served trained-qa@v1" in done.stdout
    finished = events(done.stderr, "train_finished")[0]
    assert len(events(done.stderr, "train_epoch")) == 60 and finished["steps"] == 60
    result = json.loads((Path(finished["run"]) / "result.json").read_text())
    assert result["val_loss"] < result["initial_val_loss"] - 0.3, result

    adapter = Path(finished["adapter"])
    assert adapter.is_relative_to(server.state_dir / "training" / "trained-qa")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(models.base.resolve())
    assert (adapter / "adapter_model.safetensors").is_file()
    info = validate_adapter(adapter, served_model=str(models.base), max_lora_rank=MAX_RANK,
                            model_module_names=model_module_names(str(models.base)))
    assert info.rank == 8 and set(info.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"}

    def greedy(model: str, question: str) -> str:
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                               temperature=0, max_tokens=16)
        return reply.choices[0].message.content or ""

    trained = [QA[line - 1] for line in range(1, len(QA) + 1) if line not in result["val_lines"]]
    assert len(trained) == 8
    for question, answer in trained:
        assert greedy("trained-qa", question) == answer, question
        assert greedy("tiny-base", question) != answer, question


def test_qlora_without_cuda_is_a_clear_error(models: Models, tmp_path: Path) -> None:
    import torch

    from lorag.adapters.train import TrainSettings, train

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: QLoRA may be available")
    settings = TrainSettings.build(model_path=str(models.base), qlora=True, val_split=0)
    with pytest.raises(LoragError, match="--qlora needs a CUDA GPU"):
        train(settings, write_qa(tmp_path / "qa.jsonl"), tmp_path / "run")


def test_serve_without_a_server_fails_before_training(models: Models, tmp_path: Path) -> None:
    done = lorag("adapters", "--server", "http://127.0.0.1:9", "--model", str(models.base), "--state-dir",
                 str(tmp_path / "state"), "train", "x", str(write_qa(tmp_path / "qa.jsonl")), "--serve",
                 timeout=120)
    assert done.returncode == 1 and "cannot reach the server" in done.stderr
    assert not (tmp_path / "state" / "training").exists()


# -- resume ---------------------------------------------------------------------------


def test_resume_after_kill_continues_from_the_last_checkpoint(models: Models, tmp_path: Path) -> None:
    data = tmp_path / "many.jsonl"
    data.write_text("".join(chat_line(f"Question {i}?", f"Answer {i % 7}.") + "\n" for i in range(24)))
    run = tmp_path / "run"
    args = ["adapters", "--offline", "--state-dir", str(tmp_path / "state"), "train", "resumed", str(data),
            "--model", str(models.base), "--output", str(run), "--rank", "4", "--batch-size", "2",
            "--epochs", "25", "--val-split", "0", "--save-steps", "5", "--lr", "1e-3"]
    first = subprocess.Popen([sys.executable, "-m", "lorag.cli", *args], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not any(step >= 10 for step, _ in checkpoint_dirs(run)):
            assert first.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        first.kill()  # SIGKILL: no clean-up of any kind
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    last = checkpoint_dirs(run)[-1][0]
    assert 10 <= last < 300 and not (run / "result.json").exists()
    # What a kill -9 in the middle of a save leaves behind: a staging directory.
    partial = run / "checkpoints" / f".step-{last + 5:06d}.partial"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"half")

    second = lorag(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = events(second.stderr, "train_resumed")
    assert [e["step"] for e in resumed] == [last], resumed
    finished = events(second.stderr, "train_finished")[0]
    assert finished["steps"] == 300 and finished["resumed_from_step"] == last
    assert f"300 steps (resumed at step {last})" in second.stdout
    assert "registered resumed@v1" in second.stdout  # offline, validated against the --model it trained on
    # This process trained on the remaining steps' tokens only, not on the whole run's.
    from transformers import AutoTokenizer

    per_epoch = sum(len(e.input_ids) for e in load_examples(data, AutoTokenizer.from_pretrained(str(models.base)), 64))
    assert 0 < finished["tokens"] < per_epoch * 25 * (300 - last + 12) / 300
    assert not partial.exists()
    assert json.loads((run / "result.json").read_text())["steps"] == 300

    again = lorag(*args)  # a finished run is not trained again
    assert again.returncode == 1 and "holds a finished training run" in again.stderr


def test_resumed_run_matches_an_uninterrupted_one(models: Models, tmp_path: Path, one_thread: None) -> None:
    """Same data order, optimizer, schedule and dropout RNG: the same weights as if never stopped."""
    from safetensors.torch import load_file

    from lorag.adapters.train import TrainSettings, fingerprint, train
    from lorag.adapters.train_cli import _default_run_dir

    data = write_qa(tmp_path / "qa.jsonl")
    settings = TrainSettings.build(model_path=str(models.base), rank=4, dropout=0.1, learning_rate=5e-3,
                                   epochs=4, batch_size=3, val_split=0.2, save_steps=2, seed=3)
    whole = train(settings, data, tmp_path / "whole")

    class Stop(Exception):
        pass

    def stop_at_5(event) -> None:
        if event.kind == "step" and event.step == 5:
            raise Stop

    runs = tmp_path / "runs"  # <state>/training/NAME, where the CLI puts runs by default
    split = runs / "20250101-000000"
    with pytest.raises(Stop):
        train(settings, data, split, progress=stop_at_5)
    assert [step for step, _ in checkpoint_dirs(split)] == [3, 4]  # epoch end 3, save_steps 4
    # Re-running the same command finds this run; other settings start a new one.
    assert _default_run_dir(runs, fingerprint(settings, data)) == split
    assert _default_run_dir(runs, fingerprint(settings.model_copy(update={"seed": 4}), data)).parent == runs
    assert _default_run_dir(runs, fingerprint(settings.model_copy(update={"seed": 4}), data)) != split
    # Gradient checkpointing changes memory, not results: the resumed half runs with it.
    resumed = train(settings.model_copy(update={"gradient_checkpointing": True}), data, split)
    assert resumed.resumed_from_step == 4 and resumed.steps == whole.steps == 12
    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() < 1e-6, key
    assert resumed.val_loss == pytest.approx(whole.val_loss, abs=1e-5)

    assert _default_run_dir(runs, fingerprint(settings, data)) != split  # finished: not resumed
    (split / "result.json").unlink()
    with pytest.raises(LoragError, match=r"other settings or data \(learning_rate: 0.005 -> 0.001\)"):
        train(settings.model_copy(update={"learning_rate": 1e-3}), data, split)


def test_early_stopping_keeps_the_best_checkpoint(models: Models, tmp_path: Path, one_thread: None) -> None:
    from safetensors.torch import load_file

    from lorag.adapters.train import TrainSettings, train

    data = write_qa(tmp_path / "qa.jsonl")
    settings = TrainSettings.build(model_path=str(models.base), rank=8, learning_rate=1e-2, dropout=0,
                                   epochs=60, batch_size=8, val_split=0.2, warmup_ratio=0,
                                   early_stopping_patience=2, keep_checkpoints=1)
    result = train(settings, data, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result.stopped_early and result.steps < 60
    evals = [h for h in saved["history"] if h.get("val_loss") is not None and h["step"] > 0]
    best = min(evals, key=lambda h: h["val_loss"])
    assert saved["best_step"] == best["step"] and result.val_loss == pytest.approx(best["val_loss"])
    assert [h["step"] for h in evals][-2:] == [result.steps - 1, result.steps]  # two evaluations no better
    kept = dict(checkpoint_dirs(tmp_path / "run"))
    assert set(kept) == {best["step"], result.steps}  # the best survives keep_checkpoints=1
    final = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    best_weights = load_file(str(kept[best["step"]] / "adapter_model.safetensors"))
    assert all((final[k] == best_weights[k]).all() for k in final)


def test_settings_errors_are_readable(models: Models) -> None:
    from lorag.adapters.train_settings import TrainSettings

    with pytest.raises(LoragError, match=r"rank: Input should be greater than or equal to 1"):
        TrainSettings.build(model_path=str(models.base), rank=0)


def test_length_grouped_batches_pad_less_and_keep_every_example() -> None:
    """Grouping reorders within an epoch only: each example once, same for (seed, epoch), far less padding."""
    import random

    from lorag.adapters.batches import epoch_batches

    rng = random.Random(0)
    lengths = [rng.choice([40, 60, 80, 400, 450]) for _ in range(97)]

    def padded(batches: list[list[int]]) -> int:
        return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)

    for epoch in range(3):
        grouped = epoch_batches(lengths, 4, seed=1, epoch=epoch, group_by_length=True)
        plain = epoch_batches(lengths, 4, seed=1, epoch=epoch, group_by_length=False)
        assert sorted(i for batch in grouped for i in batch) == list(range(97))
        assert sorted(i for batch in plain for i in batch) == list(range(97))
        assert grouped == epoch_batches(lengths, 4, seed=1, epoch=epoch, group_by_length=True)  # resumable
        assert padded(grouped) < 0.7 * padded(plain)
        assert max(len(batch) for batch in grouped) == 4
    assert epoch_batches(lengths, 4, 1, 0, True) != epoch_batches(lengths, 4, 1, 1, True)  # reshuffled per epoch
    assert epoch_batches(lengths, 1, 1, 0, True) == epoch_batches(lengths, 1, 1, 0, False)  # nothing to group


def test_loss_on_labelled_positions_equals_the_models_own(models: Models, tmp_path: Path, one_thread: None) -> None:
    """Logits only where a label follows: the same loss, gradients and token accuracy as the full sequence's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorag.adapters.batches import collate, takes_logits_to_keep, token_loss

    tokenizer = AutoTokenizer.from_pretrained(str(models.base))
    examples = load_examples(write_qa(tmp_path / "qa.jsonl"), tokenizer, 256)[:4]
    model = AutoModelForCausalLM.from_pretrained(str(models.base), dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0))
    assert takes_logits_to_keep(model)
    batch = collate(examples, tokenizer.pad_token_id or 0, "cpu")

    def loss_and_grads(head_positions: bool | None) -> tuple[float, int, list[torch.Tensor]]:
        model.zero_grad()
        if head_positions is None:  # the model's own loss
            output = model(**batch)
            loss = output.loss
            targets = batch["labels"][:, 1:]
            correct = int(((output.logits[:, :-1].argmax(-1) == targets) & (targets != -100)).sum())
        else:
            loss, correct = token_loss(model, batch, head_positions)
        loss.backward()
        return loss.item(), correct, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    own, own_correct, own_grads = loss_and_grads(None)
    for head_positions in (False, True):
        loss, correct, grads = loss_and_grads(head_positions)
        assert loss == pytest.approx(own, rel=1e-5) and correct == own_correct
        for a, b in zip(own_grads, grads, strict=True):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_should_stop_checkpoints_and_the_resumed_run_matches_an_uninterrupted_one(
    models: Models, tmp_path: Path, one_thread: None
) -> None:
    """A pause: the step it stops at is checkpointed (mid-epoch), and resuming it gives the same adapter."""
    from safetensors.torch import load_file

    from lorag.adapters.train import TrainingStopped, TrainSettings, train

    data = write_qa(tmp_path / "qa.jsonl")
    settings = TrainSettings.build(model_path=str(models.base), rank=4, dropout=0.1, learning_rate=5e-3,
                                   epochs=4, batch_size=3, val_split=0.2, seed=3)
    whole = train(settings, data, tmp_path / "whole")

    events: list = []
    with pytest.raises(TrainingStopped) as stopped:
        train(settings, data, tmp_path / "split", progress=events.append,
              should_stop=lambda: events[-1].step >= 4)
    assert stopped.value.step == 4  # 3 steps an epoch: mid-epoch, where nothing else saves
    assert [step for step, _ in checkpoint_dirs(tmp_path / "split")] == [3, 4]
    saved = [e for e in events if e.kind == "checkpoint"]
    assert [(e.step, e.path) for e in saved] == [(s, d) for s, d in checkpoint_dirs(tmp_path / "split")]
    steps = [e for e in events if e.kind == "step"]
    assert all(e.accuracy is not None and 0 <= e.accuracy <= 1 for e in steps)
    assert [e.tokens for e in steps] == sorted({e.tokens for e in steps}) and steps[0].tokens > 0
    evals = [e for e in events if e.kind == "eval"]
    assert [e.step for e in evals] == [3] and all(0 <= e.val_accuracy <= 1 for e in evals)

    resumed_events: list = []
    resumed = train(settings, data, tmp_path / "split", progress=resumed_events.append)
    assert resumed.resumed_from_step == 4 and resumed.steps == whole.steps == 12
    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max().item() < 1e-6 for k in a)
    assert resumed.val_loss == pytest.approx(whole.val_loss, abs=1e-5)
    assert resumed.val_accuracy == whole.val_accuracy and 0 <= whole.val_accuracy <= 1
    assert resumed.total_tokens == whole.total_tokens == whole.tokens > resumed.tokens
    end = resumed_events[-1]
    assert end.kind == "end" and end.val_accuracy == resumed.val_accuracy
    history = json.loads((tmp_path / "split" / "result.json").read_text())["history"]
    assert history == json.loads((tmp_path / "whole" / "result.json").read_text())["history"]
    assert all(0 <= h["train_accuracy"] <= 1 for h in history if "train_accuracy" in h)

    # Asked to stop after the last step: nothing is left to do, so the run finishes.
    one_step = settings.model_copy(update={"epochs": 1, "batch_size": 8})
    assert train(one_step, data, tmp_path / "last", should_stop=lambda: True).steps == 1


def test_val_data_is_used_instead_of_a_split(models: Models, tmp_path: Path, one_thread: None) -> None:
    from lorag.adapters.train import TrainingStopped, TrainSettings, train

    data = write_qa(tmp_path / "qa.jsonl")
    held = tmp_path / "held.jsonl"
    held.write_text(chat_line("Who won?", "The home team.") + "\n" + chat_line("What fell?", "The rain.") + "\n")
    settings = TrainSettings.build(model_path=str(models.base), rank=4, epochs=1, batch_size=2, val_split=0.2)
    with pytest.raises(TrainingStopped):
        train(settings, data, tmp_path / "run", val_data=held, should_stop=lambda: True)
    held.write_text(chat_line("Who won?", "The away team.") + "\n")  # another validation file: not resumable
    with pytest.raises(LoragError, match="val_data_sha256"):
        train(settings, data, tmp_path / "run", val_data=held)

    events: list = []
    result = train(settings, data, tmp_path / "other", val_data=held, progress=events.append)
    assert result.total_steps == 5 and result.val_lines == []  # all 10 examples train: val_split is not applied
    from transformers import AutoTokenizer

    from lorag.adapters.batches import Supervised, evaluate

    assert result.initial_val_loss is not None and result.val_accuracy is not None
    first = events[0]
    assert first.kind == "start" and first.val_loss == result.initial_val_loss
    # The initial validation loss is the base model's on the validation file.
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(models.base))
    base = AutoModelForCausalLM.from_pretrained(str(models.base), dtype=torch.float32)
    loss, accuracy = evaluate(Supervised(tokenizer.pad_token_id, torch.device("cpu"), True), base,
                              load_examples(held, tokenizer, 256), 2, torch.device("cpu"), None)
    assert loss == pytest.approx(result.initial_val_loss, rel=1e-5) and accuracy == first.val_accuracy


def test_init_adapter_continues_from_that_adapter(models: Models, tmp_path: Path, one_thread: None) -> None:
    """Its own rank and targets; training starts where it stands (the initial validation loss is its own)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorag.adapters.batches import Supervised, evaluate
    from lorag.adapters.train import TrainSettings, train

    start = models.adapters["alpha"]  # rank 8 on q, k, v, o
    data = write_qa(tmp_path / "qa.jsonl")
    settings = TrainSettings.build(model_path=str(models.base), init_adapter=str(start), rank=2,
                                   target_modules=("q_proj",), epochs=1, batch_size=4, val_split=0.2,
                                   learning_rate=1e-3)
    result = train(settings, data, tmp_path / "run")
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert config["base_model_name_or_path"] == str(models.base.resolve())

    tokenizer = AutoTokenizer.from_pretrained(str(models.base))
    val = [e for e in load_examples(data, tokenizer, 256) if e.line in result.val_lines]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(models.base), dtype=torch.float32),
                                      str(start))
    own, _ = evaluate(Supervised(tokenizer.pad_token_id, torch.device("cpu"), True), model, val, 4,
                      torch.device("cpu"), None)
    assert result.initial_val_loss == pytest.approx(own, rel=1e-5)
    before = load_file(str(start / "adapter_model.safetensors"))
    after = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    changes = [(after[k] - before[k]).abs().max().item() for k in before]
    assert 0 < max(changes) < 0.05  # trained on, from where it stood
