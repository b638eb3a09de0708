"""Infiller.score_middle: the `ar` likelihood of a given middle, checked against one pass per token."""

from __future__ import annotations

import math

import pytest
import torch

from dlm_ls.model import layout
from dlm_ls.model import tokens as T
from dlm_ls.model.infill import InfillError, Infiller


@pytest.fixture(scope="module")
def infiller(tiny_model_dir):
    return Infiller(tiny_model_dir, device="cpu")


@torch.inference_mode()
def _one_pass_per_token(inf: Infiller, segments: list[str], middle: str) -> float:
    context = inf.context_for(segments)
    target = inf.encode(middle) + [T.PAD_ID]
    total = 0.0
    for i, want in enumerate(target):  # what the ar strategy runs: one one-slot canvas after i committed tokens
        seq = context + target[:i] + [T.MASK_ID]
        is_canvas = torch.tensor([[False] * (len(seq) - 1) + [True]])
        ids = torch.tensor([seq])
        logits, _ = inf.model(ids, torch.arange(len(seq))[None], layout.packed_mask(torch.zeros_like(ids), is_canvas))
        row = logits[0, -1].float()
        row[inf.engine.banned_ids] = float("-inf")
        total -= float(torch.log_softmax(row, -1)[want])
    return total


@pytest.mark.parametrize("middle", ["return a + b", "x", "", "print('émoji 😀')"])
def test_one_pass_score_equals_token_by_token_passes(infiller, middle):
    segments = ["def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"]
    got = infiller.score_middle(segments, middle)
    assert got["tokens"] == len(infiller.encode(middle)) + 1
    assert math.isclose(got["nll"], _one_pass_per_token(infiller, segments, middle), rel_tol=1e-4, abs_tol=1e-4)
    assert len(got["token_nll"]) == got["tokens"] and all(x >= 0 for x in got["token_nll"])


def test_scoring_takes_one_hole(infiller):
    with pytest.raises(InfillError, match="one hole"):
        infiller.score_middle(["a", "b", "c"], "x")


@pytest.mark.parametrize("middle", ["return a + b", "x", "print('émoji 😀')"])
def test_context_head_score_equals_next_token_passes_over_a_growing_context(infiller, middle):
    segments = ["def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"]
    context, target = infiller.context_for(segments), infiller.encode(middle)
    want = 0.0
    with torch.inference_mode():
        for i, tok in enumerate(target):  # the context's own head: its last position predicts the next token
            ids = torch.tensor([context + target[:i]])
            is_canvas = torch.zeros_like(ids, dtype=torch.bool)
            logits, _ = infiller.model(ids, torch.arange(ids.shape[1])[None], layout.packed_mask(torch.zeros_like(ids), is_canvas))
            row = logits[0, -1].float()
            row[: T.NUM_SPECIAL] = float("-inf")  # that head is never asked for a layout token
            want -= float(torch.log_softmax(row, -1)[tok])
    got = infiller.score_middle_by_context_head(segments, middle)
    assert got["tokens"] == len(target) and math.isclose(got["nll"], want, rel_tol=1e-4, abs_tol=1e-4)
    assert infiller.score_middle_by_context_head(segments, "")["tokens"] == 0
