"""The one place an error becomes an LSP error.

Every module below the handlers (documents, policy, worker client, config) raises `DlmError`
(defined with its symbolic codes in the wire protocol, worker/protocol.py, since the worker raises
the same errors) with a message meant for the user. `to_lsp` turns it into the JSON-RPC error that
pygls sends back. This module knows nothing of models or sockets.
"""

from __future__ import annotations

from ..worker.protocol import CODES, DlmError

# JSON-RPC / LSP error codes (LSP 3.17 "ErrorCodes" and "LSPErrorCodes").
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVER_NOT_INITIALIZED = -32002
REQUEST_FAILED = -32803  # a syntactically valid request the server could not carry out
SERVER_CANCELLED = -32802
CONTENT_MODIFIED = -32801
REQUEST_CANCELLED = -32800

# The LSP code each symbolic code (worker/protocol.py CODES) becomes.
LSP_CODES: dict[str, int] = {
    "invalid_params": INVALID_PARAMS,
    "invalid_position": INVALID_PARAMS,
    "unknown_document": INVALID_PARAMS,
    "infill_error": INVALID_PARAMS,  # the engine refused the input (too many holes, bad overrides, ...)
    "unknown_method": METHOD_NOT_FOUND,
    "cancelled": REQUEST_CANCELLED,
    "superseded": CONTENT_MODIFIED,
    "busy": REQUEST_FAILED,
    "too_large": REQUEST_FAILED,
    "worker_unavailable": REQUEST_FAILED,
    "worker_error": REQUEST_FAILED,
    "model_error": REQUEST_FAILED,
    "timeout": REQUEST_FAILED,
    "config_error": INVALID_PARAMS,
    "protocol_error": INTERNAL_ERROR,
    "unauthorized": REQUEST_FAILED,  # a team worker refused the token
    "internal": INTERNAL_ERROR,
}
assert set(LSP_CODES) == set(CODES), "every symbolic error code needs its LSP code"

__all__ = ["DlmError", "LSP_CODES", "to_lsp"]


def to_lsp(exc: BaseException):
    """Convert any exception raised by a handler into the JSON-RPC error pygls sends.

    The one place where our errors meet the protocol. Unknown exceptions become an internal
    error whose message names the exception, never a traceback.
    """
    from pygls.exceptions import JsonRpcException

    if isinstance(exc, JsonRpcException):
        return exc
    if isinstance(exc, DlmError):
        data = {"code": exc.code}
        if exc.data is not None:
            data["detail"] = exc.data
        return JsonRpcException(code=LSP_CODES[exc.code], message=exc.message, data=data)
    return JsonRpcException(code=INTERNAL_ERROR, message=f"internal error: {type(exc).__name__}: {exc}",
                            data={"code": "internal"})
