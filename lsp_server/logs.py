"""The server's log: one line per event on stderr (and a file when asked), each with its request id.

It knows the logging module and pygls' loggers; nothing of LSP methods or models.
"""

from __future__ import annotations

import contextvars
import logging
import sys

from .config import Settings

# The LSP request a log line belongs to ("r12"; a speculation "r12>spec3"); "-" outside any.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# The JSON-RPC id of the request being handled, as the client sent it (int or str): dlm/refinement
# carries it, so a client can tell the steps of its current request from a late one's.
message_id: contextvars.ContextVar[int | str | None] = contextvars.ContextVar("message_id", default=None)


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


def set_level(level: str) -> None:
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
    set_level(settings.log_level)
