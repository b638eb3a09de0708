"""End to end over stdio: a pytest-lsp client, the real `dlm-ls serve`, the real worker, a tiny model.

Most tests share one worker (one runtime directory for the module) and start their own server,
which takes about a second. The spawn race of two servers gets a runtime directory of its own;
the kill test runs late, since the tests after it meet the worker that replaced the killed one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from lsprotocol import types as lsp
from pygls.exceptions import JsonRpcException
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

# parseFilter off: a random model's text rarely parses, and these tests need a suggestion to look at.
FAST = {"debounceMs": 0, "canvasLengths": [4], "maxTokens": 4, "maxSteps": 4, "idleTimeoutS": 120,
        "parseFilter": False}
# One token per step over a 32-slot canvas: a request that stays in the worker for ~32 steps.
SLOW = {**FAST, "canvasLengths": [32], "maxTokens": 32, "blockSize": 32, "maxSteps": 32, "threshold": 1.0,
        "streamRefinement": True}
SOURCE = "import os\n\n\ndef add(a, b):\n    return a\n"


def plain(obj):
    """pygls hands custom results over as namedtuples: back to dicts and lists."""
    if hasattr(obj, "_asdict"):
        return {k: plain(v) for k, v in obj._asdict().items()}
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def utf16_position(text: str, offset: int) -> lsp.Position:
    line = text.count("\n", 0, offset)
    start = text.rfind("\n", 0, offset) + 1
    return lsp.Position(line=line, character=len(text[start:offset].encode("utf-16-le", "surrogatepass")) // 2)


class Session:
    """A client connected to a real `dlm-ls serve` process."""

    def __init__(self, client: LanguageClient, server_env: dict[str, str]):
        self.client = client
        self.env = server_env
        self.refinements: list[dict] = []
        self.refined = asyncio.Event()
        self.opened: dict[str, str] = {}

        @client.feature("dlm/refinement")
        def on_refinement(ls, params):
            self.refinements.append(plain(params))
            self.refined.set()

    async def status(self, uri: str | None = None) -> dict:
        params = {"wait": True, **({"uri": uri} if uri else {})}  # wait for a worker still loading
        return plain(await self.client.protocol.send_request_async("dlm/status", params))

    def open(self, uri: str, text: str, language: str = "python") -> None:
        self.opened[uri] = text
        self.client.text_document_did_open(lsp.DidOpenTextDocumentParams(
            text_document=lsp.TextDocumentItem(uri=uri, language_id=language, version=1, text=text)))

    async def inline(self, uri: str, position: lsp.Position, msg_id: str | None = None):
        params = lsp.InlineCompletionParams(
            text_document=lsp.TextDocumentIdentifier(uri=uri), position=position,
            context=lsp.InlineCompletionContext(trigger_kind=lsp.InlineCompletionTriggerKind.Automatic))
        return await self.client.protocol.send_request_async(lsp.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id)

    async def wait_refinement(self, timeout: float = 60) -> None:
        self.refined.clear()
        await asyncio.wait_for(self.refined.wait(), timeout)

    async def close(self) -> int | None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.shutdown_session(), 30)
        await self.client.stop()
        return self.client._server.returncode if self.client._server else None


@contextlib.asynccontextmanager
async def session(model_dir: Path, run_dir: Path, options: dict | None = None, inline: bool = True,
                  encodings: list[str] | None = None, pulled: dict | None = None):
    env = {**os.environ, "DLM_LS_RUNTIME_DIR": str(run_dir), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    config = ClientServerConfig(
        server_command=[sys.executable, "-m", "dlm_ls.lsp_server.cli", "serve", "--model", str(model_dir),
                        "--device", "cpu"], server_env=env)
    client = await config.start()
    s = Session(client, env)
    if pulled is not None:  # what the client answers to workspace/configuration for "dlm"
        client.set_configuration(pulled, section="dlm")
    caps = client_capabilities("visual-studio-code")  # the presets do not declare inline completion
    if inline:
        caps.text_document.inline_completion = lsp.InlineCompletionClientCapabilities()
    if encodings:
        caps.general.position_encodings = encodings
    s.init = await client.initialize_session(lsp.InitializeParams(
        capabilities=caps, initialization_options=options if options is not None else FAST))
    try:
        yield s
    finally:
        await s.close()


def stop_workers(run_dir: Path) -> None:
    for pid_file in run_dir.glob("*.pid"):
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    yield run
    stop_workers(run)


@pytest.fixture
def own_run(tmp_path):
    run = tmp_path / "own"
    yield run
    stop_workers(run)


# --------------------------------------------------------------------------- protocol


async def test_capabilities_and_utf16_by_default(tiny_model_dir, shared_run):
    async with session(tiny_model_dir, shared_run) as s:
        caps = s.init.capabilities
        assert caps.inline_completion_provider is not None
        assert caps.position_encoding == lsp.PositionEncodingKind.Utf16
        assert caps.text_document_sync.change == lsp.TextDocumentSyncKind.Incremental
        assert caps.completion_provider is None  # the client has inline completion: no duplicate popup
        assert s.init.server_info.name == "dlm-ls"


async def test_inline_completion_at_end_of_partial_line_has_a_valid_range(tiny_model_dir, shared_run):
    async with session(tiny_model_dir, shared_run) as s:
        uri = "file:///w/add.py"
        s.open(uri, SOURCE)
        at = utf16_position(SOURCE, SOURCE.index("return a") + len("return a"))
        result = await s.inline(uri, at)
        assert len(result.items) == 1
        item = result.items[0]
        assert item.insert_text and "\n" not in item.insert_text  # a line region: one line
        assert item.range.start == item.range.end == at
        status = await s.status()
        assert status["server"]["torch_loaded"] is False  # the model is in the worker, not here
        assert status["worker_pid"] and status["worker_pid"] != status["server"]["pid"]
        assert status["model"] == tiny_model_dir.name and status["device"] == "cpu"
        assert status["latency_ms"]["total"]["count"] == 1 and status["cache"]["entries"] >= 1


async def test_completion_fallback_for_clients_without_inline(tiny_model_dir, shared_run):
    async with session(tiny_model_dir, shared_run, inline=False) as s:
        assert s.init.capabilities.completion_provider is not None
        uri = "file:///w/fallback.py"
        s.open(uri, SOURCE)
        at = utf16_position(SOURCE, len(SOURCE) - 1)  # after "return a"
        result = await s.client.text_document_completion_async(lsp.CompletionParams(
            text_document=lsp.TextDocumentIdentifier(uri=uri), position=at))
        assert result.is_incomplete and len(result.items) == 1
        edit = result.items[0].text_edit
        assert edit.range.end == at and edit.range.start == lsp.Position(line=at.line, character=at.character - 1)
        assert edit.new_text.startswith("a") and len(edit.new_text) > 1  # the typed word, then the suggestion


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8"])
async def test_incremental_edits_with_surrogate_pairs_keep_positions(tiny_model_dir, shared_run, encoding):
    def pos(text: str, offset: int) -> lsp.Position:
        if encoding == "utf-16":
            return utf16_position(text, offset)
        start = text.rfind("\n", 0, offset) + 1
        return lsp.Position(line=text.count("\n", 0, offset), character=len(text[start:offset].encode()))

    async with session(tiny_model_dir, shared_run, encodings=[encoding]) as s:
        assert s.init.capabilities.position_encoding == encoding
        uri = "file:///w/emoji.py"
        text = 's = "😀 party 🎉"\nt = 1\n'
        s.open(uri, text)
        version = 1
        edits = [(text.index("party"), text.index("party") + 5, "fête 👩‍👩‍👧"),  # replace after an emoji
                 (None, None, "\nu = '𝄞'"),  # append at the end (4-byte UTF-8, 2 UTF-16 units)
                 (2, 2, "🐍"), (0, 1, "ß")]
        for a, b, new in edits:
            if a is None:
                a = b = len(text)
            version += 1
            s.client.text_document_did_change(lsp.DidChangeTextDocumentParams(
                text_document=lsp.VersionedTextDocumentIdentifier(uri=uri, version=version),
                content_changes=[lsp.TextDocumentContentChangePartial(
                    range=lsp.Range(start=pos(text, a), end=pos(text, b)), text=new)]))
            text = text[:a] + new + text[b:]
        doc = (await s.status(uri))["document"]
        assert doc["sha256"] == hashlib.sha256(text.encode()).hexdigest()
        assert (doc["version"], doc["chars"], doc["lines"]) == (version, len(text), text.count("\n") + 1)
        # A completion right after an emoji answers at the very position asked.
        at_offset = text.index("t = 1") + len("t = 1")
        result = await s.inline(uri, pos(text, at_offset))
        for item in result.items:
            assert item.range.start == pos(text, at_offset)


async def test_a_lone_surrogate_in_one_document_never_fails_another(tiny_model_dir, shared_run):
    # Legal in JSON, unencodable in UTF-8: the document store makes it U+FFFD once, so the chunk of
    # this document that goes into the other's extra context can always be sent to the worker.
    bad = "def compute_total(items):\n    label = '\udc00'\n    return sum(items)\n"
    good = "from shop import compute_total\n\n\ndef checkout(cart):\n    return compute_total(\n"
    async with session(tiny_model_dir, shared_run) as s:
        s.open("file:///w/bad.py", bad)
        s.open("file:///w/good.py", good)
        for uri, text in (("file:///w/good.py", good), ("file:///w/bad.py", bad)):
            result = await s.inline(uri, utf16_position(text, len(text) - 1))
            assert result is not None and len(result.items) == 1
        # positions past the replaced character still land where the client meant them
        at = utf16_position(bad, bad.index("\n    return"))
        result = await s.inline("file:///w/bad.py", at)
        assert all(item.range.start == at for item in result.items)


async def test_fill_returns_edits_for_hole_markers_and_ranges(tiny_model_dir, shared_run):
    async with session(tiny_model_dir, shared_run) as s:
        uri = "file:///w/holes.py"
        text = "def add(a, b):\n    return <|hole|>\n\n\ndef sub(a, b):\n    ...\n"
        s.open(uri, text)
        result = plain(await s.client.protocol.send_request_async("dlm/fill", {"textDocument": {"uri": uri}}))
        ranges = [(e["range"]["start"], e["range"]["end"]) for e in result["edits"]]
        assert ranges == [({"line": 1, "character": 11}, {"line": 1, "character": 19}),
                          ({"line": 5, "character": 4}, {"line": 5, "character": 7})]
        one = plain(await s.client.protocol.send_request_async("dlm/fill", {
            "textDocument": {"uri": uri}, "range": {"start": {"line": 0, "character": 0},
                                                    "end": {"line": 1, "character": 0}}}))
        assert [e["range"]["end"] for e in one["edits"]] == [{"line": 0, "character": 14}]
        assert (await s.status(uri))["document"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()


async def test_position_past_the_end_is_an_error_and_the_server_goes_on(tiny_model_dir, shared_run):
    async with session(tiny_model_dir, shared_run) as s:
        uri = "file:///w/short.py"
        s.open(uri, SOURCE)
        with pytest.raises(JsonRpcException) as err:
            await s.inline(uri, lsp.Position(line=500, character=0))
        assert err.value.code == -32602 and "past the end" in err.value.message
        with pytest.raises(JsonRpcException) as err:
            await s.inline("file:///w/never-opened.py", lsp.Position(line=0, character=0))
        assert "not open" in err.value.message
        result = await s.inline(uri, utf16_position(SOURCE, len(SOURCE) - 1))
        assert len(result.items) == 1


async def test_settings_from_did_change_configuration(tiny_model_dir, shared_run):
    async with session(tiny_model_dir, shared_run) as s:
        assert (await s.status())["settings"]["max_tokens"] == 4
        s.client.workspace_did_change_configuration(lsp.DidChangeConfigurationParams(
            settings={"dlm": {"maxTokens": 3, "debounceMs": 5, "noSuchSetting": 1, "threshold": 7}}))
        settings = (await s.status())["settings"]
        assert (settings["max_tokens"], settings["debounce_ms"], settings["threshold"]) == (3, 5, None)


async def until_settings(s: Session, ready, tries: int = 50) -> dict:
    """The server's settings once `ready(settings)`, or as they are after `tries` polls: a pull is a
    round trip of its own, answered after the notification or `initialized` that started it."""
    for _ in range(tries):
        settings = (await s.status())["settings"]
        if ready(settings):
            break
        await asyncio.sleep(0.1)
    return settings


async def test_settings_pulled_with_workspace_configuration(tiny_model_dir, shared_run):
    async with session(tiny_model_dir, shared_run, pulled={"maxTokens": 3, "model": "", "debounceMs": 9}) as s:
        settings = await until_settings(s, lambda st: st["max_tokens"] == 3)
        # pulled after `initialized`: they win over initializationOptions
        assert (settings["max_tokens"], settings["debounce_ms"]) == (3, 9)
        assert settings["model"] is None  # an editor's empty text setting means "the default"
        s.client.set_configuration({"maxTokens": 2, "threshold": 7}, section="dlm")
        s.client.workspace_did_change_configuration(lsp.DidChangeConfigurationParams(settings=None))
        settings = await until_settings(s, lambda st: st["max_tokens"] == 2)
        assert (settings["max_tokens"], settings["threshold"]) == (2, None)  # the bad value is skipped


async def test_five_megabyte_document_uses_a_bounded_context(tiny_model_dir, shared_run):
    line = "value = compute(alpha, beta)  # a line of some length\n"
    text = line * (5_000_000 // len(line))
    async with session(tiny_model_dir, shared_run) as s:
        uri = "file:///w/huge.py"
        s.open(uri, text)
        middle = text.count("\n") // 2
        s.client.text_document_did_change(lsp.DidChangeTextDocumentParams(
            text_document=lsp.VersionedTextDocumentIdentifier(uri=uri, version=2),
            content_changes=[lsp.TextDocumentContentChangePartial(
                range=lsp.Range(start=lsp.Position(line=middle, character=0),
                                end=lsp.Position(line=middle, character=0)), text="result = \n")]))
        t0 = time.monotonic()
        result = await s.inline(uri, lsp.Position(line=middle, character=len("result = ")))
        assert time.monotonic() - t0 < 30
        assert len(result.items) == 1
        status = await s.status(uri)
        last = status["last_request"]
        assert 0 < last["prefix_chars"] <= 16_000 and 0 < last["suffix_chars"] <= 16_000
        assert status["document"]["chars"] == len(text) + len("result = \n")
        assert status["server"]["rss_bytes"] < 400 * 2**20


async def test_status_reports_the_context_tokens_the_worker_computed(tiny_model_dir, shared_run):
    """dlm/status says how much context a request recomputed: the number that measures the context cache."""
    text = "def scale(values, factor):\n    return \n\n\nprint(scale([1, 2], 3))\n"
    async with session(tiny_model_dir, shared_run) as s:
        uri = "file:///w/prefill.py"
        s.open(uri, text)
        await s.inline(uri, lsp.Position(line=1, character=len("    return ")))
        status = await s.status()
        last = status["last_request"]
        assert last["source"] == "model" and last["prefill_tokens"] > 0
        assert status["policy"]["counters"]["prefill_tokens"] >= last["prefill_tokens"]


async def test_a_document_above_the_size_limit_gets_a_clear_error_and_breaks_nothing(tiny_model_dir, shared_run):
    from dlm_ls.worker.protocol import LIMITS

    line = "x = 1\n"
    text = line * (LIMITS.max_document_chars // len(line) + 1)
    async with session(tiny_model_dir, shared_run) as s:
        big, small = "file:///w/too_big.py", "file:///w/beside_too_big.py"
        s.open(big, text)
        s.open(small, SOURCE)
        s.client.text_document_did_change(lsp.DidChangeTextDocumentParams(
            text_document=lsp.VersionedTextDocumentIdentifier(uri=big, version=2),
            content_changes=[lsp.TextDocumentContentChangePartial(
                range=lsp.Range(start=lsp.Position(line=0, character=0), end=lsp.Position(line=0, character=0)),
                text="y = ")]))
        with pytest.raises(JsonRpcException) as err:
            await s.inline(big, lsp.Position(line=0, character=4))
        assert err.value.code == -32803
        assert f"above the limit max_document_chars={LIMITS.max_document_chars}" in err.value.message
        result = await s.inline(small, utf16_position(SOURCE, len(SOURCE) - 1))
        assert len(result.items) == 1
        assert (await s.status())["server"]["documents"] == 1


# --------------------------------------------------------------------------- cancellation


async def test_a_new_request_cancels_the_older_one(tiny_model_dir, shared_run):
    async with session(tiny_model_dir, shared_run, SLOW) as s:
        uri = "file:///w/cancel_previous.py"
        s.open(uri, SOURCE)
        at = utf16_position(SOURCE, len(SOURCE) - 1)
        before = (await s.status())["worker"]["counters"].get("cancelled", 0)
        first = asyncio.ensure_future(s.inline(uri, at))
        await s.wait_refinement()  # the first request is being refined in the worker
        second = asyncio.ensure_future(s.inline(uri, at))
        old = await asyncio.wait_for(first, 30)
        assert len(old.items) == 0 and not second.done()  # superseded: answered empty, at once
        new = await asyncio.wait_for(second, 60)
        assert len(new.items) == 1
        status = await s.status()
        assert status["policy"]["counters"]["superseded"] == 1
        assert status["worker"]["counters"]["cancelled"] == before + 1


async def test_cancel_request_answers_32800_and_stops_the_worker(tiny_model_dir, shared_run):
    async with session(tiny_model_dir, shared_run, SLOW) as s:
        uri = "file:///w/cancel.py"
        s.open(uri, SOURCE)
        before = (await s.status())["worker"]["counters"].get("cancelled", 0)
        request = asyncio.ensure_future(s.inline(uri, utf16_position(SOURCE, len(SOURCE) - 1), msg_id="to-cancel"))
        await s.wait_refinement()
        s.client.protocol.notify("$/cancelRequest", lsp.CancelParams(id="to-cancel"))
        with pytest.raises(JsonRpcException) as err:
            await asyncio.wait_for(request, 30)
        assert err.value.code == -32800
        for _ in range(100):  # the worker hears of it between two steps
            worker = (await s.status())["worker"]
            if worker["counters"].get("cancelled", 0) > before:
                break
            await asyncio.sleep(0.05)
        assert worker["counters"]["cancelled"] == before + 1 and worker["live"] == 0


# --------------------------------------------------------------------------- the worker's life


async def test_two_servers_share_one_worker_that_loaded_the_model_once(tiny_model_dir, own_run):
    async with session(tiny_model_dir, own_run) as a, session(tiny_model_dir, own_run) as b:
        for s in (a, b):
            s.open("file:///w/two.py", SOURCE)
        results = await asyncio.gather(*(s.inline("file:///w/two.py", utf16_position(SOURCE, len(SOURCE) - 1))
                                         for s in (a, b)))
        assert all(len(r.items) == 1 for r in results)
        sa, sb = await a.status(), await b.status()
        assert sa["server"]["pid"] != sb["server"]["pid"]
        assert sa["worker_pid"] == sb["worker_pid"]
        assert sb["worker"]["loads"] == 1 and sb["worker"]["connections"] == 2
    assert len(list(own_run.glob("*.pid"))) == 1
    assert (own_run / next(own_run.glob("*.log")).name).read_text().count("listening on") == 1


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False  # gone: reaped


async def test_killing_the_worker_mid_request_is_recovered(tiny_model_dir, own_run):
    async with session(tiny_model_dir, own_run, SLOW) as s:  # this server spawns the worker it kills
        uri = "file:///w/kill.py"
        s.open(uri, SOURCE)
        at = utf16_position(SOURCE, len(SOURCE) - 1)
        first_pid = (await s.status())["worker_pid"]
        request = asyncio.ensure_future(s.inline(uri, at))
        await s.wait_refinement()
        os.kill(first_pid, signal.SIGKILL)
        result = await asyncio.wait_for(request, 120)  # retried on a new worker
        assert len(result.items) == 1
        again = await s.inline(uri, at)
        assert len(again.items) == 1
        status = await s.status()
        assert status["worker_pid"] not in (None, first_pid)
        assert status["backend"]["restarts"] == 1
        assert not _zombie(first_pid)  # the server that started it collected its exit status


async def test_in_process_mode_completes_without_a_worker(tiny_model_dir, own_run):
    async with session(tiny_model_dir, own_run, {**FAST, "inProcess": True}) as s:
        s.open("file:///w/inproc.py", SOURCE)
        result = await s.inline("file:///w/inproc.py", utf16_position(SOURCE, len(SOURCE) - 1))
        assert len(result.items) == 1
        status = await s.status()
        assert status["backend"]["mode"] == "in-process" and status["server"]["torch_loaded"] is True
        assert status["worker_pid"] == status["server"]["pid"]
    assert not own_run.exists() or not list(own_run.glob("*.sock"))


async def test_shutdown_and_exit_end_the_server_cleanly(tiny_model_dir, shared_run):
    async with session(tiny_model_dir, shared_run) as s:
        pass
    assert s.client._server.returncode == 0
