"""`dlm-ls bench latency`: end to end through the real LSP path, as an editor drives it.

A scripted client (pygls, over stdio) starts the real `dlm-ls serve`, which spawns the real
worker (in a private runtime directory, so the run never meets a user's worker), opens a real
held-out file (tasks/latency_file.json: pluggy/_manager.py, MIT) cut to about 256, 1k and 4k
tokens of context, and replays typing at a cursor:

  * the next lines of the real file are typed key by key (seeded intervals around
    TYPING_MS; Enter inserts the newline and the indentation at once, as editors auto-indent);
    every keystroke sends `didChange` and an `inlineCompletion` request;
  * a request still unanswered when the next key comes is cancelled (`$/cancelRequest`), as
    VS Code does;
  * at pauses (after a line's first characters, and at each line's end) the user waits for the
    suggestion, and at some pauses accepts one: the rest of the real line arrives as one
    multi-character edit, the shape of an accepted suggestion. (The real line, not the model's
    text: this measures latency, not quality, and keeps the document real.)

Reported per context length: request -> response p50/p95/p99 of answered requests (all of
them, and of those at pauses, which is what a user waits for), counts of requests, cancels and
suggestions; from `dlm/status` at the end: the worker's context-cache hit rate, model time per
forward pass, the server's own counters; the RSS of the server and of the worker; and the
server's start time (bench/startup.py).

Knows LSP and processes; never imports torch (the tokenizer comes from `tokenizers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LATENCY_FILE = Path(__file__).resolve().parent / "tasks" / "latency_file.json"
CONTEXTS = (256, 1024, 4096)  # tokens of context around the cursor
TYPING_MS = 140  # mean time between keys: about 85 words a minute
PAUSE_MS = 700  # a pause to read the suggestion (after its answer arrived)
SUFFIX_SHARE = 0.2  # of the context below the cursor
REQUEST_TIMEOUT_S = 60.0


def _utf16_position(text: str, offset: int):
    from lsprotocol import types as lsp

    line = text.count("\n", 0, offset)
    start = text.rfind("\n", 0, offset) + 1
    return lsp.Position(line=line, character=len(text[start:offset].encode("utf-16-le")) // 2)


def _plain(obj: Any) -> Any:
    """pygls hands custom results over as namedtuples or attrs objects: back to dicts and lists."""
    if hasattr(obj, "_asdict"):
        return {k: _plain(v) for k, v in obj._asdict().items()}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _rss(pid: int | None) -> dict[str, int | None]:
    out: dict[str, int | None] = {"rss_bytes": None, "peak_rss_bytes": None}
    if not pid:
        return out
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_bytes"] = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                out["peak_rss_bytes"] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def percentiles(ms: list[float]) -> dict[str, float | int | None]:
    """Nearest-rank p50/p95/p99, mean and count."""
    import math

    if not ms:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    s = sorted(ms)

    def rank(q: float) -> float:
        return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]

    return {"count": len(s), "p50": rank(50), "p95": rank(95), "p99": rank(99), "mean": sum(s) / len(s), "max": s[-1]}


# --------------------------------------------------------------------------- the script


@dataclass
class Scene:
    """One context length: the document, the cursor, and the text to be typed there."""

    target_tokens: int
    context_tokens: int  # measured: prefix + suffix tokens of the opened document
    before: str  # document text before the cursor
    typed: str  # what the user will type (whole lines of the real file, without the last newline)
    after: str  # document text after the cursor: a newline, then the lines below the typed ones


def _code_lines(text: str) -> set[int]:
    """0-based numbers of the lines that start with code (not a comment, not inside or at a string)."""
    import io
    import tokenize

    skip = {tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}
    out, seen = set(), set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in skip:
                continue
            row = tok.start[0] - 1
            if row not in seen:
                seen.add(row)
                if tok.type not in (tokenize.COMMENT, tokenize.STRING) and \
                        not (hasattr(tokenize, "FSTRING_START") and tok.type == tokenize.FSTRING_START):
                    out.add(row)
            if tok.end[0] > tok.start[0]:  # a token over several lines: its inner lines start inside it
                seen.update(range(tok.start[0], tok.end[0]))
    except (tokenize.TokenError, SyntaxError):
        pass
    return out


def make_scene(text: str, tokenizer, target_tokens: int, lines_to_type: int, seed: int) -> Scene:
    """Cut `text` around a seeded cursor so that prefix + suffix hold about `target_tokens` tokens."""
    rng = random.Random(f"{seed}:{target_tokens}")
    lines = text.splitlines(keepends=True)
    counts = [len(ids) for ids in (e.ids for e in tokenizer.encode_batch(lines))]  # about additive
    want_prefix = int(target_tokens * (1 - SUFFIX_SHARE))
    want_suffix = target_tokens - want_prefix
    before = [0]
    for c in counts:
        before.append(before[-1] + c)
    K = lines_to_type
    code = _code_lines(text)
    ok = [i for i in range(1, len(lines) - K) if all(j in code and len(lines[j].strip()) >= 8 for j in range(i, i + K))]
    roomy = [i for i in ok if before[i] >= want_prefix and before[-1] - before[i + K] >= want_suffix]
    i = rng.choice(roomy or ok or [max(1, len(lines) // 2)])
    a = i  # whole lines above the cursor, up to the prefix's share
    while a > 0 and before[i] - before[a - 1] <= want_prefix:
        a -= 1
    while a < i and a not in code:  # never start inside a string: the whole file would read as one
        a += 1
    b = i + K  # whole lines below the typed ones, up to what is left of the target
    left = target_tokens - (before[i] - before[a])
    while b < len(lines) and before[b + 1] - before[i + K] <= left:
        b += 1
    while b > i + K and b < len(lines) and b not in code:  # nor end inside one
        b -= 1
    # The user types on a fresh line: the cursor starts on an empty line above the rest.
    pre, typed, post = "".join(lines[a:i]), "".join(lines[i : i + K]), "".join(lines[i + K : b])
    typed, post = typed.rstrip("\n"), "\n" + post
    measured = len(tokenizer.encode(pre).ids) + len(tokenizer.encode(post).ids)
    return Scene(target_tokens, measured, pre, typed, post)


@dataclass
class Event:
    kind: str  # "key" (one character), "enter" (newline + indentation), "accept" (rest of the line)
    text: str
    wait_ms: float  # think time before this event
    pause: bool = False  # after this event the user waits for the suggestion


def typing_script(typed: str, seed: int, accept_rate: float = 0.3) -> list[Event]:
    """Key-by-key events for `typed`, with seeded intervals, pauses and accepts."""
    rng = random.Random(seed)
    events: list[Event] = []
    lines = typed.splitlines(keepends=True)
    for n, line in enumerate(lines):
        body = line.rstrip("\n")
        indent = len(body) - len(body.lstrip())
        if n == 0 and indent:
            events.append(Event("key", body[:indent], rng.uniform(0.5, 1.5) * TYPING_MS))  # tab / indent key
        content = body[indent:]
        stop = max(1, int(len(content) * rng.uniform(0.25, 0.6)))  # pause here, maybe accept the rest
        i = 0
        while i < len(content):
            events.append(Event("key", content[i], rng.lognormvariate(0, 0.35) * TYPING_MS, pause=(i + 1 == stop)))
            i += 1
            if i == stop and rng.random() < accept_rate:
                events.append(Event("accept", content[i:], PAUSE_MS))
                i = len(content)
        if events and not events[-1].pause:
            events[-1].pause = True  # end of a line: the user looks up
        if line.endswith("\n"):
            nxt = lines[n + 1] if n + 1 < len(lines) else ""
            nxt_indent = nxt[: len(nxt) - len(nxt.lstrip())].rstrip("\n")
            events.append(Event("enter", "\n" + nxt_indent, rng.lognormvariate(0, 0.35) * TYPING_MS))
    return events


# --------------------------------------------------------------------------- the client


@dataclass
class Request:
    id: str
    kind: str  # the event that triggered it
    pause: bool
    sent: float
    answered: float | None = None
    cancelled: bool = False  # we sent $/cancelRequest for it
    error: str | None = None
    suggestion: str | None = None


@dataclass
class Replay:
    requests: list[Request] = field(default_factory=list)
    accepts: int = 0
    keystrokes: int = 0


class Client:
    """A pygls client on a real `dlm-ls serve` process."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.command, self.env = command, env
        self.client = None
        self.ids = 0

    async def start(self, options: dict[str, Any]) -> float:
        from lsprotocol import types as lsp
        from pygls.lsp.client import LanguageClient

        self.client = LanguageClient("dlm-ls-bench", "1")

        @self.client.feature(lsp.WINDOW_SHOW_MESSAGE)
        def _show(ls, params):  # the server warns here when the model is not ready
            print(f"  server says: {params.message}", file=sys.stderr)

        @self.client.feature(lsp.WINDOW_LOG_MESSAGE)
        def _log(ls, params):
            pass

        t0 = time.perf_counter()
        await self.client.start_io(*self.command, env=self.env)
        caps = lsp.ClientCapabilities(
            text_document=lsp.TextDocumentClientCapabilities(
                inline_completion=lsp.InlineCompletionClientCapabilities(),
                synchronization=lsp.TextDocumentSyncClientCapabilities()),
            general=lsp.GeneralClientCapabilities(position_encodings=[lsp.PositionEncodingKind.Utf16]))
        await self.client.initialize_async(lsp.InitializeParams(
            capabilities=caps, process_id=os.getpid(), initialization_options=options,
            client_info=lsp.ClientInfo(name="dlm-ls-bench")))
        ms = (time.perf_counter() - t0) * 1000.0
        self.client.initialized(lsp.InitializedParams())
        return ms

    async def status(self, uri: str | None = None) -> dict:
        return _plain(await asyncio.wait_for(
            self.client.protocol.send_request_async("dlm/status", {"uri": uri} if uri else {}), 60))

    def open(self, uri: str, text: str) -> None:
        from lsprotocol import types as lsp

        self.client.text_document_did_open(lsp.DidOpenTextDocumentParams(
            text_document=lsp.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))

    def close(self, uri: str) -> None:
        from lsprotocol import types as lsp

        self.client.text_document_did_close(lsp.DidCloseTextDocumentParams(
            text_document=lsp.TextDocumentIdentifier(uri=uri)))

    def insert(self, uri: str, version: int, text_before: str, offset: int, new: str) -> None:
        from lsprotocol import types as lsp

        at = _utf16_position(text_before, offset)
        self.client.text_document_did_change(lsp.DidChangeTextDocumentParams(
            text_document=lsp.VersionedTextDocumentIdentifier(uri=uri, version=version),
            content_changes=[lsp.TextDocumentContentChangePartial(range=lsp.Range(start=at, end=at), text=new)]))

    def request(self, uri: str, text: str, offset: int) -> tuple[str, asyncio.Future]:
        from lsprotocol import types as lsp

        self.ids += 1
        rid = f"bench-{self.ids}"
        params = lsp.InlineCompletionParams(
            text_document=lsp.TextDocumentIdentifier(uri=uri), position=_utf16_position(text, offset),
            context=lsp.InlineCompletionContext(trigger_kind=lsp.InlineCompletionTriggerKind.Automatic))
        fut = asyncio.wrap_future(self.client.protocol.send_request(lsp.TEXT_DOCUMENT_INLINE_COMPLETION, params,
                                                                    msg_id=rid))
        return rid, fut

    def cancel(self, rid: str) -> None:
        from lsprotocol import types as lsp

        self.client.protocol.notify(lsp.CANCEL_REQUEST, lsp.CancelParams(id=rid))

    async def stop(self) -> int | None:

        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.shutdown_async(None), 20)
            self.client.exit(None)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.stop(), 20)
        server = getattr(self.client, "_server", None)
        if server is None:
            return None
        if server.returncode is None:
            server.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait(), 10)
        transport = getattr(server, "_transport", None)
        if transport is not None:  # closed inside the loop, not by the garbage collector after it
            transport.close()
        return server.returncode


def _first_text(result: Any) -> str | None:
    items = getattr(result, "items", None)
    if items is None and isinstance(result, list):
        items = result
    if not items:
        return None
    text = getattr(items[0], "insert_text", None)
    return text if isinstance(text, str) else getattr(text, "value", None)


async def replay(client: Client, uri: str, scene: Scene, events: list[Event], version: int) -> tuple[Replay, int]:
    """Type `events` at the end of scene.before; returns what happened and the last version."""
    out = Replay()
    text = scene.before + scene.after
    cursor = len(scene.before)
    pending: list[tuple[Request, asyncio.Future]] = []

    def settle(req: Request, fut: asyncio.Future) -> None:
        def done(f: asyncio.Future) -> None:
            req.answered = time.perf_counter()
            if f.cancelled():
                req.error = "cancelled locally"
            elif f.exception() is not None:
                req.error = type(f.exception()).__name__ + ": " + str(f.exception())[:120]
            else:
                req.suggestion = _first_text(f.result())
        fut.add_done_callback(done)

    for ev in events:
        await asyncio.sleep(ev.wait_ms / 1000.0)
        for req, fut in pending:  # whatever is still unanswered is superseded: cancel it, as VS Code does
            if not fut.done():
                req.cancelled = True
                client.cancel(req.id)
        pending = [(r, f) for r, f in pending if not f.done()]
        version += 1
        client.insert(uri, version, text, cursor, ev.text)
        text = text[:cursor] + ev.text + text[cursor:]
        cursor += len(ev.text)
        out.keystrokes += ev.kind != "accept"
        out.accepts += ev.kind == "accept"
        rid, fut = client.request(uri, text, cursor)
        req = Request(rid, ev.kind, ev.pause, time.perf_counter())
        settle(req, fut)
        out.requests.append(req)
        pending.append((req, fut))
        if ev.pause:  # the user stops and reads whatever comes
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(fut), REQUEST_TIMEOUT_S)
            await asyncio.sleep(PAUSE_MS / 1000.0 * 0.3)
    for _, fut in pending:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(fut), REQUEST_TIMEOUT_S)
    return out, version


def summarize_replay(r: Replay) -> dict:
    answered = [q for q in r.requests if q.answered is not None and not q.cancelled and q.error is None]
    ms = [(q.answered - q.sent) * 1000.0 for q in answered]
    pause_ms = [(q.answered - q.sent) * 1000.0 for q in answered if q.pause or q.kind == "accept"]
    return {"requests": len(r.requests), "keystrokes": r.keystrokes, "accepts": r.accepts,
            "cancelled": sum(q.cancelled for q in r.requests),
            "errors": sum(q.error is not None and not q.cancelled for q in r.requests),
            "error_examples": sorted({q.error for q in r.requests if q.error and not q.cancelled})[:3],
            "answered": len(answered), "suggestions": sum(bool(q.suggestion) for q in answered),
            "latency_ms": percentiles(ms), "pause_latency_ms": percentiles(pause_ms)}


def _counters(status: dict) -> dict[str, int]:
    return dict((status.get("policy") or {}).get("counters") or {})


def _worker_figures(status: dict) -> dict:
    """Cache hit rate, model time per forward pass and counters, from a `dlm/status` answer."""
    out: dict[str, Any] = {}
    cache = status.get("cache") or {}
    hits, misses = cache.get("hits"), cache.get("misses")
    if hits is not None and misses is not None and hits + misses:
        out["context_cache_hit_rate"] = hits / (hits + misses)
    reused, computed = cache.get("reused_tokens"), cache.get("computed_tokens")
    if reused is not None and computed is not None and reused + computed:
        out["context_tokens_reused"] = reused / (reused + computed)
    lat = status.get("latency_ms") or {}
    policy = status.get("policy") or {}
    counters = policy.get("counters") or {}
    model = lat.get("model") or {}
    if model.get("count") and counters.get("nfe"):  # the worker's time per request over its passes
        out["model_ms_per_forward_pass"] = model["mean"] * model["count"] / counters["nfe"]
    # The server's own answers without the model: its result cache, speculation, type-through.
    hits = {k: counters[k] for k in ("cache_hits", "speculative_hits", "type_through_hits") if k in counters}
    if "cache_misses" in counters and sum(hits.values()) + counters["cache_misses"]:
        out["result_cache_hit_rate"] = sum(hits.values()) / (sum(hits.values()) + counters["cache_misses"])
        out["result_cache_hits"] = hits
    out["server_counters"] = counters
    out["server_latency_ms"] = {k: v for k, v in lat.items()}
    worker = status.get("worker") or {}
    if worker.get("counters"):
        out["worker_counters"] = worker["counters"]
    return out


async def run_latency(model_dir: Path, contexts: tuple[int, ...] = CONTEXTS, lines_to_type: int = 3,
                      seed: int = 0, device: str = "auto", startup_runs: int = 5,
                      extra_options: dict | None = None, full_context: bool = False) -> dict:
    """Typing replayed through a real server and worker. The model sees what it would in use: at most
    its own context budget (`max_context_tokens` in dlm/status); `full_context` lifts the budget
    to the whole scene instead, to measure how a step scales with the context."""
    from tokenizers import Tokenizer

    from . import startup as bench_startup

    source = json.loads(LATENCY_FILE.read_text())
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    result: dict[str, Any] = {"file": {k: source[k] for k in ("package", "path", "license")},
                              "typing_ms": TYPING_MS, "pause_ms": PAUSE_MS, "lines_typed": lines_to_type,
                              "contexts": []}
    run_dir = Path(tempfile.mkdtemp(prefix="dlm-ls-bench-"))
    os.chmod(run_dir, 0o700)
    env = {**os.environ, "DLM_LS_RUNTIME_DIR": str(run_dir), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "dlm_ls.lsp_server.cli", "serve", "--model", str(model_dir),
               "--device", device]

    # Start time, as an editor sees it: process start -> initialize answered (no model involved).
    starts = []
    warmup = 1 if startup_runs > 1 else 0  # the first of several runs only warms the page cache
    for i in range(startup_runs + warmup):
        r = await asyncio.get_running_loop().run_in_executor(None, bench_startup.one_run, command, False)
        if i >= warmup:
            starts.append(r["wall_ms"])
    result["startup_ms"] = percentiles(starts)

    options = {"maxContextChars": 64000, "idleTimeoutS": 120, **(extra_options or {})}
    if full_context:
        options["maxContextTokens"] = max(contexts) + 512
    result["full_context"] = full_context
    client = Client(command, env)
    try:
        result["initialize_ms"] = await client.start(options)
        t0 = time.perf_counter()
        status = await client.status()
        while not status.get("worker_pid") and time.perf_counter() - t0 < 300:
            await asyncio.sleep(0.5)
            status = await client.status()
        result["worker_ready_s"] = time.perf_counter() - t0
        result["context_budget_tokens"] = ((status.get("worker") or {}).get("info") or {}).get("max_context_tokens")
        version = 0
        for n, target in enumerate(contexts):
            scene = make_scene(source["text"], tokenizer, target, lines_to_type, seed)
            uri = f"file:///bench/{target}/_manager.py"
            client.open(uri, scene.before + scene.after)
            version = 1
            # The first request on a document computes its whole context: timed apart.
            t0 = time.perf_counter()
            rid, fut = client.request(uri, scene.before + scene.after, len(scene.before))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(fut, REQUEST_TIMEOUT_S)
            first_ms = (time.perf_counter() - t0) * 1000.0
            events = typing_script(scene.typed, seed + n)
            before = _counters(await client.status())
            rep, version = await replay(client, uri, scene, events, version)
            after = _counters(await client.status())
            # Closed, so that the next context's document is not offered this one as extra context.
            client.close(uri)
            entry = {"target_tokens": target, "context_tokens": scene.context_tokens, "first_request_ms": first_ms,
                     **summarize_replay(rep),
                     "server_counters": {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}}
            result["contexts"].append(entry)
            if not entry["server_counters"].get("model_calls"):
                print(f"  warning: no request at {target} tokens reached the model "
                      f"(server counters {entry['server_counters']})", file=sys.stderr)
            lat = entry["latency_ms"]
            print(f"  context {target:>5} ({scene.context_tokens} tokens): {entry['requests']} requests, "
                  f"{entry['answered']} answered, p50 {_ms(lat['p50'])}, p95 {_ms(lat['p95'])} ms", file=sys.stderr)
        status = await client.status()
        result.update(_worker_figures(status))
        server = status.get("server") or {}
        result["server_rss"] = _rss(server.get("pid")) if server.get("pid") else {"rss_bytes": server.get("rss_bytes")}
        result["worker_rss"] = _rss(status.get("worker_pid"))
        result["torch_in_server"] = server.get("torch_loaded")
        result["model_device"] = status.get("device")
    finally:
        await client.stop()
        for pid_file in run_dir.glob("*.pid"):  # the worker this run spawned
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
    return result


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def format_latency(r: dict) -> str:
    from .common import table

    rows = []
    for c in r["contexts"]:
        lat, pl = c["latency_ms"], c["pause_latency_ms"]
        rows.append([c["target_tokens"], c["context_tokens"], c["requests"], (c.get("server_counters") or {}).get(
            "model_calls"), c["answered"], c["cancelled"], c["suggestions"], lat["p50"], lat["p95"], lat["p99"],
            pl["p50"], c["first_request_ms"]])
    lines = [table(rows, ["context", "tokens", "requests", "to model", "answered", "cancelled", "shown", "p50 ms",
                          "p95 ms", "p99 ms", "pause p50", "first ms"])]
    mb = lambda b: "-" if not b else f"{b / (1 << 20):.0f} MiB"  # noqa: E731
    s = r.get("startup_ms", {})
    lines.append(f"server start -> initialize: p50 {_ms(s.get('p50'))} ms ({s.get('count')} runs); "
                 f"torch in server: {r.get('torch_in_server')}")
    lines.append(f"RSS: server {mb(r['server_rss'].get('rss_bytes'))}, worker {mb(r['worker_rss'].get('rss_bytes'))} "
                 f"(peak {mb(r['worker_rss'].get('peak_rss_bytes'))})")
    f2 = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    lines.append(f"context cache (worker): hit rate {f2(r.get('context_cache_hit_rate'))}, tokens reused "
                 f"{f2(r.get('context_tokens_reused'))}; model time per forward pass "
                 f"{_ms(r.get('model_ms_per_forward_pass'))} ms; result cache (server): hit rate "
                 f"{f2(r.get('result_cache_hit_rate'))} {r.get('result_cache_hits', '')}")
    return "\n".join(lines)
