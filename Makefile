# Two commands on a fresh machine: `make demo` and `make test`.
# The virtual environment is built once (stamp file) from setup.cfg's ranges.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch from this machine's disk; on a GPU machine set
# TORCH_SPEC='torch==2.13.0' with your CUDA index (see README).
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo demo-on-policy lint format test test-fast test-slow bench bench-gpu clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python -m posttrain.demo

# reward model -> on-policy pairs -> DPO on the demo's models (runs `make demo` first if demo_runs/ has none).
demo-on-policy: install
	$(BIN)/python -m posttrain.demo.on_policy

# ruff, configured in pyproject.toml (line length 119, as TRL and the alignment-handbook).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install
	$(BIN)/python -m pytest tests

test-fast: install
	$(BIN)/python -m pytest tests -m "not slow"

test-slow: install
	$(BIN)/python -m pytest tests -m slow

# CPU benchmarks (figures printed and written to benchmarks/results/*.json).
# The full-size conversion needs ~11 GB of free disk and ~12 GB RAM; gpu.py (make bench-gpu) a CUDA GPU.
bench: install
	$(BIN)/python benchmarks/convert_full_size.py
	$(BIN)/python benchmarks/sft_packing.py
	$(BIN)/python benchmarks/sft_recipe_stats.py
	$(BIN)/python benchmarks/dpo_padding.py
	$(BIN)/python benchmarks/prepare_sft_throughput.py

bench-gpu: install
	$(BIN)/python benchmarks/gpu.py

clean:
	rm -rf $(VENV) demo_runs bench_results
