"""Free suggestions and multi-hole fill, end to end: the real `dlm-ls serve`, the real worker, a tiny model.

"No model call" is counted twice: the server's own counters (`dlm/status` policy) and the worker's
job counter, which every infill request that reaches the engine increments. The scheduler tests at
the end run in this process.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import Counter
from typing import Union

import pytest
from lsprotocol import types as lsp

from dlm_ls.worker.protocol import InfillRequest

from test_lsp_e2e import FAST, plain, session, stop_workers, utf16_position

SOURCE = "import os\n\n\ndef add(a, b):\n    return a\n"
HELPERS = 'def clamp_value(value, lower, upper):\n    """Keep value within bounds."""\n    return max(lower, min(upper, value))\n'
TWO_HOLES = "def add(a, b):\n    return <|hole|>\n\n\ndef sub(a, b):\n    ...\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run6")
    yield run
    stop_workers(run)


async def counters(s) -> tuple[Counter, Counter]:
    """The server's and the worker's counters (a counter never bumped reads 0)."""
    status = await s.status()
    return Counter(status["policy"]["counters"]), Counter(status["worker"]["counters"])


async def until(s, check, timeout: float = 30.0) -> dict:
    """Poll dlm/status until `check(status)` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status = await s.status()
        if check(status):
            return status
        assert loop.time() < deadline, f"timed out; policy: {status['policy']}"
        await asyncio.sleep(0.05)


def insert(s, uri: str, text: str, offset: int, new: str, version: int) -> str:
    at = utf16_position(text, offset)
    s.client.text_document_did_change(lsp.DidChangeTextDocumentParams(
        text_document=lsp.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[lsp.TextDocumentContentChangePartial(range=lsp.Range(start=at, end=at), text=new)]))
    return text[:offset] + new + text[offset:]


# --------------------------------------------------------------------------- free suggestions


@pytest.mark.slow
async def test_type_through_then_accept_are_served_without_a_model_call(tiny_model_dir, run_dir):
    async with session(tiny_model_dir, run_dir, {**FAST, "warm": False}) as s:
        uri = "file:///w/accept.py"
        s.open(uri, SOURCE)
        text, at = SOURCE, SOURCE.index("return a") + len("return a")
        first = await s.inline(uri, utf16_position(text, at))
        suggestion = first.items[0].insert_text
        assert len(suggestion) >= 2, suggestion
        # The next suggestion, as if this one were accepted, is computed in the background.
        await until(s, lambda st: st["policy"]["counters"].get("speculations_done", 0) == 1)
        policy0, worker0 = await counters(s)
        assert policy0["model_calls"] == 1 and worker0["jobs"] >= 2

        # Type the suggestion's first character: its rest comes back at once.
        text = insert(s, uri, text, at, suggestion[0], 2)
        typed = await s.inline(uri, utf16_position(text, at + 1))
        assert [i.insert_text for i in typed.items] == [suggestion[1:]]
        assert typed.items[0].range.start == utf16_position(text, at + 1)

        # Accept the rest: the speculative suggestion is the answer.
        text = insert(s, uri, text, at + 1, suggestion[1:], 3)
        await s.inline(uri, utf16_position(text, at + len(suggestion)))
        # ... and the one after it is being computed already (repeated accepts stay instant).
        await until(s, lambda st: st["policy"]["counters"].get("speculations_done", 0) == 2)
        policy1, worker1 = await counters(s)
        assert policy1["type_through_hits"] == 1 and policy1["speculative_hits"] == 1
        assert policy1["model_calls"] == policy0["model_calls"]  # no model call from the server ...
        assert worker1["jobs"] == worker0["jobs"] + 1  # ... and the worker's one new job is that speculation
        status = await s.status()
        assert status["policy"]["hits"]["speculative"] == 1 and status["last_request"]["source"] == "speculative"


@pytest.mark.slow
async def test_a_context_seen_before_is_a_cache_hit_in_any_document(tiny_model_dir, run_dir):
    # No extra context: with both files open, each would show the model the other, a different context.
    options = {**FAST, "speculative": False, "warm": False, "extraContextChars": 0}
    async with session(tiny_model_dir, run_dir, options) as s:
        a, b = "file:///w/cache_a.py", "file:///w/cache_b.py"
        s.open(a, SOURCE)
        end = utf16_position(SOURCE, SOURCE.index("return a") + len("return a"))
        start = utf16_position(SOURCE, SOURCE.index("import os") + len("import os"))
        _, worker0 = await counters(s)
        first = await s.inline(a, end)
        await s.inline(a, start)
        again = await s.inline(a, end)
        assert [i.insert_text for i in again.items] == [i.insert_text for i in first.items]
        s.open(b, SOURCE)  # the same text in another file: the same question
        elsewhere = await s.inline(b, end)
        assert [i.insert_text for i in elsewhere.items] == [i.insert_text for i in first.items]
        policy, worker = await counters(s)
        assert policy["model_calls"] == 2 and policy["cache_hits"] == 2
        assert worker["jobs"] == worker0["jobs"] + 2


@pytest.mark.slow
async def test_other_open_documents_are_shown_to_the_model(tiny_model_dir, run_dir):
    async with session(tiny_model_dir, run_dir, {**FAST, "speculative": False}) as s:
        main = "from helpers import clamp_value\n\n\ndef run(value, lower, upper):\n    return clamp_value(\n"
        s.open("file:///w/helpers.py", HELPERS)
        s.open("file:///w/main.py", main)
        s.open("file:///w/notes.md", "clamp_value notes", language="markdown")  # another language: not shown
        await s.inline("file:///w/main.py", utf16_position(main, main.index("clamp_value(\n") + len("clamp_value(")))
        last = (await s.status())["last_request"]
        assert 0 < last["extra_context_chars"] <= 1500


@pytest.mark.slow
async def test_warm_on_open_and_when_typing_pauses(tiny_model_dir, run_dir):
    async with session(tiny_model_dir, run_dir, {**FAST, "warmDelayMs": 50}) as s:
        uri = "file:///w/warm.py"
        _, worker0 = await counters(s)
        s.open(uri, SOURCE)
        await until(s, lambda st: st["policy"]["counters"].get("warms", 0) == 1)
        insert(s, uri, SOURCE, len(SOURCE), "x = ", 2)
        await until(s, lambda st: st["policy"]["counters"].get("warms", 0) == 2)
        _, worker = await counters(s)
        assert worker["warms"] == worker0["warms"] + 2
        assert worker["jobs"] == worker0["jobs"]  # a warm is a prefill, not a job


# --------------------------------------------------------------------------- fill


@pytest.mark.slow
async def test_two_holes_are_filled_by_one_refinement(tiny_model_dir, run_dir):
    async with session(tiny_model_dir, run_dir) as s:
        uri = "file:///w/two_holes.py"
        s.open(uri, TWO_HOLES)
        _, worker0 = await counters(s)
        s.client.progress_reports["fill-1"] = []  # a client-made token: the client knows it already
        result = plain(await s.client.protocol.send_request_async(
            "dlm/fill", {"textDocument": {"uri": uri}, "stream": True, "workDoneToken": "fill-1"}))
        assert len(result["edits"]) == 2 and result["holes"] == 2
        _, worker = await counters(s)
        assert worker["jobs"] == worker0["jobs"] + 1  # both holes in ONE engine job
        assert worker["holes"] == worker0["holes"] + 2
        assert worker["steps"] - worker0["steps"] == result["steps"]  # its steps are all the worker ran
        assert s.refinements and all(len(r["text"]) == 2 for r in s.refinements)  # each state shows both holes
        assert len({r["requestId"] for r in s.refinements}) == 1
        kinds = [p.kind for p in s.client.progress_reports["fill-1"]]
        assert kinds == ["begin"] + ["report"] * len(s.refinements) + ["end"]


@pytest.mark.slow
async def test_code_actions_and_the_fill_command_apply_edits_through_the_client(tiny_model_dir, run_dir):
    async with session(tiny_model_dir, run_dir) as s:
        applied: list = []

        @s.client.feature(lsp.WORKSPACE_APPLY_EDIT)
        def apply_edit(ls, params: lsp.ApplyWorkspaceEditParams):
            applied.append(params.edit)
            return lsp.ApplyWorkspaceEditResult(applied=True)

        # lsprotocol reads any code action with a `command` as a Command (its hook tests the key, not
        # its type); read it as the spec says, as editors do.
        conv = s.client.protocol._converter
        conv.register_structure_hook(Union[lsp.Command, lsp.CodeAction], lambda obj, _: conv.structure(
            obj, lsp.Command if isinstance(obj.get("command"), str) else lsp.CodeAction))
        assert "dlm.fill" in s.init.capabilities.execute_command_provider.commands
        uri = "file:///w/actions.py"
        s.open(uri, TWO_HOLES)

        def actions(rng):
            return s.client.text_document_code_action_async(lsp.CodeActionParams(
                text_document=lsp.TextDocumentIdentifier(uri=uri), range=rng,
                context=lsp.CodeActionContext(diagnostics=[])))

        here = lsp.Position(line=0, character=0)
        titles = [a.title for a in await actions(lsp.Range(start=here, end=here))]
        assert titles == ["Fill holes with dlm-ls"]
        selection = lsp.Range(start=here, end=lsp.Position(line=1, character=0))
        found = {a.title: a for a in await actions(selection)}
        assert set(found) == {"Fill holes with dlm-ls", "Regenerate selection"}

        fill = found["Fill holes with dlm-ls"].command
        result = plain(await s.client.workspace_execute_command_async(lsp.ExecuteCommandParams(
            command=fill.command, arguments=fill.arguments)))
        assert result["applied"] is True and len(result["edits"]) == 2
        (doc_edit,) = applied[0].document_changes  # versioned: a client whose text moved on refuses it
        assert doc_edit.text_document.uri == uri and doc_edit.text_document.version == 1
        assert [e.new_text for e in doc_edit.edits] == [e["newText"] for e in result["edits"]]

        regen = found["Regenerate selection"].command
        args = [{**regen.arguments[0], "apply": False}]
        one = plain(await s.client.workspace_execute_command_async(lsp.ExecuteCommandParams(
            command=regen.command, arguments=args)))
        assert one["applied"] is False and [e["range"]["end"] for e in one["edits"]] == [{"line": 0, "character": 14}]
        assert len(applied) == 1
        # The server never writes: its copy of the document is what the client sent.
        assert (await s.status(uri))["document"]["sha256"] == hashlib.sha256(TWO_HOLES.encode()).hexdigest()

        s.open("file:///w/plain.py", SOURCE)
        none = await s.client.text_document_code_action_async(lsp.CodeActionParams(
            text_document=lsp.TextDocumentIdentifier(uri="file:///w/plain.py"), range=lsp.Range(start=here, end=here),
            context=lsp.CodeActionContext(diagnostics=[])))
        assert not none


# --------------------------------------------------------------------------- the scheduler


FAST_ENGINE = {"canvas_lengths": [4, 8], "max_tokens": 8, "max_steps": 4}
SLOW_ENGINE = {"canvas_lengths": [16], "max_tokens": 16, "block_size": 16, "max_steps": 16, "threshold": 1.0}


@pytest.fixture(scope="module")
def scheduler(tiny_model_dir):
    import torch

    from dlm_ls.worker.scheduler import Scheduler

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    s = Scheduler(str(tiny_model_dir), device="cpu", max_jobs=4)
    s.start()
    yield s
    s.stop()
    torch.set_num_threads(threads)


class Answer:
    def __init__(self, log: list | None = None, name: str = ""):
        self.event = threading.Event()
        self.result = self.error = None
        self.log, self.name = log, name

    def done(self, result, error):
        self.result, self.error = result, error
        self.event.set()

    def step(self, update):
        if self.log is not None:
            self.log.append(self.name)

    def wait(self):
        assert self.event.wait(60), "the scheduler did not answer"
        assert self.error is None, self.error
        return self.result


def test_the_worker_returns_every_candidate_length(scheduler):
    a = Answer()
    scheduler.submit("t", InfillRequest.from_wire({"id": "cands", "segments": ["def f(x):\n    return ", "\n"], "overrides": FAST_ENGINE}),
                     a.done)
    result = a.wait()
    assert len(result.candidates) == 2 and all(len(c) == 1 for c in result.candidates)
    assert result.candidates[0] == result.middles


def test_a_low_priority_request_waits_for_the_normal_ones(scheduler):
    order: list[str] = []
    low, normal = Answer(order, "low"), Answer(order, "normal")
    before = scheduler.status()["counters"].get("jobs", 0)
    scheduler.submit("t", InfillRequest.from_wire({"id": "low", "segments": ["x = ", "\n"], "overrides": SLOW_ENGINE, "priority": "low"}),
                     low.done, low.step)
    scheduler.submit("t", InfillRequest.from_wire({"id": "normal", "segments": ["y = ", "\n"], "overrides": SLOW_ENGINE}),
                     normal.done, normal.step)
    low.wait(), normal.wait()
    assert scheduler.status()["counters"]["jobs"] == before + 2
    # The low one may take the first turn if it arrived alone; after that, none until the normal one is done.
    rest = order[order.index("normal"):]
    assert rest == sorted(rest, key=lambda name: name == "low")


def test_bad_priority_is_refused():
    from dlm_ls.worker.protocol import DlmError

    with pytest.raises(DlmError, match="priority"):
        InfillRequest.from_wire({"segments": ["a", "b"], "priority": "urgent"})
