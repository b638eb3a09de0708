"""The worker: one resident model per (model folder, device) per user, shared by every editor.

Two parts:

- `Scheduler`, one thread that owns the `Infiller` (tokenizer + model + context caches). Requests
  from any thread queue up; each loop turn starts the new ones, runs ONE batched refinement step
  over every live request (`Infiller.step`), then answers the finished ones and streams the others'
  snapshots. Cancellation takes effect between two steps. A request with priority "low" (the
  server's speculative suggestions) is stepped only in turns with no normal request, so it never
  slows one down. All holes of a request are one job, refined together. The language server's
  `--in-process` mode uses this class directly.
- `WorkerServer`, an asyncio msgpack-RPC server (see lsp_server/rpc.py) on a Unix socket in a
  0700 directory, mode 0600. Methods: infill, cancel, warm, status, ping, shutdown. Bad frames,
  unknown methods and oversized payloads get error replies; a client that disconnects has its
  requests cancelled; the process exits after `--idle-timeout` seconds without a request.

It knows nothing of LSP or documents: segments of text in, middles out.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import inspect
import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..lsp_server import rpc
from ..lsp_server.errors import DlmError

log = logging.getLogger("dlm_ls.worker")

Done = Callable[[Any, "DlmError | None"], None]
MODES = ("line", "block", "auto")
PRIORITIES = ("normal", "low")
METHODS = ("infill", "cancel", "warm", "status", "ping", "shutdown")


@dataclass
class Request:
    owner: Any  # the connection that asked: its requests are cancelled when it goes away
    id: str
    params: dict[str, Any]
    done: Done
    on_step: Callable[[dict[str, Any]], None] | None
    submitted: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    job: Any = None
    step: int = 0

    @property
    def low(self) -> bool:
        return self.params.get("priority") == "low"


def check_infill_params(params: Any) -> dict[str, Any]:
    """Shape checks the engine does not do (it checks meaning: lengths, holes, overrides)."""
    if not isinstance(params, dict):
        raise DlmError("invalid_params", "infill params must be a map")
    segs = params.get("segments")
    if not isinstance(segs, list) or len(segs) < 2 or not all(isinstance(s, str) for s in segs):
        raise DlmError("invalid_params", "segments must be a list of at least two strings (text around the holes)")
    if params.get("mode", "auto") not in MODES:
        raise DlmError("invalid_params", f"mode must be one of {', '.join(MODES)}, not {params.get('mode')!r}")
    if not isinstance(params.get("overrides") or {}, dict):
        raise DlmError("invalid_params", "overrides must be a map of sampler settings")
    if params.get("priority", "normal") not in PRIORITIES:
        raise DlmError("invalid_params", f"priority must be one of {', '.join(PRIORITIES)}")
    key = params.get("cache_key")
    if key is not None and not isinstance(key, str):
        raise DlmError("invalid_params", "cache_key must be a string")
    return params


class Scheduler:
    """The Infiller on one thread, stepping every live request in one batch per step."""

    def __init__(self, model_dir: str | None, device: str = "auto", dtype: str | None = None,
                 max_jobs: int = 32, max_context_tokens: int | None = None, infiller: Any = None,
                 captured_step: bool = False):
        self.max_jobs = max_jobs
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.live: list[Request] = []
        self.counters: collections.Counter[str] = collections.Counter()
        self.max_batch = 0
        self.started_at = time.monotonic()
        self.last_activity = time.monotonic()
        self.thread: threading.Thread | None = None
        self.loads = 0
        t0 = time.perf_counter()
        self.inf = infiller if infiller is not None else self._load(model_dir, device, dtype, max_context_tokens,
                                                                    captured_step)
        self.load_s = time.perf_counter() - t0
        self.info = dict(self.inf.info())
        log.info("model %s on %s (%s, %s parameters) loaded in %.1f s", self.info.get("model"),
                 self.info.get("device"), self.info.get("dtype"), self.info.get("parameters"), self.load_s)

    def _load(self, model_dir, device, dtype, max_context_tokens, captured_step=False):
        from .infill import Infiller

        kwargs: dict[str, Any] = {"model_dir": model_dir, "device": device, "dtype": dtype}
        if captured_step:
            kwargs["captured_step"] = True
        if max_context_tokens and "max_context_tokens" in inspect.signature(Infiller).parameters:
            kwargs["max_context_tokens"] = max_context_tokens
        try:
            inf = Infiller(**kwargs)
        except DlmError:
            raise
        except Exception as exc:
            raise DlmError("model_error", f"could not load the model from {model_dir or 'the default folder'}: "
                                          f"{exc}") from exc
        self.loads += 1
        return inf

    # -- called from any thread

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="dlm-scheduler", daemon=True)
        self.thread.start()

    def submit(self, owner: Any, params: dict[str, Any], done: Done,
               on_step: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.inbox.put(("submit", Request(owner, str(params.get("id")), params, done, on_step)))

    def cancel(self, owner: Any, request_id: str, done: Done | None = None) -> None:
        self.inbox.put(("cancel", owner, str(request_id), done))

    def drop_owner(self, owner: Any) -> None:
        self.inbox.put(("drop", owner))

    def control(self, method: str, params: dict[str, Any], done: Done) -> None:
        self.inbox.put(("control", method, params, done))

    def stop(self, timeout: float = 10.0) -> None:
        self.inbox.put(("stop",))
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def idle_for(self) -> float:
        if self.live or not self.inbox.empty():
            return 0.0
        return time.monotonic() - self.last_activity

    # -- the scheduler thread

    def _run(self) -> None:
        while True:
            commands = [] if self.live else [self.inbox.get()]  # with nothing to step, sleep until work comes
            while True:
                try:
                    commands.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            if commands:
                self.last_activity = time.monotonic()
            for cmd in commands:
                if cmd[0] == "stop":
                    for req in self.live:
                        self._finish(req, error=DlmError("worker_unavailable", "the worker is shutting down"))
                    self.live.clear()
                    return
                self._handle(cmd)
            if self.live:
                self._step()

    def _handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "submit":
            self._start(cmd[1])
        elif kind == "cancel":
            _, owner, rid, done = cmd
            hit = [r for r in self.live if r.owner is owner and r.id == rid]
            for req in hit:
                self._cancel(req, "cancelled by the client")
            if done is not None:
                done({"cancelled": bool(hit)}, None)
        elif kind == "drop":
            for req in [r for r in self.live if r.owner is cmd[1]]:
                self._cancel(req, "the client disconnected")
        elif kind == "control":
            _, method, params, done = cmd
            try:
                done(self._control(method, params), None)
            except DlmError as exc:
                done(None, exc)
            except Exception as exc:  # noqa: BLE001 - reported to the caller, the worker goes on
                log.exception("%s failed", method)
                done(None, DlmError("internal", f"{method} failed: {type(exc).__name__}: {exc}"))

    def _start(self, req: Request) -> None:
        from .infill import InfillError

        self.counters["requests"] += 1
        if len(self.live) >= self.max_jobs:
            self.counters["busy"] += 1
            req.done(None, DlmError("busy", f"the worker is serving {self.max_jobs} requests already; try again"))
            return
        p = req.params
        req.started = time.perf_counter()
        try:
            req.job = self.inf.start(p["segments"], mode=p.get("mode", "auto"), cache_key=p.get("cache_key"),
                                     **(p.get("overrides") or {}))
        except InfillError as exc:
            self.counters["errors"] += 1
            req.done(None, DlmError("infill_error", str(exc)))
            return
        except TypeError as exc:  # an override the engine does not know
            self.counters["errors"] += 1
            req.done(None, DlmError("invalid_params", f"bad infill options: {exc}"))
            return
        except Exception as exc:  # noqa: BLE001 - one bad request must not take the worker down
            self.counters["errors"] += 1
            log.exception("[%s] start failed", req.id)
            req.done(None, DlmError("internal", f"infill failed: {type(exc).__name__}: {exc}"))
            return
        self.counters["jobs"] += 1  # one engine job per request, however many holes it has
        self.counters["holes"] += len(p["segments"]) - 1
        log.debug("[%s] started: %d segments, %d chars, mode %s", req.id, len(p["segments"]),
                  sum(len(s) for s in p["segments"]), p.get("mode", "auto"))
        self.live.append(req)

    def _step(self) -> None:
        batch = [r for r in self.live if not r.low] or list(self.live)  # low priority: only in idle turns
        stepped = set(map(id, batch))
        jobs = [r.job for r in batch]
        self.max_batch = max(self.max_batch, len(jobs))
        try:
            self.inf.step(jobs)  # ONE forward pass for every request of the batch
        except Exception as exc:  # noqa: BLE001
            log.exception("refinement step failed; failing %d requests", len(jobs))
            for req in batch:
                self._finish(req, error=DlmError("internal", f"refinement step failed: {type(exc).__name__}: {exc}"))
            self.live = [r for r in self.live if id(r) not in stepped]
            return
        self.counters["steps"] += 1
        self.last_activity = time.monotonic()
        still = []
        for req in self.live:
            if id(req) not in stepped:
                still.append(req)
                continue
            req.step += 1
            if req.on_step is not None:
                try:
                    req.on_step({"id": req.id, "step": req.step, "text": req.job.snapshot(),
                                 "ms": round((time.perf_counter() - req.started) * 1000, 2)})
                except Exception:  # noqa: BLE001 - a listener's failure is not the request's
                    log.exception("[%s] streaming a step failed", req.id)
            if req.job.done:
                self._finish(req)
            else:
                still.append(req)
        self.live = still

    def _finish(self, req: Request, error: DlmError | None = None) -> None:
        if error is not None:
            req.done(None, error)
            return
        try:
            res = req.job.result()
        except Exception as exc:  # noqa: BLE001
            log.exception("[%s] reading the result failed", req.id)
            req.done(None, DlmError("internal", f"infill failed: {type(exc).__name__}: {exc}"))
            return
        self.counters["completed"] += 1
        queue_ms = (req.started - req.submitted) * 1000
        # Every candidate length's middles, best first: the server re-ranks them by how they parse.
        candidates = [list(c) for c in getattr(res, "candidates", None) or [res.middles]]
        result = {"middles": list(res.middles), "candidates": candidates, "nfe": int(res.nfe), "steps": int(res.steps), "ms": float(res.ms),
                  "canvas_length": int(res.canvas_length), "score": float(res.score),
                  "queue_ms": round(queue_ms, 2), "total_ms": round((time.perf_counter() - req.submitted) * 1000, 2)}
        log.info("[%s] done: nfe %d, steps %d, %.0f ms (queue %.0f ms)", req.id, res.nfe, res.steps,
                 result["total_ms"], queue_ms)
        req.done(result, None)

    def _cancel(self, req: Request, why: str) -> None:
        with contextlib.suppress(Exception):
            req.job.cancel()
        self.live.remove(req)
        self.counters["cancelled"] += 1
        log.info("[%s] %s after %d steps", req.id, why, req.step)
        req.done(None, DlmError("cancelled", why))

    def _control(self, method: str, params: dict[str, Any]) -> Any:
        if method == "status":
            return self.status()
        if method == "warm":
            from .infill import InfillError

            segs = params.get("segments")
            if not isinstance(segs, list) or not all(isinstance(s, str) for s in segs):
                raise DlmError("invalid_params", "warm needs segments: a list of strings")
            if not isinstance(params.get("cache_key"), str):
                raise DlmError("invalid_params", "warm needs a cache_key: the entry a later request will reuse")
            try:
                self.inf.warm(params["cache_key"], segs)
            except InfillError as exc:
                raise DlmError("infill_error", str(exc)) from None
            self.counters["warms"] += 1
            return {"warmed": True}
        raise DlmError("unknown_method", f"unknown control method {method!r}")

    def status(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "info": self.info, "cache": dict(self.inf.cache_stats()), "loads": self.loads,
                "load_s": round(self.load_s, 3), "uptime_s": round(time.monotonic() - self.started_at, 3),
                "live": len(self.live), "max_jobs": self.max_jobs, "max_batch": self.max_batch,
                "counters": dict(self.counters)}


# --------------------------------------------------------------------------- the socket server


class ClientLink:
    """One connected client; replies are written from the event loop thread only."""

    def __init__(self, writer: asyncio.StreamWriter, peer: int):
        self.writer = writer
        self.peer = peer

    def send(self, message: list) -> None:
        if self.writer.is_closing():
            return
        try:
            frame = rpc.encode(message)
        except DlmError as exc:  # a result too large to send: say so instead
            if message[0] != rpc.RESPONSE:
                return
            frame = rpc.encode(rpc.response(message[1], exc.as_dict(), None))
        self.writer.write(frame)

    def report(self, exc: "rpc.ProtocolError | rpc.FrameTooLarge") -> None:
        """A frame we could not take: answer its request when we know its id, else say so in a notification."""
        log.warning("client %d: %s", self.peer, exc)
        if exc.msgid is not None:
            self.reply(exc.msgid, error=exc)
        else:
            self.send(rpc.notification("error", exc.as_dict()))

    def reply(self, msgid: int, result: Any = None, error: DlmError | None = None) -> None:
        self.send(rpc.response(msgid, error.as_dict() if error else None, result))


class WorkerServer:
    def __init__(self, scheduler: Scheduler, socket_path: Path, idle_timeout_s: float = 600.0,
                 max_frame_bytes: int = rpc.MAX_FRAME_BYTES, pid_file: Path | None = None, spare: Any = None):
        self.scheduler = scheduler
        self.spare = spare  # worker/standby.py's Standby: armed once the socket listens
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
        rpc.ensure_private_dir(self.socket_path.parent)
        if self.socket_path.exists():
            from ..lsp_server.worker_client import _probe

            if _probe(self.socket_path):
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
        self.scheduler.start()
        try:
            tick = max(0.05, min(1.0, self.idle_timeout_s / 4))
            while not self.stopping.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), tick)
                if self.stopping.is_set():
                    reason = getattr(self, "reason", reason)
                    break
                if self.scheduler.idle_for() >= self.idle_timeout_s:
                    reason = f"idle for {self.idle_timeout_s:g} s"
                    break
        finally:
            server.close()
            for link in list(self.links):
                link.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
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
        link = ClientLink(writer, self.peers)
        self.links.add(link)
        try:
            while True:
                try:
                    body = await rpc.read_frame(reader, self.max_frame_bytes)
                except rpc.FrameTooLarge as exc:
                    link.report(exc)
                    if exc.size > rpc.DISCARD_LIMIT:
                        break
                    continue
                except rpc.ProtocolError as exc:  # the stream ended mid-frame
                    log.info("client %d: %s", link.peer, exc)
                    break
                if body is None:
                    break
                try:
                    msg = rpc.decode(body)
                except rpc.ProtocolError as exc:
                    link.report(exc)
                    continue
                if msg.kind == rpc.REQUEST:
                    self._dispatch(link, msg)
                elif msg.kind == rpc.NOTIFY and msg.method == "cancel" and isinstance(msg.params, dict):
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

    def _dispatch(self, link: ClientLink, msg: rpc.Message) -> None:
        method, params, msgid = msg.method, msg.params, msg.msgid
        try:
            if method == "infill":
                params = check_infill_params(params)
                params.setdefault("id", f"{link.peer}.{msgid}")
                on_step = None
                if params.get("stream"):
                    def on_step(update: dict[str, Any]) -> None:
                        self.loop.call_soon_threadsafe(link.send, rpc.notification("refinement", update))
                self.scheduler.submit(link, params, self._answer(link, msgid), on_step)
            elif method == "cancel":
                if not isinstance(params, dict) or "id" not in params:
                    raise DlmError("invalid_params", "cancel needs {id: request id}")
                self.scheduler.cancel(link, str(params["id"]), self._answer(link, msgid))
            elif method == "warm":
                self.scheduler.control("warm", params if isinstance(params, dict) else {}, self._answer(link, msgid))
            elif method == "status":
                def more(status: dict) -> dict:
                    return {**status, "socket": str(self.socket_path), "connections": len(self.links),
                            "idle_timeout_s": self.idle_timeout_s, "spare_pid": getattr(self.spare, "pid", None)}
                self.scheduler.control("status", {}, self._answer(link, msgid, more))
            elif method == "ping":
                link.reply(msgid, {"pid": os.getpid()})
            elif method == "shutdown":
                link.reply(msgid, {"stopping": True})
                self.reason = "shutdown requested by a client"
                self.stopping.set()
            else:
                raise DlmError("unknown_method", f"unknown method {method!r}; known: {', '.join(METHODS)}")
        except DlmError as exc:
            link.reply(msgid, error=exc)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlm-ls worker", description=(
        "Run the resident model worker. `dlm-ls serve` starts one when none is running for its "
        "model and device, and later servers share it; start it by hand only to watch its log or "
        "to keep a model loaded."))
    p.add_argument("--model", metavar="DIR", help="checkpoint folder (default: the shipped model)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--socket", metavar="PATH", help="default: in the private runtime directory, named "
                   "after the model folder and device")
    p.add_argument("--idle-timeout", type=float, default=600.0, metavar="S",
                   help="exit after this many seconds without a request (default 600)")
    p.add_argument("--max-jobs", type=int, default=32, help="concurrent requests (default 32)")
    p.add_argument("--max-frame-bytes", type=int, default=rpc.MAX_FRAME_BYTES, help=argparse.SUPPRESS)
    p.add_argument("--max-context-tokens", type=int, help="longest context the engine accepts")
    p.add_argument("--captured-step", action="store_true",
                   help="replay the refinement step as a CUDA graph at bucketed shapes (GPU)")
    p.add_argument("--no-spare", action="store_true",
                   help="no standby process (it takes over within a second when the worker is killed)")
    p.add_argument("--debug", action="store_true", help="log every request")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s dlm-ls-worker[%(process)d] %(message)s")
    from ..lsp_server.worker_client import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    if args.socket:
        sock = Path(args.socket)
        pid_file = sock.with_suffix(".pid")
    else:
        ep = rpc.endpoint(model_dir, args.device)
        sock, pid_file = ep.socket, ep.pid_file
    rpc.ensure_private_dir(sock.parent)
    from ..lsp_server.worker_client import _probe

    if _probe(sock):  # before loading anything: a second worker on one socket is a mistake, say so fast
        raise DlmError("worker_unavailable", f"a worker already serves {sock}")
    spare = None
    if not args.no_spare:
        import torch  # before the fork, so the spare has it (most of a start); no op has run yet

        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            from . import infill  # noqa: F401 - a build without GPUs: no device to touch, so the spare keeps it too

        from ..worker import standby

        spare = standby.start(sock)  # returns in the spare too, once its worker was killed and it takes over
    try:
        scheduler = Scheduler(str(model_dir), device=args.device, dtype=args.dtype, max_jobs=args.max_jobs,
                              max_context_tokens=args.max_context_tokens, captured_step=args.captured_step)
        server = WorkerServer(scheduler, sock, args.idle_timeout, args.max_frame_bytes, pid_file, spare)
        asyncio.run(server.run())
    finally:
        if spare is not None:
            spare.dismiss()
    return 0
