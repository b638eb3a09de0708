"""One replica of the Ray Serve application that `dlm-ls cluster up` deploys (worker/cluster.py), and
its routing.

`ClusterEngine` holds one `Scheduler` (the model and its context caches) and speaks the socket
worker's msgpack-RPC messages (worker/protocol.py) over HTTP, through Serve's proxy:

    POST <route>  body: one request frame (infill, warm, status or ping)
                  reply: a stream of frames, `refinement` notifications then the response

A closed reply stream is a cancel: Serve cancels the handler when its client goes away, and the
job stops between two refinement steps.

Routing is by document (`DocumentAffinityRouter`, a Serve request router): the client puts
`document_route(cache_key)` in Serve's `serve_multiplexed_model_id` header, and the router ranks
the running replicas by rendezvous hash of (document, replica). The first is the document's home,
where its context cache lives, from the first keystroke on: nothing has to be learnt or propagated,
unlike Serve's model multiplexing, whose routing table lags a new document by a report period (two
replicas then computed one document's context). When the home dies, the next in rank takes the
document and computes its context once; only the dead replica's documents move. A home at its
`max_ongoing_requests` spills to the next in rank. Requests without a document (status) go to the
less loaded of two.

A token is checked on every request in constant time against its SHA-256, which is all a replica
holds (Ray keeps deployment arguments readable by anyone with cluster access). Each replica
reports its counters to a detached actor (`ClusterStats`) every second, for `cluster status`.

Ray imports it in the replicas and in Serve's proxy (for the router); `cluster up` and `status`
import it to deploy and to read. It needs the optional `[cluster]` extra (ray[serve]). It knows
nothing of LSP or editors, and of the model only through the scheduler.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import hmac
import logging
import os
import random
import threading
import time
import uuid
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from . import protocol
from .config import WorkerConfig
from .protocol import CLIENT_HEADER, FRAMES_MEDIA_TYPE, METHODS, DlmError, InfillRequest, StepUpdate, WarmRequest

log = logging.getLogger("dlm_ls.cluster")

APP = "dlm"  # the Serve application
DEPLOYMENT = "DlmEngine"
NAMESPACE = "dlm-ls"  # the Ray namespace of the stats actor and of our driver
STATS_ACTOR = "dlm-ls-stats"
REPORT_EVERY_S = 1.0
REPORT_STALE_S = 10.0  # a replica silent this long is gone (killed, or being replaced)
DOCUMENTS_SEEN = 4096  # documents a replica remembers having served (for its counts only)


# --------------------------------------------------------------------------- routing


def rendezvous_rank(document: str, replicas: list[str]) -> list[str]:
    """`replicas` (ids) best first for `document`: highest-random-weight hashing, so each document has
    one home while the set of replicas stays the same, and losing a replica moves only its documents."""
    def weight(replica: str) -> bytes:
        return hashlib.sha256(f"{document}\x00{replica}".encode()).digest()
    return sorted(replicas, key=weight, reverse=True)


class DocumentAffinityRouter(FIFOMixin, RequestRouter):
    """Serve's request router for the engine: a document's requests go to its home replica (see above)."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        document = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not document:  # no document: the less loaded of two (Serve probes their queues)
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        return [[by_id[i]] for i in rendezvous_rank(document, list(by_id))]


# --------------------------------------------------------------------------- the replicas


@ray.remote(num_cpus=0)
class ClusterStats:
    """The last report of every replica, for `cluster status`."""

    def __init__(self) -> None:
        self.reports: dict[str, tuple[float, dict]] = {}

    def report(self, replica: str, status: dict) -> None:
        self.reports[replica] = (time.time(), status)

    def snapshot(self) -> dict[str, dict]:
        now = time.time()
        return {replica: {**status, "reported_s_ago": round(now - at, 2)}
                for replica, (at, status) in self.reports.items()}

    def forget(self, replica: str) -> None:
        self.reports.pop(replica, None)


class Owner:
    """A client of this replica, for the scheduler's per-client limits (by the client's name)."""

    def __init__(self, name: str):
        self.name = name


def frame_response(msgid: int, result: Any = None, error: DlmError | None = None, status_code: int = 200) -> Response:
    body = protocol.encode(protocol.response(msgid, error.as_dict() if error else None, result))
    return Response(body, status_code=status_code, media_type=FRAMES_MEDIA_TYPE)


def read_one_frame(body: bytes) -> protocol.Message:
    """The request frame that is the whole body of a POST."""
    if len(body) < protocol.HEADER.size:
        raise protocol.ProtocolError("the request body must be one frame (4-byte length, msgpack body)")
    (size,) = protocol.HEADER.unpack(body[:protocol.HEADER.size])
    if size > protocol.MAX_FRAME_BYTES:
        raise protocol.FrameTooLarge(size, protocol.MAX_FRAME_BYTES)
    if size != len(body) - protocol.HEADER.size:
        raise protocol.ProtocolError(f"the request body holds {len(body) - protocol.HEADER.size} bytes after a "
                                     f"header that announces {size}")
    msg = protocol.decode(body[protocol.HEADER.size:])
    if msg.kind != protocol.REQUEST:
        raise protocol.ProtocolError("the request body must be a request [0, msgid, method, params]", msg.msgid)
    return msg


@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=WorkerConfig.max_jobs * 4, health_check_period_s=2.0,
                  health_check_timeout_s=10.0, graceful_shutdown_timeout_s=5.0,
                  request_router_config=RequestRouterConfig(request_router_class=DocumentAffinityRouter))
class ClusterEngine:
    """One replica: a scheduler over its own copy of the model, behind Serve's HTTP proxy."""

    def __init__(self, model_dir: str, device: str, threads: int, token_sha256: str | None,
                 max_jobs: int = WorkerConfig.max_jobs, max_client_jobs: int = WorkerConfig.max_client_jobs,
                 max_client_slots: int = WorkerConfig.max_client_slots):
        from .scheduler import Scheduler  # torch arrives here, in the replica

        self.scheduler = Scheduler(model_dir, device=device, threads=threads or None, max_jobs=max_jobs,
                                   max_client_jobs=max_client_jobs, max_client_slots=max_client_slots)
        self.scheduler.start()
        self.token_sha256 = token_sha256.encode() if token_sha256 else None
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.actor_name = ray.get_runtime_context().get_actor_name()
        self.node = ray.get_runtime_context().get_node_id()
        self.owners: dict[str, Owner] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self.documents: collections.OrderedDict[str, None] = collections.OrderedDict()  # served here, newest last
        self.stopped = threading.Event()
        threading.Thread(target=self._report_loop, name="dlm-cluster-report", daemon=True).start()
        log.info("replica %s ready: %s", self.replica, self.scheduler.info)

    def _seen(self, document: str) -> None:
        """Count a document served here; a new one (its first request, or its home died) computes its context."""
        if document in self.documents:
            self.documents.move_to_end(document)
            return
        self.counters["documents_taken"] += 1
        self.documents[document] = None
        if len(self.documents) > DOCUMENTS_SEEN:
            self.documents.popitem(last=False)

    # -- requests

    async def __call__(self, request: Request) -> Response:
        if request.method != "POST":
            return Response("POST one dlm-ls request frame here (docs/team.md)\n", status_code=405)
        if self.token_sha256 is not None:
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            digest = hashlib.sha256(token.encode()).hexdigest().encode() if scheme.lower() == "bearer" else b""
            if not hmac.compare_digest(digest, self.token_sha256):
                self.counters["refused"] += 1
                return frame_response(0, error=DlmError("unauthorized", "a missing or wrong token (the cluster's "
                                                        "--token-file; the client's tokenFile)"), status_code=401)
        body = await request.body()
        try:
            msg = read_one_frame(body)
        except DlmError as exc:
            return frame_response(getattr(exc, "msgid", None) or 0, error=exc, status_code=400)
        document = serve.get_multiplexed_model_id()  # the router sent it here by this
        if document:
            self._seen(document)
        owner = self._owner(request.headers.get(CLIENT_HEADER, "") or "anonymous")
        try:
            if msg.method == "infill":
                infill = InfillRequest.from_wire(msg.params)
                infill.id = infill.id or uuid.uuid4().hex
                return StreamingResponse(self._infill(msg.msgid, owner, infill), media_type=FRAMES_MEDIA_TYPE)
            if msg.method == "warm":
                return frame_response(msg.msgid, await self.scheduler.call("warm", WarmRequest.from_wire(msg.params)))
            if msg.method == "status":
                return frame_response(msg.msgid, self._with_replica(await self.scheduler.call("status", {})))
            if msg.method == "ping":
                return frame_response(msg.msgid, {"pid": os.getpid(), "replica": self.replica})
            if msg.method in METHODS:
                raise DlmError("unknown_method", f"{msg.method!r} is not served by a cluster (a closed stream "
                                                 "cancels; stop the cluster with `dlm-ls cluster down`)")
            raise DlmError("unknown_method", f"unknown method {msg.method!r}")
        except DlmError as exc:
            return frame_response(msg.msgid, error=exc)

    async def _infill(self, msgid: int, owner: Owner, infill: InfillRequest):
        """The reply stream of one infill; closing it (the client went away) cancels the job."""
        answered = False
        try:
            async with contextlib.aclosing(self.scheduler.events(owner, infill, steps=infill.stream)) as events:
                async for event in events:
                    if isinstance(event, StepUpdate):
                        yield protocol.encode(protocol.notification("refinement", event.to_wire()))
                        continue
                    answered = True
                    try:
                        frame = protocol.encode(protocol.response(msgid, None, event.to_wire()))
                    except DlmError as exc:  # a reply too large to send: say so instead
                        frame = protocol.encode(protocol.response(msgid, exc.as_dict(), None))
                    yield frame
        except DlmError as exc:
            answered = True
            yield protocol.encode(protocol.response(msgid, exc.as_dict(), None))
        finally:
            if not answered:  # the stream was closed under us: events() has cancelled the job
                self.counters["closed_streams"] += 1

    def _owner(self, name: str) -> Owner:
        name = name[:200]
        owner = self.owners.get(name)
        if owner is None:
            owner = self.owners[name] = Owner(name)
        return owner

    def _with_replica(self, status: dict) -> dict:
        return {**status, "replica": self.replica, "actor": self.actor_name, "node": self.node,
                "documents": len(self.documents), "http": dict(self.counters)}

    # -- reports for `cluster status`

    def _report_loop(self) -> None:
        stats = None
        while not self.stopped.wait(REPORT_EVERY_S):
            try:
                if stats is None:
                    stats = ray.get_actor(STATS_ACTOR, namespace=NAMESPACE)
                got = threading.Event()
                box: dict = {}

                def done(result: Any, error: DlmError | None) -> None:
                    box["status"] = result
                    got.set()
                self.scheduler.control("status", {}, done)
                if got.wait(10.0) and box.get("status"):
                    stats.report.remote(self.replica, self._with_replica(box["status"]))
            except ValueError:  # no stats actor (deployed without `cluster up`): nobody to tell
                stats = None
            except Exception:  # noqa: BLE001 - reporting must never take the replica down
                log.debug("report failed", exc_info=True)

    def __del__(self) -> None:
        self.stopped.set()
        self.scheduler.stop(timeout=2.0)
