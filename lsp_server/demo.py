"""`make demo`: the real path, shown. A real LSP client starts `dlm-ls serve` over stdio, opens a
sample Python file, asks for inline completions at a few cursors, and prints each refinement step
as the server streams it, the suggestion, and where the time went.

    python -m dlm_ls.lsp_server.demo [--model DIR] [--device cpu|cuda|auto]

Nothing here is special-cased for the demo: the server, the worker it spawns and the model are
what an editor gets. Only `streamRefinement` is switched on, so the steps can be shown.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import deque
from pathlib import Path

from lsprotocol import types as lsp
from pygls.lsp.client import LanguageClient

CURSOR = "<|cursor|>"
SAMPLE = '''import math


def mean(values):
    """Arithmetic mean of a non-empty list."""
    total = sum(values)
    return total / len(values)


def stdev(values):
    """Population standard deviation."""
    m = mean(values)
    squares = [(v - m) ** 2 for v in values]
    return math.sqrt(<|cursor|>


def median(values):
    """The middle value of the sorted list."""
    ordered = sorted(values)
    n = len(ordered)
    <|cursor|>


def normalize(values):
    """Scale values to the range [0, 1]."""
    lo, hi = min(values), max(<|cursor|>


if __name__ == "__main__":
    data = [3, 1, 4, 1, 5, 9, 2, 6]
    print("mean", mean(data), "median", <|cursor|>
'''

DIM, BOLD, GREEN, RESET = ("\x1b[2m", "\x1b[1m", "\x1b[32m", "\x1b[0m") if sys.stdout.isatty() else ("",) * 4


def sample_with_cursors() -> tuple[str, list[int]]:
    text, cursors = SAMPLE, []
    while (i := text.find(CURSOR)) != -1:
        cursors.append(i)
        text = text[:i] + text[i + len(CURSOR):]
    return text, cursors


def utf16_position(text: str, offset: int) -> lsp.Position:
    start = text.rfind("\n", 0, offset) + 1
    return lsp.Position(line=text.count("\n", 0, offset),
                        character=len(text[start:offset].encode("utf-16-le")) // 2)


def plain(obj):
    """pygls hands custom messages over as namedtuples."""
    if hasattr(obj, "_asdict"):
        return {k: plain(v) for k, v in obj._asdict().items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


async def run(model: str | None, device: str) -> int:
    text, cursors = sample_with_cursors()
    uri = Path("demo_sample.py").resolve().as_uri()
    client = LanguageClient("dlm-ls-demo", "0.1.0")
    steps: list[dict] = []
    server_log: deque[str] = deque(maxlen=20)

    @client.feature("dlm/refinement")
    def on_refinement(ls, params):
        update = plain(params)
        steps.append(update)
        shown = (update.get("text") or [""])[0].split("\n", 1)[0]
        print(f"    {DIM}step {update['step']:>2}  {update.get('ms') or 0:7.1f} ms  {RESET}{shown}")

    cmd = [sys.executable, "-m", "dlm_ls.lsp_server.cli", "serve", "--device", device, "--log-level", "warning"]
    if model:
        cmd += ["--model", model]
    t_start = time.perf_counter()
    await client.start_io(*cmd)

    async def drain_stderr():  # keep the server's log moving (a full pipe would stall it)
        while line := await client._server.stderr.readline():
            server_log.append(line.decode(errors="replace").rstrip())
    drain = asyncio.create_task(drain_stderr())

    caps = lsp.ClientCapabilities(text_document=lsp.TextDocumentClientCapabilities(
        inline_completion=lsp.InlineCompletionClientCapabilities()))
    await client.initialize_async(lsp.InitializeParams(
        capabilities=caps, process_id=os.getpid(),
        initialization_options={"streamRefinement": True, "debounceMs": 0}))
    t_init = time.perf_counter()
    client.initialized(lsp.InitializedParams())
    print(f"{BOLD}dlm-ls demo{RESET}: server started and initialized in {(t_init - t_start) * 1000:.0f} ms "
          f"(real LSP over stdio: {' '.join(cmd[1:4])})")

    status = plain(await client.protocol.send_request_async("dlm/status", {"wait": True}))
    if status.get("worker_error"):
        print(f"\nThe server is up, but the model is not: {status['worker_error']}", file=sys.stderr)
        await _close(client, drain)
        return 1
    t_worker = time.perf_counter()
    print(f"model {status['model']} ({status['parameters']:,} parameters, {status['dtype']}) on "
          f"{status['device']} in worker pid {status['worker_pid']}: ready after {t_worker - t_init:.1f} s\n")

    client.text_document_did_open(lsp.DidOpenTextDocumentParams(
        text_document=lsp.TextDocumentItem(uri=uri, language_id="python", version=1, text=text)))

    rows = []
    for n, offset in enumerate(cursors, 1):
        pos = utf16_position(text, offset)
        line_start = text.rfind("\n", 0, offset) + 1
        print(f"{BOLD}[{n}] line {pos.line + 1}, column {pos.character + 1}{RESET}: "
              f"{text[line_start:offset]}{GREEN}█{RESET}")
        steps.clear()
        t0 = time.perf_counter()
        result = await client.text_document_inline_completion_async(lsp.InlineCompletionParams(
            text_document=lsp.TextDocumentIdentifier(uri=uri), position=pos,
            context=lsp.InlineCompletionContext(trigger_kind=lsp.InlineCompletionTriggerKind.Invoked)))
        ms = (time.perf_counter() - t0) * 1000
        suggestion = result.items[0].insert_text if result and result.items else None
        last = plain(await client.protocol.send_request_async("dlm/status", {})).get("last_request", {})
        if suggestion:
            shown = suggestion.replace("\n", "\n" + " " * len("  suggestion: "))
            print(f"  suggestion: {text[line_start:offset]}{GREEN}{shown}{RESET}")
        else:
            print(f"  {DIM}no suggestion here ({last.get('mode') or 'no region'}){RESET}")
        print(f"  {DIM}{ms:.0f} ms end to end, {last.get('nfe', 0)} forward passes, mode {last.get('mode')}, "
              f"context {last.get('prefix_chars', 0)}+{last.get('suffix_chars', 0)} chars{RESET}\n")
        rows.append((n, pos.line + 1, ms, last.get("nfe", 0), len(steps), (suggestion or "").split("\n")[0]))

    status = plain(await client.protocol.send_request_async("dlm/status", {}))
    lat = status["latency_ms"].get("total", {})
    print(f"{BOLD}{'#':>2} {'line':>5} {'ms':>8} {'nfe':>4} {'steps':>5}  suggestion{RESET}")
    for n, line, ms, nfe, nsteps, first in rows:
        print(f"{n:>2} {line:>5} {ms:>8.0f} {nfe:>4} {nsteps:>5}  {first[:60]}")
    cache = status.get("cache") or {}
    print(f"\nlatency p50 {lat.get('p50', 0):.0f} ms, p95 {lat.get('p95', 0):.0f} ms over {lat.get('count', 0)} "
          f"requests; context cache: {cache.get('entries', 0)} entries, {cache.get('hits', 0)} hits; "
          f"server imported torch: {status['server']['torch_loaded']}")
    await _close(client, drain)
    return 0


async def _close(client: LanguageClient, drain: asyncio.Task) -> None:
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()
    drain.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlm-ls demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: the shipped model in model/default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = p.parse_args(argv)
    if args.model is None:
        from ..worker.protocol import default_model_dir

        if not (default_model_dir() / "config.json").is_file():
            print(f"dlm-ls demo: the shipped default model is missing ({default_model_dir()}).\n"
                  "Train or fetch it first, or run: python -m dlm_ls.lsp_server.demo --model DIR", file=sys.stderr)
            return 1
    try:
        return asyncio.run(run(args.model, args.device))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
