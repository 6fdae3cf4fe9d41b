# vitdiff: `make demo` sets everything up and runs the quick-start notebook; `make test` runs the test suite.
# Every target uses the virtual environment's own binaries, so nothing needs activating; for `vitdiff ...` in a
# shell afterwards: `source .venv/bin/activate` (or call .venv/bin/vitdiff).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROFILE ?= cpu
FMNIST_DEB_DIR := /usr/share/datasets/fashion-mnist
# PyPI's torch for Linux x86_64 is the CUDA build (5.3 GB installed with its nvidia-* and triton wheels). Without an
# NVIDIA driver, setup first asks PyTorch's CPU-only index (no CUDA libraries); if that index is unreachable it says
# so and PyPI's build is used (it runs on CPU too). Force either way: `make setup TORCH_INDEX=` (PyPI only) or
# `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi),,https://download.pytorch.org/whl/cpu)
TORCH_PINS := $(shell grep -E '^(torch|torchvision)==' requirements.txt)
ifneq ($(TORCH_INDEX),)
INSTALL_TORCH = $(BIN)/pip install --retries 1 --timeout 20 --index-url $(TORCH_INDEX) $(TORCH_PINS) \
  || echo "setup: $(TORCH_INDEX) is unreachable: installing PyPI's torch (the CUDA build; it runs on CPU too)"
endif
DEMO_OUT := outputs/01_quickstart/$(PROFILE)

.PHONY: setup data demo test test-fast notebooks figures campaign bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(INSTALL_TORCH)
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --no-deps -e .
	touch $@

# Fashion-MNIST: Debian's package where apt is available (no network download at run time),
# else torchvision's downloader into the vitdiff cache.
data: setup
	@if [ -d $(FMNIST_DEB_DIR) ]; then echo "fashion-mnist: $(FMNIST_DEB_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
	  sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; \
	else $(BIN)/python -c "from vitdiff.data import make_dataset as m; m('fashion-mnist', download=True); m('fashion-mnist', train=False, download=True)"; fi

# --log-output streams the notebook's printed output (the training progress among it) to this terminal.
# Each profile has its own folder, so `make demo PROFILE=smoke` and `make demo` never share a checkpoint.
demo: data
	mkdir -p $(DEMO_OUT)
	$(BIN)/papermill --log-output notebooks/01_quickstart.ipynb $(DEMO_OUT)/01_quickstart.ipynb \
	  -p profile $(PROFILE) -p out_dir $(DEMO_OUT)
	@echo "notebook and figures: $(DEMO_OUT)/"
	@echo "the command line: source $(VENV)/bin/activate, then vitdiff --help (see README.md)"

# The whole suite: unit tests, then every notebook through nbval in the smoke profile.
test: setup
	$(BIN)/python -m pytest -q tests
	VITDIFF_PROFILE=smoke VITDIFF_OUT_DIR=$(CURDIR)/outputs/nbval MPLBACKEND=Agg \
	  $(BIN)/python -m pytest -q --nbval-lax notebooks

test-fast: setup
	$(BIN)/python -m pytest -q -x tests

# Re-run every notebook in place so the committed outputs are real: each at its own default profile, the committed
# run (02-05 cpu-long, 07 cpu-64: read back, nothing trained), or every one at NOTEBOOK_PROFILE when it is set. The
# profile goes in through the environment: a `-p` would leave papermill's injected-parameters cell in the notebook.
notebooks: setup
	for nb in notebooks/0*.ipynb; do \
	  $(if $(NOTEBOOK_PROFILE),VITDIFF_PROFILE=$(NOTEBOOK_PROFILE)) $(BIN)/papermill --log-output $$nb $$nb || exit 1; \
	done

# The long campaign of notebooks 02-05 (NB="04 05" for some): trains only the missing runs, two one-thread runs at a
# time, files each row as it lands; kill it and run it again at any point. `make campaign ARGS=--status` says what
# is left; `make campaign ARGS=--judge` files the verdicts by budget from the filed rows.
NB ?= 02 03 04 05
CAMPAIGN_PROFILE ?= cpu-long
campaign: data
	OMP_NUM_THREADS=1 $(BIN)/python -m vitdiff.campaign $(NB) --profile $(CAMPAIGN_PROFILE) $(ARGS)

# Every notebook's figures (PDF and 300-dpi PNG) for every real profile, drawn from experiments/results/ alone.
figures: setup
	$(BIN)/python -m vitdiff.report --figures

bench: setup
	$(BIN)/python benchmarks/bench_backbones.py
	$(BIN)/python benchmarks/bench_trainer.py
	$(BIN)/python benchmarks/sampler_orders.py
	$(BIN)/python benchmarks/campaign_time.py
	$(BIN)/python benchmarks/text_step_cost.py

clean:
	rm -rf outputs .pytest_cache
