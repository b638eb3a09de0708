"""Scale-out on Ray Serve (issue 15, item 2): a real local Ray cluster on this CPU, two replicas of the tiny model.

`dlm-ls cluster up` starts it (a Ray head, a Serve application behind a token and TLS with a pair
made here by openssl) and prints the URL;
the tests reach it as editors do, through `ClusterClient`, `dlm-ls complete` and a real `dlm-ls
serve`, and read `dlm-ls cluster status --json`:

- completions through the URL equal the local engine's;
- a document's requests land on one replica, which reuses its context cache;
- a closed stream cancels the replica's job;
- a killed replica is replaced, and its document's next request succeeds elsewhere;
- no token or a wrong one gets `unauthorized`, a client that does not trust the certificate gets
  a clear error, and malformed bodies get clear errors;
- `cluster up` refuses an unsafe set-up before it starts anything.

Slow (a Ray head and two model loads): `make test-cluster`, which installs the `[cluster]` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="the [cluster] extra (ray[serve]) is not installed: make test-cluster")

from dlm_ls.lsp_server.demo import plain  # noqa: E402 - after the skip
from dlm_ls.worker import protocol as rpc  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

TOKEN = "cluster-token-0123456789abcdef"
SEGMENTS = ["import os\n\n\ndef add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"]
FAST = {"canvas_lengths": [4], "max_tokens": 4, "max_steps": 4}
# One token committed per step over the longest canvas: a job of ~1,000 forward passes.
SLOW = {"canvas_lengths": [1024], "max_tokens": 1024, "block_size": 1024, "max_steps": 1024, "threshold": 1.0}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlm_ls.lsp_server.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


class Cluster:
    def __init__(self, url: str, env: dict, folder: Path, token_file: Path, model_dir: Path, cert: Path | None):
        self.url, self.env, self.folder, self.token_file, self.model_dir = url, env, folder, token_file, model_dir
        self.cert = cert  # the self-signed certificate the proxy serves (None: plain HTTP)

    def tls_flags(self) -> list[str]:
        return ["--tls-ca-file", str(self.cert)] if self.cert else []

    def status(self) -> dict:
        out = cli("cluster", "status", "--json", env=self.env, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def replicas(self) -> list[dict]:
        return [r for r in self.status()["replicas"] if r["alive"]]

    def wait_for(self, check, timeout: float = 60.0, what: str = "the cluster") -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if check(status):
                return status
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not reached in {timeout:.0f} s; last status {json.dumps(status)[:2000]}")
            time.sleep(0.5)

    def settings(self, token: str | None = "file", **extra):
        from dlm_ls.lsp_server.config import Settings

        token_file = str(self.token_file) if token == "file" else token
        extra.setdefault("tls_ca_file", str(self.cert) if self.cert else None)
        return Settings(worker=self.url, token_file=token_file, **extra)

    def client(self, token: str | None = "file", **extra):
        from dlm_ls.lsp_server.cluster_client import ClusterClient

        return ClusterClient(self.settings(token, **extra))


def self_signed_pair(folder: Path) -> tuple[Path, Path] | None:
    if shutil.which("openssl") is None:
        return None
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    os.chmod(key, 0o600)
    return cert, key


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    env = {**os.environ, "DLM_LS_RUNTIME_DIR": str(folder / "run"), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
    port, ray_port = free_port(), free_port()
    pair = self_signed_pair(folder)
    tls = ["--tls-cert", str(pair[0]), "--tls-key", str(pair[1])] if pair else []
    up = cli("cluster", "up", "--replicas", "2", "--model", str(tiny_model_dir), "--device", "cpu",
             "--port", str(port), "--ray-port", str(ray_port), "--token-file", str(token_file), *tls, env=env,
             timeout=400)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        url = up.stdout.strip().splitlines()[-1]  # the URL is the last line
        assert url == f"{'https' if pair else 'http'}://127.0.0.1:{port}/dlm", up.stdout
        c = Cluster(url, env, folder, token_file, tiny_model_dir, pair[0] if pair else None)
        c.wait_for(lambda s: len([r for r in s["replicas"] if r["alive"]]) == 2, what="two replicas reporting")
        yield c
    finally:
        down = cli("cluster", "down", env=env, timeout=120)
        print(down.stdout, down.stderr)


def request(rid: str, key: str, overrides: dict = FAST, stream: bool = False):
    return rpc.InfillRequest(list(SEGMENTS), rid, "line", dict(overrides), cache_key=key, stream=stream)


def totals(replicas: list[dict], field: str) -> int:
    return sum(r[field] for r in replicas)


# --------------------------------------------------------------------------- the same answers as the local engine


async def test_completions_through_the_url_equal_the_local_engines(cluster):
    from dlm_ls.lsp_server.worker_client import InProcessBackend

    local = InProcessBackend(cluster.settings(token=None, model=str(cluster.model_dir), device="cpu",
                                              in_process=True))
    remote = cluster.client()
    try:
        for i, key in enumerate(["file:///w/a.py", "file:///w/b.py", None]):
            mine = await local.infill(request(f"local{i}", key))
            theirs = await remote.infill(request(f"remote{i}", key))
            assert theirs.middles == mine.middles and theirs.candidates == mine.candidates
            assert (theirs.nfe, theirs.steps, theirs.canvas_length) == (mine.nfe, mine.steps, mine.canvas_length)
        status = await remote.status()
        assert status["cluster"] == cluster.url and status["info"]["device"] == "cpu" and status["replica"]
    finally:
        await local.close()
        await remote.close()


def test_dlm_ls_complete_through_the_cluster(cluster, tmp_path):
    source = tmp_path / "add.py"
    source.write_text("".join(SEGMENTS))
    args = ["complete", str(source), "--line", "5", "--col", "12", "--worker", cluster.url, "--json",
            "--max-tokens", "4"]
    out = cli(*args, "--token-file", str(cluster.token_file), *cluster.tls_flags(), env=cluster.env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["nfe"] >= 1
    refused = cli(*args, *cluster.tls_flags(), env=cluster.env, timeout=60)  # no token
    assert refused.returncode == 1 and "token" in refused.stderr, refused.stderr


# --------------------------------------------------------------------------- document affinity


async def test_a_documents_requests_land_on_one_replica_and_hit_its_cache(cluster):
    client = cluster.client()
    before = {r["replica"]: r for r in cluster.replicas()}
    try:
        for doc in ("file:///w/affine-1.py", "file:///w/affine-2.py", "file:///w/affine-3.py"):
            start = {r["replica"]: r for r in cluster.wait_for(
                lambda s: totals([r for r in s["replicas"] if r["alive"]], "live") == 0)["replicas"] if r["alive"]}
            for i in range(4):  # four keystrokes' worth of requests for one document
                await client.infill(request(f"{doc}-{i}", doc))
            after = cluster.wait_for(lambda s: sum(r["requests"] for r in s["replicas"] if r["alive"]) >=
                                     totals(start.values(), "requests") + 4, what="the requests counted")
            grew = {r["replica"]: (r["requests"] - start[r["replica"]]["requests"],
                                   r["cache_hits"] - start[r["replica"]]["cache_hits"])
                    for r in after["replicas"] if r["alive"]}
            # All four on one replica; the three after the first reuse the context it computed.
            assert sorted(n for n, _ in grew.values()) == [0, 4], grew
            assert max(h for _, h in grew.values()) >= 3, grew
    finally:
        await client.close()
    after = {r["replica"]: r for r in cluster.replicas()}
    assert totals(after.values(), "documents") >= totals(before.values(), "documents") + 3


# --------------------------------------------------------------------------- a closed stream is a cancel


async def test_a_closed_stream_cancels_the_replicas_job(cluster):
    client = cluster.client()
    start = cluster.replicas()
    first_step = asyncio.Event()
    steps: list[int] = []

    def on_step(update: rpc.StepUpdate) -> None:
        steps.append(update.step)
        first_step.set()

    task = asyncio.create_task(client.infill(request("long", "file:///w/long.py", SLOW, stream=True), on_step))
    await asyncio.wait_for(first_step.wait(), 120)
    task.cancel()  # what the server does when the editor cancels: the stream closes
    with pytest.raises(asyncio.CancelledError):
        await task
    status = cluster.wait_for(lambda s: totals([r for r in s["replicas"] if r["alive"]], "cancelled") >
                              totals(start, "cancelled"), timeout=30, what="the job cancelled")
    alive = [r for r in status["replicas"] if r["alive"]]
    assert totals(alive, "closed_streams") > totals(start, "closed_streams")
    assert totals(alive, "completed") == totals(start, "completed")  # it never finished
    assert max(steps) < 1000  # stopped early: the job had ~1,000 steps to go
    cluster.wait_for(lambda s: totals([r for r in s["replicas"] if r["alive"]], "live") == 0, timeout=30,
                     what="no job left running")
    await client.close()


# --------------------------------------------------------------------------- a replica dies


def test_a_killed_replica_is_replaced_and_its_document_is_served_elsewhere(cluster):
    doc = "file:///w/orphan.py"

    async def complete(rid: str):
        client = cluster.client()
        try:
            return await client.infill(request(rid, doc))
        finally:
            await client.close()

    start = {r["replica"]: r for r in cluster.replicas()}
    asyncio.run(complete("before"))
    served = cluster.wait_for(lambda s: totals([r for r in s["replicas"] if r["alive"]], "requests") >
                              totals(start.values(), "requests"), what="the request counted")
    holder, = [r for r in served["replicas"] if r["alive"] and r["requests"] > start[r["replica"]]["requests"]]
    other, = [r for r in served["replicas"] if r["alive"] and r["replica"] != holder["replica"]]
    # Kill the replica that served the document, as a crash would (no graceful shutdown).
    kill = subprocess.run([sys.executable, "-c", (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR');"
        "ray.kill(ray.get_actor(sys.argv[2], namespace='serve'), no_restart=True)"),
        json.loads(Path(cluster.env["DLM_LS_RUNTIME_DIR"], "cluster.json").read_text())["address"],
        holder["actor"]], env=cluster.env, capture_output=True, text=True, timeout=120)
    assert kill.returncode == 0, kill.stderr
    reply = asyncio.run(complete("after"))  # served by the other replica (after one retry at most)
    assert reply.nfe >= 1
    status = cluster.wait_for(lambda s: s["replica_states"].get("RUNNING") == 2 and
                              len([r for r in s["replicas"] if r["alive"]]) == 2 and
                              holder["replica"] not in [r["replica"] for r in s["replicas"] if r["alive"]],
                              timeout=120, what="a new replica in place of the killed one")
    now = {r["replica"]: r for r in status["replicas"] if r["alive"]}
    # The survivor took the document: one more request, and one more document whose context it computed.
    assert now[other["replica"]]["requests"] >= other["requests"] + 1
    assert now[other["replica"]]["documents_taken"] == other["documents_taken"] + 1
    asyncio.run(complete("again"))  # and the cluster serves on, with its new replica


# --------------------------------------------------------------------------- a real language server


async def test_a_real_server_completes_through_the_cluster(cluster):
    from lsprotocol import types as lsp
    from pytest_lsp import ClientServerConfig, client_capabilities

    config = ClientServerConfig(server_command=[
        sys.executable, "-m", "dlm_ls.lsp_server.cli", "serve", "--worker", cluster.url,
        "--token-file", str(cluster.token_file), *cluster.tls_flags()], server_env=cluster.env)
    client = await config.start()
    try:
        caps = client_capabilities("visual-studio-code")
        caps.text_document.inline_completion = lsp.InlineCompletionClientCapabilities()
        await client.initialize_session(lsp.InitializeParams(capabilities=caps, initialization_options={
            "debounceMs": 0, "canvasLengths": [4], "maxTokens": 4, "maxSteps": 4, "parseFilter": False,
            "cacheEntries": 0, "speculative": False, "warm": False}))
        uri, text = "file:///w/lsp.py", "import os\n\n\ndef add(a, b):\n    return a\n"
        client.text_document_did_open(lsp.DidOpenTextDocumentParams(
            text_document=lsp.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))
        result = await client.protocol.send_request_async(lsp.TEXT_DOCUMENT_INLINE_COMPLETION, lsp.InlineCompletionParams(
            text_document=lsp.TextDocumentIdentifier(uri=uri), position=lsp.Position(line=4, character=12),
            context=lsp.InlineCompletionContext(trigger_kind=lsp.InlineCompletionTriggerKind.Invoked)))
        assert len(result.items) == 1
        status = plain(await client.protocol.send_request_async("dlm/status", {"wait": True}))
        assert status["backend"]["mode"] == "cluster" and status["backend"]["worker"] == cluster.url
        assert status["device"] == "cpu" and status["worker_pid"]
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.shutdown_session(), 30)
        await client.stop()


# --------------------------------------------------------------------------- refusals


async def test_no_token_or_a_wrong_token_is_unauthorized(cluster, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-cluster-token-at-all\n")
    os.chmod(wrong, 0o600)
    start = totals(cluster.replicas(), "requests")
    for token in (None, str(wrong)):
        client = cluster.client(token)
        with pytest.raises(rpc.DlmError) as err:
            await client.infill(request("nope", "file:///w/a.py"))
        assert err.value.code == "unauthorized"
        await client.close()
    time.sleep(2 * 1.0 + 0.5)  # two report periods
    assert totals(cluster.replicas(), "requests") == start  # nothing reached a scheduler


async def test_a_client_that_does_not_trust_the_certificate_gets_a_clear_error(cluster):
    if cluster.cert is None:
        pytest.skip("no openssl: the cluster runs without TLS")
    client = cluster.client(tls_ca_file=None)  # the system's CAs, which never signed the test's pair
    t0 = time.monotonic()
    with pytest.raises(rpc.DlmError) as err:
        await client.infill(request("untrusted", "file:///w/a.py"))
    assert err.value.code == "worker_unavailable" and "certificate" in err.value.message.lower()
    assert time.monotonic() - t0 < 30
    await client.close()


def test_malformed_bodies_and_other_verbs_get_clear_errors(cluster):
    import ssl

    tls = ssl.create_default_context(cafile=str(cluster.cert)) if cluster.cert else None

    def post(body: bytes, method: str = "POST") -> tuple[int, bytes]:
        req = urllib.request.Request(cluster.url, data=body if method == "POST" else None, method=method,
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=30, context=tls) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def error_of(body: bytes) -> dict:
        msg = rpc.decode(body[4:])
        assert msg.kind == rpc.RESPONSE
        return msg.error

    code, body = post(b"\x00\x00")
    assert code == 400 and error_of(body)["code"] == "protocol_error"
    code, body = post(rpc.HEADER.pack(3) + b"\xc1\xc1\xc1")
    assert code == 400 and error_of(body)["code"] == "protocol_error"
    code, body = post(rpc.encode(rpc.request(7, "infill", {"segments": ["only one"]})))
    assert code == 200 and error_of(body)["code"] == "invalid_params"
    code, body = post(rpc.encode(rpc.request(8, "shutdown", {})))
    assert code == 200 and error_of(body)["code"] == "unknown_method"
    code, _ = post(b"", method="GET")
    assert code == 405
    assert len(cluster.replicas()) == 2  # every replica still serving


# --------------------------------------------------------------------------- `cluster up` refuses unsafe set-ups


@pytest.mark.parametrize("case", ["no token off loopback", "no TLS off loopback", "cert without key", "open token"])
def test_cluster_up_refuses_an_unsafe_set_up_before_starting_anything(case, tmp_path, tiny_model_dir):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    os.chmod(token, 0o644 if case == "open token" else 0o600)
    args = {"no token off loopback": ["--host", "0.0.0.0"],
            "no TLS off loopback": ["--host", "0.0.0.0", "--token-file", str(token)],
            "cert without key": ["--tls-cert", str(tmp_path / "cert.pem")],
            "open token": ["--token-file", str(token)]}[case]
    env = {**os.environ, "DLM_LS_RUNTIME_DIR": str(tmp_path / "run"), "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.monotonic()
    out = cli("cluster", "up", "--model", str(tiny_model_dir), "--port", str(free_port()),
              "--ray-port", str(free_port()), *args, env=env, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert {"no token off loopback": "--token-file", "no TLS off loopback": "--insecure",
            "cert without key": "--tls-key", "open token": "0600"}[case] in out.stderr
    assert "starting a local Ray cluster" not in out.stdout and not (tmp_path / "run" / "cluster.json").exists()
    assert time.monotonic() - t0 < 60
