"""postprocess.py: golden cases per rule (tests/golden/postprocess/<rule>/*.txt) and choose_best."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dlm_ls.lsp_server.postprocess import choose_best, clean_completion
from dlm_ls.lsp_server.regions import Region, decide_region
from dlm_ls.lsp_server.syntax import SyntaxTree, is_supported

GOLDEN = Path(__file__).parent / "golden" / "postprocess"
CURSOR = "█"
DROPPED = "<dropped>"


def parse_golden(path: Path) -> dict:
    """Sections of a golden file: `--- name: value` headers, `--- name` / `--- name: repr` bodies."""
    case: dict = {}
    name, body, literal = None, [], False

    def close():
        if name is not None:
            content = "\n".join(body)
            case[name] = ast.literal_eval(content.strip()) if literal else content

    for line in path.read_text(encoding="utf-8").removesuffix("\n").split("\n"):
        if line.startswith("--- "):
            close()
            key, _, value = line[4:].partition(":")
            key, value = key.strip(), value.strip()
            name, body, literal = None, [], False
            if value and value != "repr":
                case[key] = value
            else:
                name, literal = key, value == "repr"
        elif name is not None:
            body.append(line)
    close()
    if "text" in case and not _is_repr(path, "text"):
        case["text"] += "\n"
    return case


def _is_repr(path: Path, section: str) -> bool:
    return f"--- {section}: repr" in path.read_text(encoding="utf-8")


def golden_params():
    params = []
    for path in sorted(GOLDEN.glob("*/*.txt")):
        case = parse_golden(path)
        modes = case.get("modes", "tree,plain").split(",")
        if not is_supported(case["language"]):
            modes = ["plain"]
        for mode in (m.strip() for m in modes):
            params.append(pytest.param(path, mode, id=f"{path.parent.name}/{path.stem}-{mode}"))
    return params


def test_every_rule_has_three_cases():
    rules = [d for d in GOLDEN.iterdir() if d.is_dir()]
    assert len(rules) >= 8
    for rule in rules:
        assert len(list(rule.glob("*.txt"))) >= 3, rule.name


@pytest.mark.parametrize("path,mode", golden_params())
def test_golden(path, mode):
    case = parse_golden(path)
    lang, marked = case["language"], case["text"]
    offset, text = marked.index(CURSOR), marked.replace(CURSOR, "")
    tree = SyntaxTree(lang, text) if mode == "tree" else None
    kind = case.get("region", "auto")
    region = decide_region(text, offset, lang, tree) if kind == "auto" else getattr(Region, kind)("golden")
    got = clean_completion(text, offset, case["middle"], lang, region, tree)
    expected = None if case.get("expected") == DROPPED else case["expected"]
    assert got == expected


def split(marked: str) -> tuple[str, int]:
    return marked.replace(CURSOR, ""), marked.index(CURSOR)


def test_region_none_gives_nothing():
    text, offset = split("fo█o\n")
    assert clean_completion(text, offset, "bar", "python", Region.none("mid-word")) is None


def test_choose_best_prefers_first_candidate_that_parses():
    text, offset = split("def f(x):\n    █\n")
    region = Region.block("test")
    tree = SyntaxTree("python", text)
    # The first (best-scored) candidate was cut off mid-expression by its short canvas.
    candidates = ["return foo(x,", "return foo(x, 1)", "return 0"]
    assert choose_best(text, offset, candidates, "python", region, tree) == "return foo(x, 1)"
    assert choose_best(text, offset, candidates, "python", region) == "return foo(x, 1)"  # parses itself


def test_choose_best_keeps_best_when_it_parses_and_drops_when_none_do():
    text, offset = split("x = █\n")
    region = Region.line("test")
    assert choose_best(text, offset, ["1", "2"], "python", region) == "1"
    # `x = ` already fails to parse: a truncated candidate is no worse, but one that parses wins.
    assert choose_best(text, offset, ["(1 +", "1"], "python", region) == "1"
    assert choose_best(text, offset, ["(1 +", "[2,"], "python", region) == "(1 +"
    text, offset = split("x = 1█\n")
    assert choose_best(text, offset, [" +", "[2,"], "python", region) is None


def test_choose_best_compares_against_existing_errors():
    # The file is already broken elsewhere; a candidate that adds no error is still fine.
    text, offset = split("x = █\ndef broken(:\n")
    assert choose_best(text, offset, ["1"], "python", Region.line("test")) == "1"


def test_choose_best_skips_empty_and_duplicate_candidates():
    text, offset = split("print(█)\n")
    region = Region.line("test")
    assert choose_best(text, offset, ["   ", ")", '"a")'], "python", region) == '"a"'


def test_choose_best_without_grammar_takes_first_cleaned():
    text, offset = split("int main() {\n  █\n}\n")
    assert choose_best(text, offset, ["  ", "return 0;\n}"], "c", Region.block("test")) == "return 0;"
