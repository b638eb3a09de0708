"""Select-and-commit: per canvas slot, the chosen token, its probability, and whether it clears the threshold.

Reference in PyTorch. Memory traffic: it materialises a (N, V) softmax in fp32 (read the logits,
write and read the probabilities), which for V = 16k-150k and N = 32-256 slots is most of a
small model's step on a GPU. The Triton kernel reads each logit once: one program per slot
walks the vocabulary in blocks with an online max and sum of exponentials (the softmax
denominator), keeping the running argmax beside them; nothing of size V is written.

Temperature 0 picks the argmax. Temperature > 0 samples with the Gumbel-max trick: argmax of
logits / T + g, with g = -log(-log u). The noise is computed in float64, because in float32 the
double log rounds away the tail that low temperatures rely on (LLaDA's note on the same trick).
The confidence is the softmax probability of the chosen token at temperature 1, so the commit
rule means the same thing whatever the temperature.

Where the uniform noise u comes from: a caller may pass it (`uniform`, (N, V)); then both
implementations use exactly that noise and agree token for token, which is how the tests
compare them. Without it, the reference draws u from `generator` with torch, and the kernel
draws it in-kernel with Philox from a seed drawn from `generator`, so that no (N, V) noise
tensor is written or read: the two then agree in distribution, not draw for draw.

Ties go to the lowest token id in both (torch.argmax's rule). Logits must not be NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch

triton = None  # CPU-only installs, or a CPU without the interpreter: the reference is all there is
if dispatch.triton_runnable():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        triton = None


def gumbel_noise(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return gumbel_from_uniform(torch.rand(shape, generator=generator, dtype=torch.float64, device=device))


def gumbel_from_uniform(u: Tensor) -> Tensor:
    """-log(-log u) in float64, with u kept off 0 and 1 (where the logs would be infinite)."""
    u = u.double().clamp(1e-20, 1.0 - 1e-16)
    return -torch.log(-torch.log(u))


def select_commit_reference(logits: Tensor, threshold: float, temperature: float = 0.0,
                            generator: torch.Generator | None = None,
                            uniform: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """logits (N, V) -> token (N,) int64, confidence (N,) fp32, above threshold (N,) bool.

    `uniform` (N, V) in (0, 1), optional: the noise for temperature > 0 (drawn from `generator`
    when absent); ignored at temperature 0.
    """
    logits = logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)  # (N, V) fp32: the traffic the kernel avoids
    if temperature > 0:
        g = gumbel_from_uniform(uniform) if uniform is not None else gumbel_noise(logits.shape, generator, logits.device)
        token = (logits.double() / temperature + g).argmax(dim=-1)
    else:
        token = logits.argmax(dim=-1)
    confidence = log_probs.gather(-1, token[:, None]).squeeze(-1).exp()
    return token, confidence, confidence >= threshold


if triton is not None:

    @triton.jit
    def _select_commit_kernel(
        logits_ptr, uniform_ptr, seed_ptr, temperature_ptr,  # (N, V) logits; (N, V) noise; (1,) int64; (1,) fp64
        token_ptr, conf_ptr, above_ptr,  # (N,) int64, fp32, bool
        V, stride_logits, stride_uniform, threshold,
        NOISE: tl.constexpr,  # 0: argmax; 1: Gumbel from `uniform`; 2: Gumbel from in-kernel Philox
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_logits = logits_ptr + row * stride_logits
        m = tl.full((), float("-inf"), tl.float32)  # running max of the logits
        s = tl.zeros((), tl.float32)  # running sum of exp(logit - m): the softmax denominator
        if NOISE == 0:
            best = tl.full((), float("-inf"), tl.float32)  # running max of the score: the logit, or
        else:
            best = tl.full((), float("-inf"), tl.float64)  # logit / T + g in float64 when sampling
        best_idx = tl.zeros((), tl.int64)
        if NOISE != 0:
            temperature = tl.load(temperature_ptr)
        if NOISE == 2:
            seed = tl.load(seed_ptr)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = cols < V
            x = tl.load(row_logits + cols, mask=ok, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block of -inf logits must not make NaN
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
            m = m_new
            if NOISE == 0:
                score = x
            else:
                if NOISE == 1:
                    u = tl.load(uniform_ptr + row * stride_uniform + cols, mask=ok, other=0.5).to(tl.float64)
                else:
                    # 53 random bits from two Philox words: float64 uniforms, as torch.rand(float64) draws them.
                    r0, r1, _, _ = tl.randint4x(seed, row * V + cols)
                    hi27, lo26 = (r0 >> 5).to(tl.float64), (r1 >> 6).to(tl.float64)
                    u = (hi27 * 67108864.0 + lo26 + 0.5) * (1.0 / 9007199254740992.0)  # (k + 1/2) / 2^53
                u = tl.minimum(tl.maximum(u, 1e-20), 1.0 - 1e-16)
                g = -tl.log(-tl.log(u))
                score = tl.where(ok, x.to(tl.float64) / temperature + g, float("-inf"))
            block_best = tl.max(score, axis=0)
            block_idx = v0 + tl.argmax(score, axis=0, tie_break_left=True)
            better = block_best > best  # strict: an earlier block keeps a tie, as torch.argmax does
            best_idx = tl.where(better, block_idx, best_idx)
            best = tl.where(better, block_best, best)
        x_token = tl.load(row_logits + best_idx).to(tl.float32)
        conf = tl.exp(x_token - m) / s
        tl.store(token_ptr + row, best_idx)
        tl.store(conf_ptr + row, conf)
        tl.store(above_ptr + row, conf >= threshold)


def _draw_seed(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """A Philox seed as a (1,) int64 tensor on `device`: no host sync, so a captured step can replay it."""
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=gen_device, dtype=torch.int64)
    return seed.to(device, non_blocking=True)


def select_commit_triton(logits: Tensor, threshold: float, temperature: float = 0.0,
                         generator: torch.Generator | None = None,
                         uniform: Tensor | None = None, block_v: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel's host wrapper: same arguments and results as `select_commit_reference`.

    `block_v` (a power of two) overrides the vocabulary block, for tests and tuning.
    """
    if triton is None:
        raise RuntimeError("select_commit_triton needs the triton package")
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got {tuple(logits.shape)}")
    N, V = logits.shape
    dev = logits.device
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    token = torch.empty(N, dtype=torch.int64, device=dev)
    conf = torch.empty(N, dtype=torch.float32, device=dev)
    above = torch.empty(N, dtype=torch.bool, device=dev)
    if N == 0:
        return token, conf, above
    noise, seed, u = 0, token, logits  # unused pointers still need a tensor
    temp = torch.full((1,), max(float(temperature), 1e-30), dtype=torch.float64, device=dev)
    if temperature > 0:
        if uniform is not None:
            if uniform.shape != logits.shape:
                raise ValueError(f"uniform noise {tuple(uniform.shape)} does not match logits {tuple(logits.shape)}")
            noise, u = 1, uniform if uniform.stride(-1) == 1 else uniform.contiguous()
        else:
            noise, seed = 2, _draw_seed(generator, dev)
    # One program per slot; a block of 2-4k logits keeps the loads wide without spilling registers.
    # The interpreter pays per block step, not per element: one block per row there.
    if block_v is None:
        cap = 32768 if dev.type != "cuda" else 2048 if noise else 4096
        block_v = min(triton.next_power_of_2(V), cap)
    _select_commit_kernel[(N,)](
        logits, u, seed, temp, token, conf, above,
        V, logits.stride(0), u.stride(0), float(threshold),
        NOISE=noise, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
    )
    return token, conf, above


def select_commit(logits: Tensor, threshold: float, temperature: float = 0.0,
                  generator: torch.Generator | None = None,
                  uniform: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """What the sampler calls: the Triton kernel on a GPU (see `dispatch.py`), else the reference."""
    if dispatch.triton_path(logits) and logits.dim() == 2:
        return select_commit_triton(logits, threshold, temperature, generator, uniform)
    return select_commit_reference(logits, threshold, temperature, generator, uniform)
