"""Natural-order infilling for Dream-family and LLaDA checkpoints, with an approximate dual cache.

Those models were trained on `[prefix][mask x N][suffix]` with full bidirectional attention, so
every key and value depends on every token: once a slot is committed, no cached K/V is exact.
Fast-dLLM's "dual cache" (Wu et al., 2025, arXiv:2505.22618) observes that the prefix's and the
suffix's K/V barely move while one block of the canvas is refined, and caches them:

    at a block boundary   one full pass over [prefix][canvas][suffix]: its logits serve the
                          block's first step, and every layer's K/V over the whole sequence is kept;
    within the block      only the block's tokens are recomputed; they attend to the cached K/V of
                          everything else (prefix, the other canvas blocks, suffix) and to
                          their own fresh K/V.

`refresh_every=k` also refreshes every k steps inside a block; k = 1 never uses the cache and is
the exact (no-cache) algorithm. Blocks go left to right; within a block, each step commits
every masked slot whose confidence clears the threshold (at least one; all that remain at the
block's last step), the same rule as our own sampler; the mask token itself is never chosen.

Dream-family models predict token i from position i - 1 (`logits_shift`): a slot's logits come
from the position before it, so the recomputed window starts one token before the block (the
first position of the sequence predicts itself, as in Dream's own generation code).

Token ids in, token ids out, for one sequence; nothing here knows about text, LSP or batching.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..kernels.select_commit import select_commit
from .network import KV, DiffusionLM
from .sampler import choose_commits

Select = Callable[..., tuple[Tensor, Tensor, Tensor]]


def refine_natural_order(
    model: DiffusionLM,
    prefix_ids: list[int],
    suffix_ids: list[int],
    n_slots: int,
    block_size: int,
    threshold: float,
    max_steps: int,
    mask_id: int,
    logits_shift: bool,
    select: Select = select_commit,
    *,
    refresh_every: int = 0,  # 0: refresh at block boundaries only; k: also every k steps; 1: exact, no cache
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    pad_id: int | None = None,  # the checkpoint's pad: a chosen pad takes the pad guesses just before it
) -> tuple[list[int], int]:
    """Fill `n_slots` masked slots between prefix and suffix; returns (the slots' tokens, forward passes)."""
    if n_slots < 1 or block_size < 1 or max_steps < 1:
        raise ValueError("n_slots, block_size and max_steps must be at least 1")
    device = model.lm_head.weight.device
    P = len(prefix_ids)
    nfe = 0
    cache: list[KV] = []
    with torch.inference_mode():
        x = torch.tensor([[*prefix_ids, *[mask_id] * n_slots, *suffix_ids]], dtype=torch.long, device=device)  # (1, L)
        positions = torch.arange(x.shape[1], device=device)[None]  # (1, L)
        for b0 in range(0, n_slots, block_size):
            lo, hi = P + b0, P + min(b0 + block_size, n_slots)  # the block's sequence positions
            for step in range(max_steps):
                masked = x[0, lo:hi] == mask_id
                if not masked.any():
                    break
                if step == 0 or (refresh_every > 0 and step % refresh_every == 0):
                    logits, cache = full_pass(model, x, positions)
                    block_logits = slot_logits(logits[0], 0, lo, hi, logits_shift)
                else:
                    block_logits = block_pass(model, x, positions, cache, lo, hi, logits_shift)
                nfe += 1
                commit(x[0, lo:hi], masked, block_logits, select, threshold, last=step == max_steps - 1,
                       mask_id=mask_id, temperature=temperature, generator=generator, pad_id=pad_id)
    return x[0, P:P + n_slots].tolist(), nfe


def full_pass(model: DiffusionLM, x: Tensor, positions: Tensor) -> tuple[Tensor, list[KV]]:
    """Every position attends to every position: logits (1, L, V) and each layer's K/V (1, Hkv, L, D)."""
    logits, kv = model(x, positions, None)
    return logits, kv


def block_pass(model: DiffusionLM, x: Tensor, positions: Tensor, cache: list[KV], lo: int, hi: int,
               logits_shift: bool) -> Tensor:
    """Recompute [w0, hi) (the block, plus the token before it when logits are shifted) over the cached
    K/V of everything outside it; returns the block's slot logits (hi - lo, V)."""
    w0 = lo - 1 if logits_shift and lo > 0 else lo
    past = [[seg for seg in ((k[:, :, :w0], v[:, :, :w0]), (k[:, :, hi:], v[:, :, hi:])) if seg[0].shape[2] > 0]
            for k, v in cache]  # per layer: before the window, after it
    logits, _ = model(x[:, w0:hi], positions[:, w0:hi], None, past=past)
    return slot_logits(logits[0], w0, lo, hi, logits_shift)


def slot_logits(logits: Tensor, first: int, lo: int, hi: int, logits_shift: bool) -> Tensor:
    """logits (T', V) for sequence positions first.. -> the logits that predict slots lo..hi-1."""
    src = torch.arange(lo, hi, device=logits.device)
    if logits_shift:
        src = (src - 1).clamp(min=0)  # position i - 1 predicts token i; position 0 predicts itself
    return logits[src - first]


def commit(block: Tensor, masked: Tensor, logits: Tensor, select: Select, threshold: float, last: bool,
           mask_id: int, temperature: float = 0.0, generator: torch.Generator | None = None,
           pad_id: int | None = None) -> None:
    """Write into `block` (a view of the sequence) the masked slots the sampler's commit rule picks
    (sampler.choose_commits: those that clear the threshold, at least the most confident one, all of
    them on the block's last step, and with `pad_id` the pad guesses just before a chosen pad). A slot
    never becomes the mask token (as in the engine), so every committed slot stays committed."""
    idx = masked.nonzero().squeeze(1)
    slot = logits[idx]  # (n, V), a copy
    slot[:, mask_id] = float("-inf")
    token, conf, above = select(slot, threshold, temperature, generator)
    tokens = token.tolist()
    chosen = choose_commits([True] * len(tokens), above.tolist(), conf.float().tolist(), last,
                            tokens if pad_id is not None else None, pad_id if pad_id is not None else -1)
    take = idx[torch.tensor(chosen, dtype=torch.long, device=idx.device)]
    block[take] = token[torch.tensor(chosen, dtype=torch.long, device=token.device)]
