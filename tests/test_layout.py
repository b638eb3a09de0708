"""The infill layout and its masks: causal context, bidirectional canvas, nothing across examples."""

from __future__ import annotations

import torch

from dlm_ls.model import layout, prompt
from dlm_ls.model import tokens as T


def test_single_hole_is_the_one_hole_case_of_multi_hole():
    assert layout.multi_hole_context([[10, 11], [20]]) == layout.single_hole_context([10, 11], [20])
    assert layout.single_hole_context([10], [20, 21]) == [T.SUF_ID, 20, 21, T.PRE_ID, 10, T.MID_ID]


def test_multi_hole_sentinels():
    ctx = layout.multi_hole_context([[1], [2], [3], [4]])
    assert ctx == [T.SUF_ID, 4, T.PRE_ID, 1, T.HOLE_IDS[0], 2, T.HOLE_IDS[1], 3, T.MID_ID]
    region, starts = layout.canvas_region([2, 1, 3])
    assert region == [T.MASK_ID] * 3 + [T.HOLE_IDS[0], T.MASK_ID, T.MASK_ID, T.HOLE_IDS[1], T.MASK_ID]
    assert starts == [4, 7, 0]


def test_truncation_keeps_the_cursor_side():
    prefix, suffix = list(range(100)), list(range(100, 200))
    p, s = prompt.truncate_context(prefix, suffix, 83)
    assert len(p) + len(s) == 80 and p[-1] == 99 and s[0] == 100 and len(s) == 20


def test_packed_mask_rules():
    example = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    is_canvas = torch.tensor([[False, False, True, True, False, True, True]])
    m = layout.packed_mask(example, is_canvas)[0, 0]
    assert m[1, 0] and not m[0, 1]  # context is causal
    assert m[2, 3] and m[3, 2] and m[2, 1]  # canvas sees the whole canvas and the context
    assert not m[1, 2]  # context never sees the canvas
    assert not m[4, 3] and not m[5, 0]  # nothing across examples


def test_step_mask_rows_and_padding():
    past_valid = torch.tensor([[True, True, False], [True, True, True]])
    m = layout.step_mask(past_valid, torch.tensor([1, 0]), torch.tensor([2, 2]), 3)[:, 0]
    # row 0: [pending][canvas][canvas]
    assert m[0, 0].tolist() == [True, True, False, True, False, False]
    assert m[0, 1].tolist() == [True, True, False, True, True, True]
    # row 1: [canvas][canvas][padding]; padding sees only itself
    assert m[1, 0].tolist() == [True, True, True, True, True, False]
    assert m[1, 2].tolist() == [False, False, False, False, False, True]
