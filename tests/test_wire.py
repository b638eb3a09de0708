"""msgpack-RPC framing and the worker's runtime directory (no worker, no model)."""

from __future__ import annotations

import asyncio
import os
import stat

import msgpack
import pytest

from dlm_ls.worker import protocol as rpc
from dlm_ls.worker.protocol import DlmError


def reader_with(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


def test_messages_round_trip():
    for msg in (rpc.request(7, "infill", {"segments": ["a", "b"], "stream": True}),
                rpc.response(7, None, {"middles": ["x😀"]}),
                rpc.response(8, {"code": "busy", "message": "later"}, None),
                rpc.notification("refinement", {"id": "r1", "step": 2, "text": ["░x"]})):
        frame = rpc.encode(msg)
        assert int.from_bytes(frame[:4], "big") == len(frame) - 4
        m = rpc.decode(frame[4:])
        assert m.kind == msg[0]
    m = rpc.decode(rpc.encode(rpc.request(3, "status", {}))[4:])
    assert (m.msgid, m.method, m.params) == (3, "status", {})


@pytest.mark.parametrize("body,msgid", [
    (b"\xc1\xc1\xc1", None),  # not msgpack
    (msgpack.packb({"a": 1}), None),  # not an array
    (msgpack.packb([0, 5, 12, {}]), 5),  # method not a string: the msgid is still reported
    (msgpack.packb([0, 5, "x"]), 5),  # too short
    (msgpack.packb([9, 1, "x", None]), 1),  # unknown type
    (msgpack.packb([2, 3, None]), None),
])
def test_malformed_bodies_raise_protocol_errors(body, msgid):
    with pytest.raises(rpc.ProtocolError) as err:
        rpc.decode(body)
    assert err.value.code == "protocol_error" and err.value.msgid == msgid
    assert "malformed" in str(err.value)


def test_encode_refuses_oversized_payloads():
    with pytest.raises(rpc.FrameTooLarge) as err:
        rpc.encode(rpc.request(1, "infill", {"segments": ["x" * 2000, ""]}), max_bytes=1000)
    assert err.value.code == "too_large" and "limit" in str(err.value)


async def test_read_frame_skips_an_oversized_frame_and_stays_in_step():
    big = rpc.encode(rpc.request(42, "infill", {"segments": ["x" * 5000, ""]}), max_bytes=1 << 20)
    small = rpc.encode(rpc.request(43, "status", {}))
    r = reader_with(big + small)
    with pytest.raises(rpc.FrameTooLarge) as err:
        await rpc.read_frame(r, max_bytes=1000)
    assert err.value.msgid == 42 and err.value.size == len(big) - 4
    assert rpc.decode(await rpc.read_frame(r, max_bytes=1000)).msgid == 43
    assert await rpc.read_frame(r) is None


async def test_read_frame_truncated_stream():
    frame = rpc.encode(rpc.request(1, "status", {}))
    with pytest.raises(rpc.ProtocolError):
        await rpc.read_frame(reader_with(frame[:-2]))
    with pytest.raises(rpc.ProtocolError):
        await rpc.read_frame(reader_with(frame[:2]))
    assert await rpc.read_frame(reader_with(b"")) is None


def test_runtime_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("DLM_LS_RUNTIME_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "x"))
    assert rpc.runtime_dir() == tmp_path / "a"
    monkeypatch.delenv("DLM_LS_RUNTIME_DIR")
    assert rpc.runtime_dir() == tmp_path / "x" / "dlm-ls"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert rpc.runtime_dir() == rpc.Path(f"/tmp/dlm-ls-{os.getuid()}")


def test_private_dir_is_0700_even_if_it_existed_open(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    rpc.ensure_private_dir(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(DlmError):
        rpc.ensure_private_dir(link)


def test_endpoint_is_per_model_and_device(tmp_path):
    a = rpc.endpoint(tmp_path / "m1", "cpu", tmp_path)
    assert a == rpc.endpoint(tmp_path / "m1" / ".." / "m1", "cpu", tmp_path)
    assert a.socket != rpc.endpoint(tmp_path / "m2", "cpu", tmp_path).socket
    assert a.socket != rpc.endpoint(tmp_path / "m1", "cuda", tmp_path).socket
    assert a.socket.parent == tmp_path and a.socket.name.endswith(".sock")
    with pytest.raises(DlmError) as err:
        rpc.endpoint(tmp_path / "m1", "cpu", tmp_path / ("d" * 120))
    assert "DLM_LS_RUNTIME_DIR" in str(err.value)


# --------------------------------------------------------------------------- limits (worker/protocol.py LIMITS)

SEGMENTS = ["def f():\n    return ", "\n"]


def refused(params) -> DlmError:
    with pytest.raises(DlmError) as err:
        rpc.InfillRequest.from_wire(params)
    return err.value


@pytest.mark.parametrize("overrides,message", [
    ({"max_tokens": 5000}, "overrides.max_tokens is 5000, above the limit max_tokens=1024"),
    ({"block_size": 4096}, "overrides.block_size is 4096, above the limit max_tokens=1024"),
    ({"max_steps": 10**9}, f"overrides.max_steps is {10**9}, above the limit max_steps=1024"),
    ({"canvas_lengths": [8, 100_000]}, "overrides.canvas_lengths[1] is 100000, above the limit max_canvas_length=1024"),
    ({"canvas_lengths": list(range(1, 20))},
     "the number of overrides.canvas_lengths is 19, above the limit max_canvas_lengths=8"),
])
def test_oversized_overrides_are_refused_naming_the_limit(overrides, message):
    err = refused({"segments": SEGMENTS, "overrides": overrides})
    assert err.code == "invalid_params" and err.message == message


@pytest.mark.parametrize("overrides,field", [
    ({"seed": "x"}, "overrides.seed"), ({"seed": -1}, "overrides.seed"), ({"seed": 1 << 64}, "overrides.seed"),
    ({"max_tokens": "9"}, "overrides.max_tokens"), ({"max_tokens": True}, "overrides.max_tokens"),
    ({"canvas_lengths": [4, "8"]}, "overrides.canvas_lengths"), ({"canvas_lengths": 8}, "overrides.canvas_lengths"),
    ({"threshold": [1]}, "overrides.threshold"), ({"strategy": 3}, "overrides.strategy"),
    ({"evil": 1}, "overrides.evil"),
])
def test_wrong_override_types_are_invalid_params_naming_the_field(overrides, field):
    err = refused({"segments": SEGMENTS, "overrides": overrides})
    assert err.code == "invalid_params" and err.message.startswith(field)


def test_holes_are_bounded_for_infill_and_warm():
    assert rpc.InfillRequest.from_wire({"segments": ["a"] * (rpc.LIMITS.max_holes + 1)}).segments
    err = refused({"segments": ["a"] * (rpc.LIMITS.max_holes + 2)})
    assert err.message == "the number of holes is 9, above the limit max_holes=8"
    with pytest.raises(DlmError, match="max_holes=8"):
        rpc.WarmRequest.from_wire({"cache_key": "k", "segments": ["a"] * 100})


def test_requests_within_the_limits_pass_unchanged():
    overrides = {"max_tokens": 1024, "canvas_lengths": [1024] * 8, "max_steps": 1024, "seed": 7, "threshold": 0.5,
                 "temperature": 0, "strategy": "ar", "block_size": 32, "min_tokens": 1}
    assert rpc.InfillRequest.from_wire({"segments": SEGMENTS, "overrides": overrides}).overrides == overrides


def test_limits_agree_with_the_model():
    from dlm_ls.model.config import SamplerConfig
    from dlm_ls.model.tokens import MAX_HOLES

    assert rpc.LIMITS.max_holes == MAX_HOLES
    assert set(rpc.OVERRIDES) == {f.name for f in __import__("dataclasses").fields(SamplerConfig)}
    default = __import__("json").loads((rpc.default_model_dir() / "config.json").read_text())
    assert rpc.LIMITS.max_context_tokens <= default["max_position"]


@pytest.mark.parametrize("key,value,message", [
    ("maxTokens", 5000, "setting 'max_tokens' is 5000, above the limit max_tokens=1024"),
    ("maxContextTokens", 10**6, f"setting 'max_context_tokens' is {10**6}, above the limit max_context_tokens=16384"),
    ("canvasLengths", [4, 4096], "the longest length in setting 'canvas_lengths' is 4096, above the limit "
                                 "max_canvas_length=1024"),
    ("canvasLengths", [4] * 9, "the number of lengths in setting 'canvas_lengths' is 9, above the limit "
                               "max_canvas_lengths=8"),
    ("maxSteps", 5000, "setting 'max_steps' is 5000, above the limit max_steps=1024"),
    ("minTokens", 5000, "setting 'min_tokens' is 5000, above the limit max_tokens=1024"),
    ("maxMessageBytes", 1 << 40, f"setting 'max_message_bytes' is {1 << 40}, above the limit "
                                 f"max_message_bytes={64 << 20}"),
])
def test_settings_above_the_limits_are_refused_and_skipped(key, value, message):
    from dlm_ls.lsp_server.config import Settings

    before = Settings()
    settings, problems = before.merged({key: value, "debounceMs": 3})
    assert problems == [message]
    assert settings.debounce_ms == 3  # the rest still applies
    snake = {"maxTokens": "max_tokens", "maxContextTokens": "max_context_tokens", "canvasLengths": "canvas_lengths",
             "maxSteps": "max_steps", "maxMessageBytes": "max_message_bytes", "minTokens": "min_tokens"}[key]
    assert getattr(settings, snake) == getattr(before, snake)


def test_min_tokens_is_a_sampler_override_and_the_engine_keeps_it():
    from dlm_ls.lsp_server.config import Settings
    from dlm_ls.model.infill import Infiller

    settings, problems = Settings().merged({"minTokens": 3})
    assert not problems and settings.sampler_overrides() == {"min_tokens": 3}
    rpc.check_overrides(settings.sampler_overrides())  # the worker takes it as it is
    assert Settings().merged({"minTokens": 0})[0].min_tokens == 0  # 0: an empty suggestion is allowed
    # The shipped model (stage 5) ends this line after one token, `(`, unless told otherwise.
    inf = Infiller(device="cpu")
    r = inf.complete(["def add(a, b):\n    return ", "\n"], mode="line", **settings.sampler_overrides())
    assert len(r.tokens[0]) >= 3, r  # the middle's own tokens, PAD excluded


# --------------------------------------------------------------------------- team worker addresses and tokens


@pytest.mark.parametrize("url,expected", [
    (None, ("unix", None, "", 0)), ("unix:", ("unix", None, "", 0)), ("unix:/run/w.sock", ("unix", "/run/w.sock", "", 0)),
    ("unix:///run/w.sock", ("unix", "/run/w.sock", "", 0)), ("tcp://gpu1:7000", ("tcp", None, "gpu1", 7000)),
    ("tls://10.0.0.2:443/", ("tls", None, "10.0.0.2", 443)), ("tcp://[::1]:7000", ("tcp", None, "::1", 7000)),
    ("http://127.0.0.1:8000/dlm", ("http", "/dlm", "127.0.0.1", 8000)),
    ("https://serve.example:443/team/dlm/", ("https", "/team/dlm", "serve.example", 443)),
    ("http://gpu1:80", ("http", "/", "gpu1", 80)),
])
def test_worker_urls(url, expected):
    a = rpc.WorkerAddress.parse(url)
    assert (a.scheme, a.path, a.host, a.port) == expected
    assert rpc.WorkerAddress.parse(str(a)) == a


@pytest.mark.parametrize("url", ["ftp://gpu1:80", "http://gpu1/dlm", "tcp://gpu1:7000/dlm", "http://gpu1:80/dlm?x=1",
                                 "tcp://gpu1", "tcp://gpu1:0", "tcp://gpu1:99999", "gpu1:7000",
                                 "tls://:443"])
def test_bad_worker_urls_are_config_errors(url):
    from dlm_ls.lsp_server.config import Settings

    with pytest.raises(DlmError) as err:
        rpc.WorkerAddress.parse(url)
    assert err.value.code == "config_error" and url in err.value.message
    settings, problems = Settings().merged({"worker": url})
    assert settings.worker is None and len(problems) == 1 and "worker" in problems[0]


def test_token_file_must_be_ours_and_0600(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token-of-enough-length\n")
    os.chmod(token, 0o600)
    assert rpc.read_token_file(token) == "s3cret-token-of-enough-length"
    for mode in (0o644, 0o640, 0o604):
        os.chmod(token, mode)
        with pytest.raises(DlmError, match=f"mode {mode:04o}; it must be 0600"):
            rpc.read_token_file(token)
    os.chmod(token, 0o600)
    link = tmp_path / "link"
    link.symlink_to(token)
    with pytest.raises(DlmError, match="cannot read token file"):
        rpc.read_token_file(link)
    short = tmp_path / "short"
    short.write_text("abc")
    os.chmod(short, 0o600)
    with pytest.raises(DlmError, match="at least 16 characters"):
        rpc.read_token_file(short)
    with pytest.raises(DlmError, match="does not exist"):
        rpc.read_token_file(tmp_path / "none")
