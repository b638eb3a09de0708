"""`dlm-ls eval`: run the held-out infill tasks (model/train/evaluate.py) on a checkpoint, print the
table and the quality target, and write the result file with its provenance, as every benchmark does.

Knows the command line and result files; the tasks, measures and records are evaluate.py's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..model.train import evaluate as E
from ..model.train.evaluate import (DEFAULT_SEED, DEFAULT_TASKS, KINDS, STRATEGIES, Task, cut_tasks, default_configs,
                                    format_table, format_target, group_summaries, likelihood, read_corpus, read_tasks,
                                    run_tasks, select, target_check, write_tasks)
from .common import header


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlm-ls eval", description="Infill quality on held-out code, for the parallel and the ar strategy.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Measures: " + E.__doc__.split("Measures, per task:")[1].split("\n\nKnows")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: model/default, the shipped model)")
    p.add_argument("--tasks", default=None, help=f"task file (JSON Lines; default {DEFAULT_TASKS.name}, cached)")
    p.add_argument("--corpus", default=None, help="cut tasks afresh from this corpus folder instead (e.g. data/corpus)")
    p.add_argument("--split", default="test", help="corpus split to cut from (default: test)")
    p.add_argument("--per-kind", type=int, default=100, help="tasks per kind when cutting (default 100)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--write-tasks", default=None, metavar="PATH", help="write the cut tasks here and exit")
    p.add_argument("--kinds", default="line,block", help="comma-separated: line, block, span (default line,block)")
    p.add_argument("--limit", type=int, default=None, help="at most this many tasks per kind")
    p.add_argument("--strategies", default="parallel,ar", help="comma-separated: parallel, ar")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="write the summary and per-task records here (JSON)")
    return p


def _progress(done: int, total: int) -> None:
    if sys.stderr.isatty():
        print(f"\r{done}/{total} tasks", end="", file=sys.stderr, flush=True)


def load_or_cut(args) -> list[Task]:
    if args.corpus:
        kinds = [k for k in KINDS if k in args.kinds.split(",")] if not args.write_tasks else list(KINDS)
        return cut_tasks(read_corpus(args.corpus, args.split), args.per_kind, args.seed, kinds)
    return read_tasks(args.tasks or DEFAULT_TASKS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tasks = load_or_cut(args)
    if args.write_tasks:
        write_tasks(tasks, args.write_tasks)
        counts = {k: sum(t.kind == k for t in tasks) for k in KINDS}
        print(f"wrote {len(tasks)} tasks to {args.write_tasks}: {counts}")
        return 0
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    tasks = select(tasks, kinds, args.limit)
    if not tasks:
        print(f"dlm-ls eval: no tasks of kinds {kinds}", file=sys.stderr)
        return 2
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for s in strategies:
        if s not in STRATEGIES:
            print(f"dlm-ls eval: unknown strategy {s!r}", file=sys.stderr)
            return 2

    from ..model.infill import Infiller
    from ..model.load import DEFAULT_MODEL_DIR

    if args.model is None and not (DEFAULT_MODEL_DIR / "config.json").exists():
        print(f"dlm-ls eval: the shipped model is not at {DEFAULT_MODEL_DIR} yet: pass --model DIR", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    infiller = Infiller(args.model, device=args.device, dtype=args.dtype)
    overrides = {"threshold": args.threshold, "max_steps": args.max_steps}
    configs = default_configs(strategies, **overrides)
    t0 = time.perf_counter()
    records = run_tasks(infiller, tasks, configs, progress=_progress)
    print(f"\r{len(tasks)} tasks x {len(configs)} strategies in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    summaries = group_summaries(records)
    print(f"model {infiller.model_dir} ({infiller.info()['parameters']:,} parameters, {infiller.info()['device']})")
    print(format_table(summaries))
    target = target_check(summaries)
    if target:
        print(format_target(target))
    nll = likelihood(infiller, tasks)
    print("true middle, nats per token: " + ", ".join(f"{k} {v['nll_per_token']:.3f}" for k, v in nll.items()))
    print("  its tokens without the closing PAD: " + ", ".join(f"{k} {v['middle_nll_per_token']:.3f}" for k, v in nll.items())
          + "; the closing PAD: " + ", ".join(f"{k} {v['end_nll']:.2f}" for k, v in nll.items()))
    print("  its tokens by the context's next-token head: "
          + ", ".join(f"{k} {v['context_head_nll_per_token']:.3f}" for k, v in nll.items()))
    if args.out:
        out = {**header("eval", argv, infiller.info()["device"], "dlm-ls eval"), "model": str(infiller.model_dir), "tasks": str(args.corpus or args.tasks or DEFAULT_TASKS),
               "sampler": infiller.defaults.to_dict(),
               "overrides": {k: v for k, v in overrides.items() if v is not None},
               "summary": summaries, "target": target, "likelihood": nll,
               "records": [r.to_dict() for r in records]}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
