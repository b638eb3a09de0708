"""A team worker on TCP (issue 15, item 1): real worker processes on 127.0.0.1, real sockets, the tiny model.

Authentication first (no token and a wrong token get one error and a closed connection, and never
reach the scheduler), the right token over a raw link, the client and `dlm-ls complete`, TLS with a
pair made here by openssl, fairness between a greedy and a modest client, a real `dlm-ls serve`
reconnecting after the worker restarts, and the start-up refusals (a 0644 token file, plain TCP
off loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlm_ls.lsp_server.demo import plain  # pygls hands custom results over as namedtuples
from dlm_ls.worker import protocol as rpc

pytestmark = pytest.mark.slow

TOKEN = "team-token-0123456789abcdef"
FAST = {"canvas_lengths": [4], "max_tokens": 4, "max_steps": 4}
# One token committed per step over a 32-slot canvas: a request that lasts ~32 forward passes.
SLOW = {"canvas_lengths": [32], "max_tokens": 32, "block_size": 32, "max_steps": 32, "threshold": 1.0}
SEGMENTS = ["def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"]


def worker_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token_file(folder: Path, token: str = TOKEN, mode: int = 0o600) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "token"
    path.write_text(token + "\n")
    os.chmod(path, mode)
    return path


def worker_cmd(model_dir: Path, folder: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dlm_ls.lsp_server.cli", "worker", "--model", str(model_dir), "--device", "cpu",
            "--socket", str(folder / "w.sock"), *extra]


class TeamWorker:
    def __init__(self, model_dir: Path, folder: Path, port: int, *extra: str):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.folder, self.port = folder, port
        self.log = folder / "worker.log"
        start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(worker_cmd(model_dir, folder, "--listen", f"127.0.0.1:{port}", *extra),
                                         stdout=log, stderr=log, env=worker_env())
        deadline = time.monotonic() + 120
        while "serving a team on" not in self.log.read_text()[start:]:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the team worker did not come up"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(30)


class Link:
    """A bare msgpack-RPC connection over TCP, to send the worker exactly what a test wants."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer, self.next_id = reader, writer, 0

    @classmethod
    async def open(cls, port: int, tls=None) -> "Link":
        return cls(*await asyncio.open_connection("127.0.0.1", port, ssl=tls))

    async def request(self, method: str, params) -> int:
        self.next_id += 1
        self.writer.write(rpc.encode(rpc.request(self.next_id, method, params)))
        await self.writer.drain()
        return self.next_id

    async def receive(self, timeout: float = 60) -> rpc.Message | None:
        body = await asyncio.wait_for(rpc.read_frame(self.reader, 1 << 26), timeout)
        return None if body is None else rpc.decode(body)

    async def call(self, method: str, params=None, timeout: float = 60) -> rpc.Message:
        msgid = await self.request(method, params if params is not None else {})
        while True:
            msg = await self.receive(timeout)
            assert msg is not None, "the worker closed the connection"
            if msg.kind == rpc.RESPONSE and msg.msgid == msgid:
                return msg

    async def closed_by_peer(self, timeout: float = 10) -> bool:
        with contextlib.suppress(ConnectionError):
            return await asyncio.wait_for(self.reader.read(), timeout) == b""
        return True

    def close(self) -> None:
        self.writer.close()


async def authed(port: int, tls=None, token: str = TOKEN) -> Link:
    link = await Link.open(port, tls)
    msg = await link.call("hello", {"token": token, "client": "test"})
    assert msg.error is None, msg.error
    return link


@pytest.fixture(scope="module")
def team(tiny_model_dir, tmp_path_factory):
    """One plain-TCP team worker on loopback: 6 jobs in all, 2 per connection; a 1 s hello deadline."""
    folder = tmp_path_factory.mktemp("team")
    w = TeamWorker(tiny_model_dir, folder, free_port(), "--token-file", str(token_file(folder / "secret")),
                   "--max-jobs", "6", "--max-client-jobs", "2", "--hello-timeout", "1")
    w.token_file = folder / "secret" / "token"
    yield w
    w.stop()


# --------------------------------------------------------------------------- authentication


async def test_no_token_or_a_wrong_token_gets_one_error_and_nothing_else(team):
    probe = await authed(team.port)
    before = (await probe.call("status")).result["counters"].get("requests", 0)

    attempts = [
        ("a request before hello", "infill", {"segments": SEGMENTS, "overrides": FAST}),
        ("a wrong token", "hello", {"token": "team-token-0123456789abcdeX"}),
        ("no token", "hello", {"client": "me"}),
        ("a token of another type", "hello", {"token": 12345}),
    ]
    for what, method, params in attempts:
        link = await Link.open(team.port)
        msgid = await link.request(method, params)
        await link.request("infill", {"segments": SEGMENTS, "overrides": FAST})  # never read
        msg = await link.receive()
        assert msg.kind == rpc.RESPONSE and msg.msgid == msgid, what
        assert msg.error["code"] == "unauthorized" and msg.result is None, what
        assert await link.receive() is None, f"{what}: one error, then the connection closes"
        link.close()

    silent = await Link.open(team.port)  # says nothing: closed at the hello deadline
    t0 = time.monotonic()
    msg = await silent.receive(10)
    assert msg.kind == rpc.NOTIFY and msg.params["code"] == "unauthorized" and "no hello" in msg.params["message"]
    assert await silent.closed_by_peer() and time.monotonic() - t0 < 5

    huge = await Link.open(team.port)  # a first frame above the hello cap is not even read
    huge.writer.write(rpc.HEADER.pack(64 << 20) + b"\x94")
    msg = await huge.receive()
    assert "above the limit hello_bytes" in msg.params["message"] and await huge.closed_by_peer()

    status = (await probe.call("status")).result
    assert status["counters"].get("requests", 0) == before  # none of them reached the scheduler
    assert status["connections"] == 1 and status["clients"] == []  # only the probe, which asked for no job
    assert team.log.read_text().count("refused: ") >= 6
    probe.close()


async def test_the_right_token_completes_and_shutdown_is_refused_over_tcp(team):
    link = await authed(team.port)
    msg = await link.call("infill", {"id": "t1", "segments": SEGMENTS, "overrides": FAST})
    assert msg.error is None and msg.result["middles"] and msg.result["nfe"] >= 1
    msg = await link.call("shutdown")
    assert msg.error["code"] == "unauthorized" and "refused over TCP" in msg.error["message"]
    status = (await link.call("status")).result
    assert status["listen"] == f"tcp://127.0.0.1:{team.port}" and status["idle_timeout_s"] is None
    mine = [c for c in status["clients"] if c["client"].endswith(" test")]
    assert len(mine) == 1 and mine[0]["completed"] == 1 and mine[0]["client"].startswith("127.0.0.1:")
    link.close()
    assert team.proc.poll() is None


async def test_the_client_reaches_a_team_worker_with_its_token(team, tmp_path):
    from dlm_ls.lsp_server.config import Settings
    from dlm_ls.lsp_server.worker_client import WorkerClient
    from dlm_ls.worker.protocol import DlmError, InfillRequest

    url = f"tcp://127.0.0.1:{team.port}"
    client = WorkerClient(Settings(worker=url, token_file=str(team.token_file)))
    try:
        reply = await client.infill(InfillRequest(SEGMENTS, "c1", overrides=FAST))
        assert reply.middles and reply.nfe >= 1
        assert client.describe() == {"mode": "worker", "worker": url, "restarts": 0}
        status = await client.status()
        assert any(c["client"].endswith(f"pid {os.getpid()}") for c in status["clients"])
    finally:
        await client.close()

    wrong = WorkerClient(Settings(worker=url, token_file=str(token_file(tmp_path, "not-the-team-token-at-all"))))
    with pytest.raises(DlmError) as err:
        await wrong.infill(InfillRequest(SEGMENTS, "c2", overrides=FAST))
    assert err.value.code == "unauthorized" and "tokenFile" in err.value.message
    await wrong.close()

    none = WorkerClient(Settings(worker=url))
    with pytest.raises(DlmError, match="needs a token"):
        await none.status()


def test_dlm_ls_complete_through_a_team_worker(team, tmp_path):
    source = tmp_path / "add.py"
    source.write_text("def add(a, b):\n    return \n")
    out = subprocess.run([sys.executable, "-m", "dlm_ls.lsp_server.cli", "complete", str(source), "--line", "2",
                          "--col", "12", "--json", "--no-parse-filter", "--max-tokens", "4",
                          "--worker", f"tcp://127.0.0.1:{team.port}", "--token-file", str(team.token_file)],
                         capture_output=True, text=True, env=worker_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["nfe"] >= 1 and answer["suggestion"] is not None
    assert not list((tmp_path).glob("*.sock"))  # nothing local was started

    bad = subprocess.run([sys.executable, "-m", "dlm_ls.lsp_server.cli", "complete", str(source), "--line", "2",
                          "--col", "12", "--worker", f"tcp://127.0.0.1:{team.port}", "--token-file",
                          str(token_file(tmp_path / "wrong", "a-wrong-token-of-some-length"))],
                         capture_output=True, text=True, env=worker_env(), timeout=120)
    assert bad.returncode == 1 and "refused us" in bad.stderr and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------- fairness


async def test_a_greedy_client_does_not_starve_a_modest_one(team):
    greedy, modest = await authed(team.port), await authed(team.port)
    flood = [await greedy.request("infill", {"id": f"g{i}", "segments": SEGMENTS, "overrides": SLOW})
             for i in range(12)]
    await asyncio.sleep(0.3)  # the flood is in: 2 live, the rest waiting their turn

    # The modest client's requests start at once, beside the greedy client's two.
    for i in range(3):
        msg = await modest.call("infill", {"id": f"m{i}", "segments": SEGMENTS, "overrides": FAST})
        assert msg.error is None, msg.error
    answers = {}
    while len(answers) < len(flood):
        msg = await greedy.receive(120)
        if msg.kind == rpc.RESPONSE:
            answers[msg.msgid] = msg
    assert all(m.error is None for m in answers.values())  # the greedy client progressed too: all done
    status = (await modest.call("status")).result
    greedy_share, modest_share = sorted((c for c in status["clients"] if c["requests"] in (3, 12)),
                                        key=lambda c: -c["requests"])
    assert (greedy_share["completed"], greedy_share["most_live"]) == (12, 2) and greedy_share["queued"] >= 1
    assert (modest_share["completed"], modest_share.get("busy", 0), modest_share.get("queued", 0)) == (3, 0, 0)
    greedy.close(), modest.close()


# --------------------------------------------------------------------------- TLS


@pytest.fixture
def tls_pair(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    os.chmod(key, 0o600)
    return cert, key


async def test_tls_with_a_self_signed_pair(tiny_model_dir, tmp_path, tls_pair):
    import ssl

    from dlm_ls.lsp_server.config import Settings
    from dlm_ls.lsp_server.worker_client import WorkerClient
    from dlm_ls.worker.protocol import DlmError, InfillRequest

    cert, key = tls_pair
    secret = token_file(tmp_path / "secret")
    w = TeamWorker(tiny_model_dir, tmp_path / "tls", free_port(), "--token-file", str(secret),
                   "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        client = WorkerClient(Settings(worker=f"tls://127.0.0.1:{w.port}", token_file=str(secret),
                                       tls_ca_file=str(cert)))
        reply = await client.infill(InfillRequest(SEGMENTS, "t1", overrides=FAST))
        assert reply.middles and reply.nfe >= 1
        assert (await client.status())["listen"] == f"tls://127.0.0.1:{w.port}"
        await client.close()

        # The raw link, with the same certificate: the hello rule holds inside TLS too.
        link = await Link.open(w.port, ssl.create_default_context(cafile=str(cert)))
        await link.request("hello", {"token": "wrong-token-0123456789"})
        assert (await link.receive()).error["code"] == "unauthorized" and await link.closed_by_peer()

        unchecked = WorkerClient(Settings(worker=f"tls://127.0.0.1:{w.port}", token_file=str(secret)))
        with pytest.raises(DlmError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            await unchecked.status()  # a self-signed certificate is not trusted without tlsCaFile
        plain = WorkerClient(Settings(worker=f"tcp://127.0.0.1:{w.port}", token_file=str(secret)))
        with pytest.raises(DlmError) as err:
            await asyncio.wait_for(plain.status(), 30)
        assert err.value.code == "worker_unavailable"
    finally:
        w.stop()


# --------------------------------------------------------------------------- start-up refusals


@pytest.mark.parametrize("case", ["0644 token", "plain TCP off loopback", "cert without key", "no token file"])
def test_a_team_worker_refuses_to_start_on_a_bad_set_up(tiny_model_dir, tmp_path, case):
    secret = token_file(tmp_path / "s", mode=0o644 if case == "0644 token" else 0o600)
    port = str(free_port())
    extra = {"0644 token": ["--listen", f"127.0.0.1:{port}", "--token-file", str(secret)],
             "plain TCP off loopback": ["--listen", f"0.0.0.0:{port}", "--token-file", str(secret)],
             "cert without key": ["--listen", f"127.0.0.1:{port}", "--token-file", str(secret), "--tls-cert", "c.pem"],
             "no token file": ["--listen", f"127.0.0.1:{port}"]}[case]
    expected = {"0644 token": f"token file {secret} has mode 0644; it must be 0600",
                "plain TCP off loopback": "refusing plain TCP on 0.0.0.0, which is not loopback",
                "cert without key": "--tls-cert and --tls-key go together",
                "no token file": "--listen needs --token-file"}[case]
    t0 = time.monotonic()
    out = subprocess.run(worker_cmd(tiny_model_dir, tmp_path, *extra), capture_output=True, text=True,
                         env=worker_env(), timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and expected in lines[0] and "Traceback" not in out.stderr
    assert lines[0].startswith("dlm-ls worker: error: ")
    assert time.monotonic() - t0 < 30  # refused before the model loads
    assert not (tmp_path / "w.sock").exists()


# --------------------------------------------------------------------------- the editor side reconnects


async def test_a_real_server_reconnects_after_the_team_worker_restarts(tiny_model_dir, tmp_path):
    from lsprotocol import types as lsp
    from pytest_lsp import ClientServerConfig, client_capabilities

    secret = token_file(tmp_path / "secret")
    port = free_port()
    # No spare: this is the worker going away for good (a restart by hand), not a crash its spare covers.
    first = TeamWorker(tiny_model_dir, tmp_path / "w", port, "--token-file", str(secret), "--no-spare")
    env = {**worker_env(), "DLM_LS_RUNTIME_DIR": str(tmp_path / "run")}
    config = ClientServerConfig(server_command=[
        sys.executable, "-m", "dlm_ls.lsp_server.cli", "serve", "--worker", f"tcp://127.0.0.1:{port}",
        "--token-file", str(secret)], server_env=env)
    client = await config.start()
    second = None
    try:
        caps = client_capabilities("visual-studio-code")
        caps.text_document.inline_completion = lsp.InlineCompletionClientCapabilities()
        await client.initialize_session(lsp.InitializeParams(capabilities=caps, initialization_options={
            "debounceMs": 0, "canvasLengths": [4], "maxTokens": 4, "maxSteps": 4, "parseFilter": False,
            "cacheEntries": 0, "speculative": False, "warm": False}))  # every completion asks the worker
        uri, text = "file:///w/team.py", "import os\n\n\ndef add(a, b):\n    return a\n"
        client.text_document_did_open(lsp.DidOpenTextDocumentParams(
            text_document=lsp.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))
        at = lsp.Position(line=4, character=len("    return a"))

        async def complete():
            return await client.protocol.send_request_async(lsp.TEXT_DOCUMENT_INLINE_COMPLETION,
                                                            lsp.InlineCompletionParams(
                text_document=lsp.TextDocumentIdentifier(uri=uri), position=at,
                context=lsp.InlineCompletionContext(trigger_kind=lsp.InlineCompletionTriggerKind.Invoked)))

        assert len((await complete()).items) == 1
        first.stop(signal.SIGKILL)
        second = TeamWorker(tiny_model_dir, tmp_path / "w", port, "--token-file", str(secret), "--no-spare")
        for _ in range(20):  # the first call after the restart may still meet the dead connection
            with contextlib.suppress(Exception):
                if len((await complete()).items) == 1:
                    break
            await asyncio.sleep(0.5)
        else:
            pytest.fail("no completion after the worker restarted")
        status = await client.protocol.send_request_async("dlm/status", {"wait": True})
        status = plain(status)
        assert status["worker_pid"] == second.proc.pid and status["worker"]["counters"]["completed"] == 1
        assert status["backend"]["worker"] == f"tcp://127.0.0.1:{port}" and status["backend"]["restarts"] >= 1
        assert [c["live"] for c in status["worker"]["clients"]] == [0]  # the per-client counts, in dlm/status
        assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("*.sock"))  # none spawned
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.shutdown_session(), 30)
        await client.stop()
        first.stop()
        if second is not None:
            second.stop()


async def test_a_killed_team_worker_is_replaced_by_its_spare_on_the_same_port(tiny_model_dir, tmp_path):
    """kill -9 of a team worker: its standby spare (worker/standby.py) loads the model and listens on the
    same TCP port with the same token, so the team's clients reconnect without anyone restarting it."""
    secret = token_file(tmp_path / "secret")
    port = free_port()
    worker = TeamWorker(tiny_model_dir, tmp_path / "w", port, "--token-file", str(secret))
    try:
        link = await authed(port)
        before = (await link.call("status")).result
        spare = before["spare_pid"]
        assert spare not in (None, worker.proc.pid) and before["listen"] == f"tcp://127.0.0.1:{port}"
        link.close()
        worker.stop(signal.SIGKILL)
        deadline = time.monotonic() + 120
        while True:  # the spare binds the port once its model is loaded
            with contextlib.suppress(OSError, AssertionError, asyncio.TimeoutError):
                link = await authed(port)
                break
            assert time.monotonic() < deadline, "the spare never served the team port"
            await asyncio.sleep(0.1)
        try:
            reply = await link.call("infill", {"id": "after", "segments": SEGMENTS, "overrides": FAST})
            assert reply.error is None and reply.result["nfe"] >= 1
            after = (await link.call("status")).result
            assert after["pid"] == spare and after["listen"] == before["listen"]
            wrong = await Link.open(port)
            assert (await wrong.call("hello", {"token": "not-the-token", "client": "test"})).error is not None
            wrong.close()
        finally:
            link.close()
    finally:
        worker.stop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(spare, signal.SIGTERM)  # the spare serves now; its own spare goes with it
