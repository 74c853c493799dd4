# SynerGen-Lightning: every target depends on the virtualenv, so a fresh clone needs no manual step.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
SYN     := .venv/bin/synergen
VENV    := .venv/.installed
DATA    := data/tiny
DEVICES ?= 1

.PHONY: install data test test-fast tensorboard clean help

help:  ## list targets
	@grep -E '^[a-z0-9_-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

install: $(VENV)  ## create .venv and install the toolkit (editable, with the dev extra)

$(VENV): pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch 2.14.1 first, so the resolver keeps it (the registry build with CUDA libs runs on CPU too)
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[dev]"
	touch $@

data: $(DATA)/.done  ## write the tiny synthetic shape world (shards, eval prompts, text corpus)

$(DATA)/.done: $(VENV)
	$(SYN) data synth --out $(DATA) --overwrite
	touch $@

test: $(VENV)  ## run the test suite (slow end-to-end tests included)
	$(PY) -m pytest -q

test-fast: $(VENV)  ## run the fast subset
	$(PY) -m pytest -q -m "not slow"

tensorboard: $(VENV)  ## open TensorBoard on runs/
	.venv/bin/tensorboard --logdir runs

clean:  ## remove generated data and runs (keeps .venv)
	rm -rf data runs
