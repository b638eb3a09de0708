"""The server's plain functions: settings, policy (cancel-previous, latency), errors, the pipeline."""

from __future__ import annotations

import asyncio


from dlm_ls.lsp_server import documents as D
from dlm_ls.lsp_server.config import Settings
from dlm_ls.lsp_server.errors import DlmError, to_lsp
from dlm_ls.lsp_server.policy import CompletionPolicy, LatencyStats
from dlm_ls.lsp_server.completion import finish_completion, plan_completion


def test_settings_accept_camel_case_sections_and_report_bad_values():
    s, problems = Settings().merged({"dlm": {"maxContextChars": 100, "canvasLengths": [8, 16], "streamRefinement": True,
                                             "threshold": 2, "debounceMs": "fast", "mystery": 1}, "model": "/m"})
    assert (s.max_context_chars, s.canvas_lengths, s.stream_refinement, s.model) == (100, (8, 16), True, "/m")
    assert s.threshold is None and s.debounce_ms == Settings().debounce_ms  # bad values leave defaults
    assert any("threshold" in p for p in problems) and any("debounce_ms" in p for p in problems)
    assert any("mystery" in p for p in problems)
    assert s.sampler_overrides() == {"canvas_lengths": [8, 16]}
    assert Settings().merged("nonsense")[1] == ["settings must be an object, not str"]
    s2, problems = Settings().merged({"device": "gpu0", "logLevel": "loud", "maxTokens": 0})
    assert len(problems) == 3 and s2.device == "auto"


async def test_a_new_request_supersedes_the_older_one_of_its_kind_only():
    policy = CompletionPolicy()
    tickets = {}

    async def request(name, uri, kind):
        tickets[name] = policy.begin(uri, kind, name)
        try:
            await asyncio.sleep(10)
        finally:
            policy.end(tickets[name])

    old = asyncio.create_task(request("old", "file:///a", "inline"))
    other_kind = asyncio.create_task(request("fallback", "file:///a", "completion"))
    other_doc = asyncio.create_task(request("b", "file:///b", "inline"))
    await asyncio.sleep(0)
    new = asyncio.create_task(request("new", "file:///a", "inline"))
    await asyncio.sleep(0.01)
    assert old.cancelled() and tickets["old"].superseded
    assert not other_kind.done() and not other_doc.done() and not new.done()
    assert policy.counters["superseded"] == 1 and policy.status()["in_flight"] == 3
    policy.forget_document("file:///a")
    await asyncio.sleep(0.01)
    assert new.cancelled() and other_kind.cancelled() and not other_doc.done()
    other_doc.cancel()


async def test_debounce_waits_and_zero_does_not():
    policy = CompletionPolicy(debounce_ms=30)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await policy.debounce()
    assert loop.time() - t0 >= 0.025
    policy.debounce_ms = 0
    t0 = loop.time()
    await policy.debounce()
    assert loop.time() - t0 < 0.01


def test_latency_percentiles_are_nearest_rank():
    stats = LatencyStats(window=100)
    for ms in range(1, 101):
        stats.record("total", ms)
    s = stats.summary()["total"]
    assert (s["count"], s["p50"], s["p90"], s["p95"], s["p99"], s["max"]) == (100, 50, 90, 95, 99, 100)
    for ms in range(1000, 1010):
        stats.record("total", ms)  # the window keeps the last 100
    assert stats.summary()["total"]["count"] == 110 and stats.summary()["total"]["max"] == 1009


def test_errors_become_lsp_errors_in_one_place():
    err = to_lsp(DlmError("invalid_position", "line 9 is past the end"))
    assert (err.code, err.message, err.data["code"]) == (-32602, "line 9 is past the end", "invalid_position")
    assert to_lsp(DlmError("busy", "later")).code == -32803
    assert to_lsp(ValueError("boom")).code == -32603 and "ValueError: boom" in to_lsp(ValueError("boom")).message
    assert DlmError("no-such-code", "x").code == "internal"


def test_plan_sends_a_bounded_window_of_a_huge_document():
    text = "x = 1\n" * 1_000_000 + "total = \n" + "y = 2\n" * 1_000_000
    doc = D.Document("file:///big.py", text, "python")
    offset = text.index("total = ") + len("total = ")
    plan = plan_completion(doc, offset, Settings(max_context_chars=1000))
    assert plan is not None and plan.mode == "line"
    assert len(plan.prefix) <= 1000 and len(plan.suffix) <= 1000 and plan.prefix.endswith("total = ")


def test_plan_skips_comments_and_cleans_line_middles():
    text = "# a comment \ndef f(x):\n    return \n"
    doc = D.Document("file:///c.py", text, "python")
    assert plan_completion(doc, text.index("comment"), Settings()) is None
    offset = text.index("return ") + len("return ")
    plan = plan_completion(doc, offset, Settings(max_tokens=5))
    assert plan.overrides["max_tokens"] == 5  # the user's setting wins over the region's budget
    assert finish_completion(doc, offset, plan, "x + 1\n    more") == "x + 1"
    assert finish_completion(doc, offset, plan, "   ") is None


def test_prompt_window_cuts_at_lines_so_typing_keeps_the_window_start():
    from dlm_ls.lsp_server.completion import prompt_window
    from dlm_ls.model.prompt import PREFIX_SHARE, SUFFIX_SHARE

    body = "".join(f"value_{i} = compute(alpha, beta, {i})\n" for i in range(400))
    text = body + "result = \n" + body
    offset = len(body) + len("result = ")
    doc = D.Document("file:///w/a.py", text, "python")
    prefix, suffix = prompt_window(doc, offset, Settings(), "", 1000)
    assert len(prefix) <= 1000 and len(suffix) <= 1000 * SUFFIX_SHARE / PREFIX_SHARE
    assert text[offset - len(prefix) - 1] == "\n" and prefix.endswith("result = ")  # whole lines, up to the cursor
    assert suffix.startswith("\n") and suffix.endswith("\n")
    typed = D.Document("file:///w/a.py", text[:offset] + "x" + text[offset:], "python")
    prefix2, suffix2 = prompt_window(typed, offset + 1, Settings(), "", 1000)
    assert prefix2 == prefix + "x" and suffix2 == suffix  # one more key: the cache reuses all but the tail
    with_chunks, _ = prompt_window(doc, offset, Settings(), "# chunk\n" * 50, 1000)
    assert len(with_chunks) + 400 <= 1000 and prefix.endswith(with_chunks)  # room made for the preamble
