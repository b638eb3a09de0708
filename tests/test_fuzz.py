"""Seeded, bounded fuzzing of `dlm-ls serve` over stdio: every request gets exactly one valid response.

Hypothesis draws batches of JSON-RPC messages: real and made-up methods, params built from LSP field
names and JSON values of every kind (lone surrogates, negative and huge numbers, deep nesting),
requests and notifications, proper and lowercase framing. After each batch a health probe asks for
`dlm/status`; then every request of the batch must have exactly one response, each a JSON-RPC
result or error object with its id. `make test` runs a few hundred messages; `make fuzz` runs
DLM_LS_FUZZ_EXAMPLES batches (default here 6).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import time

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from test_protocol import RawServer, frame, initialize

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("DLM_LS_FUZZ_EXAMPLES", "6"))
METHODS = ["textDocument/inlineCompletion", "textDocument/completion", "textDocument/codeAction",
           "workspace/executeCommand", "dlm/status", "dlm/fill", "textDocument/didOpen", "textDocument/didChange",
           "textDocument/didClose", "workspace/didChangeConfiguration", "$/cancelRequest", "no/suchMethod"]
FIELDS = ["textDocument", "uri", "position", "line", "character", "range", "start", "end", "text", "context",
          "triggerKind", "command", "arguments", "settings", "dlm", "version", "contentChanges", "languageId",
          "id", "maxTokens", "canvasLengths"]
URIS = ["file:///f/a.py", "file:///f/b.py", "untitled:c"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**63),
                    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(URIS),
                    st.text(alphabet=st.characters(codec=None), max_size=40))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS), inner, max_size=5)), max_leaves=25)
nearly_valid = st.fixed_dictionaries({
    "textDocument": st.fixed_dictionaries({"uri": st.sampled_from(URIS)}, optional={
        "languageId": st.just("python"), "version": st.integers(-1, 5), "text": st.text(max_size=200)}),
    "position": st.fixed_dictionaries({"line": st.integers(-2, 20), "character": st.integers(-2, 200)})},
    optional={"context": st.fixed_dictionaries({"triggerKind": st.integers(0, 3)}), "range": values})
message = st.fixed_dictionaries({"method": st.sampled_from(METHODS), "params": st.one_of(values, nearly_valid),
                                 "request": st.booleans(), "lowercase": st.booleans(),
                                 "deep": st.integers(0, 20)})  # (past the parser's depth: test_protocol.py)
_ids = itertools.count()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    s = RawServer(tiny_model_dir, tmp_path_factory.mktemp("fuzz-run"))
    initialize(s)
    yield s
    s.close()


def _encode(m: dict, msg_id) -> bytes:
    params = m["params"]
    for _ in range(m["deep"]):
        params = [params]
    body = {"jsonrpc": "2.0", "method": m["method"], "params": params}
    if msg_id is not None:
        body["id"] = msg_id
    data = frame(json.dumps(body))  # json escapes lone surrogates as \udc00: legal JSON
    return data.replace(b"Content-Length", b"content-length") if m["lowercase"] else data


@seed(20261201)
@settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],  # no shrinking: slow

          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(message, min_size=20, max_size=45))
def test_every_request_in_a_fuzzed_batch_gets_exactly_one_valid_response(server, batch):
    asked, sent = [], {}
    for m in batch:
        msg_id = f"f{next(_ids)}" if m["request"] else None
        asked += [msg_id] if msg_id else []
        sent[msg_id] = m
        server.send(_encode(m, msg_id))
    probe = f"probe{next(_ids)}"
    server.send(frame(json.dumps({"jsonrpc": "2.0", "id": probe, "method": "dlm/status", "params": {}})))
    answers: dict = {}
    deadline = time.monotonic() + 60
    while not (set(asked) | {probe}) <= answers.keys():
        assert server.proc.poll() is None, "the server exited"
        try:
            got = server.frames.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            missing = sorted((set(asked) | {probe}) - answers.keys())
            pytest.fail(f"no answer to {[(i, sent.get(i)) for i in missing[:3]]} within 60 s; server log:\n"
                        + server.log.decode(errors="replace")[-3000:])
        if "method" in got:
            continue  # a notification from the server (logs, refinement)
        assert got.get("jsonrpc") == "2.0" and "id" in got and (("result" in got) != ("error" in got)), got
        if "error" in got:
            assert isinstance(got["error"].get("code"), int) and "\n" not in got["error"].get("message", "")
        assert got["id"] not in answers, f"two answers to {got['id']}"
        answers[got["id"]] = got
    assert "result" in answers[probe]
    assert server.no_more_answers(0.5) == []  # nothing late, nothing twice
