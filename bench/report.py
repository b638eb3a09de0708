"""Build the README's results section from bench/results/*.json; never type a figure by hand.

    python -m dlm_ls.bench.report            print the markdown
    python -m dlm_ls.bench.report --write    replace the README section between
                                                   <!-- results:start --> and <!-- results:end -->
    python -m dlm_ls.bench.report --check    exit 1 when the README is out of date

Every table names the run it comes from: model, machine, date, git commit and command. Only the
text between the two markers is touched; without them the README is left alone (and --write
says so).

Knows the result files' format; knows nothing of how they were measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .common import REPO_ROOT, RESULTS_DIR

START, END = "<!-- results:start -->", "<!-- results:end -->"
ORDER = ("quality", "ratio", "step", "latency", "threads", "startup", "recovery", "cluster", "ceilings", "large",
         "extra_context", "train")


def load_results(results_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("benchmark") in ORDER:
            data["_file"] = path
            out.append(data)
    out.sort(key=lambda d: (ORDER.index(d["benchmark"]), d["machine"].get("device") or ""))
    return out


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _ms(x: Any) -> str:
    return "–" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def _md(rows: list[list[str]], head: list[str], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(head) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    return "\n".join("| " + " | ".join(r) + " |" for r in [head, sep, *rows])


def provenance(d: dict) -> str:
    m, g = d["machine"], d.get("git") or {}
    model = d.get("model") or {}
    params = model.get("parameters")
    where = m.get("gpu") if str(m.get("device", "")).startswith("cuda") else f"{m.get('cpu')} ({m.get('cpus')} CPUs)"
    commit = (g.get("commit") or "unknown")[:10] + (" (uncommitted changes)" if g.get("dirty") else "")
    size = f", {params / 1e6:.1f}M parameters" if params else ""
    return (f"<sub>model `{model.get('path')}`{size}; {where}; {d['date'][:10]}; commit {commit}; "
            f"`{d['command']}`</sub>")


def quality_section(d: dict) -> str:
    groups = ["line", "block", "span", "exec-line", "exec-block", "exec-span", "all"]
    rows = []
    for config, kinds in d["summary"].items():
        for g in groups:
            s = kinds.get(g)
            if not s:
                continue
            rows.append([config, g, str(s["n"]), _f(s["exact_match"]), _f(s["parse_rate"]), _f(s.get("pass_at_1")),
                         _f(s["mean_nfe"], 1), _f(s["tokens_per_pass"], 2)])
    t = d.get("tasks", {})
    intro = (f"**Quality** ({t.get('heldout')} held-out tasks from {', '.join(t.get('packages', []))}; "
             f"{t.get('exec')} execution tasks):")
    return "\n".join([intro, "", _md(rows, ["strategy", "tasks", "n", "exact match", "parses", "pass@1", "NFE",
                                            "tokens/pass"], "llrrrrrr"), "", provenance(d)])


def ratio_section(d: dict) -> str:
    r, eq = d["ratio"], d.get("at_equal_quality")
    delta = ", ".join(f"{k.replace('_', ' ')} {v:+.3f}" for k, v in r["quality_delta"].items())
    rows = [["NFE ratio (ar / parallel)", _f(r["nfe_ratio"], 2)],
            ["wall-clock ratio (ar / parallel)", _f(r["wall_ratio"], 2)],
            ["tokens per forward pass, parallel / ar",
             f"{_f(r['tokens_per_pass']['parallel'], 2)} / {_f(r['tokens_per_pass']['ar'], 2)}"],
            ["quality delta (parallel − ar)", delta]]
    if eq:
        rows.append([f"at equal quality ({eq['config']})",
                     f"NFE ×{_f(eq['nfe_ratio'], 2)}, wall-clock ×{_f(eq['wall_ratio'], 2)}"])
    else:
        rows.append(["at equal quality", "none: no parallel setting reached ar's exact match (or it is 0)"])
    curve = [[p["config"], _f(p["threshold"], 2), _f(p["exact_match"]), _f(p["pass_at_1"]), _f(p["mean_nfe"], 1),
              _ms(p["mean_wall_ms"])] for p in d["curve"]]
    parts = [f"**Speed ratio**, parallel against ar on the same {r['n']} tasks in one run:", "",
             _md(rows, ["", "value"]), "",
             _md(curve, ["setting", "threshold", "exact match", "pass@1", "NFE", "ms"]), ""]
    plot = d.get("plot")
    if plot:
        parts += [f"![quality against speed]({plot})", ""]
    return "\n".join(parts + [provenance(d)])


def step_section(d: dict) -> str:
    rows = d["rows"]
    canvases = sorted({r["canvas"] for r in rows})
    contexts = sorted({r["context"] for r in rows})
    by = {(r["context"], r["canvas"]): r for r in rows}
    table = [[str(c)] + [_ms(by[(c, k)]["median_ms"]) if (c, k) in by else "–" for k in canvases]
             + [_ms(by[(c, canvases[0])]["prefill_ms"]) if (c, canvases[0]) in by else "–"] for c in contexts]
    head = ["context tokens"] + [f"canvas {k}" + (" (ar)" if k == 1 else "") for k in canvases] + ["prefill"]
    dev = d["machine"].get("device")
    return "\n".join([f"**Refinement step** on {dev}, median ms per step:", "", _md(table, head), "", provenance(d)])


def latency_section(d: dict) -> str:
    rows = []
    for c in d["contexts"]:
        lat, pl = c["latency_ms"], c["pause_latency_ms"]
        to_model = (c.get("server_counters") or {}).get("model_calls")
        rows.append([str(c["context_tokens"]), str(c["requests"]), _f(to_model), str(c["answered"]),
                     str(c["suggestions"]), _ms(lat["p50"]), _ms(lat["p95"]), _ms(lat["p99"]), _ms(pl["p50"])])
    mib = lambda b: "–" if not b else f"{b / (1 << 20):.0f} MiB"  # noqa: E731
    s = d.get("startup_ms") or {}
    hit = d.get("context_cache_hit_rate")
    step = d.get("model_ms_per_forward_pass")
    facts = [f"server start to `initialize` answered: {_ms(s.get('p50'))} ms (p50 of {s.get('count')})",
             f"RSS: server {mib((d.get('server_rss') or {}).get('rss_bytes'))}, "
             f"worker {mib((d.get('worker_rss') or {}).get('rss_bytes'))}",
             f"context cache hit rate {_f(hit, 2)}; model time per forward pass {_ms(step)} ms"]
    if d.get("result_cache_hit_rate") is not None:
        facts.append(f"result cache hit rate {_f(d['result_cache_hit_rate'], 2)}")
    budget = d.get("context_budget_tokens")
    seen = ("the whole context reaches the model (`--full-context`)" if d.get("full_context") or not budget
            else f"the model sees at most {budget} tokens of it, its trained budget")
    return "\n".join([f"**Latency through LSP** (`textDocument/inlineCompletion`, typing replayed at "
                      f"{d.get('typing_ms')} ms a key, superseded requests cancelled; {seen}), request to response "
                      "in ms:", "",
                      _md(rows, ["tokens before the cursor", "requests", "to the model", "answered", "shown", "p50", "p95", "p99",
                                 "p50 at pauses"]), "",
                      "; ".join(facts) + ".", "", provenance(d)])


def ceilings_section(d: dict) -> str:
    c = d["ceilings"]
    rows = [[str(r["context"]), str(r["canvas"]), _ms(r["step_ms"]), _ms(r["floor_ms"]), _f(r["x_floor"], 1)]
            for r in d["model_step"]]
    dev = d["machine"].get("device")
    threads = f", {c['threads']} thread(s)" if c.get("threads") else ""
    return "\n".join([f"**Device ceilings** on {dev}{threads}: memory bandwidth {c['bandwidth_gbs']:.1f} GB/s, "
                      f"matrix rate {c['matmul_tflops']:.3f} TFLOP/s ({c['matmul_dtype']}). The floor of a step is "
                      "the weights and cached keys/values read once, or its matrix work, whichever is longer:", "",
                      _md(rows, ["context tokens", "canvas", "step ms", "floor ms", "x floor"]), "", provenance(d)])


def large_section(d: dict) -> str:
    rows = [[r["case"], r["strategy"], str(r["nfe"]), _ms(r["latency_ms"]), _f(r["tokens_per_s"], 1),
             _ms(r["floor_ms"]), _f(r["x_floor"], 1), _f(r.get("speedup_vs_ar"), 2)] for r in d["rows"]]
    return "\n".join([f"**{d['model']['path']}** ({d['parameters'] / 1e9:.2f}B parameters, {d['dtype']}) after a "
                      f"{d['context']}-token context (prefill {_ms(d['prefill_ms'])} ms), fixed step counts:", "",
                      _md(rows, ["case", "strategy", "NFE", "latency ms", "tokens/s", "floor ms", "x floor",
                                 "x faster than ar"]), "", provenance(d)])


def extra_context_section(d: dict) -> str:
    rows = [["call", label, _f(s["exact_match"]), _f(s["similarity"]), _f(s["nll_per_token"]), _f(s["chunk_found"], 2)]
            for label, s in d["summary"].items()]
    held = d.get("heldout")
    if held:
        rows += [[f"held-out line x{s['tasks']}", label, _f(s["exact_match"]), _f(s["similarity"]),
                  _f(s["nll_per_token"]), "–"] for label, s in held["summary"].items()]
    return "\n".join([f"**Extra context** ({d['tasks']} call-completion tasks whose argument order is written only in "
                      f"another open document; model {d['model']['path']}): the expected text was likelier with the chunks in "
                      f"{_f(d.get('nll_lower_with_chunks'), 2)} of the tasks"
                      + (f", and in {_f(held['nll_lower_with_chunks'], 2)} of {held['tasks']} held-out single-line "
                         "tasks with the package's other modules open" if held else "") + ".", "",
                      _md(rows, ["tasks", "chunks", "exact match", "similarity", "nll/token", "definition in chunks"]), "",
                      provenance(d)])


def startup_section(d: dict) -> str:
    rows = [[name, _ms(d[key]["wall_ms"]["p50"]), _ms(d[key]["wall_ms"]["min"]), _ms(d[key]["wall_ms"]["max"]),
             _ms(d[key]["cpu_ms"]["p50"])]
            for name, key in (("first start (no caches)", "first_start"), ("repeat start", "repeat_start"))]
    load = d["machine"].get("load_average") or [None]
    return "\n".join([f"**Server start** to `initialize` answered, {d['first_start']['runs']} starts of each kind in turn "
                      "(a repeat start answers from the kept answer, lsp_server/early.py; load average "
                      f"{_f(load[0], 1)} on {d['machine'].get('cpus')} CPUs; torch imported: {d.get('torch_loaded')}):", "",
                      _md(rows, ["start", "wall p50 ms", "min", "max", "CPU p50 ms"]), "",
                      provenance({**d, "model": {"path": "none (no worker on this path)"}})])


def recovery_section(d: dict) -> str:
    rows = [[name, _ms(v["recovery_ms"]["p50"]), _ms(v["recovery_ms"]["min"]), _ms(v["recovery_ms"]["max"]),
             _ms(v["takeover_ms"]["p50"]), _ms(v["first_completion_ms"]["p50"]), _ms(v["warm_completion_ms"]["p50"])]
            for name, v in d["variants"].items()]
    load = d["machine"].get("load_average") or [None]
    runs = next(iter(d["variants"].values()))["recovery_ms"]["count"]
    return "\n".join([f"**Recovery** from `kill -9` of the worker in the middle of a one-line completion, to that completion "
                      f"answered by the next worker ({runs} kills each, in turn; load average {_f(load[0], 1)} on "
                      f"{d['machine'].get('cpus')} CPUs). A worker starts in {_ms(d['startup_ms']['p50'])} ms p50 "
                      f"(spawn to first ping), the model load {_ms(d['load_s']['p50'])} ms of it.", "",
                      _md(rows, ["next worker", "kill to completion p50 ms", "min", "max", "kill to a worker answering",
                                 "its completion (worker's time)", "a completion before the kill"]), "",
                      provenance(d)])


def threads_section(d: dict) -> str:
    rows = [[str(r["threads"]), r["neighbour"], _ms(r["p50_ms"]), _ms(r["min_ms"]), _ms(r["max_ms"])] for r in d["rows"]]
    return "\n".join([f"**CPU threads**: one line completion of the model, {d['rows'][0]['reps']} times each, alone and "
                      "beside a process that keeps one core busy. The worker's default (`--threads`) is half the cores, "
                      "at most 4: one on this machine.", "",
                      _md(rows, ["torch threads", "beside", "p50 ms", "min", "max"]), "", provenance(d)])


def train_section(d: dict) -> str:
    table = [[r["name"], f"{r['tokens_per_s']:,}", _f(r.get("vs_fp32_eager"), 2), _f(r["loss_after"], 4)] for r in d["rows"]]
    skipped = "".join(f"\n\n{s['variant']} not run: {s['why']}." for s in d.get("skipped", []))
    return "\n".join([f"**Training step** (`{d['preset']}` preset, rows of {d['seq_len']} tokens, forward + backward + "
                      "AdamW; the same weights and batches for every variant, so equal losses mean equal arithmetic):",
                      "", _md(table, ["variant", "tokens/s", "x fp32 eager", "loss after"]) + skipped, "",
                      provenance({**d, "model": {"path": f"{d['preset']} preset, random init", "parameters": d.get("parameters")}})])


def cluster_section(d: dict) -> str:
    batch = [[str(r["batch"]), _ms(r["wall_ms"]), _f(r["ms_per_step"], 1), _f(r["requests_per_s"], 2)]
             for r in d.get("batch_scaling", [])]
    runs = [[str(c["replicas"]), _f(c["throughput"]["requests_per_s"], 2), _ms(c["throughput"]["latency_ms"]["p50"]),
             _ms(c["throughput"]["latency_ms"]["p95"]), str(c["throughput"]["errors"])]
            for c in d["clusters"] if "throughput" in c]
    over = next((c["overhead"] for c in d["clusters"] if "overhead" in c), None)
    parts = [f"**Serving a team** (docs/team.md): one engine ({d['sizes']['threads']} thread) given B line "
             "completions at once, then Ray Serve replicas with "
             f"{d['sizes']['clients']} editors each sending its next request when the last is answered:", "",
             _md(batch, ["requests at once", "wall ms", "ms per step", "requests/s"]), "",
             _md(runs, ["replicas", "requests/s", "p50 ms", "p95 ms", "errors"])]
    if over:
        parts += ["", f"One request at a time, Ray Serve adds {_f(over['added_ms_p50']['infill'], 1)} ms p50 to a "
                      f"completion (local socket {_ms(over['local infill']['p50'])} ms, Serve "
                      f"{_ms(over['cluster infill']['p50'])} ms) and {_f(over['added_ms_p50']['ping'], 1)} ms to a ping."]
    cap = d.get("capacity")
    if cap:
        rows = [[str(r["developers"]), f"{r['typing_at_once']:.0%}", _f(r["requests_per_s"], 1), str(r["engines"])]
                for r in cap["rows"]]
        parts += ["", f"Capacity at {cap['target_utilisation']:.0%} load, {cap['demand']['requests_per_s']} requests/s per "
                      f"typing developer ({cap['demand']['source']}):", "",
                  _md(rows, ["developers", "typing at once", "requests/s", "engines (cores here)"])]
    parts += ["", provenance(d)]
    return "\n".join(parts)


SECTIONS = {"quality": quality_section, "ratio": ratio_section, "step": step_section, "latency": latency_section,
            "ceilings": ceilings_section, "large": large_section, "extra_context": extra_context_section,
            "train": train_section, "startup": startup_section, "recovery": recovery_section,
            "threads": threads_section, "cluster": cluster_section}


def render(results: list[dict]) -> str:
    if not results:
        return "_No benchmark results yet: run `make bench`._"
    parts = [f"_Generated by `python -m dlm_ls.bench.report` from `bench/results/`; do not edit by hand._"]
    for d in results:
        try:
            parts.append(SECTIONS[d["benchmark"]](d))
        except (KeyError, TypeError, AttributeError) as exc:  # an old or partial file: say so, keep the others
            parts.append(f"_{d['_file'].name}: unreadable ({type(exc).__name__}: {exc})_")
    return "\n\n".join(parts)


def replace_section(readme: str, body: str) -> str | None:
    """README text with the marked section replaced; None when the markers are missing."""
    a, b = readme.find(START), readme.find(END)
    if a < 0 or b < 0 or b < a:
        return None
    return readme[: a + len(START)] + "\n" + body + "\n" + readme[b:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlm_ls.bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(RESULTS_DIR), help="folder of result JSON files")
    p.add_argument("--readme", default=str(REPO_ROOT / "README.md"))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="replace the README's marked section")
    g.add_argument("--check", action="store_true", help="exit 1 when the README's marked section is stale")
    args = p.parse_args(argv)
    body = render(load_results(Path(args.results)))
    if not (args.write or args.check):
        print(body)
        return 0
    readme = Path(args.readme)
    text = readme.read_text() if readme.exists() else ""
    new = replace_section(text, body)
    if new is None:
        print(f"{readme}: no {START} ... {END} markers; nothing replaced. The section:\n", file=sys.stderr)
        print(body)
        return 1 if args.check else 0
    if args.check:
        if new != text:
            print(f"{readme}: the results section is stale; run python -m dlm_ls.bench.report --write",
                  file=sys.stderr)
            return 1
        return 0
    if new != text:
        readme.write_text(new)
        print(f"updated the results section of {readme}")
    else:
        print(f"{readme}: results section already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
