"""The language server: pygls handlers, each a thin step into plain functions.

One completion is a straight pipeline under a request id (every log line carries it):
find the document -> cursor offset -> type-through? -> decide the region (none / line / block) ->
cut a bounded context window, with chunks of other open documents before it -> the suggestion
cache, or the speculation already computing this context? -> ask the worker (cancel-previous,
debounce) -> pick the candidate length that parses best, cleaned -> LSP items. After a suggestion
is shown, the next one is computed in the background as if it were accepted (policy.py).

`dlm/fill` (a request), the `dlm.fill` command and two code actions fill hole markers or rewrite a
selection in one parallel refinement and answer text edits; the command may hand them to the
client through workspace/applyEdit. The server never writes files.

The server never imports torch (unless `in_process` is set): the model lives in the worker,
reached through `worker_client`. Documents live in our own store (documents.py), not in pygls'
workspace, so a big file is held once and an edit costs the edit, not a re-split of every line.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextvars
import functools
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from lsprotocol import types as lsp
from pygls.capabilities import ServerCapabilitiesBuilder
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol, lsp_method

from . import documents as D
from .config import Settings
from .errors import DlmError, to_lsp
from .policy import CompletionPolicy, Speculation, context_key
from .protocol import AnsweringProtocol, StreamError, read_messages
from .worker_client import InProcessBackend, WorkerClient, in_thread, make_backend

NAME, VERSION = "dlm-ls", "0.1.0"
STATUS = "dlm/status"
FILL = "dlm/fill"  # client -> server: fill the hole markers (or rewrite a range) and return text edits
REFINEMENT = "dlm/refinement"  # server -> client: one refinement step of a request (stream_refinement)
FILL_COMMAND = "dlm.fill"  # workspace/executeCommand: fill, then apply the edits through the client
FILL_HOLES_TITLE = "Fill holes with dlm-ls"
REGENERATE_TITLE = "Regenerate selection"
PREAMBLE_MEMO = 64  # extra-context preambles remembered, by document, cursor line and the others' versions

log = logging.getLogger("dlm_ls.server")
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# The JSON-RPC id of the request being handled, as the client sent it (int or str): dlm/refinement
# carries it, so a client can tell the steps of its current request from a late one's.
message_id: contextvars.ContextVar[int | str | None] = contextvars.ContextVar("message_id", default=None)


# --------------------------------------------------------------------------- the pipeline, as plain functions

# How much prefix fits the engine's context: the engine keeps the prefix's end and gives the suffix at
# most a quarter of its token budget (model/layout.truncate_context). Code tokenizes to about 3.6
# characters a token with the trained tokenizer; 3 errs toward fitting, so chunks shown before the
# prefix are not the first thing the engine cuts.
PREFIX_SHARE = 0.75
SUFFIX_SHARE = 1 - PREFIX_SHARE
CHARS_PER_TOKEN = 3.0
DEFAULT_CONTEXT_TOKENS = 2048  # the engine's default when the worker has not said its own
EXTRA_CONTEXT_SHARE = 1 / 3  # chunks of other documents take at most this much of the prefix budget
SPECULATE_MAX_CHARS = 200_000  # a speculation copies the document and its tree: ~15 ms at this size


@dataclass
class Plan:
    """What to ask the model for one cursor."""

    prefix: str  # the document's text before the cursor (a bounded window)
    suffix: str
    mode: str  # "line" | "block"
    overrides: dict[str, Any]
    reason: str
    region: Any  # regions.Region
    preamble: str = ""  # chunks of other documents, shown to the model before the prefix

    def segments(self) -> list[str]:
        return [self.preamble + self.prefix, self.suffix]


@dataclass
class Outcome:
    text: str | None  # the cleaned suggestion, None when there is nothing worth showing
    plan: Plan | None
    result: dict[str, Any] = field(default_factory=dict)  # the worker's: middles, nfe, steps, ms, ...
    ms: float = 0.0
    cached: bool = False
    request: dict[str, Any] | None = None  # what was (or would have been) sent to the worker
    stale: bool = False  # the document changed while the model ran: nothing is shown
    source: str = "model"  # model | cache | speculative | type_through | none (no region)


@functools.cache
def _syntax():
    """syntax.py, regions.py and postprocess.py, imported on first use (tree-sitter is not free)."""
    from . import postprocess, regions, syntax

    return syntax, regions, postprocess


def attach_syntax(doc: D.Document, settings: Settings) -> None:
    """Give a document a parse tree kept current by its edits, when its language has a grammar and
    it is small enough for a parse to be cheap; others get line rules."""
    syntax = _syntax()[0]
    if len(doc.text) <= settings.max_syntax_chars and syntax.is_supported(doc.language_id):
        doc.syntax = syntax.SyntaxTree(doc.language_id, doc.text)
    else:
        doc.syntax = None


def _region_input(doc: D.Document, offset: int, prefix: str, suffix: str):
    """The text the region rules read: the whole document with its tree when it has one, else the
    bounded window around the cursor (a huge file is never scanned whole per keystroke)."""
    tree = doc.syntax
    if tree is not None and getattr(tree, "text", None) is doc.text:
        return doc.text, offset, tree
    return prefix + suffix, len(prefix), None


def prompt_chars(context_tokens: int | None) -> int:
    """Characters of preamble + prefix that the engine's token budget keeps whole."""
    return int((context_tokens or DEFAULT_CONTEXT_TOKENS) * PREFIX_SHARE * CHARS_PER_TOKEN)


def extra_context_preamble(doc: D.Document, offset: int, others: dict[str, str], budget_chars: int,
                           root: str | None = None, min_score: float = 0.0) -> str:
    """Chunks of `others` (uri -> text) most relevant to the cursor, formatted as comments; "" for none."""
    if budget_chars <= 0 or not others:
        return ""
    from . import extra_context as X

    chunks = X.select_chunks(doc.text, offset, doc.language_id, others, budget_chars, doc.uri, root, min_score)
    return X.format_chunks(chunks, doc.language_id, root)


def prompt_window(doc: D.Document, offset: int, settings: Settings, preamble: str = "",
                  max_prompt_chars: int | None = None) -> tuple[str, str]:
    """The prefix and suffix windows, cut at line breaks to what the engine's budget keeps.

    With `max_prompt_chars` (from the worker's token budget), the prefix gives up its oldest whole
    lines so that preamble + prefix fit it, and the suffix its last lines so that it fits its share.
    Were they left longer, the engine would cut them token by token, and the prefix's first kept
    token would move with every keystroke: the worker's context cache (longest common prefix)
    would then recompute the whole prefix per key. Cut at lines, the window start moves once per
    line, and only the typed tail is recomputed. (It also keeps a preamble from being cut first.)
    """
    prefix, suffix = D.context_window(doc.text, offset, settings.max_context_chars)
    if max_prompt_chars is None:
        return prefix, suffix
    if len(preamble) + len(prefix) > max_prompt_chars:
        room = max(0, max_prompt_chars - len(preamble))
        prefix = D.context_window(prefix, len(prefix), room)[0]
    suffix_room = int(max_prompt_chars * SUFFIX_SHARE / PREFIX_SHARE)
    if len(suffix) > suffix_room:
        suffix = D.context_window(suffix, 0, suffix_room)[1]
    return prefix, suffix


def plan_completion(doc: D.Document, offset: int, settings: Settings, preamble: str = "",
                    max_prompt_chars: int | None = None) -> Plan | None:
    """Region and bounded context for a cursor; None when no completion belongs there."""
    prefix, suffix = prompt_window(doc, offset, settings, preamble, max_prompt_chars)
    text, at, tree = _region_input(doc, offset, prefix, suffix)
    region = _syntax()[1].decide_region(text, at, doc.language_id, tree)
    if region.kind == "none":
        return None
    overrides: dict[str, Any] = {"canvas_lengths": list(region.canvas_lengths), "max_tokens": region.max_tokens}
    overrides.update(settings.sampler_overrides())  # the user's explicit settings win
    return Plan(prefix, suffix, region.kind, overrides, region.reason, region, preamble)


def completion_request(plan: Plan, rid: str, cache_key: str | None, stream: bool = False) -> dict[str, Any]:
    """The worker's infill params for a plan."""
    return {"id": rid, "segments": plan.segments(), "mode": plan.mode, "cache_key": cache_key,
            "overrides": plan.overrides, "stream": stream}


def request_key(params: dict[str, Any]) -> str:
    """The suggestion cache's key for a request: its context, not its document or id."""
    return context_key(params["segments"], params["mode"], params.get("overrides") or {})


def finish_completion(doc: D.Document, offset: int, plan: Plan, middle: str) -> str | None:
    """The suggestion to show, cleaned (cut at the enclosing string, bracket or block; repeats of
    the suffix dropped); None to show nothing."""
    text, at, tree = _region_input(doc, offset, plan.prefix, plan.suffix)
    return _syntax()[2].clean_completion(text, at, middle, doc.language_id, plan.region, tree)


def choose_completion(doc: D.Document, offset: int, plan: Plan, result: dict[str, Any],
                      parse_filter: bool = True) -> str | None:
    """Among the worker's candidate lengths (best score first), the cleaned one that leaves the file
    parsing best (postprocess.choose_best), or without `parse_filter` the first that survives
    cleaning; None to show nothing."""
    candidates = [c[0] for c in result.get("candidates") or () if c] or list(result.get("middles") or ())[:1]
    if not parse_filter:
        return next((t for c in candidates if (t := finish_completion(doc, offset, plan, c)) is not None), None)
    if not candidates:
        return None
    text, at, tree = _region_input(doc, offset, plan.prefix, plan.suffix)
    return _syntax()[2].choose_best(text, at, candidates, doc.language_id, plan.region, tree)


async def ask_model(backend, doc: D.Document, offset: int, plan: Plan, params: dict[str, Any],
                    settings: Settings, on_step: Callable[[dict], None] | None = None) -> Outcome:
    """Send a planned request to the worker and clean its answer."""
    t0 = time.perf_counter()
    text_at_plan = doc.text  # str is immutable: any edit while the model runs replaces this object
    try:
        result = await asyncio.wait_for(backend.infill(params, on_step), settings.request_timeout_s)
    except asyncio.TimeoutError:
        raise DlmError("timeout", f"no completion within {settings.request_timeout_s:g} s") from None
    ms = (time.perf_counter() - t0) * 1000
    if doc.text is not text_at_plan:  # the user typed meanwhile: the cursor's context is gone
        return Outcome(None, plan, result, ms, request=params, stale=True)
    return Outcome(choose_completion(doc, offset, plan, result, settings.parse_filter), plan, result, ms,
                   request=params)


async def run_completion(backend, doc: D.Document, offset: int, settings: Settings, rid: str,
                         on_step: Callable[[dict], None] | None = None) -> Outcome:
    """Plan, ask the worker, clean up, with no cache and no other documents: `dlm-ls complete`."""
    t0 = time.perf_counter()
    plan = plan_completion(doc, offset, settings)
    if plan is None:
        return Outcome(None, None, ms=(time.perf_counter() - t0) * 1000, source="none")
    params = completion_request(plan, rid, doc.uri, on_step is not None)
    outcome = await ask_model(backend, doc, offset, plan, params, settings, on_step)
    outcome.ms = (time.perf_counter() - t0) * 1000
    return outcome


def plan_fill(doc: D.Document, rng: tuple[int, int] | None, settings: Settings) -> tuple[list, list[str]]:
    """The holes to fill (str offsets) and the text around them; a range is one hole."""
    from . import holes as H

    if rng is not None:
        spans = H.holes_from_range(doc.text, *rng)
    else:
        current = doc.syntax is not None and doc.syntax.text is doc.text and doc.syntax.tree is not None
        spans = H.find_holes(doc.text, doc.language_id, settings.hole_marker, settings.python_ellipsis_holes,
                             doc.syntax.tree if current else None)
    if not spans:
        return [], []
    segments = H.segments_around(doc.text, spans)
    budget = settings.max_context_chars  # the outer context is cut like a cursor's; the engine checks the rest
    segments[0] = D.context_window(segments[0], len(segments[0]), budget)[0]
    segments[-1] = D.context_window(segments[-1], 0, budget)[1]
    return spans, segments


def may_have_holes(text: str, language_id: str, settings: Settings) -> bool:
    """A cheap test before the parse that finds `...` statements (code actions ask on every cursor move)."""
    return bool(settings.hole_marker and settings.hole_marker in text) or \
        (settings.python_ellipsis_holes and language_id == "python" and "..." in text)


# --------------------------------------------------------------------------- the server


class DlmProtocol(AnsweringProtocol, LanguageServerProtocol):
    """pygls' protocol, with documents kept only in our store (see the module docstring), and every
    request answered exactly once (protocol.py)."""

    def _user(self, method: str, params: Any):
        if (handler := self.fm.features.get(method)) is not None:
            yield handler, (params,), None

    @lsp_method(lsp.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: lsp.DidOpenTextDocumentParams):
        yield from self._user(lsp.TEXT_DOCUMENT_DID_OPEN, params)

    @lsp_method(lsp.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: lsp.DidChangeTextDocumentParams):
        yield from self._user(lsp.TEXT_DOCUMENT_DID_CHANGE, params)

    @lsp_method(lsp.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: lsp.DidCloseTextDocumentParams):
        yield from self._user(lsp.TEXT_DOCUMENT_DID_CLOSE, params)


class DlmServer(LanguageServer):
    def __init__(self, settings: Settings):
        super().__init__(NAME, VERSION, protocol_cls=DlmProtocol,
                         text_document_sync_kind=lsp.TextDocumentSyncKind.Incremental)
        self.settings = settings
        self.docs = D.DocumentStore(D.UTF16)
        self.policy = CompletionPolicy(settings.debounce_ms, settings.cache_entries)
        self.backend: WorkerClient | InProcessBackend | None = None
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
        self._backend_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()  # background work: speculations, warms
        self._warm_timers: dict[str, asyncio.Task] = {}
        self._preambles: collections.OrderedDict[tuple, str] = collections.OrderedDict()
        self._holes: dict[str, tuple[str, list]] = {}  # uri -> (text, holes): code actions ask often
        self._speculations = 0

    # -- the model behind us

    async def get_backend(self) -> WorkerClient | InProcessBackend:
        async with self._backend_lock:  # one backend, however many requests ask for it at once
            return await self._make_backend()

    async def _make_backend(self) -> WorkerClient | InProcessBackend:
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

    def start_io(self, stdin=None, stdout=None) -> None:
        """Serve over stdio with our own framing (protocol.read_messages) in place of pygls' loop."""
        from pygls.io_ import StdinAsyncReader, StdoutWriter
        from threading import Event

        self._stop_event = Event()
        self.protocol.set_writer(StdoutWriter(stdout or sys.stdout.buffer))
        reader = StdinAsyncReader(stdin or sys.stdin.buffer, self.thread_pool)
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

    async def replace_backend(self) -> None:
        old, self.backend = self.backend, None
        self.context_tokens = None
        self.policy.cache.entries.clear()  # another model answers differently
        if old is not None:
            await old.close()

    def learn_worker(self, status: dict[str, Any]) -> None:
        tokens = (status.get("info") or {}).get("max_context_tokens")
        if isinstance(tokens, int) and tokens > 0:
            self.context_tokens = tokens

    def background(self, coro) -> asyncio.Task:
        """Run work nobody waits for; keep a reference (the loop holds tasks weakly) and log failures."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def reap(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("background work failed: %r", t.exception())
        task.add_done_callback(reap)
        return task

    def stop_background(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    # -- completion

    async def complete(self, uri: str, position: lsp.Position,
                       kind: str) -> tuple[Outcome, int, D.Document] | None:
        """One completion request, under cancel-previous; None when superseded or stale.

        Cheapest answer first: type-through (no debounce), then the cache or the running speculation
        for this very context, then the model."""
        doc = self.docs.get(uri)
        offset = doc.offset_at((position.line, position.character), strict=True)  # bad positions fail now
        text_at_request = doc.text
        rid = request_id.get()
        ticket = self.policy.begin(uri, kind, rid)
        self._cancel_warm(uri)  # this request fills the worker's cache itself
        t0 = time.perf_counter()
        window = D.context_window(doc.text, offset, self.settings.max_context_chars)
        try:
            rest = self.policy.type_through(uri, offset, *window)
            if rest is not None:
                outcome = Outcome(rest, None, cached=True, source="type_through")
            else:
                await self.policy.debounce()
                backend = await self.get_backend()
                if doc.text is not text_at_request:  # typed during the debounce: the position is stale
                    self.policy.counters["stale"] += 1
                    log.info("the document changed before the model was asked; nothing to show")
                    return None
                outcome = await self._suggest(backend, doc, offset, rid)
        except asyncio.CancelledError:
            if ticket.superseded:
                log.info("superseded by a newer request for this document")
                return None
            self.policy.counters["cancelled"] += 1
            log.info("cancelled by the client")
            raise
        except DlmError as exc:
            self.policy.counters["errors"] += 1
            log.warning("failed: %s", exc)
            raise
        finally:
            self.policy.end(ticket)
        outcome.ms = (time.perf_counter() - t0) * 1000
        self._account(outcome)
        if not outcome.stale:
            self.policy.shown(uri, offset, *window, outcome.text)
            if outcome.text and outcome.source != "type_through":  # typing through keeps the same next one
                self._speculate(doc, offset, outcome.text)
        return outcome, offset, doc

    async def _suggest(self, backend, doc: D.Document, offset: int, rid: str) -> Outcome:
        preamble, max_chars = self.preamble(doc, offset)
        plan = plan_completion(doc, offset, self.settings, preamble, max_chars)
        if plan is None:
            return Outcome(None, None, source="none")
        on_step = self._streamer(doc.uri, rid) if self.settings.stream_refinement else None
        params = completion_request(plan, f"{os.getpid()}:{rid}", doc.uri, on_step is not None)
        key = request_key(params)
        hit = self.policy.lookup(key)
        spec = self.policy.speculation(doc.uri) if hit is None else None
        if spec is not None and spec.key == key:
            # The running speculation computes exactly this: wait for it instead of asking again.
            text_before = doc.text
            await asyncio.wait([spec.task])
            if doc.text is not text_before:
                return Outcome(None, plan, request=params, stale=True, source="speculative")
            hit = self.policy.lookup(key)
        elif spec is not None:
            self.policy.cancel_speculation(doc.uri)  # it guessed a text the user did not write
        if hit is not None:
            return Outcome(hit.text, plan, cached=True, request=params,
                           source="speculative" if hit.origin == "speculative" else "cache")
        self.policy.counters["model_calls"] += 1
        outcome = await ask_model(backend, doc, offset, plan, params, self.settings, on_step)
        if not outcome.stale:
            self.policy.remember(key, outcome.text)
        return outcome

    def _speculate(self, doc: D.Document, offset: int, text: str) -> None:
        """Compute, in the background, the suggestion that will be asked for if this one is accepted."""
        if not self.settings.speculative or self.backend is None or len(doc.text) > SPECULATE_MAX_CHARS:
            return
        spec = self.policy.start_speculation(doc.uri)
        accepted = D.Document(doc.uri, doc.text[:offset] + text + doc.text[offset:], doc.language_id,
                              encoding=self.docs.encoding)
        if doc.syntax is not None and doc.syntax.text is doc.text:
            # The document's tree with the suggestion inserted: an incremental reparse, not a parse.
            accepted.syntax = doc.syntax.with_insert(offset, text, accepted.text)
        self._speculations += 1
        rid = f"{request_id.get()}>spec{self._speculations}"
        spec.task = self.background(self._run_speculation(spec, accepted, offset + len(text), rid))

    async def _run_speculation(self, spec: Speculation, doc: D.Document, offset: int, rid: str) -> None:
        request_id.set(rid)
        preamble, max_chars = self.preamble(doc, offset)
        plan = plan_completion(doc, offset, self.settings, preamble, max_chars)
        if plan is None:
            return
        params = {**completion_request(plan, f"{os.getpid()}:{rid}", spec.uri), "priority": "low"}
        spec.key = request_key(params)
        if self.policy.cache.get(spec.key) is not None:
            return
        try:
            outcome = await ask_model(await self.get_backend(), doc, offset, plan, params, self.settings)
        except DlmError as exc:
            log.info("speculation failed: %s", exc)
            return
        self.policy.remember(spec.key, outcome.text, "speculative")
        self.policy.counters["speculations_done"] += 1
        log.info("speculated in %.0f ms: %r", outcome.ms, (outcome.text or "")[:80])

    def preamble(self, doc: D.Document, offset: int) -> tuple[str, int]:
        """Chunks of the other open documents of the same language for this cursor ("" for none),
        and the characters that preamble and prefix may take together (prompt_window).

        Kept per (document, cursor line, versions of the others): the chunks stay the same while the
        user types along a line, so the worker's context cache keeps reusing the prompt, and
        ranking does not run on every keystroke."""
        max_chars = prompt_chars(self.context_tokens)
        budget = self.settings.extra_context_chars
        if budget <= 0:
            return "", max_chars
        others = {u: d for u, d in self.docs.docs.items() if u != doc.uri and d.language_id == doc.language_id}
        if not others:
            return "", max_chars
        budget = min(budget, int(max_chars * EXTRA_CONTEXT_SHARE))
        line = bisect.bisect_right(doc.starts, offset) - 1
        key = (doc.uri, line, budget, tuple(sorted((u, d.version, len(d.text)) for u, d in others.items())))
        text = self._preambles.get(key)
        if text is None:
            text = extra_context_preamble(doc, offset, {u: d.text for u, d in others.items()}, budget, self.root_uri,
                                          self.settings.extra_context_min_score)
            self._preambles[key] = text
            while len(self._preambles) > PREAMBLE_MEMO:
                self._preambles.popitem(last=False)
        else:
            self._preambles.move_to_end(key)
        return text, max_chars

    def _streamer(self, uri: str, rid: str) -> Callable[[dict], None]:
        sent_id = message_id.get()

        def send(update: dict) -> None:
            self.protocol.notify(REFINEMENT, {"uri": uri, "id": sent_id, "requestId": rid, "step": update.get("step"),
                                              "text": update.get("text"), "ms": update.get("ms")})
        return send

    def _account(self, out: Outcome) -> None:
        p = self.policy
        p.latency.record("total", out.ms)
        p.latency.record(f"served_{out.source}", out.ms)  # how fast each kind of answer is
        if out.result:
            p.latency.record("model", float(out.result.get("ms", 0.0)))
            p.counters["nfe"] += int(out.result.get("nfe", 0))
        p.counters["stale" if out.stale else "empty" if out.text is None else "suggestions"] += 1
        r = out.result
        self.last_request = {"ms": round(out.ms, 2), "cached": out.cached, "source": out.source,
                             "suggested": out.text is not None,
                             "prefix_chars": len(out.plan.prefix) if out.plan else 0,
                             "suffix_chars": len(out.plan.suffix) if out.plan else 0,
                             "extra_context_chars": len(out.plan.preamble) if out.plan else 0,
                             "mode": out.plan.mode if out.plan else None,
                             **{k: r[k] for k in ("nfe", "steps", "prefill_tokens", "canvas_length") if k in r}}
        log.info("%s from %s in %.0f ms (model %.0f ms, nfe %s, steps %s, canvas %s, %s): %r",
                 "suggestion" if out.text else "nothing", out.source, out.ms, r.get("ms", 0.0), r.get("nfe", "-"),
                 r.get("steps", "-"), r.get("canvas_length", "-"), out.plan.reason if out.plan else "-",
                 (out.text or "")[:80])

    # -- warming the worker's context cache

    def schedule_warm(self, uri: str, offset: int, delay_ms: int) -> None:
        """Warm the context at `offset` after `delay_ms` unless a request for the document comes first."""
        if not self.settings.warm:
            return
        self._cancel_warm(uri)
        self._warm_timers[uri] = self.background(self._warm_later(uri, offset, delay_ms))

    def _cancel_warm(self, uri: str) -> None:
        task = self._warm_timers.pop(uri, None)
        if task is not None and not task.done():
            task.cancel()

    async def _warm_later(self, uri: str, offset: int, delay_ms: int) -> None:
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000.0)
        if self._warm_timers.get(uri) is asyncio.current_task():
            del self._warm_timers[uri]
        await self.warm(uri, offset)

    async def warm(self, uri: str, offset: int) -> None:
        """Have the worker compute the context a completion at `offset` would send (fire and forget)."""
        doc = self.docs.docs.get(uri)
        if doc is None or not doc.text.strip():
            return
        offset = max(0, min(offset, len(doc.text)))
        preamble, max_chars = self.preamble(doc, offset)
        prefix, suffix = prompt_window(doc, offset, self.settings, preamble, max_chars)
        try:
            backend = await self.get_backend()
            await asyncio.wait_for(backend.warm({"cache_key": uri, "segments": [preamble + prefix, suffix]}),
                                   self.settings.request_timeout_s)
        except (DlmError, asyncio.TimeoutError) as exc:
            log.info("warming %s failed: %s", uri, exc)
            return
        self.policy.counters["warms"] += 1
        log.debug("warmed %s at offset %d", uri, offset)

    # -- fill

    def holes_in(self, doc: D.Document) -> list[tuple[int, int]]:
        """The document's hole markers, remembered until its text changes."""
        if not may_have_holes(doc.text, doc.language_id, self.settings):
            return []
        hit = self._holes.get(doc.uri)
        if hit is not None and hit[0] is doc.text:
            return hit[1]
        spans = plan_fill(doc, None, self.settings)[0]
        self._holes[doc.uri] = (doc.text, spans)
        return spans

    async def fill(self, uri: str, rng: Any = None, stream: bool = False,
                   progress_token: Any = None) -> dict[str, Any]:
        """Fill every hole of a document (or rewrite `rng`) in ONE infill job: all holes are refined
        together. Returns text edits; the server never writes files."""
        doc = self.docs.get(uri)
        span = None
        if rng is not None:
            def offset(end: str) -> int:
                line, char = _field(rng, end, "line"), _field(rng, end, "character")
                if not (isinstance(line, int) and isinstance(char, int)):
                    raise DlmError("invalid_params", f"range.{end} needs integer line and character")
                return doc.offset_at((line, char), strict=True)
            span = (offset("start"), offset("end"))
        spans, segments = plan_fill(doc, span, self.settings)
        if not spans:
            return {"edits": [], "version": doc.version, "holes": 0}
        text_at_plan, version = doc.text, doc.version
        backend = await self.get_backend()
        rid = request_id.get()
        on_step = self._streamer(uri, rid) if stream else None
        if progress_token is not None:
            on_step = self._progress(progress_token, len(spans), on_step)
        request = {"id": f"{os.getpid()}:{rid}", "segments": segments, "mode": "block",
                   "cache_key": f"{uri}#fill", "overrides": self.settings.sampler_overrides(),
                   "stream": on_step is not None}
        self.policy.counters["fills"] += 1
        t0 = time.perf_counter()
        try:
            result = await asyncio.wait_for(backend.infill(request, on_step), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise DlmError("timeout", f"no fill within {self.settings.request_timeout_s:g} s") from None
        finally:
            if progress_token is not None:
                self.work_done_progress.end(progress_token, lsp.WorkDoneProgressEnd(message="done"))
        if doc.text is not text_at_plan:
            raise DlmError("superseded", "the document changed while filling; ask again")
        edits = []
        for (a, b), middle in zip(spans, result["middles"], strict=True):
            start, end = doc.position_at(a), doc.position_at(b)
            edits.append({"range": {"start": {"line": start[0], "character": start[1]},
                                    "end": {"line": end[0], "character": end[1]}}, "newText": middle})
        log.info("filled %d holes in one job in %.0f ms (nfe %s)", len(edits), (time.perf_counter() - t0) * 1000,
                 result.get("nfe"))
        return {"edits": edits, "version": version, "holes": len(spans), "nfe": result.get("nfe"),
                "steps": result.get("steps"), "ms": result.get("ms")}

    def _progress(self, token: Any, holes: int, then: Callable[[dict], None] | None) -> Callable[[dict], None]:
        """$/progress for a client-given workDoneToken: a report per refinement step."""
        self.work_done_progress.begin(token, lsp.WorkDoneProgressBegin(
            title="dlm-ls", message=f"filling {holes} hole{'s' * (holes != 1)}", cancellable=False))

        def report(update: dict) -> None:
            self.work_done_progress.report(token, lsp.WorkDoneProgressReport(message=f"step {update.get('step')}"))
            if then is not None:
                then(update)
        return report

    async def apply_edits(self, uri: str, version: int | None, edits: list[dict]) -> bool:
        """Ask the client to apply `edits` (workspace/applyEdit); False when it cannot or refuses."""
        if not edits or not self.can_apply_edit:
            return False
        text_edits = [lsp.TextEdit(range=lsp.Range(start=lsp.Position(**e["range"]["start"]),
                                                   end=lsp.Position(**e["range"]["end"])), new_text=e["newText"])
                      for e in edits]
        if self.versioned_edits and version is not None:
            change = lsp.WorkspaceEdit(document_changes=[lsp.TextDocumentEdit(
                text_document=lsp.OptionalVersionedTextDocumentIdentifier(uri=uri, version=version),
                edits=text_edits)])
        else:
            change = lsp.WorkspaceEdit(changes={uri: text_edits})
        answer = await self.workspace_apply_edit_async(lsp.ApplyWorkspaceEditParams(edit=change, label="dlm-ls fill"))
        if not answer.applied:
            log.info("the client did not apply the fill: %s", answer.failure_reason)
        return bool(answer.applied)

    def code_actions(self, params: lsp.CodeActionParams) -> list[lsp.CodeAction]:
        """"Fill holes with dlm-ls" where the document has holes, "Regenerate selection" for a
        selection; both run the dlm.fill command (computing the edits here would run the model on
        every cursor move)."""
        kind = lsp.CodeActionKind.RefactorRewrite
        only = [str(getattr(k, "value", k)) for k in (params.context.only or ())] if params.context else []
        if only and not any(kind.value == k or kind.value.startswith(k + ".") for k in only):
            return []
        uri = params.text_document.uri
        doc = self.docs.docs.get(uri)
        if doc is None:
            return []
        actions = []
        if self.holes_in(doc):
            actions.append(lsp.CodeAction(title=FILL_HOLES_TITLE, kind=kind, command=lsp.Command(
                title=FILL_HOLES_TITLE, command=FILL_COMMAND, arguments=[{"textDocument": {"uri": uri}}])))
        r = params.range
        if (r.start.line, r.start.character) != (r.end.line, r.end.character):
            rng = {"start": {"line": r.start.line, "character": r.start.character},
                   "end": {"line": r.end.line, "character": r.end.character}}
            actions.append(lsp.CodeAction(title=REGENERATE_TITLE, kind=kind, command=lsp.Command(
                title=REGENERATE_TITLE, command=FILL_COMMAND,
                arguments=[{"textDocument": {"uri": uri}, "range": rng}])))
        return actions

    # -- status

    def document_status(self, uri: str) -> dict[str, Any]:
        """What the server holds for one document: lets a client check that sync kept up."""
        doc = self.docs.get(uri)
        digest = hashlib.sha256(doc.text.encode("utf-8", "surrogatepass")).hexdigest()
        return {"uri": uri, "version": doc.version, "language_id": doc.language_id, "chars": len(doc.text),
                "lines": doc.line_count, "sha256": digest}

    async def status(self, wait: bool = False) -> dict[str, Any]:
        """Server, settings, latency, and the worker's own status; `wait` waits for a worker that
        is still loading its model instead of reporting it as not answering."""
        s = self.settings
        out: dict[str, Any] = {
            "server": {"pid": os.getpid(), "version": VERSION, "uptime_s": round(time.monotonic() - self.started, 3),
                       "torch_loaded": "torch" in sys.modules, "documents": len(self.docs),
                       "position_encoding": self.position_encoding, "rss_bytes": _rss_bytes()},
            "settings": s.public(),
            "policy": self.policy.status(),
            "latency_ms": self.policy.latency.summary(),
            "last_request": self.last_request,
            "model": None, "device": None, "worker_pid": None, "cache": None,
        }
        try:
            backend = await self.get_backend()
            out["backend"] = backend.describe()
            w = await asyncio.wait_for(backend.status(), None if wait else 10.0)
            self.learn_worker(w)
            info = w.get("info", {})
            out.update(model=info.get("model"), model_dir=info.get("model_dir"), device=info.get("device"),
                       dtype=info.get("dtype"), parameters=info.get("parameters"), worker_pid=w.get("pid"),
                       cache=w.get("cache"), worker=w)
        except (DlmError, asyncio.TimeoutError) as exc:
            out["worker_error"] = str(exc) or "the worker did not answer within 10 s (still loading the model?)"
        return out


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------- handlers


def lsp_errors(handler):
    """Run a handler under a request id; our errors become LSP errors here and nowhere else."""
    @functools.wraps(handler)
    async def wrapped(ls: DlmServer, params):
        msg_id = ls.protocol.msg_id
        token = request_id.set(f"r{msg_id}" if msg_id is not None else "-")
        id_token = message_id.set(msg_id)
        try:
            return await handler(ls, params)
        except DlmError as exc:
            raise to_lsp(exc) from None
        finally:
            message_id.reset(id_token)
            request_id.reset(token)
    return wrapped


def _field(obj: Any, *path: str) -> Any:
    """A field of custom-request params, which pygls hands over as dicts or namedtuples."""
    for name in path:
        if obj is None:
            return None
        obj = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return obj


def _position(doc: D.Document, offset: int) -> lsp.Position:
    line, char = doc.position_at(offset)
    return lsp.Position(line=line, character=char)


def build_server(settings: Settings) -> DlmServer:
    ls = DlmServer(settings)

    @ls.feature(lsp.INITIALIZE)
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

    @ls.feature(lsp.INITIALIZED)
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

    @ls.feature(lsp.WORKSPACE_DID_CHANGE_CONFIGURATION)
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
        if (before.model, before.device, before.dtype, before.in_process) != \
                (now.model, now.device, now.dtype, now.in_process):
            log.info("model or device changed: switching workers")
            await ls.replace_backend()

    @ls.feature(lsp.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: DlmServer, params: lsp.DidOpenTextDocumentParams):
        td = params.text_document
        doc = ls.docs.open(td.uri, td.text, td.language_id, td.version)
        attach_syntax(doc, ls.settings)
        log.debug("opened %s (%s, %d chars)", td.uri, td.language_id, len(td.text))
        # The cursor is not known yet; the end of the file is where a file just opened is most often
        # extended. A wrong guess costs one prefill in the worker.
        ls.schedule_warm(td.uri, len(doc.text), 0)

    @ls.feature(lsp.TEXT_DOCUMENT_DID_CHANGE)
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
        if (doc.syntax is None) != (len(doc.text) > ls.settings.max_syntax_chars):
            attach_syntax(doc, ls.settings)  # crossed the size limit, or the tree was dropped
        last = changes[-1] if changes else None
        if last is not None and last[0] is not None:  # the cursor is most likely after the last edit
            ls.schedule_warm(doc.uri, doc.offset_at(last[0][0]) + len(last[1]), ls.settings.warm_delay_ms)

    @ls.feature(lsp.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: DlmServer, params: lsp.DidCloseTextDocumentParams):
        uri = params.text_document.uri
        ls.policy.forget_document(uri)
        ls._cancel_warm(uri)
        ls._holes.pop(uri, None)
        ls.docs.close(uri)

    @ls.feature(lsp.TEXT_DOCUMENT_INLINE_COMPLETION, lsp.InlineCompletionOptions())
    @lsp_errors
    async def inline_completion(ls: DlmServer, params: lsp.InlineCompletionParams):
        done = await ls.complete(params.text_document.uri, params.position, "inline")
        if done is None or done[0].text is None:
            return lsp.InlineCompletionList(items=[])
        outcome, offset, doc = done
        at = _position(doc, offset)
        return lsp.InlineCompletionList(items=[
            lsp.InlineCompletionItem(insert_text=outcome.text, range=lsp.Range(start=at, end=at))])

    @ls.feature(FILL)
    @lsp_errors
    async def fill(ls: DlmServer, params):
        """Fill every hole marker (`<|hole|>`, a lone `...` in Python) or rewrite `range`; the
        answer is text edits for the client to apply. `stream: true` (or the streamRefinement
        setting) sends dlm/refinement notifications; a workDoneToken gets $/progress reports."""
        uri = _field(params, "textDocument", "uri")
        if not uri:
            raise DlmError("invalid_params", "dlm/fill needs textDocument.uri")
        stream = ls.settings.stream_refinement or bool(_field(params, "stream"))
        return await ls.fill(str(uri), _field(params, "range"), stream, _field(params, "workDoneToken"))

    @ls.command(FILL_COMMAND)
    async def fill_command(ls: DlmServer, *args):
        """workspace/executeCommand dlm.fill {textDocument: {uri}, range?, apply?: true}: the fill's
        edits, applied through workspace/applyEdit unless `apply` is false."""
        return await _fill_command(ls, args[0] if args else None)

    @ls.feature(lsp.TEXT_DOCUMENT_CODE_ACTION,
                lsp.CodeActionOptions(code_action_kinds=[lsp.CodeActionKind.RefactorRewrite]))
    def code_action(ls: DlmServer, params: lsp.CodeActionParams):
        return ls.code_actions(params)

    @ls.feature(STATUS)
    @lsp_errors
    async def status(ls: DlmServer, params):
        out = await ls.status(wait=bool(_field(params, "wait")))
        uri = _field(params, "uri")
        if uri:
            out["document"] = ls.document_status(str(uri))
        return out

    @ls.feature(lsp.SHUTDOWN)
    async def shutdown(ls: DlmServer, params):
        ls.shutdown_requested = True
        ls.stop_background()
        if ls.backend is not None:
            await ls.backend.close()  # the worker itself stays for other editors until its idle timeout

    return ls


@lsp_errors
async def _fill_command(ls: DlmServer, arg: Any):
    uri = _field(arg, "textDocument", "uri")
    if not uri:
        raise DlmError("invalid_params", f"{FILL_COMMAND} needs an argument {{textDocument: {{uri}}, range?}}")
    out = await ls.fill(str(uri), _field(arg, "range"), ls.settings.stream_refinement)
    apply = _field(arg, "apply")
    out["applied"] = await ls.apply_edits(str(uri), out.get("version"), out["edits"]) if apply is not False else False
    return out


@lsp_errors
async def completion(ls: DlmServer, params: lsp.CompletionParams):
    """textDocument/completion for clients without inline completion: one item, the suggestion."""
    done = await ls.complete(params.text_document.uri, params.position, "completion")
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
    ls.policy.debounce_ms = new.debounce_ms
    ls.policy.cache.capacity = new.cache_entries
    _set_level(new.log_level)
    log.info("settings from %s: %s", source, json.dumps(new.public(), sort_keys=True))


# --------------------------------------------------------------------------- running


class _KnownErrorFilter(logging.Filter):
    """pygls logs a traceback for every error reply, and for every message whose params do not fit;
    ours were already logged in one line (protocol.py answers or logs those once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Unable to deserialize message\n%s":
            return False
        exc = record.exc_info[1] if record.exc_info else None
        data = getattr(exc, "data", None)
        return not (isinstance(data, dict) and "code" in data)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rid = request_id.get()
        return True


def _set_level(level: str) -> None:
    logging.getLogger("dlm_ls").setLevel(getattr(logging, level.upper(), logging.INFO))
    # pygls logs every message it sends at INFO (whole documents included): keep it quiet
    logging.getLogger("pygls").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


def configure_logging(settings: Settings) -> None:
    fmt = logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s dlm-ls[%(process)d] [%(rid)s] %(message)s",
                            "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]  # editors keep a server's stderr
    if settings.log_file:
        handlers.append(logging.FileHandler(settings.log_file, encoding="utf-8"))
    root = logging.getLogger()
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(_RequestIdFilter())
        root.addHandler(h)
    root.setLevel(logging.WARNING)
    logging.getLogger("pygls.protocol.json_rpc").addFilter(_KnownErrorFilter())
    _set_level(settings.log_level)


def serve(settings: Settings) -> int:
    """Run the server over stdio until `exit` or the end of stdin; returns the exit status."""
    configure_logging(settings)
    ls = build_server(settings)
    log.info("dlm-ls %s serving over stdio (pid %d)", VERSION, os.getpid())
    ls.start_io()
    return 0 if ls.shutdown_requested and not ls.stream_error else 1
