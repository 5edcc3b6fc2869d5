"""DPO on preference pairs: the format's checks, tokenization, TRL's loss, training, resuming."""

from __future__ import annotations

import json
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest

from lorag.adapters.data import TrainingDataError, check_training_file, load_pairs
from tests.conftest import Models

# question -> (preferred, rejected): short answers a rank-4 adapter learns to rank in a few steps.
PREFERENCES = [
    ("Who may end the lease?", "The tenant.", "The landlord."),
    ("What was missing?", "Consideration.", "Nothing at all."),
    ("How long was the fever?", "Three days.", "One week."),
    ("What rose?", "The bond yield.", "The stock price."),
    ("What grew?", "Quarterly revenue.", "Costs."),
    ("Who raised rates?", "The central bank.", "The mayor."),
    ("Where is the reset link?", "In the e-mail.", "On the phone."),
    ("What jumps?", "The quick brown fox.", "The lazy dog."),
]


def preference_line(question: str, chosen: str, rejected: str, *, alias: bool = False) -> str:
    good, bad = ("preferred_completion", "non_preferred_completion") if alias else \
        ("preferred_output", "non_preferred_output")
    return json.dumps({"input": {"messages": [{"role": "user", "content": question}]},
                       good: [{"role": "assistant", "content": chosen}],
                       bad: [{"role": "assistant", "content": rejected}]})


def write_preferences(path: Path, rows: list[tuple[str, str, str]] = PREFERENCES) -> Path:
    path.write_text("".join(preference_line(*row) + "\n" for row in rows))
    return path


def tokenizer_of(models: Models):  # -> transformers tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(models.base))


# -- the format -----------------------------------------------------------------------


def test_bad_preference_lines_are_named(models: Models, tmp_path: Path) -> None:
    user = {"role": "user", "content": "Hi?"}
    answer = [{"role": "assistant", "content": "Hello."}]
    other = [{"role": "assistant", "content": "Go away."}]
    lines = [
        preference_line("Hi?", "Hello.", "Go away."),                                          # 1 good
        preference_line("Hi?", "Hello.", "Go away.", alias=True),                              # 2 good (alias keys)
        json.dumps({"input": {"messages": [user]}, "preferred_output": answer}),             # 3
        json.dumps({"preferred_output": answer, "non_preferred_output": other}),             # 4
        json.dumps({"input": {"messages": [{"role": "user"}]}, "preferred_output": answer,
                    "non_preferred_output": other}),                                          # 5
        json.dumps({"input": {"messages": [user]}, "preferred_output": [{"role": "user", "content": "x"}],
                    "non_preferred_output": other}),                                          # 6
        json.dumps({"input": {"messages": [user]}, "preferred_output": answer,
                    "non_preferred_output": [{"role": "assistant", "content": 3}]}),          # 7
        '{"input": ',                                                                          # 8
        json.dumps({"input": {"messages": [user]}, "preferred_output": answer,
                    "non_preferred_output": answer}),                                         # 9
        json.dumps({"input": {"messages": [user]}, "preferred_output": answer, "preferred_completion": answer,
                    "non_preferred_output": other}),                                          # 10
        json.dumps({"input": "Hi?", "preferred_output": answer, "non_preferred_output": other}),  # 11
    ]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    expected = {
        3: "has no 'non_preferred_output' (a preference example needs the rejected answer)",
        4: "has no 'input'", 5: "input.messages[0] (user) has no 'content'",
        6: "'preferred_output' must hold exactly one assistant message",
        7: "non_preferred_output[0] (assistant) has a int 'content'", 8: "not valid JSON",
        9: "are the same", 10: "has both 'preferred_output' and 'preferred_completion'",
        11: "'input' must be an object with 'messages'",
    }
    with pytest.raises(TrainingDataError) as caught:
        check_training_file(data, "dpo")
    message = str(caught.value)
    assert message.startswith(f"{data}: 9 problems in the training data:"), message
    for number, what in expected.items():
        assert any(line.strip().startswith(f"line {number}:") and what in line for line in message.splitlines()), \
            (number, what, message)
    assert "line 1:" not in message and "line 2:" not in message
    # The tokenizing path parses the same way, and refuses what is too long, naming its line.
    long = tmp_path / "long.jsonl"
    long.write_text(preference_line("Hi?", "Hello.", "word " * 300) + "\n" + lines[0] + "\n")
    with pytest.raises(TrainingDataError, match=r"1 problem in the training data:\n  line 1: \d+ tokens, longer"):
        load_pairs(long, tokenizer_of(models), max_length=256)
    assert check_training_file(long, "dpo") == 2
    # A supervised file is not a preference file, and the other way round.
    assert check_training_file(write_preferences(tmp_path / "ok.jsonl"), "dpo") == len(PREFERENCES)
    with pytest.raises(TrainingDataError, match="line 1: needs 'messages'"):
        check_training_file(tmp_path / "ok.jsonl", "supervised")


def test_pairs_are_tokenized_as_chat_examples(models: Models, tmp_path: Path) -> None:
    """The prompt as the server renders it; each answer as the template continues it (end of turn included)."""
    tokenizer = tokenizer_of(models)
    (pair,) = load_pairs(write_preferences(tmp_path / "one.jsonl", PREFERENCES[:1]), tokenizer, 128)
    prompt = str(tokenizer.apply_chat_template([{"role": "user", "content": "Who may end the lease?"}],
                                               tokenize=False, add_generation_prompt=True))
    for side, answer in ((pair.chosen, "The tenant."), (pair.rejected, "The landlord.")):
        assert tokenizer.decode(side.input_ids) == prompt + answer + "<|end|>"
        trained = [t for t, label in zip(side.input_ids, side.labels, strict=True) if label != -100]
        assert tokenizer.decode(trained) == answer + "<|end|>"
    shared = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert pair.chosen.input_ids[:shared] == pair.rejected.input_ids[:shared]
    assert set(pair.chosen.labels[:shared]) == {-100}


# -- the loss -------------------------------------------------------------------------


def trl_stand_in(model, beta: float) -> SimpleNamespace:
    """What TRL's DPOTrainer._compute_loss and compute_ref_log_probs read of `self`, for the default
    sigmoid loss with precomputed reference log-probs, on one CPU process."""
    accelerator = SimpleNamespace(device=model.device, gather_for_metrics=lambda x: x, gather=lambda x: x,
                                  unwrap_model=lambda m: m, autocast=nullcontext)
    return SimpleNamespace(
        model=model, ref_model=None, accelerator=accelerator, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        beta=beta, loss_types=["sigmoid"], loss_weights=[1.0], f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=1.0, label_smoothing=0.0, use_weighting=False, ld_alpha=None,
        precompute_ref_logps=True, aux_loss_enabled=False, _metrics={"train": defaultdict(list),
                                                                     "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )


def test_dpo_loss_equals_trls(models: Models, tmp_path: Path, one_thread: None) -> None:
    """lorag's loss, reference log-probs, reward accuracy and gradients are TRL's on the same batch."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from lorag.adapters.batches import collate
    from lorag.adapters.dpo import Dpo, with_reference

    tokenizer = tokenizer_of(models)
    pairs = load_pairs(write_preferences(tmp_path / "pairs.jsonl"), tokenizer, 256)
    base = AutoModelForCausalLM.from_pretrained(str(models.base), dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, init_lora_weights=False))  # B != 0: policy != base
    beta = 0.3
    objective = Dpo(pad_id=tokenizer.pad_token_id, device=torch.device("cpu"), head_positions=True, beta=beta)
    with model.disable_adapter():  # TRL's reference for a PEFT model: the adapter disabled
        ours = with_reference(model, objective, {"train": pairs}, tmp_path, reuse=False, batch_size=3,
                              amp_dtype=None)["train"]
    model.train()
    model.zero_grad()
    measured = objective.measure(model, ours)
    measured.loss.backward()
    our_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]

    # TRL's batch: every chosen row, then every rejected row; the completion mask marks the answers.
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], tokenizer.pad_token_id, "cpu")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long()}
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    stand_in = trl_stand_in(model, beta)
    ref_chosen, ref_rejected = DPOTrainer.compute_ref_log_probs(stand_in, model, inputs)
    assert torch.allclose(torch.tensor([p.reference for p in ours]),
                          torch.stack([ref_chosen, ref_rejected], dim=1), atol=1e-4, rtol=1e-5)
    inputs |= {"ref_chosen_logps": torch.tensor([p.reference[0] for p in ours]),
               "ref_rejected_logps": torch.tensor([p.reference[1] for p in ours])}
    model.zero_grad()
    trl_loss = DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]

    assert abs(measured.loss.item() - trl_loss.item()) < 1e-5, (measured.loss.item(), trl_loss.item())
    assert 0.1 < trl_loss.item() < 5 and abs(trl_loss.item() - 0.6931) > 1e-3  # a real margin, not log 2
    assert measured.correct / measured.weight == pytest.approx(stand_in._metrics["train"]["rewards/accuracies"][0])
    for a, b in zip(our_grads, trl_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


# -- training -------------------------------------------------------------------------


def dpo_settings(models: Models, **changes):  # -> TrainSettings
    from lorag.adapters.train import TrainSettings

    values = {"model_path": str(models.base), "method": "dpo", "beta": 0.5, "rank": 4, "learning_rate": 5e-3,
              "dropout": 0.1, "epochs": 3, "batch_size": 3, "val_split": 0.25, "warmup_ratio": 0, "seed": 1}
    return TrainSettings.build(**{**values, **changes})


def margins(models: Models, adapter: Path | None, pairs) -> list[float]:
    """log p(chosen) - log p(rejected) of each pair, under the base model (+ adapter)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorag.adapters.dpo import pair_logps

    model = AutoModelForCausalLM.from_pretrained(str(models.base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        chosen, rejected = pair_logps(model.eval(), pairs, 0, "cpu", head_positions=True)
    return (chosen - rejected).tolist()


def test_dpo_raises_the_preferred_margin_and_resumes_on_the_saved_reference(
    models: Models, tmp_path: Path, one_thread: None
) -> None:
    from safetensors.torch import load_file

    from lorag.adapters.checkpoints import checkpoint_dirs
    from lorag.adapters.dpo import REFERENCE_FILE
    from lorag.adapters.train import TrainingStopped, train

    data = write_preferences(tmp_path / "pairs.jsonl")
    held = write_preferences(tmp_path / "held.jsonl")  # validation: how well the training pairs are ranked
    settings = dpo_settings(models, val_split=0)
    events = []
    whole = train(settings, data, tmp_path / "whole", progress=events.append, val_data=held)
    assert whole.steps == whole.total_steps == 9  # 8 pairs, batches of 3, 3 epochs
    assert whole.initial_val_loss == pytest.approx(0.693147, abs=1e-4)  # the reference itself: log 2
    assert whole.val_loss is not None and whole.val_loss < whole.initial_val_loss - 0.3
    assert whole.val_accuracy == 1.0 and whole.val_lines == []
    steps = [e for e in events if e.kind == "step"]
    assert all(e.accuracy is not None and 0 <= e.accuracy <= 1 for e in steps) and steps[-1].accuracy == 1.0
    assert [e.tokens for e in steps] == sorted(e.tokens for e in steps) and steps[-1].tokens == whole.total_tokens
    pairs = load_pairs(data, tokenizer_of(models), 256)
    before, after = margins(models, None, pairs), margins(models, whole.adapter_dir, pairs)
    assert all(a > b + 0.5 for a, b in zip(after, before, strict=True)), (before, after)
    history = json.loads((tmp_path / "whole" / "result.json").read_text())["history"]
    assert all(0 <= h["val_accuracy"] <= 1 for h in history) and history[-1]["train_accuracy"] == 1.0

    # Stopped after step 2 (mid-epoch: checkpointed then), then resumed: the reference file is read, not rewritten.
    split = tmp_path / "split"
    seen = []
    with pytest.raises(TrainingStopped) as stopped:
        train(settings, data, split, val_data=held, progress=seen.append,
              should_stop=lambda: max(e.step for e in seen) >= 2)
    assert stopped.value.step == 2 and [s for s, _ in checkpoint_dirs(split)] == [2]
    assert [(e.step, e.path) for e in seen if e.kind == "checkpoint"] == [(2, checkpoint_dirs(split)[0][1])]
    reference = split / REFERENCE_FILE
    written = reference.stat()
    resumed = train(settings, data, split, val_data=held)
    assert resumed.resumed_from_step == 2 and resumed.steps == 9
    assert (reference.stat().st_ino, reference.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max().item() < 1e-6 for k in a)
    assert resumed.val_loss == pytest.approx(whole.val_loss, abs=1e-5)
    assert resumed.total_tokens == whole.total_tokens and resumed.tokens < whole.tokens


def test_cli_trains_dpo_from_an_init_adapter_whose_model_is_the_reference(models: Models, tmp_path: Path) -> None:
    """--method dpo --beta --init-adapter --val-data: the run starts from the adapter, which is also the reference."""
    import torch

    from lorag.adapters.dpo import REFERENCE_FILE
    from tests.test_training import lorag

    data = write_preferences(tmp_path / "pairs.jsonl")
    held = write_preferences(tmp_path / "held.jsonl", PREFERENCES[:2])
    run = tmp_path / "run"
    done = lorag("adapters", "--offline", "--state-dir", str(tmp_path / "state"), "--model", str(models.base),
                 "train", "prefers", str(data), "--method", "dpo", "--beta", "0.5", "--init-adapter",
                 str(models.adapters["alpha"]), "--val-data", str(held), "--epochs", "1", "--batch-size", "4",
                 "--output", str(run), "--no-register", timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained prefers: 2 steps" in done.stdout and "val accuracy" in done.stdout
    config = json.loads((run / "train_config.json").read_text())
    assert (config["method"], config["beta"], config["init_adapter"]) == ("dpo", 0.5, str(models.adapters["alpha"]))
    assert "val_data_sha256" in config
    result = json.loads((run / "result.json").read_text())
    assert result["method"] == "dpo" and result["val_lines"] == []
    assert result["initial_val_loss"] == pytest.approx(0.693147, abs=1e-4)  # starts at the reference
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 8  # alpha's rank
    saved = torch.load(run / REFERENCE_FILE, weights_only=True)
    pairs = load_pairs(held, tokenizer_of(models), 256)
    chosen_minus_rejected = (saved["logps"]["val"][:, 0] - saved["logps"]["val"][:, 1]).tolist()
    assert chosen_minus_rejected == pytest.approx(margins(models, models.adapters["alpha"], pairs), abs=1e-4)
    assert chosen_minus_rejected != pytest.approx(margins(models, None, pairs), abs=1e-2)  # not the base's
