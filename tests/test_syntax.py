"""syntax.py: offset conversion and incremental parsing agree with a fresh parse, for every grammar."""

from __future__ import annotations

import random

import pytest

from dlm_ls.lsp_server import syntax
from dlm_ls.lsp_server.syntax import OffsetIndex, SyntaxTree, byte_offset, str_offset, str_offsets

SAMPLES = {
    "python": 'def grüß(x):\r\n    """émoji 😀 doc"""\n    return [x, "ü", \'𝔘\']\n\nclass A:\n    pass\n',
    "javascript": 'function f(a) {\n  const s = "😀ä";\r\n  return a + s.length;\n}\nlet o = { k: [1, 2] };\n',
    "typescript": 'interface P { x: number }\nfunction g(p: P): string {\n  return `v=${p.x} 🎉`;\n}\n',
    "typescriptreact": 'export const A = () => <div title="é">{"😀"}</div>;\nfunction h() { return 1; }\n',
    "rust": 'fn main() {\n    let s = "ünï 😀";\r\n    println!("{}", s.len());\n}\nstruct P { x: i32 }\n',
    "go": 'package main\n\nfunc main() {\n\ts := "日本語 😀"\n\tprintln(len(s))\n}\n',
    "lua": 'local t = { a = 1, b = "ö😀" }\nfunction f(x)\n  if x then return t end\nend\n',
}

FRAGMENTS = ["x", "😀", "é", "日本", "\r\n", "\n", "(", ")", "{", "}", " ", "\"", "'", "𝔘a", "foo(",
             "return 1", "\n    ", ";", "a😀b\r\nc", "", "[1, 2]", "--", "#", "//"]


def node_spans(tree) -> list[tuple]:
    out, stack = [], [tree.root_node]
    while stack:
        n = stack.pop()
        out.append((n.type, n.start_byte, n.end_byte, n.start_point, n.end_point, n.is_missing))
        stack.extend(reversed(n.children))
    return out


def random_edit(rng: random.Random, text: str) -> tuple[int, int, str]:
    start = rng.randint(0, len(text))
    old_end = min(len(text), start + rng.choice([0, 0, 1, 2, 5, 20]))
    new = "".join(rng.choice(FRAGMENTS) for _ in range(rng.choice([0, 1, 1, 2, 4])))
    return start, old_end, new


@pytest.mark.parametrize("language_id", sorted(SAMPLES))
def test_incremental_parse_equals_fresh_parse(language_id):
    rng = random.Random(hash(language_id) % 1000)
    text = SAMPLES[language_id] * 3
    doc = SyntaxTree(language_id, text)
    assert doc.supported
    for step in range(120):
        start, old_end, new = random_edit(rng, text)
        text = text[:start] + new + text[old_end:]
        doc.apply_edit(start, old_end, new, text)
        if step % 30 == 29:
            assert node_spans(doc.tree) == node_spans(syntax.parse(language_id, text))
    fresh = syntax.parse(language_id, text)
    assert str(doc.tree.root_node) == str(fresh.root_node)
    assert node_spans(doc.tree) == node_spans(fresh)
    assert doc.text == text


def test_incremental_with_tiny_checkpoints(monkeypatch):
    # Small checkpoint gaps exercise the patched index (shifts, dropped checkpoints, rebuilds).
    monkeypatch.setattr(syntax, "CHECKPOINT_CHARS", 7)
    monkeypatch.setattr(syntax, "MAX_GAP_CHARS", 30)
    rng = random.Random(3)
    text = SAMPLES["python"] * 4
    doc = SyntaxTree("python", text)
    for _ in range(200):
        start, old_end, new = random_edit(rng, text)
        text = text[:start] + new + text[old_end:]
        doc.apply_edit(start, old_end, new, text)
        for off in rng.sample(range(len(text) + 1), 5):
            assert doc.index.locate(off) == naive_locate(text, off)
    assert node_spans(doc.tree) == node_spans(syntax.parse("python", text))


def naive_locate(text: str, off: int) -> tuple[int, tuple[int, int]]:
    before = text[:off].encode("utf-8")
    line = before.rsplit(b"\n", 1)[-1]
    return len(before), (before.count(b"\n"), len(line))


def test_offset_index_matches_naive_conversion(monkeypatch):
    monkeypatch.setattr(syntax, "CHECKPOINT_CHARS", 5)
    text = "a😀\r\nb日本\n\n𝔘 é\r\n" * 7
    index = OffsetIndex(text)
    for off in range(len(text) + 1):
        assert index.locate(off) == naive_locate(text, off)
        assert byte_offset(text, off) == len(text[:off].encode())


def test_byte_and_str_offsets_round_trip():
    text = "x😀y\r\né日"
    for off in range(len(text) + 1):
        assert str_offset(text, byte_offset(text, off)) == off
    bytes_ = [byte_offset(text, off) for off in range(len(text) + 1)]
    assert str_offsets(text, bytes_) == list(range(len(text) + 1))
    assert str_offset(text, 2) == 1  # a byte inside 😀 maps to the emoji's own offset
    assert str_offsets("ascii", [0, 3]) == [0, 3]


def test_inconsistent_edit_falls_back_to_full_parse():
    doc = SyntaxTree("python", "x = 1\n")
    doc.apply_edit(0, 1, "yy", "z = 2\n")  # length does not add up: trust text_after
    assert doc.text == "z = 2\n"
    assert str(doc.tree.root_node) == str(syntax.parse("python", "z = 2\n").root_node)


def test_unsupported_language_tracks_text_without_tree():
    doc = SyntaxTree("cobol", "MOVE A TO B.\n")
    assert not doc.supported and doc.tree is None
    doc.apply_edit(0, 4, "ADD", "ADD A TO B.\n")
    assert doc.text == "ADD A TO B.\n"
    assert doc.node_at(0) is None and doc.error_count() == 0 and not doc.has_error


@pytest.mark.parametrize("language_id", ["python", "javascript", "typescript", "typescriptreact",
                                         "tsx", "javascriptreact", "rust", "go", "lua"])
def test_all_declared_languages_load(language_id):
    assert syntax.is_supported(language_id)


def test_node_at_and_errors():
    text = 'x = "héllo 😀"\nfoo(\n'
    doc = SyntaxTree("python", text)
    assert doc.node_at(text.index("😀"), named=True).type in ("string_content", "string")
    assert doc.has_error and doc.error_count() >= 1
    ok = SyntaxTree("python", "foo(1)\n")
    assert ok.error_count() == 0
    assert ok.error_count_with_insert(5, ", (") > 0
    assert ok.error_count_with_insert(5, ", 2") == 0
    assert ok.text == "foo(1)\n" and ok.error_count() == 0  # the document's own tree is untouched


def test_crlf_rows_count_newlines_only():
    text = "a\r\nb😀\r\nc"
    doc = SyntaxTree("python", text)
    assert doc.index.locate(text.index("c")) == (len("a\r\nb😀\r\n".encode()), (2, 0))
    assert doc.index.locate(text.index("😀") + 1) == (len("a\r\nb😀".encode()), (1, 5))


def test_syntax_modules_do_not_import_torch():
    import subprocess
    import sys
    code = ("import sys; import dlm_ls.lsp_server.syntax, dlm_ls.lsp_server.regions, "
            "dlm_ls.lsp_server.postprocess, dlm_ls.lsp_server.holes, dlm_ls.lsp_server.extra_context; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
