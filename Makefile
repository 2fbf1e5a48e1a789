# The two commands a newcomer types: `make demo` and `make test`. Each does its own set-up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-v1

.PHONY: setup test demo lint clean gpu-assets gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml tools/install_detectron2.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python tools/install_detectron2.py
	touch $(STAMP)

# the suite runs on one worker per core, at most 4 (tests/conftest.py: one torch thread each);
# a test file's tests stay on one worker, so module fixtures are built once, and files start
# in the order tests/conftest.py gives them (the longest first), not by their number of tests
JOBS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadfile --no-loadscope-reorder tests

demo: $(STAMP)
	$(BIN)/python -m transfer.demo --out demo_output

# The prepared GPU check (benchmarks/gpu_check.py): gather its assets here, where the data and
# the package index are; on the GPU machine run `python benchmarks/gpu_check.py --assets
# gpu_assets --install` (or `make gpu-check` where the virtualenv is set up).
gpu-assets: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --prepare-assets gpu_assets

gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --assets gpu_assets --profile

lint: $(STAMP)
	$(BIN)/ruff check jobs pretrain convert transfer tests tools benchmarks

clean:
	rm -rf $(VENV) demo_output
