"""msgpack-RPC between the language server and the worker: framing, messages, where the socket lives.

Messages are msgpack-RPC arrays:

    [0, msgid, method, params]     request
    [1, msgid, error, result]      response (error is None or {"code": str, "message": str})
    [2, method, params]            notification

Each travels in a frame: a 4-byte big-endian length, then the msgpack body. The length lets a
reader refuse an oversized payload before reading it and stay in step after a malformed body,
which a bare msgpack stream cannot. Both sides import this module, so it must never import
torch; it knows nothing of models or of LSP.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from ..lsp_server.errors import DlmError

REQUEST, RESPONSE, NOTIFY = 0, 1, 2
MAX_FRAME_BYTES = 8 * 1024 * 1024  # a 16k-character context each side is ~100 kB; 8 MB is a bug or an attack
DISCARD_LIMIT = 64 * MAX_FRAME_BYTES  # above this an oversized frame is not read and skipped: the link closes
HEADER = struct.Struct(">I")
SOCKET_PATH_MAX = 104  # sun_path is 108 bytes on Linux, 104 on macOS


@dataclass
class Message:
    kind: int
    msgid: int | None = None
    method: str | None = None
    params: Any = None
    error: Any = None
    result: Any = None


class FrameTooLarge(DlmError):
    def __init__(self, size: int, limit: int, msgid: int | None = None):
        super().__init__("too_large", f"message of {size} bytes is over the {limit}-byte limit")
        self.size = size
        self.msgid = msgid


class ProtocolError(DlmError):
    """A frame that is not a msgpack-RPC message; `msgid` is set when the body still named one."""

    def __init__(self, message: str, msgid: int | None = None):
        super().__init__("protocol_error", message)
        self.msgid = msgid


# --------------------------------------------------------------------------- encoding


def request(msgid: int, method: str, params: Any) -> list:
    return [REQUEST, msgid, method, params]


def response(msgid: int, error: Any = None, result: Any = None) -> list:
    return [RESPONSE, msgid, error, result]


def notification(method: str, params: Any) -> list:
    return [NOTIFY, method, params]


def encode(message: list, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """One frame: length header + msgpack body. Refuses to build an oversized frame."""
    try:
        body = msgpack.packb(message, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode message: {exc}") from None
    if len(body) > max_bytes:
        raise FrameTooLarge(len(body), max_bytes)
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> Message:
    """Parse and validate one frame's body."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad bytes
        raise ProtocolError(f"malformed frame: not msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, (list, tuple)) or not obj:
        raise ProtocolError("malformed frame: a message must be a non-empty array")
    kind = obj[0]
    msgid = obj[1] if len(obj) > 1 and isinstance(obj[1], int) and not isinstance(obj[1], bool) else None
    if kind == REQUEST:
        if len(obj) != 4 or msgid is None or not isinstance(obj[2], str):
            raise ProtocolError("malformed request: expected [0, msgid:int, method:str, params]", msgid)
        return Message(REQUEST, msgid=msgid, method=obj[2], params=obj[3])
    if kind == RESPONSE:
        if len(obj) != 4 or msgid is None:
            raise ProtocolError("malformed response: expected [1, msgid:int, error, result]", msgid)
        return Message(RESPONSE, msgid=msgid, error=obj[2], result=obj[3])
    if kind == NOTIFY:
        if len(obj) != 3 or not isinstance(obj[1], str):
            raise ProtocolError("malformed notification: expected [2, method:str, params]")
        return Message(NOTIFY, method=obj[1], params=obj[2])
    raise ProtocolError(f"malformed frame: unknown message type {kind!r}", msgid)


def _peek_msgid(head: bytes) -> int | None:
    """The msgid of a request whose body we will not read whole, from its first bytes."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(head)
    try:
        if unpacker.read_array_header() < 2 or unpacker.unpack() != REQUEST:
            return None
        msgid = unpacker.unpack()
    except Exception:
        return None
    return msgid if isinstance(msgid, int) and not isinstance(msgid, bool) else None


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES) -> bytes | None:
    """The next frame's body, or None at a clean end of stream.

    An oversized frame raises FrameTooLarge after it has been skipped, so the connection stays
    usable; one too large even to skip raises with `size` above DISCARD_LIMIT and the caller
    must close the connection.
    """
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProtocolError("connection closed inside a frame header") from None
    (size,) = HEADER.unpack(header)
    if size <= max_bytes:
        try:
            return await reader.readexactly(size)
        except asyncio.IncompleteReadError:
            raise ProtocolError(f"connection closed inside a {size}-byte frame") from None
    head = await reader.read(min(size, 32))
    msgid = _peek_msgid(head)
    if size <= DISCARD_LIMIT:
        left = size - len(head)
        while left > 0:
            chunk = await reader.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
    raise FrameTooLarge(size, max_bytes, msgid)


# --------------------------------------------------------------------------- where the worker lives


def runtime_dir() -> Path:
    """DLM_LS_RUNTIME_DIR, else $XDG_RUNTIME_DIR/dlm-ls, else /tmp/dlm-ls-$UID."""
    if os.environ.get("DLM_LS_RUNTIME_DIR"):
        return Path(os.environ["DLM_LS_RUNTIME_DIR"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "dlm-ls"
    return Path(f"/tmp/dlm-ls-{os.getuid()}")


def ensure_private_dir(path: Path) -> Path:
    """Create `path` with mode 0700, or check that an existing one is ours and private."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise DlmError("worker_unavailable", f"runtime directory {path} is not a directory (a symlink?)")
    if st.st_uid != os.getuid():
        raise DlmError("worker_unavailable",
                       f"runtime directory {path} belongs to another user; set DLM_LS_RUNTIME_DIR to a private one")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


@dataclass(frozen=True)
class Endpoint:
    """The files of one worker: one per (model folder, device) per user."""

    key: str
    socket: Path
    pid_file: Path
    lock_file: Path
    log_file: Path


def endpoint(model_dir: str | os.PathLike, device: str, base: Path | None = None) -> Endpoint:
    resolved = str(Path(model_dir).expanduser().resolve())
    key = hashlib.sha256(f"{resolved}\0{device}".encode()).hexdigest()[:16]
    base = base if base is not None else runtime_dir()
    sock = base / f"w-{key}.sock"
    if len(os.fsencode(str(sock))) > SOCKET_PATH_MAX:
        raise DlmError("worker_unavailable",
                       f"socket path {sock} is longer than a Unix socket allows; "
                       "set DLM_LS_RUNTIME_DIR to a shorter directory")
    return Endpoint(key, sock, base / f"w-{key}.pid", base / f"w-{key}.lock", base / f"w-{key}.log")
