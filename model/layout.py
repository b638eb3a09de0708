"""The infill sequence layout and its attention masks, shared by training and inference.

Training and the engine both build sequences here, so the model is trained exactly as it is
used (DESIGN.md, "The model"). See `model/tokens.py` for the picture. Token ids in, token ids
and boolean masks out; nothing here knows about text or about the network.

Attention rule, for query i and key j of the same example:
    j is context (or a committed block, which joins the context) and j <= i   -> attend
    i and j both belong to the canvas                                        -> attend
    anything else                                                            -> not
So the context is causal, and its cache is exact: no canvas token can change a context key.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import tokens as T


def single_hole_context(prefix: list[int], suffix: list[int]) -> list[int]:
    """<|suf|> suffix <|pre|> prefix <|mid|>: typing at the cursor only appends to it."""
    return [T.SUF_ID, *suffix, T.PRE_ID, *prefix, T.MID_ID]


def multi_hole_context(segments: list[list[int]]) -> list[int]:
    """segments s_0 .. s_k around k holes; k = 1 gives `single_hole_context(s_0, s_1)`."""
    k = len(segments) - 1
    if k < 1:
        raise ValueError("need at least one hole (two segments)")
    if k > T.MAX_HOLES:
        raise ValueError(f"at most {T.MAX_HOLES} holes are supported, got {k}")
    ids = [T.SUF_ID, *segments[k], T.PRE_ID, *segments[0]]
    for i in range(1, k):
        ids += [T.HOLE_IDS[i - 1], *segments[i]]
    return ids + [T.MID_ID]


def canvas_region(lengths: list[int]) -> tuple[list[int], list[int]]:
    """Masked canvases for k holes, in layout order: hole k-1 (behind <|mid|>), then <|hole_i|> canvas_i.

    Returns the region's tokens and, for each hole in document order, the index of its first slot.
    """
    k = len(lengths)
    region: list[int] = [T.MASK_ID] * lengths[k - 1]
    starts = [0] * k
    for i in range(k - 1):
        region.append(T.HOLE_IDS[i])
        starts[i] = len(region)
        region += [T.MASK_ID] * lengths[i]
    return region, starts


def packed_mask(example: Tensor, is_canvas: Tensor) -> Tensor:
    """(B, T) example ids and canvas flags -> (B, 1, T, T) bool mask for training on packed rows."""
    B, L = example.shape
    same = example[:, :, None] == example[:, None, :]  # (B, T, T)
    causal = torch.ones(L, L, dtype=torch.bool, device=example.device).tril()
    ctx_key = ~is_canvas[:, None, :] & causal  # j is context and j <= i
    both_canvas = is_canvas[:, :, None] & is_canvas[:, None, :]
    return (same & (ctx_key | both_canvas)).unsqueeze(1)


def step_mask(past_valid: Tensor, n_new_context: Tensor, n_canvas: Tensor, width: int) -> Tensor:
    """Mask for one refinement step over [past keys][new context tokens][canvas slots].

    past_valid: (B, S) bool, which cached keys a row may see (its context and committed blocks);
    n_new_context: (B,) how many of the `width` new tokens are context (committed, causal);
    n_canvas: (B,) how many of the rest are canvas slots (the remainder is padding).
    The new tokens are laid out per row as [context ... | canvas ... | padding ...].
    Returns (B, 1, width, S + width). Padding queries attend to their own key only, so no row is empty.
    """
    B, S = past_valid.shape
    idx = torch.arange(width, device=past_valid.device)
    is_ctx = idx[None, :] < n_new_context[:, None]  # (B, W)
    is_canvas = (idx[None, :] >= n_new_context[:, None]) & (idx[None, :] < (n_new_context + n_canvas)[:, None])
    is_pad = ~(is_ctx | is_canvas)
    causal = idx[None, :, None] >= idx[None, None, :]  # (1, W, W)
    new_part = (is_ctx[:, None, :] & causal) | (is_canvas[:, :, None] & is_canvas[:, None, :])
    new_part |= is_pad[:, :, None] & torch.eye(width, dtype=torch.bool, device=past_valid.device)
    past_part = past_valid[:, None, :].expand(B, width, S) & ~is_pad[:, :, None]
    return torch.cat([past_part, new_part], dim=2).unsqueeze(1)
