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

.PHONY: demo test test-vscode test-cluster bench-cluster screenshots fuzz venv bench bench-startup bench-recovery bench-train train clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test,train]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m dlm_ls.lsp_server.demo

# pytest's own script, not `python -m pytest`: -m puts the checkout's root on sys.path, where our
# top-level kernels/ folder shadows the `kernels` package that transformers imports.
PYTEST := $(VENV)/bin/pytest

test: $(STAMP)
	$(PYTEST) -q

# The VS Code extension inside a real VS Code (code-server in headless Chromium, tests/test_vscode_ui.py).
# The first run sets up code-server, Node 24 and Playwright under .cache/editors-ui (minutes; needs
# npm's registry, PyPI and /usr/bin/chromium); where one cannot be had it prints one line and skips.
test-vscode: $(STAMP)
	@if $(PY) tests/ui_env.py; then DLM_LS_VSCODE_UI=1 $(PYTEST) -q -p no:cacheprovider tests/test_vscode_ui.py; fi

# Scale-out on Ray Serve (tests/test_cluster.py): a local Ray cluster of two replicas of the tiny model.
# Installs the [cluster] extra (ray[serve]) into the venv first. Ends every Ray process it started.
CLUSTER_STAMP := $(VENV)/.dlm-ls-cluster-installed
$(CLUSTER_STAMP): $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test,train,cluster]"
	touch $(CLUSTER_STAMP)

test-cluster: $(CLUSTER_STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(PYTEST) -q -p no:cacheprovider -m cluster tests/test_cluster.py

# Requests/s and p50/p95 through 1 and 2 replicas, the batch scaling of one engine, and Ray Serve's
# overhead against the local socket: bench/results/cluster-cpu.json (docs/team.md's capacity plan).
bench-cluster: $(CLUSTER_STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m dlm_ls.bench.cluster

# docs/img/: VS Code and Neovim showing a suggestion of the shipped model, and its refinement
# steps, each from a real run (tests/screenshots.py; the same tools as test-vscode).
screenshots: $(STAMP)
	@if $(PY) tests/ui_env.py; then $(PY) tests/screenshots.py docs/img; fi

# The fuzz suites (LSP over stdio, the worker's msgpack socket) at ten times their `make test` size.
fuzz: $(STAMP)
	DLM_LS_FUZZ_EXAMPLES=60 $(PYTEST) -q tests/test_fuzz.py tests/test_fuzz_worker.py tests/test_protocol.py

# Every benchmark (quality, ratio, step, latency) on the CPU, or the GPU when present; then the
# README's results table is regenerated from the JSON they write (never typed by hand).
bench: $(STAMP)
	$(PY) -m dlm_ls.bench.cli all
	$(PY) -m dlm_ls.bench.report --write

# The training step in each variant (fp32, fused head, compiled, bf16 weights), threads 1 and 2:
# bench/results/train-cpu.json. Needs the corpus (`dlm-ls corpus --out data/corpus`).
bench-train: $(STAMP)
	$(VENV)/bin/dlm-ls bench train --threads 1,2 --batch-sizes 6,12 --steps 3

# The model campaign (docs/training.md): start or resume the default model's training in the
# background, so that it outlives the shell. Resumes $(RUN) exactly when it survived on this
# machine; otherwise starts a new stage from the shipped weights. Builds the corpus first if needed.
RUN ?= runs/campaign
TRAIN_MINUTES ?= 150
TRAIN_THREADS ?= 1
# lr 3e-4 with a short warmup: each new stage starts from trained weights (docs/training.md, 2026-12-07).
TRAIN_FLAGS ?= --preset small --batch-size 6 --seq-len 512 --lr 3e-4 --warmup 30 --eval-batches 6 \
	--ctx-loss-weight 1.0 --ctx-fraction 1.0 --checkpoint-minutes 10
train: $(STAMP)
	test -f data/corpus/train.jsonl || $(VENV)/bin/dlm-ls corpus --out data/corpus \
		--test-packages filelock,pluggy,pygments --validation-packages h11,pydantic,pytest
	test -f data/tokenizer.json || cp model/default/tokenizer.json data/tokenizer.json
	mkdir -p $(RUN)
	if test -f $(RUN)/latest/train_state.pt; then from="--resume $(RUN)"; else from="--init-from model/default"; fi; \
	setsid nohup $(VENV)/bin/dlm-ls train $(TRAIN_FLAGS) --out $(RUN) $$from \
		--max-minutes $(TRAIN_MINUTES) --threads $(TRAIN_THREADS) >> $(RUN)/stdout.log 2>&1 < /dev/null & \
	echo "training in the background: tail -f $(RUN)/log.jsonl"

# Server start to `initialize` answered, first and repeat starts: bench/results/startup-cpu.json.
bench-startup: $(STAMP)
	$(PY) -m dlm_ls.bench.startup

# kill -9 of the worker to the next completion, with and without the standby spare, and the
# worker's start: bench/results/recovery-cpu.json.
bench-recovery: $(STAMP)
	$(PY) -m dlm_ls.bench.recovery

clean:
	rm -rf $(VENV) .pytest_cache .bench
