"""The language server: its state, and one small module-level handler per LSP method.

The work is elsewhere: `completion.py` (textDocument/inlineCompletion and completion, a row of named
steps), `fill.py` (dlm/fill, the dlm.fill command, code actions), `policy.py` (what reaches the
model: cancel-previous, debounce, caches, speculation, warm timers, counters), `documents.py`,
`protocol.py` (framing, answering each request once). Handlers turn LSP params into calls and
results into LSP types, and our errors into LSP errors (`lsp_errors`).

The server never imports torch (unless `in_process` is set): the model lives in the worker,
reached through a `Backend` (worker_client.py). Documents live in our own store (documents.py), not
in pygls' workspace, so a big file is held once and an edit costs the edit, not a re-split of every
line.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sys
import time
from typing import Any

from lsprotocol import types as lsp
from pygls.capabilities import ServerCapabilitiesBuilder
from pygls.lsp.server import LanguageServer

from . import completion as C
from . import documents as D
from . import fill as F
from . import status as S
from .backends import make_backend
from .completion import attach_syntax
from .config import Settings
from .errors import DlmError, to_lsp
from .fill import FILL, FILL_COMMAND
from .logs import configure_logging, message_id, request_id, set_level
from .policy import CompletionPolicy
from .protocol import DlmProtocol, StreamError, read_messages
from .worker_client import Backend, WorkerClient, in_thread

NAME, VERSION = "dlm-ls", "0.1.0"
STATUS = "dlm/status"

log = logging.getLogger("dlm_ls.server")


class DlmServer(LanguageServer):
    def __init__(self, settings: Settings):
        super().__init__(NAME, VERSION, protocol_cls=DlmProtocol,
                         text_document_sync_kind=lsp.TextDocumentSyncKind.Incremental)
        self.settings = settings
        self.docs = D.DocumentStore(D.UTF16)
        self.policy = CompletionPolicy(settings.debounce_ms, settings.cache_entries)
        self.preambles = C.Preambles()
        self.holes: dict[str, tuple[str, list]] = {}  # uri -> (text, holes): code actions ask often
        self.backend: Backend | None = None
        self.backend_error: DlmError | None = None
        self.started = time.monotonic()
        self.shutdown_requested = False
        self.stream_error = False  # the input could not be framed any more (protocol.StreamError)
        self.protocol.expose_tracebacks = settings.log_level == "debug"  # `--debug`
        self.position_encoding = D.UTF16
        self.last_request: dict[str, Any] = {}
        self.context_tokens: int | None = None  # the engine's context budget, once the worker said it
        self.root_uri: str | None = None
        self.can_apply_edit = False  # the client takes workspace/applyEdit
        self.can_pull_configuration = False  # the client answers workspace/configuration
        self.versioned_edits = False  # ... with documentChanges (so a changed document refuses them)
        self.speculations = 0
        self._backend_lock = asyncio.Lock()

    # -- the model behind us

    async def get_backend(self) -> Backend:
        async with self._backend_lock:  # one backend, however many requests ask for it at once
            if self.backend is None:
                try:
                    if self.settings.in_process:
                        # loading the model takes seconds: keep the event loop answering meanwhile
                        self.backend = await in_thread(make_backend, self.settings)
                    else:
                        self.backend = make_backend(self.settings)
                    self.backend_error = None
                except DlmError as exc:
                    self.backend_error = exc
                    raise
            return self.backend

    async def replace_backend(self) -> None:
        old, self.backend = self.backend, None
        self.context_tokens = None
        self.policy.reset()  # another model answers differently
        if old is not None:
            await old.close()

    def learn_worker(self, status: dict[str, Any]) -> None:
        tokens = (status.get("info") or {}).get("max_context_tokens")
        if isinstance(tokens, int) and tokens > 0:
            self.context_tokens = tokens

    # -- the connection

    def start_io(self, stdin=None, stdout=None, early=None) -> None:
        """Serve over stdio with our own framing (protocol.read_messages) in place of pygls' loop.

        `early` (early.Early): what was read before pygls was imported, read again here first; an
        `initialize` it answered already is not answered twice."""
        from pygls.io_ import StdinAsyncReader, StdoutWriter
        from threading import Event

        self._stop_event = Event()
        writer = StdoutWriter(stdout or sys.stdout.buffer)
        self.protocol.set_writer(early.writer(writer) if early is not None else writer)
        reader = StdinAsyncReader(stdin or sys.stdin.buffer, self.thread_pool)
        reader = early.reader(reader) if early is not None else reader
        try:
            asyncio.run(read_messages(reader, self.protocol, self._stop_event, self.settings.max_message_bytes))
        except StreamError as exc:
            log.error("%s", exc)
            self.stream_error = True
        except BrokenPipeError:
            log.error("the client closed its end of the connection")
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """pygls' version joins the thread reading stdin, which blocks until the client closes it."""
        if self._stop_event is not None:
            self._stop_event.set()
        if self._thread_pool is not None:
            self._thread_pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- handlers


def lsp_errors(handler):
    """Run a handler under a request id; our errors become LSP errors here and nowhere else."""
    @functools.wraps(handler)
    async def wrapped(ls: DlmServer, *params):
        msg_id = ls.protocol.msg_id
        token = request_id.set(f"r{msg_id}" if msg_id is not None else "-")
        id_token = message_id.set(msg_id)
        try:
            return await handler(ls, *params)
        except DlmError as exc:
            raise to_lsp(exc) from None
        finally:
            message_id.reset(id_token)
            request_id.reset(token)
    return wrapped


def _position(doc: D.Document, offset: int) -> lsp.Position:
    line, char = doc.position_at(offset)
    return lsp.Position(line=line, character=char)


def initialize(ls: DlmServer, params: lsp.InitializeParams):
    ls.position_encoding = str(ServerCapabilitiesBuilder.choose_position_encoding(params.capabilities))
    if ls.position_encoding not in D.ENCODINGS:
        ls.position_encoding = D.UTF16
    ls.docs.encoding = ls.position_encoding
    apply_settings(ls, params.initialization_options, "initializationOptions")
    caps = params.capabilities
    inline = caps.text_document is not None and caps.text_document.inline_completion is not None
    workspace = caps.workspace
    ls.can_apply_edit = bool(workspace and workspace.apply_edit)
    ls.can_pull_configuration = bool(workspace and workspace.configuration)
    ls.versioned_edits = bool(workspace and workspace.workspace_edit and workspace.workspace_edit.document_changes)
    folders = params.workspace_folders or []
    ls.root_uri = folders[0].uri if folders else params.root_uri
    mode = ls.settings.completion_fallback
    if mode == "always" or (mode == "auto" and not inline):
        ls.feature(lsp.TEXT_DOCUMENT_COMPLETION, lsp.CompletionOptions(resolve_provider=False))(completion)
    client = params.client_info.name if params.client_info else "unknown client"
    log.info("initialize from %s: positionEncoding %s, inline completion %s, completion fallback %s",
             client, ls.position_encoding, "yes" if inline else "no",
             "on" if lsp.TEXT_DOCUMENT_COMPLETION in ls.protocol.fm.features else "off")


async def initialized(ls: DlmServer, params: lsp.InitializedParams):
    # Settings the client keeps for pulling (workspace/configuration) may name the model: read
    # them before the worker starts.
    await pull_settings(ls, "workspace/configuration")
    # Start (or reach) the worker now, so the model is resident by the first keystroke.
    try:
        backend = await ls.get_backend()
        if isinstance(backend, WorkerClient):
            await backend.connection()
        ls.learn_worker(await backend.status())  # its context budget sizes the extra context
    except DlmError as exc:
        log.warning("the model is not available yet: %s", exc)
        ls.window_show_message(lsp.ShowMessageParams(type=lsp.MessageType.Warning, message=f"dlm-ls: {exc}"))


async def did_change_configuration(ls: DlmServer, params: lsp.DidChangeConfigurationParams):
    before = ls.settings
    pushed = params.settings
    if isinstance(pushed, dict) and not pushed:
        pushed = None
    if pushed is None and ls.can_pull_configuration:  # "something changed, ask me" (the pull model)
        await pull_settings(ls, "workspace/configuration")
    else:
        apply_settings(ls, pushed, "didChangeConfiguration")
    now = ls.settings
    if before.backend_key() != now.backend_key():
        log.info("model or device changed: switching workers")
        await ls.replace_backend()


def did_open(ls: DlmServer, params: lsp.DidOpenTextDocumentParams):
    td = params.text_document
    doc = ls.docs.open(td.uri, td.text, td.language_id, td.version)
    if doc is None:  # above the document size limit: refused, and logged once by the store
        return
    attach_syntax(doc, ls.settings)
    log.debug("opened %s (%s, %d chars)", td.uri, td.language_id, len(td.text))
    # The cursor is not known yet; the end of the file is where a file just opened is most often
    # extended. A wrong guess costs one prefill in the worker.
    C.schedule_warm(ls, td.uri, len(doc.text), 0)


def did_change(ls: DlmServer, params: lsp.DidChangeTextDocumentParams):
    changes = []
    for ch in params.content_changes:
        rng = getattr(ch, "range", None)
        if rng is None:
            changes.append((None, ch.text))
        else:
            changes.append((((rng.start.line, rng.start.character), (rng.end.line, rng.end.character)), ch.text))
    try:
        doc = ls.docs.change(params.text_document.uri, params.text_document.version, changes)
    except DlmError as exc:  # a notification has no reply: log it, keep serving
        log.warning("didChange ignored: %s", exc)
        return
    if doc is None:  # let go of when it grew past the document size limit
        return
    if (doc.syntax is None) != (len(doc.text) > ls.settings.max_syntax_chars):
        attach_syntax(doc, ls.settings)  # crossed the size limit, or the tree was dropped
    last = changes[-1] if changes else None
    if last is not None and last[0] is not None:  # the cursor is most likely after the last edit
        C.schedule_warm(ls, doc.uri, doc.offset_at(last[0][0]) + len(last[1]), ls.settings.warm_delay_ms)


def did_close(ls: DlmServer, params: lsp.DidCloseTextDocumentParams):
    uri = params.text_document.uri
    ls.policy.forget_document(uri)
    ls.holes.pop(uri, None)
    ls.docs.close(uri)


@lsp_errors
async def inline_completion(ls: DlmServer, params: lsp.InlineCompletionParams):
    done = await C.complete(ls, params.text_document.uri, params.position, "inline")
    if done is None or done[0].text is None:
        return lsp.InlineCompletionList(items=[])
    outcome, offset, doc = done
    at = _position(doc, offset)
    return lsp.InlineCompletionList(items=[
        lsp.InlineCompletionItem(insert_text=outcome.text, range=lsp.Range(start=at, end=at))])


@lsp_errors
async def completion(ls: DlmServer, params: lsp.CompletionParams):
    """textDocument/completion for clients without inline completion: one item, the suggestion."""
    done = await C.complete(ls, params.text_document.uri, params.position, "completion")
    if done is None or done[0].text is None:
        return lsp.CompletionList(is_incomplete=True, items=[])
    outcome, offset, doc = done
    start = D.word_start(doc.text, offset)
    typed = doc.text[start:offset]
    label = (typed + outcome.text.split("\n", 1)[0]).strip() or outcome.text.strip().split("\n", 1)[0]
    item = lsp.CompletionItem(
        label=label[:80], kind=lsp.CompletionItemKind.Snippet,
        detail="dlm-ls", sort_text="0", filter_text=typed + outcome.text,
        insert_text_format=lsp.InsertTextFormat.PlainText,
        text_edit=lsp.TextEdit(range=lsp.Range(start=_position(doc, start), end=_position(doc, offset)),
                               new_text=typed + outcome.text),
        documentation=lsp.MarkupContent(kind=lsp.MarkupKind.PlainText, value=outcome.text))
    # is_incomplete: ask again as the user types; the suggestion depends on every character
    return lsp.CompletionList(is_incomplete=True, items=[item])


@lsp_errors
async def fill(ls: DlmServer, params):
    """Fill every hole marker (`<|hole|>`, a lone `...` in Python) or rewrite `range`; the
    answer is text edits for the client to apply. `stream: true` (or the streamRefinement
    setting) sends dlm/refinement notifications; a workDoneToken gets $/progress reports."""
    uri = F.field_of(params, "textDocument", "uri")
    if not uri:
        raise DlmError("invalid_params", "dlm/fill needs textDocument.uri")
    stream = ls.settings.stream_refinement or bool(F.field_of(params, "stream"))
    return await F.fill(ls, str(uri), F.field_of(params, "range"), stream, F.field_of(params, "workDoneToken"))


@lsp_errors
async def fill_command(ls: DlmServer, *args):
    return await F.fill_command(ls, args[0] if args else None)


def code_action(ls: DlmServer, params: lsp.CodeActionParams):
    return F.code_actions(ls, params)


@lsp_errors
async def status(ls: DlmServer, params):
    out = await S.status(ls, wait=bool(F.field_of(params, "wait")))
    uri = F.field_of(params, "uri")
    if uri:
        out["document"] = S.document_status(ls, str(uri))
    return out


async def shutdown(ls: DlmServer, params):
    ls.shutdown_requested = True
    ls.policy.stop_background()
    if ls.backend is not None:
        await ls.backend.close()  # the worker itself stays for other editors until its idle timeout


def build_server(settings: Settings) -> DlmServer:
    ls = DlmServer(settings)
    ls.feature(lsp.INITIALIZE)(initialize)
    ls.feature(lsp.INITIALIZED)(initialized)
    ls.feature(lsp.WORKSPACE_DID_CHANGE_CONFIGURATION)(did_change_configuration)
    ls.feature(lsp.TEXT_DOCUMENT_DID_OPEN)(did_open)
    ls.feature(lsp.TEXT_DOCUMENT_DID_CHANGE)(did_change)
    ls.feature(lsp.TEXT_DOCUMENT_DID_CLOSE)(did_close)
    ls.feature(lsp.TEXT_DOCUMENT_INLINE_COMPLETION, lsp.InlineCompletionOptions())(inline_completion)
    ls.feature(FILL)(fill)
    ls.command(FILL_COMMAND)(fill_command)
    ls.feature(lsp.TEXT_DOCUMENT_CODE_ACTION,
               lsp.CodeActionOptions(code_action_kinds=[lsp.CodeActionKind.RefactorRewrite]))(code_action)
    ls.feature(STATUS)(status)
    ls.feature(lsp.SHUTDOWN)(shutdown)
    return ls


CONFIGURATION_SECTION = "dlm"  # what the editors' settings are named under (dlm.model, dlm.device, ...)
PULL_TIMEOUT_S = 5.0


async def pull_settings(ls: DlmServer, source: str) -> None:
    """Ask the client for the `dlm` section (workspace/configuration); a client that cannot answer
    in time or answers with an error leaves the settings as they were."""
    if not ls.can_pull_configuration:
        return
    params = lsp.ConfigurationParams(items=[lsp.ConfigurationItem(section=CONFIGURATION_SECTION)])
    try:
        answer = await asyncio.wait_for(ls.workspace_configuration_async(params), PULL_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - a client's failure must not stop the server
        log.warning("%s: no answer (%s: %s); keeping the settings in force", source, type(exc).__name__, exc)
        return
    log.debug("%s answered %r", source, answer)
    section = answer[0] if isinstance(answer, (list, tuple)) and answer else None
    if isinstance(section, dict) and section:
        apply_settings(ls, section, source)


def apply_settings(ls: DlmServer, data: Any, source: str) -> None:
    """Merge client settings; log what is now in force, once per change."""
    if data is None:
        return
    new, problems = ls.settings.merged(data)
    for problem in problems:
        log.warning("%s: %s", source, problem)
    ls.settings = new
    ls.policy.apply(new)
    set_level(new.log_level)
    log.info("settings from %s: %s", source, json.dumps(new.public(), sort_keys=True))


# --------------------------------------------------------------------------- running


def serve(settings: Settings, early=None) -> int:
    """Run the server over stdio until `exit` or the end of stdin; returns the exit status."""
    configure_logging(settings)
    ls = build_server(settings)
    log.info("dlm-ls %s serving over stdio (pid %d)%s", VERSION, os.getpid(),
             "; initialize answered from the kept answer" if early is not None and early.answered else "")
    ls.start_io(early=early)
    return 0 if ls.shutdown_requested and not ls.stream_error else 1
