"""policy.py's free answers, without a server: the LRU by context, type-through, speculation records;
and the server's plain prompt functions (extra context within the budget, candidate choice)."""

from __future__ import annotations

import asyncio

from dlm_ls.lsp_server import documents as D
from dlm_ls.model.prompt import line_window, prompt_chars
from dlm_ls.lsp_server.config import Settings
from dlm_ls.lsp_server.policy import CompletionPolicy, SuggestionCache, TypeThrough, context_key
from dlm_ls.lsp_server.completion import choose_completion, extra_context_preamble, plan_completion, prompt_window
from dlm_ls.worker.protocol import InfillReply

# --------------------------------------------------------------------------- the cache


def test_context_key_depends_on_the_context_only():
    base = context_key(["def f():\n    return ", "\n"], "line", {"max_tokens": 8})
    assert base == context_key(["def f():\n    return ", "\n"], "line", {"max_tokens": 8})
    assert base != context_key(["def f():\n    return", " \n"], "line", {"max_tokens": 8})  # where the cut is
    assert base != context_key(["def f():\n    return ", "\n"], "block", {"max_tokens": 8})
    assert base != context_key(["def f():\n    return ", "\n"], "line", {"max_tokens": 16})
    assert context_key(["a", "b"], "line", {"x": 1, "y": 2}) == context_key(["a", "b"], "line", {"y": 2, "x": 1})


def test_suggestion_cache_is_lru_and_remembers_nothing_too():
    cache = SuggestionCache(capacity=2)
    cache.put("a", "1")
    cache.put("b", None)  # "nothing worth showing" is an answer worth keeping
    assert cache.get("a").text == "1"  # now a is the most recent
    cache.put("c", "3")
    assert cache.get("b") is None and cache.get("a").text == "1" and cache.get("c").text == "3"
    assert len(cache) == 2
    off = SuggestionCache(capacity=0)
    off.put("a", "1")
    assert off.get("a") is None


def test_lookup_counts_cache_and_speculative_hits_once():
    p = CompletionPolicy()
    assert p.lookup("k") is None and p.counters["cache_misses"] == 1
    p.remember("k", "x = 1", "speculative")
    hit = p.lookup("k")
    assert (hit.text, hit.origin) == ("x = 1", "speculative") and p.counters["speculative_hits"] == 1
    assert p.lookup("k").origin == "model" and p.counters["cache_hits"] == 1  # asked again: an ordinary hit
    hits = p.status()["hits"]
    assert (hits["cache"], hits["speculative"], hits["type_through"]) == (1, 1, 0)


# --------------------------------------------------------------------------- type-through


def shown(text: str, offset: int, suggestion: str, budget: int = 10_000):
    t = TypeThrough()
    t.show("u", offset, *line_window(text, offset, budget), suggestion)
    return t


def test_typing_the_start_of_a_suggestion_serves_its_rest():
    text = "def f(x):\n    return \n\nprint(f(1))\n"
    at = text.index("return ") + len("return ")
    t = shown(text, at, "x + 1")
    for typed in ("x", "x ", "x +", "x + "):
        now = text[:at] + typed + text[at:]
        assert t.remainder("u", at + len(typed), *line_window(now, at + len(typed), 10_000)) == \
            "x + 1"[len(typed):]


def test_type_through_refuses_anything_else():
    text = "def f(x):\n    return \n\nprint(f(1))\n"
    at = text.index("return ") + len("return ")
    t = shown(text, at, "x + 1")

    def ask(new_text, offset):
        return t.remainder("u", offset, *line_window(new_text, offset, 10_000))

    assert ask(text[:at] + "y" + text[at:], at + 1) is None  # typed something else
    assert ask(text[:at] + "x + 1" + text[at:], at + 5) is None  # typed all of it
    assert ask(text, at) is None  # did not type
    assert ask("# edited\n" + text[:at] + "x" + text[at:], at + 1 + 9) is None  # the text before changed
    assert ask(text[:at] + "x" + text[at:].replace("print", "debug"), at + 1) is None  # the text after changed
    assert t.remainder("other-uri", at + 1, *line_window(text[:at] + "x" + text[at:], at + 1, 10_000)) is None


def test_type_through_in_a_document_larger_than_the_window():
    # The prefix window is cut at a line break near the budget, so it starts elsewhere once the
    # user types: the windows must only agree where they overlap.
    text = "".join(f"v{i} = {i}\n" for i in range(3000)) + "total = \n"
    at = len(text) - 1
    t = shown(text, at, "v1 + v2", budget=200)
    now = text[:at] + "v1 " + text[at:]
    assert t.remainder("u", at + 3, *line_window(now, at + 3, 200)) == "+ v2"


def test_forget_document_drops_type_through_and_cancels_speculation():
    async def main():
        p = CompletionPolicy()
        p.shown("u", 5, "abcde", "", "xyz")
        spec = p.start_speculation("u")
        spec.task = asyncio.create_task(asyncio.sleep(10))
        assert p.status()["speculating"] == ["u"]
        p.forget_document("u")
        await asyncio.sleep(0)
        assert spec.task.cancelled() and p.speculation("u") is None
        assert p.type_through("u", 6, "abcdex", "") is None
        assert p.counters["speculations_cancelled"] == 1

    asyncio.run(main())


def test_a_new_speculation_replaces_the_older_one():
    async def main():
        p = CompletionPolicy()
        first = p.start_speculation("u")
        first.task = asyncio.create_task(asyncio.sleep(10))
        second = p.start_speculation("u")
        second.task = asyncio.create_task(asyncio.sleep(0))
        await asyncio.sleep(0.01)
        assert first.task.cancelled() and p.speculation("u") is None  # the second is done: nothing runs
        assert p.counters["speculations"] == 2

    asyncio.run(main())


# --------------------------------------------------------------------------- the prompt


HELPERS = '''import math


def clamp_value(value, lower, upper):
    """Keep value within [lower, upper]."""
    return max(lower, min(upper, value))


def unrelated(a):
    return a
'''
MAIN = "from helpers import clamp_value\n\n\ndef run(value, lower, upper):\n    return clamp_value(\n"


def test_extra_context_puts_the_used_definition_first_and_keeps_the_budget():
    doc = D.Document("file:///w/main.py", MAIN, "python")
    at = MAIN.index("clamp_value(\n") + len("clamp_value(")
    others = {"file:///w/helpers.py": HELPERS, "file:///w/other.py": "x = 1\n" * 50}
    preamble = extra_context_preamble(doc, at, others, 400, "file:///w")
    assert preamble.startswith("# Compare this snippet from helpers.py:\n")
    assert "# def clamp_value(value, lower, upper):" in preamble and len(preamble) <= 400
    assert extra_context_preamble(doc, at, others, 0) == ""
    assert extra_context_preamble(doc, at, {}, 400) == ""


def test_a_preamble_shortens_the_prefix_to_the_prompt_budget():
    text = "".join(f"v{i} = {i}\n" for i in range(2000)) + "total = \n"
    doc = D.Document("file:///big.py", text, "python")
    at = len(text) - 1
    settings = Settings()
    budget = prompt_chars(2048)
    assert budget == int(2048 * 0.75 * 3)
    full = prompt_window(doc, at, settings)[0]
    assert len(full) > budget  # without a preamble: the usual window, cut by the engine
    prefix, suffix = prompt_window(doc, at, settings, "# chunk\n" * 100, budget)
    assert len("# chunk\n" * 100) + len(prefix) <= budget and prefix.endswith("total = ")
    assert prefix.startswith("v")  # cut at a line break
    plan = plan_completion(doc, at, settings, "# chunk\n", budget)
    assert plan.segments() == ["# chunk\n" + plan.prefix, plan.suffix] and plan.preamble == "# chunk\n"


def test_the_candidate_that_parses_wins_over_the_better_scored_one():
    text = "def f(a, b):\n    return \n"
    doc = D.Document("file:///c.py", text, "python")
    at = text.index("return ") + len("return ")
    plan = plan_completion(doc, at, Settings())
    result = InfillReply(["(a +"], [["(a +"], ["(a + b)"]])
    assert choose_completion(doc, at, plan, result) == "(a + b)"
    assert choose_completion(doc, at, plan, InfillReply(["a * b"])) == "a * b"  # no candidates: the middle
    assert choose_completion(doc, at, plan, InfillReply([])) is None
    assert choose_completion(doc, at, plan, result, parse_filter=False) == "(a +"  # the best-scored one


def test_a_tree_with_an_insert_equals_a_fresh_parse_and_leaves_the_original_alone():
    from dlm_ls.lsp_server.syntax import SyntaxTree

    text = 's = "😀 party"\n\ndef f(x):\n    return \n\nprint(f(1))\n'
    tree = SyntaxTree("python", text)
    before = str(tree.tree.root_node)
    at = text.index("return ") + len("return ")
    after = text[:at] + "x + 'ü'\n    y = 2" + text[at:]
    copy = tree.with_insert(at, "x + 'ü'\n    y = 2", after)
    assert str(copy.tree.root_node) == str(SyntaxTree("python", after).tree.root_node)
    assert copy.text is after and copy.byte_offset(len(after)) == len(after.encode())
    assert tree.text is text and str(tree.tree.root_node) == before
    assert tree.byte_offset(len(text)) == len(text.encode())


def test_fill_plans_with_the_documents_tree_find_the_same_holes():
    from dlm_ls.lsp_server.completion import attach_syntax
    from dlm_ls.lsp_server.fill import plan_fill

    text = "def f(x: tuple[int, ...]):\n    ...\n\n\ny = <|hole|>\n"
    doc = D.Document("file:///h.py", text, "python")
    without = plan_fill(doc, None, Settings())
    attach_syntax(doc, Settings())
    assert plan_fill(doc, None, Settings()) == without and len(without[0]) == 2
    assert plan_fill(doc, None, Settings(hole_marker="", python_ellipsis_holes=False)) == ([], [])
