"""`dlm-ls bench train`: the full training step (forward, backward, optimizer) in each variant, side by side.

    dlm-ls bench train                       # small preset, batch 6 x 512, threads 1 and 2
    dlm-ls bench train --preset tiny --corpus DIR --tokenizer FILE --steps 2 --quick

Variants (model/train/step.py): today's fp32 eager path; fused output layer + cross-entropy; the
backbone compiled; bf16 weights with fp32 master weights and optimizer state, eager and compiled;
each at every `--threads` and `--batch-sizes`. All of them start from the same initial weights and
take the same real batches (built from the corpus, as training builds them), so besides its speed
each row reports the loss after its timed steps: a variant that computes something else shows there.

The bf16 rows run only where the CPU multiplies bf16 in hardware (AMX or AVX512-BF16); elsewhere a
probe times one bf16 and one fp32 matrix product and the rows say why they were skipped (an emulated
bf16 step takes minutes). Writes bench/results/train-<cpu|cuda>.json with a `rows` list (`name`,
`tokens_per_s`, ...). Knows the training step and the batch builder; nothing of the engine.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

from . import common

DEFAULT_VARIANTS = ("fp32-eager", "fp32-eager-fused", "fp32-compiled", "fp32-compiled-fused", "bf16-eager-fused",
                    "bf16-compiled-fused")


def variant_of(label: str):
    from ..model.train.step import StepVariant

    parts = label.split("-")
    if len(parts) not in (2, 3) or parts[0] not in ("fp32", "bf16") or parts[1] not in ("eager", "compiled") \
            or (len(parts) == 3 and parts[2] != "fused"):
        raise common.BenchError(f"unknown variant {label!r}: write WEIGHTS-MODE[-fused], e.g. fp32-compiled-fused")
    return StepVariant(weights=parts[0], compile=parts[1] == "compiled", fused_head=len(parts) == 3)


def matmul_rates(n: int = 256, reps: int = 5) -> dict[str, float]:
    """GFLOP/s of an n x n matrix product in fp32 and in bf16 on this CPU (the probe behind skipping bf16)."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(2):  # first calls pay for allocation and thread start-up
            a @ b
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        out[name] = round(2 * n**3 * reps / (time.perf_counter() - t) / 1e9, 2)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlm-ls bench train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--corpus", default="data/corpus", help="folder with train.jsonl (see `dlm-ls corpus`)")
    p.add_argument("--tokenizer", default=None, help="default: the shipped model's tokenizer")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-sizes", default="6", help="comma-separated rows per step")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated; WEIGHTS-MODE[-fused]")
    p.add_argument("--ctx-fraction", type=float, default=1.0, help="share of context positions scored")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps first (a compiled step compiles here, and once more when its caches fill)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", default=None, help=f"where results go (default: {common.RESULTS_DIR})")
    return p


def _batches(args, tokenizer, batch_size: int, n: int):
    from ..model.train.examples import Batches, Corpus, ExampleConfig

    ecfg = ExampleConfig(seq_len=args.seq_len, batch_size=batch_size, ctx_fraction=args.ctx_fraction)
    source = Batches(Corpus(Path(args.corpus) / "train.jsonl"), tokenizer, ecfg, seed=0)
    return [source.batch(i) for i in range(n)]


def time_variant(label: str, base_model, batches, threads: int, warmup: int, device) -> dict:
    import torch

    from ..model.train.loop import TrainConfig
    from ..model.train.step import TrainStep

    torch.set_num_threads(threads)
    variant = variant_of(label)
    model = copy.deepcopy(base_model).to(device).train()
    step = TrainStep(model, TrainConfig(lr=1e-3, ctx_loss_weight=1.0), variant)
    times, losses = [], []
    t_first = None
    for i, batch in enumerate(batches):
        t = time.perf_counter()
        out, _ = step(batch, lr=1e-3)
        loss = float(out["loss"].detach())
        common.sync(device)
        dt = time.perf_counter() - t
        t_first = dt if t_first is None else t_first
        if i >= warmup:
            times.append(dt)
            losses.append(loss)
    tokens = batches[0]["tokens"].numel()
    median = statistics.median(times)
    return {"name": f"{variant.name}, {threads} thread{'s' if threads > 1 else ''}, batch {batches[0]['tokens'].shape[0]}",
            "variant": label, "threads": threads, "batch_size": batches[0]["tokens"].shape[0],
            "tokens_per_step": tokens, "tokens_per_s": round(tokens / median), "step_s": round(median, 3),
            "step_s_min": round(min(times), 3), "first_step_s": round(t_first, 2), "loss_after": round(losses[-1], 4)}


def main(argv: list[str] | None = None) -> int:
    import torch

    from ..model.config import ModelConfig
    from ..model.network import DiffusionLM
    from ..model.train.step import cpu_has_bf16_matrix_units

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    tok_path = args.tokenizer or str(common.DEFAULT_MODEL_DIR / "tokenizer.json")
    if not (Path(args.corpus) / "train.jsonl").exists():
        raise SystemExit(f"no corpus at {args.corpus}: build one with `dlm-ls corpus --out {args.corpus}`")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tok_path)
    cfg = ModelConfig.preset(args.preset)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=tokenizer.get_vocab_size())
    base = DiffusionLM(cfg).init_weights(0)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        variant_of(v)
    rates = matmul_rates()
    bf16_hw = device.type == "cpu" and cpu_has_bf16_matrix_units()
    result = {**common.header("train", ["train", *argv], str(device)), "preset": args.preset,
              "parameters": base.config.num_parameters(), "seq_len": args.seq_len, "ctx_fraction": args.ctx_fraction,
              "matmul_gflops_256": rates, "bf16_matrix_units": bf16_hw, "rows": [], "skipped": []}
    print(f"matrix product 256^3: fp32 {rates['fp32']} GFLOP/s, bf16 {rates['bf16']} GFLOP/s; "
          f"bf16 matrix units: {'yes' if bf16_hw else 'no'}", flush=True)
    for bs in [int(x) for x in args.batch_sizes.split(",") if x]:
        batches = _batches(args, tokenizer, bs, args.warmup + args.steps)
        for threads in [int(x) for x in args.threads.split(",") if x]:
            for label in variants:
                if label.startswith("bf16") and not bf16_hw:
                    why = (f"this CPU has no bf16 matrix units (AMX-BF16 / AVX512-BF16): bf16 matrix products are "
                           f"emulated, {rates['bf16']} GFLOP/s against {rates['fp32']} in fp32")
                    if label not in {s["variant"] for s in result["skipped"]}:
                        result["skipped"].append({"variant": label, "why": why})
                    continue
                row = time_variant(label, base, batches, threads, args.warmup, device)
                result["rows"].append(row)
                print(f"{row['name']:55s} {row['tokens_per_s']:7d} tokens/s  step {row['step_s']:.3f} s  "
                      f"loss after {row['loss_after']:.4f}", flush=True)
    plain = {(r["threads"], r["batch_size"]): r["tokens_per_s"] for r in result["rows"] if r["variant"] == "fp32-eager"}
    for r in result["rows"]:
        ref = plain.get((r["threads"], r["batch_size"]))
        r["vs_fp32_eager"] = round(r["tokens_per_s"] / ref, 2) if ref else None
    print(common.table([[r["name"], r["tokens_per_s"], r["vs_fp32_eager"], r["loss_after"]] for r in result["rows"]],
                       ["variant", "tokens/s", "x fp32 eager", "loss after"]))
    for s in result["skipped"]:
        print(f"skipped {s['variant']}: {s['why']}")
    path = common.write_result(result, args.out_dir)
    print(f"wrote {path}")
    return 0
