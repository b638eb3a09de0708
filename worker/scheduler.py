"""The scheduler: one thread that owns the `Infiller` (tokenizer + model + context caches).

Requests from any thread queue up; each loop turn starts the new ones, runs ONE batched refinement
step over every live request (`Infiller.step`), then answers the finished ones and streams the
others' snapshots. Cancellation takes effect between two steps. A request with priority "low" (the
server's speculative suggestions) is stepped only in turns with no normal request, so it never slows
one down. All holes of a request are one job, refined together. The socket server (server.py) and
the language server's `--in-process` backend both drive this class.

Fairness between connections (the "owners" of requests): one owner may have at most
`max_client_jobs` requests live; more wait in its own queue, up to `max_client_slots` canvas slots,
and are started in turn with the other owners' waiting requests as live ones finish. So a client
that sends fifty requests at once holds a few batch rows and waits, while another client's single
request starts at once. Beyond its queue, or when the worker has `max_jobs` live, a request is
answered "busy". `status()` has each owner's counts.

It speaks the typed messages of protocol.py (an `InfillRequest` in, an `InfillReply` or a
`DlmError` out, `StepUpdate`s between) and knows nothing of sockets, LSP or documents.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from .config import WorkerConfig
from .protocol import DlmError, InfillReply, InfillRequest, StepUpdate, WarmRequest, settle

log = logging.getLogger("dlm_ls.worker")

Done = Callable[[Any, "DlmError | None"], None]
OnStep = Callable[[StepUpdate], None]


@dataclass
class Request:
    owner: Any  # the connection that asked: its requests are cancelled when it goes away
    infill: InfillRequest
    done: Done
    on_step: OnStep | None
    submitted: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    job: Any = None
    step: int = 0

    @property
    def id(self) -> str:
        return self.infill.id

    @property
    def low(self) -> bool:
        return self.infill.priority == "low"


@dataclass
class Client:
    """One owner's share: its waiting requests, and counts for the status."""

    name: str
    waiting: collections.deque = field(default_factory=collections.deque)
    waiting_slots: int = 0
    counters: collections.Counter = field(default_factory=collections.Counter)


def _set_cpu_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class Scheduler:
    """The Infiller on one thread, stepping every live request in one batch per step."""

    def __init__(self, model_dir: str | None, device: str = "auto", dtype: str | None = None,
                 max_jobs: int = WorkerConfig.max_jobs, max_context_tokens: int | None = None, infiller: Any = None,
                 captured_step: bool = False, max_client_jobs: int = WorkerConfig.max_client_jobs,
                 max_client_slots: int = WorkerConfig.max_client_slots, threads: int | None = None):
        self.threads = threads  # torch's CPU threads, set on the thread that runs the engine
        if threads:
            _set_cpu_threads(threads)  # the load runs here, before the scheduler thread exists
        self.max_jobs = max_jobs
        self.max_client_jobs = max_client_jobs
        self.max_client_slots = max_client_slots
        self.clients: dict[Any, Client] = {}  # by owner; only the scheduler thread touches it
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
        from ..model.infill import Infiller

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

    def submit(self, owner: Any, request: InfillRequest, done: Done, on_step: OnStep | None = None) -> None:
        """Queue `request`; `done(InfillReply, None)` or `done(None, DlmError)` is called from the scheduler thread."""
        self.inbox.put(("submit", Request(owner, request, done, on_step)))

    def cancel(self, owner: Any, request_id: str, done: Done | None = None) -> None:
        self.inbox.put(("cancel", owner, str(request_id), done))

    def drop_owner(self, owner: Any) -> None:
        self.inbox.put(("drop", owner))

    def control(self, method: str, params: Any, done: Done) -> None:
        """Run "status" (params ignored) or "warm" (a WarmRequest) on the scheduler thread."""
        self.inbox.put(("control", method, params, done))

    # -- the same, for a caller on an asyncio loop (the in-process backend, a cluster replica)

    async def events(self, owner: Any, request: InfillRequest, steps: bool = False) -> AsyncIterator[Any]:
        """Run `request`: its `StepUpdate`s (when `steps`), then its `InfillReply`; a `DlmError` raises.
        Everything is delivered on the caller's loop. Leaving the iteration early (a cancelled task, a
        closed stream) cancels the job between two steps."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def put(item: tuple) -> None:
            loop.call_soon_threadsafe(inbox.put_nowait, item)

        on_step = (lambda update: put(("step", update, None))) if steps else None
        self.submit(owner, request, lambda result, error: put(("done", result, error)), on_step)
        finished = False
        try:
            while True:
                kind, value, error = await inbox.get()
                if kind == "step":
                    yield value
                    continue
                finished = True
                if error is not None:
                    raise error
                yield value
                return
        finally:
            if not finished:
                self.cancel(owner, request.id)

    async def call(self, method: str, params: Any) -> Any:
        """`control` awaited on the caller's loop."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.control(method, params, lambda result, error: loop.call_soon_threadsafe(settle, fut, result, error))
        return await fut

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
        if self.threads:
            _set_cpu_threads(self.threads)  # OpenMP's thread count is per calling thread: set it on this one
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
            self._start_waiting()
            if self.live:
                self._step()
                self._start_waiting()

    def _handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "submit":
            self._admit(cmd[1])
        elif kind == "cancel":
            _, owner, rid, done = cmd
            hit = [r for r in self.live if r.owner is owner and r.id == rid]
            client = self.clients.get(owner)
            if client is not None:
                hit += [r for r in client.waiting if r.id == rid]
            for req in hit:
                self._cancel(req, "cancelled by the client")
            if done is not None:
                done({"cancelled": bool(hit)}, None)
        elif kind == "drop":
            client = self.clients.get(cmd[1])
            for req in [r for r in self.live if r.owner is cmd[1]] + list(client.waiting if client else ()):
                self._cancel(req, "the client disconnected")
            self.clients.pop(cmd[1], None)
        elif kind == "control":
            _, method, params, done = cmd
            try:
                done(self._control(method, params), None)
            except DlmError as exc:
                done(None, exc)
            except Exception as exc:  # noqa: BLE001 - reported to the caller, the worker goes on
                log.exception("%s failed", method)
                done(None, DlmError("internal", f"{method} failed: {type(exc).__name__}: {exc}"))

    def _client(self, owner: Any) -> Client:
        client = self.clients.get(owner)
        if client is None:
            client = self.clients[owner] = Client(str(getattr(owner, "name", "") or f"client {len(self.clients) + 1}"))
        return client

    def _slots(self, req: Request) -> int:
        """The canvas slots a request will hold in every batch: its canvas lengths, for each hole."""
        lengths = req.infill.overrides.get("canvas_lengths") or getattr(getattr(self.inf, "defaults", None),
                                                                       "canvas_lengths", None) or [1]
        return sum(lengths) * max(1, len(req.infill.segments) - 1)

    def _live_of(self, owner: Any) -> int:
        return sum(1 for r in self.live if r.owner is owner)

    def _admit(self, req: Request) -> None:
        """Start `req`, or queue it behind its owner's live requests, or answer busy."""
        self.counters["requests"] += 1
        client = self._client(req.owner)
        client.counters["requests"] += 1
        if self._live_of(req.owner) >= self.max_client_jobs:
            slots = self._slots(req)
            if client.waiting_slots + slots <= self.max_client_slots:
                client.waiting.append(req)
                client.waiting_slots += slots
                client.counters["queued"] += 1
                return
            self._busy(req, client, f"this client has {self.max_client_jobs} requests running and "
                                    f"{client.waiting_slots} canvas slots waiting (the per-client limits); try again")
            return
        if len(self.live) >= self.max_jobs:
            self._busy(req, client, f"the worker is serving {self.max_jobs} requests already; try again")
            return
        self._start(req)

    def _busy(self, req: Request, client: Client, why: str) -> None:
        self.counters["busy"] += 1
        client.counters["busy"] += 1
        req.done(None, DlmError("busy", why))

    def _start_waiting(self) -> None:
        """Start waiting requests, one per owner in turn, while there is room (round robin between owners)."""
        while len(self.live) < self.max_jobs:
            started = False
            for owner, client in list(self.clients.items()):
                if client.waiting and self._live_of(owner) < self.max_client_jobs and len(self.live) < self.max_jobs:
                    req = client.waiting.popleft()
                    client.waiting_slots -= self._slots(req)
                    self._start(req)
                    self.clients[owner] = self.clients.pop(owner)  # served: to the back of the line
                    started = True
            if not started:
                return

    def _start(self, req: Request) -> None:
        from ..model.infill import InfillError

        p = req.infill
        req.started = time.perf_counter()
        try:
            req.job = self.inf.start(p.segments, mode=p.mode, cache_key=p.cache_key, preamble=p.preamble,
                                     **p.overrides)
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
        client = self.clients.get(req.owner)
        if client is not None:
            client.counters["most_live"] = max(client.counters["most_live"], self._live_of(req.owner) + 1)
        self.counters["holes"] += len(p.segments) - 1
        log.debug("[%s] started: %d segments, %d chars, mode %s", req.id, len(p.segments),
                  sum(len(s) for s in p.segments), p.mode)
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
                    req.on_step(StepUpdate(req.id, req.step, req.job.snapshot(),
                                           round((time.perf_counter() - req.started) * 1000, 2)))
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
        if req.owner in self.clients:
            self.clients[req.owner].counters["completed"] += 1
        queue_ms = (req.started - req.submitted) * 1000
        # Every candidate length's middles, best first: the server re-ranks them by how they parse.
        reply = InfillReply(list(res.middles), [list(c) for c in res.candidates], int(res.nfe), int(res.steps),
                            round(float(res.ms), 3), int(res.canvas_length), float(res.score),
                            int(res.prefill_tokens), round(queue_ms, 2),
                            round((time.perf_counter() - req.submitted) * 1000, 2))
        log.info("[%s] done: nfe %d, steps %d, %.0f ms (queue %.0f ms), %d context tokens computed", req.id,
                 reply.nfe, reply.steps, reply.total_ms, queue_ms, reply.prefill_tokens)
        req.done(reply, None)

    def _cancel(self, req: Request, why: str) -> None:
        if req.job is None:  # still waiting its turn
            client = self.clients[req.owner]
            client.waiting.remove(req)
            client.waiting_slots -= self._slots(req)
        else:
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
            from ..model.infill import InfillError

            warm = params if isinstance(params, WarmRequest) else WarmRequest.from_wire(params)
            try:
                self.inf.warm(warm.cache_key, warm.segments, warm.preamble)
            except InfillError as exc:
                raise DlmError("infill_error", str(exc)) from None
            self.counters["warms"] += 1
            return {"warmed": True}
        raise DlmError("unknown_method", f"unknown control method {method!r}")

    def status(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "info": self.info, "cache": dict(self.inf.cache_stats()), "loads": self.loads,
                "load_s": round(self.load_s, 3), "uptime_s": round(time.monotonic() - self.started_at, 3),
                "live": len(self.live), "max_jobs": self.max_jobs, "threads": self.threads, "max_batch": self.max_batch,
                "counters": dict(self.counters), "max_client_jobs": self.max_client_jobs,
                "max_client_slots": self.max_client_slots,
                "clients": [{"client": c.name, "live": self._live_of(owner), "waiting": len(c.waiting),
                             "waiting_slots": c.waiting_slots, **c.counters} for owner, c in self.clients.items()]}
