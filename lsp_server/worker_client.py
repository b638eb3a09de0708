"""The server's side of the worker: connect, spawn, reuse, restart, and the in-process variant.

Both backends implement `Backend`: typed messages of worker/protocol.py in and out.
`WorkerClient` speaks msgpack-RPC (worker/protocol.py) to the worker of one (model folder, device)
per user. The first client spawns it (`python -m dlm_ls.lsp_server.cli worker ...`, in its own
session so it outlives the editor), holding a lock file so two servers starting at once spawn
one worker; later clients connect to its socket. When the worker is gone (idle timeout,
crash, kill), the next call starts a new one, and an infill interrupted by the worker's death
is retried once on the new worker.

The `worker` setting may name another place (worker/protocol.py WorkerAddress): a Unix socket
path, a team worker at tcp:// or tls:// (docs/team.md), or a Ray Serve cluster at http(s)://,
which `ClusterClient` (cluster_client.py) serves. A team worker is never spawned: the
client connects, sends its `Hello` with the token from `tokenFile`, and after the worker restarts
connects again on the next call.

`InProcessBackend` offers the same calls with the worker's scheduler running on a thread of
this process (`--in-process`); only it imports torch.

This module knows nothing of LSP.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from ..worker import protocol, standby
from ..worker.protocol import (LIMITS, DlmError, Hello, InfillReply, InfillRequest, StepUpdate, WarmRequest,
                               WorkerAddress, alive, resolve_model_dir, settle)
from .config import Settings

log = logging.getLogger("dlm_ls.worker_client")

OnStep = Callable[[StepUpdate], None]
LOG_ROTATE_BYTES = 8 * 1024 * 1024
CONNECT_TIMEOUT_S = 10.0  # to reach a team worker, TLS handshake and hello included


class Backend(Protocol):
    """What the server asks of an engine, wherever it runs."""

    in_process: bool

    def describe(self) -> dict[str, Any]: ...

    async def infill(self, request: InfillRequest, on_step: OnStep | None = None) -> InfillReply: ...

    async def warm(self, request: WarmRequest) -> Any: ...

    async def status(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...



async def in_thread(fn: Callable, *args: Any) -> Any:
    """Run a blocking call on a daemon thread: unlike an executor's, nobody waits for it at exit
    (a server told to exit while a worker is still loading must exit now)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop may be closed by now
            loop.call_soon_threadsafe(settle, fut, result, error)

    threading.Thread(target=run, name=f"dlm-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await fut


class WorkerGone(DlmError):
    def __init__(self, message: str):
        super().__init__("worker_unavailable", message)


# --------------------------------------------------------------------------- one connection


class Connection:
    """One msgpack-RPC connection to a worker: requests out, responses and notifications in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.pending: dict[int, asyncio.Future] = {}
        self.listeners: dict[str, OnStep] = {}  # request id -> refinement callback
        self.ids = itertools.count(1)
        self.closed = False
        self.close_reason = "the worker closed the connection"
        self.reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def open(cls, path: Path) -> "Connection":
        reader, writer = await asyncio.open_unix_connection(str(path), limit=protocol.MAX_FRAME_BYTES)
        return cls(reader, writer)

    @classmethod
    async def open_remote(cls, address: WorkerAddress, token: str, tls: ssl.SSLContext | None) -> "Connection":
        """A connection to a team worker that has accepted our hello; `DlmError` saying why not."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                address.host, address.port, ssl=tls, limit=LIMITS.max_frame_bytes), CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as exc:  # ssl.SSLError is an OSError
            raise WorkerGone(f"cannot reach the worker at {address}: {exc or 'no answer'}") from None
        conn = cls(reader, writer)
        try:
            await asyncio.wait_for(conn.call("hello", Hello(token, client_name()).to_wire()), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            await conn.close()
            raise WorkerGone(f"the worker at {address} did not answer our hello") from None
        except DlmError as exc:
            await conn.close()
            if exc.code == "unauthorized":
                raise DlmError("unauthorized", f"the worker at {address} refused us: {exc.message} "
                                               "(check the tokenFile setting)") from None
            raise
        return conn

    async def call(self, method: str, params: Any, on_step: OnStep | None = None,
                   request_id: str | None = None) -> Any:
        if self.closed:
            raise WorkerGone(self.close_reason)
        msgid = next(self.ids)
        frame = protocol.encode(protocol.request(msgid, method, params))  # raises too_large before sending
        fut = asyncio.get_running_loop().create_future()
        self.pending[msgid] = fut
        if on_step is not None and request_id is not None:
            self.listeners[request_id] = on_step
        try:
            self.writer.write(frame)
            await self.writer.drain()
            return await fut
        except (ConnectionError, OSError) as exc:
            self._fail_all(f"lost the connection to the worker: {exc}")
            raise WorkerGone(self.close_reason) from None
        finally:
            self.pending.pop(msgid, None)
            if request_id is not None:
                self.listeners.pop(request_id, None)

    def call_soon(self, method: str, params: Any) -> None:
        """Fire a request whose answer nobody waits for (cancel); failures are only logged."""
        if self.closed:
            return
        task = asyncio.get_running_loop().create_task(self.call(method, params))
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or
                               log.debug("%s failed: %s", method, t.exception()))

    async def _read_loop(self) -> None:
        try:
            while True:
                body = await protocol.read_frame(self.reader)
                if body is None:
                    break
                msg = protocol.decode(body)
                if msg.kind == protocol.RESPONSE:
                    fut = self.pending.get(msg.msgid)
                    if fut is not None and not fut.done():
                        if msg.error is not None:
                            fut.set_exception(DlmError.from_dict(msg.error))
                        else:
                            fut.set_result(msg.result)
                elif msg.kind == protocol.NOTIFY:
                    self._notified(msg.method, msg.params)
        except (DlmError, ConnectionError, OSError) as exc:
            self.close_reason = f"connection to the worker broke: {exc}"
        finally:
            self._fail_all(self.close_reason)

    def _notified(self, method: str, params: Any) -> None:
        if method == "refinement" and isinstance(params, dict):
            listener = self.listeners.get(str(params.get("id")))
            if listener is not None:
                try:
                    listener(StepUpdate.from_wire(params))
                except Exception:  # a listener's bug must not kill the connection
                    log.exception("refinement listener failed")
        elif method == "error" and isinstance(params, dict):
            # The worker could not tie an error to a request (an unreadable frame): fail them all.
            err = DlmError.from_dict(params)
            for fut in list(self.pending.values()):
                if not fut.done():
                    fut.set_exception(err)

    def _fail_all(self, reason: str) -> None:
        self.closed = True
        self.close_reason = reason
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(WorkerGone(reason))
        self.pending.clear()
        with contextlib.suppress(Exception):
            self.writer.close()

    async def close(self) -> None:
        self._fail_all("closed by the client")
        self.reader_task.cancel()
        with contextlib.suppress(BaseException):
            await self.reader_task


# --------------------------------------------------------------------------- the worker daemon


def client_name() -> str:
    """Who we are, in the team worker's per-client counts."""
    return f"{os.environ.get('USER') or os.getuid()}@{socket.gethostname()} pid {os.getpid()}"


def _log_tail(path: Path, since: int, lines: int = 6) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(since)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    kept = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(kept[-lines:])


class WorkerClient:
    """Reach the worker for `settings.model` on `settings.device`, starting it when needed."""

    in_process = False

    def __init__(self, settings: Settings, python: str = sys.executable):
        self.settings = settings
        self.python = python
        self.address = WorkerAddress.parse(settings.worker)
        self.model_dir: Path | None = None  # a team worker's model is on its machine
        self.endpoint: protocol.Endpoint | None = None
        if not self.address.remote:
            self.model_dir = resolve_model_dir(settings.model)
            self.endpoint = (protocol.endpoint(self.model_dir, settings.device) if self.address.path is None
                             else _socket_endpoint(Path(self.address.path).expanduser()))
        self.conn: Connection | None = None
        self.spawned: list[subprocess.Popen] = []
        self.restarts = 0
        self._lock = asyncio.Lock()

    def describe(self) -> dict[str, Any]:
        if self.endpoint is None:
            return {"mode": "worker", "worker": str(self.address), "restarts": self.restarts}
        return {"mode": "worker", "worker": str(self.address), "socket": str(self.endpoint.socket),
                "log": str(self.endpoint.log_file), "restarts": self.restarts}

    async def connection(self) -> Connection:
        """The live connection, connecting (and spawning the worker) when there is none."""
        async with self._lock:
            self._reap()  # a killed worker's exit can land just after its socket closed: check every call
            if self.conn is not None and not self.conn.closed:
                return self.conn
            if self.conn is not None:
                self.restarts += 1
                log.warning("worker connection lost (%s); reconnecting", self.conn.close_reason)
            self.conn = await self._connect_or_spawn()
            return self.conn

    def _reap(self) -> None:
        """Collect the exit status of workers this server started that have ended (no zombies)."""
        if self.spawned:
            self.spawned = [proc for proc in self.spawned if proc.poll() is None]

    async def _connect_or_spawn(self) -> Connection:
        if self.address.remote:
            return await self._connect_remote()
        protocol.ensure_private_dir(self.endpoint.socket.parent)
        conn = await self._open_checked()
        if conn is not None:
            return conn
        await in_thread(self._spawn_locked)
        conn = await self._open_checked()
        if conn is None:
            raise WorkerGone(f"the worker started but does not answer on {self.endpoint.socket}")
        return conn

    async def _connect_remote(self) -> Connection:
        s = self.settings
        if not s.token_file:
            raise DlmError("config_error", f"the worker at {self.address} needs a token: set tokenFile "
                                           "(or --token-file) to a file of your own, mode 0600, holding it")
        token = protocol.read_token_file(s.token_file)
        tls = None
        if self.address.scheme == "tls":
            try:
                tls = ssl.create_default_context(cafile=s.tls_ca_file and os.path.expanduser(s.tls_ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise DlmError("config_error", f"cannot load the CA file {s.tls_ca_file}: {exc}") from None
        return await Connection.open_remote(self.address, token, tls)

    async def _open_checked(self) -> Connection | None:
        """A connection whose worker answered a ping; None when no live worker is there."""
        try:
            conn = await Connection.open(self.endpoint.socket)
        except OSError:
            return None
        try:
            await asyncio.wait_for(conn.call("ping", {}), 10.0)
            return conn
        except (DlmError, asyncio.TimeoutError):
            await conn.close()
            return None

    def _spawn_locked(self) -> None:
        """Start a worker unless another process did; blocks until its socket answers."""
        ep = self.endpoint
        fd = os.open(ep.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a second server starting now waits here, then finds the worker up
            # A killed worker's spare is taking over (worker/standby.py): wait for it, never start a second one.
            if alive(ep.socket) or standby.await_takeover(ep.socket, alive, self.settings.spawn_timeout_s):
                return
            self._spawn(ep)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _spawn(self, ep: protocol.Endpoint) -> None:
        s = self.settings
        if ep.log_file.exists() and ep.log_file.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(ep.log_file, ep.log_file.with_suffix(".log.1"))
        config = s.worker_config(model=str(self.model_dir), socket=str(ep.socket))
        cmd = [self.python, "-m", "dlm_ls.lsp_server.cli", "worker", *config.to_argv()]
        env = dict(os.environ)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        fd = os.open(ep.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        start = os.lseek(fd, 0, os.SEEK_END)
        log.info("starting a worker: %s (log: %s)", " ".join(cmd), ep.log_file)
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env=env,
                                    start_new_session=True, close_fds=True)
        finally:
            os.close(fd)
        self.spawned.append(proc)
        started = time.monotonic()
        deadline = started + s.spawn_timeout_s
        while time.monotonic() < deadline:
            if alive(ep.socket):
                log.info("worker pid %d is up after %.1f s", proc.pid, time.monotonic() - started)
                return
            if proc.poll() is not None:
                tail = _log_tail(ep.log_file, start)
                raise WorkerGone(f"the worker exited with status {proc.returncode} before it was ready"
                                 + (f":\n{tail}" if tail else f"; see {ep.log_file}"))
            time.sleep(0.05)
        proc.kill()
        raise WorkerGone(f"the worker was not ready after {s.spawn_timeout_s:.0f} s; see {ep.log_file}")

    # -- calls

    async def infill(self, request: InfillRequest, on_step: OnStep | None = None) -> InfillReply:
        """Run one completion; retried once on a new worker if the worker died under it."""
        for attempt in (1, 2):
            conn = await self.connection()
            try:
                return InfillReply.from_wire(await conn.call("infill", request.to_wire(), on_step, request.id))
            except WorkerGone as exc:
                if attempt == 2:
                    raise
                log.warning("the worker went away mid-request (%s); retrying on a new one", exc)
            except asyncio.CancelledError:
                conn.call_soon("cancel", {"id": request.id})  # stop it between two steps in the worker
                raise
        raise AssertionError("unreachable")

    async def call(self, method: str, params: Any = None) -> Any:
        conn = await self.connection()
        return await conn.call(method, params if params is not None else {})

    async def status(self) -> dict[str, Any]:
        return await self.call("status")

    async def warm(self, request: WarmRequest) -> Any:
        return await self.call("warm", request.to_wire())

    async def close(self) -> None:
        """Drop the connection; the worker stays for other servers until its idle timeout."""
        if self.conn is not None:
            await self.conn.close()
            self.conn = None
        self._reap()


def _socket_endpoint(sock: Path) -> protocol.Endpoint:
    """The files of a worker at a socket named by hand (as `dlm-ls worker --socket` names them)."""
    return protocol.Endpoint(sock.stem, sock, sock.with_suffix(".pid"), sock.with_suffix(".lock"),
                             sock.with_suffix(".log"))


# --------------------------------------------------------------------------- in-process engine


class InProcessBackend:
    """The worker's scheduler on a thread of this process: same calls, no socket, imports torch."""

    in_process = True

    def __init__(self, settings: Settings):
        from ..worker.scheduler import Scheduler  # torch arrives here, and only here

        self.settings = settings
        self.model_dir = resolve_model_dir(settings.model)
        self.scheduler = Scheduler(str(self.model_dir), device=settings.device, dtype=settings.dtype,
                                   max_jobs=settings.max_jobs, max_context_tokens=settings.max_context_tokens,
                                   captured_step=settings.captured_step, max_client_jobs=settings.max_jobs,
                                   threads=settings.worker_config().cpu_threads())
        self.scheduler.start()
        self.owner = object()  # the scheduler's "connection" for every request of this server

    def describe(self) -> dict[str, Any]:
        return {"mode": "in-process"}

    async def infill(self, request: InfillRequest, on_step: OnStep | None = None) -> InfillReply:
        async with contextlib.aclosing(self.scheduler.events(self.owner, request, steps=on_step is not None)) as events:
            async for event in events:  # leaving early (a cancelled request) cancels the job
                if isinstance(event, StepUpdate):
                    on_step(event)
                else:
                    return event
        raise AssertionError("the scheduler ended a request without an answer")

    async def call(self, method: str, params: Any = None) -> Any:
        return await self.scheduler.call(method, params or {})

    async def status(self) -> dict[str, Any]:
        return await self.call("status")

    async def warm(self, request: WarmRequest) -> Any:
        return await self.call("warm", request)

    async def close(self) -> None:
        await in_thread(self.scheduler.stop)
