"""Seeded, bounded fuzzing of the worker's socket: every request frame gets exactly one response, and
the worker keeps serving.

Hypothesis draws batches of msgpack frames for a real `dlm-ls worker` on its Unix socket: requests
for real and made-up methods with params of every msgpack kind (huge and negative numbers, bytes,
lone surrogates, nesting, the infill fields with wrong types and sizes past `LIMITS`), notifications,
arrays of the wrong shape, bodies that are not msgpack at all. After each batch a `status` probe
must answer; then every request of the batch must have had exactly one response with its id, and a
fresh connection must still complete. `shutdown` is left out (it is honoured, as it should be).
`make test` runs DLM_LS_FUZZ_EXAMPLES batches (default 6); `make fuzz` ten times as many.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time

import msgpack
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from dlm_ls.worker import protocol as rpc
from test_worker import SEGMENTS, RawLink, start_worker

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("DLM_LS_FUZZ_EXAMPLES", "6"))
METHODS = ["infill", "cancel", "warm", "status", "ping", "hello", "refinement", "no_such_method", ""]
FIELDS = ["segments", "mode", "overrides", "id", "cache_key", "stream", "priority", "preamble", "max_tokens",
          "canvas_lengths", "max_steps", "threshold", "seed", "temperature", "block_size", "token"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**64 - 1),
                    st.floats(allow_nan=True), st.binary(max_size=16),
                    st.text(alphabet=st.characters(codec="utf-8"), max_size=30),
                    st.sampled_from(["line", "block", "auto", "low", "normal"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS), inner, max_size=5)), max_leaves=20)
nearly_valid_infill = st.fixed_dictionaries(
    {"segments": st.lists(st.text(max_size=40), min_size=0, max_size=10)},
    optional={"overrides": st.dictionaries(st.sampled_from(FIELDS[8:15]), st.one_of(
        st.integers(-5, 5000), st.lists(st.integers(-2, 3000), max_size=12), st.text(max_size=3)), max_size=3),
        "mode": st.sampled_from(["line", "block", "auto", "sideways"]), "id": values, "stream": st.booleans(),
        "cache_key": st.one_of(st.none(), st.text(max_size=8), st.integers(-2**63, 2**63 - 1))})
frame_kind = st.sampled_from(["request", "request", "request", "notification", "wrong shape", "not msgpack"])
message = st.fixed_dictionaries({"kind": frame_kind, "method": st.sampled_from(METHODS),
                                 "params": st.one_of(values, nearly_valid_infill)})
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def worker(tiny_model_dir, tmp_path_factory):
    sock = tmp_path_factory.mktemp("fuzz-wrk") / "w.sock"
    proc = start_worker(tiny_model_dir, sock, idle=300)
    yield proc, sock
    proc.terminate()
    proc.wait(30)


def _frame(m: dict) -> tuple[bytes, int | None]:
    """The frame's bytes, and the id a response must carry (None: no response is owed)."""
    if m["kind"] == "not msgpack":
        body = b"\xc1" + os.urandom(7)  # 0xc1 is never used by msgpack
        return rpc.HEADER.pack(len(body)) + body, None
    if m["kind"] == "wrong shape":
        body = msgpack.packb([9, "x", m["method"]], use_bin_type=True)
        return rpc.HEADER.pack(len(body)) + body, None
    if m["kind"] == "notification":
        body = msgpack.packb([rpc.NOTIFY, m["method"], m["params"]], use_bin_type=True)
        return rpc.HEADER.pack(len(body)) + body, None
    msgid = next(_ids)
    body = msgpack.packb([rpc.REQUEST, msgid, m["method"], m["params"]], use_bin_type=True)
    return rpc.HEADER.pack(len(body)) + body, msgid


async def _batch(sock, messages: list[dict]) -> None:
    link = await RawLink.open(sock)
    try:
        owed: dict[int, int] = {}
        for m in messages:
            data, msgid = _frame(m)
            await link.send_raw(data)
            if msgid is not None:
                owed[msgid] = 0
        probe = next(_ids)
        await link.send_raw(rpc.encode(rpc.request(probe, "status", {})))
        probe_seen = False
        deadline = time.monotonic() + 120
        while not probe_seen or any(n == 0 for n in owed.values()):
            assert time.monotonic() < deadline, f"unanswered: {[i for i, n in owed.items() if n == 0]}"
            msg = await link.receive(timeout=max(0.1, deadline - time.monotonic()))
            if msg.kind != rpc.RESPONSE:
                continue  # refinement steps and `error` notifications for frames without an id
            if msg.msgid == probe:
                assert msg.error is None, msg.error
                probe_seen = True
            else:
                assert msg.msgid in owed, f"a response to an id nobody sent: {msg.msgid}"
                owed[msg.msgid] += 1
                assert owed[msg.msgid] == 1, f"two responses to id {msg.msgid}"
                assert msg.error is None or (isinstance(msg.error, dict) and msg.error.get("code") in rpc.CODES
                                             and isinstance(msg.error.get("message"), str)), msg.error
    finally:
        link.close()


@seed(20261207)
@settings(max_examples=EXAMPLES, deadline=None, derandomize=False, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(batch=st.lists(message, min_size=5, max_size=40))
def test_every_request_frame_gets_exactly_one_response_and_the_worker_keeps_serving(worker, batch):
    proc, sock = worker
    asyncio.run(_batch(sock, batch))
    assert proc.poll() is None

    async def still_completes():
        link = await RawLink.open(sock)
        try:
            reply = await link.call("infill", {"segments": SEGMENTS, "overrides": {"max_tokens": 4, "max_steps": 4,
                                                                                  "canvas_lengths": [4]}})
            assert reply.error is None and reply.result["middles"]
        finally:
            link.close()

    asyncio.run(still_completes())
