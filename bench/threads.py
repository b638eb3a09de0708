"""Benchmark: a completion's latency on the CPU against torch's thread count, on a quiet machine and
beside one busy core (a build, a training run, the editor itself).

    python -m dlm_ls.bench.threads [--model DIR] [--threads 1,2] [--reps 8]

For each thread count, line completions of the shipped model at one cursor are timed (after a
warm-up), first alone, then while a second process spins on one core. The worker's default thread
count (`worker/config.py`, `default_cpu_threads`) is chosen from this: on two cores, two threads are
a little faster alone and many times slower beside a busy core, because each small op waits for the
thread that lost its core. Writes bench/results/threads-cpu.json.

Knows the Infiller's text API; nothing of the worker or the server.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time

from . import common

SEGMENTS = ["def mean(values):\n    total = sum(values)\n    return ", "\n\n\nprint(mean([1, 2, 3]))\n"]


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def _time_completions(infiller, reps: int) -> list[float]:
    infiller.complete(SEGMENTS, mode="line")  # warm-up: first-call allocations are not the question
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        infiller.complete(SEGMENTS, mode="line")
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def measure(model_dir, thread_counts: list[int], reps: int) -> list[dict]:
    import torch

    from ..model.infill import Infiller

    infiller = Infiller(model_dir=str(model_dir), device="cpu")
    rows = []
    for neighbour in ("quiet", "one busy core"):
        stop = multiprocessing.Event()
        spinner = None
        if neighbour != "quiet":
            spinner = multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
            spinner.start()
            time.sleep(0.2)
        try:
            for threads in thread_counts:
                torch.set_num_threads(threads)
                times = sorted(_time_completions(infiller, reps))
                rows.append({"threads": threads, "neighbour": neighbour, "reps": reps,
                             "p50_ms": round(statistics.median(times), 1), "min_ms": round(times[0], 1),
                             "max_ms": round(times[-1], 1)})
        finally:
            if spinner is not None:
                stop.set()
                spinner.join(5)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlm_ls.bench.threads", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: the shipped model)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--out-dir", default=None, help=f"where the result goes (default: {common.RESULTS_DIR})")
    args = p.parse_args(argv)
    try:
        model_dir = common.resolve_model(args.model)
    except common.BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = measure(model_dir, [int(t) for t in args.threads.split(",")], args.reps)
    result = {**common.header("threads", argv, "cpu", program="python -m dlm_ls.bench.threads"),
              "model": {"path": common.model_label(model_dir)}, "rows": rows}
    print(common.table([[r["threads"], r["neighbour"], r["p50_ms"], r["min_ms"], r["max_ms"]] for r in rows],
                       ["threads", "beside", "p50 ms", "min ms", "max ms"]))
    print(f"wrote {common.write_result(result, args.out_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
