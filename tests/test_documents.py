"""The document store: positions in three encodings, incremental edits, the context window."""

from __future__ import annotations

import random

import pytest

from dlm_ls.lsp_server.documents import (
    UTF8, UTF16, UTF32, Document, DocumentStore, col_to_index, index_to_col, word_start)
from dlm_ls.model.prompt import line_window as context_window
from dlm_ls.lsp_server.errors import DlmError


def fresh_starts(text: str) -> list[int]:
    """Line starts computed the slow, obvious way."""
    starts = [0]
    i = 0
    while i < len(text):
        if text[i] == "\r" and i + 1 < len(text) and text[i + 1] == "\n":
            i += 2
            starts.append(i)
        elif text[i] in "\r\n":
            i += 1
            starts.append(i)
        else:
            i += 1
    return starts


@pytest.mark.parametrize("encoding,col,index", [
    (UTF16, 0, 0), (UTF16, 2, 2), (UTF16, 4, 3), (UTF16, 5, 4), (UTF16, 3, 2),  # 3 = inside the pair
    (UTF8, 2, 2), (UTF8, 6, 3), (UTF8, 8, 4), (UTF8, 4, 2),
    (UTF32, 3, 3), (UTF32, 99, 5),
])
def test_columns_round_down_inside_a_character(encoding, col, index):
    line = "ab😀cé"  # 😀: 2 UTF-16 units, 4 UTF-8 bytes; é: 2 UTF-8 bytes
    assert col_to_index(line, col, encoding) == index


def test_index_to_col_each_encoding():
    line = "ab😀cé!"
    assert [index_to_col(line, i, UTF16) for i in range(7)] == [0, 1, 2, 4, 5, 6, 7]
    assert [index_to_col(line, i, UTF8) for i in range(7)] == [0, 1, 2, 6, 7, 9, 10]
    assert [index_to_col(line, i, UTF32) for i in range(7)] == list(range(7))


def test_only_lsp_line_breaks_split_lines():
    doc = Document("u", "a\nb\r\nc\rd\u2028e\x0cf\n")
    assert doc.starts == [0, 2, 5, 7, 13]
    assert [doc.line_text(i) for i in range(doc.line_count)] == ["a", "b", "c", "d\u2028e\x0cf", ""]


def test_positions_round_trip_utf16_with_emoji():
    doc = Document("u", "x = '😀'\ny = 1\n")
    off = doc.offset_at((0, 8))  # after the closing quote: x, space, =, space, ', 😀 (2 units), '
    assert doc.text[off - 1] == "'" and doc.text[off - 2] == "😀"
    assert doc.position_at(off) == (0, 8)
    assert doc.offset_at((1, 5)) == len("x = '😀'\ny = 1")


def test_character_past_line_end_clamps_and_line_past_end_is_strict():
    doc = Document("u", "ab\ncd")
    assert doc.offset_at((0, 50)) == 2
    assert doc.offset_at((9, 0)) == 5
    with pytest.raises(DlmError) as err:
        doc.offset_at((9, 0), strict=True)
    assert err.value.code == "invalid_position"
    with pytest.raises(DlmError):
        doc.offset_at((-1, 0), strict=True)


def test_incremental_edits_with_surrogate_pairs():
    doc = Document("u", "a😀b\n")
    doc.apply(((0, 3), (0, 3)), "😀")  # after the first emoji (UTF-16 column 3)
    assert doc.text == "a😀😀b\n"
    doc.apply(((0, 1), (0, 3)), "")  # delete the first emoji
    assert doc.text == "a😀b\n"
    doc.apply(((0, 4), (1, 0)), "\r\nz")
    assert doc.text == "a😀b\r\nz"
    assert doc.position_at(len(doc.text)) == (1, 1)


def test_incremental_edits_match_a_fresh_parse():
    rng = random.Random(7)
    alphabet = ["a", "b", " ", "\n", "\r", "\r\n", "😀", "é", "\t"]
    for encoding in (UTF16, UTF8, UTF32):
        doc = Document("u", "", encoding=encoding)
        for _ in range(400):
            n = len(doc.text)
            a = rng.randint(0, n)
            b = rng.randint(a, min(n, a + 6))
            new = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5)))
            pa, pb = doc.position_at(a), doc.position_at(b)
            # an offset between "\r" and "\n" is no position: it rounds down to the line's end
            a, b = doc.offset_at(pa), doc.offset_at(pb)
            expect = doc.text[:a] + new + doc.text[b:]
            doc.apply((pa, pb), new)
            assert doc.text == expect
            assert doc.starts == fresh_starts(doc.text)


def test_store_full_and_incremental_and_close():
    store = DocumentStore(UTF16)
    store.open("file:///a.py", "def f():\n    pass\n", "python", 1)
    store.change("file:///a.py", 2, [(((1, 4), (1, 8)), "return 1")])
    assert store.get("file:///a.py").text == "def f():\n    return 1\n"
    store.change("file:///a.py", 3, [(None, "x = 1\n")])
    doc = store.get("file:///a.py")
    assert (doc.text, doc.version, doc.line_count) == ("x = 1\n", 3, 2)
    store.close("file:///a.py")
    with pytest.raises(DlmError) as err:
        store.get("file:///a.py")
    assert err.value.code == "unknown_document"


def test_context_window_is_bounded_and_cut_at_lines():
    text = "".join(f"line {i}\n" for i in range(10_000))
    offset = text.index("line 5000\n") + 4
    prefix, suffix = context_window(text, offset, 1000)
    assert len(prefix) <= 1000 and len(suffix) <= 1000
    assert prefix.startswith("line ") and prefix.endswith("line") and suffix.endswith("\n")
    assert text[offset - len(prefix):offset + len(suffix)] == prefix + suffix
    assert context_window("abc", 1, 1000) == ("a", "bc")


def test_word_start():
    assert word_start("x = foo_bar1", 12) == 4
    assert word_start("x = ", 4) == 4


def test_large_document_edits_stay_fast():
    import time

    text = "print('hello world')  # some comment\n" * 140_000  # ~5 MB
    doc = Document("u", text)
    t0 = time.perf_counter()
    for i in range(50):
        doc.apply(((70_000 + i, 0), (70_000 + i, 0)), "x")
    assert (time.perf_counter() - t0) / 50 < 0.05
    assert doc.line_count == 140_001


@pytest.mark.parametrize("encoding", [UTF16, UTF8, UTF32])
def test_lone_surrogates_become_replacement_characters_at_the_same_positions(encoding, caplog):
    store = DocumentStore(encoding)
    text = "a = '\udc00'\nb = '\ud83d' + 'é'\n"
    doc = store.open("file:///s.py", text)
    assert doc.text == "a = '\ufffd'\nb = '\ufffd' + 'é'\n"
    doc.text.encode("utf-8")  # encodable everywhere downstream
    for offset in range(len(text) + 1):  # every position means the same character as in the client's text
        line = text.count("\n", 0, offset)
        head = text[text.rfind("\n", 0, offset) + 1: offset]
        col = {UTF16: len(head.encode("utf-16-le", "surrogatepass")) // 2,
               UTF8: len(head.encode("utf-8", "surrogatepass")), UTF32: len(head)}[encoding]
        assert doc.offset_at((line, col)) == offset
    store.change("file:///s.py", 2, [(((1, 0), (1, 0)), "\udfff")])  # edits are made safe too
    assert doc.text.startswith("a = '\ufffd'\n\ufffdb")
    warnings = [r for r in caplog.records if "lone UTF-16 surrogate" in r.getMessage()]
    assert len(warnings) == 1  # once per document, not per edit


def test_a_document_above_the_size_limit_is_refused_at_open(caplog):
    from dlm_ls.worker.protocol import LIMITS

    assert DocumentStore().max_chars == LIMITS.max_document_chars
    store = DocumentStore(max_chars=100)
    assert store.open("file:///ok.py", "x" * 100) is not None
    with caplog.at_level("WARNING", logger="dlm_ls.documents"):
        assert store.open("file:///big.py", "x" * 101, "python") is None
    assert [r.getMessage() for r in caplog.records] == [
        "didOpen refused: document file:///big.py is 101 characters, above the limit max_document_chars=100; "
        "dlm-ls does not complete in it"]
    assert "file:///big.py" not in store.docs and len(store) == 1
    with pytest.raises(DlmError) as err:
        store.get("file:///big.py")
    assert err.value.code == "too_large" and "max_document_chars=100" in err.value.message
    # Edits to it are dropped quietly; closing it forgets it.
    assert store.change("file:///big.py", 2, [(((0, 0), (0, 0)), "y")]) is None
    store.close("file:///big.py")
    with pytest.raises(DlmError) as err:
        store.get("file:///big.py")
    assert err.value.code == "unknown_document"


def test_a_document_that_grows_past_the_limit_is_let_go_and_a_whole_text_that_fits_brings_it_back(caplog):
    store = DocumentStore(max_chars=100)
    store.open("file:///a.py", "x" * 90, "python")
    assert store.change("file:///a.py", 2, [(((0, 90), (0, 90)), "y" * 10)]).text == "x" * 90 + "y" * 10
    with caplog.at_level("WARNING", logger="dlm_ls.documents"):
        assert store.change("file:///a.py", 3, [(((0, 100), (0, 100)), "z")]) is None
    assert len(caplog.records) == 1 and "101 characters" in caplog.records[0].getMessage()
    with pytest.raises(DlmError, match="max_document_chars=100"):
        store.get("file:///a.py")
    assert store.change("file:///a.py", 4, [(None, "w" * 200)]) is None  # still too large
    doc = store.change("file:///a.py", 5, [(None, "small\n"), (((1, 0), (1, 0)), "more")])
    assert doc is store.get("file:///a.py") and doc.text == "small\nmore"
    assert (doc.version, doc.language_id, doc.line_count) == (5, "python", 2)
