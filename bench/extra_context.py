"""Benchmark: does showing the model chunks of other open documents help it complete a call?

Each task is two open documents and a cursor. `helpers`-like module: three functions, one of them the
target. The file being edited imports the target and calls it, with the cursor at one of three
places on the call line:

    args   result = clamp_scores(█         -> scores, lower, upper)
    name   result = clamp_█                -> scores(scores, lower, upper)
    call   result = █                      -> clamp_scores(scores, lower, upper)

The calling function takes the same parameters in another order (plus one more), so the right
argument order is written only in the other document. A third open document with unrelated
functions competes for the budget. Names are made up from word lists, so no model has seen them.

Every task is completed twice through the server's own prompt functions (server.plan_completion,
extra_context_preamble, choose_completion): without other documents, and with them (the
`extra_context_chars` default budget). Exact match compares the cleaned suggestion with the
expected rest of the line; similarity is difflib's ratio, to see movement a weak model's exact
matches hide. `chunk found` is how often the preamble contains the target's definition (ranking).
`nll/token` is the expected text's negative log-likelihood under the model (Infiller.score_middle,
the `ar` factorization, PAD end included), per token: it moves long before exact match does, and
`nll_lower_with_chunks` is the paired share of tasks where the chunks made the expected text likelier.

    python -m dlm_ls.bench.extra_context --model runs/cpu-small/latest [--tasks 48] [--heldout 40]

`--heldout N` adds real tasks: the first N single-line tasks of the held-out benchmark
(bench/tasks/heldout.jsonl, packages never trained on), with the other modules of the
task's package, as installed here, as the open documents (the task file's own folder and the
package's top folder, at most MAX_OPEN_DOCUMENTS). Same two runs, same measures.

Prints a table and writes bench/results/extra_context-<device>.json. Imports torch (the engine runs
in this process); the language server itself never does.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import random
import statistics
import sys
import time
from dataclasses import dataclass

from ..lsp_server import documents as D
from ..lsp_server.config import Settings
from ..model.prompt import EXTRA_CONTEXT_SHARE, prompt_chars
from ..lsp_server.completion import choose_completion, extra_context_preamble, plan_completion

VERBS = ["parse", "merge", "compute", "normalize", "filter", "build", "format", "load", "split", "count",
         "resolve", "clamp", "scale", "group", "rank", "encode"]
NOUNS = ["ranges", "scores", "header", "tokens", "records", "path", "weights", "items", "config", "matrix",
         "window", "prices", "labels", "offsets", "columns", "events"]
PARAMS = ["values", "lower", "upper", "limit", "offset", "key", "default", "sep", "scale", "threshold", "items",
          "width", "prefix", "count", "mapping", "factor", "start", "stop", "name", "data"]
KINDS = ("args", "name", "call")


@dataclass
class Task:
    name: str
    kind: str
    uri: str
    text: str  # the document being edited
    offset: int  # the cursor
    expected: str  # the rest of the call line
    target_def: str | None  # the target's definition line, to check the ranking (None: not known)
    others: dict[str, str]  # the other open documents
    root: str = "file:///work/app"  # the workspace folder


def _function(rng: random.Random, name: str, params: list[str]) -> str:
    first = params[0]
    body = [f"def {name}({', '.join(params)}):",
            f'    """{name.replace("_", " ").capitalize()} of {first}."""',
            "    out = []",
            f"    for item in {first}:",
            f"        if item is None:",
            "            continue",
            f"        out.append(item)",
            "    return out"]
    if rng.random() < 0.5:
        body.insert(2, f"    if not {first}:\n        return []")
    return "\n".join(body) + "\n"


def build_tasks(n: int, seed: int = 0) -> list[Task]:
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        names = set()
        while len(names) < 5:
            names.add(f"{rng.choice(VERBS)}_{rng.choice(NOUNS)}")
        target, *distractors = sorted(sorted(names), key=lambda _: rng.random())  # sorted first: set order varies by process
        params = rng.sample(PARAMS, rng.randint(2, 4))
        module = rng.choice(["helpers", "utils", "tools", "common", "support"])
        helper_fns = [(target, params)] + [(d, rng.sample(PARAMS, rng.randint(1, 3))) for d in distractors[:2]]
        rng.shuffle(helper_fns)
        helpers = "import math\n\n\n" + "\n\n".join(_function(rng, f, p) for f, p in helper_fns)
        other = "import os\n\n\n" + "\n\n".join(_function(rng, d, rng.sample(PARAMS, 2)) for d in distractors[2:])

        caller_params = params + [rng.choice([p for p in PARAMS if p not in params])]
        while caller_params[:len(params)] == params:  # another order than the definition's
            rng.shuffle(caller_params)
        kind = KINDS[i % len(KINDS)]
        call = f"{target}({', '.join(params)})"
        verb, noun = target.split("_", 1)
        typed = {"args": f"{target}(", "name": f"{verb}_", "call": ""}[kind]
        head = (f"from {module} import {target}\n\n\n"
                f"def run_{i}({', '.join(caller_params)}, verbose=False):\n"
                f"    if verbose:\n"
                f"        print(\"running\", {caller_params[0]})\n"
                f"    result = {typed}")
        text = head + "\n    return result\n"
        tasks.append(Task(f"t{i:03d}", kind, f"file:///work/app/main_{i}.py", text, len(head),
                          call[len(typed):], f"def {target}(", {
                              f"file:///work/app/{module}.py": helpers,
                              f"file:///work/app/other_{i}.py": other}))
    return tasks


MAX_OPEN_DOCUMENTS = 40
MAX_DOCUMENT_CHARS = 200_000


def package_documents(package: str, path: str) -> tuple[str, dict[str, str]]:
    """The workspace root URI and the other modules of an installed package, as open documents."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"bench.extra_context: package {package!r} is not installed here")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    site = pkg_dir.parent
    own = site / path
    files = sorted(own.parent.glob("*.py")) + sorted(pkg_dir.glob("*.py"))
    others: dict[str, str] = {}
    for f in files:
        if f == own or f.as_uri() in others or len(others) >= MAX_OPEN_DOCUMENTS:
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        if len(text) <= MAX_DOCUMENT_CHARS:
            others[f.as_uri()] = text
    return site.as_uri(), others


def build_heldout_tasks(n: int) -> list[Task]:
    import json

    from dlm_ls.model.train.evaluate import DEFAULT_TASKS

    tasks: list[Task] = []
    with open(DEFAULT_TASKS, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    lines = [r for r in rows if r["kind"] == "line"]
    # round-robin over packages, so that a small N still covers each of them
    by_pkg: dict[str, list[dict]] = {}
    for r in lines:
        by_pkg.setdefault(r["package"], []).append(r)
    order = [r for group in zip(*by_pkg.values()) for r in group]
    for r in order[:n]:
        root, others = package_documents(r["package"], r["path"])
        uri = root.rstrip("/") + "/" + r["path"]
        tasks.append(Task(r["id"], f"heldout-{r['package']}", uri, r["prefix"] + r["suffix"], len(r["prefix"]),
                          r["middle"].strip(), None, others, root))
    return tasks


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def run_task(inf, task: Task, settings: Settings, with_chunks: bool) -> dict:
    doc = D.Document(task.uri, task.text, "python")
    max_chars = prompt_chars(inf.max_context_tokens)
    budget = min(settings.extra_context_chars, int(max_chars * EXTRA_CONTEXT_SHARE))
    preamble = extra_context_preamble(doc, task.offset, task.others, budget, task.root,
                                      settings.extra_context_min_score) if with_chunks else ""
    plan = plan_completion(doc, task.offset, settings, preamble, max_chars)
    if plan is None:
        return {"task": task.name, "kind": task.kind, "suggestion": None, "exact": False, "similarity": 0.0,
                "ms": 0.0, "nfe": 0, "preamble_chars": len(preamble), "chunk_found": False, "nll": None,
                "nll_tokens": 0}
    score = inf.score_middle([plan.prefix, plan.suffix], task.expected, plan.preamble)
    t0 = time.perf_counter()
    result = inf.complete([plan.prefix, plan.suffix], mode=plan.mode, preamble=plan.preamble, **plan.overrides)
    ms = (time.perf_counter() - t0) * 1000
    text = choose_completion(doc, task.offset, plan, result) or ""
    line = text.split("\n", 1)[0]
    return {"task": task.name, "kind": task.kind, "suggestion": line, "expected": task.expected,
            "exact": line.strip() == task.expected, "similarity": round(similarity(line.strip(), task.expected), 4),
            "ms": round(ms, 2), "nfe": result.nfe, "preamble_chars": len(preamble),
            "chunk_found": None if task.target_def is None else task.target_def in preamble,
            "nll": round(score["nll"], 4), "nll_tokens": score["tokens"]}


def summarize(rows: list[dict]) -> dict:
    scored = [r for r in rows if r["nll"] is not None]
    return {"tasks": len(rows), "exact_match": sum(r["exact"] for r in rows) / max(1, len(rows)),
            "nll_per_token": sum(r["nll"] for r in scored) / max(1, sum(r["nll_tokens"] for r in scored)),
            "nll_mean": statistics.fmean(r["nll"] for r in scored) if scored else 0.0,
            "similarity": statistics.fmean(r["similarity"] for r in rows) if rows else 0.0,
            "chunk_found": sum(bool(r["chunk_found"]) for r in rows) / max(1, len(rows)),
            "ms_mean": statistics.fmean(r["ms"] for r in rows) if rows else 0.0,
            "preamble_chars_mean": statistics.fmean(r["preamble_chars"] for r in rows) if rows else 0.0}


def nll_lower_share(runs: dict[str, list[dict]]) -> float:
    pairs = [(a["nll"], b["nll"]) for a, b in zip(runs["without"], runs["with"])
             if a["nll"] is not None and b["nll"] is not None]
    return sum(b < a for a, b in pairs) / max(1, len(pairs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlm_ls.bench.extra_context", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: the shipped model/default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tasks", type=int, default=48)
    p.add_argument("--heldout", type=int, default=0, help="also this many held-out single-line tasks (real code)")
    p.add_argument("--min-score", type=float, default=None,
                   help="extra_context_min_score for this run (default: the server's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", help="results folder (default bench/results)")
    args = p.parse_args(argv)

    from dlm_ls.bench.common import BenchError, header, model_label, resolve_model, set_threads, table, \
        write_result
    from dlm_ls.model.infill import Infiller

    try:
        model_dir = resolve_model(args.model)
    except BenchError as exc:
        print(exc, file=sys.stderr)
        return 2
    set_threads(args.threads)
    inf = Infiller(model_dir, device=args.device)
    settings = Settings()
    if args.min_score is not None:
        settings = dataclasses.replace(settings, extra_context_min_score=args.min_score)
    tasks = build_tasks(args.tasks, args.seed)
    heldout = build_heldout_tasks(args.heldout) if args.heldout else []
    runs = {label: [run_task(inf, t, settings, label == "with") for t in tasks] for label in ("without", "with")}
    real = {label: [run_task(inf, t, settings, label == "with") for t in heldout] for label in ("without", "with")}

    result = header("extra_context", argv, str(inf.engine.device), "python -m dlm_ls.bench.extra_context")
    result.update(model={"path": model_label(model_dir)}, tasks=len(tasks), seed=args.seed,
                  extra_context_chars=settings.extra_context_chars,
                  extra_context_min_score=settings.extra_context_min_score,
                  summary={label: summarize(rows) for label, rows in runs.items()},
                  by_kind={label: {k: summarize([r for r in rows if r["kind"] == k]) for k in KINDS}
                           for label, rows in runs.items()},
                  # paired: the share of tasks whose expected text became more likely with the chunks
                  nll_lower_with_chunks=nll_lower_share(runs), rows=runs)
    if heldout:
        result["heldout"] = {"tasks": len(heldout), "summary": {label: summarize(rows) for label, rows in real.items()},
                             "nll_lower_with_chunks": nll_lower_share(real), "rows": real}
    head = ["chunks", "tasks", "kind", "exact match", "similarity", "nll/token", "chunk found", "ms mean",
            "preamble chars"]
    lines = []
    for label in ("without", "with"):
        for kind, s in [("all", result["summary"][label]), *result["by_kind"][label].items()]:
            lines.append([label, "call", kind, s["exact_match"], s["similarity"], s["nll_per_token"],
                          s["chunk_found"], s["ms_mean"], s["preamble_chars_mean"]])
        if heldout:
            s = result["heldout"]["summary"][label]
            lines.append([label, "held-out", f"line x{s['tasks']}", s["exact_match"], s["similarity"],
                          s["nll_per_token"], "-", s["ms_mean"], s["preamble_chars_mean"]])
    print(f"extra context on {len(tasks)} call tasks and {len(heldout)} held-out lines, model {result['model']['path']}, "
          f"device {inf.engine.device}")
    print(table(lines, head))
    print(f"expected text more likely with the chunks in {result['nll_lower_with_chunks']:.0%} of the call tasks"
          + (f" and {result['heldout']['nll_lower_with_chunks']:.0%} of the held-out lines" if heldout else "")
          + " (nll: the `ar` log-likelihood of the expected text, nats)")
    print(f"wrote {write_result(result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
