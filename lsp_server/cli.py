"""The `dlm-ls` command: one entry point, one subcommand per job.

    dlm-ls serve        the language server over stdio (what an editor starts)
    dlm-ls worker       the resident model process (the first `serve` starts it)
    dlm-ls complete     print the suggestion at FILE:LINE:COL
    dlm-ls fill, corpus, tokenizer, train, eval, bench   (implemented in their own modules)

Imports are lazy, so `serve` never pays for torch and `--help` is instant. A failure prints
one clear line, not a traceback, unless `--debug` is given anywhere on the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from ..worker.config import WorkerConfig
from .errors import DlmError

# Subcommands owned by other modules: argv after the name goes to `module.main(argv)`.
DELEGATED = {
    "fill": ("dlm_ls.model.fill_cmd", "infill JSON Lines requests from stdin (prefix, suffix) in a batch"),
    "corpus": ("dlm_ls.model.train.corpus", "build the training corpus from source trees"),
    "tokenizer": ("dlm_ls.model.train.tokenizer", "train the BPE tokenizer"),
    "train": ("dlm_ls.model.train.loop", "train or fine-tune a model"),
    "eval": ("dlm_ls.bench.eval", "measure infill quality on held-out tasks"),
    "ship": ("dlm_ls.model.train.ship", "write a trained checkpoint as the shipped default model, with its data card"),
    "bench": ("dlm_ls.bench.cli", "speed and quality benchmarks"),
    "cluster": ("dlm_ls.worker.cluster", "serve the model from Ray Serve replicas: up, status, down (extra [cluster])"),
}
OWN = {
    "serve": "run the language server over stdio (what an editor starts)",
    "worker": "run the resident model worker (normally started by `serve`)",
    "complete": "print the suggestion at a position of a file",
}
LANGUAGES = {".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript",
             ".jsx": "javascriptreact", ".ts": "typescript", ".tsx": "typescriptreact", ".rs": "rust",
             ".go": "go", ".lua": "lua", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".java": "java",
             ".sh": "shellscript", ".rb": "ruby"}


def usage() -> str:
    lines = ["usage: dlm-ls COMMAND [options]   (dlm-ls COMMAND --help for each)", "",
             "A language server that completes code with a resident masked-diffusion model.", "", "commands:"]
    for name, what in OWN.items():
        lines.append(f"  {name:<10} {what}")
    for name, (_, what) in DELEGATED.items():
        lines.append(f"  {name:<10} {what}")
    lines += ["", "options:", "  --debug    show tracebacks and debug logs", "  --version  print the version"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print("dlm-ls 0.1.0")
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "serve":
            return cmd_serve(rest, debug)
        if cmd == "worker":
            return _delegate("dlm_ls.worker.server", cmd, rest + (["--debug"] if debug else []))
        if cmd == "complete":
            return cmd_complete(rest, debug)
        if cmd in DELEGATED:
            return _delegate(DELEGATED[cmd][0], cmd, rest)
        print(f"dlm-ls: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the one place a crash becomes a message
        if debug:
            traceback.print_exc()
        message = str(exc) if isinstance(exc, DlmError) else f"{type(exc).__name__}: {exc}"
        print(f"dlm-ls {cmd}: error: {message}", file=sys.stderr)
        if not debug:
            print("(run again with --debug for a traceback)", file=sys.stderr)
        return 1


def _delegate(module_name: str, cmd: str, rest: list[str]) -> int:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise DlmError("internal", f"`dlm-ls {cmd}` is not available in this installation "
                                       f"(module {module_name} is missing)") from None
        raise  # a dependency of the module is missing: say which
    code = module.main(rest)
    return int(code or 0)


# --------------------------------------------------------------------------- serve


def _model_options(p: argparse.ArgumentParser) -> None:
    WorkerConfig.add_arguments(p, ("model", "device", "dtype"), unset=True)  # the worker's own flags
    p.add_argument("--in-process", action="store_true",
                   help="run the model inside this process instead of the shared worker (imports torch)")
    p.add_argument("--worker", metavar="URL", help="where the worker is: unix: (default: your own, started when "
                   "needed), unix:PATH, a team worker at tcp://HOST:PORT or tls://HOST:PORT, or a Ray Serve "
                   "cluster at http(s)://HOST:PORT/ROUTE (what `dlm-ls cluster up` prints)")
    p.add_argument("--token-file", metavar="PATH", help="a team worker's token (a file of your own, mode 0600)")
    p.add_argument("--tls-ca-file", metavar="PATH",
                   help="check a tls:// worker's certificate against this file (default: the system's CAs)")


def _worker_flags(args: argparse.Namespace) -> dict:
    return {"worker": args.worker, "token_file": args.token_file, "tls_ca_file": args.tls_ca_file}


def cmd_serve(rest: list[str], debug: bool) -> int:
    from .config import Settings

    p = argparse.ArgumentParser(prog="dlm-ls serve", description=(
        "Run the language server over stdio. It never loads the model itself: the first server "
        "starts a worker process that holds it, and later servers share that worker. Settings can "
        "also come from the client's initializationOptions, workspace/configuration (section dlm) and "
        "workspace/didChangeConfiguration."))
    _model_options(p)
    p.add_argument("--stdio", action="store_true",
                   help="accepted for editors that pass it; stdio is the only transport")
    WorkerConfig.add_arguments(p, ("idle_timeout_s",), unset=True)
    p.add_argument("--debounce-ms", type=int, metavar="MS",
                   help=f"wait this long for the next keystroke (default {Settings.debounce_ms})")
    p.add_argument("--max-context-chars", type=int, metavar="N",
                   help=f"context each side of the cursor (default {Settings.max_context_chars})")
    p.add_argument("--stream-refinement", action="store_true", help="send dlm/refinement notifications per step")
    WorkerConfig.add_arguments(p, ("captured_step",), unset=True)
    p.add_argument("--log-file", metavar="PATH", help="also write the log here (it always goes to stderr)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(rest)
    flags = {"model": args.model, "device": args.device, "dtype": args.dtype, "in_process": args.in_process or None,
             "idle_timeout_s": args.idle_timeout_s, "debounce_ms": args.debounce_ms,
             "max_context_chars": args.max_context_chars, "stream_refinement": args.stream_refinement or None,
             "captured_step": args.captured_step or None, **_worker_flags(args),
             "log_file": args.log_file, "log_level": args.log_level or ("debug" if debug else None)}
    settings, problems = Settings().merged({k: v for k, v in flags.items() if v is not None})
    if problems:
        raise DlmError("config_error", "; ".join(problems))
    from . import early

    # Before pygls is imported: a repeated `initialize` is answered from what was kept (early.py).
    first = early.read_first(sys.stdin.buffer, sys.stdout.buffer, sorted(flags.items(), key=str),
                             settings.max_message_bytes)
    with attrs_code_cache():
        from .server import serve

    code = serve(settings, first)
    logging.shutdown()
    # The thread that reads stdin may still be blocked in read(): do not wait for it.
    os._exit(code)


@contextlib.contextmanager
def attrs_code_cache():
    """Reuse the code attrs compiles for lsprotocol's ~570 classes across server starts.

    attrs generates `__init__`, `__eq__`, ... for every class as source and compiles it: 0.2 s of
    CPU, the largest part of the time an editor waits for `initialize`. The compiled code objects
    depend only on that source, so they are kept in a marshal file under ~/.cache/dlm-ls, named
    after the interpreter and the installed files. The file is written once; a missing, stale or
    broken one just means a normal import. DLM_LS_NO_CODE_CACHE=1 turns it off.

    Loading a marshal file runs its code, so the folder and the file must be the user's own and
    writable by nobody else (the checks the runtime directory gets); otherwise the cache is neither
    read nor written, and the server starts without it.
    """
    import builtins
    import hashlib
    import importlib.util
    import marshal

    from .early import cache_dir, ours_and_private

    if os.environ.get("DLM_LS_NO_CODE_CACHE") or "lsprotocol.types" in sys.modules:
        yield
        return
    try:
        stamp = [sys.version]
        for mod in ("lsprotocol.types", "attr._make"):
            st = os.stat(importlib.util.find_spec(mod).origin)
            stamp.append(f"{mod}:{st.st_size}:{st.st_mtime_ns}")
        base = cache_dir()
        path = base / f"attrs-code-{hashlib.sha256(chr(0).join(stamp).encode()).hexdigest()[:16]}.marshal"
    except (AttributeError, OSError, ImportError):
        yield
        return
    if not ours_and_private(base, directory=True):  # another user's or a shared folder: never load code from it
        yield
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            if not ours_and_private(f.fileno()):
                raise ValueError(f"{path} is not ours alone")
            cache = marshal.load(f)
        fresh = None
    except (OSError, EOFError, ValueError, TypeError):
        cache, fresh = {}, {}
    real_compile = builtins.compile

    def compile(source, filename, mode, flags=0, dont_inherit=False, optimize=-1, **kw):
        if mode != "exec" or flags or kw or not isinstance(source, str) or not isinstance(filename, str):
            return real_compile(source, filename, mode, flags, dont_inherit, optimize, **kw)
        code = cache.get((source, filename))
        if code is None:
            code = real_compile(source, filename, mode, flags, dont_inherit, optimize)
            if fresh is not None:
                fresh[(source, filename)] = code
        return code

    builtins.compile = compile
    try:
        yield
    finally:
        builtins.compile = real_compile
    if fresh:
        with contextlib.suppress(OSError):
            base.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                marshal.dump(fresh, f)
            os.replace(tmp, path)


# --------------------------------------------------------------------------- complete


def cmd_complete(rest: list[str], debug: bool) -> int:
    from . import documents as D
    from .config import Settings

    p = argparse.ArgumentParser(prog="dlm-ls complete", description=(
        "Print the model's suggestion for the cursor at LINE:COL of FILE (both 1-based; COL counts "
        "characters). The file is only read. It uses the shared worker (starting it if needed) "
        "unless --in-process is given."))
    p.add_argument("file", help="the source file ('-' reads standard input)")
    p.add_argument("--line", type=int, required=True, help="1-based line of the cursor")
    p.add_argument("--col", type=int, required=True, help="1-based column of the cursor, in characters")
    _model_options(p)
    p.add_argument("--language", help="language id (default: from the file name)")
    p.add_argument("--max-tokens", type=int, help="longest suggestion in tokens")
    p.add_argument("--steps", action="store_true", help="print each refinement step to stderr")
    p.add_argument("--json", action="store_true", help="print the suggestion and its timing as JSON")
    p.add_argument("--no-parse-filter", action="store_true",
                   help="show the best-scored suggestion even if it adds parse errors")
    args = p.parse_args(rest)

    if args.file == "-":
        text, uri = sys.stdin.read(), "stdin://complete"
    else:
        path = Path(args.file)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DlmError("invalid_params", f"no such file: {path}") from None
        except UnicodeDecodeError:
            raise DlmError("invalid_params", f"{path} is not UTF-8 text") from None
        except OSError as exc:
            raise DlmError("invalid_params", f"cannot read {path}: {exc.strerror}") from None
        uri = path.resolve().as_uri()
    language = args.language or LANGUAGES.get(Path(args.file).suffix.lower(), "plaintext")
    doc = D.Document(uri, text, language, 0, D.UTF32)
    if not 1 <= args.line <= doc.line_count:
        raise DlmError("invalid_position", f"line {args.line} is outside the file (1..{doc.line_count})")
    width = len(doc.line_text(args.line - 1))
    if not 1 <= args.col <= width + 1:
        raise DlmError("invalid_position", f"column {args.col} is outside line {args.line} (1..{width + 1})")
    offset = doc.offset_at((args.line - 1, args.col - 1), strict=True)

    settings, problems = Settings().merged({k: v for k, v in {
        "model": args.model, "device": args.device, "dtype": args.dtype, "in_process": args.in_process,
        "max_tokens": args.max_tokens, "log_level": "debug" if debug else "warning", **_worker_flags(args),
        "parse_filter": False if args.no_parse_filter else None}.items() if v is not None})
    if problems:
        raise DlmError("config_error", "; ".join(problems))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(message)s")
    import asyncio  # here, not at the top: `serve` answers a repeated initialize before it would be needed

    outcome = asyncio.run(_complete(doc, offset, settings, args.steps))
    r = outcome.result
    if args.json:
        print(json.dumps({"suggestion": outcome.text, "line": args.line, "col": args.col,
                          "mode": outcome.plan.mode if outcome.plan else None,
                          "reason": outcome.plan.reason if outcome.plan else "no completion here",
                          "ms": round(outcome.ms, 1), "model_ms": r and r.ms, "nfe": r and r.nfe,
                          "steps": r and r.steps, "canvas_length": r and r.canvas_length}, ensure_ascii=False))
        return 0
    if outcome.text is None:
        why = outcome.plan.reason if outcome.plan else "no completion belongs here"
        print(f"(no suggestion at {args.line}:{args.col}: {why})", file=sys.stderr)
        return 0
    print(outcome.text)
    print(f"({outcome.ms:.0f} ms, {r.nfe if r else 0} forward passes, {r.steps if r else 0} steps)", file=sys.stderr)
    return 0


async def _complete(doc, offset: int, settings, show_steps: bool):
    from .completion import run_completion
    from .backends import make_backend

    backend = make_backend(settings)
    on_step = None
    if show_steps:
        def on_step(update) -> None:
            text = (update.text or [""])[0]
            print(f"step {update.step:>3}: {text!r}", file=sys.stderr)
    try:
        return await run_completion(backend, doc, offset, settings, f"complete:{os.getpid()}", on_step=on_step)
    finally:
        await backend.close()


if __name__ == "__main__":
    sys.exit(main())
