"""`dlm-ls bench step`: the engine's refinement step latency against context and canvas length.

For each context length (tokens of real held-out code, cached once) and each canvas length, a
job refines one canvas row with threshold 1.0 (one slot committed per step, so the canvas stays
the same size step after step) and `Engine.step` is timed: warm-up steps first, then the median
and p90 of the rest. Canvas length 1 is the `ar` step, so the table shows what a step over C
slots costs against a one-token step: the heart of the speed argument (a wide step is
nearly free on a GPU, less so on a CPU). Context prefill time is reported per context length.

Knows the engine's job API and token ids; knows nothing of text beyond encoding the source once.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Sequence

from ..model.config import SamplerConfig
from . import latency
from .common import sync, table


def _context(infiller, length: int) -> list[int]:
    from ..model import layout

    text = json.loads(latency.LATENCY_FILE.read_text())["text"]
    ids = infiller.encode(text)
    while len(ids) < length:
        ids = ids + ids
    return layout.single_hole_context(ids[: length - 3], [])  # <|suf|> <|pre|> prefix <|mid|>


def measure(infiller, contexts: Sequence[int], canvases: Sequence[int], reps: int = 10, warmup: int = 2) -> dict:
    engine = infiller.engine
    # Timing only: contexts past the model's trained budget cost the same as any others, so the
    # engine's limit is lifted for the measurement (and put back).
    limit = engine.max_context_tokens
    engine.max_context_tokens = max(limit, max(contexts))
    try:
        return _measure(infiller, contexts, canvases, reps, warmup)
    finally:
        engine.max_context_tokens = limit


def _measure(infiller, contexts: Sequence[int], canvases: Sequence[int], reps: int, warmup: int) -> dict:
    engine = infiller.engine
    dev = engine.device
    rows = []
    for L in contexts:
        ctx = _context(infiller, L)
        key = f"bench-step:{L}"
        sync(dev)
        t0 = time.perf_counter()
        engine.prefill(key, ctx)
        sync(dev)
        prefill_ms = (time.perf_counter() - t0) * 1000.0
        for C in canvases:
            opts = SamplerConfig(strategy="parallel", threshold=1.0, max_steps=C + 1, block_size=C,
                                 canvas_lengths=(C,), max_tokens=C)
            times: list[float] = []
            job = None
            for i in range(warmup + reps):
                if job is None or job.done:
                    job = engine.start(ctx, opts, key)
                sync(dev)
                t0 = time.perf_counter()
                engine.step([job])
                sync(dev)
                if i >= warmup:
                    times.append((time.perf_counter() - t0) * 1000.0)
            if not job.done:
                job.cancel()
            times.sort()
            rows.append({"context": L, "canvas": C, "steps": len(times), "prefill_ms": prefill_ms,
                         "median_ms": statistics.median(times),
                         "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
                         "min_ms": times[0]})
    by = {(r["context"], r["canvas"]): r for r in rows}
    for r in rows:  # what a C-slot step costs against the one-slot (ar) step at the same context
        base = by.get((r["context"], 1))
        r["vs_ar_step"] = r["median_ms"] / base["median_ms"] if base and base["median_ms"] else None
        r["ms_per_slot"] = r["median_ms"] / r["canvas"]
    return {"rows": rows, "reps": reps, "warmup": warmup}


def format_step(result: dict) -> str:
    rows = [[r["context"], r["canvas"], r["median_ms"], r["p90_ms"], r["ms_per_slot"], r["vs_ar_step"], r["prefill_ms"]]
            for r in result["rows"]]
    return table(rows, ["context", "canvas", "step ms (p50)", "p90", "ms/slot", "x ar step", "prefill ms"])
