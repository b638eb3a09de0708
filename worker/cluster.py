"""Scale-out on Ray Serve: the engine as a Serve application of N replicas, and `dlm-ls cluster up|status|down`.

Each replica (`ClusterEngine`) holds one `Scheduler` (the model and its context caches) and speaks
the socket worker's msgpack-RPC messages (worker/protocol.py) over HTTP, through Serve's proxy:

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

A token (`--token-file`) is checked on every request in constant time; replicas hold only its
SHA-256 (Ray keeps deployment arguments readable by anyone with cluster access). TLS is Serve's
proxy's own (`--tls-cert/--tls-key`).

Each replica reports its counters to a detached actor (`ClusterStats`) every second; `cluster
status` reads them. The commands keep what they started in `cluster.json` of the runtime
directory, so `down` ends only that.

This module needs the optional `[cluster]` extra (ray[serve]); nothing else imports it. It knows
nothing of LSP or editors, and of the model only through the scheduler.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

try:
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig
    from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
except ImportError as exc:  # the optional extra is missing: say how to get it
    from .protocol import DlmError

    raise DlmError("config_error", f"`dlm-ls cluster` needs Ray Serve, which is not installed ({exc.name}): "
                                   "pip install 'dlm-ls[cluster]'") from None

from . import protocol
from .config import WorkerConfig
from .protocol import (CLIENT_HEADER, FRAMES_MEDIA_TYPE, METHODS, DlmError, InfillRequest, StepUpdate,
                       WarmRequest)

log = logging.getLogger("dlm_ls.cluster")

APP = "dlm"  # the Serve application
DEPLOYMENT = "DlmEngine"
NAMESPACE = "dlm-ls"  # the Ray namespace of the stats actor and of our driver
STATS_ACTOR = "dlm-ls-stats"
REPORT_EVERY_S = 1.0
REPORT_STALE_S = 10.0  # a replica silent this long is gone (killed, or being replaced)
DOCUMENTS_SEEN = 4096  # documents a replica remembers having served (for its counts only)
CLUSTER_DEFAULTS = {"replicas": 1, "host": "127.0.0.1", "port": 8000, "route": "/dlm", "ray_port": 6379,
                    "threads": 1, "device": "cpu"}


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
        return {replica: {**status, "reported_s_ago": round(now - at, 2)} for replica, (at, status) in self.reports.items()}

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
                return frame_response(msg.msgid, await self._control("warm", WarmRequest.from_wire(msg.params)))
            if msg.method == "status":
                return frame_response(msg.msgid, self._with_replica(await self._control("status", {})))
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
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def put(item: tuple) -> None:
            loop.call_soon_threadsafe(inbox.put_nowait, item)

        on_step = (lambda update: put(("step", update))) if infill.stream else None
        self.scheduler.submit(owner, infill, lambda result, error: put(("done", result, error)), on_step)
        answered = False
        try:
            while True:
                item = await inbox.get()
                if item[0] == "step":
                    update: StepUpdate = item[1]
                    yield protocol.encode(protocol.notification("refinement", update.to_wire()))
                    continue
                _, result, error = item
                answered = True
                try:
                    frame = protocol.encode(protocol.response(msgid, error.as_dict() if error else None,
                                                              None if error else result.to_wire()))
                except DlmError as exc:  # a reply too large to send: say so instead
                    frame = protocol.encode(protocol.response(msgid, exc.as_dict(), None))
                yield frame
                return
        finally:
            if not answered:  # the stream was closed under us: a cancel
                self.counters["closed_streams"] += 1
                self.scheduler.cancel(owner, infill.id)

    def _owner(self, name: str) -> Owner:
        name = name[:200]
        owner = self.owners.get(name)
        if owner is None:
            owner = self.owners[name] = Owner(name)
        return owner

    async def _control(self, method: str, params: Any) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def done(result: Any, error: DlmError | None) -> None:
            loop.call_soon_threadsafe(protocol.settle, fut, result, error)
        self.scheduler.control(method, params, done)
        return await fut

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


# --------------------------------------------------------------------------- the commands


def state_file() -> Path:
    return protocol.runtime_dir() / "cluster.json"


def read_state() -> dict:
    try:
        return json.loads(state_file().read_text())
    except (OSError, ValueError):
        return {}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ray_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts", *args]


def _quiet_env() -> dict:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


def _connect(address: str) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False,
             configure_logging=True)


def up(args: argparse.Namespace) -> int:
    device = args.device
    if device not in ("cpu", "cuda"):
        raise DlmError("config_error", f"--device must be cpu or cuda, not {device!r}")
    if args.replicas < 1:
        raise DlmError("config_error", "--replicas must be at least 1")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise DlmError("config_error", "--tls-cert and --tls-key go together")
    loopback = _is_loopback(args.host)
    if not loopback and not args.token_file:
        raise DlmError("config_error", f"--host {args.host} is reachable from other machines: give --token-file "
                                       "(a file of your own, mode 0600)")
    if not loopback and not args.tls_cert and not args.insecure:
        raise DlmError("config_error", f"--host {args.host} without TLS sends code in the clear: give "
                                       "--tls-cert/--tls-key, or --insecure on a network you trust")
    token = protocol.read_token_file(args.token_file) if args.token_file else None
    model_dir = str(protocol.resolve_model_dir(args.model))
    if read_state():
        raise DlmError("config_error", f"a cluster is already up ({state_file()}): `dlm-ls cluster down` first")
    started_head = False
    address = args.address
    if not address:
        cpus = max(os.cpu_count() or 1, args.replicas * args.threads)
        cmd = _ray_cli("start", "--head", f"--port={args.ray_port}", f"--num-cpus={cpus}",
                       "--include-dashboard=false", "--disable-usage-stats")
        if device == "cuda":
            cmd.append("--num-gpus=" + str(_visible_gpus()))
        print(f"starting a local Ray cluster on port {args.ray_port} ...", flush=True)
        done = subprocess.run(cmd, env=_quiet_env(), capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise DlmError("worker_unavailable", f"`ray start --head` failed:\n{tail}")
        address, started_head = f"127.0.0.1:{args.ray_port}", True
    try:
        _connect(address)
        ClusterStats.options(name=STATS_ACTOR, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote()
        http = {"host": args.host, "port": args.port}
        if args.tls_cert:
            http.update(ssl_certfile=str(Path(args.tls_cert).expanduser()), ssl_keyfile=str(Path(args.tls_key).expanduser()))
        serve.start(http_options=http)
        per_replica = {"num_cpus": args.threads} if device == "cpu" else {"num_cpus": 1, "num_gpus": 1}
        engine = ClusterEngine.options(num_replicas=args.replicas, ray_actor_options=per_replica)
        print(f"deploying {args.replicas} replica(s) of {model_dir} on {device} ...", flush=True)
        t0 = time.perf_counter()
        serve.run(engine.bind(model_dir, device, args.threads if device == "cpu" else 0,
                              protocol.token_digest(token) if token else None),
                  name=APP, route_prefix=args.route)
        deploy_s = time.perf_counter() - t0
    except BaseException:
        if started_head:
            subprocess.run(_ray_cli("stop"), env=_quiet_env(), capture_output=True)
        raise
    url = str(protocol.WorkerAddress("https" if args.tls_cert else "http", args.route,
                                     "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host, args.port))
    protocol.ensure_private_dir(state_file().parent)
    state_file().write_text(json.dumps({"address": address, "started_head": started_head, "url": url,
                                        "replicas": args.replicas, "model": model_dir, "device": device,
                                        "token": bool(token), "started": time.time()}, indent=1))
    print(f"{args.replicas} replica(s) ready in {deploy_s:.1f} s; Ray at {address}; "
          f"`dlm-ls cluster status` / `dlm-ls cluster down`")
    print(url)
    return 0


def _visible_gpus() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:  # noqa: BLE001
        return 1


def status_report(address: str | None = None) -> dict:
    """Replicas, load and cache hits of the running cluster."""
    state = read_state()
    _connect(address or state.get("address") or "auto")
    overview = serve.status()
    app = overview.applications.get(APP)
    report: dict[str, Any] = {"url": state.get("url"), "address": address or state.get("address"),
                              "application": None, "replica_states": {}, "replicas": []}
    if app is not None:
        report["application"] = str(app.status.value if hasattr(app.status, "value") else app.status)
        dep = app.deployments.get(DEPLOYMENT)
        if dep is not None:
            report["replica_states"] = {str(k.value if hasattr(k, "value") else k): v
                                        for k, v in dep.replica_states.items()}
    try:
        stats = ray.get_actor(STATS_ACTOR, namespace=NAMESPACE)
        snapshot = ray.get(stats.snapshot.remote(), timeout=10)
    except ValueError:
        stats, snapshot = None, {}
    for replica, s in sorted(snapshot.items()):
        alive = s["reported_s_ago"] < REPORT_STALE_S and _actor_alive(s.get("actor"))
        if not alive and s["reported_s_ago"] > 6 * REPORT_STALE_S and stats is not None:
            stats.forget.remote(replica)  # long gone: drop it from later reports
        counters = s.get("counters", {})
        cache = s.get("cache", {})
        report["replicas"].append({
            "replica": replica, "alive": alive, "reported_s_ago": s["reported_s_ago"],
            "actor": s.get("actor"), "node": s.get("node"), "pid": s.get("pid"), "device": s.get("info", {}).get("device"),
            "live": s.get("live", 0), "max_batch": s.get("max_batch", 0), "requests": counters.get("requests", 0),
            "completed": counters.get("completed", 0), "cancelled": counters.get("cancelled", 0),
            "busy": counters.get("busy", 0), "documents": s.get("documents", 0),
            "closed_streams": s.get("http", {}).get("closed_streams", 0),
            "documents_taken": s.get("http", {}).get("documents_taken", 0),
            "refused": s.get("http", {}).get("refused", 0),
            "cache_hits": cache.get("hits", 0), "cache_misses": cache.get("misses", 0),
            "reused_tokens": cache.get("reused_tokens", 0), "computed_tokens": cache.get("computed_tokens", 0),
            "clients": s.get("clients", [])})
    return report


def _actor_alive(name: str | None) -> bool:
    """Whether Serve's replica actor of that name still exists (a killed one's name is released)."""
    if not name:
        return False
    try:
        ray.get_actor(name, namespace="serve")
        return True
    except ValueError:
        return False


def status(args: argparse.Namespace) -> int:
    report = status_report(args.address)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"application {APP}: {report['application'] or 'not deployed'}  replicas {report['replica_states']}  "
          f"url {report['url']}")
    for r in report["replicas"]:
        if not r["alive"]:
            continue
        print(f"  {r['replica']}  pid {r['pid']}  {r['device']}  live {r['live']}  requests {r['requests']}  "
              f"completed {r['completed']}  cancelled {r['cancelled']}  documents {r['documents']}  "
              f"cache hits {r['cache_hits']} / misses {r['cache_misses']}")
    return 0


def down(args: argparse.Namespace) -> int:
    state = read_state()
    address = args.address or state.get("address")
    if not address:
        raise DlmError("config_error", "no cluster started here (no cluster.json): give --address to end one")
    try:
        _connect(address)
        serve.delete(APP)
        serve.shutdown()
        try:
            ray.kill(ray.get_actor(STATS_ACTOR, namespace=NAMESPACE))
        except ValueError:
            pass
        ray.shutdown()
    except ConnectionError as exc:  # the Ray cluster is gone already
        print(f"Ray at {address} is not answering ({exc}); forgetting it", file=sys.stderr)
    if state.get("started_head"):
        # `ray stop` ends this machine's Ray processes: the head `up` started (docs/team.md).
        subprocess.run(_ray_cli("stop", "--force"), env=_quiet_env(), capture_output=True)
    state_file().unlink(missing_ok=True)
    print("cluster down")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlm-ls cluster", description=(
        "Serve the model from a Ray Serve application of N replicas (docs/team.md). Editors use the URL "
        "that `up` prints last as their worker (--worker / the `worker` setting)."))
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up", help="start (or join) a Ray cluster and deploy the replicas; prints the worker URL")
    d = CLUSTER_DEFAULTS
    u.add_argument("--replicas", type=int, default=d["replicas"], help="replicas, each with the model (default 1)")
    u.add_argument("--address", help="join this Ray cluster (HOST:PORT) instead of starting one on this machine")
    u.add_argument("--device", default=d["device"], help="cpu or cuda (one GPU per replica); default cpu")
    u.add_argument("--model", help="the model folder (default: the shipped model)")
    u.add_argument("--threads", type=int, default=d["threads"], help="CPU threads per replica (cpu only; default 1)")
    u.add_argument("--host", default=d["host"], help="where Serve's HTTP proxy listens (default 127.0.0.1)")
    u.add_argument("--port", type=int, default=d["port"], help="its port (default 8000)")
    u.add_argument("--route", default=d["route"], help="the application's route (default /dlm)")
    u.add_argument("--ray-port", type=int, default=d["ray_port"], help="the port of a Ray head started here")
    u.add_argument("--token-file", help="require this token (a file of your own, mode 0600) on every request")
    u.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM) ...")
    u.add_argument("--tls-key", help="... and this key")
    u.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without TLS")
    s = sub.add_parser("status", help="replicas, load and cache hits")
    s.add_argument("--address", help="the Ray cluster (default: the one `up` started or joined)")
    s.add_argument("--json", action="store_true", help="print JSON")
    dn = sub.add_parser("down", help="delete the application; stop the Ray head if `up` started it")
    dn.add_argument("--address", help="the Ray cluster (default: the one `up` started or joined)")
    args = p.parse_args(argv)
    if args.command == "up" and not args.route.startswith("/"):
        args.route = "/" + args.route
    return {"up": up, "status": status, "down": down}[args.command](args)
