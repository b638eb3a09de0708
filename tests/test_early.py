"""A repeated `initialize` answered before pygls is imported (lsp_server/early.py): framing and replay,
the key, the private-folder rules, and real starts over stdio that answer once and identically."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlm_ls.lsp_server import early

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"processId": 111, "rootUri": None, "capabilities": {"textDocument": {"inlineCompletion": {}}}}}


def framed(message: dict, header: bytes = b"Content-Length") -> bytes:
    body = json.dumps(message).encode()
    return header + b": %d\r\n\r\n" % len(body) + body


class Lines:
    """The reader shape pygls' StdinAsyncReader has: readline and readexactly, awaited."""

    def __init__(self, data: bytes):
        self.stream = io.BytesIO(data)

    async def readline(self) -> bytes:
        return self.stream.readline()

    async def readexactly(self, n: int) -> bytes:
        return self.stream.read(n)


def replayed(first: early.Early, rest: bytes) -> bytes:
    """Everything the server's loop reads: what early.py read, then the rest of stdin."""
    reader = first.reader(Lines(rest))

    async def drain() -> bytes:
        out = b""
        while True:
            line = await reader.readline()
            if not line:
                return out
            out += line
            if line.lower().startswith(b"content-length"):
                n = int(line.split(b":")[1])
                out += await reader.readline()  # the blank line
                out += await reader.readexactly(n)
    return asyncio.run(drain())


@pytest.mark.parametrize("first_bytes", [
    framed(INIT),
    framed(INIT, b"content-length"),  # any case, as the server's own framing
    framed({"jsonrpc": "2.0", "id": 1, "method": "shutdown"}),  # not an initialize: read, kept for the server
    b"Content-Length: 5\r\n\r\nnot j",  # not JSON
    b"Content-Length: 99999999999\r\n\r\n",  # over the limit: the server's framing ends the stream
    b"X-Nothing: 1\r\n\r\n",  # no length at all
])
def test_every_byte_read_early_is_read_again_by_the_server(tmp_path, first_bytes):
    rest = framed({"jsonrpc": "2.0", "method": "exit"})
    stdout = io.BytesIO()
    first = early.read_first(io.BytesIO(first_bytes + rest), stdout, ["flags"], 1 << 20, folder=tmp_path)
    assert first.consumed == first_bytes[:len(first.consumed)] and len(first.consumed) <= len(first_bytes)
    leftover = first_bytes[len(first.consumed):] + rest
    assert first_bytes + rest == first.consumed + leftover
    if first_bytes.endswith(b"}"):  # a whole frame: the server reads it back byte for byte
        assert replayed(first, leftover) == first_bytes + rest
    assert stdout.getvalue() == b"" and not first.answered  # nothing kept yet: nothing sent


def test_a_kept_answer_is_sent_under_the_new_id_and_the_servers_own_is_not(tmp_path):
    key = early.answer_key(INIT["params"], ["flags"])
    tmp_path.chmod(0o700)
    (tmp_path / f"initialize-{key}.json").write_text(json.dumps({"result": {"capabilities": {"x": 1}}}))
    (tmp_path / f"initialize-{key}.json").chmod(0o600)
    stdout = io.BytesIO()
    request = {**INIT, "id": "seven", "params": {**INIT["params"], "processId": 222}}
    first = early.read_first(io.BytesIO(framed(request)), stdout, ["flags"], 1 << 20, folder=tmp_path)
    assert first.answered
    head, body = stdout.getvalue().split(b"\r\n\r\n")
    assert json.loads(body) == {"jsonrpc": "2.0", "id": "seven", "result": {"capabilities": {"x": 1}}}
    assert int(head.split(b":")[1]) == len(body)

    written = []
    writer = first.writer(type("W", (), {"write": lambda self, data: written.append(data)})())
    note = framed({"jsonrpc": "2.0", "method": "window/logMessage", "params": {"type": 3, "message": "hi"}})
    writer.write(note)  # other messages before the answer go out
    writer.write(framed({"jsonrpc": "2.0", "id": "seven", "result": {"capabilities": {"x": 2}}}))
    writer.write(framed({"jsonrpc": "2.0", "id": 2, "result": None}))
    assert written == [note, framed({"jsonrpc": "2.0", "id": 2, "result": None})]  # one answer to "seven"
    # the server's answer differed: it is the one kept for the next start
    assert early.read_kept(tmp_path, key) == {"capabilities": {"x": 2}}


def test_the_key_ignores_only_the_process_id():
    key = early.answer_key(INIT["params"], ["flags"])
    assert early.answer_key({**INIT["params"], "processId": 999}, ["flags"]) == key
    assert early.answer_key({**INIT["params"], "rootUri": "file:///elsewhere"}, ["flags"]) != key
    assert early.answer_key(INIT["params"], [("model", "/other")]) != key
    assert early.answer_key({**INIT["params"], "initializationOptions": {"debounceMs": 5}}, ["flags"]) != key


@pytest.mark.parametrize("unsafe", ["folder-0777", "file-0666", "symlink", "other-owner"])
def test_a_kept_answer_is_read_only_from_a_folder_and_file_that_are_ours_alone(tmp_path, unsafe):
    if unsafe == "other-owner" and os.getuid() != 0:
        pytest.skip("chown to another user needs root")
    folder = tmp_path / "dlm-ls"
    folder.mkdir(mode=0o700)
    key = early.answer_key(INIT["params"], [])
    path = folder / f"initialize-{key}.json"
    path.write_text(json.dumps({"result": {"planted": True}}))
    path.chmod(0o600)
    assert early.read_kept(folder, key) == {"planted": True}  # ours and private: read
    if unsafe == "folder-0777":
        folder.chmod(0o777)
    elif unsafe == "file-0666":
        path.chmod(0o666)
    elif unsafe == "symlink":
        real = tmp_path / "elsewhere.json"
        path.rename(real)
        path.symlink_to(real)
    else:
        os.chown(path, 65534, 65534)
    stdout = io.BytesIO()
    first = early.read_first(io.BytesIO(framed(INIT)), stdout, [], 1 << 20, folder=folder)
    assert not first.answered and stdout.getvalue() == b""
    # and nothing is written there either
    first.server_answer(json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"ours": True}}).encode())
    if unsafe == "folder-0777":
        assert early.read_kept(folder, key) is None and json.loads(path.read_text()) == {"result": {"planted": True}}


# --------------------------------------------------------------------------- real starts over stdio


def read_all(stream) -> list[dict]:
    messages, length = [], None
    while True:
        line = stream.readline()
        if not line:
            return messages
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
        elif line in (b"\r\n", b"\n") and length is not None:
            messages.append(json.loads(stream.read(length)))
            length = None


def read_all_until_one(stream) -> dict:
    length = None
    while True:
        line = stream.readline()
        assert line, "the server closed its output before answering"
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
        elif line in (b"\r\n", b"\n") and length is not None:
            return json.loads(stream.read(length))


def one_start(cache: Path, request_id) -> tuple[list[dict], str, float]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    env.pop("DLM_LS_NO_CODE_CACHE", None)
    command = [sys.executable, "-m", "dlm_ls.lsp_server.cli", "serve", "--model", str(cache / "no-model")]
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    init = {**INIT, "id": request_id, "params": {**INIT["params"], "processId": os.getpid()}}
    proc.stdin.write(framed(init))
    proc.stdin.flush()
    first = read_all_until_one(proc.stdout)  # the first message out: initialize answered
    elapsed = time.perf_counter() - t0
    proc.stdin.write(framed({"jsonrpc": "2.0", "id": 2, "method": "shutdown"}))
    proc.stdin.write(framed({"jsonrpc": "2.0", "method": "exit"}))
    proc.stdin.close()
    out = proc.stdout.read()
    err = proc.stderr.read()
    assert proc.wait(60) == 0, err.decode()[-2000:]
    return [first, *read_all(io.BytesIO(out))], err.decode(), elapsed


def test_two_real_starts_answer_initialize_identically_and_once_each(tmp_path):
    cache = tmp_path / "cache"
    first, first_log, _ = one_start(cache, 1)
    second, second_log, _ = one_start(cache, "again")
    answers = [[m for m in msgs if "method" not in m and m.get("id") == rid] for msgs, rid in ((first, 1), (second, "again"))]
    assert [len(a) for a in answers] == [1, 1]  # exactly one answer to initialize each
    assert answers[0][0]["result"] == answers[1][0]["result"] and "capabilities" in answers[0][0]["result"]
    assert [m.get("id") for m in second if "method" not in m] == ["again", 2]  # then shutdown's, in order
    assert "initialize answered from the kept answer" not in first_log
    assert "initialize answered from the kept answer" in second_log
    (kept,) = (cache / "dlm-ls").glob("initialize-*.json")
    assert kept.stat().st_mode & 0o777 == 0o600 and (cache / "dlm-ls").stat().st_mode & 0o777 == 0o700
