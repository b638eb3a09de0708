"""The server's side of a Ray Serve cluster (worker/serve_replica.py): the `Backend` over HTTP.

Each call is one POST of one msgpack-RPC request frame to the cluster's URL; the answer is a
stream of frames (`refinement` notifications, then the response), read as it arrives. The
messages are worker/protocol.py's typed ones, as on the socket: one client, two transports.

- Routing: the request's document key goes in the routing header, so a document's keystrokes
  reach its home replica, which holds its context cache.
- Cancelling: the connection is closed; the replica sees its stream closed and stops the job.
- A replica that dies under a request (the connection breaks, or the proxy answers 5xx) costs
  one retry, which Serve routes to a live replica.

Plain HTTP/1.1 on asyncio streams (the standard library has no async client); TLS with the
system's CAs or `tlsCaFile`. It knows nothing of LSP, and needs no Ray on the editor's machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import ssl
from typing import Any, AsyncIterator

from ..worker import protocol
from ..worker.protocol import (CLIENT_HEADER, DOCUMENT_HEADER, FRAMES_MEDIA_TYPE, DlmError, InfillReply,
                               InfillRequest, StepUpdate, WarmRequest, WorkerAddress, document_route)
from .config import Settings
from .worker_client import CONNECT_TIMEOUT_S, OnStep, WorkerGone, client_name

log = logging.getLogger("dlm_ls.cluster_client")

HEADER_LIMIT = 64 * 1024  # status line and headers


class HttpReply:
    """One HTTP response: its status and headers, and its body as it arrives."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int,
                 headers: dict[str, str]):
        self.reader, self.writer, self.status, self.headers = reader, writer, status, headers

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, de-chunked (chunked transfer, a content length, or until the connection closes)."""
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                line = await self.reader.readline()
                if not line.endswith(b"\n"):
                    raise ConnectionError("the stream ended inside a chunk header")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    return
                data = await self.reader.readexactly(size)
                await self.reader.readexactly(2)  # CRLF
                yield data
        elif "content-length" in self.headers:
            left = int(self.headers["content-length"])
            while left > 0:
                data = await self.reader.read(min(left, 1 << 16))
                if not data:
                    raise ConnectionError("the connection closed inside the body")
                left -= len(data)
                yield data
        else:
            while data := await self.reader.read(1 << 16):
                yield data

    async def frames(self) -> AsyncIterator[protocol.Message]:
        """The body's msgpack-RPC frames, each as soon as it is whole."""
        buf = bytearray()
        head = protocol.HEADER.size
        async for data in self.chunks():
            buf += data
            while len(buf) >= head:
                (size,) = protocol.HEADER.unpack(buf[:head])
                if size > protocol.MAX_FRAME_BYTES:
                    raise protocol.FrameTooLarge(size, protocol.MAX_FRAME_BYTES)
                if len(buf) < head + size:
                    break
                body = bytes(buf[head:head + size])
                del buf[:head + size]
                yield protocol.decode(body)
        if buf:
            raise protocol.ProtocolError("the stream ended inside a frame")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class ClusterClient:
    """`Backend` for a worker URL of http:// or https:// (a Ray Serve cluster)."""

    in_process = False

    def __init__(self, settings: Settings):
        self.settings = settings
        self.address = WorkerAddress.parse(settings.worker)
        if not self.address.cluster:
            raise DlmError("config_error", f"{self.address} is not a cluster URL (http:// or https://)")
        self.token = protocol.read_token_file(settings.token_file) if settings.token_file else None
        self.tls: ssl.SSLContext | None = None
        if self.address.scheme == "https":
            try:
                self.tls = ssl.create_default_context(
                    cafile=settings.tls_ca_file and os.path.expanduser(settings.tls_ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise DlmError("config_error", f"cannot load the CA file {settings.tls_ca_file}: {exc}") from None
        self.ids = itertools.count(1)
        self.name = client_name()
        self.retries = 0  # requests sent again because a replica died under them
        self.open_replies: set[HttpReply] = set()

    def describe(self) -> dict[str, Any]:
        return {"mode": "cluster", "worker": str(self.address), "retries": self.retries}

    async def _post(self, method: str, params: Any, route: str | None) -> tuple[int, HttpReply]:
        msgid = next(self.ids)
        body = protocol.encode(protocol.request(msgid, method, params))  # raises too_large before sending
        a = self.address
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                a.host, a.port, ssl=self.tls, limit=HEADER_LIMIT), CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as exc:
            raise WorkerGone(f"cannot reach the cluster at {a}: {exc or 'no answer'}") from None
        host = f"[{a.host}]" if ":" in a.host else a.host
        lines = [f"POST {a.path or '/'} HTTP/1.1", f"Host: {host}:{a.port}", f"Content-Type: {FRAMES_MEDIA_TYPE}",
                 f"Content-Length: {len(body)}", "Connection: close", f"{CLIENT_HEADER}: {self.name}"]
        if route:
            lines.append(f"{DOCUMENT_HEADER}: {route}")
        if self.token:
            lines.append(f"Authorization: Bearer {self.token}")
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), self.settings.request_timeout_s)
            parts = status_line.decode("latin-1").split(None, 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
                raise ConnectionError(f"not an HTTP answer: {status_line[:80]!r}")
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
        except (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            writer.close()
            raise WorkerGone(f"the cluster at {a} broke off: {exc or 'connection closed'}") from None
        except BaseException:
            writer.close()
            raise
        return msgid, HttpReply(reader, writer, int(parts[1]), headers)

    async def _call(self, method: str, params: Any, route: str | None = None,
                    on_step: OnStep | None = None) -> Any:
        """One request, its frames read to the response; a `WorkerGone` when the stream broke."""
        msgid, reply = await self._post(method, params, route)
        self.open_replies.add(reply)
        try:
            if reply.status >= 500:
                raise WorkerGone(f"the cluster at {self.address} answered HTTP {reply.status} (a replica died?)")
            if reply.headers.get("content-type", "").split(";")[0] != FRAMES_MEDIA_TYPE:
                raise DlmError("worker_error", f"{self.address} is not a dlm-ls cluster (HTTP {reply.status}, "
                                               f"{reply.headers.get('content-type') or 'no content type'})")
            try:
                async for msg in reply.frames():
                    if msg.kind == protocol.NOTIFY and msg.method == "refinement" and on_step is not None:
                        try:
                            on_step(StepUpdate.from_wire(msg.params))
                        except Exception:  # noqa: BLE001 - a listener's bug must not end the request
                            log.exception("refinement listener failed")
                    elif msg.kind == protocol.RESPONSE and msg.msgid in (msgid, 0):
                        if msg.error is not None:
                            raise DlmError.from_dict(msg.error)
                        return msg.result
            except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
                raise WorkerGone(f"the cluster's stream broke: {exc or 'connection closed'}") from None
            raise WorkerGone(f"the cluster at {self.address} closed the stream without an answer")
        finally:
            self.open_replies.discard(reply)
            reply.close()  # before the response, this is the cancel: the replica stops the job

    async def _with_retry(self, method: str, params: Any, route: str | None, on_step: OnStep | None = None) -> Any:
        for attempt in (1, 2):
            try:
                return await self._call(method, params, route, on_step)
            except WorkerGone as exc:
                if attempt == 2:
                    raise
                self.retries += 1
                log.warning("%s; sending the request again", exc)
        raise AssertionError("unreachable")

    async def infill(self, request: InfillRequest, on_step: OnStep | None = None) -> InfillReply:
        return InfillReply.from_wire(await self._with_retry("infill", request.to_wire(),
                                                            document_route(request.cache_key), on_step))

    async def warm(self, request: WarmRequest) -> Any:
        return await self._with_retry("warm", request.to_wire(), document_route(request.cache_key))

    async def call(self, method: str, params: Any = None) -> Any:
        """Any method a replica serves (ping, status), on whichever replica Serve picks."""
        return await self._with_retry(method, params if params is not None else {}, None)

    async def status(self) -> dict[str, Any]:
        """One replica's status (any one), with the cluster's URL."""
        return {**await self.call("status"), "cluster": str(self.address)}

    async def close(self) -> None:
        for reply in list(self.open_replies):
            reply.close()
        self.open_replies.clear()
