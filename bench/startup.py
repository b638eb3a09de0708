"""Benchmark: time from starting `dlm-ls serve` to its answer to `initialize`.

This is what an editor waits for before anything works. Two cases, in turn:

- a first start: a fresh cache folder, so neither the attrs code cache (cli.py) nor a kept answer
  to `initialize` (early.py) exists, as for a new client, project or version;
- a repeat start: the same `initialize` again, with the cache the earlier starts left.

The server must not import torch on this path; the benchmark checks that too, through `dlm/status`
on the last run.

    python -m dlm_ls.bench.startup [--runs 10] [--out-dir bench/results]

Prints a table and writes bench/results/startup-cpu.json with the machine, date, command and
commit. CPU time of the server process is reported beside the wall time, since wall time on a
busy machine measures the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
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


def one_run(command: list[str], with_status: bool = False, env: dict[str, str] | None = None) -> dict:
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"processId": os.getpid(), "rootUri": None,
                       "capabilities": {"textDocument": {"inlineCompletion": {}}}}}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
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


def _summary(runs: list[dict]) -> dict:
    wall = sorted(r["wall_ms"] for r in runs)
    cpu = sorted(r["cpu_ms"] for r in runs)
    return {"wall_ms": {"p50": round(statistics.median(wall), 1), "min": round(wall[0], 1), "max": round(wall[-1], 1),
                        "p90": round(wall[min(len(wall) - 1, int(0.9 * len(wall)))], 1)},
            "cpu_ms": {"p50": round(statistics.median(cpu), 1), "min": round(cpu[0], 1), "max": round(cpu[-1], 1)},
            "runs": len(runs)}


def main(argv: list[str] | None = None) -> int:
    from dlm_ls.bench import common  # the header and file every benchmark writes (torch-free)

    p = argparse.ArgumentParser(prog="python -m dlm_ls.bench.startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10, help="starts of each kind")
    p.add_argument("--out-dir", default=None, help=f"where the result goes (default: {common.RESULTS_DIR})")
    p.add_argument("--python", default=sys.executable,
                   help="the interpreter whose dlm-ls is started (another checkout's venv, to compare; default: this one)")
    args = p.parse_args(argv)
    # No model: the worker is not part of this measure, and `dlm/status` must not start one.
    command = [args.python, "-m", "dlm_ls.lsp_server.cli", "serve", "--model", "/nonexistent/dlm-ls-bench"]
    base = Path(tempfile.mkdtemp(prefix="dlm-ls-startup-"))
    os.chmod(base, 0o700)
    clean = {k: v for k, v in os.environ.items() if k != "DLM_LS_NO_CODE_CACHE"}

    def in_cache(folder: Path) -> dict[str, str]:
        return {**clean, "XDG_CACHE_HOME": str(folder)}

    one_run(command, env=in_cache(base / "repeat"))  # fills the repeat starts' cache, warms the page cache
    first, repeat = [], []
    for i in range(args.runs):  # in turn, so that the machine's drift falls on both alike
        first.append(one_run(command, env=in_cache(base / f"first-{i}")))
        repeat.append(one_run(command, with_status=(i == args.runs - 1), env=in_cache(base / "repeat")))
    result = common.header("startup", argv, "cpu", program="python -m dlm_ls.bench.startup")
    result.update({"what": "process start to the initialize response read by the client",
                   "first_start": _summary(first), "repeat_start": _summary(repeat),
                   "torch_loaded": repeat[-1]["torch_loaded"]})
    result["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"{'':<18}{'p50':>9}{'min':>9}{'max':>9}   (ms, {args.runs} runs each, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    for name in ("first_start", "repeat_start"):
        for kind in ("wall_ms", "cpu_ms"):
            f = result[name][kind]
            print(f"{name.replace('_', ' ') + ' ' + kind[:-3]:<18}{f['p50']:>9.0f}{f['min']:>9.0f}{f['max']:>9.0f}")
    print(f"torch imported by the server: {result['torch_loaded']}")
    print(f"wrote {common.write_result(result, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
