"""The training loop: masked-diffusion loss on canvas slots, next-token loss on the causal context.

    python -m dlm_ls.model.train.loop --preset small --out runs/cpu-small --max-minutes 100

Each step reads the packed batch of that step (`examples.Batches`: a pure function of seed and
step), so `--resume DIR` continues exactly where `DIR/latest/` left off, and `--init-from FOLDER`
starts a fresh run (step 0, new optimizer) from any checkpoint folder's weights.

Time-boxed runs: with `--max-minutes` and no `--steps`, the length of the cosine schedule is
estimated from the measured seconds per step after `estimate_after` steps (inside the warmup, where
the schedule does not yet depend on it) and re-estimated every `reestimate_every` steps, so the
learning rate reaches its floor about when the time runs out; the run stops at the time limit.
A resumed time-boxed run gets `--max-minutes` more minutes and re-aims its schedule at them.
Checkpoints (`DIR/latest/`, every `--checkpoint-minutes` and at the end) are fp32 engine folders
with `train_state.pt` beside the weights: optimizer, step, RNG states, config (tensors and plain
containers only, so `torch.load(weights_only=True)` reads it).

This module knows the network, the optimizer and checkpoint folders. It does not know how spans
are cut or how rows are packed (`examples.py`), nor how the model is sampled.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import platform
import shlex
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .. import load
from ..config import ModelConfig
from ..network import DiffusionLM
from .examples import Batches, Corpus, ExampleConfig, StepBatches
from .neighbours import NeighbourConfig, Neighbours
from .step import TrainStep, compute_losses, hidden_states, make_optimizer, resolve_variant  # noqa: F401 (the loss's home)


@dataclass
class TrainConfig:
    preset: str = "small"
    corpus: str = "data/corpus"  # holds train.jsonl and validation.jsonl
    tokenizer: str = "data/tokenizer.json"
    out: str = "runs/train"
    seq_len: int = 512
    batch_size: int = 8
    steps: int = 0  # 0: as many as --max-minutes allows (estimated from the measured step time)
    max_minutes: float = 0.0  # 0: no time limit (then --steps is required)
    lr: float = 2e-3  # a small model with few steps tolerates a high peak
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # "mean": mean cross-entropy over masked slots. "elbo": the MDLM/LLaDA bound, sum of CE over masked
    # slots x 1/t / canvas slots, averaged over examples. Both have the same optimum; the 1/t weight
    # makes an example with t = 0.01 count 100x, a high-variance gradient that a short, small-batch
    # CPU run can ill afford, so "mean" is the default (as in several diffusion LM codebases' finetunes).
    loss: str = "mean"
    ctx_loss_weight: float = 0.25  # next-token loss on context positions: almost free (the context is causal)
    # Weight of canvas slots whose target is PAD in the "mean" loss (1: plain mean). A short middle in
    # a 32-slot canvas is mostly PAD, easy slots that can dominate the loss of an undertrained model
    # (docs/training.md); below 1 tilts the loss toward the middle's real tokens. The logged
    # canvas_loss stays the plain mean, so runs with different weights compare.
    pad_weight: float = 1.0
    ctx_fraction: float = 0.25  # share of context positions scored: each costs a vocab-wide output row
    # The context head's softmax leaves out the layout tokens (never its targets), so it does not push
    # down the PAD that the canvas must predict to end a middle (model/train/step.py, docs/training.md).
    ctx_excludes_special: bool = True
    # Share of single-hole examples that try for a cross-file preamble (chunks of other files of the
    # package, formatted as the server's extra context; train/neighbours.py). 0 turns it off.
    neighbour_prob: float = 0.4
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8
    eval_seed: int = 12345
    checkpoint_minutes: float = 10.0
    log_every: int = 10
    estimate_after: int = 20  # steps before the schedule length is estimated (must be <= warmup)
    reestimate_every: int = 50
    # CPU threads. On a 2-core machine shared with other jobs, 1 thread measured 1400 tokens/s against
    # 790 for 2 (small preset, 512 x 4): OpenMP workers spin-wait when a core is taken from them.
    threads: int = 2
    # Processes that build training batches ahead of the step (tokenizing, tree-sitter spans,
    # cross-file chunks). 0: the training process builds each batch itself, which is fine on a CPU
    # (under 0.1 s of a 2.5 s step) and the bottleneck on a GPU.
    loader_workers: int = 0
    device: str = "auto"
    # How the step runs (model/train/step.py; `dlm-ls bench train` times each). "auto": what that
    # benchmark measured fastest on this kind of device, chosen in step.resolve_variant.
    weights: str = "auto"  # "fp32" | "bf16" (bf16 weights, fp32 master weights and optimizer; CPUs with AMX)
    compile: str = "auto"  # "on" | "off": torch.compile the backbone
    fused_head: str = "auto"  # "on" | "off": output layer + cross-entropy per chunk of rows
    init_seed: int = 0
    resume: str = ""
    init_from: str = ""

    def example_config(self) -> ExampleConfig:
        return ExampleConfig(seq_len=self.seq_len, batch_size=self.batch_size, ctx_fraction=self.ctx_fraction)


# ------------------------------------------------------------------------------------------- schedule


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


# ----------------------------------------------------------------------------------------- checkpoints


def _checkpoint_dir(path: str) -> Path:
    p = Path(path)
    return p / "latest" if (p / "latest" / "config.json").exists() else p


def load_weights_into(model: DiffusionLM, folder: Path) -> None:
    state = load.read_weights(folder)
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (model.config.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise load.CheckpointError(f"{folder}: weights do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")


def save_state(train_step: TrainStep, step: int, total: int, cfg: TrainConfig, out: Path, tokens_seen: int) -> Path:
    """Write out/latest/ (an engine-loadable fp32 checkpoint plus train_state.pt), replacing the old one whole.

    Whatever the step's variant, the weights are fp32 and the optimizer's state is over fp32
    parameters in `model.parameters()` order, so a run resumes in any variant.
    """
    tmp, final, old = out / "latest.tmp", out / "latest", out / "latest.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tok = cfg.tokenizer if Path(cfg.tokenizer).exists() else None
    load.save_checkpoint(train_step.fp32_model(), tmp, tokenizer_file=tok, dtype=torch.float32)
    state = {
        "step": step,  # the next step to run
        "total_steps": total,
        "tokens_seen": tokens_seen,
        "optimizer": train_step.opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "config": dataclasses.asdict(cfg),
    }
    torch.save(state, tmp / "train_state.pt")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)  # a crash leaves latest/ or latest.old/ whole
    shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------------ run


def _hardware(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def _log(out: Path, record: dict) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


@torch.no_grad()
def evaluate(train_step: TrainStep, batches: list[dict[str, Tensor]]) -> dict[str, float]:
    model = train_step.model
    model.eval()
    sums: dict[str, float] = {}
    for b in batches:
        for k, v in train_step.losses(b).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    model.train()
    return {f"val_{k}": v / len(batches) for k, v in sums.items()}


def _train_batches(cfg: TrainConfig, tokenizer, ecfg: ExampleConfig, first_step: int, dev: torch.device):
    """(step, batch) from first_step on: built here, or by cfg.loader_workers DataLoader workers."""
    make = functools.partial(_batches, Path(cfg.corpus) / "train.jsonl", tokenizer, ecfg, cfg.seed, cfg.neighbour_prob)
    if cfg.loader_workers > 0:
        yield from torch.utils.data.DataLoader(StepBatches(make, first_step), batch_size=None,
                                               num_workers=cfg.loader_workers, pin_memory=dev.type == "cuda",
                                               prefetch_factor=4)
    else:
        batches = make()
        yield from ((step, batches.batch(step)) for step in itertools.count(first_step))


def _batches(path: Path, tokenizer, ecfg: ExampleConfig, seed: int, neighbour_prob: float) -> Batches:
    corpus = Corpus(path)
    neighbours = Neighbours(corpus, NeighbourConfig(prob=neighbour_prob)) if neighbour_prob > 0 else None
    return Batches(corpus, tokenizer, ecfg, seed=seed, neighbours=neighbours)


def train(cfg: TrainConfig, tokenizer=None, progress: bool = True, command: str | None = None) -> dict:
    """Run (or continue) a training run; returns the last logged record. `command` is how it was
    started, for the log and the data card (default: this process's arguments)."""
    if not cfg.steps and not cfg.max_minutes:
        raise ValueError("give --steps or --max-minutes")
    if cfg.loss not in ("mean", "elbo"):
        raise ValueError(f"loss must be 'mean' or 'elbo', not {cfg.loss!r}")
    dev = load.resolve_device(cfg.device)
    if dev.type == "cpu":
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(cfg.tokenizer)

    state = None
    if cfg.resume:
        folder = _checkpoint_dir(cfg.resume)
        state = torch.load(folder / "train_state.pt", weights_only=True)
        saved_seed = (state.get("config") or {}).get("seed")
        if saved_seed is not None and saved_seed != cfg.seed:  # the data position is (seed, step): keep the run's
            print(f"resuming with the run's own --seed {saved_seed} (not {cfg.seed}), so its data order goes on",
                  file=sys.stderr)
            cfg = dataclasses.replace(cfg, seed=saved_seed)
        model_cfg = load.load_config(folder)
    elif cfg.init_from:
        folder = _checkpoint_dir(cfg.init_from)
        model_cfg = load.load_config(folder)
    else:
        model_cfg = ModelConfig.preset(cfg.preset, vocab_size=max(ModelConfig.preset(cfg.preset).vocab_size,
                                                                  tokenizer.get_vocab_size()))
    # the weights will have seen rows this long (and, when continued, whatever they saw before)
    model_cfg = dataclasses.replace(model_cfg, trained_context=max(cfg.seq_len, model_cfg.trained_context or 0))
    if tokenizer.get_vocab_size() > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, the model {model_cfg.vocab_size}")
    model = DiffusionLM(model_cfg).init_weights(cfg.init_seed)
    if cfg.resume or cfg.init_from:
        load_weights_into(model, folder)
    model.to(dev).train()
    variant = resolve_variant(cfg.weights, cfg.compile, cfg.fused_head, dev)
    train_step = TrainStep(model, cfg, variant)
    step, total, tokens_seen = 0, cfg.steps, 0
    if state is not None:
        train_step.opt.load_state_dict(state["optimizer"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        total = cfg.steps or state["total_steps"]  # an explicit --steps may lengthen a finished run
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_as_tuple(state["python_rng"]))


    ecfg = cfg.example_config()
    corpus = Path(cfg.corpus)
    train_batches = _train_batches(cfg, tokenizer, ecfg, step, dev)
    val_source = _batches(corpus / "validation.jsonl", tokenizer, ecfg, cfg.eval_seed, cfg.neighbour_prob)
    val = [val_source.batch(i) for i in range(cfg.eval_batches)] if cfg.eval_batches else []

    t_start = time.monotonic()
    deadline = t_start + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
    if not total:
        total = 10**9  # placeholder inside the warmup; estimated at estimate_after
    first_step, mark = step, None
    last_ckpt = time.monotonic()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total if cfg.steps else None, initial=step, dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
    record: dict = {}
    start = {"event": "start", "step": step, "params": sum(p.numel() for p in model.parameters()),
             "device": str(dev), "step_variant": variant.name, "command": command or "dlm-ls train " + shlex.join(sys.argv[1:]),
             "hardware": _hardware(dev), "config": dataclasses.asdict(cfg)}
    print(json.dumps(start), flush=True)
    _log(out, start)  # the data card reads the run's origin from here
    stop = _StopSignals()
    while True:
        now = time.monotonic()
        if (cfg.steps and step >= total) or now >= deadline or stop.received:
            break
        # Time-boxed runs: fix the schedule length from the measured rate, and refresh it as load changes.
        if not cfg.steps and cfg.max_minutes:
            done = step - first_step
            if done == cfg.estimate_after:
                mark = (now, step)
            elif mark is not None and done > cfg.estimate_after and done % cfg.reestimate_every == 0:
                rate = (now - mark[0]) / (step - mark[1])  # seconds per step, eval and checkpoints included
                total = step + int((deadline - now) / rate)
            if mark is not None and total == 10**9:
                total = step + int((deadline - now) / max(1e-3, (now - t_start) / max(1, done)))
        lr = lr_at(step, total, cfg)
        got, batch = next(train_batches)
        if got != step:  # the loader's order is the data position: a mismatch would break exact resume
            raise RuntimeError(f"batch for step {got} arrived at step {step}")
        losses, gnorm = train_step(batch, lr)
        step += 1
        tokens_seen += batch["tokens"].numel()
        record = {"step": step, "time": round(time.monotonic() - t_start, 2), "lr": lr, "tokens": tokens_seen,
                  **{k: round(float(v.detach()), 5) for k, v in losses.items()}, "grad_norm": round(float(gnorm), 4),
                  "total_steps": total}
        if cfg.eval_every and val and (step % cfg.eval_every == 0 or step == cfg.steps):
            record.update({k: round(v, 5) for k, v in evaluate(train_step, val).items()})
        if step % cfg.log_every == 0 or "val_loss" in record or step <= 5:
            _log(out, record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
        if cfg.checkpoint_minutes and time.monotonic() - last_ckpt >= 60 * cfg.checkpoint_minutes:
            save_state(train_step, step, total, cfg, out, tokens_seen)
            last_ckpt = time.monotonic()
    stop.restore()
    train_batches.close()  # stops the loader's workers
    if bar is not None:
        bar.close()
    if cfg.eval_batches and val and "val_loss" not in record:
        record.update({k: round(v, 5) for k, v in evaluate(train_step, val).items()})
    record["final"] = True
    if stop.received:
        record["stopped_by"] = stop.received
    _log(out, record)
    save_state(train_step, step, total, cfg, out, tokens_seen)
    print(json.dumps({"event": "done", **record}), flush=True)
    return record


class _StopSignals:
    """SIGTERM or SIGINT ends a run after its current step, with the usual final eval and checkpoint.

    A session's end or a plain `kill` then costs nothing (without it, everything since the last
    periodic checkpoint was lost); `--resume` continues from that step exactly.
    """

    def __init__(self):
        self.received: str | None = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():  # signals go to the main thread only
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._note)

    def _note(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _as_tuple(x):
    """random.setstate wants tuples; a state that went through torch.save may hold lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="dlm-ls train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif f.name in ("compile", "fused_head"):  # `--compile` alone means on
            p.add_argument(flag, nargs="?", const="on", default=f.default, choices=("auto", "on", "off"))
        elif f.name == "weights":
            p.add_argument(flag, default=f.default, choices=("auto", "fp32", "bf16"))
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=kind, default=f.default)
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)  # `dlm-ls train` passes what follows "train"
    train(parse_args(args), command="dlm-ls train " + shlex.join(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
