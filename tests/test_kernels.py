"""Each Triton kernel against its PyTorch reference, on awkward shapes, in fp32 and bf16.

On a machine without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1),
which numpy-executes one program at a time: shapes are kept small enough for the whole file
to finish in well under a minute, yet odd (37 slots, vocabularies of 1000 and 16387, a
context of 1003 keys) so that every masked edge of every tile is exercised. On a CUDA machine
the same tests run the compiled kernels on the GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and not HAS_CUDA:
    # tests/conftest.py sets this before any module imports the kernels; here for running this file alone.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dlm_ls.kernels import canvas_attention as ca  # noqa: E402
from dlm_ls.kernels import dispatch  # noqa: E402
from dlm_ls.kernels import select_commit as sc  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = [torch.float32, torch.bfloat16]
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: only the references can run")


def _interpreted(fn) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(fn, InterpretedFunction)


@pytest.fixture(autouse=True, scope="module")
def _interpreter_dot():
    """Triton 3.9's interpreter multiplies bf16's raw uint16 storage in tl.dot, and calls numpy's
    matmul, whose BLAS threads crawl beside a busy CPU (20 ms for a 128x32x128 tile). Compute
    it as the GPU does instead: exact products of the inputs, accumulated in fp32, here by a
    single-threaded einsum."""
    if not HAS_TRITON or HAS_CUDA:
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    def as_f32(h):
        if h.dtype.scalar == tl.bfloat16:
            return (h.data.astype(np.uint32) << 16).view(np.float32)
        return h.data.astype(np.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        out = np.einsum("...ik,...kj->...ij", as_f32(a), as_f32(b)) + d.data.astype(np.float32)
        return interpreter.TensorHandle(out.astype(d.data.dtype), d.dtype.scalar)

    original = interpreter.InterpreterBuilder.create_dot
    interpreter.InterpreterBuilder.create_dot = create_dot
    yield
    interpreter.InterpreterBuilder.create_dot = original


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


# ---------------------------------------------------------------------------------------------
# dispatch


def test_dispatch_picks_the_reference_without_a_gpu():
    if HAS_CUDA:
        pytest.skip("this machine has a GPU")
    if not os.environ.get(dispatch.ENV_VAR):
        assert dispatch.default_backend() == "reference"
        assert dispatch.BACKEND == "reference"
    x = torch.randn(3, 50)
    assert not dispatch.triton_path(x)
    torch.testing.assert_close(sc.select_commit(x, 0.5)[1], sc.select_commit_reference(x, 0.5)[1], rtol=0, atol=0)


def test_dispatch_override_by_env_and_by_use(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.default_backend() == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "nonsense")
    with pytest.warns(UserWarning):
        dispatch.default_backend()
    with pytest.raises(ValueError):
        dispatch.use("cuda-please")
    previous = dispatch.use("reference")
    try:
        assert dispatch.BACKEND == "reference" and not dispatch.triton_path(torch.zeros(1))
    finally:
        dispatch.use(previous)


@needs_triton
def test_dispatchers_route_to_triton_when_asked_and_never_under_autograd():
    previous = dispatch.use("triton")
    try:
        x = torch.randn(4, 3, device=DEVICE)
        assert dispatch.triton_path(x)
        assert not dispatch.triton_path(x.clone().requires_grad_())  # no backward kernels
        with torch.no_grad():
            assert dispatch.triton_path(x.clone().requires_grad_())
        logits = torch.randn(5, 300, device=DEVICE)
        token, conf, above = sc.select_commit(logits, 0.01)
        ref = sc.select_commit_reference(logits, 0.01)
        assert torch.equal(token, ref[0]) and torch.equal(above, ref[2])
    finally:
        dispatch.use(previous)


# ---------------------------------------------------------------------------------------------
# select_commit


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 1000), (5, 16387)])
def test_select_commit_argmax_matches_reference(dtype, shape):
    gen = torch.Generator().manual_seed(shape[1])
    logits = (torch.randn(shape, generator=gen) * 4).to(dtype).to(DEVICE)
    logits[0, 7] = logits[0, 500] = logits[0].max() + 1  # a tie: the lower id wins in both
    threshold = 0.05
    token, conf, above = sc.select_commit_triton(logits, threshold)
    ref_token, ref_conf, _ = sc.select_commit_reference(logits, threshold)
    assert token.dtype == torch.int64 and conf.dtype == torch.float32 and above.dtype == torch.bool
    assert torch.equal(token, ref_token)
    assert token[0] == 7
    torch.testing.assert_close(conf, ref_conf, rtol=1e-5, atol=1e-6)
    assert torch.equal(above, conf >= threshold)


@needs_triton
def test_select_commit_online_softmax_across_blocks():
    # Small blocks force the running max/sum across blocks; a block of -inf must not poison it.
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 1000, generator=gen) * 3
    logits[:, :300] = float("-inf")  # e.g. banned tokens
    logits[4, 999] = 40.0  # the best token in the last, partial block
    logits = logits.to(DEVICE)
    token, conf, above = sc.select_commit_triton(logits, 0.5, block_v=128)  # 8 blocks, the last partial
    ref_token, ref_conf, ref_above = sc.select_commit_reference(logits, 0.5)
    assert torch.equal(token, ref_token) and token[4] == 999
    torch.testing.assert_close(conf, ref_conf, rtol=1e-5, atol=1e-6)
    assert torch.equal(above, ref_above)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_commit_gumbel_with_shared_noise_matches_reference(dtype):
    gen = torch.Generator().manual_seed(11)
    logits = (torch.randn(37, 1000, generator=gen) * 2).to(dtype).to(DEVICE)
    uniform = torch.rand(37, 1000, generator=gen, dtype=torch.float64).to(DEVICE)
    for temperature in (0.3, 1.5):
        token, conf, above = sc.select_commit_triton(logits, 0.2, temperature, uniform=uniform)
        ref_token, ref_conf, ref_above = sc.select_commit_reference(logits, 0.2, temperature, uniform=uniform)
        assert torch.equal(token, ref_token)
        torch.testing.assert_close(conf, ref_conf, rtol=1e-5, atol=1e-6)
        assert torch.equal(above, conf >= 0.2)
    greedy = sc.select_commit_reference(logits, 0.2)[0]
    assert not torch.equal(token, greedy)  # the noise did something


@needs_triton
def test_select_commit_in_kernel_philox_samples_the_softmax():
    # Without a noise tensor the kernel draws its own (Philox): the same distribution as the
    # reference, not the same draws. 96 rows of two tokens with probabilities .27 and .73
    # (few rows: the interpreter runs Philox's rounds slowly).
    logits = torch.tensor([[0.0, 1.0]], device=DEVICE).repeat(96, 1)
    token, conf, _ = sc.select_commit_triton(logits, 0.5, 1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(token.cpu(), minlength=2).double() / 96
    probs = torch.softmax(logits[0].double().cpu(), -1)
    assert (freq - probs).abs().max() < 0.18  # four standard deviations; argmax alone would give 1.0
    again = sc.select_commit_triton(logits[:16], 0.5, 1.0, generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(token[:16], again)  # a seeded generator reproduces the draw, row by row
    torch.testing.assert_close(conf, probs.float().to(DEVICE)[token])


# ---------------------------------------------------------------------------------------------
# canvas_attention


def _segments(B, hkv, T, D, dtype, gen, shared=1003, per_row=21):
    def kv(b, s):
        return (torch.randn(b, hkv, s, D, generator=gen).to(dtype).to(DEVICE),
                torch.randn(b, hkv, s, D, generator=gen).to(dtype).to(DEVICE))

    return [kv(1, shared), kv(B, per_row), kv(B, T)]  # shared context, per-row past, the canvas itself


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_canvas_attention_matches_reference(dtype):
    gen = torch.Generator().manual_seed(5)
    B, H, hkv, T, D = 2, 4, 2, 37, 32  # GQA group of 2, canvas of 37 slots
    q = torch.randn(B, H, T, D, generator=gen).to(dtype).to(DEVICE)
    segments = _segments(B, hkv, T, D, dtype, gen)
    S = sum(k.shape[2] for k, _ in segments)
    mask = (torch.rand(B, 1, T, S, generator=gen) > 0.3).to(DEVICE)
    mask[1, 0, 5] = False  # a query that sees nothing: zeros, as in the reference
    ref = ca.canvas_attention_reference(q, segments, mask)
    out = ca.canvas_attention_triton(q, segments, mask)
    _close(out, ref, dtype)
    assert out[1, :, 5].abs().max() == 0
    _close(ca.canvas_attention_triton(q, segments, mask, split_size=300), ref, dtype)  # many chunks, merged
    _close(ca.canvas_attention_triton(q, segments, None), ca.canvas_attention_reference(q, segments, None), dtype)


@needs_triton
def test_canvas_attention_broadcast_mask_and_strided_segments():
    # A key-validity mask broadcast over the queries, segments sliced out of a bigger cache
    # (non-contiguous in S), a head dim that is not a power of two, no GQA.
    gen = torch.Generator().manual_seed(9)
    B, H, T, D = 3, 2, 5, 24
    q = torch.randn(B, H, T, D, generator=gen, device="cpu").to(DEVICE)
    cache_k = torch.randn(1, H, 1100, D, generator=gen).to(DEVICE)
    cache_v = torch.randn(1, H, 1100, D, generator=gen).to(DEVICE)
    segments = [(cache_k[:, :, :400], cache_v[:, :, :400]), (cache_k[:, :, 700:], cache_v[:, :, 700:]),
                (torch.randn(B, H, 0, D, device=DEVICE), torch.randn(B, H, 0, D, device=DEVICE))]
    valid = (torch.rand(B, 1, 1, 800, generator=gen) > 0.5).to(DEVICE)
    mask = valid.expand(B, 1, T, 800)
    _close(ca.canvas_attention_triton(q, segments, mask), ca.canvas_attention_reference(q, segments, mask), torch.float32)


@needs_triton
def test_network_forward_same_with_either_backend():
    from dlm_ls.model.config import ModelConfig
    from dlm_ls.model.network import DiffusionLM

    model = DiffusionLM(ModelConfig.preset("tiny")).init_weights(0).to(DEVICE).eval()
    tokens = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    positions = torch.arange(19, device=DEVICE).expand(2, 19)
    mask = torch.ones(19, 19, dtype=torch.bool, device=DEVICE).tril()[None, None].expand(2, 1, 19, 19)
    with torch.no_grad():
        previous = dispatch.use("reference")
        try:
            ref, _ = model(tokens, positions, mask)
            dispatch.use("triton")
            out, _ = model(tokens, positions, mask)
        finally:
            dispatch.use(previous)
    _close(out, ref, torch.float32)


# ---------------------------------------------------------------------------------------------
# The compiled path, checked without a GPU: every kernel variant goes through Triton's whole
# CUDA pipeline (TTIR, TTGIR, LLVM, PTX, ptxas) for an H100, which the interpreter never does.

_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dlm_ls.kernels import canvas_attention as ca, select_commit as sc

FLOATS = {"threshold", "qk_scale", "eps"}

def compile(fn, ptrs, consts):
    sig = {}
    for p in fn.params:
        name = p.name
        sig[name] = "constexpr" if p.is_constexpr else ptrs.get(name, "fp32" if name in FLOATS else "i32")
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4})

# bf16, the GPU's dtype; one variant per code path (the others are subsets), to keep this under ~20 s.
for noise in (0, 2):
    compile(sc._select_commit_kernel, {"logits_ptr": "*bf16", "uniform_ptr": "*fp64", "seed_ptr": "*i64",
            "temperature_ptr": "*fp64", "token_ptr": "*i64", "conf_ptr": "*fp32", "above_ptr": "*i1"},
            {"NOISE": noise, "BLOCK_V": 2048})
compile(ca._canvas_attention_partial, {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "mask_ptr": "*u8",
        "o_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32"},
        {"G": 7, "D": 128, "HAS_MASK": True, "PRECISION": "tf32", "BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": 128})
compile(ca._canvas_attention_merge, {"o_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "y_ptr": "*bf16"},
        {"G": 7, "D": 128, "BLOCK_M": 64, "BLOCK_D": 128})
print("compiled")
"""


@needs_triton
@pytest.mark.slow  # a subprocess and ~20 s of compiling the first time (Triton caches it after)
def test_kernels_compile_for_an_h100():
    import subprocess
    import sys

    try:
        from triton.backends import backends
    except ImportError:
        pytest.skip("this triton has no backend registry")
    if "nvidia" not in backends:
        pytest.skip("triton's CUDA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DLM_LS_KERNELS"] = "triton"  # on a machine without a GPU the kernels are only defined when asked for
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
