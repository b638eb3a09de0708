"""Benchmark: how long a killed worker costs, and how long a worker takes to start.

    python -m dlm_ls.bench.recovery [--runs 5] [--startup-runs 5] [--model DIR]

Recovery: a client (the server's own `WorkerClient`) completes one line, the worker is killed with
SIGKILL after the first refinement step of the next one, and the time runs from the kill to that
completion's answer (the client retries it once on whichever worker then serves). Beside it: when
a worker first answers on the socket again, and the worker's own time for the retried completion
and for the completion before the kill. Each run is made twice, in turn: with the standby spare
(worker/standby.py, the default) and with a first worker started with `--no-spare`, so that the
client starts a new one. Startup: spawn to the first ping answered, and the model load the worker
reports.

Writes bench/results/recovery-<cpu|cuda>.json with the machine, date, command and commit. The
machine's load average is recorded: on shared cores, the figures measure the machine too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import common

# One line completed with the model's own sampler settings (sampler.json), as the editor asks.
SEGMENTS = ["def mean(values):\n    total = sum(values)\n    return ", "\n\n\nprint(mean([1, 2, 3]))\n"]


def _stats(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {"p50": round(statistics.median(v), 1), "min": round(v[0], 1), "max": round(v[-1], 1), "count": len(v)}


async def _one_recovery(model_dir: Path, device: str, spare: bool, run_dir: Path) -> dict[str, Any]:
    from ..lsp_server.config import Settings
    from ..lsp_server.worker_client import WorkerClient
    from ..worker.protocol import InfillRequest

    settings, problems = Settings().merged({"model": str(model_dir), "device": device})
    if problems:
        raise common.BenchError("; ".join(problems))
    os.environ["DLM_LS_RUNTIME_DIR"] = str(run_dir)
    client = WorkerClient(settings)
    first = None
    if not spare:  # the first worker without a spare: after the kill, the client starts a new one (as before spares)
        first = _start_worker(client, ["--no-spare"])
    try:
        warm = await client.infill(InfillRequest(SEGMENTS, id="warm", mode="line"))
        status = await client.status()
        killed = status["pid"]
        seen_step = asyncio.Event()
        request = asyncio.ensure_future(client.infill(InfillRequest(SEGMENTS, id="killed", mode="line", stream=True),
                                                      on_step=lambda update: seen_step.set()))
        await asyncio.wait_for(seen_step.wait(), 120)
        t0 = time.perf_counter()
        os.kill(killed, signal.SIGKILL)
        serving = asyncio.get_running_loop().run_in_executor(None, _until_alive, client.endpoint.socket, killed)
        result = await asyncio.wait_for(request, 300)
        recovery_ms = (time.perf_counter() - t0) * 1000
        takeover_ms = (await serving - t0) * 1000
        after = await client.status()
        if after["pid"] == killed or not result.middles:
            raise common.BenchError("the completion after the kill did not come from a new worker")
        return {"recovery_ms": recovery_ms, "takeover_ms": takeover_ms, "first_completion_ms": result.total_ms,
                "warm_completion_ms": warm.total_ms, "served_by": "spare" if after["pid"] == status.get("spare_pid") else "new worker",
                "load_s": after.get("load_s")}
    finally:
        with _suppress():
            await client.call("shutdown")
        await client.close()
        if first is not None:
            first.wait(30)


def _until_alive(sock: Path, killed: int) -> float:
    """When a worker other than the killed one first answers on the socket (perf_counter)."""
    from ..worker.protocol import alive as _alive

    while not (_alive(sock) and _pid_file(sock) != killed):
        time.sleep(0.005)
    return time.perf_counter()


def _pid_file(sock: Path) -> int | None:
    try:
        return int(sock.with_suffix(".pid").read_text())
    except (OSError, ValueError):
        return None


def _start_worker(client, flags: list[str]) -> subprocess.Popen:
    ep, s = client.endpoint, client.settings
    from ..worker.protocol import ensure_private_dir

    ensure_private_dir(ep.socket.parent)
    proc = subprocess.Popen([sys.executable, "-m", "dlm_ls.lsp_server.cli", "worker", "--model", str(client.model_dir),
                             "--device", s.device, "--socket", str(ep.socket), *flags],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from ..worker.protocol import alive as _alive

    deadline = time.monotonic() + 300
    while not _alive(ep.socket):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise common.BenchError(f"the worker did not start (status {proc.poll()})")
        time.sleep(0.05)
    return proc


async def _one_startup(model_dir: Path, device: str, run_dir: Path) -> dict[str, Any]:
    from ..lsp_server.config import Settings
    from ..lsp_server.worker_client import WorkerClient

    os.environ["DLM_LS_RUNTIME_DIR"] = str(run_dir)
    settings, _ = Settings().merged({"model": str(model_dir), "device": device})
    client = WorkerClient(settings)
    t0 = time.perf_counter()
    try:
        await client.connection()
        ready_ms = (time.perf_counter() - t0) * 1000
        status = await client.status()
        return {"ready_ms": ready_ms, "load_s": status.get("load_s")}
    finally:
        with _suppress():
            await client.call("shutdown")
        await client.close()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], Exception)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlm_ls.bench.recovery", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: model/default)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    p.add_argument("--runs", type=int, default=5, help="kills per variant")
    p.add_argument("--startup-runs", type=int, default=5)
    p.add_argument("--out-dir", default=None, help=f"where the result goes (default: {common.RESULTS_DIR})")
    args = p.parse_args(argv)
    model_dir = common.resolve_model(args.model)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = common.header("recovery", argv, args.device, program="python -m dlm_ls.bench.recovery")
    result["model"] = {"path": common.model_label(model_dir)}
    base = Path(tempfile.mkdtemp(prefix="dlm-ls-recovery-"))
    os.chmod(base, 0o700)

    startups = [asyncio.run(_one_startup(model_dir, args.device, base / f"s{i}")) for i in range(args.startup_runs)]
    result["startup_ms"] = _stats([r["ready_ms"] for r in startups])
    result["load_s"] = _stats([r["load_s"] * 1000 for r in startups if r.get("load_s") is not None])
    result["variants"] = {}
    variants = {"spare": True, "no spare": False}
    by_variant: dict[str, list[dict]] = {name: [] for name in variants}
    for i in range(args.runs):  # in turn, so that the machine's drift falls on both alike
        for name, spare in variants.items():
            by_variant[name].append(asyncio.run(_one_recovery(model_dir, args.device, spare, base / f"{name[0]}{i}")))
    for name, runs in by_variant.items():
        result["variants"][name] = {"recovery_ms": _stats([r["recovery_ms"] for r in runs]),
                                    "takeover_ms": _stats([r["takeover_ms"] for r in runs]),
                                    "first_completion_ms": _stats([r["first_completion_ms"] for r in runs]),
                                    "warm_completion_ms": _stats([r["warm_completion_ms"] for r in runs]),
                                    "served_by": sorted({r["served_by"] for r in runs})}
    result["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]

    print(f"worker start to first ping answered: {result['startup_ms']['p50']:.0f} ms p50 of {args.startup_runs} "
          f"(model load {result['load_s']['p50']:.0f} ms of it)")
    print(common.table([[name, v["recovery_ms"]["p50"], v["recovery_ms"]["min"], v["recovery_ms"]["max"],
                         v["takeover_ms"]["p50"], ", ".join(v["served_by"])] for name, v in result["variants"].items()],
                       ["kill -9 to next completion", "p50 ms", "min ms", "max ms", "answering p50 ms", "served by"]))
    print(f"wrote {common.write_result(result, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
