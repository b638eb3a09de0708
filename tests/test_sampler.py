"""The sampler driven by a model whose confidences are scripted step by step.

The scripted model stands in for the network only: the engine, the cache, the masks and the
commit rule are the real ones. Each forward call returns, for every canvas slot, a chosen token
and its probability from the script.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dlm_ls.model import layout
from dlm_ls.model import tokens as T
from dlm_ls.model.config import ModelConfig, SamplerConfig
from dlm_ls.model.engine import Engine
from dlm_ls.model.sampler import Row, choose_commits

V = 64
A, B, C, D = 20, 21, 22, 23  # ordinary text tokens


def peaked(token: int, prob: float) -> torch.Tensor:
    """Logits whose softmax gives `token` probability `prob`, the rest spread evenly."""
    rest = (1.0 - prob) / (V - 1)
    logits = torch.full((V,), math.log(rest))
    logits[token] = math.log(prob)
    return logits


class ScriptedModel(nn.Module):
    """script[call] = list per row of list per canvas slot of (token, prob)."""

    def __init__(self, script: list[list[list[tuple[int, float]]]]):
        super().__init__()
        self.config = ModelConfig(vocab_size=V, dim=8, n_layers=1, n_heads=1, n_kv_heads=1, ffn_dim=8)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.script, self.calls, self.inputs = script, 0, []

    def forward(self, tokens, positions, mask, past=None, logits_from=0):
        Bsz, W = tokens.shape
        kv = [(torch.zeros(Bsz, 1, W, 8), torch.zeros(Bsz, 1, W, 8))]
        if logits_from >= W:  # context prefill
            return None, kv
        self.inputs.append((tokens.clone(), positions.clone()))
        logits = torch.zeros(Bsz, W, V)
        past_len = mask.shape[-1] - W
        for b, slots in enumerate(self.script[self.calls]):
            # Real tokens (pending, then canvas) see the context; batch padding sees nothing before it.
            n_real = int(mask[b, 0, :, :past_len].any(-1).sum())
            start = n_real - len(slots)
            for j, (tok, p) in enumerate(slots):
                logits[b, start + j] = peaked(tok, p)
        self.calls += 1
        return logits, kv


def context() -> list[int]:
    return layout.single_hole_context([30, 31, 32], [40, 41])


def test_choose_commits_rule():
    assert choose_commits([True, True, False], [True, False, True], [0.95, 0.5, 0.99], False) == [0]
    assert choose_commits([True, True], [False, False], [0.2, 0.6], False) == [1]  # at least one
    assert choose_commits([True, False, True], [False, False, False], [0.1, 0.1, 0.1], True) == [0, 2]


def test_a_chosen_pad_takes_the_pad_guesses_just_before_it():
    P = T.PAD_ID
    tokens = [A, P, P, P, B, P]
    masked = [True, True, True, True, False, True]
    # Nothing clears the threshold; the most confident slot is the pad at 3.
    chosen = choose_commits(masked, [False] * 6, [0.5, 0.6, 0.7, 0.8, 0.0, 0.1], False, tokens)
    assert chosen == [1, 2, 3]
    assert choose_commits(masked, [False] * 6, [0.9, 0.6, 0.7, 0.8, 0.0, 0.1], False, tokens) == [0]


def test_threshold_commits_and_at_least_one_per_step():
    script = [
        [[(A, 0.95), (B, 0.5), (C, 0.97), (D, 0.3)]],
        [[(A, 0.1), (B, 0.6), (C, 0.1), (D, 0.7)]],  # none clears 0.9: the most confident (slot 3) only
        [[(A, 0.1), (B, 0.92), (C, 0.1), (D, 0.1)]],
    ]
    model = ScriptedModel(script)
    engine = Engine(model)
    job = engine.start(context(), SamplerConfig(canvas_lengths=(4,), max_tokens=4, threshold=0.9, max_steps=8))
    row = job.rows[0]
    engine.step([job])
    assert row.region == [A, T.MASK_ID, C, T.MASK_ID]
    engine.step([job])
    assert row.region == [A, T.MASK_ID, C, D]
    engine.step([job])
    assert job.done and job.result().middles == [[A, B, C, D]] and job.nfe == 3


def test_max_steps_commits_everything_left():
    script = [[[(A, 0.2), (B, 0.3), (C, 0.1)]], [[(A, 0.2), (B, 0.3), (C, 0.1)]]]
    engine = Engine(ScriptedModel(script))
    job = engine.start(context(), SamplerConfig(canvas_lengths=(3,), max_tokens=3, max_steps=2))
    r = engine.run(job)
    assert r.nfe == 2 and r.middles == [[A, B, C]]


def test_pad_ends_the_middle_and_pads_the_rest_at_once():
    script = [
        [[(A, 0.5), (T.PAD_ID, 0.99), (C, 0.4), (D, 0.4), (A, 0.4)]],
        [[(B, 0.95), (A, 0.1), (C, 0.1), (D, 0.1), (A, 0.1)]],
    ]
    engine = Engine(ScriptedModel(script))
    job = engine.start(context(), SamplerConfig(canvas_lengths=(5,), max_tokens=5, max_steps=8))
    engine.step([job])
    assert job.rows[0].region == [T.MASK_ID] + [T.PAD_ID] * 4
    engine.step([job])
    r = job.result()
    assert job.done and r.middles == [[B]] and r.nfe == 2


def test_blocks_join_the_context_as_pending_tokens():
    full = [(A, 0.99), (B, 0.99)]
    script = [[full], [full], [[(C, 0.99), (T.PAD_ID, 0.99)]]]
    model = ScriptedModel(script)
    engine = Engine(model)
    ctx = context()
    job = engine.start(ctx, SamplerConfig(canvas_lengths=(2,), block_size=2, max_tokens=10, max_steps=4))
    r = engine.run(job)
    assert r.middles == [[A, B, A, B, C]] and r.nfe == 3
    # Second pass: the first block is fed as 2 pending context tokens, then 2 fresh canvas slots.
    tokens, positions = model.inputs[1]
    assert tokens[0].tolist() == [A, B, T.MASK_ID, T.MASK_ID]
    L = len(ctx)
    assert positions[0].tolist() == [L, L + 1, L + 2, L + 3]
    tokens, positions = model.inputs[2]
    assert tokens[0].tolist() == [A, B, T.MASK_ID, T.MASK_ID] and positions[0, 0] == L + 2


def test_max_tokens_bounds_the_middle_without_a_pad():
    full = [(A, 0.99), (B, 0.99)]
    engine = Engine(ScriptedModel([[full]] * 10))
    job = engine.start(context(), SamplerConfig(canvas_lengths=(2,), block_size=2, max_tokens=5))
    r = engine.run(job)
    assert r.middles[0][:4] == [A, B, A, B] and len(r.middles[0]) == 5 and r.nfe == 3


def test_cancellation_between_steps():
    script = [[[(A, 0.99), (B, 0.1), (C, 0.1)]]] * 5
    engine = Engine(ScriptedModel(script))
    job = engine.start(context(), SamplerConfig(canvas_lengths=(3,), max_tokens=3, max_steps=5))
    seen = []
    r = engine.run(job, should_cancel=lambda: len(seen) >= 1, on_step=lambda j: seen.append(j.steps))
    assert job.cancelled and r.nfe == 1 and r.middles == [[A]]
    assert job.entry.pins == 0  # the cache entry is released
    engine.step([job])  # a cancelled job is never stepped again
    assert job.nfe == 1


def test_best_candidate_length_wins_by_mean_log_confidence():
    # Two rows (lengths 2 and 3) refined in one batch; the second is more confident.
    script = [[[(A, 0.95), (T.PAD_ID, 0.95)], [(A, 0.99), (B, 0.99), (T.PAD_ID, 0.99)]]]
    engine = Engine(ScriptedModel(script))
    job = engine.start(context(), SamplerConfig(canvas_lengths=(2, 3), max_tokens=3))
    r = engine.run(job)
    assert r.nfe == 1 and r.canvas_length == 3 and r.middles == [[A, B]]


def test_line_mode_stops_at_a_committed_newline():
    NL = 25
    script = [[[(A, 0.99), (NL, 0.99), (C, 0.1), (D, 0.1)]]]
    engine = Engine(ScriptedModel(script))
    job = engine.start(context(), SamplerConfig(canvas_lengths=(4,), max_tokens=4), stop_ids=frozenset({NL}))
    r = engine.run(job)
    assert r.nfe == 1 and r.middles == [[A, NL]]


def test_temperature_zero_is_deterministic_and_sampling_is_seeded():
    from test_engine import random_context, tiny_model

    engine = Engine(tiny_model())
    greedy = [engine.run(engine.start(random_context(), SamplerConfig(max_tokens=8))).middles for _ in range(2)]
    assert greedy[0] == greedy[1]
    hot = SamplerConfig(max_tokens=8, temperature=1.5, seed=7)
    sampled = [engine.run(engine.start(random_context(), hot)).middles for _ in range(2)]
    assert sampled[0] == sampled[1]
    other = engine.run(engine.start(random_context(), hot.replace(seed=8))).middles
    assert other != sampled[0] or other != greedy[0]


def test_row_multi_hole_pads_each_span_separately():
    region, starts = layout.canvas_region([2, 3])
    row = Row(region, list(zip(starts, [2, 3])), 32, 5, 4)
    # region layout: hole 1 (3 slots, behind <|mid|>) first, then <|hole_0|> and hole 0 (2 slots).
    assert region == [T.MASK_ID] * 3 + [T.HOLE_IDS[0]] + [T.MASK_ID] * 2
    tokens = [A, T.PAD_ID, C, 0, T.PAD_ID, B]
    row.commit(tokens, [0.99] * 6, [True] * 6)
    assert row.done and row.middles() == [[], [A]]


@pytest.mark.parametrize("bad", [dict(strategy="beam"), dict(threshold=1.5), dict(canvas_lengths=())])
def test_bad_sampler_options_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplerConfig().replace(**bad)


def test_min_tokens_forbids_an_empty_middle():
    script = [[[(T.PAD_ID, 0.99), (T.PAD_ID, 0.99)]]] * 3
    allowed = Engine(ScriptedModel(script))
    r = allowed.run(allowed.start(context(), SamplerConfig(canvas_lengths=(2,), max_tokens=2, min_tokens=0)))
    assert r.middles == [[]] and r.nfe == 1
    forced = Engine(ScriptedModel(script))
    r = forced.run(forced.start(context(), SamplerConfig(canvas_lengths=(2,), max_tokens=2, min_tokens=1)))
    assert len(r.middles[0]) == 1 and r.middles[0][0] != T.PAD_ID
