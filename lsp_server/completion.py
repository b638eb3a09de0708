"""One completion, as a row of named steps under a request id (every log line carries it):

    find_document -> type_through? -> decide the region (plan_completion) -> build the prompt (window,
    chunks of other open documents before it) -> the suggestion cache, or the speculation already
    computing this context? -> ask the backend (ask_model) -> post-process (choose_completion) ->
    answer (the handler turns the Outcome into LSP items).

One `Plan` carries what the steps share for a cursor: the windows, the region, and the text, offset
and tree the region rules and the post-processing read, computed once. After a suggestion is shown,
the next one is computed in the background as if it were accepted (`speculate`; the policy runs it).

`complete` and `speculate` take the server (its documents, settings, policy and backend); every
other step is a plain function of its arguments. It knows LSP positions only through documents.py
and nothing of sockets or torch.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..model import prompt
from ..worker.protocol import DlmError, InfillReply, InfillRequest, StepUpdate
from . import documents as D
from .config import Settings
from .logs import message_id, request_id
from .policy import Speculation, context_key
from .worker_client import Backend

if TYPE_CHECKING:
    from .server import DlmServer

log = logging.getLogger("dlm_ls.server")

SPECULATE_MAX_CHARS = 200_000  # a speculation copies the document and its tree: ~15 ms at this size
PREAMBLE_MEMO = 64  # extra-context preambles remembered, by document, cursor line and the others' versions


@dataclass
class Plan:
    """What to ask the model for one cursor, and what reading its answer needs."""

    prefix: str  # the document's text before the cursor (a bounded window)
    suffix: str
    mode: str  # "line" | "block"
    overrides: dict[str, Any]
    reason: str
    region: Any  # regions.Region
    preamble: str = ""  # chunks of other documents, shown to the model before the prefix
    # What the region rules read and the post-processing reads again: the whole document with its tree
    # when it has one, else the window (a huge file is never scanned whole per keystroke).
    region_text: str = ""
    region_offset: int = 0
    tree: Any = None

    def segments(self) -> list[str]:
        """The text the model reads around the hole (the preamble before the prefix)."""
        return [self.preamble + self.prefix, self.suffix]


@dataclass
class Outcome:
    text: str | None  # the cleaned suggestion, None when there is nothing worth showing
    plan: Plan | None
    result: InfillReply | None = None  # the worker's answer, when the model was asked
    ms: float = 0.0
    cached: bool = False
    request: InfillRequest | None = None  # what was (or would have been) sent to the worker
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


# --------------------------------------------------------------------------- the steps


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
    """The prefix and suffix windows, cut at line breaks to what the engine's budget keeps
    (`max_prompt_chars`, from the worker's token budget: prompt.fit_window)."""
    prefix, suffix = prompt.line_window(doc.text, offset, settings.max_context_chars)
    if max_prompt_chars is None:
        return prefix, suffix
    return prompt.fit_window(prefix, suffix, preamble, max_prompt_chars)


def plan_completion(doc: D.Document, offset: int, settings: Settings, preamble: str = "",
                    max_prompt_chars: int | None = None) -> Plan | None:
    """Region and bounded context for a cursor; None when no completion belongs there."""
    prefix, suffix = prompt_window(doc, offset, settings, preamble, max_prompt_chars)
    tree = doc.syntax
    if tree is not None and getattr(tree, "text", None) is doc.text:
        text, at = doc.text, offset
    else:
        text, at, tree = prefix + suffix, len(prefix), None
    region = _syntax()[1].decide_region(text, at, doc.language_id, tree)
    if region.kind == "none":
        return None
    # The region says how long a middle may be; the canvas lengths are the checkpoint's (sampler.json).
    overrides: dict[str, Any] = {"max_tokens": region.max_tokens}
    overrides.update(settings.sampler_overrides())  # the user's explicit settings win
    return Plan(prefix, suffix, region.kind, overrides, region.reason, region, preamble, text, at, tree)


def completion_request(plan: Plan, rid: str, cache_key: str | None, stream: bool = False) -> InfillRequest:
    """The worker's infill request for a plan."""
    # The preamble travels apart: the worker tokenizes it on its own, as training does (model/prompt.py).
    return InfillRequest([plan.prefix, plan.suffix], rid, plan.mode, plan.overrides, cache_key=cache_key,
                         stream=stream, preamble=plan.preamble)


def request_key(request: InfillRequest) -> str:
    """The suggestion cache's key for a request: its context, not its document or id."""
    return context_key([request.preamble, *request.segments], request.mode, request.overrides)


def finish_completion(doc: D.Document, offset: int, plan: Plan, middle: str) -> str | None:
    """The suggestion to show, cleaned (cut at the enclosing string, bracket or block; repeats of
    the suffix dropped); None to show nothing."""
    return _syntax()[2].clean_completion(plan.region_text, plan.region_offset, middle, doc.language_id, plan.region,
                                         plan.tree)


def choose_completion(doc: D.Document, offset: int, plan: Plan, result: InfillReply,
                      parse_filter: bool = True) -> str | None:
    """Among the worker's candidate lengths (best score first), the cleaned one that leaves the file
    parsing best (postprocess.choose_best), or without `parse_filter` the first that survives
    cleaning; None to show nothing."""
    candidates = [c[0] for c in result.candidates if c] or result.middles[:1]
    if not parse_filter:
        return next((t for c in candidates if (t := finish_completion(doc, offset, plan, c)) is not None), None)
    if not candidates:
        return None
    return _syntax()[2].choose_best(plan.region_text, plan.region_offset, candidates, doc.language_id, plan.region,
                                    plan.tree)


async def ask_model(backend: Backend, doc: D.Document, offset: int, plan: Plan, request: InfillRequest,
                    settings: Settings, on_step: Callable[[StepUpdate], None] | None = None) -> Outcome:
    """Send a planned request to the backend and clean its answer."""
    t0 = time.perf_counter()
    text_at_plan = doc.text  # str is immutable: any edit while the model runs replaces this object
    try:
        result = await asyncio.wait_for(backend.infill(request, on_step), settings.request_timeout_s)
    except asyncio.TimeoutError:
        raise DlmError("timeout", f"no completion within {settings.request_timeout_s:g} s") from None
    ms = (time.perf_counter() - t0) * 1000
    if doc.text is not text_at_plan:  # the user typed meanwhile: the cursor's context is gone
        return Outcome(None, plan, result, ms, request=request, stale=True)
    return Outcome(choose_completion(doc, offset, plan, result, settings.parse_filter), plan, result, ms,
                   request=request)


async def run_completion(backend: Backend, doc: D.Document, offset: int, settings: Settings, rid: str,
                         on_step: Callable[[StepUpdate], None] | None = None) -> Outcome:
    """Plan, ask the backend, clean up, with no cache and no other documents: `dlm-ls complete`."""
    t0 = time.perf_counter()
    plan = plan_completion(doc, offset, settings)
    if plan is None:
        return Outcome(None, None, ms=(time.perf_counter() - t0) * 1000, source="none")
    request = completion_request(plan, rid, doc.uri, on_step is not None)
    outcome = await ask_model(backend, doc, offset, plan, request, settings, on_step)
    outcome.ms = (time.perf_counter() - t0) * 1000
    return outcome


# --------------------------------------------------------------------------- the extra context


class Preambles:
    """Chunks of the other open documents for a cursor, kept per (document, cursor line, versions of the
    others): the chunks stay the same while the user types along a line, so the worker's context cache
    keeps reusing the prompt, and ranking does not run on every keystroke."""

    def __init__(self, size: int = PREAMBLE_MEMO):
        self.size = size
        self.memo: collections.OrderedDict[tuple, str] = collections.OrderedDict()

    def get(self, ls: "DlmServer", doc: D.Document, offset: int) -> tuple[str, int]:
        """The preamble for this cursor ("" for none), and the characters preamble and prefix may take
        together (prompt_window)."""
        max_chars = prompt.prompt_chars(ls.context_tokens)
        budget = ls.settings.extra_context_chars
        if budget <= 0:
            return "", max_chars
        others = {u: d for u, d in ls.docs.docs.items() if u != doc.uri and d.language_id == doc.language_id}
        if not others:
            return "", max_chars
        budget = min(budget, int(max_chars * prompt.EXTRA_CONTEXT_SHARE))
        line = bisect.bisect_right(doc.starts, offset) - 1
        key = (doc.uri, line, budget, tuple(sorted((u, d.version, len(d.text)) for u, d in others.items())))
        text = self.memo.get(key)
        if text is None:
            text = extra_context_preamble(doc, offset, {u: d.text for u, d in others.items()}, budget, ls.root_uri,
                                          ls.settings.extra_context_min_score)
            self.memo[key] = text
            while len(self.memo) > self.size:
                self.memo.popitem(last=False)
        else:
            self.memo.move_to_end(key)
        return text, max_chars


# --------------------------------------------------------------------------- the request


def find_document(ls: "DlmServer", uri: str, position: Any) -> tuple[D.Document, int]:
    doc = ls.docs.get(uri)
    return doc, doc.offset_at((position.line, position.character), strict=True)  # bad positions fail now


async def complete(ls: "DlmServer", uri: str, position: Any, kind: str) -> tuple[Outcome, int, D.Document] | None:
    """One completion request, under cancel-previous; None when superseded or stale.

    Cheapest answer first: type-through (no debounce), then the cache or the running speculation
    for this very context, then the model."""
    doc, offset = find_document(ls, uri, position)
    text_at_request = doc.text
    rid = request_id.get()
    policy = ls.policy
    ticket = policy.begin(uri, kind, rid)
    policy.cancel_warm(uri)  # this request fills the worker's cache itself
    t0 = time.perf_counter()
    window = prompt.line_window(doc.text, offset, ls.settings.max_context_chars)
    try:
        rest = policy.type_through(uri, offset, *window)
        if rest is not None:
            outcome = Outcome(rest, None, cached=True, source="type_through")
        else:
            await policy.debounce()
            backend = await ls.get_backend()
            if doc.text is not text_at_request:  # typed during the debounce: the position is stale
                policy.count("stale")
                log.info("the document changed before the model was asked; nothing to show")
                return None
            outcome = await suggest(ls, backend, doc, offset, rid)
    except asyncio.CancelledError:
        if ticket.superseded:
            log.info("superseded by a newer request for this document")
            return None
        policy.count("cancelled")
        log.info("cancelled by the client")
        raise
    except DlmError as exc:
        policy.count("errors")
        log.warning("failed: %s", exc)
        raise
    finally:
        policy.end(ticket)
    outcome.ms = (time.perf_counter() - t0) * 1000
    answered(ls, outcome)
    if not outcome.stale:
        policy.shown(uri, offset, *window, outcome.text)
        if outcome.text and outcome.source != "type_through":  # typing through keeps the same next one
            speculate(ls, doc, offset, outcome.text)
    return outcome, offset, doc


async def suggest(ls: "DlmServer", backend: Backend, doc: D.Document, offset: int, rid: str) -> Outcome:
    """The plan's answer: from the cache, the running speculation, or the model."""
    preamble, max_chars = ls.preambles.get(ls, doc, offset)
    plan = plan_completion(doc, offset, ls.settings, preamble, max_chars)
    if plan is None:
        return Outcome(None, None, source="none")
    on_step = streamer(ls, doc.uri, rid) if ls.settings.stream_refinement else None
    request = completion_request(plan, f"{os.getpid()}:{rid}", doc.uri, on_step is not None)
    key = request_key(request)
    policy = ls.policy
    hit = policy.lookup(key)
    spec = policy.speculation(doc.uri) if hit is None else None
    if spec is not None and spec.key == key:
        # The running speculation computes exactly this: wait for it instead of asking again.
        text_before = doc.text
        await asyncio.wait([spec.task])
        if doc.text is not text_before:
            return Outcome(None, plan, request=request, stale=True, source="speculative")
        hit = policy.lookup(key)
    elif spec is not None:
        policy.cancel_speculation(doc.uri)  # it guessed a text the user did not write
    if hit is not None:
        return Outcome(hit.text, plan, cached=True, request=request,
                       source="speculative" if hit.origin == "speculative" else "cache")
    policy.count("model_calls")
    outcome = await ask_model(backend, doc, offset, plan, request, ls.settings, on_step)
    if not outcome.stale:
        policy.remember(key, outcome.text)
    return outcome


def answered(ls: "DlmServer", out: Outcome) -> None:
    """Count and log one answer."""
    ls.last_request = ls.policy.record(out)
    r = out.result
    log.info("%s from %s in %.0f ms (model %.0f ms, nfe %s, steps %s, canvas %s, context computed %s, %s): %r",
             "suggestion" if out.text else "nothing", out.source, out.ms, r.ms if r else 0.0, r.nfe if r else "-",
             r.steps if r else "-", r.canvas_length if r else "-", r.prefill_tokens if r else "-",
             out.plan.reason if out.plan else "-", (out.text or "")[:80])


def streamer(ls: "DlmServer", uri: str, rid: str) -> Callable[[StepUpdate], None]:
    """dlm/refinement notifications, one per refinement step, each with the id of the request it
    belongs to as the client sent it."""
    sent_id = message_id.get()

    def send(update: StepUpdate) -> None:
        ls.protocol.notify(REFINEMENT, {"uri": uri, "id": sent_id, "requestId": rid, "step": update.step,
                                        "text": update.text, "ms": update.ms})
    return send


REFINEMENT = "dlm/refinement"  # server -> client: one refinement step of a request (stream_refinement)


# --------------------------------------------------------------------------- after an answer, before a request


def speculate(ls: "DlmServer", doc: D.Document, offset: int, text: str) -> None:
    """Compute, in the background, the suggestion that will be asked for if this one is accepted."""
    if not ls.settings.speculative or ls.backend is None or len(doc.text) > SPECULATE_MAX_CHARS:
        return
    accepted = D.Document(doc.uri, doc.text[:offset] + text + doc.text[offset:], doc.language_id,
                          encoding=ls.docs.encoding)
    if doc.syntax is not None and doc.syntax.text is doc.text:
        # The document's tree with the suggestion inserted: an incremental reparse, not a parse.
        accepted.syntax = doc.syntax.with_insert(offset, text, accepted.text)
    ls.speculations += 1
    rid = f"{request_id.get()}>spec{ls.speculations}"
    ls.policy.start_speculation(doc.uri, lambda spec: run_speculation(ls, spec, accepted, offset + len(text), rid))


async def run_speculation(ls: "DlmServer", spec: Speculation, doc: D.Document, offset: int, rid: str) -> None:
    request_id.set(rid)
    preamble, max_chars = ls.preambles.get(ls, doc, offset)
    plan = plan_completion(doc, offset, ls.settings, preamble, max_chars)
    if plan is None:
        return
    request = completion_request(plan, f"{os.getpid()}:{rid}", spec.uri)
    request.priority = "low"
    spec.key = request_key(request)
    if ls.policy.holds(spec.key):
        return
    try:
        outcome = await ask_model(await ls.get_backend(), doc, offset, plan, request, ls.settings)
    except DlmError as exc:
        log.info("speculation failed: %s", exc)
        return
    ls.policy.remember(spec.key, outcome.text, "speculative")
    ls.policy.count("speculations_done")
    log.info("speculated in %.0f ms: %r", outcome.ms, (outcome.text or "")[:80])


def schedule_warm(ls: "DlmServer", uri: str, offset: int, delay_ms: int) -> None:
    """Warm the context at `offset` after `delay_ms` unless a request for the document comes first."""
    if ls.settings.warm:
        ls.policy.schedule_warm(uri, delay_ms, lambda: warm(ls, uri, offset))


async def warm(ls: "DlmServer", uri: str, offset: int) -> None:
    """Have the worker compute the context a completion at `offset` would send (fire and forget)."""
    from ..worker.protocol import WarmRequest

    doc = ls.docs.docs.get(uri)
    if doc is None or not doc.text.strip():
        return
    offset = max(0, min(offset, len(doc.text)))
    preamble, max_chars = ls.preambles.get(ls, doc, offset)
    prefix, suffix = prompt_window(doc, offset, ls.settings, preamble, max_chars)
    try:
        backend = await ls.get_backend()
        await asyncio.wait_for(backend.warm(WarmRequest(uri, [prefix, suffix], preamble)), ls.settings.request_timeout_s)
    except (DlmError, asyncio.TimeoutError) as exc:
        log.info("warming %s failed: %s", uri, exc)
        return
    ls.policy.count("warms")
    log.debug("warmed %s at offset %d", uri, offset)
