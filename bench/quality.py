"""`dlm-ls bench quality`: exact match, parse rate and pass@1 of infills, `parallel` against `ar`.

Tasks: the cached held-out tasks (bench/tasks/heldout.jsonl: a line, a block, a random
span, cut from the test packages; see model/train/evaluate.py) and the execution tasks
(bench/tasks/exec_tasks.py: hand-written functions with tests, a line, a block and a span
punched out of each; pass@1 = the test passes with the model's middle in place, run in a
sandboxed subprocess, one sample per task, greedy). Both strategies run on the same tasks from
the same warm context cache; figures per kind and overall, with mean NFE and tokens per forward
pass.

Knows tasks, the Infiller and the sandbox; the measures themselves live in evaluate.py.
"""

from __future__ import annotations

from typing import Sequence

from ..model.train.evaluate import KINDS, Config, Record, Task, group_summaries, read_tasks, run_tasks, select
from ..model.train.evaluate import DEFAULT_TASKS
from . import execution
from .common import table


def load_tasks(limit: int | None, exec_limit: int | None, kinds: Sequence[str] = KINDS,
               task_file=DEFAULT_TASKS) -> list[Task]:
    """`limit` held-out tasks of each kind (file order) and the holes of the first `exec_limit` functions."""
    held = select(read_tasks(task_file), list(kinds), limit)
    ex = execution.exec_tasks()
    if exec_limit is not None:
        names = list(dict.fromkeys(t.extra["name"] for t in ex))[:exec_limit]
        ex = [t for t in ex if t.extra["name"] in names]
    return held + ex


def score_execution(tasks: Sequence[Task], records: Sequence[Record]) -> None:
    """Fill in `passed` for the records of execution tasks (one sandboxed run each)."""
    by_id = {t.id: t for t in tasks}
    for r in records:
        task = by_id.get(r.id)
        if task is not None and task.kind.startswith("exec-"):
            r.passed = execution.passes(task, r.middle).passed if r.error is None else False


def measure(infiller, tasks: Sequence[Task], configs: Sequence[Config], progress=None) -> list[Record]:
    records = run_tasks(infiller, tasks, configs, progress)
    score_execution(tasks, records)
    return records


def summarize_quality(records: Sequence[Record]) -> dict:
    """Per config and kind, plus the held-out and execution groups ("heldout", "exec")."""
    out = group_summaries(records)
    from ..model.train.evaluate import summarize

    for config in out:
        mine = [r for r in records if r.config == config]
        held = [r for r in mine if not r.kind.startswith("exec-")]
        ex = [r for r in mine if r.kind.startswith("exec-")]
        if held:
            out[config]["heldout"] = summarize(held)
        if ex:
            out[config]["exec"] = summarize(ex)
    return out


def format_quality(summary: dict) -> str:
    rows = []
    for config, kinds in summary.items():
        for kind, s in kinds.items():
            rows.append([config, kind, s["n"], s["exact_match"], s["parse_rate"], s.get("pass_at_1"),
                         s["mean_nfe"], s["tokens_per_pass"], s["mean_wall_ms"]])
    return table([r[:1] + r[1:] for r in rows],
                 ["config", "kind", "n", "exact", "parses", "pass@1", "NFE", "tok/pass", "ms"])


def run(infiller, tasks: Sequence[Task], configs: Sequence[Config], progress=None) -> tuple[dict, list[Record]]:
    records = measure(infiller, tasks, configs, progress)
    return summarize_quality(records), records
