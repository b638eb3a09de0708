"""`dlm-ls cluster up|status|down`: the engine as a Ray Serve application of N replicas.

`up` starts a local Ray head when no `--address` is given, or joins that cluster. It then deploys
`ClusterEngine` replicas (worker/serve_replica.py: the replica, its routing by document, its
token check) behind Serve's HTTP proxy, with TLS when asked. It prints the worker URL for
editors as its last line.

`status` reads the replicas' reports: requests, load, cache hits. `down` deletes the application.
The commands keep what they started in `cluster.json` of the runtime directory, so `down` ends
only that: a Ray head that `up` started runs in a process group (and temp dir) of its own, which
`down` signals, leaving any other Ray on the machine alone.

Ray is imported only when a command runs, so `--help` works without the `[cluster]` extra and
its absence is one clear line. It knows nothing of LSP or editors.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import protocol
from .protocol import DlmError

CLUSTER_DEFAULTS = {"replicas": 1, "host": "127.0.0.1", "port": 8000, "route": "/dlm", "ray_port": 6379,
                    "threads": 1, "device": "cpu"}


def _ray():
    """ray, ray.serve and our replica module; a clear error when the [cluster] extra is missing."""
    try:
        ray = importlib.import_module("ray")
        serve = importlib.import_module("ray.serve")
    except ImportError as exc:
        raise DlmError("config_error", f"`dlm-ls cluster` needs Ray Serve, which is not installed ({exc.name}): "
                                       "pip install 'dlm-ls[cluster]'") from None
    from . import serve_replica

    return ray, serve, serve_replica


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


def _connect(address: str):
    """Join the Ray cluster at `address` as a driver; ray, serve and the replica module."""
    ray, serve, replica = _ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=address, namespace=replica.NAMESPACE, logging_level=logging.WARNING, log_to_driver=False,
             configure_logging=True)
    return ray, serve, replica


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
    _ray()  # the [cluster] extra, before anything starts
    if read_state():
        raise DlmError("config_error", f"a cluster is already up ({state_file()}): `dlm-ls cluster down` first")
    head_group = None  # the process group of the Ray head `up` starts: what `down` ends, and nothing else
    address = args.address
    if not address:
        cpus = max(os.cpu_count() or 1, args.replicas * args.threads)
        # Its own temp dir and side ports, so that it shares nothing with another Ray on this machine.
        cmd = _ray_cli("start", "--head", f"--port={args.ray_port}", f"--num-cpus={cpus}",
                       "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={_ray_temp_dir(args.ray_port)}",
                       f"--ray-client-server-port={free_port()}", f"--dashboard-port={free_port()}")
        if device == "cuda":
            cmd.append("--num-gpus=" + str(_visible_gpus()))
        print(f"starting a local Ray cluster on port {args.ray_port} ...", flush=True)
        # A session of its own: every process of the head (and the replicas the raylet forks) is in
        # the process group of this `ray start`, which `down` signals.
        proc = subprocess.Popen(cmd, env=_quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        output, _ = proc.communicate()
        head_group = proc.pid
        if proc.returncode != 0:
            _end_group(head_group)
            tail = "\n".join(output.strip().splitlines()[-5:])
            raise DlmError("worker_unavailable", f"`ray start --head` failed:\n{tail}")
        address = f"127.0.0.1:{args.ray_port}"
    try:
        ray, serve, replica = _connect(address)
        replica.ClusterStats.options(name=replica.STATS_ACTOR, namespace=replica.NAMESPACE, lifetime="detached",
                                     get_if_exists=True).remote()
        http = {"host": args.host, "port": args.port}
        if args.tls_cert:
            http.update(ssl_certfile=str(Path(args.tls_cert).expanduser()), ssl_keyfile=str(Path(args.tls_key).expanduser()))
        serve.start(http_options=http)
        per_replica = {"num_cpus": args.threads} if device == "cpu" else {"num_cpus": 1, "num_gpus": 1}
        engine = replica.ClusterEngine.options(num_replicas=args.replicas, ray_actor_options=per_replica)
        print(f"deploying {args.replicas} replica(s) of {model_dir} on {device} ...", flush=True)
        t0 = time.perf_counter()
        serve.run(engine.bind(model_dir, device, args.threads if device == "cpu" else 0,
                              protocol.token_digest(token) if token else None),
                  name=replica.APP, route_prefix=args.route)
        deploy_s = time.perf_counter() - t0
    except BaseException:
        if head_group is not None:
            _end_group(head_group)
        raise
    url = str(protocol.WorkerAddress("https" if args.tls_cert else "http", args.route,
                                     "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host, args.port))
    protocol.ensure_private_dir(state_file().parent)
    state_file().write_text(json.dumps({"address": address, "head_group": head_group, "url": url,
                                        "replicas": args.replicas, "model": model_dir, "device": device,
                                        "token": bool(token), "started": time.time()}, indent=1))
    print(f"{args.replicas} replica(s) ready in {deploy_s:.1f} s; Ray at {address}; "
          f"`dlm-ls cluster status` / `dlm-ls cluster down`")
    print(url)
    return 0


def _ray_temp_dir(ray_port: int) -> str:
    # Short: Ray puts Unix sockets under it, and a socket path has ~100 bytes.
    return f"/tmp/dlm-ls-ray-{os.getuid()}-{ray_port}"


def free_port() -> int:
    """A TCP port free on this machine now (Ray's side ports; bench/cluster.py's ports)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _end_group(group: int, grace_s: float = 10.0) -> None:
    """SIGTERM the process group of a Ray head we started, then SIGKILL what is left after `grace_s`."""
    import signal

    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def _visible_gpus() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:  # noqa: BLE001
        return 1


def status_report(address: str | None = None) -> dict:
    """Replicas, load and cache hits of the running cluster."""
    state = read_state()
    ray, serve, replica = _connect(address or state.get("address") or "auto")
    overview = serve.status()
    app = overview.applications.get(replica.APP)
    report: dict[str, Any] = {"app": replica.APP, "url": state.get("url"), "address": address or state.get("address"),
                              "application": None, "replica_states": {}, "replicas": []}
    if app is not None:
        report["application"] = str(app.status.value if hasattr(app.status, "value") else app.status)
        dep = app.deployments.get(replica.DEPLOYMENT)
        if dep is not None:
            report["replica_states"] = {str(k.value if hasattr(k, "value") else k): v
                                        for k, v in dep.replica_states.items()}
    try:
        stats = ray.get_actor(replica.STATS_ACTOR, namespace=replica.NAMESPACE)
        snapshot = ray.get(stats.snapshot.remote(), timeout=10)
    except ValueError:
        stats, snapshot = None, {}
    for replica_id, s in sorted(snapshot.items()):
        alive = s["reported_s_ago"] < replica.REPORT_STALE_S and _actor_alive(ray, s.get("actor"))
        if not alive and s["reported_s_ago"] > 6 * replica.REPORT_STALE_S and stats is not None:
            stats.forget.remote(replica_id)  # long gone: drop it from later reports
        counters = s.get("counters", {})
        cache = s.get("cache", {})
        report["replicas"].append({
            "replica": replica_id, "alive": alive, "reported_s_ago": s["reported_s_ago"],
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


def _actor_alive(ray: Any, name: str | None) -> bool:
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
    print(f"application {report['app']}: {report['application'] or 'not deployed'}  replicas {report['replica_states']}  "
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
        ray, serve, replica = _connect(address)
        serve.delete(replica.APP)  # ours only: other applications on a joined cluster stay
        if state.get("head_group"):
            serve.shutdown()
        try:
            ray.kill(ray.get_actor(replica.STATS_ACTOR, namespace=replica.NAMESPACE))
        except ValueError:
            pass
        ray.shutdown()
    except ConnectionError as exc:  # the Ray cluster is gone already
        print(f"Ray at {address} is not answering ({exc}); forgetting it", file=sys.stderr)
    if state.get("head_group"):
        _end_group(int(state["head_group"]))  # the Ray head `up` started, and only it
        shutil.rmtree(_ray_temp_dir(int(state["address"].rpartition(":")[2])), ignore_errors=True)
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
