"""Framing and the one answer: every request that reaches the server gets exactly one response, decided here.

`read_messages` is the stdio loop (in place of pygls' `run_async`): header names are matched
case-insensitively (JSON-RPC's base protocol borrows HTTP's headers), a header block without a
usable Content-Length is dropped whole at its blank line (the next message is read as usual, so a
bad frame never leaves the server deaf), and a Content-Length above the limit ends the stream with
one clear log line and a non-zero exit, since the bytes after it cannot be framed.

`AnsweringProtocol` decides, before any handler runs, what a request that cannot be handled gets:
  unreadable JSON                 -32700 ParseError, "id": null (the id is unknown)
  nested deeper than the parser   -32600 InvalidRequest, "id": null
  params that do not fit the type -32602 InvalidParams, naming the first bad field
  a request before `initialize`   -32002 ServerNotInitialized
  a request after `shutdown`      -32600 InvalidRequest
  a notification sent with an id  -32600 InvalidRequest (not carried out: JSON-RPC would owe it no answer)
  an unknown method               -32601 (pygls)
Notifications that fail the same checks are logged once per method and dropped, as JSON-RPC
requires (a notification is never answered). An error reply to `"id": null` carries the member.
A -32603 InternalError goes out as one line: its traceback goes to the log, and to the client only
under `--debug` (`expose_tracebacks`).

Knows JSON-RPC and pygls' protocol class; knows nothing of completions, documents or models.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from lsprotocol import types as lsp
from lsprotocol.types import ResponseError, ResponseErrorMessage
from pygls.exceptions import JsonRpcException
from pygls.protocol import LanguageServerProtocol, lsp_method

from .early import CONTENT_LENGTH
from .errors import INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, SERVER_NOT_INITIALIZED

log = logging.getLogger("dlm_ls.protocol")

PARSE_ERROR = -32700


class StreamError(Exception):
    """The input can no longer be framed (a Content-Length over the limit): the server must exit."""


def first_problem(exc: BaseException) -> str:
    """One line naming the first field of the params that did not fit their type."""
    try:
        import cattrs

        messages = [m.replace("@ .", "@ ") for m in cattrs.transform_error(exc, path="")]
        if messages:
            return messages[0]
    except Exception:  # noqa: BLE001 - a message of our own is better than none
        pass
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'params do not fit the method'}"


class AnsweringProtocol:
    """A mixin before pygls' LanguageServerProtocol: see the module docstring for the table."""

    _answering_initialized = False  # an `initialize` request has been taken
    expose_tracebacks = False  # the server sets it under --debug
    _answering_warned: set[str]

    def _warn_once(self, method: str, why: str) -> None:
        seen = self.__dict__.setdefault("_answering_warned", set())
        if method not in seen:
            seen.add(method)
            log.warning("dropped a %s notification: %s (logged once per method)", method or "nameless", why)

    def _answer_error(self, msg_id: Any, code: int, message: str) -> None:
        self._send_data(ResponseErrorMessage(id=msg_id, error=ResponseError(code=code, message=message)))

    def _send_response(self, msg_id: Any, result: Any = None, error: ResponseError | None = None) -> None:
        if error is not None and error.code == INTERNAL_ERROR:
            trace = error.data.get("traceback") if isinstance(error.data, dict) else None
            if trace:
                log.error("internal error answering %s: %s\n%s", msg_id, error.message, "".join(trace))
            first = (error.message or "internal error").strip().splitlines()[0][:300]
            error = ResponseError(code=error.code, message=first, data=error.data if self.expose_tracebacks else None)
        super()._send_response(msg_id, result, error)

    def _serialize_message(self, data: Any) -> Any:
        if isinstance(data, ResponseErrorMessage) and data.id is None:  # cattrs would drop a None id
            return {"jsonrpc": "2.0", "id": None, "error": self._converter.unstructure(data.error)}
        return super()._serialize_message(data)

    def receive(self, body: bytes) -> None:
        """One framed message body: parse, check, then pygls' own dispatch."""
        try:
            data = json.loads(body)
        except RecursionError:
            return self._answer_error(None, INVALID_REQUEST, "message nested deeper than the JSON parser allows")
        except ValueError as exc:
            return self._answer_error(None, PARSE_ERROR, f"not JSON: {exc}")
        if not isinstance(data, dict) or data.get("jsonrpc") != "2.0":
            return self._answer_error(data.get("id") if isinstance(data, dict) else None, INVALID_REQUEST,
                                      'not a JSON-RPC 2.0 message (an object with "jsonrpc": "2.0")')
        method, is_request = data.get("method"), "id" in data and "method" in data
        if "method" in data and not isinstance(method, str):
            return self._answer_error(data.get("id"), INVALID_REQUEST, '"method" must be a string') if "id" in data \
                else self._warn_once("", '"method" must be a string')
        if is_request and not isinstance(data["id"], (int, str)) and data["id"] is not None:
            return self._answer_error(None, INVALID_REQUEST, '"id" must be a number or a string')
        if "method" in data and not self._lifecycle_allows(data, is_request):
            return
        if is_request and _is_notification_method(self.get_message_type(method)):
            return self._answer_error(data["id"], INVALID_REQUEST, f"{method} is a notification: send it without an id")
        try:
            message = self.structure_message(data)
        except RecursionError:
            return self._answer(data, is_request, INVALID_REQUEST, "params nested too deeply")
        except JsonRpcException as exc:
            return self._answer(data, is_request, INVALID_PARAMS, f"invalid params for {method}: "
                                + first_problem(exc.__cause__ or exc))
        if is_request and method == "initialize":
            self._answering_initialized = True
        self.handle_message(message)

    def _answer(self, data: dict, is_request: bool, code: int, message: str) -> None:
        if is_request:
            self._answer_error(data["id"], code, message)
        else:
            self._warn_once(data.get("method", ""), message)

    def _lifecycle_allows(self, data: dict, is_request: bool) -> bool:
        method = data["method"]
        if getattr(self, "_shutdown", False) and method != "exit":
            if is_request:
                self._answer_error(data["id"], INVALID_REQUEST, f"{method}: the server is shutting down")
            return False
        if not self._answering_initialized and method not in ("initialize", "exit"):
            if is_request:
                self._answer_error(data["id"], SERVER_NOT_INITIALIZED, f"{method}: send initialize first")
            else:
                self._warn_once(method, "the server is not initialized yet")
            return False
        return True


def _is_notification_method(message_type) -> bool:
    """lsprotocol's message class for a notification method has no id field (a request's has)."""
    fields = getattr(message_type, "__attrs_attrs__", None)
    return fields is not None and not any(f.name == "id" for f in fields)




async def read_messages(reader, protocol: AnsweringProtocol, stop_event, max_bytes: int) -> None:
    """Frame messages from `reader` (readline / readexactly coroutines) and hand each body to the protocol.

    Raises StreamError for a Content-Length over `max_bytes`; returns at the end of the input. A
    Content-Length is taken wherever it stands on a header line, so after a frame whose length was
    unusable (its body is then read as header lines) the next message's header still resynchronises.
    """
    length: int | None = None
    while not stop_event.is_set():
        line = await reader.readline()
        if not line:
            return
        if line.strip():  # a header line; only Content-Length matters (Content-Type is utf-8 or absent)
            match = CONTENT_LENGTH.search(line)
            if match:
                length = int(match.group(1))
                if length > max_bytes:
                    raise StreamError(f"Content-Length {length} is over the limit of {max_bytes} bytes "
                                      "(maxMessageBytes); the stream cannot be framed past it")
            continue
        if length is None or length < 0:  # the blank line ends a header block without a usable length
            if length is not None:
                log.warning("dropped a message with Content-Length %d", length)
            length = None
            continue
        want, length = length, None
        body = await reader.readexactly(want) if want else b""
        if len(body) < want:
            return  # the input ended inside a body
        try:
            protocol.receive(body)
        except Exception:  # noqa: BLE001 - one message must never end the loop
            log.exception("could not handle a message")


class DlmProtocol(AnsweringProtocol, LanguageServerProtocol):
    """pygls' protocol, with documents kept only in our store (server.py), and every
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
