"""The VS Code extension inside a real VS Code: code-server in headless Chromium, driven by Playwright.

`make test-vscode` runs it (DLM_LS_VSCODE_UI=1; plain `pytest` skips it: the first setup takes
minutes). tests/ui_env.py provides code-server 4.139 on Node 24, Playwright and the .vsix built
from the working tree; code-server runs on loopback with the extension installed, and the
extension starts the real `dlm-ls serve` (the shipped model, in process) through tests/lsp_tap.py, which
logs every LSP message. The tests read the editor from the DOM, the file from disk, and what
went over the wire from the tap's log; the server's own log counts its model calls.

The tests run in order, in one editor session (each leaves the editor where the next starts).
Screenshots go to out/vscode-ui/.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import ui_env
from code_server import REFINEMENT_JS, OBSERVE_JS, session

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "out" / "vscode-ui"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("DLM_LS_VSCODE_UI") != "1", reason="run with `make test-vscode`"),
]

# The shipped model, greedy (so the same text gets the same suggestion): random test models write
# no words to accept one at a time. Without the parse filter a partial line is shown, not dropped.
MODEL = ROOT / "model" / "default"
SERVER_SETTINGS = {"parseFilter": False, "speculative": False, "warm": False, "minTokens": 2}
BEFORE, TRIGGER, AFTER = "def greet(name):\n    ", "print(", "\n"
# Cursors tried, in turn, until the shipped model suggests a word and then more (what word accept
# needs), so that a retrained model that answers one of them differently still finds one: stage 3
# answered `None):` after `print(`, stage 4 `):` there and `x)` after `math.sqrt(`. Stage 5 ends
# most lines after one token (`)`, `name`), so these tests ask for at least two (`minTokens` in
# SERVER_SETTINGS, a user's setting like any other): stage 5 then answers `self)`, `x)`, `name)`, `path()`.
WORD_CURSORS = [(BEFORE, TRIGGER), ("def norm(x, y):\n    return ", "math.sqrt("),
                ("def scale(values, factor):\n    return [", "round("),
                ("import os\n\ndef main():\n    path = ", "os.path."),
                ("class Point:\n    def __init__(self, x, y):\n        ", "self.")]
HOLES = "def add(a, b):\n    return <|hole|>\n"
FILES = {"example.py": "", "holes.py": HOLES}


@pytest.fixture(scope="module")
def editor(tmp_path_factory):
    try:
        with session(tmp_path_factory.mktemp("vscode-ui"), MODEL,
                     {"dlm.debounceMs": 50, "dlm.extraSettings": SERVER_SETTINGS}, FILES, ARTIFACTS) as e:
            yield e
    except ui_env.Unavailable as exc:
        pytest.skip(str(exc))


def suggest(editor, before: str = BEFORE, trigger: str = TRIGGER) -> str:
    """Make the file `before` + AFTER, type `trigger` between them, and wait for the suggestion."""
    editor.page.keyboard.press("Escape")
    editor.page.keyboard.press("Control+a")
    editor.page.keyboard.press("Delete")
    editor.page.keyboard.insert_text(before + AFTER)
    for _ in AFTER:
        editor.page.keyboard.press("ArrowLeft")
    return editor.type_until_ghost([trigger])


def test_status_bar_shows_model_and_device(editor):
    editor.open("example.py")
    item = editor.page.locator(".statusbar-item", has_text=f"{MODEL.name} · cpu")
    item.first.wait_for(state="visible", timeout=120000)
    editor.shot("status-bar")


def test_ghost_text_is_the_servers_item(editor):
    ghost = suggest(editor)
    rid, item = editor.tap.last_item()
    assert ghost == item, (ghost, item)  # the item starts at the cursor: all of it is shown
    editor.shot("ghost-text")


def test_tab_accepts_and_the_file_holds_it(editor):
    ghost = suggest(editor)
    editor.page.keyboard.press("Tab")
    editor.wait(lambda: editor.ghost() != ghost, 5, "the ghost text to go")
    assert editor.saved("example.py") == BEFORE + TRIGGER + ghost + AFTER


def test_escape_dismisses(editor):
    suggest(editor)
    editor.page.keyboard.press("Escape")
    editor.wait(lambda: editor.ghost() is None, 5, "the ghost text to go")
    editor.page.wait_for_timeout(500)
    assert editor.ghost() is None
    assert editor.saved("example.py") == BEFORE + TRIGGER + AFTER


def test_typing_through_keeps_the_rest_without_a_model_call(editor):
    ghost = suggest(editor)
    assert len(ghost) >= 2, ghost
    calls = editor.model_calls()
    editor.page.keyboard.type(ghost[0])
    editor.wait(lambda: editor.ghost() == ghost[1:], 10, "the rest of the suggestion")
    editor.page.wait_for_timeout(800)  # past the debounce: a new request would have been answered
    assert editor.ghost() == ghost[1:]
    assert editor.model_calls() == calls
    assert editor.tap.last_item()[1] == ghost[1:]  # the server answered the rest, from what it showed


def test_vscode_word_accept_and_line_accept_on_our_items(editor):
    seen = []
    for before, trigger in WORD_CURSORS:
        ghost = suggest(editor, before, trigger)
        seen.append(ghost)
        if re.match(r"\w+\W", ghost):  # a word, then more
            break
    else:
        pytest.fail(f"the model suggests no word followed by more at any of the cursors tried: {seen}")
    editor.page.keyboard.press("Control+ArrowRight")
    word = re.match(r"\w+", ghost).group(0)
    editor.wait(lambda: editor.ghost() == ghost[len(word):], 5, "the rest after a word")
    assert editor.saved("example.py") == before + trigger + word + AFTER
    editor.shot("word-accepted")
    editor.page.keyboard.press("Alt+End")
    editor.wait(lambda: editor.ghost() is None, 5, "the line to be accepted")
    assert editor.saved("example.py") == before + trigger + ghost.split("\n")[0] + AFTER


def test_a_settings_change_reaches_the_server(editor):
    editor.page.keyboard.press("Escape")
    editor.command("Preferences: Open Settings (UI)")
    editor.page.locator(".settings-editor").wait_for(state="visible")
    editor.page.wait_for_timeout(500)
    editor.page.keyboard.type("dlm.showRefinement")  # the search box has the focus
    item = editor.page.locator(".settings-editor .setting-item-bool", has_text="Show Refinement")
    item.wait_for(state="visible")
    editor.shot("settings")
    item.locator(".setting-value-checkbox").click()
    sent = editor.wait(lambda: [p for p in editor.tap.notifications("workspace/didChangeConfiguration", "client")
                                if (p.get("settings") or {}).get("dlm", {}).get("streamRefinement") is True],
                       10, "didChangeConfiguration with streamRefinement")
    assert sent[-1]["settings"]["dlm"]["parseFilter"] is False  # dlm.extraSettings go with it
    for _ in range(3):  # the settings open over the editor; Escape closes them
        if not editor.page.locator(".settings-editor").is_visible():
            break
        editor.page.keyboard.press("Escape")
        editor.page.wait_for_timeout(300)
    editor.page.locator(".settings-editor").wait_for(state="hidden")


def test_refinement_steps_are_drawn_in_order_then_the_item(editor):
    editor.page.locator(".tab.active", has_text="example.py").wait_for(state="visible")
    editor.focus()
    editor.page.evaluate(OBSERVE_JS, REFINEMENT_JS)
    seen_before = len(editor.tap.notifications("dlm/refinement"))
    # A text not asked about before: the answer comes from the model, step by step, not the cache.
    ghost = suggest(editor, "# refined\n" + BEFORE)
    rid, item = editor.tap.last_item()
    frames = [f for f in editor.tap.notifications("dlm/refinement")[seen_before:] if f["id"] == rid]
    assert len(frames) >= 2, frames
    states = [s["runs"] for s in editor.page.evaluate("window.__dlmStates") if s["runs"]]
    drawn = ["".join(r["text"] for r in runs) for runs in states]
    expected = [f["text"][0].split("\n")[0] + (" …" if "\n" in f["text"][0] else "") for f in frames]
    # What was drawn is the request's steps in order (a quick step may be painted over unseen).
    # Each run is a decoration of its own, so a step may be caught half painted: its first runs.
    whole = [d for d in drawn if d in expected]
    it = iter(expected)
    assert len(whole) >= 2 and all(d in it for d in whole), (drawn, expected)
    assert all(any(e.startswith(d) for e in expected) for d in drawn), (drawn, expected)
    for runs in states:  # undecided slots dimmed, decided ones not
        for r in runs:
            assert (r["opacity"] < 1) == (set(r["text"]) <= {"\u2591", " ", "…"}), runs
    # The item replaced the steps.
    assert not editor.refinement()
    assert ghost == item
    editor.shot("refinement-final")


def test_a_keystroke_clears_the_steps(editor):
    editor.page.evaluate(OBSERVE_JS, REFINEMENT_JS)
    for n in range(5):  # new texts, so that the model is asked
        editor.page.keyboard.press("Control+a")
        editor.page.keyboard.insert_text(f"# try {n}\n" + BEFORE + AFTER)
        for _ in AFTER:
            editor.page.keyboard.press("ArrowLeft")
        editor.page.keyboard.type(TRIGGER)
        try:
            editor.wait(lambda: editor.refinement(), 10, "a refinement step to be drawn")
        except AssertionError:
            continue
        t_key = editor.page.evaluate("performance.now()")
        editor.page.keyboard.type("x")
        break
    else:
        raise AssertionError("no refinement step was drawn")
    editor.shot("refinement-step")
    states = editor.wait(lambda: [s for s in editor.page.evaluate("window.__dlmStates")
                                  if s["t"] >= t_key and s["runs"] == []], 5, "the steps to be cleared")
    # Cleared at once. (A step already on its way when the key went down may still be painted
    # first, a few milliseconds before the keystroke reaches the extension.)
    assert states[0]["t"] - t_key < 500, states[:3]
    assert editor.tap.requests("$/cancelRequest"), "the request in flight was not cancelled"
    editor.page.keyboard.press("Escape")


def test_fill_holes_applies_through_workspace_apply_edit(editor):
    editor.open("holes.py")
    editor.command("dlm-ls: Fill Holes or Selection")
    edits = editor.wait(lambda: [m for m in editor.tap.messages()
                                 if m["from"] == "server" and m["msg"].get("method") == "workspace/applyEdit"],
                        60, "workspace/applyEdit")
    answer = editor.wait(lambda: editor.tap.response(edits[-1]["msg"]["id"], side="client"), 10, "the applyEdit answer")
    assert answer["result"]["applied"] is True, answer
    assert [r for r in editor.tap.requests("workspace/executeCommand") if r["params"]["command"] == "dlm.fill"]
    text = editor.saved("holes.py")
    assert "<|hole|>" not in text and text.startswith("def add(a, b):\n    return "), text
    editor.shot("fill-holes")
