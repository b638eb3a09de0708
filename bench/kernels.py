"""Time each kernel against its PyTorch reference, at the shapes a refinement step has.

    python -m dlm_ls.bench.kernels [--json results.json] [--quick]

Shapes follow a 7B Dream-family model (28 query heads, 4 kv heads, head dim 128, vocabulary
151936) and our default model (vocabulary 16384). On a GPU it times both implementations with
`triton.testing.do_bench` (median of many launches, caches flushed); on a CPU it says that the
Triton timings need a GPU and times the reference alone. It prints a table and, with --json,
writes the rows for the README's numbers. It is a benchmark, not a test: it checks nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Callable

import torch

from ..kernels import canvas_attention as ca
from ..kernels import select_commit as sc


def _time_cpu(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _time_gpu(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100))


def cases(device: str, dtype: torch.dtype, quick: bool) -> list[tuple[str, str, Callable, Callable]]:
    """(op, shape, reference thunk, triton thunk) for each benchmarked configuration."""
    g = torch.Generator(device=device).manual_seed(0)
    out = []

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dt)

    vocab = [(64, 16384), (256, 16384)] + ([] if quick else [(32, 151936), (256, 151936)])
    for n, v in vocab:
        logits = randn(n, v) * 4
        out.append(("select_commit", f"N={n} V={v} T=0", lambda x=logits: sc.select_commit_reference(x, 0.9),
                    lambda x=logits: sc.select_commit_triton(x, 0.9)))
    n, v = vocab[-1]
    logits = randn(n, v) * 4
    gen = torch.Generator(device=device).manual_seed(1)
    out.append(("select_commit", f"N={n} V={v} T=0.7", lambda x=logits: sc.select_commit_reference(x, 0.9, 0.7, gen),
                lambda x=logits: sc.select_commit_triton(x, 0.9, 0.7, gen)))

    H, hkv, D = 28, 4, 128
    attn = [(1, 32, 2048), (4, 32, 2048)] + ([] if quick else [(1, 256, 8192), (4, 64, 8192), (8, 32, 16384)])
    for B, T, S in attn:
        q = randn(B, H, T, D)
        segments = [(randn(1, hkv, S, D), randn(1, hkv, S, D)), (randn(B, hkv, T, D), randn(B, hkv, T, D))]
        mask = torch.ones(B, 1, T, S + T, dtype=torch.bool, device=device)
        mask[:, :, :, S - 100: S] = False  # a dense mask: the general case the kernel reads
        for name, m in (("mask", mask), ("all", None)):
            out.append(("canvas_attention", f"B={B} T={T} S={S} {name}",
                        lambda q=q, s=segments, m=m: ca.canvas_attention_reference(q, s, m),
                        lambda q=q, s=segments, m=m: ca.canvas_attention_triton(q, s, m)))

    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--quick", action="store_true", help="the small shapes only")
    ap.add_argument("--reps", type=int, default=5, help="CPU repetitions per reference timing")
    args = ap.parse_args(argv)

    gpu = torch.cuda.is_available() and sc.triton is not None
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    if gpu:
        where = torch.cuda.get_device_name()
    else:
        where = platform.processor() or platform.machine()
        print("no CUDA GPU (or no triton): Triton timings need a GPU; timing the PyTorch references on the CPU",
              file=sys.stderr)
    rows = []
    with torch.inference_mode():
        for op, shape, ref, tri in cases(device, dtype, args.quick or not gpu):
            ref_ms = _time_gpu(ref) if gpu else _time_cpu(ref, args.reps)
            tri_ms = _time_gpu(tri) if gpu else None
            rows.append({"op": op, "shape": shape, "dtype": str(dtype).removeprefix("torch."), "device": where,
                         "reference_ms": round(ref_ms, 4), "triton_ms": None if tri_ms is None else round(tri_ms, 4),
                         "speedup": None if tri_ms is None else round(ref_ms / tri_ms, 2)})
    print(f"{'op':<17} {'shape':<28} {'dtype':<9} {'reference ms':>13} {'triton ms':>10} {'speedup':>8}")
    for r in rows:
        tri = "-" if r["triton_ms"] is None else f"{r['triton_ms']:.4f}"
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        print(f"{r['op']:<17} {r['shape']:<28} {r['dtype']:<9} {r['reference_ms']:>13.4f} {tri:>10} {sp:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
