"""Attention of a few query tokens (the canvas, or newly appended context) over cached segments.

Reference: concatenate the key/value segments (a shared context cache is broadcast over the
batch), repeat the grouped kv heads, and let `scaled_dot_product_attention` apply the boolean
mask. Memory traffic: the context's keys and values are read once per query block, but the
concatenation also writes a copy of them per step (B copies of a shared context, times the
GQA group size after `repeat_interleave`).

Kernel (flash-decoding, after Dao et al.'s "Flash-Decoding for long-context inference"):
the key axis is cut into chunks, each chunk inside one segment; one program per
(batch row, kv head, block of query rows, chunk) computes an unnormalised partial output with
its running max and denominator; a second kernel merges the chunks. Splitting the keys keeps
the GPU busy when there are few query blocks (a canvas of 32 slots, one request) and a long
context. The query heads that share a kv head are stacked into one block of rows
(row r = g * T + t for head kvh * G + g and query t), so each key/value tile is loaded once
per group, not once per head. Segments are read in place through their strides: a shared
context (batch 1) is never copied, and nothing is concatenated.

Mask semantics are the reference's: True = attend; a query row with no True key gets zeros
(what `scaled_dot_product_attention` returns for it on the CPU). The mask is read through its
strides, so a broadcast view (say, per-key validity expanded over the queries) costs no copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch

triton = None  # CPU-only installs, or a CPU without the interpreter: the reference is all there is
if dispatch.triton_runnable():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        triton = None

LOG2E = 1.4426950408889634


def canvas_attention_reference(q: Tensor, segments: list[tuple[Tensor, Tensor]], mask: Tensor | None) -> Tensor:
    """q: (B, H, T, D); segments: [(k, v)] each (B or 1, Hkv, S_i, D); mask: (B, 1, T, sum S_i) bool or None (all)."""
    B, H = q.shape[0], q.shape[1]
    ks = [k.expand(B, -1, -1, -1) for k, _ in segments]
    vs = [v.expand(B, -1, -1, -1) for _, v in segments]
    k = ks[0] if len(ks) == 1 else torch.cat(ks, dim=2)  # (B, Hkv, S, D)
    v = vs[0] if len(vs) == 1 else torch.cat(vs, dim=2)
    if k.shape[1] != H:
        k = k.repeat_interleave(H // k.shape[1], dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(H // v.shape[1], dim=1)
    return F.scaled_dot_product_attention(q, k, v.to(q.dtype), attn_mask=mask)


if triton is not None:

    @triton.jit
    def _canvas_attention_partial(
        q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, m_ptr, l_ptr,
        sq_b, sq_h, sq_t,  # q (B, H, T, D), last stride 1
        sk_b, sk_h, sk_s,  # this segment's k (B or 1, Hkv, S, D): sk_b = 0 for a shared segment
        sv_b, sv_h, sv_s,
        sm_b, sm_t, sm_s,  # mask (B, 1, T, S_total) as uint8
        T, S, n_kv_heads, n_partials, col0, part0, chunk, qk_scale,
        G: tl.constexpr, D: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Partial buffers: o (B, Hkv, P, G*T, D) fp32, m and l (B, Hkv, P, G*T) fp32, P = all chunks.
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_c = tl.program_id(2)
        b = (pid_bh // n_kv_heads).to(tl.int64)  # int64 offsets: a long context times a batch passes 2^31
        kvh = pid_bh % n_kv_heads
        M = G * T
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # stacked (head in group, query) rows
        row_ok = rows < M
        t = rows % T
        h = kvh * G + rows // T
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + t[:, None] * sq_t + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = k_ptr + b * sk_b + kvh * sk_h
        v_base = v_ptr + b * sv_b + kvh * sv_h
        start = pid_c * chunk
        end = tl.minimum(start + chunk, S)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max of the scores (log2 units)
        l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of 2^(score - m_i)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < end
            kv_ok = col_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * sk_s + d[None, :], mask=kv_ok, other=0.0).to(q.dtype)
            v = tl.load(v_base + cols[:, None] * sv_s + d[None, :], mask=kv_ok, other=0.0).to(q.dtype)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) fp32
            valid = row_ok[:, None] & col_ok[None, :]
            if HAS_MASK:
                allowed = tl.load(mask_ptr + b * sm_b + t[:, None] * sm_t + (col0 + cols)[None, :] * sm_s,
                                  mask=valid, other=0)
                valid = valid & (allowed != 0)
            scores = tl.where(valid, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at 0
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        part = (b * n_kv_heads + kvh) * n_partials + part0 + pid_c
        tl.store(o_ptr + (part * M + rows[:, None]) * D + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(m_ptr + part * M + rows, m_i, mask=row_ok)
        tl.store(l_ptr + part * M + rows, l_i, mask=row_ok)

    @triton.jit
    def _canvas_attention_merge(
        o_ptr, m_ptr, l_ptr, y_ptr,
        sy_b, sy_h, sy_t,  # y (B, H, T, D), last stride 1
        T, n_kv_heads, n_partials,
        G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        b = (pid_bh // n_kv_heads).to(tl.int64)
        kvh = pid_bh % n_kv_heads
        M = G * T
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        m_run = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_run = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for p in range(0, n_partials):
            part = (b * n_kv_heads + kvh) * n_partials + p
            m_p = tl.load(m_ptr + part * M + rows, mask=row_ok, other=float("-inf"))
            l_p = tl.load(l_ptr + part * M + rows, mask=row_ok, other=0.0)
            o_p = tl.load(o_ptr + (part * M + rows[:, None]) * D + d[None, :],
                          mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            m_new = tl.maximum(m_run, m_p)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            a_run = tl.exp2(m_run - m_safe)
            a_p = tl.exp2(m_p - m_safe)
            l_run = l_run * a_run + l_p * a_p
            acc = acc * a_run[:, None] + o_p * a_p[:, None]
            m_run = m_new
        out = tl.where(l_run[:, None] > 0, acc / tl.where(l_run > 0, l_run, 1.0)[:, None], 0.0)
        t = rows % T
        h = kvh * G + rows // T
        tl.store(y_ptr + b * sy_b + h[:, None] * sy_h + t[:, None] * sy_t + d[None, :],
                 out.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


_SM_COUNT: dict[int, int] = {}


def _target_programs(device: torch.device) -> int:
    """Enough programs to fill the GPU about twice over; a small number under the interpreter."""
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 2 * _SM_COUNT[idx]


def kernel_supports(q: Tensor, segments: list[tuple[Tensor, Tensor]], mask: Tensor | None) -> bool:
    """Shapes and layouts the kernel takes; anything else runs the reference."""
    if q.dim() != 4 or q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or q.stride(-1) != 1:
        return False
    B, H, T, D = q.shape
    if D < 16 or D > 256 or T == 0 or not segments:
        return False
    hkv = segments[0][0].shape[1]
    if H % hkv:
        return False
    total = 0
    for k, v in segments:
        if k.dim() != 4 or k.shape != v.shape or k.shape[0] not in (1, B) or k.shape[1] != hkv or k.shape[3] != D:
            return False
        if k.stride(-1) != 1 or v.stride(-1) != 1 or k.device != q.device or v.device != q.device:
            return False
        total += k.shape[2]
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != total:
            return False
        if mask.shape[0] not in (1, B) or mask.shape[2] not in (1, T):
            return False
    return True


def canvas_attention_triton(q: Tensor, segments: list[tuple[Tensor, Tensor]], mask: Tensor | None,
                            split_size: int | None = None) -> Tensor:
    """The kernels' host wrapper: same arguments and result as `canvas_attention_reference`.

    `split_size` (keys per chunk, rounded up to the key block) overrides the automatic split,
    for tests and tuning.
    """
    if triton is None:
        raise RuntimeError("canvas_attention_triton needs the triton package")
    if not kernel_supports(q, segments, mask):
        raise ValueError("canvas_attention_triton: unsupported shapes or layouts (see kernel_supports)")
    B, H, T, D = q.shape
    hkv = segments[0][0].shape[1]
    G, M = H // hkv, (H // hkv) * T
    segments = [(k, v) for k, v in segments if k.shape[2] > 0]
    y = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
    if not segments:  # nothing to attend to: the reference's zeros
        return y.zero_()
    interp = q.device.type != "cuda"
    # Bigger tiles under the interpreter: it pays per tile step, not per element.
    block_m = 64 if not interp else min(128, max(16, triton.next_power_of_2(M)))
    block_n = (64 if D <= 64 else 32) if not interp else 512
    block_d = max(16, triton.next_power_of_2(D))
    m_blocks = triton.cdiv(M, block_m)
    total = sum(k.shape[2] for k, _ in segments)
    if split_size is None:
        want = max(1, _target_programs(q.device) // (B * hkv * m_blocks))
        split_size = triton.cdiv(total, want)
    chunk = triton.cdiv(max(split_size, 1), block_n) * block_n
    n_chunks = [triton.cdiv(k.shape[2], chunk) for k, _ in segments]
    P = sum(n_chunks)
    o = torch.empty(B, hkv, P, M, D, dtype=torch.float32, device=q.device)
    m = torch.empty(B, hkv, P, M, dtype=torch.float32, device=q.device)
    l = torch.empty(B, hkv, P, M, dtype=torch.float32, device=q.device)
    has_mask = mask is not None
    if has_mask:
        mk = mask.expand(B, 1, T, total).view(torch.uint8)  # a view: strides 0 where broadcast
        sm = (mk.stride(0), mk.stride(2), mk.stride(3))
    else:
        mk, sm = q, (0, 0, 0)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 stays fp32: the reference's numbers
    qk_scale = LOG2E / D**0.5
    col0 = part0 = 0
    for (k, v), nc in zip(segments, n_chunks):
        S = k.shape[2]
        skb = 0 if k.shape[0] == 1 else k.stride(0)
        svb = 0 if v.shape[0] == 1 else v.stride(0)
        _canvas_attention_partial[(B * hkv, m_blocks, nc)](
            q, k, v, mk, o, m, l,
            q.stride(0), q.stride(1), q.stride(2),
            skb, k.stride(1), k.stride(2),
            svb, v.stride(1), v.stride(2),
            *sm,
            T, S, hkv, P, col0, part0, chunk, qk_scale,
            G=G, D=D, HAS_MASK=has_mask, PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=2,
        )
        col0 += S
        part0 += nc
    _canvas_attention_merge[(B * hkv, m_blocks)](
        o, m, l, y, y.stride(0), y.stride(1), y.stride(2), T, hkv, P,
        G=G, D=D, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
    )
    return y


def canvas_attention(q: Tensor, segments: list[tuple[Tensor, Tensor]], mask: Tensor | None) -> Tensor:
    """What the network calls: the Triton kernels on a GPU (see `dispatch.py`), else the reference."""
    if dispatch.triton_path(q) and kernel_supports(q, segments, mask):
        return canvas_attention_triton(q, segments, mask)
    return canvas_attention_reference(q, segments, mask)
