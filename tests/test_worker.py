"""The worker: its scheduler on a real tiny model, and its socket server as a real process."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dlm_ls.worker import protocol as rpc
from dlm_ls.worker.protocol import DlmError, InfillRequest

FAST = {"canvas_lengths": [4], "max_tokens": 4, "max_steps": 4}
# One token committed per step over a 32-slot canvas: a request that lasts ~32 forward passes.
SLOW = {"canvas_lengths": [32], "max_tokens": 32, "block_size": 32, "max_steps": 32, "threshold": 1.0}
SEGMENTS = ["def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"]


def worker_env() -> dict[str, str]:
    # One thread per process: the suite shares two cores with whatever else runs.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# --------------------------------------------------------------------------- the scheduler, in this process


@pytest.fixture(scope="module")
def infiller(tiny_model_dir):
    import torch

    from dlm_ls.model.infill import Infiller

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as worker_env() does for the worker processes
    yield Infiller(tiny_model_dir, device="cpu")
    torch.set_num_threads(threads)


class Waiter:
    """Collects a request's outcome from the scheduler thread."""

    def __init__(self):
        self.event = threading.Event()
        self.result = self.error = None
        self.steps: list[dict] = []

    def done(self, result, error):
        self.result, self.error = result, error
        self.event.set()

    def wait(self, timeout=60):
        assert self.event.wait(timeout), "the scheduler did not answer"
        return self


@pytest.fixture
def scheduler(infiller):
    from dlm_ls.worker.scheduler import Scheduler

    s = Scheduler(None, infiller=infiller, max_jobs=2)
    s.start()
    yield s
    s.stop()


def test_concurrent_requests_share_each_forward_pass(scheduler):
    a, b = Waiter(), Waiter()
    scheduler.submit("x", InfillRequest.from_wire({"id": "a", "segments": SEGMENTS, "overrides": SLOW}), a.done)
    scheduler.submit("y", InfillRequest.from_wire({"id": "b", "segments": ["x = ", "\n"], "overrides": SLOW}), b.done)
    a.wait(), b.wait()
    assert a.error is None and b.error is None
    status = scheduler.status()
    assert status["max_batch"] == 2
    # Run apart they take a.steps + b.steps forward passes; batched, about max(a.steps, b.steps).
    assert status["counters"]["steps"] < a.result.steps + b.result.steps
    assert set(a.result.to_wire()) >= {"middles", "nfe", "steps", "ms", "canvas_length", "score"}


def test_cancel_takes_effect_between_steps(scheduler):
    w = Waiter()

    def on_step(update):
        w.steps.append(update)
        if update.step == 2:
            scheduler.cancel("x", "slow")

    scheduler.submit("x", InfillRequest.from_wire({"id": "slow", "segments": SEGMENTS, "overrides": SLOW}), w.done, on_step)
    w.wait()
    assert isinstance(w.error, DlmError) and w.error.code == "cancelled"
    assert len(w.steps) <= 3 < SLOW["max_tokens"]
    assert scheduler.status()["live"] == 0


def test_dropped_owner_loses_its_requests_only(scheduler):
    mine, other = Waiter(), Waiter()
    scheduler.submit("gone", InfillRequest.from_wire({"id": "1", "segments": SEGMENTS, "overrides": SLOW}), mine.done)
    scheduler.submit("stays", InfillRequest.from_wire({"id": "1", "segments": SEGMENTS, "overrides": FAST}), other.done)
    scheduler.drop_owner("gone")
    assert mine.wait().error.code == "cancelled"
    assert other.wait().error is None


def test_bad_requests_get_clear_errors_and_busy_when_full(scheduler):
    bad = Waiter()
    scheduler.submit("x", InfillRequest.from_wire({"id": "b", "segments": SEGMENTS, "overrides": {"temperature": -1}}), bad.done)
    assert bad.wait().error.code == "infill_error" and "temperature" in str(bad.error)
    waiters = [Waiter() for _ in range(3)]
    for i, w in enumerate(waiters):
        scheduler.submit("x", InfillRequest.from_wire({"id": str(i), "segments": SEGMENTS, "overrides": SLOW}), w.done)
    errors = [w.wait().error for w in waiters]
    assert [e.code for e in errors if e is not None] == ["busy"]  # max_jobs=2


def test_per_client_limits_queue_then_refuse_and_waiting_requests_can_be_cancelled(infiller):
    from dlm_ls.worker.scheduler import Scheduler

    # One live request per client, 40 waiting canvas slots: a SLOW request holds 32 of them.
    s = Scheduler(None, infiller=infiller, max_jobs=8, max_client_jobs=1, max_client_slots=40)
    s.start()
    try:
        first, second, third, cancelled, other = (Waiter() for _ in range(5))
        for rid, w in (("1", first), ("2", second), ("3", third)):
            s.submit("greedy", InfillRequest.from_wire({"id": rid, "segments": SEGMENTS, "overrides": SLOW}), w.done)
        s.submit("modest", InfillRequest.from_wire({"id": "m", "segments": SEGMENTS, "overrides": FAST}), other.done)
        assert third.wait().error.code == "busy" and "per-client limits" in str(third.error)
        assert other.wait().error is None  # started beside the greedy client's one live request
        assert first.wait().error is None and second.wait().error is None  # the waiting one ran in its turn
        s.submit("greedy", InfillRequest.from_wire({"id": "4", "segments": SEGMENTS, "overrides": SLOW}), Waiter().done)
        s.submit("greedy", InfillRequest.from_wire({"id": "5", "segments": SEGMENTS, "overrides": SLOW}),
                 cancelled.done)
        s.cancel("greedy", "5")
        assert cancelled.wait().error.code == "cancelled"
        asked = Waiter()
        s.control("status", {}, asked.done)
        greedy = next(c for c in asked.wait().result["clients"] if c["requests"] == 5)
        assert (greedy["busy"], greedy["queued"], greedy["most_live"]) == (1, 2, 1)
        assert greedy["completed"] >= 2 and greedy["waiting"] == 0 and greedy["waiting_slots"] == 0
    finally:
        s.stop()


def test_status_and_warm(scheduler):
    w = Waiter()
    scheduler.control("warm", {"cache_key": "file:///a.py", "segments": SEGMENTS}, w.done)
    assert w.wait().error is None
    s = Waiter()
    scheduler.control("status", {}, s.done)
    status = s.wait().result
    assert status["pid"] == os.getpid() and status["info"]["device"] == "cpu"
    assert status["cache"]["entries"] >= 1


# --------------------------------------------------------------------------- the worker process


class RawLink:
    """A bare msgpack-RPC connection, to send the worker exactly the bytes a test wants."""

    def __init__(self, reader, writer):
        self.reader, self.writer, self.next_id = reader, writer, 0

    @classmethod
    async def open(cls, path: Path) -> "RawLink":
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(self, method: str, params, **kw) -> int:
        self.next_id += 1
        await self.send_raw(rpc.encode(rpc.request(self.next_id, method, params), **kw))
        return self.next_id

    async def receive(self, timeout: float = 60) -> rpc.Message:
        body = await asyncio.wait_for(rpc.read_frame(self.reader, 1 << 26), timeout)
        assert body is not None, "the worker closed the connection"
        return rpc.decode(body)

    async def call(self, method: str, params=None, timeout: float = 60) -> rpc.Message:
        msgid = await self.request(method, params if params is not None else {})
        while True:
            msg = await self.receive(timeout)
            if msg.kind == rpc.RESPONSE and msg.msgid == msgid:
                return msg

    def close(self) -> None:
        self.writer.close()


def start_worker(model_dir: Path, sock: Path, idle: float) -> subprocess.Popen:
    sock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = open(sock.with_suffix(".log"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "dlm_ls.lsp_server.cli", "worker", "--model", str(model_dir),
                             "--device", "cpu", "--socket", str(sock), "--idle-timeout", str(idle)],
                            stdout=log, stderr=log, env=worker_env())
    deadline = time.monotonic() + 120
    while not sock.exists():
        assert proc.poll() is None, sock.with_suffix(".log").read_text()
        assert time.monotonic() < deadline, "the worker did not come up"
        time.sleep(0.05)
    return proc


@pytest.fixture(scope="module")
def worker(tiny_model_dir, tmp_path_factory):
    sock = tmp_path_factory.mktemp("wrk") / "w.sock"
    proc = start_worker(tiny_model_dir, sock, idle=300)
    yield proc, sock
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


async def test_socket_is_private_and_pid_file_written(worker):
    proc, sock = worker
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
    assert sock.with_suffix(".pid").read_text().strip() == str(proc.pid)


async def test_infill_streams_refinement_steps(worker):
    link = await RawLink.open(worker[1])
    msgid = await link.request("infill", {"id": "s", "segments": SEGMENTS, "overrides": FAST, "stream": True})
    steps = []
    while True:
        msg = await link.receive()
        if msg.kind == rpc.NOTIFY:
            assert msg.method == "refinement" and msg.params["id"] == "s"
            steps.append(msg.params)
        else:
            break
    assert msg.msgid == msgid and msg.error is None
    assert [s["step"] for s in steps] == list(range(1, msg.result["steps"] + 1))
    assert "\u2591" in steps[0]["text"][0] or msg.result["steps"] == 1
    link.close()


async def test_malformed_unknown_and_oversized_get_clear_errors(worker):
    link = await RawLink.open(worker[1])
    await link.send_raw(rpc.HEADER.pack(3) + b"\xc1\xc1\xc1")  # a frame that is not msgpack
    msg = await link.receive()
    assert msg.kind == rpc.NOTIFY and msg.method == "error" and msg.params["code"] == "protocol_error"

    msg = await link.call("no_such_method", {})
    assert msg.error["code"] == "unknown_method" and "infill" in msg.error["message"]

    msg = await link.call("infill", {"segments": "not a list"})
    assert msg.error["code"] == "invalid_params"

    big = await link.request("infill", {"segments": ["x" * (rpc.MAX_FRAME_BYTES + 10), ""]},
                             max_bytes=rpc.MAX_FRAME_BYTES * 2)
    msg = await link.receive()
    assert (msg.msgid, msg.error["code"]) == (big, "too_large") and "limit" in msg.error["message"]

    msg = await link.call("ping")  # the same connection still works
    assert msg.result["pid"] == worker[0].pid
    link.close()


async def test_oversized_requests_from_a_socket_client_are_refused_before_any_allocation(worker):
    """A client that bypasses the language server meets the same limits (worker/protocol.py LIMITS)."""
    link = await RawLink.open(worker[1])
    before = (await link.call("status")).result["counters"].get("requests", 0)
    cases = [({"max_tokens": 5000}, "overrides.max_tokens is 5000, above the limit max_tokens=1024"),
             ({"canvas_lengths": [1 << 20]}, "overrides.canvas_lengths[0] is 1048576, above the limit "
                                             "max_canvas_length=1024"),
             ({"canvas_lengths": [4] * 100}, "the number of overrides.canvas_lengths is 100, above the limit "
                                             "max_canvas_lengths=8"),
             ({"max_steps": 1 << 40}, f"overrides.max_steps is {1 << 40}, above the limit max_steps=1024"),
             ({"seed": "x"}, "overrides.seed must be an integer from 0 to 2**63-1, not 'x'")]
    for overrides, message in cases:
        msg = await link.call("infill", {"segments": SEGMENTS, "overrides": overrides})
        assert msg.error == {"code": "invalid_params", "message": message}
    msg = await link.call("infill", {"segments": ["x"] * 50})
    assert msg.error["message"] == "the number of holes is 49, above the limit max_holes=8"
    msg = await link.call("warm", {"cache_key": "k", "segments": ["x"] * 50})
    assert msg.error["code"] == "invalid_params" and "max_holes=8" in msg.error["message"]
    status = (await link.call("status")).result
    assert status["counters"].get("requests", 0) == before  # none reached the scheduler
    msg = await link.call("infill", {"segments": SEGMENTS, "overrides": {**FAST, "seed": 3}})
    assert msg.error is None and msg.result["middles"]
    link.close()


async def test_client_disconnecting_mid_request_is_survived_and_its_job_cancelled(worker):
    probe = await RawLink.open(worker[1])
    before = (await probe.call("status")).result["counters"].get("cancelled", 0)
    link = await RawLink.open(worker[1])
    await link.request("infill", {"id": "gone", "segments": SEGMENTS, "overrides": SLOW, "stream": True})
    await link.receive()  # the first refinement step: the job is live
    link.writer.transport.abort()
    for _ in range(100):
        status = (await probe.call("status")).result
        if status["counters"].get("cancelled", 0) > before:
            break
        await asyncio.sleep(0.05)
    assert status["counters"]["cancelled"] == before + 1 and status["live"] == 0
    msg = await probe.call("infill", {"id": "after", "segments": SEGMENTS, "overrides": FAST})
    assert msg.error is None
    probe.close()


async def test_cancel_method_stops_a_request(worker):
    link = await RawLink.open(worker[1])
    job = await link.request("infill", {"id": "c1", "segments": SEGMENTS, "overrides": SLOW, "stream": True})
    await link.receive()
    cancel = await link.request("cancel", {"id": "c1"})
    answers = {}
    while len(answers) < 2:
        msg = await link.receive()
        if msg.kind == rpc.RESPONSE:
            answers[msg.msgid] = msg
    assert answers[job].error["code"] == "cancelled"
    assert answers[cancel].result == {"cancelled": True}
    link.close()


def test_second_worker_on_a_live_socket_refuses_quickly(worker, tiny_model_dir):
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "dlm_ls.lsp_server.cli", "worker", "--model", str(tiny_model_dir),
                          "--socket", str(worker[1])], capture_output=True, text=True, env=worker_env(), timeout=120)
    assert out.returncode == 1 and "already serves" in out.stderr and "Traceback" not in out.stderr
    assert time.monotonic() - t0 < 30


def test_worker_exits_after_idle_timeout(tiny_model_dir, tmp_path):
    sock = tmp_path / "idle" / "w.sock"
    proc = start_worker(tiny_model_dir, sock, idle=1.5)
    assert proc.wait(60) == 0
    assert not sock.exists() and not sock.with_suffix(".pid").exists()
    assert "idle for 1.5 s" in sock.with_suffix(".log").read_text()


def test_captured_step_setting_reaches_the_engine(tiny_model_dir):
    """--captured-step / capturedStep: the worker's engine steps at bucketed shapes (eagerly on a CPU)."""
    from dlm_ls.lsp_server.config import Settings
    from dlm_ls.worker.scheduler import Scheduler

    settings, problems = Settings().merged({"capturedStep": True})
    assert not problems and settings.captured_step
    s = Scheduler(str(tiny_model_dir), device="cpu", max_jobs=2, captured_step=settings.captured_step)
    s.start()
    try:
        w = Waiter()
        s.submit("x", InfillRequest.from_wire({"id": "a", "segments": SEGMENTS, "overrides": FAST}), w.done)
        assert w.wait().error is None and w.result.nfe >= 1
        stats = s.inf.info()["captured_step"]
        assert stats["eager"] == w.result.nfe and stats["capture"] is False
    finally:
        s.stop()


# --------------------------------------------------------------------------- the standby spare


def _gone(pid: int) -> bool:
    """No such process, or one that has exited (a zombie waiting for a parent that is not us)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


async def test_spare_takes_over_after_kill_9_and_the_next_completion_succeeds(tiny_model_dir, tmp_path, monkeypatch):
    from dlm_ls.lsp_server.config import Settings
    from dlm_ls.lsp_server.worker_client import WorkerClient
    from dlm_ls.worker.protocol import InfillRequest

    for key, value in worker_env().items():
        monkeypatch.setenv(key, value)
    settings, problems = Settings().merged({"model": str(tiny_model_dir), "device": "cpu"})
    assert not problems
    client = WorkerClient(settings)
    try:
        assert (await client.infill(InfillRequest(SEGMENTS, id="before", mode="line", overrides=FAST))).nfe >= 1
        before = await client.status()
        worker_pid, spare_pid = before["pid"], before["spare_pid"]
        assert spare_pid not in (None, worker_pid) and not _gone(spare_pid)

        os.kill(worker_pid, signal.SIGKILL)
        after = await client.infill(InfillRequest(SEGMENTS, id="after", mode="line", overrides=FAST))  # mid-session
        assert after.nfe >= 1  # the connection broke under us, and the spare answered
        status = await client.status()
        assert status["pid"] == spare_pid  # the spare serves: no second worker was started
        assert client.restarts == 1 and not client.spawned  # the killed worker was reaped, no other started
        log = client.endpoint.log_file.read_text()
        assert log.count("listening on") == 2 and f"worker pid {spare_pid} listening" in log
        assert status["spare_pid"] not in (None, spare_pid) and not _gone(status["spare_pid"])  # and has a spare
        assert not Path(f"/proc/{worker_pid}").exists()  # reaped by the client that started it

        new_spare = status["spare_pid"]
        await client.call("shutdown")
        assert _wait_gone(spare_pid) and _wait_gone(new_spare)  # a clean exit takes its spare along
        assert not client.endpoint.socket.exists()
    finally:
        await client.close()


def test_clean_exit_leaves_no_spare_and_a_spare_never_replaces_a_worker_that_never_served(tiny_model_dir, tmp_path):
    from dlm_ls.worker import standby

    sock = tmp_path / "clean" / "w.sock"
    proc = start_worker(tiny_model_dir, sock, idle=300)
    link_status = asyncio.run(_status(sock))
    spare = link_status["spare_pid"]
    assert spare is not None and not _gone(spare) and standby.spare_waiting(sock)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert _gone(spare) and not Path(f"/proc/{spare}").exists()  # the worker reaped it
    assert not standby.spare_waiting(sock) and not sock.exists()

    # A worker killed before it ever listened (here: a model folder that is not one) is not replaced.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    out = subprocess.run([sys.executable, "-m", "dlm_ls.lsp_server.cli", "worker", "--model", str(bad),
                          "--device", "cpu", "--socket", str(tmp_path / "bad-run" / "w.sock")],
                         capture_output=True, text=True, env=worker_env(), timeout=120)
    assert out.returncode == 1 and "takes over" not in out.stderr
    assert not standby.spare_waiting(tmp_path / "bad-run" / "w.sock")


async def _status(sock: Path) -> dict:
    link = await RawLink.open(sock)
    try:
        msg = await link.call("status")
        assert msg.error is None, msg.error
        return msg.result
    finally:
        link.close()


def test_cpu_threads_default_leaves_cores_free_and_the_flag_reaches_the_engine(tiny_model_dir, tmp_path):
    """Half the cores, at most 4: on 2 cores one thread, since a second thread that shares a core
    with anything busy makes every op wait (python -m dlm_ls.bench.threads)."""
    from dlm_ls.worker.config import WorkerConfig, default_cpu_threads

    assert [default_cpu_threads(n) for n in (1, 2, 3, 4, 8, 64)] == [1, 1, 1, 2, 4, 4]
    assert WorkerConfig().cpu_threads() == default_cpu_threads() and WorkerConfig(threads=3).cpu_threads() == 3
    assert WorkerConfig(threads=3).to_argv() == ["--threads", "3"] and WorkerConfig.from_argv(["--threads", "2"]).threads == 2

    sock = tmp_path / "threads" / "w.sock"
    proc = subprocess.Popen([sys.executable, "-m", "dlm_ls.lsp_server.cli", "worker", "--model", str(tiny_model_dir),
                             "--device", "cpu", "--socket", str(sock), "--threads", "2", "--no-spare"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=worker_env())
    try:
        deadline = time.monotonic() + 120
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the worker did not come up"
            time.sleep(0.05)
        assert asyncio.run(_status(sock))["threads"] == 2
    finally:
        proc.terminate()
        proc.wait(30)
