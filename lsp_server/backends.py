"""Which `Backend` serves a server's settings: the engine in this process, the user's own worker or a
team worker over msgpack-RPC (worker_client.py), or a Ray Serve cluster over HTTP (cluster_client.py).

It only chooses; it knows nothing of LSP.
"""

from __future__ import annotations

from ..worker.protocol import WorkerAddress
from .config import Settings
from .worker_client import Backend, InProcessBackend, WorkerClient


def make_backend(settings: Settings) -> Backend:
    if settings.in_process:
        return InProcessBackend(settings)
    if WorkerAddress.parse(settings.worker).cluster:
        from .cluster_client import ClusterClient  # only a cluster's users need it

        return ClusterClient(settings)
    return WorkerClient(settings)
