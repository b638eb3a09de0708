"""The training step: the loss of a packed batch, its backward and the optimizer update, in the variants
that `dlm-ls bench train` times.

Every variant computes the same loss; they differ only in how:

- `weights`: "fp32", or "bf16" weights for the matrix units with fp32 master weights and optimizer
  state (`MasterWeights`). bf16 pays only where the CPU multiplies bf16 in hardware (AMX or
  AVX512-BF16: measured 2.5x with compile on such a Xeon); on a CPU without them a bf16 matrix
  product is emulated and hundreds of times slower (measured on a 2-core AMD EPYC with AVX2, 2048^2
  products: 0.29 GFLOP/s against 113 in fp32; one bf16 training step took 65 s against 3.2 s). Autocast over fp32 weights is never a variant: its per-op casts
  cost more than AMX gains (shared/MEASURED.md).
- `compile`: torch.compile (inductor) of the backbone, at the fixed (batch, row) shapes of training.
- `fused_head`: the output layer and cross-entropy per chunk of rows (kernels/linear_cross_entropy.py),
  so the (scored positions x vocabulary) logits never exist whole in fp32.

`auto` picks, per device, the variant `dlm-ls bench train` measured fastest there (bench/results/
train-cpu.json); the choice is made in `resolve_variant` and nowhere else. Checkpoints always hold
fp32 weights and an optimizer over fp32 parameters in one order, so a run can resume in any variant.

This module knows the network, the loss and the optimizer. It does not know how batches are built,
nor the schedule, nor checkpoint folders.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ...kernels.linear_cross_entropy import linear_cross_entropy
from .. import tokens as T
from ..network import DiffusionLM

WEIGHTS = ("fp32", "bf16")


@dataclass(frozen=True)
class StepVariant:
    weights: str = "fp32"  # "fp32" | "bf16" (bf16 weights, fp32 master weights and optimizer state)
    compile: bool = False  # torch.compile the backbone
    fused_head: bool = False  # output layer + cross-entropy per chunk of rows

    @property
    def name(self) -> str:
        parts = [f"{self.weights} weights", "compiled" if self.compile else "eager"]
        if self.fused_head:
            parts.append("fused head")
        return ", ".join(parts)


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_matrix_units() -> bool:
    """AMX-BF16 or AVX512-BF16 in /proc/cpuinfo: bf16 matrix products in hardware (Linux; elsewhere False)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


def resolve_variant(weights: str, compile: str | bool, fused_head: str | bool, device: torch.device) -> StepVariant:
    """Each "auto" becomes what `dlm-ls bench train` measured fastest for this kind of device.

    CPU (bench/results/train-cpu.json, 2-core AMD EPYC with AVX2, small preset, batch 6 x 512):
    fused head + compiled backbone 794 / 1,367 tokens/s at 1 / 2 threads, against 601 / 1,139 for
    fp32 eager (1.32x / 1.20x); compile alone gains little, the fused head alone 1.10-1.21x.
    bf16 weights only with bf16 matrix units (measured 2.5x on an AMX Xeon, shared/MEASURED.md).
    GPU: fp32 weights under bf16 autocast (the step's own path there); compile as asked.
    """
    def pick(value, default: bool) -> bool:
        return default if value in ("auto", None) else bool(value) if isinstance(value, bool) else value == "on"

    if weights == "auto":
        weights = "bf16" if device.type == "cpu" and cpu_has_bf16_matrix_units() else "fp32"
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS} or 'auto', not {weights!r}")
    if weights == "bf16" and device.type != "cpu":
        raise ValueError("bf16 weights are the CPU path; a GPU trains fp32 weights under bf16 autocast")
    return StepVariant(weights=weights, compile=pick(compile, device.type == "cpu"),
                       fused_head=pick(fused_head, True))


# ------------------------------------------------------------------------------------------- the loss


def hidden_states(model: DiffusionLM, tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
    """Final-normed hidden states (B, T, dim); the output layer is applied only at scored positions."""
    return model.hidden(tokens, positions, mask)[0]


def compute_losses(model: DiffusionLM, batch: dict[str, Tensor], cfg, hidden=hidden_states,
                   fused_head: bool = False) -> dict[str, Tensor]:
    """The objective and its logged parts for one packed batch; `cfg` is a TrainConfig.

    The objective is a weighted sum of per-position cross-entropies, so every scored position
    (masked canvas slots and next-token targets in the context) goes through the output layer in
    one call, with its coefficient:
      "mean" loss: 1 / (canvas slots), or pad_weight-tilted: w_i / sum(w);
      "elbo" loss: the slot's 1/(t * slots) weight / examples;
      context: ctx_loss_weight / (context targets).
    """
    dev = next(model.parameters()).device
    b = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
    h = hidden(model, b["tokens"], b["positions"], b["mask"])  # (B, T, dim)
    sel = b["targets"] >= 0  # masked canvas slots
    canvas_targets = b["targets"][sel]  # (Nc,)
    n_canvas = canvas_targets.numel()
    slot_weights = b["weights"][sel]
    n_examples = b["n_examples"].clamp(min=1).float()
    if cfg.loss == "elbo":
        coef = slot_weights / n_examples
    elif cfg.pad_weight != 1.0:
        w = torch.where(canvas_targets == T.PAD_ID, cfg.pad_weight, 1.0)
        coef = w / w.sum().clamp(min=1e-6)
    else:
        coef = torch.full((n_canvas,), 1.0 / max(1, n_canvas), device=dev)
    rows, targets, coefs = [h[sel]], [canvas_targets], [coef]
    csel = b["ctx_targets"] >= 0
    n_ctx = int(csel.sum()) if cfg.ctx_loss_weight > 0 else 0
    if n_ctx:
        rows.append(h[csel])
        targets.append(b["ctx_targets"][csel])
        coefs.append(torch.full((n_ctx,), cfg.ctx_loss_weight / n_ctx, device=dev))
    # The context head is never asked for a layout token (PAD, MASK, sentinels): leaving them out of its
    # softmax stops it pushing PAD down through the shared output layer, which the canvas needs to end
    # a middle (measured: the closing PAD's NLL went 2.5 -> 5.9 nats when the context loss weight rose
    # from 0.25 to 1.0; docs/training.md).
    banned = (n_canvas, T.NUM_SPECIAL) if n_ctx and cfg.ctx_excludes_special else (0, 0)
    objective, ce = linear_cross_entropy(torch.cat(rows), model.lm_head.weight, torch.cat(targets),
                                         torch.cat(coefs).float(), fused=fused_head, banned=banned)
    ce_canvas = ce[:n_canvas]
    out = {"canvas_loss": ce_canvas.mean(), "elbo": (ce_canvas * slot_weights).sum() / n_examples}
    if n_ctx:
        out["ctx_loss"] = ce[n_canvas:].mean()
    out["loss"] = objective
    return out


# -------------------------------------------------------------------------------------- the optimizer


def param_groups(params: list[Tensor], weight_decay: float) -> list[dict]:
    # No decay on norms (1-d): shrinking them only fights the normalisation.
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(model_or_params, cfg) -> torch.optim.AdamW:
    params = list(model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params)
    fused = params[0].is_cuda  # one kernel per step on a GPU; the plain loop on a CPU
    return torch.optim.AdamW(param_groups(params, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=fused)


class MasterWeights:
    """bf16 weights in the network, for the matrix units; fp32 copies that the optimizer updates.

    After each backward the bf16 gradients are copied into the fp32 copies' .grad, the optimizer
    steps on the copies, and the copies are rounded back into the network. The copies are in
    `model.parameters()` order, so an optimizer over them has the state layout of one over an fp32
    network: checkpoints and resumes do not depend on the variant.
    """

    def __init__(self, model: DiffusionLM):
        self.model = model
        self.master = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
        model.to(torch.bfloat16)

    def parameters(self) -> list[Tensor]:
        return self.master

    def grads_to_master(self) -> None:
        for p, m in zip(self.model.parameters(), self.master):
            m.grad = None if p.grad is None else p.grad.float()

    @torch.no_grad()
    def master_to_model(self) -> None:
        for p, m in zip(self.model.parameters(), self.master):
            p.copy_(m)

    def fp32_state(self) -> dict[str, Tensor]:
        names = [n for n, _ in self.model.named_parameters()]
        return dict(zip(names, (m.detach() for m in self.master)))


class TrainStep:
    """One optimizer step in a chosen variant; `losses` evaluates without a backward."""

    def __init__(self, model: DiffusionLM, cfg, variant: StepVariant):
        self.model, self.cfg, self.variant = model, cfg, variant
        self.master = MasterWeights(model) if variant.weights == "bf16" else None
        self.opt = make_optimizer(self.master.parameters() if self.master else model, cfg)
        self.hidden = torch.compile(hidden_states, dynamic=False) if variant.compile else hidden_states
        on_gpu = next(model.parameters()).is_cuda
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else contextlib.nullcontext

    def params(self) -> list[Tensor]:
        """What the optimizer updates (and what gradient clipping reads)."""
        return self.master.parameters() if self.master else list(self.model.parameters())

    def losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        with self.autocast():
            return compute_losses(self.model, batch, self.cfg, self.hidden, self.variant.fused_head)

    def __call__(self, batch: dict[str, Tensor], lr: float) -> tuple[dict[str, Tensor], Tensor]:
        for g in self.opt.param_groups:
            g["lr"] = lr
        losses = self.losses(batch)
        self.opt.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if self.master:
            self.master.grads_to_master()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params(), self.cfg.grad_clip)
        self.opt.step()
        if self.master:
            self.master.master_to_model()
        return losses, gnorm

    def fp32_model(self) -> DiffusionLM:
        """The network with fp32 weights, for checkpoints: the master copies when the weights are bf16."""
        if not self.master:
            return self.model
        twin = DiffusionLM(self.model.config)
        twin.load_state_dict(self.master.fp32_state(), strict=False)
        return twin

