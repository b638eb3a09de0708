"""The one error type of the language server, and the one place it becomes an LSP error.

Every module below the handlers (documents, policy, worker client, config) raises `DlmError`
with a short symbolic code and a message meant for the user. `to_lsp` turns it into the
JSON-RPC error that pygls sends back. This module knows nothing of models or sockets.
"""

from __future__ import annotations

from typing import Any

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

# Symbolic codes, shared with the worker's msgpack-RPC errors, and the LSP code each becomes.
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
    "internal": INTERNAL_ERROR,
}


class DlmError(Exception):
    """A failure with a message a user can act on. `code` is one of LSP_CODES."""

    def __init__(self, code: str, message: str, data: Any = None):
        super().__init__(message)
        self.code = code if code in LSP_CODES else "internal"
        self.message = message
        self.data = data

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"DlmError({self.code!r}, {self.message!r})"

    def as_dict(self) -> dict[str, Any]:
        """The msgpack-RPC error form: {"code": ..., "message": ...}."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            out["data"] = self.data
        return out

    @classmethod
    def from_dict(cls, err: Any) -> "DlmError":
        if isinstance(err, dict):
            return cls(str(err.get("code", "worker_error")), str(err.get("message", err)), err.get("data"))
        return cls("worker_error", str(err))


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
