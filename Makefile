# vitdiff: `make demo` sets everything up and runs the quick-start notebook; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROFILE ?= cpu
FMNIST_DEB_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test test-fast notebooks bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
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

demo: data
	mkdir -p outputs
	$(BIN)/papermill notebooks/01_quickstart.ipynb outputs/01_quickstart.ipynb -p profile $(PROFILE) -p out_dir outputs/01_quickstart
	@echo "figures: outputs/01_quickstart/"

# The whole suite: unit tests, then every notebook through nbval in the smoke profile.
test: setup
	$(BIN)/python -m pytest -q tests
	VITDIFF_PROFILE=smoke VITDIFF_OUT_DIR=$(CURDIR)/outputs/nbval MPLBACKEND=Agg \
	  $(BIN)/python -m pytest -q --nbval-lax notebooks

test-fast: setup
	$(BIN)/python -m pytest -q -x tests

# Re-run every notebook in place with PROFILE (cpu by default) so the committed outputs are real.
notebooks: setup
	for nb in notebooks/0*.ipynb; do \
	  $(BIN)/papermill $$nb $$nb -p profile $(PROFILE) || exit 1; done

bench: setup
	$(BIN)/python benchmarks/bench_backbones.py
	$(BIN)/python benchmarks/bench_trainer.py
	$(BIN)/python benchmarks/sampler_orders.py

clean:
	rm -rf outputs .pytest_cache
