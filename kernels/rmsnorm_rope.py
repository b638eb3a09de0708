"""RMSNorm and rotary position embedding, alone or fused, over the last dimension of a tensor.

Three uses of one op, chosen by which arguments are given:
  - `weight` only: the network's RMSNorm (`model/network.py`), x * rsqrt(mean(x^2) + eps) * weight;
  - `cos`/`sin` only: RoPE on q or k, halves layout (as Qwen2/LLaMA in transformers);
  - both: RMSNorm then RoPE with no rounding in between (per-head q/k norm, as Qwen3-style
    checkpoints have it).
All arithmetic is fp32; the result is rounded once to x's dtype.

Reference in PyTorch. Memory traffic: in eager mode each `.float()`, `pow`, `mean`, `rsqrt`,
multiply, `chunk` and `cat` is its own kernel reading and writing the whole tensor in fp32:
about ten full passes where one read and one write would do. The Triton kernel is that one
pass: a program loads a block of rows, reduces each row's sum of squares in registers,
rotates the two halves against the row's cos/sin, and stores.
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


def rmsnorm_rope_reference(x: Tensor, weight: Tensor | None, eps: float = 1e-6,
                           cos: Tensor | None = None, sin: Tensor | None = None) -> Tensor:
    """x (..., D); weight (D,) or None (no norm); cos, sin broadcastable to x[..., : D // 2] or None (no rotation).

    For the network's layout: x (B, H, T, D) with cos, sin (B, 1, T, D/2).
    """
    y = x.float()
    if weight is not None:
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if cos is not None:
        y1, y2 = y.chunk(2, dim=-1)
        y = torch.cat((y1 * cos - y2 * sin, y2 * cos + y1 * sin), dim=-1)
    return y.to(x.dtype)


if triton is not None:

    @triton.jit
    def _rmsnorm_rope_kernel(
        x_ptr, w_ptr, cos_ptr, sin_ptr, y_ptr,
        R, H, T, eps,
        sx_b, sx_h, sx_t,  # x viewed as (B, H, T, D), last stride 1
        sc_b, sc_t, ss_b, ss_t,  # cos, sin viewed as (B, T, D/2), last stride 1
        D: tl.constexpr, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # y is a fresh contiguous (R, D) tensor, R = B * H * T rows.
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        row_ok = rows < R
        t = rows % T
        h = (rows // T) % H
        b = rows // (T * H)
        x_row = x_ptr + b * sx_b + h * sx_h + t * sx_t
        if HAS_ROPE:
            HALF: tl.constexpr = D // 2
            c = tl.arange(0, BLOCK_D)  # BLOCK_D covers one half here
            ok = row_ok[:, None] & (c < HALF)[None, :]
            x1 = tl.load(x_row[:, None] + c[None, :], mask=ok, other=0.0).to(tl.float32)
            x2 = tl.load(x_row[:, None] + HALF + c[None, :], mask=ok, other=0.0).to(tl.float32)
            if HAS_NORM:
                inv = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
                w1 = tl.load(w_ptr + c, mask=c < HALF, other=0.0).to(tl.float32)
                w2 = tl.load(w_ptr + HALF + c, mask=c < HALF, other=0.0).to(tl.float32)
                x1 = x1 * inv[:, None] * w1[None, :]
                x2 = x2 * inv[:, None] * w2[None, :]
            cs = tl.load(cos_ptr + b[:, None] * sc_b + t[:, None] * sc_t + c[None, :], mask=ok, other=0.0).to(tl.float32)
            sn = tl.load(sin_ptr + b[:, None] * ss_b + t[:, None] * ss_t + c[None, :], mask=ok, other=0.0).to(tl.float32)
            y_row = y_ptr + rows[:, None] * D + c[None, :]
            tl.store(y_row, (x1 * cs - x2 * sn).to(y_ptr.dtype.element_ty), mask=ok)
            tl.store(y_row + HALF, (x2 * cs + x1 * sn).to(y_ptr.dtype.element_ty), mask=ok)
        else:
            c = tl.arange(0, BLOCK_D)
            ok = row_ok[:, None] & (c < D)[None, :]
            x = tl.load(x_row[:, None] + c[None, :], mask=ok, other=0.0).to(tl.float32)
            inv = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
            w = tl.load(w_ptr + c, mask=c < D, other=0.0).to(tl.float32)
            y = x * inv[:, None] * w[None, :]
            tl.store(y_ptr + rows[:, None] * D + c[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


def kernel_supports(x: Tensor, weight: Tensor | None, cos: Tensor | None, sin: Tensor | None) -> bool:
    """Shapes the kernel takes; anything else runs the reference."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.numel() == 0 or x.shape[-1] > 16384:
        return False
    if weight is None and cos is None:
        return False
    if weight is not None and (weight.shape != (x.shape[-1],) or weight.device != x.device):
        return False
    if cos is not None:
        if sin is None or x.dim() != 4 or x.shape[-1] % 2 or x.stride(-1) != 1:
            return False
        B, _, T, D = x.shape
        for t in (cos, sin):
            if t.dim() != 4 or t.shape[1] != 1 or t.shape[0] not in (1, B) or t.shape[2] != T or t.shape[3] != D // 2:
                return False
            if t.stride(-1) != 1 or t.device != x.device:
                return False
    return True


def rmsnorm_rope_triton(x: Tensor, weight: Tensor | None, eps: float = 1e-6,
                        cos: Tensor | None = None, sin: Tensor | None = None) -> Tensor:
    """The kernel's host wrapper: same arguments and result as `rmsnorm_rope_reference` (a contiguous tensor)."""
    if triton is None:
        raise RuntimeError("rmsnorm_rope_triton needs the triton package")
    if not kernel_supports(x, weight, cos, sin):
        raise ValueError("rmsnorm_rope_triton: unsupported shapes or layouts (see kernel_supports)")
    D = x.shape[-1]
    has_rope = cos is not None
    if has_rope:
        B, H, T, _ = x.shape
        xv = x
        cs, sn = cos.expand(B, 1, T, D // 2), sin.expand(B, 1, T, D // 2)
        rope_strides = (cs.stride(0), cs.stride(2), sn.stride(0), sn.stride(2))
    else:
        xv = x.reshape(1, 1, -1, D)  # a view when x is contiguous
        if xv.stride(-1) != 1:
            xv = xv.contiguous()
        B, H, T = 1, 1, xv.shape[2]
        cs = sn = xv
        rope_strides = (0, 0, 0, 0)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    R = B * H * T
    block_d = triton.next_power_of_2(D // 2 if has_rope else D)
    # About 4k elements per program: several rows of a small head, one row of a wide model.
    block_r = max(1, min(64, 4096 // block_d))
    if x.device.type != "cuda":
        block_r = max(block_r, min(256, triton.next_power_of_2(R)))  # the interpreter pays per program
    _rmsnorm_rope_kernel[(triton.cdiv(R, block_r),)](
        xv, weight if weight is not None else xv, cs, sn, y,
        R, H, T, float(eps),
        xv.stride(0), xv.stride(1), xv.stride(2), *rope_strides,
        D=D, HAS_NORM=weight is not None, HAS_ROPE=has_rope, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4 if block_d * block_r <= 4096 else 8,
    )
    return y


def rmsnorm_rope(x: Tensor, weight: Tensor | None, eps: float = 1e-6,
                 cos: Tensor | None = None, sin: Tensor | None = None) -> Tensor:
    """The op as the network would call it: the Triton kernel on a GPU (see `dispatch.py`), else the reference."""
    if dispatch.triton_path(x) and kernel_supports(x, weight, cos, sin) and not (
            weight is not None and torch.is_grad_enabled() and weight.requires_grad):
        return rmsnorm_rope_triton(x, weight, eps, cos, sin)
    return rmsnorm_rope_reference(x, weight, eps, cos, sin)
