"""holes.py: markers, Python ellipsis statements (and the ellipses that are not holes), segments."""

from __future__ import annotations

import pytest

from dlm_ls.lsp_server.holes import find_holes, holes_from_range, segments_around


def texts(text, holes):
    return [text[a:b] for a, b in holes]


def test_marker_holes_in_any_language():
    text = "function f() {\n  <|hole|>\n}\nconst x = <|hole|>;\n"
    holes = find_holes(text, "javascript")
    assert texts(text, holes) == ["<|hole|>", "<|hole|>"]
    assert holes[0][0] == text.index("<|hole|>")


def test_custom_marker_and_disabled_default():
    text = "a = <FILL>\nb = <|hole|>\n"
    assert texts(text, find_holes(text, "python", marker="<FILL>")) == ["<FILL>"]
    assert find_holes(text, "python", marker="") == []


def test_python_ellipsis_statements_are_holes():
    text = (
        "class P:\n"
        "    def f(self) -> tuple[int, ...]: ...\n"   # the body is a hole; the type hint is not
        "    x = f(...)\n"                            # an argument is not
        "\n"
        "def g(a):\n"
        "    if a:\n"
        "        ...\n"
        "    else:\n"
        "        ...;\n"
        "    y = a[...]\n"                            # a subscript is not
        "    ...\n"
        "try:\n"
        "    ...\n"
        "except ValueError:\n"
        "    ...\n"
    )
    holes = find_holes(text, "python")
    assert texts(text, holes) == ["..."] * 6
    lines = [text.count("\n", 0, a) for a, _ in holes]
    assert lines == [1, 6, 8, 10, 12, 14]


def test_ellipsis_off_or_not_python():
    text = "def f():\n    ...\n"
    assert find_holes(text, "python", python_ellipsis=False) == []
    assert find_holes("x := ...\n", "go") == []


def test_ellipsis_as_expression_value_is_not_a_hole():
    text = "x = ...\nprint(...)\nd: dict[str, ...] = {}\nEllipsis\n"
    assert find_holes(text, "python") == []


def test_offsets_are_str_offsets_with_non_ascii():
    text = "s = '😀é'\ndef f():\n    ...\nt = <|hole|>\n"
    holes = find_holes(text, "python")
    assert texts(text, holes) == ["...", "<|hole|>"]


def test_markers_and_ellipses_merge_sorted():
    text = "def f():\n    <|hole|>\n\ndef g():\n    ...\n\nz = <|hole|>\n"
    holes = find_holes(text, "python")
    assert texts(text, holes) == ["<|hole|>", "...", "<|hole|>"]
    assert holes == sorted(holes)


def test_segments_around_rebuild_the_text():
    text = "a <|hole|> b <|hole|> c"
    holes = find_holes(text, "plaintext")
    segments = segments_around(text, holes)
    assert segments == ["a ", " b ", " c"]
    assert "X".join(segments) == text.replace("<|hole|>", "X")
    assert segments_around("abc", []) == ["abc"]
    assert segments_around("<|hole|>", find_holes("<|hole|>", "x")) == ["", ""]


def test_segments_around_rejects_bad_holes():
    with pytest.raises(ValueError):
        segments_around("abcdef", [(3, 4), (1, 2)])
    with pytest.raises(ValueError):
        segments_around("abc", [(2, 9)])


def test_holes_from_range():
    text = "a = 1\nb = 2\nc = 3\n"
    assert holes_from_range(text, 4, 5) == [(4, 5)]
    assert holes_from_range(text, 5, 4) == [(4, 5)]  # a backwards selection
    assert holes_from_range(text, -3, 999) == [(0, len(text) - 1)]  # clamped; final newline kept out
    # Whole lines: the last line break stays outside the hole.
    start, end = text.index("b"), text.index("c")
    assert holes_from_range(text, start, end) == [(start, end - 1)]
    crlf = "x\r\ny\r\n"
    assert holes_from_range(crlf, 0, 3) == [(0, 1)]
    assert holes_from_range(text, 3, 3) == [(3, 3)]  # an empty selection is an insertion point
