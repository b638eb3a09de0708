"""dlm/status: what the server holds and does, and the worker's own status behind it.

It knows the server's state (documents, settings, policy) and the backend's `status()`; it changes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from ..worker.protocol import DlmError

if TYPE_CHECKING:
    from .server import DlmServer


def document_status(ls: "DlmServer", uri: str) -> dict[str, Any]:
    """What the server holds for one document: lets a client check that sync kept up."""
    doc = ls.docs.get(uri)
    digest = hashlib.sha256(doc.text.encode("utf-8", "surrogatepass")).hexdigest()
    return {"uri": uri, "version": doc.version, "language_id": doc.language_id, "chars": len(doc.text),
            "lines": doc.line_count, "sha256": digest}

async def status(ls: "DlmServer", wait: bool = False) -> dict[str, Any]:
    """Server, settings, latency, and the worker's own status; `wait` waits for a worker that
    is still loading its model instead of reporting it as not answering."""
    out: dict[str, Any] = {
        "server": {"pid": os.getpid(), "version": ls.version, "uptime_s": round(time.monotonic() - ls.started, 3),
                   "torch_loaded": "torch" in sys.modules, "documents": len(ls.docs),
                   "position_encoding": ls.position_encoding, "rss_bytes": _rss_bytes()},
        "settings": ls.settings.public(),
        "policy": ls.policy.status(),
        "latency_ms": ls.policy.latency.summary(),
        "last_request": ls.last_request,
        "model": None, "device": None, "worker_pid": None, "cache": None,
    }
    try:
        backend = await ls.get_backend()
        out["backend"] = backend.describe()
        w = await asyncio.wait_for(backend.status(), None if wait else 10.0)
        ls.learn_worker(w)
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
