"""The engine on tiny random models: an exact context cache, batched steps, the ar baseline."""

from __future__ import annotations

import torch

from dlm_ls.model import layout
from dlm_ls.model import tokens as T
from dlm_ls.model.cache import ContextCacheStore
from dlm_ls.model.config import ModelConfig, SamplerConfig
from dlm_ls.model.engine import Engine
from dlm_ls.model.network import DiffusionLM


def tiny_model(seed: int = 0) -> DiffusionLM:
    torch.manual_seed(seed)
    return DiffusionLM(ModelConfig.preset("tiny")).init_weights(seed).eval()


def random_context(n_prefix: int = 40, n_suffix: int = 25, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(T.NUM_SPECIAL, 512, (n_prefix + n_suffix,), generator=g)).tolist()
    return layout.single_hole_context(ids[:n_prefix], ids[n_prefix:])


@torch.inference_mode()
def test_cached_and_uncached_canvas_logits_agree():
    model = tiny_model()
    engine = Engine(model)
    ctx = random_context()
    canvas = [T.MASK_ID, 77, T.MASK_ID, T.MASK_ID, 91, T.MASK_ID]
    L, C = len(ctx), len(canvas)

    # Uncached: the whole sequence in one pass with the training mask.
    seq = torch.tensor([ctx + canvas])
    is_canvas = torch.tensor([[False] * L + [True] * C])
    full, _ = model(seq, torch.arange(L + C)[None], layout.packed_mask(torch.zeros_like(seq), is_canvas))

    # Cached: prefill the context, then one canvas step over the cache.
    entry, computed = engine.prefill("doc", ctx)
    assert computed == L
    mask = layout.step_mask(torch.ones(1, L, dtype=torch.bool), torch.tensor([0]), torch.tensor([C]), C)
    past = [[seg] for seg in entry.segments()]
    cached, _ = model(torch.tensor([canvas]), torch.arange(L, L + C)[None], mask, past)
    torch.testing.assert_close(cached[0], full[0, L:], atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_extending_the_context_equals_recomputing_it():
    model = tiny_model()
    ctx = random_context(120, 30)
    grown, fresh = Engine(model), Engine(model)
    for n in (17, 60, 61, len(ctx)):  # typing appends to the context
        _, computed = grown.prefill("doc", ctx[:n])
    assert computed == len(ctx) - 61
    a, _ = grown.prefill("doc", ctx)
    b, _ = fresh.prefill("doc", ctx)
    for (ka, va), (kb, vb) in zip(a.segments(), b.segments()):
        torch.testing.assert_close(ka, kb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(va, vb, atol=1e-5, rtol=1e-5)
    assert grown.cache.stats.reused_tokens == 17 + 60 + 61 + len(ctx)


@torch.inference_mode()
def test_a_diverging_context_reuses_only_the_common_prefix():
    engine = Engine(tiny_model())
    ctx = random_context()
    engine.prefill("doc", ctx)
    edited = ctx[:30] + [300, 301] + ctx[30:]
    entry, computed = engine.prefill("doc", edited)
    assert computed == len(edited) - 30
    assert entry.tokens == edited


def test_a_pinned_entry_is_not_truncated_under_a_running_job():
    engine = Engine(tiny_model())
    ctx = random_context()
    job = engine.start(ctx, SamplerConfig(canvas_lengths=(4,), max_tokens=4), cache_key="doc")
    engine.prefill("doc", ctx[:10] + [400] * 5)  # another request for the same document diverges
    assert job.entry.tokens == ctx  # the running job still sees its own context
    engine.run(job)
    assert job.done and job.entry.pins == 0


def test_lru_eviction_under_a_byte_budget_spares_pinned_entries():
    model = tiny_model()
    engine = Engine(model, cache_budget_bytes=1)  # everything over budget
    pinned = engine.start(random_context(seed=2), SamplerConfig(max_tokens=4), cache_key="a")
    engine.prefill("b", random_context(seed=3))
    assert "a" in engine.cache.entries and "b" not in engine.cache.entries
    assert engine.cache.stats.evictions >= 1
    engine.run(pinned)
    engine.cache.evict()
    assert not engine.cache.entries


def test_ar_strategy_makes_one_forward_pass_per_token():
    engine = Engine(tiny_model(3))
    ctx = random_context(seed=4)
    calls = []
    engine.model.register_forward_hook(lambda *a: calls.append(1))
    job = engine.start(ctx, SamplerConfig(strategy="ar", max_tokens=9), cache_key=None)
    calls.clear()  # the context prefill is not a refinement pass
    r = engine.run(job)
    ended_by_pad = len(r.middles[0]) < 9
    assert r.nfe == len(calls) == len(r.middles[0]) + (1 if ended_by_pad else 0)
    assert r.canvas_length == 1


def test_parallel_strategy_batches_all_candidate_lengths_in_one_pass():
    engine = Engine(tiny_model())
    calls = []
    engine.model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    job = engine.start(random_context(), SamplerConfig(canvas_lengths=(4, 8, 12), max_tokens=12, max_steps=4))
    calls.clear()
    engine.step([job])
    assert calls == [3]  # one forward pass, three rows
    r = engine.run(job)
    assert r.nfe <= 4 * 3 and r.canvas_length in (4, 8, 12)
    assert len(r.middles[0]) <= 12


def test_requests_for_different_documents_share_one_forward_pass():
    engine = Engine(tiny_model())
    a = engine.start(random_context(seed=5), SamplerConfig(canvas_lengths=(8,), max_tokens=8), cache_key="a")
    b = engine.start(random_context(30, 5, seed=6), SamplerConfig(canvas_lengths=(8,), max_tokens=8), cache_key="b")
    solo_a = engine.run(engine.start(random_context(seed=5), SamplerConfig(canvas_lengths=(8,), max_tokens=8)))
    calls = []
    engine.model.register_forward_hook(lambda *args: calls.append(1))
    while not (a.done and b.done):
        engine.step([a, b])
    assert len(calls) == max(a.nfe, b.nfe)
    assert a.result().middles == solo_a.middles  # batching with another context changes nothing


def test_two_holes_are_refined_together():
    engine = Engine(tiny_model())
    segs = [list(range(20, 30)), list(range(40, 50)), list(range(60, 70))]
    job = engine.start(layout.multi_hole_context(segs), SamplerConfig(max_steps=3), hole_lengths=[5, 6])
    r = engine.run(job)
    assert len(r.middles) == 2 and len(r.middles[0]) <= 5 and len(r.middles[1]) <= 6
    assert r.nfe <= 3


def test_context_over_the_limit_is_a_clear_error():
    engine = Engine(tiny_model(), max_context_tokens=50)
    try:
        engine.start(random_context(60, 20), SamplerConfig())
    except ValueError as exc:
        assert "exceeds the limit" in str(exc)
    else:
        raise AssertionError("expected an error")


def test_store_counts_hits_and_misses():
    store = ContextCacheStore()
    store.claim("a", [1, 2, 3])
    entry, reuse = store.claim("a", [1, 2, 3, 4])
    assert reuse == 0  # nothing was appended to the entry yet
    assert store.summary()["misses"] == 2
