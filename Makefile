# Two commands do everything on a fresh machine:
#   make demo   set up, then run the language server on a sample file with the shipped model
#   make test   set up, then run every test
# Each creates the virtual environment it needs (.venv) and installs what is missing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dlm-ls-installed
# torch is installed first and pinned, so that resolving the project's own `torch>=2.11` finds it
# present and never pulls a multi-GB CUDA build onto a CPU machine. For a GPU build, pass e.g.
#   make TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128" test
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: demo test venv bench bench-startup clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test,train]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m dlm_ls.lsp_server.demo

test: $(STAMP)
	$(PY) -m pytest -q

# Every benchmark (quality, ratio, step, latency) on the CPU, or the GPU when present; then the
# README's results table is regenerated from the JSON they write (never typed by hand).
bench: $(STAMP)
	$(PY) -m dlm_ls.model.bench.cli all
	$(PY) -m dlm_ls.model.bench.report --write

bench-startup: $(STAMP)
	$(PY) -m dlm_ls.lsp_server.bench_startup

clean:
	rm -rf $(VENV) .pytest_cache .bench
