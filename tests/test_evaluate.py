"""`dlm-ls eval`: task cutting (seeded, windowed, licensed), the measures, the arithmetic, the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlm_ls.bench import eval as eval_cli
from dlm_ls.model.train import evaluate as E

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus"

FILE_A = '''"""A module."""

import os


def walk(root, depth=0):
    """Yield (depth, path) for every file below root."""
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            yield from walk(path, depth + 1)
        else:
            yield depth, path


class Counter:
    def __init__(self):
        self.total = 0

    def add(self, amount):
        self.total += amount
        return self.total
'''

FILE_B = '''def greet(name):
    message = "hello " + name  # a comment
    print(message)
    return message


if __name__ == "__main__":
    greet("world")
'''


def files():
    return [{"path": "a/walk.py", "package": "pkg-a", "license": "MIT", "text": FILE_A},
            {"path": "b/greet.py", "package": "pkg-b", "license": "BSD-3-Clause", "text": FILE_B}]


# --------------------------------------------------------------------------- cutting


def test_cutting_is_seeded_and_deterministic():
    one = [t.to_dict() for t in E.cut_tasks(files(), 4, seed=7)]
    two = [t.to_dict() for t in E.cut_tasks(files(), 4, seed=7)]
    other = [t.to_dict() for t in E.cut_tasks(files(), 4, seed=8)]
    assert one == two
    assert one != other


def test_cut_tasks_are_real_lines_and_blocks_of_their_file():
    texts = {f["path"]: f["text"] for f in files()}
    tasks = E.cut_tasks(files(), 4, seed=1)
    assert {t.kind for t in tasks} == set(E.KINDS)
    for t in tasks:
        assert t.prefix + t.middle + t.suffix in texts[t.path]
        assert t.license in ("MIT", "BSD-3-Clause") and t.package in ("pkg-a", "pkg-b")
        assert t.mode == E.MODE_OF_KIND[t.kind] and t.max_tokens == E.MAX_TOKENS_OF_KIND[t.kind]
        if t.kind == "line":
            assert "\n" not in t.middle and t.middle == t.middle.strip()
            assert t.prefix.split("\n")[-1].strip() == ""  # the cursor sits after the indentation
            assert t.suffix.startswith("\n") or t.suffix == ""
            assert not t.middle.startswith("#")
        if t.kind == "block":
            assert t.middle.count("\n") >= 1 and len(t.middle) <= E.MAX_BLOCK_CHARS
        if t.kind == "span":
            assert 1 <= len(t.middle) <= E.MAX_SPAN_CHARS and t.middle.strip()


def test_lines_inside_strings_are_not_cut():
    text = 'x = 1\ns = """\ninside a string line\n"""\ny = compute(x)\n'
    tasks = E.cut_tasks([{"path": "s.py", "package": "p", "license": "MIT", "text": text}], 5, kinds=["line"])
    assert tasks and all("inside" not in t.middle for t in tasks)


def test_window_cuts_at_top_level_statements_when_it_can():
    text = "".join(f"def f{i}():\n    return {i}\n\n\n" for i in range(200))
    start = text.index("return 150")
    end = start + len("return 150")
    tree = E._parser().parse(text.encode())
    prefix, suffix = E.window(text, start, end, E._top_level_bounds(tree, text, E._Offsets(text)), 300, 100)
    assert len(prefix) <= 300 + 30 and len(suffix) <= 100
    assert prefix.startswith("def f") and E._ast_parses(prefix + "return 150" + suffix)


def test_cached_task_file_is_small_licensed_and_held_out():
    tasks = E.read_tasks(E.DEFAULT_TASKS)
    assert 100 <= len(tasks) <= 400
    assert E.DEFAULT_TASKS.stat().st_size < 1_500_000
    assert {t.kind for t in tasks} == set(E.KINDS)
    for t in tasks:
        assert t.package in {"filelock", "pluggy", "pygments"} and t.license and t.path
        assert E.parses_ok(t.prefix, t.middle, t.suffix, t.middle)


@pytest.mark.skipif(not (CORPUS / "test.jsonl").exists(), reason="no data/corpus here (the task file is cached)")
def test_cached_task_file_is_what_the_corpus_cuts():
    cached = E.read_tasks(E.DEFAULT_TASKS)
    per_kind = sum(t.kind == "line" for t in cached)
    fresh = E.cut_tasks(E.read_corpus(CORPUS, "test"), per_kind, E.DEFAULT_SEED)
    assert [t.to_dict() for t in fresh] == [t.to_dict() for t in cached]


# --------------------------------------------------------------------------- measures


def test_normalisation_for_exact_match():
    assert E.normalize("  x = 1  \r\n") == "x = 1"
    assert E.exact_match("foo(a)\n", "foo(a)")
    assert E.exact_match("if x:\n    y()   \n\n", "if x:\n    y()")
    assert not E.exact_match("if x:\n  y()", "if x:\n    y()")  # inner indentation counts
    assert not E.exact_match("foo(b)", "foo(a)")


def test_parse_check_uses_ast_when_the_original_parses():
    prefix, suffix = "def f(x):\n    return ", "\n"
    assert E.parses_ok(prefix, "x + 1", suffix, "x")
    assert not E.parses_ok(prefix, "x +", suffix, "x")


def test_parse_check_falls_back_to_tree_sitter_error_counts():
    prefix, suffix = "class A:\n    def f(self):\n        ", "\n"  # a window whose class is cut open
    broken_prefix = "    )\n" + prefix  # the window itself does not parse
    assert not E._ast_parses(broken_prefix + "return 1" + suffix)
    assert E.parses_ok(broken_prefix, "return 2", suffix, "return 1")
    assert not E.parses_ok(broken_prefix, "return (((", suffix, "return 1")
    assert E.ts_error_count("x = (\n") > 0 and E.ts_error_count("x = 1\n") == 0


def _rec(config, kind, exact, nfe, tokens, ms=10.0, parses=True, passed=None):
    return E.Record("t", kind, config, config, "m", exact, parses, nfe, nfe, tokens, ms, ms + 1, 5.0, 8, passed)


def test_summary_arithmetic():
    recs = [_rec("parallel", "line", True, 4, 8), _rec("parallel", "line", False, 2, 2, parses=False),
            _rec("parallel", "exec-line", True, 6, 14, passed=True), _rec("parallel", "exec-line", False, 4, 4, passed=False),
            _rec("ar", "line", True, 9, 8)]
    s = E.group_summaries(recs)
    assert list(s) == ["parallel", "ar"]
    line = s["parallel"]["line"]
    assert line["n"] == 2 and line["exact_match"] == 0.5 and line["parse_rate"] == 0.5
    assert line["mean_nfe"] == 3.0 and line["tokens_per_pass"] == 10 / 6
    assert "pass_at_1" not in line
    assert s["parallel"]["exec-line"]["pass_at_1"] == 0.5
    everything = s["parallel"]["all"]
    assert everything["n"] == 4 and everything["exact_match"] == 0.5
    assert everything["tokens_per_pass"] == (8 + 2 + 14 + 4) / (4 + 2 + 6 + 4)
    assert s["ar"]["all"]["tokens_per_pass"] == 8 / 9
    assert "exact" in E.format_table(s)


# --------------------------------------------------------------------------- the command


def test_eval_command_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    task_file = tmp_path / "tasks.jsonl"
    E.write_tasks(E.cut_tasks(files(), 2, seed=3), task_file)
    out = tmp_path / "eval.json"
    code = eval_cli.main(["--model", str(tiny_model_dir), "--tasks", str(task_file), "--limit", "1", "--device", "cpu",
                   "--threads", "1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "parallel" in printed and "ar" in printed
    data = json.loads(out.read_text())
    assert set(data["summary"]) == {"parallel", "ar"}
    assert len(data["records"]) == 2 * 2  # line + block, two strategies
    for r in data["records"]:
        assert r["nfe"] >= 1 and r["tokens"] >= 0
        if r["strategy"] == "ar":
            assert r["tokens"] <= r["nfe"]  # one token per forward pass at most
    par = [r for r in data["records"] if r["config"] == "parallel"]
    assert data["summary"]["parallel"]["all"]["mean_nfe"] == sum(r["nfe"] for r in par) / len(par)
    assert data["target"]["tasks"] == 1 and "target on 1 line tasks" in printed
    assert data["likelihood"]["all"]["n"] == 2 and data["likelihood"]["line"]["nll_per_token"] > 0


def test_target_check_arithmetic():
    line = lambda exact, nfe: {"line": {"n": 50, "exact_match": exact, "mean_nfe": nfe}}  # noqa: E731
    t = E.target_check({"parallel": line(0.40, 5.0), "ar": line(0.41, 16.0)})
    assert t["points_behind_ar"] == pytest.approx(1.0) and t["nfe_share_of_ar"] == pytest.approx(5 / 16)
    assert t["exact_within_2_points"] and t["nfe_at_most_a_third"] and t["meaningful"]
    assert "met" in E.format_target(t) and "not met" not in E.format_target(t)
    slow = E.target_check({"parallel": line(0.40, 8.0), "ar": line(0.41, 16.0)})
    assert not slow["nfe_at_most_a_third"] and "not met" in E.format_target(slow)
    nothing = E.target_check({"parallel": line(0.0, 5.0), "ar": line(0.0, 16.0)})
    assert not nothing["meaningful"] and "says nothing" in E.format_target(nothing)
    assert E.target_check({"parallel": line(0.1, 5.0)}) is None


def test_eval_writes_tasks_from_a_corpus_folder(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "test.jsonl").write_text("".join(json.dumps(f) + "\n" for f in files()))
    out = tmp_path / "cut.jsonl"
    assert eval_cli.main(["--corpus", str(corpus), "--per-kind", "3", "--write-tasks", str(out)]) == 0
    tasks = E.read_tasks(out)
    assert len(tasks) == 9 and all(t.license for t in tasks)
