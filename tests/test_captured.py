"""The captured step's padding: the bucketed fixed-shape step gives the plain step's logits and results.

The CUDA graph itself needs a GPU (the last test); everything else runs the same padded step eagerly.
"""

from __future__ import annotations

import pytest
import torch

from dlm_ls.model import layout
from dlm_ls.model import tokens as T
from dlm_ls.model.captured import PAST_BUCKET, CapturedStep
from dlm_ls.model.config import ModelConfig, SamplerConfig
from dlm_ls.model.engine import Engine
from dlm_ls.model.network import DiffusionLM


def tiny_model(seed: int = 0) -> DiffusionLM:
    return DiffusionLM(ModelConfig.preset("tiny")).init_weights(seed).eval()


def context(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(T.NUM_SPECIAL, 512, (n,), generator=g).tolist()
    return layout.single_hole_context(ids[: n // 2], ids[n // 2:])


def test_buckets():
    k = torch.zeros(1, 2, 300, 16)
    assert CapturedStep.bucket(3, 20, [(k, k)]) == (4, 32, ((True, 512),))
    assert CapturedStep.bucket(1, 1, [(k, k)]) == (1, 8, ((False, 512),))
    ext = torch.zeros(5, 2, 7, 16)
    assert CapturedStep.bucket(5, 40, [(k, k), (ext, ext)]) == (8, 64, ((True, 512), (False, PAST_BUCKET)))


@pytest.mark.parametrize("strategy,lengths", [("parallel", (8, 16)), ("ar", (8,))])
def test_padded_steps_give_the_plain_steps_results(strategy, lengths):
    model = tiny_model()
    opts = SamplerConfig(strategy=strategy, canvas_lengths=lengths, max_tokens=20, block_size=8, threshold=0.2)
    plain, padded = Engine(model), Engine(model, captured_step=True)
    ctx = context(90, 1)
    jobs = [e.start(ctx, opts, "doc") for e in (plain, padded)]
    step = 0
    while not all(j.done for j in jobs):
        for e, j in zip((plain, padded), jobs):
            e.step([j])
        step += 1
        assert [r.region for r in jobs[0].rows] == [r.region for r in jobs[1].rows], f"step {step}"
    assert jobs[0].result().candidates == jobs[1].result().candidates and jobs[0].nfe == jobs[1].nfe
    stats = padded.captured.stats()
    assert stats["eager"] == jobs[1].nfe and stats["captures"] == 0  # CPU: the padded step runs eagerly


@torch.inference_mode()
def test_padded_logits_and_new_keys_match_for_two_contexts_in_one_batch():
    model = tiny_model(3)
    plain, padded = Engine(model), Engine(model, captured_step=True)
    opts = SamplerConfig(canvas_lengths=(8, 16), max_tokens=16, threshold=1.0)
    calls = []
    real_forward = model.forward

    def spy(*args, **kw):
        out = real_forward(*args, **kw)
        calls.append((out[0].clone(), [(k.clone(), v.clone()) for k, v in out[1]]))
        return out

    for engine in (plain, padded):
        jobs = [engine.start(context(70, 5), opts, "a"), engine.start(context(130, 6), opts, "b")]
        model.forward = spy
        try:
            engine.step(jobs)
        finally:
            model.forward = real_forward
    (plain_logits, plain_kv), (pad_logits, pad_kv) = calls[-2], calls[-1]
    B, W = plain_logits.shape[:2]
    assert pad_logits.shape[0] >= B and pad_logits.shape[1] >= W  # the padded call ran at bucket shapes
    torch.testing.assert_close(pad_logits[:B, :W], plain_logits, atol=1e-5, rtol=1e-5)
    for (k, v), (pk, pv) in zip(plain_kv, pad_kv):
        torch.testing.assert_close(pk[:B, :, :W], k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pv[:B, :, :W], v, atol=1e-5, rtol=1e-5)


def test_capture_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        CapturedStep(tiny_model(), capture=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a GPU")
def test_captured_graph_replays_the_same_results_on_a_gpu():
    model = tiny_model().cuda()
    opts = SamplerConfig(canvas_lengths=(8, 16, 32), max_tokens=32, threshold=0.3)
    plain, captured = Engine(model), Engine(model, captured_step=True)
    ctx = context(90, 1)
    a, b = plain.run(plain.start(ctx, opts, "doc")), captured.run(captured.start(ctx, opts, "doc"))
    assert a.candidates == b.candidates
    assert captured.captured.stats()["captures"] >= 1 and captured.captured.stats()["replays"] >= 1
