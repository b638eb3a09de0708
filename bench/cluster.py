"""Benchmark: serving a team from Ray Serve replicas, and the capacity of one engine.

    python -m dlm_ls.bench.cluster [--model DIR] [--replicas 1,2] [--clients 4] [--seconds 20]
                                   [--batches 1,2,4,8,16] [--overhead-runs 40]

Three parts, all on line completions of real code (this repository's own Python files, the
cursor at a line's end, 60 lines before and 20 after, as an editor would send):

- batch scaling: one engine (the worker's `Scheduler`, in this process, `--threads` threads) given
  B requests at once: wall time, refinement steps, ms per step and requests/s for each B. This is
  what a replica (or a GPU) can serve, and what docs/team.md's capacity plan is computed from.
- overhead: the same warm request one at a time, alternating between the local worker on its Unix
  socket and a one-replica cluster through Serve's HTTP proxy (and a bare `ping` on each), so the
  difference is what Ray Serve adds per request.
- throughput: `--clients` editors, each on its own document, each sending its next request as soon
  as the last is answered (a closed loop: the cursor moves on by one character each time), for
  `--seconds` through a cluster of 1 and of 2 replicas: requests/s and latency p50/p95.

Writes bench/results/cluster-<cpu|cuda>.json with the machine, date, command and commit. On shared
cores the figures measure the machine too: stop other work first (the training campaign:
`kill -STOP`/`-CONT` its pid), and compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..worker.cluster import free_port
from . import common

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["lsp_server/completion.py", "lsp_server/server.py", "worker/scheduler.py", "worker/protocol.py",
           "model/prompt.py", "lsp_server/policy.py", "bench/common.py", "worker/server.py"]
BEFORE_LINES, AFTER_LINES = 60, 20


def prompts(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prefix, suffix) pairs at line ends of real code, spread over SOURCES."""
    rng = random.Random(seed)
    files = [(ROOT / p).read_text().splitlines(keepends=True) for p in SOURCES if (ROOT / p).exists()]
    out = []
    while len(out) < count:
        lines = rng.choice(files)
        row = rng.randrange(BEFORE_LINES // 2, len(lines) - 2)
        line = lines[row].rstrip("\n")
        if len(line.strip()) < 12:
            continue
        cut = len(line) - rng.randrange(3, min(12, len(line.strip())))  # mid-line: the rest of it is to write
        prefix = "".join(lines[max(0, row - BEFORE_LINES):row]) + line[:cut]
        suffix = "\n" + "".join(lines[row + 1:row + 1 + AFTER_LINES])
        out.append((prefix, suffix))
    return out


def pct(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    if not v:
        return {"count": 0}
    return {"count": len(v), "p50": round(statistics.median(v), 1), "p95": round(v[min(len(v) - 1, int(0.95 * len(v)))], 1),
            "mean": round(statistics.fmean(v), 1), "max": round(v[-1], 1)}


# --------------------------------------------------------------------------- one engine, B requests at once


def batch_scaling(model_dir: Path, device: str, threads: int, batches: list[int], reps: int) -> list[dict]:
    import threading

    from ..worker.protocol import InfillRequest
    from ..worker.scheduler import Scheduler

    sched = Scheduler(str(model_dir), device=device, threads=threads, max_jobs=max(batches), max_client_jobs=max(batches))
    sched.start()
    pool = prompts(max(batches) * (reps + 1), seed=1)
    rows = []
    try:
        for b in [1] + batches:  # the first B=1 round warms the engine up, and is not kept
            walls, steps = [], []
            for rep in range(reps):
                done = threading.Event()
                left = [b]
                lock = threading.Lock()

                def finished(result: Any, error: Any) -> None:
                    with lock:
                        left[0] -= 1
                        if left[0] == 0:
                            done.set()
                before = sched.counters["steps"]
                t0 = time.perf_counter()
                for i in range(b):
                    prefix, suffix = pool[(rep * b + i) % len(pool)]
                    owner = object()  # one editor each
                    sched.submit(owner, InfillRequest([prefix, suffix], f"b{b}.{rep}.{i}", "line"), finished)
                done.wait(600)
                walls.append((time.perf_counter() - t0) * 1000)
                steps.append(sched.counters["steps"] - before)
            rows.append({"batch": b, "wall_ms": round(statistics.median(walls), 1), "steps": statistics.median(steps),
                         "ms_per_step": round(statistics.median(w / max(1, s) for w, s in zip(walls, steps)), 2),
                         "requests_per_s": round(b / (statistics.median(walls) / 1000), 2)})
    finally:
        sched.stop()
    return rows[1:]  # drop the warm-up round


# --------------------------------------------------------------------------- a cluster, by the CLI


class ClusterRun:
    def __init__(self, model_dir: Path, replicas: int, threads: int, base: Path):
        self.env = {**os.environ, "DLM_LS_RUNTIME_DIR": str(base / f"run-{replicas}"), "RAY_USAGE_STATS_ENABLED": "0",
                    "TOKENIZERS_PARALLELISM": "false"}
        port, ray_port = free_port(), free_port()
        t0 = time.perf_counter()
        up = self._cli("cluster", "up", "--replicas", str(replicas), "--model", str(model_dir), "--device", "cpu",
                       "--threads", str(threads), "--port", str(port), "--ray-port", str(ray_port), timeout=600)
        if up.returncode != 0:
            raise common.BenchError(f"cluster up failed:\n{up.stdout}\n{up.stderr}")
        self.up_s = time.perf_counter() - t0
        self.url = up.stdout.strip().splitlines()[-1]

    def _cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dlm_ls.lsp_server.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def status(self) -> dict:
        out = self._cli("cluster", "status", "--json")
        return json.loads(out.stdout) if out.returncode == 0 else {}

    def down(self) -> None:
        self._cli("cluster", "down")


def _settings(**kw):
    from ..lsp_server.config import Settings

    settings, problems = Settings().merged(kw)
    if problems:
        raise common.BenchError("; ".join(problems))
    return settings


async def _timed(coro) -> float:
    t0 = time.perf_counter()
    await coro
    return (time.perf_counter() - t0) * 1000


async def overhead(model_dir: Path, url: str, runs: int, base: Path) -> dict:
    """The same warm request, one at a time, alternating: local socket worker, then the cluster."""
    from ..lsp_server.cluster_client import ClusterClient
    from ..lsp_server.worker_client import WorkerClient
    from ..worker.protocol import InfillRequest

    os.environ["DLM_LS_RUNTIME_DIR"] = str(base / "local")
    local = WorkerClient(_settings(model=str(model_dir), device="cpu"))
    remote = ClusterClient(_settings(worker=url))
    prefix, suffix = prompts(1, seed=2)[0]
    times: dict[str, list[float]] = {"local infill": [], "cluster infill": [], "local ping": [], "cluster ping": []}
    try:
        for i in range(3):  # warm both: model, context cache, connections
            await local.infill(InfillRequest([prefix, suffix], f"wl{i}", "line", cache_key="file:///bench.py"))
            await remote.infill(InfillRequest([prefix, suffix], f"wr{i}", "line", cache_key="file:///bench.py"))
        for i in range(runs):
            times["local infill"].append(await _timed(local.infill(
                InfillRequest([prefix, suffix], f"l{i}", "line", cache_key="file:///bench.py"))))
            times["cluster infill"].append(await _timed(remote.infill(
                InfillRequest([prefix, suffix], f"r{i}", "line", cache_key="file:///bench.py"))))
            times["local ping"].append(await _timed(local.call("ping")))
            times["cluster ping"].append(await _timed(remote.call("ping")))
    finally:
        await remote.close()
        try:
            await local.call("shutdown")
        except Exception:  # noqa: BLE001 - it is going away either way
            pass
        await local.close()
    out: dict[str, Any] = {name: pct(v) for name, v in times.items()}
    out["added_ms_p50"] = {"infill": round(out["cluster infill"]["p50"] - out["local infill"]["p50"], 1),
                           "ping": round(out["cluster ping"]["p50"] - out["local ping"]["p50"], 1)}
    return out


async def throughput(url: str, clients: int, seconds: float) -> dict:
    """`clients` closed loops, each typing in its own document, for `seconds`."""
    from ..lsp_server.cluster_client import ClusterClient
    from ..worker.protocol import InfillRequest

    starts = prompts(clients, seed=3)
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds

    async def editor(n: int) -> int:
        client = ClusterClient(_settings(worker=url))
        prefix, suffix = starts[n]
        sent = 0
        try:
            while time.perf_counter() < deadline:
                typed = prefix + "abcdefghij"[sent % 10] * (sent % 3)  # the cursor moves on a little each time
                try:
                    latencies.append(await _timed(client.infill(InfillRequest(
                        [typed, suffix], f"e{n}.{sent}", "line", cache_key=f"file:///editor{n}.py"))))
                except Exception as exc:  # noqa: BLE001 - counted, and the editor goes on
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                sent += 1
        finally:
            await client.close()
        return sent

    t0 = time.perf_counter()
    sent = await asyncio.gather(*(editor(n) for n in range(clients)))
    wall = time.perf_counter() - t0
    return {"clients": clients, "seconds": round(wall, 1), "requests": sum(sent), "errors": len(errors),
            "error_examples": errors[:3], "requests_per_s": round(len(latencies) / wall, 2), "latency_ms": pct(latencies)}


# --------------------------------------------------------------------------- the capacity plan

TEAMS = (50, 500)
ACTIVE_SHARES = (0.10, 0.25)  # developers typing at one moment: an assumption, the one the plan cannot measure
TARGET_UTILISATION = 0.7  # headroom, so that queues (and p95) stay short at the busiest moment
LOGNORMAL_MEAN = 1.063  # mean of the latency bench's lognormvariate(0, 0.35) key intervals


def typing_demand(latency: dict) -> dict:
    """Requests per second that one typing developer sends the worker, from `dlm-ls bench latency`'s run:
    its simulated editor types at `typing_ms` a key and pauses `pause_ms` to read each suggestion."""
    keys = sum(c["keystrokes"] for c in latency["contexts"])
    pauses = sum(c.get("pause_latency_ms", {}).get("count", 0) for c in latency["contexts"])
    typing_s = (keys * latency["typing_ms"] * LOGNORMAL_MEAN + pauses * latency["pause_ms"]) / 1000
    worker = latency["worker_counters"]
    return {"source": f"bench/results/latency-{latency['machine']['device']}.json ({latency['date'][:10]})",
            "typing_ms": latency["typing_ms"], "pause_ms": latency["pause_ms"], "typing_s": round(typing_s, 1),
            "worker_requests": worker["requests"], "completed": worker["completed"],
            "requests_per_s": round(worker["requests"] / typing_s, 2),
            "completed_per_s": round(worker["completed"] / typing_s, 2)}


def capacity_plan(demand: dict, engine_requests_per_s: float) -> dict:
    """Engines (replicas) for TEAMS at ACTIVE_SHARES, counting every request sent as a whole one
    (a cancelled request stops early, so this errs on the safe side)."""
    per_engine = TARGET_UTILISATION * engine_requests_per_s / demand["requests_per_s"]
    rows = [{"developers": team, "typing_at_once": share, "typing": round(team * share, 1),
             "requests_per_s": round(team * share * demand["requests_per_s"], 1),
             "engines": max(1, math.ceil(team * share / per_engine))}
            for team in TEAMS for share in ACTIVE_SHARES]
    return {"engine_requests_per_s": engine_requests_per_s, "target_utilisation": TARGET_UTILISATION,
            "typing_developers_per_engine": round(per_engine, 2), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlm_ls.bench.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: model/default)")
    p.add_argument("--device", default="cpu", help="the batch-scaling engine's device (the cluster runs on cpu here)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine and per replica (default 1)")
    p.add_argument("--replicas", default="1,2", help="cluster sizes to measure (default 1,2)")
    p.add_argument("--clients", type=int, default=4, help="simultaneous editors in the throughput part")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each throughput run")
    p.add_argument("--batches", default="1,2,4,8,16", help="requests at once in the batch-scaling part")
    p.add_argument("--reps", type=int, default=3, help="rounds per batch size")
    p.add_argument("--overhead-runs", type=int, default=40)
    p.add_argument("--skip", default="", help="parts to leave out: batch, overhead, throughput")
    p.add_argument("--out-dir", default=None, help=f"where the result goes (default: {common.RESULTS_DIR})")
    args = p.parse_args(argv)
    model_dir = common.resolve_model(args.model)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    skip = set(filter(None, args.skip.split(",")))
    result = common.header("cluster", argv, args.device, program="python -m dlm_ls.bench.cluster")
    result["model"] = {"path": common.model_label(model_dir)}
    result["sizes"] = {"threads": args.threads, "clients": args.clients, "seconds": args.seconds,
                       "before_lines": BEFORE_LINES, "after_lines": AFTER_LINES, "sources": SOURCES}
    base = Path(tempfile.mkdtemp(prefix="dlm-ls-cluster-"))
    os.chmod(base, 0o700)

    if "batch" not in skip:
        rows = batch_scaling(model_dir, args.device, args.threads, [int(b) for b in args.batches.split(",")], args.reps)
        result["batch_scaling"] = rows
        print(common.table([[r["batch"], r["wall_ms"], r["steps"], r["ms_per_step"], r["requests_per_s"]] for r in rows],
                           ["requests at once", "wall ms", "steps", "ms/step", "requests/s"]))
    result["clusters"] = []
    for replicas in [int(r) for r in args.replicas.split(",")]:
        run = ClusterRun(model_dir, replicas, args.threads, base)
        try:
            entry: dict[str, Any] = {"replicas": replicas, "up_s": round(run.up_s, 1), "url": run.url}
            if replicas == 1 and "overhead" not in skip:
                entry["overhead"] = asyncio.run(overhead(model_dir, run.url, args.overhead_runs, base))
                o = entry["overhead"]
                print(f"one request at a time, p50: local socket {o['local infill']['p50']} ms, through Ray Serve "
                      f"{o['cluster infill']['p50']} ms (+{o['added_ms_p50']['infill']} ms); ping "
                      f"{o['local ping']['p50']} vs {o['cluster ping']['p50']} ms")
            if "throughput" not in skip:
                entry["throughput"] = asyncio.run(throughput(run.url, args.clients, args.seconds))
                t = entry["throughput"]
                print(f"{replicas} replica(s), {args.clients} editors: {t['requests_per_s']} requests/s, "
                      f"p50 {t['latency_ms'].get('p50')} ms, p95 {t['latency_ms'].get('p95')} ms, errors {t['errors']}")
            status = run.status()
            entry["replicas_seen"] = [{k: r[k] for k in ("replica", "requests", "completed", "documents", "cache_hits",
                                                         "cache_misses") if k in r}
                                      for r in status.get("replicas", []) if r.get("alive")]
            result["clusters"].append(entry)
        finally:
            run.down()
    latency_file = Path(common.RESULTS_DIR) / f"latency-{common.device_kind(args.device)}.json"
    if result.get("batch_scaling") and latency_file.exists():
        demand = typing_demand(json.loads(latency_file.read_text()))
        engine = max(r["requests_per_s"] for r in result["batch_scaling"])
        plan = capacity_plan(demand, engine)
        result["capacity"] = {"demand": demand, **plan}
        print(f"one typing developer: {demand['requests_per_s']} requests/s to the worker ({demand['completed_per_s']} "
              f"run to the end), from {demand['source']}; one engine: {engine} requests/s at best, so "
              f"{plan['typing_developers_per_engine']} typing developers at {TARGET_UTILISATION:.0%} load")
        print(common.table([[r["developers"], f"{r['typing_at_once']:.0%}", r["requests_per_s"], r["engines"]]
                            for r in plan["rows"]], ["developers", "typing at once", "requests/s", "engines"]))
    result["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"wrote {common.write_result(result, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
