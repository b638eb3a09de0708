"""Every request gets exactly one answer (lsp_server/protocol.py): raw bytes to a real `dlm-ls serve` over stdio.

A pytest-lsp client only sends well-formed messages; these tests write the frames themselves,
including the malformed ones a fuzzer found unanswered, and read every frame that comes back.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.slow

INIT = {"processId": None, "rootUri": None, "capabilities": {},
        "initializationOptions": {"debounceMs": 0, "warm": False, "speculative": False}}


def frame(body: bytes | str, header: str = "Content-Length") -> bytes:
    body = body.encode() if isinstance(body, str) else body
    return f"{header}: {len(body)}\r\n\r\n".encode() + body


def msg(**fields) -> bytes:
    return frame(json.dumps({"jsonrpc": "2.0", **fields}))


class RawServer:
    def __init__(self, model_dir, run_dir):
        env = {**os.environ, "DLM_LS_RUNTIME_DIR": str(run_dir), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "dlm_ls.lsp_server.cli", "serve", "--model", str(model_dir),
                                      "--device", "cpu", "--in-process"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        self.frames: queue.Queue = queue.Queue()
        self.log = bytearray()  # stderr, drained as it comes: a full pipe would stall the server
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain_log, daemon=True).start()

    def _drain_log(self) -> None:
        for line in self.proc.stderr:
            self.log += line

    def _read(self) -> None:
        out = self.proc.stdout
        while True:
            length = None
            while True:
                line = out.readline()
                if not line:
                    return
                if not line.strip():
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            self.frames.put(json.loads(out.read(length)))

    def send(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def answer(self, msg_id, timeout: float = 30) -> dict:
        """The next response to `msg_id` (notifications and other responses are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.frames.get(timeout=max(0.1, deadline - time.monotonic()))
            if "method" not in got and got.get("id", "missing") == msg_id:
                return got

    def no_more_answers(self, wait: float = 1.0) -> list[dict]:
        time.sleep(wait)
        out = []
        while not self.frames.empty():
            got = self.frames.get()
            if "method" not in got:
                out.append(got)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def server(tiny_model_dir, tmp_path):
    s = RawServer(tiny_model_dir, tmp_path / "run")
    yield s
    s.close()


def initialize(s: RawServer) -> None:
    s.send(msg(id="init", method="initialize", params=INIT))
    assert "result" in s.answer("init")
    s.send(msg(method="initialized", params={}))


def test_requests_before_initialize_get_32002_and_bad_initialize_params_32602(server):
    server.send(msg(id=1, method="textDocument/inlineCompletion", params={}))
    assert server.answer(1)["error"]["code"] == -32002
    server.send(msg(id=2, method="initialize", params={}))
    err = server.answer(2)["error"]
    assert err["code"] == -32602 and "capabilities" in err["message"] and "\n" not in err["message"]
    initialize(server)


@pytest.mark.parametrize("method, params, field", [
    ("textDocument/inlineCompletion", {}, "textDocument"),
    ("textDocument/inlineCompletion", {"textDocument": {"uri": "file:///a.py"}, "position": {"line": -1, "character": 0},
                                       "context": {"triggerKind": 1}}, "line"),
    ("textDocument/codeAction", [], "params"),
    ("workspace/executeCommand", {"command": "dlm.fill", "arguments": 5}, "arguments"),
])
def test_params_that_do_not_fit_get_one_32602_naming_the_field(server, method, params, field):
    initialize(server)
    server.send(msg(id=7, method=method, params=params))
    err = server.answer(7)["error"]
    assert err["code"] == -32602 and field in err["message"] and "\n" not in err["message"], err
    assert "Traceback" not in json.dumps(err)
    assert server.no_more_answers() == []  # exactly one


def test_malformed_messages_are_answered_and_the_server_goes_on(server):
    initialize(server)
    server.send(msg(id=3, method="no/suchMethod", params={}))
    assert server.answer(3)["error"]["code"] == -32601
    server.send(msg(id=None, method="no/suchMethod", params={}))
    reply = server.answer(None)
    assert "id" in reply and reply["id"] is None and "error" in reply  # the member is there, null
    server.send(frame("{not json"))
    assert server.answer(None)["error"]["code"] == -32700
    server.send(frame('{"jsonrpc": "2.0", "id": 4, "method": "x", "params": ' + "[" * 5000 + "]" * 5000 + "}"))
    assert server.answer(None)["error"]["code"] == -32600
    # framing: a lowercase header works; a header block with no length is dropped, and the next message is read
    server.send(msg(id=5, method="dlm/status", params={}).replace(b"Content-Length", b"content-length"))
    assert "result" in server.answer(5)
    server.send(b"X-Garbage: yes\r\n\r\n" + msg(id=6, method="dlm/status", params={}))
    assert "result" in server.answer(6)
    server.send(b"Content-Length: x\r\n\r\n" + msg(id=8, method="dlm/status", params={}))
    assert "result" in server.answer(8)
    # notifications with bad params are dropped without an answer, and the server still answers
    server.send(msg(method="textDocument/didOpen", params={"textDocument": 5}))
    server.send(msg(id=9, method="dlm/status", params={}))
    assert "result" in server.answer(9)


def test_after_shutdown_requests_get_invalid_request_and_exit_ends_the_server(server):
    initialize(server)
    server.send(msg(id="s", method="shutdown"))
    assert server.answer("s")["result"] is None
    server.send(msg(id=10, method="dlm/status", params={}))
    assert server.answer(10)["error"]["code"] == -32600
    server.send(msg(method="exit"))
    assert server.proc.wait(timeout=20) == 0


def test_a_content_length_over_the_limit_ends_the_stream_with_one_clear_line(server):
    initialize(server)
    server.send(b"Content-Length: 1000000000000\r\n\r\n")
    assert server.proc.wait(timeout=20) != 0
    time.sleep(0.2)  # the drain thread reads what is left
    err = server.log.decode()
    assert "over the limit" in err and "maxMessageBytes" in err


def test_a_range_without_an_end_is_invalid_params_and_errors_are_one_line(server):
    initialize(server)
    uri = "file:///w/a.py"
    server.send(msg(method="textDocument/didOpen", params={"textDocument": {
        "uri": uri, "languageId": "python", "version": 1, "text": "def f():\n    <|hole|>\n"}}))
    server.send(msg(id=11, method="dlm/fill", params={"textDocument": {"uri": uri},
                                                      "range": {"start": {"line": 0, "character": 0}}}))
    err = server.answer(11)["error"]
    assert err["code"] == -32602 and "range.end" in err["message"]
    assert "\n" not in err["message"] and "traceback" not in json.dumps(err).lower()
    assert "/" not in err["message"] or "file:///" in err["message"]  # no source paths of ours
    server.send(msg(id=12, method="dlm/status", params={}))
    assert "result" in server.answer(12)


@pytest.mark.parametrize("debug", [False, True])
def test_internal_errors_go_out_as_one_line_and_the_traceback_only_under_debug(debug, caplog):
    from pygls.exceptions import JsonRpcInternalError

    from dlm_ls.lsp_server.config import Settings
    from dlm_ls.lsp_server.server import build_server

    ls = build_server(Settings(log_level="debug" if debug else "info"))
    sent = []
    ls.protocol._send_data = sent.append
    try:
        raise KeyError("end")
    except KeyError:
        error = JsonRpcInternalError.of(sys.exc_info()).to_response_error()
    ls.protocol._send_response(21, None, error)
    (reply,) = sent
    assert reply.error.code == -32603 and reply.error.message == "KeyError: 'end'"
    assert (reply.error.data is not None) == debug
    assert any("Traceback" in r.getMessage() or "raise KeyError" in r.getMessage() for r in caplog.records)


def test_a_notification_method_sent_with_an_id_is_answered_invalid_request(server):
    initialize(server)
    server.send(msg(id=31, method="textDocument/didOpen", params={"textDocument": {
        "uri": "untitled:c", "languageId": "python", "version": 3, "text": "x = 1\n"}}))
    err = server.answer(31)["error"]
    assert err["code"] == -32600 and "notification" in err["message"]
