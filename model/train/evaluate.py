"""Infill quality on held-out code, for the `parallel` and the `ar` strategy: tasks, measures, records.

The `dlm-ls eval` command that runs them and writes a result file is bench/eval.py; training and
shipping judge checkpoints with this module directly.

Tasks are cut from real files of the held-out test packages (data/corpus/test.jsonl), seeded,
so the same corpus always gives the same tasks:

  line   one real line: the prefix ends after the line's indentation (where an editor's cursor
         sits on a fresh line), the middle is the rest of the line, the suffix starts at its
         newline. Asked in mode "line". Lines inside strings or comments, and lines shorter than
         MIN_LINE_CHARS or made of closing brackets only, are not cut.
  block  the body of a def / if / for / while / with / try / class (a tree-sitter `block`) of
         2..MAX_BLOCK_LINES lines: the prefix ends after the first line's indentation, the
         middle runs to the end of the body's last line. Asked in mode "block".
  span   an arbitrary character span (start and end anywhere, mid-word included) of
         1..MAX_SPAN_CHARS characters. Asked in mode "auto".

Each task keeps a window of its file around the hole (at most PREFIX_CHARS before, SUFFIX_CHARS
after, cut at top-level statement boundaries when they fall inside the window, else at line
starts), and records package, path and license. `--write-tasks` caches them as JSON Lines so
benchmarks and CI need no corpus (bench/tasks/heldout.jsonl).

Measures, per task:
  exact    normalize(predicted) == normalize(true middle), where normalize turns \\r\\n into \\n,
           removes trailing whitespace from every line, then strips the whole string (leading
           and trailing blank lines and spaces). Indentation inside the middle is kept.
  parses   the window with the predicted middle in place parses no worse than with the true one:
           when the true window passes `ast.parse`, the predicted one must too; otherwise
           the tree-sitter count of ERROR and MISSING nodes must not grow.
  nfe      refinement forward passes (context prefill excluded), with the middle's token count
           (the ending pad excluded), so tokens per forward pass = sum(tokens) / sum(nfe).
  ms       a task's context is computed once into the cache (prefill_ms); every strategy then
           refines from that warm cache, tasks outer and strategies inner, so a change of
           machine load hits both alike and the times compare refinement only.

Knows text, the Infiller and tree-sitter; knows nothing of LSP or of the network's insides.
"""

from __future__ import annotations

import ast
import json
import math
import random
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

KINDS = ("line", "block", "span")
MODE_OF_KIND = {"line": "line", "block": "block", "span": "auto", "exec-line": "line", "exec-block": "block",
                "exec-span": "auto"}
MAX_TOKENS_OF_KIND = {"line": 48, "block": 96, "span": 48}  # generous for the char caps below
MIN_LINE_CHARS = 6  # shorter lines (`pass`, `else:`, `try:`) say little about a model
MAX_LINE_CHARS = 100
MAX_BLOCK_LINES = 6
MAX_BLOCK_CHARS = 280
MAX_SPAN_CHARS = 120
PREFIX_CHARS = 2400  # about 700 tokens: enough context for a small model, small enough to commit
SUFFIX_CHARS = 800
DEFAULT_SEED = 20261123
DEFAULT_TASKS = Path(__file__).resolve().parents[2] / "bench" / "tasks" / "heldout.jsonl"
STRATEGIES = ("parallel", "ar")


# --------------------------------------------------------------------------- tasks


@dataclass
class Task:
    id: str
    kind: str  # line | block | span | exec-line | exec-block | exec-span
    prefix: str
    middle: str  # the true middle
    suffix: str
    mode: str  # the Infiller mode this task is asked in
    max_tokens: int
    package: str = ""
    path: str = ""
    license: str = ""
    extra: dict = field(default_factory=dict)  # exec tasks: the test; cut tasks: line number

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Task":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def read_tasks(path: str | Path) -> list[Task]:
    with open(path, encoding="utf-8") as f:
        return [Task.from_dict(json.loads(line)) for line in f if line.strip()]


def write_tasks(tasks: Iterable[Task], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for t in tasks:
            f.write(json.dumps(t.to_dict(), ensure_ascii=False, sort_keys=True) + "\n")


def _parser():
    from tree_sitter import Language, Parser
    import tree_sitter_python

    if not hasattr(_parser, "p"):
        _parser.p = Parser(Language(tree_sitter_python.language()))
    return _parser.p


class _Offsets:
    """UTF-8 byte offsets to character offsets for one text (tree-sitter speaks bytes)."""

    def __init__(self, text: str):
        self.ascii = text.isascii()
        if not self.ascii:
            self.table = [i for i, ch in enumerate(text) for _ in range(len(ch.encode("utf-8", "surrogatepass")))]
            self.table.append(len(text))
            self.bytes = {}
            for b, c in enumerate(self.table):
                self.bytes.setdefault(c, b)

    def char(self, byte: int) -> int:
        return byte if self.ascii else self.table[byte]

    def byte(self, char: int) -> int:
        return char if self.ascii else self.bytes[char]


def _inside_string_or_comment(node) -> bool:
    while node is not None:
        if node.type in ("string", "comment", "string_content", "concatenated_string"):
            return True
        node = node.parent
    return False


def _top_level_bounds(tree, text: str, offsets: _Offsets) -> tuple[list[int], list[int]]:
    """Character offsets where top-level statements start, and where the lines they end on end."""
    starts, ends = [], []
    for child in tree.root_node.children:
        e = offsets.char(child.end_byte)
        nl = text.find("\n", e)
        starts.append(offsets.char(child.start_byte))
        ends.append(len(text) if nl < 0 else nl + 1)
    return starts, ends


def window(text: str, start: int, end: int, bounds: tuple[list[int], list[int]] | None = None,
           prefix_chars: int = PREFIX_CHARS, suffix_chars: int = SUFFIX_CHARS) -> tuple[str, str]:
    """Prefix and suffix around text[start:end], cut to whole top-level statements where possible."""
    lo, hi = start - prefix_chars, end + suffix_chars
    if lo <= 0:
        a = 0
    else:
        tops = [s for s in (bounds[0] if bounds else []) if lo <= s <= start]
        if tops:
            a = min(tops)
        else:  # the first line start at or after lo (the hole's own line start at the latest)
            nl = text.find("\n", lo - 1)
            a = text.rfind("\n", 0, start) + 1 if nl < 0 or nl + 1 > start else nl + 1
    if hi >= len(text):
        b = len(text)
    else:
        ends = [e for e in (bounds[1] if bounds else []) if end <= e <= hi]
        if ends:
            b = max(ends)
        else:  # the last line end at or before hi (mid-line only when the hole's line is that long)
            nl = text.rfind("\n", end, hi)
            b = hi if nl < 0 else nl + 1
    return text[a:start], text[end:b]


def _line_candidates(text: str, tree, offsets: _Offsets) -> list[tuple[int, int, int]]:
    """(start, end, line number) of lines worth asking for."""
    out, s = [], 0
    for n, line in enumerate(text.split("\n")):
        start_of_line, s = s, s + len(line) + 1
        body = line.lstrip()
        if len(body.rstrip()) < MIN_LINE_CHARS or len(body) > MAX_LINE_CHARS or body.startswith("#"):
            continue
        if not body.strip(")]}:,; "):
            continue
        first = start_of_line + (len(line) - len(body))
        b = offsets.byte(first)
        node = tree.root_node.descendant_for_byte_range(b, b + 1)
        if node is None or _inside_string_or_comment(node):
            continue
        out.append((first, start_of_line + len(line.rstrip()), n + 1))
    return out


def _block_candidates(text: str, tree, offsets: _Offsets) -> list[tuple[int, int, int]]:
    """(start, end, line number) of statement bodies worth asking for."""
    out, stack = [], [tree.root_node]
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.type != "block" or not node.children:
            continue
        rows = node.end_point[0] - node.start_point[0] + 1
        if not 2 <= rows <= MAX_BLOCK_LINES:
            continue
        first, last = node.children[0], node.children[-1]
        if len(node.children) == 1 and first.type == "expression_statement" and \
                first.children and first.children[0].type == "string":
            continue  # a docstring only
        s, e = offsets.char(first.start_byte), offsets.char(last.end_byte)
        if e - s > MAX_BLOCK_CHARS or text.count("\n", s, e) < 1:
            continue
        out.append((s, e, node.start_point[0] + 1))
    return sorted(out)


def _span_candidate(text: str, rng: random.Random) -> tuple[int, int, int] | None:
    length = max(1, int(math.exp(rng.uniform(0, math.log(MAX_SPAN_CHARS)))))  # log-uniform: short spans too
    if len(text) <= length + 2:
        return None
    s = rng.randrange(1, len(text) - length)
    e = s + length
    if not text[s:e].strip():
        return None
    return s, e, text.count("\n", 0, s) + 1


def cut_tasks(files: Sequence[dict], per_kind: int, seed: int = DEFAULT_SEED,
              kinds: Sequence[str] = KINDS) -> list[Task]:
    """`per_kind` tasks of each kind from `files` ({path, package, license, text}), packages in turn.

    Packages take turns (sorted by name) so a package with many files (pygments) does not drown
    the others; within a package a file and a place in it are drawn from a seeded generator.
    Deterministic for a given file list, `per_kind` and `seed`.
    """
    by_pkg: dict[str, list[dict]] = {}
    for f in sorted(files, key=lambda f: (f["package"], f["path"])):
        by_pkg.setdefault(f["package"], []).append(f)
    parser = _parser()
    cache: dict[str, tuple] = {}

    def parsed(f: dict):
        if f["path"] not in cache:
            text = f["text"]
            tree = parser.parse(text.encode("utf-8", "surrogatepass"))
            offsets = _Offsets(text)
            cache[f["path"]] = (tree, offsets, _top_level_bounds(tree, text, offsets))
        return cache[f["path"]]

    tasks: list[Task] = []
    for kind in kinds:
        rng = random.Random(f"{seed}:{kind}")
        seen: set[tuple[str, int, int]] = set()
        middles: set[str] = set()
        pkgs = sorted(by_pkg)
        made, tries, turn = 0, 0, 0
        while made < per_kind and tries < per_kind * 200:
            tries += 1
            pkg = pkgs[turn % len(pkgs)]
            f = rng.choice(by_pkg[pkg])
            text = f["text"]
            tree, offsets, bounds = parsed(f)
            if kind == "line":
                cands = _line_candidates(text, tree, offsets)
                pick = rng.choice(cands) if cands else None
            elif kind == "block":
                cands = _block_candidates(text, tree, offsets)
                pick = rng.choice(cands) if cands else None
            else:
                pick = _span_candidate(text, rng)
            if pick is None:
                continue
            s, e, line_no = pick
            middle = text[s:e]
            if (f["path"], s, e) in seen or (kind != "span" and normalize(middle) in middles):
                continue
            seen.add((f["path"], s, e))
            middles.add(normalize(middle))
            prefix, suffix = window(text, s, e, bounds)
            tasks.append(Task(f"{kind}-{made:04d}", kind, prefix, middle, suffix, MODE_OF_KIND[kind],
                              MAX_TOKENS_OF_KIND[kind], f["package"], f["path"], f.get("license", ""),
                              {"line": line_no}))
            made += 1
            turn += 1
    return tasks


def read_corpus(corpus: str | Path, split: str = "test") -> list[dict]:
    path = Path(corpus) / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no {path}: build the corpus first (dlm-ls corpus) or pass --tasks")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- measures


def normalize(s: str) -> str:
    """What exact match compares: \\r\\n -> \\n, trailing spaces of each line dropped, outer whitespace stripped."""
    return "\n".join(line.rstrip() for line in s.replace("\r\n", "\n").split("\n")).strip()


# The default model's target (a measurement, not a test): on held-out single-line infill, `parallel`
# within this many points of `ar`'s exact match, with at most this share of its forward passes.
TARGET_EXACT_POINTS = 2.0
TARGET_NFE_SHARE = 1 / 3


def target_check(summaries: dict) -> dict | None:
    """The target's two numbers on the line tasks and whether each is met; None without both strategies."""
    par, ar = (summaries.get(s, {}).get("line") for s in ("parallel", "ar"))
    if not par or not ar or not ar.get("mean_nfe"):
        return None
    points = 100.0 * (ar["exact_match"] - par["exact_match"])
    share = par["mean_nfe"] / ar["mean_nfe"]
    return {"tasks": par["n"], "parallel_exact": par["exact_match"], "ar_exact": ar["exact_match"],
            "points_behind_ar": points, "nfe_share_of_ar": share,
            "exact_within_2_points": points <= TARGET_EXACT_POINTS, "nfe_at_most_a_third": share <= TARGET_NFE_SHARE,
            "meaningful": ar["exact_match"] > 0}  # 0 against 0 is "within 2 points" and says nothing


def format_target(t: dict) -> str:
    verdict = "met" if t["exact_within_2_points"] and t["nfe_at_most_a_third"] else "not met"
    note = "" if t["meaningful"] else " (ar's exact match is 0: the comparison says nothing yet)"
    return (f"target on {t['tasks']} line tasks: parallel {t['parallel_exact']:.3f} vs ar {t['ar_exact']:.3f} exact match "
            f"({t['points_behind_ar']:+.1f} points behind), {t['nfe_share_of_ar']:.2f} of ar's forward passes: "
            f"{verdict}{note}")


def exact_match(predicted: str, target: str) -> bool:
    return normalize(predicted) == normalize(target)


def ts_error_count(text: str) -> int:
    """ERROR and MISSING nodes in the tree-sitter parse of `text`."""
    root = _parser().parse(text.encode("utf-8", "surrogatepass")).root_node
    if not root.has_error:
        return 0
    count, stack = 0, [root]
    while stack:
        node = stack.pop()
        if node.type == "ERROR" or node.is_missing:
            count += 1
        if node.has_error:
            stack.extend(node.children)
    return count


def _ast_parses(text: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences and the like are not our concern
            ast.parse(text)
        return True
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False


def parses_ok(prefix: str, predicted: str, suffix: str, target: str) -> bool:
    """The window with the predicted middle parses no worse than with the true middle."""
    original = prefix + target + suffix
    filled = prefix + predicted + suffix
    if _ast_parses(original):
        return _ast_parses(filled)
    return ts_error_count(filled) <= ts_error_count(original)


# --------------------------------------------------------------------------- running


@dataclass
class Record:
    id: str
    kind: str
    config: str  # the name of the sampler setting this record ran under ("parallel", "ar", "t=0.7", ...)
    strategy: str
    middle: str
    exact: bool
    parses: bool
    nfe: int
    steps: int
    tokens: int  # the returned middle's token count (the pad that ends it not included)
    ms: float  # the engine's refinement time (context prefill excluded)
    wall_ms: float  # the whole complete() call on a warm context: tokenize, refine, detokenize
    prefill_ms: float  # computing the task's context once (shared by every config of the task)
    canvas_length: int
    passed: bool | None = None  # execution tasks only
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Config:
    """One sampler setting to measure: a name for tables, the strategy, and overrides of sampler.json."""

    name: str
    strategy: str = "parallel"
    overrides: dict = field(default_factory=dict)


def default_configs(strategies: Sequence[str] = STRATEGIES, **overrides) -> list[Config]:
    given = {k: v for k, v in overrides.items() if v is not None}
    return [Config(s, s, given) for s in strategies]


def run_task(infiller, task: Task, configs: Sequence[Config]) -> list[Record]:
    """Every config on one task. The context is computed once and cached under the task's id, so
    every config starts from the same warm cache and their times compare refinement only."""
    segments = [task.prefix, task.suffix]
    key = f"task:{task.id}"
    t0 = time.perf_counter()
    try:
        infiller.warm(key, segments)
    except ValueError as exc:  # InfillError: a task the model cannot take (too long for its context)
        return [Record(task.id, task.kind, c.name, c.strategy, "", False, False, 0, 0, 0, 0.0, 0.0, 0.0, 0,
                       error=str(exc)) for c in configs]
    prefill_ms = (time.perf_counter() - t0) * 1000.0
    out = []
    for c in configs:
        opts = {"max_tokens": task.max_tokens, **c.overrides, "strategy": c.strategy}
        t0 = time.perf_counter()
        r = infiller.complete(segments, mode=task.mode, cache_key=key, **opts)
        wall = (time.perf_counter() - t0) * 1000.0
        middle = r.middles[0]
        out.append(Record(task.id, task.kind, c.name, c.strategy, middle, exact_match(middle, task.middle),
                          parses_ok(task.prefix, middle, task.suffix, task.middle), r.nfe, r.steps,
                          len(r.tokens[0]) if r.tokens else 0, r.ms, wall, prefill_ms, r.canvas_length))
    return out


def run_tasks(infiller, tasks: Sequence[Task], configs: Sequence[Config],
              progress: Callable[[int, int], None] | None = None) -> list[Record]:
    """Tasks outer, configs inner: a change of machine load hits every config alike."""
    out = []
    for i, task in enumerate(tasks):
        out += run_task(infiller, task, configs)
        if progress is not None:
            progress(i + 1, len(tasks))
    return out


def _pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))]


def summarize(records: Sequence[Record]) -> dict:
    """Rates and means over records of one group (errors count as wrong, their NFE as 0)."""
    n = len(records)
    if n == 0:
        return {"n": 0}
    nfe = sum(r.nfe for r in records)
    tokens = sum(r.tokens for r in records)
    out = {
        "n": n,
        "exact_match": sum(r.exact for r in records) / n,
        "parse_rate": sum(r.parses for r in records) / n,
        "mean_nfe": nfe / n,
        "mean_tokens": tokens / n,
        "tokens_per_pass": tokens / nfe if nfe else 0.0,
        "mean_ms": statistics.fmean(r.ms for r in records),
        "mean_wall_ms": statistics.fmean(r.wall_ms for r in records),
        "p50_wall_ms": _pct([r.wall_ms for r in records], 50),
        "mean_prefill_ms": statistics.fmean(r.prefill_ms for r in records),
        "errors": sum(r.error is not None for r in records),
    }
    ran = [r for r in records if r.passed is not None]
    if ran:
        out["pass_at_1"] = sum(bool(r.passed) for r in ran) / len(ran)
    return out


def _kind_order(kind: str) -> tuple:
    base = kind.replace("exec-", "")
    return kind.startswith("exec-"), KINDS.index(base) if base in KINDS else len(KINDS), kind


def group_summaries(records: Sequence[Record]) -> dict[str, dict[str, dict]]:
    """{config: {kind: summary, ..., "all": summary}}, configs in the order they first appear."""
    out: dict[str, dict[str, dict]] = {}
    for config in dict.fromkeys(r.config for r in records):
        mine = [r for r in records if r.config == config]
        kinds = sorted({r.kind for r in mine}, key=_kind_order)
        out[config] = {k: summarize([r for r in mine if r.kind == k]) for k in kinds}
        out[config]["all"] = summarize(mine)
    return out


def likelihood(infiller, tasks: Sequence[Task]) -> dict[str, dict]:
    """Per kind, the true middles' negative log-likelihood per token (nats) under the model, as the
    `ar` strategy factors it (Infiller.score_middle): it moves long before exact match does, so two
    weak models can be told apart. Strategy-independent: one pass per task.

    Beside the headline figure (middle tokens and the closing PAD together): the middle's own tokens,
    the closing PAD alone (where the model must decide that the middle ends), and the middle's
    tokens as the causal context's next-token head reads them (`score_middle_by_context_head`).
    """
    by_kind: dict[str, list[tuple[dict, dict]]] = {}
    for task in tasks:
        segments = [task.prefix, task.suffix]
        by_kind.setdefault(task.kind, []).append((infiller.score_middle(segments, task.middle),
                                                  infiller.score_middle_by_context_head(segments, task.middle)))

    def figures(scores: list[tuple[dict, dict]]) -> dict:
        canvas = [c for c, _ in scores]
        n_mid = sum(c["tokens"] - 1 for c in canvas)
        return {"n": len(scores),
                "nll_per_token": sum(c["nll"] for c in canvas) / max(1, sum(c["tokens"] for c in canvas)),
                "middle_nll_per_token": sum(sum(c["token_nll"][:-1]) for c in canvas) / max(1, n_mid),
                "end_nll": sum(c["token_nll"][-1] for c in canvas) / max(1, len(canvas)),
                "context_head_nll_per_token": sum(h["nll"] for _, h in scores) / max(1, sum(h["tokens"] for _, h in scores))}

    out = {k: figures(v) for k, v in sorted(by_kind.items(), key=lambda kv: _kind_order(kv[0]))}
    out["all"] = figures([s for v in by_kind.values() for s in v])
    return out


def format_table(summaries: dict[str, dict[str, dict]]) -> str:
    cols = [("n", "n", "{:d}"), ("exact", "exact_match", "{:.3f}"), ("parses", "parse_rate", "{:.3f}"),
            ("pass@1", "pass_at_1", "{:.3f}"), ("NFE", "mean_nfe", "{:.1f}"), ("tok/pass", "tokens_per_pass", "{:.2f}"),
            ("ms", "mean_wall_ms", "{:.0f}")]
    head = f"{'config':<10}{'kind':<12}" + "".join(f"{c[0]:>9}" for c in cols)
    lines = [head, "-" * len(head)]
    for config, kinds in summaries.items():
        for kind, s in kinds.items():
            cells = "".join(f"{(fmt.format(s[key]) if key in s else '-'):>9}" for _, key, fmt in cols)
            lines.append(f"{config:<10}{kind:<12}{cells}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def select(tasks: Sequence[Task], kinds: Sequence[str], limit: int | None) -> list[Task]:
    """The tasks of the given kinds, at most `limit` of each, in file order."""
    out, count = [], dict.fromkeys(kinds, 0)
    for t in tasks:
        if t.kind in count and (limit is None or count[t.kind] < limit):
            count[t.kind] += 1
            out.append(t)
    return out
