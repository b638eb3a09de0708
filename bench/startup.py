"""Benchmark: time from starting `dlm-ls serve` to its answer to `initialize`.

This is what an editor waits for before anything works. The server must not import torch on
this path; the benchmark checks that too, through `dlm/status` on the last run.

    python -m dlm_ls.bench.startup [--runs 10] [--out .bench/startup.json]

Prints a table and writes a machine-readable result. CPU time of the server process is
reported beside the wall time, since wall time on a busy machine measures the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _frame(obj: dict) -> bytes:
    body = json.dumps(obj).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def _read_message(stream) -> dict:
    length = 0
    while True:
        line = stream.readline()
        if not line:
            raise RuntimeError("the server closed its output before answering")
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
        elif line in (b"\r\n", b"\n") and length:
            return json.loads(stream.read(length))


def _read_response(stream, msg_id: int) -> dict:
    while True:
        msg = _read_message(stream)
        if msg.get("id") == msg_id:
            return msg


def one_run(command: list[str], with_status: bool = False) -> dict:
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"processId": os.getpid(), "rootUri": None,
                       "capabilities": {"textDocument": {"inlineCompletion": {}}}}}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdin.write(_frame(init))
    proc.stdin.flush()
    response = _read_response(proc.stdout, 1)
    wall_ms = (time.perf_counter() - t0) * 1000
    if "result" not in response:
        raise RuntimeError(f"initialize failed: {response}")
    torch_loaded = None
    if with_status:
        proc.stdin.write(_frame({"jsonrpc": "2.0", "id": 2, "method": "dlm/status", "params": {}}))
        proc.stdin.flush()
        status = _read_response(proc.stdout, 2).get("result", {})
        torch_loaded = status.get("server", {}).get("torch_loaded")
    proc.stdin.write(_frame({"jsonrpc": "2.0", "id": 3, "method": "shutdown", "params": None}))
    proc.stdin.write(_frame({"jsonrpc": "2.0", "method": "exit", "params": None}))
    proc.stdin.flush()
    proc.stdin.close()
    proc.wait(timeout=30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_ms = ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) * 1000
    return {"wall_ms": wall_ms, "cpu_ms": cpu_ms, "torch_loaded": torch_loaded}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlm_ls.bench.startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--out", default=".bench/startup.json")
    args = p.parse_args(argv)
    # No model: the worker is not part of this measure, and `dlm/status` must not start one.
    command = [sys.executable, "-m", "dlm_ls.lsp_server.cli", "serve", "--model", "/nonexistent/dlm-ls-bench"]
    one_run(command)  # warm the page cache; not counted
    runs = [one_run(command, with_status=(i == args.runs - 1)) for i in range(args.runs)]
    wall = sorted(r["wall_ms"] for r in runs)
    cpu = sorted(r["cpu_ms"] for r in runs)
    result = {
        "benchmark": "lsp_server start to initialize response",
        "runs": args.runs, "command": command,
        "wall_ms": {"p50": statistics.median(wall), "min": wall[0], "max": wall[-1],
                    "p90": wall[min(len(wall) - 1, int(0.9 * len(wall)))]},
        "cpu_ms": {"p50": statistics.median(cpu), "min": cpu[0], "max": cpu[-1]},
        "torch_loaded": runs[-1]["torch_loaded"],
        "load_average": os.getloadavg(), "cpus": os.cpu_count(), "python": platform.python_version(),
    }
    print(f"{'':<8}{'p50':>9}{'min':>9}{'max':>9}   (ms, {args.runs} runs, load average "
          f"{result['load_average'][0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"{'wall':<8}{result['wall_ms']['p50']:>9.0f}{wall[0]:>9.0f}{wall[-1]:>9.0f}")
    print(f"{'cpu':<8}{result['cpu_ms']['p50']:>9.0f}{cpu[0]:>9.0f}{cpu[-1]:>9.0f}")
    print(f"torch imported by the server: {result['torch_loaded']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
