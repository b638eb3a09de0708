"""The output layer and cross-entropy fused per chunk of rows, so the (rows x vocabulary) logits never exist whole.

Reference: `logits = h @ weight.T` in full, then `F.cross_entropy(logits.float(), targets)`.
Memory traffic of the reference, for N scored rows and a V-wide vocabulary: it writes the N x V
logits, reads them for the log-softmax, writes the log-probabilities, and in the backward writes an
N x V zero-filled gradient (nll_loss's scatter), reads it with the saved log-probabilities for the
softmax gradient and writes that: about seven passes over N x V fp32 (3,072 x 16,384 = 200 MB each
for a 6 x 512 training batch).

Fused (the idea of Liger-Kernel's fused linear cross-entropy, done with plain torch ops for the CPU):
for each chunk of rows, compute its logits, their log-sum-exp and the loss, and turn the logits in
place into the gradient of the weighted loss, `w_i * (softmax - onehot)`; multiply it straight into
the input's gradient and accumulate the weight's gradient. Everything the backward needs is computed
in the forward, and a chunk of logits (rows_per_chunk x V) stays in the cache. The backward only
scales the stored gradients by the incoming one.

The loss is `sum_i w_i * CE_i` with a coefficient per row, so one call serves any weighted mean
(the canvas mean, a pad-weighted mean, the ELBO, the next-token loss on context) at once; the per-row
cross-entropies come back detached, for logging. `banned=(first_row, n_cols)` leaves the first
n_cols classes out of the softmax of rows first_row.. (their logits are -inf): a head that is never
asked for those classes then never pushes them down for the rows that are. Knows tensors only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ROWS_PER_CHUNK = 512  # 512 x 16k fp32 logits = 32 MB: about the L3 of the 2-core training machine


NO_BAN = (0, 0)


def linear_cross_entropy_reference(h: Tensor, weight: Tensor, targets: Tensor, coef: Tensor,
                                   banned: tuple[int, int] = NO_BAN) -> tuple[Tensor, Tensor]:
    """h (N, d), weight (V, d), targets (N,), coef (N,) fp32 -> (sum_i coef_i * CE_i, CE detached (N,))."""
    logits = (h @ weight.t()).float()  # (N, V)
    first_row, n_cols = banned
    if n_cols:
        ban = torch.zeros_like(logits, dtype=torch.bool)
        ban[first_row:, :n_cols] = True
        logits = logits.masked_fill(ban, float("-inf"))
    ce = F.cross_entropy(logits, targets, reduction="none")  # (N,)
    return (ce * coef).sum(), ce.detach()


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, coef: Tensor, rows_per_chunk: int,
                banned: tuple[int, int]):
        N = h.shape[0]
        grad_h = torch.empty_like(h)  # (N, d)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # (V, d), summed in fp32
        ce = torch.empty(N, dtype=torch.float32, device=h.device)
        for s in range(0, N, rows_per_chunk):
            e = min(N, s + rows_per_chunk)
            hc, tc = h[s:e], targets[s:e]
            logits = (hc @ weight.t()).float()  # (n, V)
            if banned[1] and e > banned[0]:
                logits[max(0, banned[0] - s):, : banned[1]] = float("-inf")  # exp(-inf) = 0: no gradient there
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            rows = torch.arange(e - s, device=h.device)
            ce[s:e] = lse - logits[rows, tc]
            # d(sum coef_i CE_i)/d logits = coef_i * (softmax_i - onehot_i), computed in place
            logits.sub_(lse[:, None]).exp_()
            logits[rows, tc] -= 1.0
            logits.mul_(coef[s:e, None])
            g = logits.to(h.dtype)
            torch.mm(g, weight, out=grad_h[s:e])
            if g.dtype == torch.float32:
                grad_w.addmm_(g.t(), hc)
            else:  # the matrix product in the weights' dtype (AMX), the running sum in fp32
                grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(ce)
        return (ce * coef).sum(), ce

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_ce: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None, None


def linear_cross_entropy_fused(h: Tensor, weight: Tensor, targets: Tensor, coef: Tensor,
                               banned: tuple[int, int] = NO_BAN,
                               rows_per_chunk: int = ROWS_PER_CHUNK) -> tuple[Tensor, Tensor]:
    """Same contract as the reference; the logits are never materialised for all rows at once."""
    if h.shape[0] == 0:
        zero = (h.sum() + weight.sum()) * 0.0  # keeps the graph: a batch with no scored row trains nothing
        return zero.float(), torch.zeros(0, dtype=torch.float32, device=h.device)
    return _FusedLinearCrossEntropy.apply(h, weight, targets, coef.float(), rows_per_chunk, tuple(banned))


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, coef: Tensor, fused: bool = True,
                         banned: tuple[int, int] = NO_BAN) -> tuple[Tensor, Tensor]:
    return (linear_cross_entropy_fused if fused else linear_cross_entropy_reference)(h, weight, targets, coef, banned)
