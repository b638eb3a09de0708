"""`dlm-ls bench quality|latency|ratio|step|all`: the benchmarks behind every figure in the README.

  quality  exact match, parse rate, pass@1 of `parallel` and `ar` on held-out and execution tasks
  ratio    parallel against ar on the same tasks in one run: quality delta, NFE and wall-clock
           ratios, and a commit-threshold sweep -> bench/results/quality_speed.png
  step     the engine's step latency against context length and canvas length
  latency  end to end through `dlm-ls serve` and its worker: typing replayed by a scripted client
  ceilings the device's memory bandwidth and matrix rate, the floor of a refinement step they
           imply, and the model's measured step at a 2k-token context against it
  large    a 7B-class architecture with random weights (GPU-sized; --layers shrinks it for a CPU):
           single-line and 64-token infill after a 2k context, parallel and ar, against the floor
  all      quality, ratio, step, latency and ceilings; quality and ratio share one run over the tasks
  train    the training step (forward, backward, optimizer) in each variant: fp32, fused head,
           compiled, bf16 weights; threads and batch sizes (`dlm-ls bench train --help`)

Each prints a table and writes bench/results/<benchmark>-<cpu|cuda>.json with the machine, the
date, the command and the git commit. Sizes default to what fits `make bench` on the device
(CPU: under 15 minutes on two cores, a subset of tasks; GPU: every task); --quick is a smoke run.
The model is model/default (the shipped one) unless --model is given.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import common
from .ceilings import ARCHS
from .common import BenchError

BENCHMARKS = ("quality", "ratio", "step", "latency", "ceilings")
# Sizes per device. CPU figures are sized for `make bench` in under 15 minutes on two cores.
SIZES: dict[str, dict[str, Any]] = {
    "cpu": {"limit": 8, "exec_limit": 16, "thresholds": [0.5, 0.7, 0.9, 0.99], "max_steps_sweep": [],
            "contexts": [128, 512, 2048], "canvases": [1, 8, 32, 128], "reps": 8,
            "latency_contexts": [256, 1024, 4096], "lines": 3, "startup_runs": 5, "max_tokens": None},
    "cuda": {"limit": None, "exec_limit": None, "thresholds": [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99],
             "max_steps_sweep": [2, 4, 8], "contexts": [128, 512, 2048], "canvases": [1, 8, 32, 128],
             "reps": 30, "latency_contexts": [256, 1024, 4096], "lines": 4, "startup_runs": 10, "max_tokens": None},
    "quick": {"limit": 2, "exec_limit": 2, "thresholds": [0.5, 0.9], "max_steps_sweep": [],
              "contexts": [64, 128], "canvases": [1, 8], "reps": 2, "latency_contexts": [256], "lines": 1,
              "startup_runs": 1, "max_tokens": None},
}


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlm-ls bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("benchmark", choices=[*BENCHMARKS, "large", "all", "train"])
    p.add_argument("--model", default=None, help="checkpoint folder (default: model/default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: the GPU when there is one)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in this process")
    p.add_argument("--captured-step", action="store_true",
                   help="step and latency: replay the refinement step as a CUDA graph (model/captured.py)")
    p.add_argument("--out-dir", default=None, help=f"where results go (default: {common.RESULTS_DIR})")
    p.add_argument("--quick", action="store_true", help="a smoke run: a handful of tasks, short sweeps")
    g = p.add_argument_group("quality and ratio")
    g.add_argument("--limit", type=int, default=None, help="held-out tasks per kind (line, block, span)")
    g.add_argument("--all-tasks", action="store_true", help="every held-out and execution task, whatever the device")
    g.add_argument("--exec-limit", type=int, default=None, help="execution functions (3 holes each)")
    g.add_argument("--thresholds", type=_floats, default=None, help="commit thresholds to sweep, e.g. 0.5,0.7,0.9")
    g.add_argument("--max-steps-sweep", type=_ints, default=None, help="max steps to sweep, e.g. 2,4,8")
    g.add_argument("--tasks", default=None, help="held-out task file (default: bench/tasks/heldout.jsonl)")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="cap every middle at this many tokens (smoke runs; default: per task kind)")
    g = p.add_argument_group("step")
    g.add_argument("--contexts", type=_ints, default=None, help="context lengths in tokens, e.g. 128,512,2048")
    g.add_argument("--canvases", type=_ints, default=None, help="canvas lengths, e.g. 1,8,32,128 (1 = the ar step)")
    g.add_argument("--reps", type=int, default=None, help="timed steps per cell")
    g = p.add_argument_group("latency")
    g.add_argument("--latency-contexts", type=_ints, default=None, help="context tokens, e.g. 256,1024,4096")
    g.add_argument("--lines", type=int, default=None, help="lines typed per context")
    g.add_argument("--startup-runs", type=int, default=None)
    g.add_argument("--full-context", action="store_true",
                   help="let the model see the whole context, past its own budget (how a step scales)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("ceilings and large")
    g.add_argument("--arch", default="7b", choices=sorted(ARCHS), help="the large architecture (default 7b)")
    g.add_argument("--layers", type=int, default=None, help="large: keep only this many layers (a CPU smoke run)")
    g.add_argument("--large-context", type=int, default=2048, help="large: context tokens before the hole")
    return p


def sizes(args: argparse.Namespace, device: str) -> dict[str, Any]:
    base = dict(SIZES["quick" if args.quick else common.device_kind(device)])
    if args.all_tasks:
        base.update(limit=None, exec_limit=None)
    for key in base:
        value = getattr(args, key, None)
        if value is not None:
            base[key] = value
    return base


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Session:
    """What the benchmarks of one command share: the model, the sizes, the argv."""

    def __init__(self, args: argparse.Namespace, argv: list[str]):
        self.args, self.argv = args, argv
        self.model_dir = common.resolve_model(args.model)
        common.set_threads(args.threads)
        self.device = resolve_device(args.device)
        self.sizes = sizes(args, self.device)
        self._infiller = None
        self.model_info: dict[str, Any] | None = None

    @property
    def infiller(self):
        if self._infiller is None:
            from ..model.infill import Infiller

            # the model's own context budget: quality is measured as the server would run it
            self._infiller = Infiller(self.model_dir, device=self.device, dtype=self.args.dtype,
                                      captured_step=self.args.captured_step)
            info = self._infiller.info()
            self.model_info = {"parameters": info["parameters"], "dtype": info["dtype"], "sampler": info["sampler"]}
        return self._infiller

    def release(self) -> None:
        self._infiller = None
        gc.collect()

    def header(self, benchmark: str) -> dict[str, Any]:
        h = common.header(benchmark, self.argv, self.device)
        h["model"] = {"path": common.model_label(self.model_dir)}
        if self.model_info is not None:
            h["model"].update(self.model_info)
        else:  # the model was not loaded here (latency: it lives in the worker); its size from config.json
            from ..model.config import ModelConfig

            cfg = ModelConfig.from_dict(json.loads((self.model_dir / "config.json").read_text()))
            h["model"]["parameters"] = cfg.num_parameters()
        h["sizes"] = self.sizes
        return h

    def write(self, result: dict[str, Any]) -> Path:
        path = common.write_result(result, self.args.out_dir)
        print(f"wrote {path}")
        return path


def _progress(label: str):
    t0 = time.perf_counter()
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.perf_counter() - t0
        if done == total or now - last[0] > 15:
            last[0] = now
            print(f"  {label}: {done}/{total} tasks, {now:.0f} s", file=sys.stderr, flush=True)
    return report


def run_quality_and_ratio(s: Session, want: set[str]) -> None:
    from ..model.train.evaluate import DEFAULT_TASKS, Config
    from . import quality, ratio
    from .execution import network_isolation

    inf = s.infiller
    z = s.sizes
    kwargs = {"task_file": s.args.tasks} if s.args.tasks else {}
    tasks = quality.load_tasks(z["limit"], z["exec_limit"], **kwargs)
    configs = [Config("parallel", "parallel"), Config("ar", "ar")]
    if "ratio" in want:
        configs += ratio.sweep_configs(z["thresholds"], z["max_steps_sweep"], inf.defaults.threshold)
    if z["max_tokens"]:
        for c in configs:
            c.overrides["max_tokens"] = z["max_tokens"]
    print(f"quality/ratio: {len(tasks)} tasks x {len(configs)} settings on {s.device}", file=sys.stderr)
    t0 = time.perf_counter()
    summary, records = quality.run(inf, tasks, configs, _progress("tasks"))
    seconds = time.perf_counter() - t0
    task_info = {"heldout": sum(not t.kind.startswith("exec-") for t in tasks),
                 "exec": sum(t.kind.startswith("exec-") for t in tasks),
                 "task_file": common.model_label(Path(s.args.tasks or DEFAULT_TASKS)),
                 "packages": sorted({t.package for t in tasks if not t.kind.startswith("exec-")})}
    if "quality" in want:
        sub = {k: v for k, v in summary.items() if k in ("parallel", "ar")}
        print(quality.format_quality(sub))
        result = {**s.header("quality"), "tasks": task_info, "sandbox": {"network_isolation": network_isolation()},
                  "seconds": seconds, "summary": sub,
                  "records": [r.to_dict() for r in records if r.config in ("parallel", "ar")]}
        s.write(result)
    if "ratio" in want:
        settings = {c.name: _setting(c, inf.defaults) for c in configs}
        r = ratio.ratios(summary)
        points = ratio.curve(summary, settings)
        eq = ratio.at_equal_quality(points)
        out_dir = Path(s.args.out_dir) if s.args.out_dir else common.RESULTS_DIR
        png = ratio.plot(points, out_dir / "quality_speed.png",
                         f"{common.model_label(s.model_dir)} on {s.device}: {len(tasks)} tasks")
        print(ratio.format_ratio(r, eq, points))
        compact = {c: {g: st for g, st in kinds.items() if g in ("all", "heldout", "exec")}
                   for c, kinds in summary.items()}
        result = {**s.header("ratio"), "tasks": task_info, "seconds": seconds, "ratio": r, "at_equal_quality": eq,
                  "curve": points, "settings": settings, "plot": common.model_label(png), "summary": compact}
        s.write(result)
        print(f"wrote {png}")


def _setting(c, defaults) -> dict[str, Any]:
    """What a config ran with: its strategy, and for `parallel` its threshold and max steps."""
    if c.strategy != "parallel":
        return {"strategy": c.strategy, "threshold": None, "max_steps": None}
    return {"strategy": c.strategy, "threshold": c.overrides.get("threshold", defaults.threshold),
            "max_steps": c.overrides.get("max_steps", defaults.max_steps)}


def run_step(s: Session) -> None:
    from . import step

    z = s.sizes
    print(f"step: contexts {z['contexts']} x canvases {z['canvases']}, {z['reps']} timed steps each", file=sys.stderr)
    res = step.measure(s.infiller, z["contexts"], z["canvases"], z["reps"])
    print(step.format_step(res))
    s.write({**s.header("step"), **res})


def run_latency(s: Session) -> None:
    import asyncio

    from . import latency

    s.release()  # the model lives in the worker now; keep this process light
    z = s.sizes
    print(f"latency: contexts {z['latency_contexts']}, {z['lines']} lines typed each", file=sys.stderr)
    extra = {"capturedStep": True} if s.args.captured_step else None
    res = asyncio.run(latency.run_latency(s.model_dir, tuple(z["latency_contexts"]), z["lines"], s.args.seed,
                                          s.device, z["startup_runs"], extra, s.args.full_context))
    print(latency.format_latency(res))
    s.write({**s.header("latency"), **res})


def run_ceilings(s: Session) -> dict[str, Any]:
    import torch

    from . import ceilings

    dev = torch.device(s.device)
    quick = s.args.quick
    c = ceilings.measure_ceilings(dev, copy_mib=32 if quick else None, matmul_n=256 if quick else None,
                                  reps=3 if quick else 10)
    print(ceilings.format_ceilings(c))
    context = 128 if quick else 2048
    rows = ceilings.model_step_vs_floor(s.infiller, c, context, (1, 16, 32), reps=2 if quick else 10)
    print(common.table([[r["context"], r["canvas"], r["step_ms"], r["floor_ms"], r["floor_memory_ms"],
                         r["floor_compute_ms"], r["x_floor"]] for r in rows],
                       ["context", "canvas", "step ms", "floor ms", "memory", "compute", "x floor"]))
    s.write({**s.header("ceilings"), "ceilings": c, "model_step": rows})
    return c


def run_large(s: Session, c: dict[str, Any] | None) -> None:
    import torch

    from ..model.config import ModelConfig
    from . import ceilings

    dev = torch.device(s.device)
    if c is None:
        c = ceilings.measure_ceilings(dev, reps=5)
        print(ceilings.format_ceilings(c))
    arch = dict(ARCHS[s.args.arch])
    if s.args.layers:
        arch["n_layers"] = s.args.layers
    cfg = ModelConfig(**arch)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(s.args.dtype or "", torch.bfloat16)
    print(f"large: {s.args.arch} with {cfg.n_layers} layers, {cfg.num_parameters() / 1e9:.2f}B parameters, "
          f"{dtype}, context {s.args.large_context}", file=sys.stderr)
    res = ceilings.measure_large(cfg, dev, dtype, c, s.args.large_context, reps=2 if s.args.quick else 5)
    print(f"prefill of {res['context']} tokens: {res['prefill_ms']:.1f} ms (floor {res['prefill_floor_ms']:.1f} ms)")
    print(common.table([[r["case"], r["strategy"], r["tokens"], r["nfe"], r["latency_ms"], r["tokens_per_s"],
                         r["floor_ms"], r["x_floor"], r.get("speedup_vs_ar")] for r in res["rows"]],
                       ["case", "strategy", "tokens", "NFE", "latency ms", "tokens/s", "floor ms", "x floor",
                        "x faster than ar"]))
    h = common.header("large", s.argv, s.device)
    h["model"] = {"path": f"random {s.args.arch}" + (f", {cfg.n_layers} layers" if s.args.layers else "")}
    s.write({**h, "ceilings": c, **res})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the training step: its own arguments (corpus, preset, variants)
        from . import train

        try:
            return train.main(argv[1:])
        except BenchError as exc:
            print(f"dlm-ls bench train: {exc}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        s = Session(args, argv)
    except BenchError as exc:
        print(f"dlm-ls bench: {exc}", file=sys.stderr)
        return 2
    want = set(BENCHMARKS) if args.benchmark == "all" else {args.benchmark}
    t0 = time.perf_counter()
    if want & {"quality", "ratio"}:
        run_quality_and_ratio(s, want)
    if "step" in want:
        run_step(s)
    if "latency" in want:
        run_latency(s)
    c = run_ceilings(s) if "ceilings" in want else None
    if args.benchmark == "large":
        run_large(s, c)
    print(f"dlm-ls bench {args.benchmark}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
