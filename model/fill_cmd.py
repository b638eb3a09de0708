"""`dlm-ls fill`: a batch infill command over JSON Lines. Evaluation harnesses depend on it: keep it stable.

stdin, one object per line:  {"id": any, "prefix": str, "suffix": str, "max_tokens"?: int}
stdout, one line per input, in input order:  {"id", "middle", "nfe", "ms"}
A bad line gets {"id", "error"} (id null when it could not be read) and processing goes on.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import IO, Iterator


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlm-ls fill", description=__doc__.split("\n\n")[0],
                                epilog="Input and output are JSON Lines; see the README for the format.")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the model shipped in the repository)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--strategy", default=None, choices=["parallel", "ar"],
                   help="parallel refinement, or the one-token-per-pass autoregressive baseline")
    p.add_argument("--max-tokens", type=int, default=None, help="longest middle (a line's max_tokens wins)")
    p.add_argument("--mode", default="auto", choices=["line", "block", "auto"],
                   help="line: the middle stops at the end of the current line")
    p.add_argument("--threshold", type=float, default=None, help="commit confidence threshold")
    p.add_argument("--max-steps", type=int, default=None, help="refinement steps per block")
    p.add_argument("--canvas-lengths", default=None, help="comma-separated candidate lengths, e.g. 8,16,32")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    return p


def _requests(stream: IO[str]) -> Iterator[tuple[object, dict | None, str | None]]:
    """(id, request, error) per non-blank input line."""
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield None, None, f"line {number}: not JSON ({exc.msg})"
            continue
        if not isinstance(obj, dict):
            yield None, None, f"line {number}: expected an object"
            continue
        rid = obj.get("id")
        if not isinstance(obj.get("prefix"), str) or not isinstance(obj.get("suffix", ""), str):
            yield rid, None, "'prefix' must be a string and 'suffix' a string"
            continue
        mt = obj.get("max_tokens")
        if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool) or mt < 1):
            yield rid, None, "'max_tokens' must be a positive integer"
            continue
        yield rid, obj, None


def run(args: argparse.Namespace, stdin: IO[str], stdout: IO[str]) -> int:
    from .infill import Infiller, InfillError  # torch loads here, not for --help

    overrides = {"strategy": args.strategy, "max_tokens": args.max_tokens, "threshold": args.threshold,
                 "max_steps": args.max_steps, "temperature": args.temperature, "seed": args.seed}
    if args.canvas_lengths:
        overrides["canvas_lengths"] = tuple(int(n) for n in args.canvas_lengths.split(","))
    infiller = Infiller(args.model, device=args.device, dtype=args.dtype)
    infiller.options(args.mode, **overrides)  # a bad flag fails once, before any input is read
    failures = 0
    for rid, req, error in _requests(stdin):
        if error is None:
            try:
                per_line = dict(overrides)
                if req.get("max_tokens") is not None:
                    per_line["max_tokens"] = req["max_tokens"]
                r = infiller.complete([req["prefix"], req.get("suffix", "")], mode=args.mode, **per_line)
                out = {"id": rid, "middle": r.middles[0], "nfe": r.nfe, "ms": round(r.ms, 3)}
            except InfillError as exc:
                error = str(exc)
        if error is not None:
            failures += 1
            out = {"id": rid, "error": error}
        stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
        stdout.flush()
    if failures:  # per-line errors are data for the harness, not a failure of the command
        print(f"dlm-ls fill: {failures} line(s) answered with an error", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args, sys.stdin, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
