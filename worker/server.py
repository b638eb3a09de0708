"""The worker process: one resident model per (model folder, device) per user, shared by every editor.

`WorkerServer` is an asyncio msgpack-RPC server (worker/protocol.py) on a Unix socket in a 0700
directory, mode 0600, in front of one `Scheduler` (worker/scheduler.py). Methods: hello, infill,
cancel, warm, status, ping, shutdown. Bad frames, unknown methods and oversized payloads get error
replies; a client that disconnects has its requests cancelled; the process exits after
`--idle-timeout` seconds without a request. Its flags come from `WorkerConfig` (worker/config.py).

With `--listen HOST:PORT` it also serves a team on TCP (worker/team.py): each connection
authenticates before its first request reaches the scheduler, `shutdown` is refused there, and the
idle timeout does not apply (a team worker serves until it is stopped).

It turns wire maps into typed messages and back; it knows nothing of LSP or documents, and of the
model only through the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from . import protocol
from .config import WorkerConfig
from .protocol import METHODS, CancelRequest, DlmError, InfillRequest, StepUpdate, WarmRequest
from .scheduler import Done, Scheduler
from .team import Refused, TeamListener

log = logging.getLogger("dlm_ls.worker")


class ClientLink:
    """One connected client; replies are written from the event loop thread only."""

    def __init__(self, writer: asyncio.StreamWriter, peer: int, name: str = "", remote: bool = False):
        self.writer = writer
        self.peer = peer
        self.name = name or f"local {peer}"  # how the scheduler's per-client counts name it
        self.remote = remote  # a TCP connection (authenticated): no shutdown

    def send(self, message: list) -> None:
        if self.writer.is_closing():
            return
        try:
            frame = protocol.encode(message)
        except DlmError as exc:  # a result too large to send: say so instead
            if message[0] != protocol.RESPONSE:
                return
            frame = protocol.encode(protocol.response(message[1], exc.as_dict(), None))
        self.writer.write(frame)

    def report(self, exc: "protocol.ProtocolError | protocol.FrameTooLarge") -> None:
        """A frame we could not take: answer its request when we know its id, else say so in a notification."""
        log.warning("client %d: %s", self.peer, exc)
        if exc.msgid is not None:
            self.reply(exc.msgid, error=exc)
        else:
            self.send(protocol.notification("error", exc.as_dict()))

    def reply(self, msgid: int, result: Any = None, error: DlmError | None = None) -> None:
        self.send(protocol.response(msgid, error.as_dict() if error else None, result))


class WorkerServer:
    def __init__(self, scheduler: Scheduler, socket_path: Path, idle_timeout_s: float = WorkerConfig.idle_timeout_s,
                 max_frame_bytes: int = WorkerConfig.max_frame_bytes, pid_file: Path | None = None,
                 team: TeamListener | None = None, spare: Any = None):
        self.scheduler = scheduler
        self.team = team
        self.spare = spare  # standby.Standby: armed once the socket listens
        self.socket_path = socket_path
        self.pid_file = pid_file
        self.idle_timeout_s = idle_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.links: set[ClientLink] = set()
        self.peers = 0
        self.stopping: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def run(self) -> str:
        """Serve until shutdown, a signal or the idle timeout; returns why it stopped."""
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        reason = "shutdown requested"
        protocol.ensure_private_dir(self.socket_path.parent)
        if self.socket_path.exists():
            if protocol.probe(self.socket_path):
                raise DlmError("worker_unavailable", f"another worker already serves {self.socket_path}")
            self.socket_path.unlink()  # left by a worker that died
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others could connect
        try:
            server = await asyncio.start_unix_server(self._serve_link, path=str(self.socket_path),
                                                     limit=self.max_frame_bytes)
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o600)
        if self.pid_file is not None:
            self.pid_file.write_text(f"{os.getpid()}\n")
        if self.spare is not None:
            self.spare.serving()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self.loop.add_signal_handler(sig, self._signalled, sig)
        log.info("worker pid %d listening on %s (idle timeout %g s)", os.getpid(), self.socket_path,
                 self.idle_timeout_s)
        servers = [server]
        if self.team is not None:
            servers.append(await self.team.start(self._serve_remote, self.max_frame_bytes))
            log.info("serving a team on %s; every connection authenticates first; no idle timeout", self.team.url)
        self.scheduler.start()
        try:
            tick = max(0.05, min(1.0, self.idle_timeout_s / 4))
            while not self.stopping.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), tick)
                if self.stopping.is_set():
                    reason = getattr(self, "reason", reason)
                    break
                if self.team is None and self.scheduler.idle_for() >= self.idle_timeout_s:
                    reason = f"idle for {self.idle_timeout_s:g} s"
                    break
        finally:
            for srv in servers:
                srv.close()
            for link in list(self.links):
                link.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*(srv.wait_closed() for srv in servers)), 2.0)
            await self.loop.run_in_executor(None, self.scheduler.stop)
            self._remove_files()
        log.info("worker pid %d exiting: %s", os.getpid(), reason)
        return reason

    def _signalled(self, sig: int) -> None:
        self.reason = f"signal {signal.Signals(sig).name}"
        self.stopping.set()

    def _remove_files(self) -> None:
        # Only remove what is still ours: a newer worker may already have taken the name.
        with contextlib.suppress(OSError):
            if self.pid_file is not None and self.pid_file.read_text().strip() == str(os.getpid()):
                self.pid_file.unlink()
                self.socket_path.unlink()
            elif self.pid_file is None:
                self.socket_path.unlink()

    async def _serve_link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers += 1
        await self._serve(ClientLink(writer, self.peers), reader)

    async def _serve_remote(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A TCP connection: its hello first; one that fails gets one error and is closed."""
        self.peers += 1
        where = writer.get_extra_info("peername") or ("?", 0)
        address = f"{where[0]}:{where[1]}"
        try:
            msgid, hello = await self.team.authenticate(reader)
        except Refused as exc:
            log.warning("connection from %s refused: %s", address, exc)
            error = exc.as_dict()
            with contextlib.suppress(Exception):
                writer.write(protocol.encode(protocol.response(exc.msgid, error, None) if exc.msgid is not None
                                             else protocol.notification("error", error)))
                await asyncio.wait_for(writer.drain(), 2.0)
            writer.close()
            return
        link = ClientLink(writer, self.peers, f"{address} {hello.client}".strip(), remote=True)
        log.info("client %d authenticated: %s", link.peer, link.name)
        link.reply(msgid, {"pid": os.getpid(), "client": link.name})
        await self._serve(link, reader)

    async def _serve(self, link: ClientLink, reader: asyncio.StreamReader) -> None:
        writer = link.writer
        self.links.add(link)
        try:
            while True:
                try:
                    body = await protocol.read_frame(reader, self.max_frame_bytes)
                except protocol.FrameTooLarge as exc:
                    link.report(exc)
                    if exc.size > protocol.DISCARD_LIMIT:
                        break
                    continue
                except protocol.ProtocolError as exc:  # the stream ended mid-frame
                    log.info("client %d: %s", link.peer, exc)
                    break
                if body is None:
                    break
                try:
                    msg = protocol.decode(body)
                except protocol.ProtocolError as exc:
                    link.report(exc)
                    continue
                if msg.kind == protocol.REQUEST:
                    self._dispatch(link, msg)
                elif msg.kind == protocol.NOTIFY and msg.method == "cancel" and isinstance(msg.params, dict):
                    self.scheduler.cancel(link, str(msg.params.get("id")))
        except (ConnectionError, OSError) as exc:
            log.info("client %d went away: %s", link.peer, exc)
        finally:
            self.links.discard(link)
            self.scheduler.drop_owner(link)  # its requests stop between two steps
            writer.close()

    def _answer(self, link: ClientLink, msgid: int, extra: Callable[[Any], Any] | None = None) -> Done:
        """A `done` callback, safe to call from the scheduler thread."""
        def done(result: Any, error: DlmError | None) -> None:
            if extra is not None and error is None:
                result = extra(result)
            self.loop.call_soon_threadsafe(link.reply, msgid, result, error)
        return done

    def _dispatch(self, link: ClientLink, msg: protocol.Message) -> None:
        method, params, msgid = msg.method, msg.params, msg.msgid
        try:
            if method == "infill":
                request = InfillRequest.from_wire(params)
                request.id = request.id or f"{link.peer}.{msgid}"
                on_step = None
                if request.stream:
                    def on_step(update: StepUpdate) -> None:
                        self.loop.call_soon_threadsafe(link.send, protocol.notification("refinement", update.to_wire()))
                self.scheduler.submit(link, request, self._answer(link, msgid, to_wire), on_step)
            elif method == "cancel":
                self.scheduler.cancel(link, CancelRequest.from_wire(params).id, self._answer(link, msgid))
            elif method == "warm":
                self.scheduler.control("warm", WarmRequest.from_wire(params), self._answer(link, msgid))
            elif method == "status":
                def more(status: dict) -> dict:
                    return {**status, "socket": str(self.socket_path), "connections": len(self.links),
                            "idle_timeout_s": None if self.team else self.idle_timeout_s,
                            "listen": self.team.url if self.team else None,
                            "spare_pid": getattr(self.spare, "pid", None)}
                self.scheduler.control("status", {}, self._answer(link, msgid, more))
            elif method == "ping":
                link.reply(msgid, {"pid": os.getpid()})
            elif method == "hello":  # a TCP link said it first; on the Unix socket (0600) it proves nothing new
                link.reply(msgid, {"pid": os.getpid(), "client": link.name})
            elif method == "shutdown" and link.remote:
                raise DlmError("unauthorized", "shutdown is refused over TCP: stop a team worker on its machine")
            elif method == "shutdown":
                link.reply(msgid, {"stopping": True})
                self.reason = "shutdown requested by a client"
                self.stopping.set()
            else:
                raise DlmError("unknown_method", f"unknown method {method!r}; known: {', '.join(METHODS)}")
        except DlmError as exc:
            link.reply(msgid, error=exc)


# --------------------------------------------------------------------------- command line


def to_wire(reply: Any) -> Any:
    return reply.to_wire()


def main(argv: list[str] | None = None) -> int:
    cfg = WorkerConfig.from_argv(argv, description=(
        "Run the resident model worker. `dlm-ls serve` starts one when none is running for its "
        "model and device, and later servers share it; start it by hand only to watch its log, "
        "to keep a model loaded, or to serve a team with --listen (docs/team.md).")).checked()
    team = TeamListener.from_config(cfg)  # before loading anything: a bad token file is refused at once
    logging.basicConfig(level=logging.DEBUG if cfg.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s dlm-ls-worker[%(process)d] %(message)s")
    model_dir = protocol.resolve_model_dir(cfg.model)
    if cfg.socket:
        sock = Path(cfg.socket)
        pid_file = sock.with_suffix(".pid")
    else:
        ep = protocol.endpoint(model_dir, cfg.device)
        sock, pid_file = ep.socket, ep.pid_file
    protocol.ensure_private_dir(sock.parent)
    if protocol.probe(sock):  # before loading anything: a second worker on one socket is a mistake, say so fast
        raise DlmError("worker_unavailable", f"a worker already serves {sock}")
    spare = None
    if not cfg.no_spare:
        import torch  # before the fork, so the spare has it (most of a start); no op has run yet

        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            from ..model import infill  # noqa: F401 - a build without GPUs: no device to touch, the spare keeps it too

        from . import standby

        spare = standby.start(sock)  # returns in the spare too, once its worker was killed and it takes over
    try:
        scheduler = Scheduler(str(model_dir), device=cfg.device, dtype=cfg.dtype, max_jobs=cfg.max_jobs,
                              max_context_tokens=cfg.max_context_tokens, captured_step=cfg.captured_step,
                              max_client_jobs=cfg.max_client_jobs, max_client_slots=cfg.max_client_slots,
                              threads=cfg.cpu_threads())
        server = WorkerServer(scheduler, sock, cfg.idle_timeout_s, cfg.max_frame_bytes, pid_file, team, spare)
        asyncio.run(server.run())
    finally:
        if spare is not None:
            spare.dismiss()
    return 0
