# The two commands a newcomer types: `make demo` and `make test`. Each does its own set-up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-v1

.PHONY: setup test demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml tools/install_detectron2.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python tools/install_detectron2.py
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/python -m transfer.demo --out demo_output

lint: $(STAMP)
	$(BIN)/ruff check pretrain convert transfer tests tools benchmarks

clean:
	rm -rf $(VENV) demo_output
