"""Answer a repeated `initialize` before the server is even imported.

An editor waits for the answer to `initialize` before anything works, and most of a start is
importing pygls and lsprotocol (their ~570 attrs classes). Yet the answer depends only on the
request's params, the command line's settings and the code, so it is the same at every start of
the same editor on the same project. So, before pygls is imported, `read_first` reads the first
message from stdin. When it is an `initialize` answered before (same params apart from
`processId`, same command-line settings, same installed files), the kept answer is written to
stdout at once, under this request's id.

Then the server starts as usual and handles every byte read here as if it had read it itself
(`Early.reader`): `initialize` included, so its state is the same. Its own answer to that request
is not sent a second time (`Early.writer`): it is compared with the kept one and, when it differs
or none was kept, it becomes the kept answer for the next start. Only successful answers are kept.

The kept answers are JSON files in a folder that is the user's alone (the checks the attrs code
cache gets, in `ours_and_private`); elsewhere nothing is read or written, and every start is a
first start. DLM_LS_NO_CODE_CACHE=1 turns this off with the code cache.

Knows JSON-RPC framing and files; imports nothing of pygls or lsprotocol, and knows nothing of
what the answer says.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any, BinaryIO

# Header names in any case (JSON-RPC's base protocol borrows HTTP's headers); protocol.py frames with it too.
CONTENT_LENGTH = re.compile(rb"content-length[ \t]*:[ \t]*(-?\d+)", re.IGNORECASE)
MAX_HEADER_LINES = 32  # more than this before a blank line is not a header block: leave it to the server


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/dlm-ls (default ~/.cache/dlm-ls): start caches, read only when `ours_and_private`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dlm-ls"


def ours_and_private(target, directory: bool = False) -> bool:
    """`target` (a path, not followed if a link, or an open fd) belongs to this user and no one else may write it.

    A missing folder counts as private: it is created with mode 0700 when something is written.
    """
    try:
        st = os.fstat(target) if isinstance(target, int) else os.lstat(target)
    except FileNotFoundError:
        return directory
    except OSError:
        return False
    kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    return kind_ok and st.st_uid == os.getuid() and not stat.S_IMODE(st.st_mode) & 0o022


_STAMP: str | None = None


def code_stamp() -> str:
    """The interpreter and the installed files that shape the answer: this package, pygls, lsprotocol."""
    global _STAMP
    if _STAMP is None:
        import importlib.util

        parts = [sys.version]
        here = Path(__file__).resolve().parent
        files = sorted(here.glob("*.py"))
        for mod in ("pygls", "lsprotocol"):
            spec = importlib.util.find_spec(mod)
            if spec is not None and spec.origin:
                files.append(Path(spec.origin))
        for path in files:
            with contextlib.suppress(OSError):
                st = path.stat()
                parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
        _STAMP = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return _STAMP


def answer_key(params: Any, settings_key: Any) -> str:
    """What a kept answer is filed under: the params less processId, the settings, the code."""
    if isinstance(params, dict):
        params = {k: v for k, v in params.items() if k != "processId"}
    text = json.dumps([code_stamp(), settings_key, params], sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def frame(message: dict) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


class Early:
    """What `read_first` read and did; the server takes its reader and writer from here."""

    def __init__(self, consumed: bytes, request_id: Any = None, key: str | None = None, kept: Any = None,
                 folder: Path | None = None):
        self.consumed = consumed  # every byte read from stdin, to be read again by the server
        self.request_id = request_id  # the initialize request's id, when its answer is to be kept
        self.key = key
        self.kept = kept  # the answer already sent, or None
        self.folder = folder
        self.settled = request_id is None  # the server's own answer to it has been seen

    @property
    def answered(self) -> bool:
        return self.kept is not None

    def reader(self, reader):
        return _Replay(self.consumed, reader) if self.consumed else reader

    def writer(self, writer):
        return writer if self.settled else _Once(self, writer)

    def server_answer(self, body: bytes) -> bool:
        """The server's frame body about to be written: False when it must not go out (answered already)."""
        try:
            message = json.loads(body)
        except ValueError:
            return True
        if not isinstance(message, dict) or "method" in message or message.get("id") != self.request_id:
            return True
        self.settled = True
        if "result" in message and message["result"] != self.kept:
            self._keep(message["result"])
        elif "error" in message:
            self._forget()
        return not self.answered

    def _path(self) -> Path:
        return self.folder / f"initialize-{self.key}.json"

    def _keep(self, result: Any) -> None:
        with contextlib.suppress(OSError):
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not ours_and_private(self.folder, directory=True):
                return
            tmp = self.folder / f".initialize-{self.key}.{os.getpid()}.tmp"
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600), "w") as f:
                json.dump({"result": result}, f)
            os.replace(tmp, self._path())

    def _forget(self) -> None:
        with contextlib.suppress(OSError):
            self._path().unlink()


def read_kept(folder: Path, key: str) -> Any:
    """The answer kept under `key`, or None (missing, unreadable, or not the user's alone)."""
    if not ours_and_private(folder, directory=True) or not folder.exists():
        return None
    try:
        fd = os.open(folder / f"initialize-{key}.json", os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            if not ours_and_private(f.fileno()):
                return None
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data.get("result") if isinstance(data, dict) else None


def read_first(stdin: BinaryIO, stdout: BinaryIO, settings_key: Any, max_bytes: int,
               folder: Path | None = None) -> Early:
    """Read the first message; when it is an `initialize` answered before, send the kept answer now."""
    consumed = bytearray()
    length = None
    for _ in range(MAX_HEADER_LINES):
        line = stdin.readline()
        consumed += line
        if not line:
            return Early(bytes(consumed))
        if line.strip():
            match = CONTENT_LENGTH.search(line)
            if match:
                length = int(match.group(1))
            continue
        break
    else:
        return Early(bytes(consumed))
    if length is None or not 0 <= length <= max_bytes:
        return Early(bytes(consumed))  # the server's framing says what is wrong with it
    body = stdin.read(length)
    consumed += body
    try:
        message = json.loads(body) if len(body) == length else None
    except (ValueError, RecursionError):
        message = None
    if not (isinstance(message, dict) and message.get("jsonrpc") == "2.0" and message.get("method") == "initialize"
            and isinstance(message.get("id"), (int, str)) and not isinstance(message.get("id"), bool)
            and isinstance(message.get("params"), dict)) or os.environ.get("DLM_LS_NO_CODE_CACHE"):
        return Early(bytes(consumed))
    folder = folder if folder is not None else cache_dir()
    key = answer_key(message["params"], settings_key)
    kept = read_kept(folder, key)
    if kept is not None:
        stdout.write(frame({"jsonrpc": "2.0", "id": message["id"], "result": kept}))
        stdout.flush()
    return Early(bytes(consumed), message["id"], key, kept, folder)


class _Replay:
    """A reader (readline / readexactly awaitables, as pygls' StdinAsyncReader) that first gives back `prefix`."""

    def __init__(self, prefix: bytes, reader):
        self.prefix, self.inner = prefix, reader

    async def readline(self) -> bytes:
        if not self.prefix:
            return await self.inner.readline()
        cut = self.prefix.find(b"\n") + 1
        if cut:
            line, self.prefix = self.prefix[:cut], self.prefix[cut:]
            return line
        line, self.prefix = self.prefix, b""
        return line + await self.inner.readline()

    async def readexactly(self, n: int) -> bytes:
        head, self.prefix = self.prefix[:n], self.prefix[n:]
        if len(head) < n:
            head += await self.inner.readexactly(n - len(head))
        return head


class _Once:
    """The server's writer, less its second answer to an `initialize` already answered early."""

    def __init__(self, early: Early, writer):
        self.early, self.inner = early, writer

    def write(self, data: bytes):
        if not self.early.settled:
            header, _, body = data.partition(b"\r\n\r\n")
            if body and not self.early.server_answer(body):
                return None
        return self.inner.write(data)

    def close(self):
        return self.inner.close()
