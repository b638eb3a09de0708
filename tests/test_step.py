"""The training step's variants (model/train/step.py) compute the plain path's loss, and runs resume across them."""

from __future__ import annotations

import json
import random

import pytest
import torch

from dlm_ls.kernels.linear_cross_entropy import linear_cross_entropy_fused, linear_cross_entropy_reference
from dlm_ls.model.config import ModelConfig
from dlm_ls.model.network import DiffusionLM
from dlm_ls.model.train import examples as E
from dlm_ls.model.train import loop
from dlm_ls.model.train.step import StepVariant, TrainStep, compute_losses, resolve_variant

from test_train import CFG, _losses, _one_thread, _run_cfg, _sources, corpus_dir, tokenizer  # noqa: F401 (fixtures)

# Tolerance per dtype: fp32 variants differ from the plain path only in summation order; bf16
# weights round every matrix product's inputs to 8 bits of mantissa.
TOL = {"fp32": dict(rtol=1e-5, atol=1e-6), "bf16": dict(rtol=3e-2, atol=3e-2)}


def _model():
    return DiffusionLM(ModelConfig.preset("tiny")).init_weights(0)


def _batch(tokenizer, seed=1):
    return E.build_batch(_sources(), tokenizer, random.Random(seed), CFG)


@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
def test_fused_cross_entropy_matches_the_reference_on_odd_shapes(rows):
    g = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, 48, generator=g, requires_grad=True)
    w = (torch.randn(333, 48, generator=g) * 0.1).requires_grad_(True)
    targets = torch.randint(0, 333, (rows,), generator=g)
    coef = torch.rand(rows, generator=g)
    ref_loss, ref_ce = linear_cross_entropy_reference(h, w, targets, coef)
    ref_grads = torch.autograd.grad(ref_loss * 1.7, (h, w))
    loss, ce = linear_cross_entropy_fused(h, w, targets, coef, rows_per_chunk=5)
    grads = torch.autograd.grad(loss * 1.7, (h, w))  # the incoming gradient scales the stored ones
    torch.testing.assert_close(loss, ref_loss, **TOL["fp32"])
    torch.testing.assert_close(ce, ref_ce, **TOL["fp32"])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rows", [7, 300])
def test_banned_classes_leave_the_softmax_of_the_rows_after_first_row(rows):
    g = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, 16, generator=g, requires_grad=True)
    w = (torch.randn(50, 16, generator=g) * 0.1).requires_grad_(True)
    targets = torch.randint(5, 50, (rows,), generator=g)  # never a banned class
    coef = torch.rand(rows, generator=g)
    banned = (rows // 3, 5)
    ref_loss, ref_ce = linear_cross_entropy_reference(h, w, targets, coef, banned)
    loss, ce = linear_cross_entropy_fused(h, w, targets, coef, banned, rows_per_chunk=4)
    torch.testing.assert_close(ce, ref_ce, **TOL["fp32"])
    plain_ce = linear_cross_entropy_reference(h, w, targets, coef)[1]
    torch.testing.assert_close(ce[: rows // 3], plain_ce[: rows // 3], **TOL["fp32"])
    assert (ce[rows // 3:] < plain_ce[rows // 3:]).all()  # less mass to share: a lower loss
    # only the unbanned rows push the banned classes' output rows
    tail = coef.clone()
    tail[: rows // 3] = 0
    loss_tail, _ = linear_cross_entropy_fused(h, w, targets, tail, banned, rows_per_chunk=4)
    (grad_w,) = torch.autograd.grad(loss_tail, (w,))
    assert torch.count_nonzero(grad_w[:5]) == 0 and torch.count_nonzero(grad_w[5:]) > 0


@pytest.mark.parametrize("cfg", [loop.TrainConfig(ctx_loss_weight=1.0, ctx_fraction=1.0),
                                 loop.TrainConfig(ctx_loss_weight=1.0, ctx_fraction=1.0, ctx_excludes_special=False),
                                 loop.TrainConfig(pad_weight=0.3), loop.TrainConfig(loss="elbo")],
                         ids=["full-context", "full-context-all-classes", "pad-weight", "elbo"])
def test_fused_head_gives_the_plain_loss_and_gradients_on_a_fixed_batch(tokenizer, cfg):
    b = _batch(tokenizer)
    out = {}
    for fused in (False, True):
        model = _model()
        losses = compute_losses(model, b, cfg, fused_head=fused)
        losses["loss"].backward()
        out[fused] = (losses, [p.grad.clone() for p in model.parameters()])
    (plain, g_plain), (fast, g_fast) = out[False], out[True]
    assert set(plain) == set(fast) >= {"loss", "canvas_loss", "elbo"}
    for k in plain:
        torch.testing.assert_close(fast[k].detach(), plain[k].detach(), **TOL["fp32"])
    for a, b_ in zip(g_fast, g_plain):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-6)


def test_bf16_master_weights_step_matches_the_fp32_step(tokenizer):
    b = _batch(tokenizer)
    cfg = loop.TrainConfig(lr=1e-3, warmup=1)
    steps = {w: TrainStep(_model(), cfg, StepVariant(weights=w, fused_head=True)) for w in ("fp32", "bf16")}
    first = {w: s(b, lr=1e-3)[0] for w, s in steps.items()}
    torch.testing.assert_close(first["bf16"]["loss"].detach().float(), first["fp32"]["loss"].detach(), **TOL["bf16"])
    # the update went to fp32 master copies; the network holds them rounded to bf16
    fp32 = dict(steps["fp32"].model.named_parameters())
    bf16 = steps["bf16"]
    for name, p in bf16.fp32_model().named_parameters():
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, fp32[name].detach(), rtol=0, atol=2e-3)
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    assert all(m.dtype == torch.float32 for m in bf16.params())
    # trains: a few steps on the fixed batch lower its loss in both variants
    for w, s in steps.items():
        for _ in range(6):
            last = float(s(b, lr=3e-3)[0]["loss"].detach())
        assert last < float(first[w]["loss"].detach()) - 0.1, w


def test_compiled_step_gives_the_eager_loss(tokenizer):
    b = _batch(tokenizer)
    cfg = loop.TrainConfig()
    eager = TrainStep(_model(), cfg, StepVariant(fused_head=True))
    compiled = TrainStep(_model(), cfg, StepVariant(compile=True, fused_head=True))
    for _ in range(2):
        a, _ = eager(b, lr=1e-3)
        c, _ = compiled(b, lr=1e-3)
        torch.testing.assert_close(c["loss"].detach(), a["loss"].detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("switch", [dict(fused_head="on", weights="fp32"), dict(fused_head="on", weights="bf16")],
                         ids=["to-fused-head", "to-bf16-weights"])
def test_resume_across_a_path_switch_gives_the_same_next_step_loss(tokenizer, corpus_dir, tmp_path, switch):  # noqa: F811
    plain = dict(fused_head="off", weights="fp32", compile="off")
    straight, split = tmp_path / "straight", tmp_path / "split"
    loop.train(_run_cfg(corpus_dir, straight, steps=4, **plain), tokenizer, progress=False)
    loop.train(_run_cfg(corpus_dir, split, steps=2, **plain), tokenizer, progress=False)
    loop.train(_run_cfg(corpus_dir, split, steps=4, resume=str(split), **{**plain, **switch}), tokenizer, progress=False)
    a, b = _losses(straight), _losses(split)
    tol = TOL[switch["weights"]]
    for s in (3, 4):
        assert b[s] == pytest.approx(a[s], rel=tol["rtol"], abs=tol["atol"])
    starts = [json.loads(r) for r in (split / "log.jsonl").read_text().splitlines() if '"event": "start"' in r]
    assert [s["step_variant"] for s in starts] == ["fp32 weights, eager", StepVariant(
        weights=switch["weights"], fused_head=True).name]


def test_auto_picks_the_measured_fastest_variant_for_the_device():
    cpu = resolve_variant("auto", "auto", "auto", torch.device("cpu"))
    assert cpu.fused_head and cpu.weights in ("fp32", "bf16")
    assert resolve_variant("fp32", "off", "off", torch.device("cpu")) == StepVariant()
    with pytest.raises(ValueError, match="weights must be"):
        resolve_variant("fp16", "auto", "auto", torch.device("cpu"))


def test_bench_train_writes_one_row_per_variant_and_thread_count(tokenizer, corpus_dir, tmp_path):  # noqa: F811
    from dlm_ls.bench import report
    from dlm_ls.bench import train as bench_train
    from dlm_ls.bench.common import BenchError

    args = ["--preset", "tiny", "--corpus", str(corpus_dir), "--tokenizer", str(corpus_dir / "tokenizer.json"),
            "--seq-len", "160", "--batch-sizes", "2", "--threads", "1", "--warmup", "1", "--steps", "1",
            "--variants", "fp32-eager,fp32-eager-fused,bf16-eager-fused", "--out-dir", str(tmp_path)]
    assert bench_train.main(args) == 0
    result = json.loads((tmp_path / "train-cpu.json").read_text())
    assert result["benchmark"] == "train" and result["command"].startswith("dlm-ls bench train ")
    ran = {r["variant"] for r in result["rows"]}
    skipped = {s["variant"] for s in result["skipped"]}
    assert ran | skipped == {"fp32-eager", "fp32-eager-fused", "bf16-eager-fused"} and not ran & skipped
    assert ("bf16-eager-fused" in ran) == result["bf16_matrix_units"]
    for r in result["rows"]:
        assert r["name"] and isinstance(r["tokens_per_s"], int) and r["tokens_per_s"] > 0 and r["threads"] == 1
    fp32 = [r["loss_after"] for r in result["rows"] if r["variant"].startswith("fp32")]
    assert fp32[0] == pytest.approx(fp32[1], rel=1e-4)  # same weights, same batches: the same arithmetic
    assert "**Training step**" in report.render(report.load_results(tmp_path))
    with pytest.raises(BenchError, match="unknown variant"):
        bench_train.main(args[:-4] + ["--variants", "fp16-eager", "--out-dir", str(tmp_path)])
