"""Execution-based infill tasks: punch holes in hand-written functions, run their tests on the completions.

`exec_tasks()` turns `tasks/exec_tasks.py` (functions with a `check()` test each, written for this
repository) into infill tasks, three per function (a line, a block, a span; see that file for how
holes are named). `run_program(source, test)` runs the program with its test in a fresh Python
subprocess: in a temporary directory, isolated mode (`-I -S`: no site-packages, no PYTHON* variables),
with a timeout, memory, CPU-time and file-size limits, sockets disabled by a prelude and, where
the machine allows it, no network namespace at all (`unshare -n`).

Knows programs and subprocesses; knows nothing of models.
"""

from __future__ import annotations

import functools
import os
import runpy
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..model.train.evaluate import Task

TASK_FILE = Path(__file__).resolve().parent / "tasks" / "exec_tasks.py"
TIMEOUT_S = 5.0  # every test runs in milliseconds; a punched-out loop update can spin forever
MEMORY_BYTES = 1 << 30
FILE_BYTES = 16 << 20
# Sockets fail inside the program even where no network namespace can be made.
PRELUDE = '''import socket as _socket


def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in dlm-ls benchmarks")


class _NoSocket(_socket.socket):
    def __init__(self, *args, **kwargs):
        _no_network()


_socket.socket = _NoSocket
_socket.create_connection = _socket.getaddrinfo = _socket.socketpair = _no_network
del _socket
'''


@dataclass
class RunResult:
    passed: bool
    status: str  # passed | failed | timeout
    detail: str = ""  # the last line of stderr, when it failed


def _limits() -> None:  # runs in the child between fork and exec
    import resource

    for what, value in ((resource.RLIMIT_AS, MEMORY_BYTES), (resource.RLIMIT_FSIZE, FILE_BYTES),
                        (resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, int(TIMEOUT_S) + 1)):
        try:
            resource.setrlimit(what, (value, value))
        except (ValueError, OSError):
            pass


@functools.lru_cache(maxsize=1)
def network_isolation() -> list[str]:
    """A command prefix that runs a program without network interfaces, or [] where none works."""
    for prefix in (["unshare", "-rn"], ["unshare", "-n"]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.SubprocessError):
            continue
    return []


def run_program(source: str, test: str, timeout_s: float = TIMEOUT_S) -> RunResult:
    """Run `source` followed by `test` and a call of `check()`; passed when it exits 0."""
    program = PRELUDE + "\n\n" + source + "\n\n" + test + "\n\ncheck()\n"
    with tempfile.TemporaryDirectory(prefix="dlm-ls-exec-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [*network_isolation(), sys.executable, "-I", "-S", str(path)]  # -S: no site, 4x faster start
        try:
            proc = subprocess.run(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout_s, preexec_fn=_limits, start_new_session=True)
        except subprocess.TimeoutExpired:
            return RunResult(False, "timeout", f"no exit within {timeout_s:g} s")
    if proc.returncode == 0:
        return RunResult(True, "passed")
    err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    return RunResult(False, "failed", err[-1] if err else f"exit status {proc.returncode}")


def _hole(source: str, kind: str, spec) -> tuple[int, int]:
    """Character offsets [start, end) of the middle a hole spec names in `source`."""
    lines = source.split("\n")
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)

    def find_line(text: str) -> int:
        hits = [i for i, line in enumerate(lines) if line.strip() == text]
        if len(hits) != 1:
            raise ValueError(f"line {text!r} occurs {len(hits)} times; a hole needs exactly one")
        return hits[0]

    if kind == "line":
        i = find_line(spec)
        indent = len(lines[i]) - len(lines[i].lstrip())
        return starts[i] + indent, starts[i] + len(lines[i].rstrip())
    if kind == "block":
        first, last = find_line(spec[0]), find_line(spec[1])
        if last < first:
            raise ValueError(f"block {spec!r} ends before it starts")
        indent = len(lines[first]) - len(lines[first].lstrip())
        return starts[first] + indent, starts[last] + len(lines[last].rstrip())
    if kind == "span":
        if source.count(spec) != 1:
            raise ValueError(f"span {spec!r} occurs {source.count(spec)} times; a hole needs exactly one")
        start = source.index(spec)
        return start, start + len(spec)
    raise ValueError(f"unknown hole kind {kind!r}")


@functools.lru_cache(maxsize=4)
def _load(path: str) -> list[dict]:
    return runpy.run_path(path)["TASKS"]


def exec_tasks(path: str | Path = TASK_FILE) -> list[Task]:
    """Three tasks (exec-line, exec-block, exec-span) per function in the task file, in file order."""
    from ..model.train.evaluate import MAX_TOKENS_OF_KIND, MODE_OF_KIND

    out = []
    for spec in _load(str(path)):
        src = spec["source"]
        for kind in ("line", "block", "span"):
            s, e = _hole(src, kind, spec["holes"][kind])
            k = f"exec-{kind}"
            out.append(Task(f"{k}-{spec['name']}", k, src[:s], src[s:e], src[e:], MODE_OF_KIND[k],
                            MAX_TOKENS_OF_KIND[kind], "dlm-ls", "bench/tasks/exec_tasks.py", "Apache-2.0",
                            {"test": spec["test"], "name": spec["name"]}))
    return out


def passes(task: Task, middle: str, timeout_s: float = TIMEOUT_S) -> RunResult:
    return run_program(task.prefix + middle + task.suffix, task.extra["test"], timeout_s)
