"""What every benchmark shares: where results go, what each result records, how the model is found.

Every result is one JSON file under `bench/results/` (committed), named `<benchmark>-<device>.json`
so a CPU and a GPU result sit side by side. Each holds, besides its figures, the machine, the
date, the command that made it and the git commit it ran on, so a number in the README can
always be traced to a run (`bench/report.py` builds the README table from these files).

Knows files, git and the machine; knows nothing of what a benchmark measures.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout, in an editable install
# Results belong to the checkout; from an installed wheel they go under the current directory.
RESULTS_DIR = (REPO_ROOT if (REPO_ROOT / "pyproject.toml").exists() else Path.cwd()) / "bench" / "results"
DEFAULT_MODEL_DIR = REPO_ROOT / "model" / "default"  # the shipped model (model/default)


class BenchError(Exception):
    """A benchmark that cannot run as asked; the message says what to do."""


def resolve_model(model: str | None) -> Path:
    """The checkpoint folder: `--model`, else the shipped model/default."""
    path = Path(model) if model else DEFAULT_MODEL_DIR
    if not (path / "config.json").exists():
        if model:
            raise BenchError(f"no checkpoint at {path} (expected config.json there)")
        raise BenchError(f"the shipped model is not at {DEFAULT_MODEL_DIR} yet: pass --model DIR "
                         "(e.g. --model runs/cpu-small/latest)")
    return path.resolve()


def model_label(path: Path) -> str:
    """A short, stable name for tables: the path relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | None = None) -> dict[str, Any]:
    """The machine a result was measured on (the GPU when the benchmark ran on one)."""
    # No host name: results are committed.
    info: dict[str, Any] = {"os": f"{platform.system()} {platform.release()}",
                            "python": platform.python_version(), "cpu": _cpu_model(), "cpus": os.cpu_count(),
                            "load_average": [round(x, 2) for x in os.getloadavg()]}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    info["device"] = device
    try:
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
        info["memory_gib"] = round(int(mem[1]) / (1 << 20), 1)
    except (OSError, IndexError, ValueError):
        pass
    return info


def device_kind(device: str) -> str:
    """"cpu" or "cuda": the suffix of a result file."""
    return "cuda" if str(device).startswith("cuda") else "cpu"


def sync(device) -> None:
    """Wait for the GPU, so that a wall-clock timing covers the work and not just its launch."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def header(benchmark: str, argv: list[str] | None, device: str, program: str = "dlm-ls bench") -> dict[str, Any]:
    """What every result file starts with; `program` is the command the arguments were given to."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return {"benchmark": benchmark,
            "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "command": f"{program} {shlex.join(argv)}",
            "git": git_info(), "machine": machine_info(device)}


def write_result(result: dict[str, Any], out_dir: str | Path | None = None) -> Path:
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result['benchmark']}-{device_kind(result['machine'].get('device') or 'cpu')}.json"
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False, default=_jsonable) + "\n")
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, (set, tuple)):
        return list(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def table(rows: list[list[Any]], head: list[str]) -> str:
    """A plain right-aligned text table (the first column left-aligned)."""
    cells = [[str(h) for h in head]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(c: Any) -> str:
    if c is None:
        return "-"
    if isinstance(c, float):
        return f"{c:.3f}" if abs(c) < 10 else f"{c:.1f}" if abs(c) < 1000 else f"{c:.0f}"
    return str(c)
