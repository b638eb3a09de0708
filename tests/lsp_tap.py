"""A message tap: runs a language server over stdio and logs every LSP message that passes.

    python lsp_tap.py LOG -- COMMAND [ARGS...]

The editor talks to this process as it would to the server; the bytes go through unchanged, and
each message is appended to LOG as one JSON line: {"t": seconds, "from": "client"|"server",
"msg": {...}}. Tests read LOG to see what an editor sent and got (requests, refinement steps,
settings, applyEdit). It knows nothing of dlm-ls beyond the LSP framing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import BinaryIO


def frames(stream: BinaryIO):
    """(raw bytes, parsed message) for each Content-Length framed message, until end of stream."""
    while True:
        raw = b""
        length = None
        while True:
            line = stream.readline()
            if not line:
                return
            raw += line
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.decode("ascii", "replace").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        body = stream.read(length or 0)
        raw += body
        try:
            msg = json.loads(body)
        except ValueError:
            msg = {"unparsed": body.decode("utf-8", "replace")}
        yield raw, msg


def pump(source: BinaryIO, sink: BinaryIO, side: str, log, lock: threading.Lock, t0: float) -> None:
    try:
        for raw, msg in frames(source):
            with lock:
                log.write(json.dumps({"t": round(time.monotonic() - t0, 4), "from": side, "msg": msg}) + "\n")
                log.flush()
            sink.write(raw)
            sink.flush()
    except (BrokenPipeError, ValueError, OSError):
        pass
    finally:
        try:
            sink.close()
        except OSError:
            pass


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    log_path, command = argv[0], argv[2:]
    server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    lock, t0 = threading.Lock(), time.monotonic()
    with open(log_path, "a", encoding="utf-8") as log:
        up = threading.Thread(target=pump, args=(sys.stdin.buffer, server.stdin, "client", log, lock, t0), daemon=True)
        up.start()
        pump(server.stdout, sys.stdout.buffer, "server", log, lock, t0)
    return server.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
