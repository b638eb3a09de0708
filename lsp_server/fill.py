"""`dlm/fill`, the `dlm.fill` command and the two code actions: fill hole markers or rewrite a selection.

Every hole of a document (or the selected range, as one hole) is filled in ONE infill job: all holes
are refined together. The answer is text edits; the command may hand them to the client through
workspace/applyEdit. The server never writes files. Code actions only offer the command: computing
the edits there would run the model on every cursor move.

It knows documents and LSP types; the model only through the backend.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable

from lsprotocol import types as lsp

from ..model import prompt
from ..worker.protocol import DlmError, InfillRequest, StepUpdate
from . import documents as D
from .completion import streamer
from .config import Settings
from .logs import request_id

if TYPE_CHECKING:
    from .server import DlmServer

log = logging.getLogger("dlm_ls.server")

FILL = "dlm/fill"  # client -> server: fill the hole markers (or rewrite a range) and return text edits
FILL_COMMAND = "dlm.fill"  # workspace/executeCommand: fill, then apply the edits through the client
FILL_HOLES_TITLE = "Fill holes with dlm-ls"
REGENERATE_TITLE = "Regenerate selection"


def field_of(obj: Any, *path: str) -> Any:
    """A field of custom-request params, which pygls hands over as dicts or namedtuples."""
    for name in path:
        if obj is None:
            return None
        obj = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return obj


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
    segments[0] = prompt.line_window(segments[0], len(segments[0]), budget)[0]
    segments[-1] = prompt.line_window(segments[-1], 0, budget)[1]
    return spans, segments


def may_have_holes(text: str, language_id: str, settings: Settings) -> bool:
    """A cheap test before the parse that finds `...` statements (code actions ask on every cursor move)."""
    return bool(settings.hole_marker and settings.hole_marker in text) or \
        (settings.python_ellipsis_holes and language_id == "python" and "..." in text)


def holes_in(ls: "DlmServer", doc: D.Document) -> list[tuple[int, int]]:
    """The document's hole markers, remembered until its text changes."""
    if not may_have_holes(doc.text, doc.language_id, ls.settings):
        return []
    hit = ls.holes.get(doc.uri)
    if hit is not None and hit[0] is doc.text:
        return hit[1]
    spans = plan_fill(doc, None, ls.settings)[0]
    ls.holes[doc.uri] = (doc.text, spans)
    return spans


async def fill(ls: "DlmServer", uri: str, rng: Any = None, stream: bool = False,
               progress_token: Any = None) -> dict[str, Any]:
    """Fill every hole of a document (or rewrite `rng`) in ONE infill job; returns text edits."""
    doc = ls.docs.get(uri)
    span = None
    if rng is not None:
        def offset(end: str) -> int:
            line, char = field_of(rng, end, "line"), field_of(rng, end, "character")
            if not (isinstance(line, int) and isinstance(char, int)):
                raise DlmError("invalid_params", f"range.{end} needs integer line and character")
            return doc.offset_at((line, char), strict=True)
        span = (offset("start"), offset("end"))
    spans, segments = plan_fill(doc, span, ls.settings)
    if not spans:
        return {"edits": [], "version": doc.version, "holes": 0}
    text_at_plan, version = doc.text, doc.version
    backend = await ls.get_backend()
    rid = request_id.get()
    on_step = streamer(ls, uri, rid) if stream else None
    if progress_token is not None:
        on_step = progress(ls, progress_token, len(spans), on_step)
    request = InfillRequest(segments, f"{os.getpid()}:{rid}", "block", ls.settings.sampler_overrides(),
                            cache_key=f"{uri}#fill", stream=on_step is not None)
    ls.policy.count("fills")
    t0 = time.perf_counter()
    try:
        result = await asyncio.wait_for(backend.infill(request, on_step), ls.settings.request_timeout_s)
    except asyncio.TimeoutError:
        raise DlmError("timeout", f"no fill within {ls.settings.request_timeout_s:g} s") from None
    finally:
        if progress_token is not None:
            ls.work_done_progress.end(progress_token, lsp.WorkDoneProgressEnd(message="done"))
    if doc.text is not text_at_plan:
        raise DlmError("superseded", "the document changed while filling; ask again")
    edits = []
    for (a, b), middle in zip(spans, result.middles, strict=True):
        start, end = doc.position_at(a), doc.position_at(b)
        edits.append({"range": {"start": {"line": start[0], "character": start[1]},
                                "end": {"line": end[0], "character": end[1]}}, "newText": middle})
    log.info("filled %d holes in one job in %.0f ms (nfe %s)", len(edits), (time.perf_counter() - t0) * 1000,
             result.nfe)
    return {"edits": edits, "version": version, "holes": len(spans), "nfe": result.nfe,
            "steps": result.steps, "ms": result.ms}


def progress(ls: "DlmServer", token: Any, holes: int,
             then: Callable[[StepUpdate], None] | None) -> Callable[[StepUpdate], None]:
    """$/progress for a client-given workDoneToken: a report per refinement step."""
    ls.work_done_progress.begin(token, lsp.WorkDoneProgressBegin(
        title="dlm-ls", message=f"filling {holes} hole{'s' * (holes != 1)}", cancellable=False))

    def report(update: StepUpdate) -> None:
        ls.work_done_progress.report(token, lsp.WorkDoneProgressReport(message=f"step {update.step}"))
        if then is not None:
            then(update)
    return report


async def fill_command(ls: "DlmServer", arg: Any) -> dict[str, Any]:
    """dlm.fill {textDocument: {uri}, range?, apply?: true}: the fill's edits, applied through
    workspace/applyEdit unless `apply` is false."""
    uri = field_of(arg, "textDocument", "uri")
    if not uri:
        raise DlmError("invalid_params", f"{FILL_COMMAND} needs an argument {{textDocument: {{uri}}, range?}}")
    out = await fill(ls, str(uri), field_of(arg, "range"), ls.settings.stream_refinement)
    apply = field_of(arg, "apply")
    out["applied"] = await apply_edits(ls, str(uri), out.get("version"), out["edits"]) if apply is not False else False
    return out


async def apply_edits(ls: "DlmServer", uri: str, version: int | None, edits: list[dict]) -> bool:
    """Ask the client to apply `edits` (workspace/applyEdit); False when it cannot or refuses."""
    if not edits or not ls.can_apply_edit:
        return False
    text_edits = [lsp.TextEdit(range=lsp.Range(start=lsp.Position(**e["range"]["start"]),
                                               end=lsp.Position(**e["range"]["end"])), new_text=e["newText"])
                  for e in edits]
    if ls.versioned_edits and version is not None:
        change = lsp.WorkspaceEdit(document_changes=[lsp.TextDocumentEdit(
            text_document=lsp.OptionalVersionedTextDocumentIdentifier(uri=uri, version=version),
            edits=text_edits)])
    else:
        change = lsp.WorkspaceEdit(changes={uri: text_edits})
    answer = await ls.workspace_apply_edit_async(lsp.ApplyWorkspaceEditParams(edit=change, label="dlm-ls fill"))
    if not answer.applied:
        log.info("the client did not apply the fill: %s", answer.failure_reason)
    return bool(answer.applied)


def code_actions(ls: "DlmServer", params: lsp.CodeActionParams) -> list[lsp.CodeAction]:
    """"Fill holes with dlm-ls" where the document has holes, "Regenerate selection" for a
    selection; both run the dlm.fill command."""
    kind = lsp.CodeActionKind.RefactorRewrite
    only = [str(getattr(k, "value", k)) for k in (params.context.only or ())] if params.context else []
    if only and not any(kind.value == k or kind.value.startswith(k + ".") for k in only):
        return []
    uri = params.text_document.uri
    doc = ls.docs.docs.get(uri)
    if doc is None:
        return []
    actions = []
    if holes_in(ls, doc):
        actions.append(lsp.CodeAction(title=FILL_HOLES_TITLE, kind=kind, command=lsp.Command(
            title=FILL_HOLES_TITLE, command=FILL_COMMAND, arguments=[{"textDocument": {"uri": uri}}])))
    r = params.range
    if (r.start.line, r.start.character) != (r.end.line, r.end.character):
        rng = {"start": {"line": r.start.line, "character": r.start.character},
               "end": {"line": r.end.line, "character": r.end.character}}
        actions.append(lsp.CodeAction(title=REGENERATE_TITLE, kind=kind, command=lsp.Command(
            title=REGENERATE_TITLE, command=FILL_COMMAND, arguments=[{"textDocument": {"uri": uri}, "range": rng}])))
    return actions
