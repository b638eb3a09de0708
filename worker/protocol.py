"""The wire between the language server and the worker: messages, framing, errors, where the worker lives.

Messages are msgpack-RPC arrays:

    [0, msgid, method, params]     request
    [1, msgid, error, result]      response (error is None or {"code": str, "message": str})
    [2, method, params]            notification

Each travels in a frame: a 4-byte big-endian length, then the msgpack body. The length lets a
reader refuse an oversized payload before reading it and stay in step after a malformed body,
which a bare msgpack stream cannot.

The params and results are typed here, once: `InfillRequest`, `InfillReply`, `StepUpdate`,
`WarmRequest`, `CancelRequest`, each with `to_wire` (a plain map) and `from_wire` (which checks
the shape and raises `DlmError("invalid_params")`). Both ends import this module, so it never
imports torch; it knows nothing of models, documents or LSP.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import socket
import stat
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import msgpack

from ..model.prompt import MODES

# --------------------------------------------------------------------------- errors

# The symbolic error codes both ends use; the language server maps each to an LSP code (errors.py).
CODES = ("invalid_params", "invalid_position", "unknown_document", "infill_error", "unknown_method", "cancelled",
         "superseded", "busy", "too_large", "worker_unavailable", "worker_error", "model_error", "timeout",
         "config_error", "protocol_error", "unauthorized", "internal")


class DlmError(Exception):
    """A failure with a message a user can act on. `code` is one of CODES."""

    def __init__(self, code: str, message: str, data: Any = None):
        super().__init__(message)
        self.code = code if code in CODES else "internal"
        self.message = message
        self.data = data

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"DlmError({self.code!r}, {self.message!r})"

    def as_dict(self) -> dict[str, Any]:
        """The msgpack-RPC error form: {"code": ..., "message": ...}."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            out["data"] = self.data
        return out

    @classmethod
    def from_dict(cls, err: Any) -> "DlmError":
        if isinstance(err, dict):
            return cls(str(err.get("code", "worker_error")), str(err.get("message", err)), err.get("data"))
        return cls("worker_error", str(err))


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what anyone may ask for: the one place they live.

    The worker enforces them on every request from any socket client (in `from_wire`, before the
    engine allocates anything), the language server on its settings, the document store on what it
    keeps. Each is far above any useful value and far below what would exhaust a machine's memory.
    """

    max_tokens: int = 1024  # the longest middle (and block) one request may ask for
    max_canvas_length: int = 1024  # the longest canvas, in slots
    max_canvas_lengths: int = 8  # canvas lengths refined together in one request
    max_steps: int = 1024  # refinement steps per block
    max_context_tokens: int = 16384  # the context budget: the RoPE tables of the shipped model (max_position)
    max_holes: int = 8  # the hole tokens the vocabulary has (model/tokens.py MAX_HOLES)
    max_frame_bytes: int = 8 << 20  # one worker frame: a 16k-character context each side is ~100 kB
    max_message_bytes: int = 64 << 20  # one LSP message (Content-Length)
    max_document_chars: int = 16 << 20  # one open document, in characters
    hello_bytes: int = 4096  # the first frame of a TCP connection, before it has authenticated
    hello_timeout_s: float = 10.0  # ... and how long it may take to come

    def refuse(self, what: str, value: Any, limit: str, code: str = "invalid_params") -> DlmError:
        """The error for `what` (a field, as the sender named it) being `value`, above the limit `limit`."""
        return DlmError(code, f"{what} is {value}, above the limit {limit}={getattr(self, limit)}")

    def check(self, what: str, value: Any, limit: str, code: str = "invalid_params") -> None:
        if value > getattr(self, limit):
            raise self.refuse(what, value, limit, code)


LIMITS = Limits()

REQUEST, RESPONSE, NOTIFY = 0, 1, 2
MAX_FRAME_BYTES = LIMITS.max_frame_bytes
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


# --------------------------------------------------------------------------- typed messages

PRIORITIES = ("normal", "low")  # low: the server's speculative suggestions, stepped only in idle turns
METHODS = ("hello", "infill", "cancel", "warm", "status", "ping", "shutdown")


def _preamble(p: dict) -> str:
    preamble = p.get("preamble") or ""
    if not isinstance(preamble, str):
        raise DlmError("invalid_params", "preamble must be a string")
    return preamble


def _text_list(value: Any, what: str, least: int) -> list[str]:
    if not isinstance(value, list) or len(value) < least or not all(isinstance(s, str) for s in value):
        raise DlmError("invalid_params", what)
    return value


def _params(params: Any, method: str) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise DlmError("invalid_params", f"{method} params must be a map")
    return params


def _check_holes(segments: list[str]) -> None:
    LIMITS.check("the number of holes", len(segments) - 1, "max_holes")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# The sampler settings a request may override (model/config.py SamplerConfig), each with the check
# of its type and, for those that size an allocation, the limit it must stay under.
OVERRIDES: dict[str, tuple[str, Callable[[Any], bool], str | None]] = {
    "strategy": ("a string", lambda v: isinstance(v, str), None),
    "threshold": ("a number", _is_number, None),
    "max_steps": ("an integer", _is_int, "max_steps"),
    "block_size": ("an integer", _is_int, "max_tokens"),
    "max_tokens": ("an integer", _is_int, "max_tokens"),
    "min_tokens": ("an integer", _is_int, "max_tokens"),
    "temperature": ("a number", _is_number, None),
    "seed": ("an integer from 0 to 2**63-1", lambda v: _is_int(v) and 0 <= v < 1 << 63, None),
    "canvas_lengths": ("a list of integers", lambda v: isinstance(v, list) and all(map(_is_int, v)), None),
}


def check_overrides(overrides: dict[str, Any]) -> None:
    """Types and limits of a request's sampler overrides; meaning (a threshold above 1) is the engine's."""
    for key, value in overrides.items():
        if key not in OVERRIDES:
            raise DlmError("invalid_params", f"overrides.{key} is not a sampler setting; known: {', '.join(OVERRIDES)}")
        if value is None:  # "the model's own value"
            continue
        kind, ok, limit = OVERRIDES[key]
        if not ok(value):
            raise DlmError("invalid_params", f"overrides.{key} must be {kind}, not {value!r}")
        if limit is not None:
            LIMITS.check(f"overrides.{key}", value, limit)
    lengths = overrides.get("canvas_lengths") or []
    LIMITS.check("the number of overrides.canvas_lengths", len(lengths), "max_canvas_lengths")
    for i, n in enumerate(lengths):
        LIMITS.check(f"overrides.canvas_lengths[{i}]", n, "max_canvas_length")


class WireMessage:
    """A typed message: its fields are its wire form (`from_wire`, on each class, checks them)."""

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class InfillRequest(WireMessage):
    """Fill the holes between `segments` (text around them); all holes are one job, refined together."""

    segments: list[str]
    id: str = ""
    mode: str = "auto"
    overrides: dict[str, Any] = field(default_factory=dict)  # sampler settings for this request
    priority: str = "normal"
    cache_key: str | None = None  # the context-cache entry to reuse and update (the server: the document)
    stream: bool = False  # send a StepUpdate after every refinement step
    preamble: str = ""  # chunks of other files shown before the first segment, tokenized apart (model/prompt.py)

    @classmethod
    def from_wire(cls, params: Any) -> "InfillRequest":
        """Shape checks the engine does not do (it checks meaning: lengths, holes, overrides)."""
        p = _params(params, "infill")
        segments = _text_list(p.get("segments"), "segments must be a list of at least two strings "
                                                 "(text around the holes)", 2)
        mode = p.get("mode", "auto")
        if mode not in MODES:
            raise DlmError("invalid_params", f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        _check_holes(segments)
        overrides = p.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise DlmError("invalid_params", "overrides must be a map of sampler settings")
        check_overrides(overrides)
        priority = p.get("priority", "normal")
        if priority not in PRIORITIES:
            raise DlmError("invalid_params", f"priority must be one of {', '.join(PRIORITIES)}")
        key = p.get("cache_key")
        if key is not None and not isinstance(key, str):
            raise DlmError("invalid_params", "cache_key must be a string")
        preamble = _preamble(p)
        rid = p.get("id")
        return cls(segments, "" if rid is None else str(rid), mode, overrides, priority, key, bool(p.get("stream")),
                   preamble)


@dataclass
class InfillReply(WireMessage):
    """The middles of one request, best first among `candidates` (one list of middles per canvas length)."""

    middles: list[str]
    candidates: list[list[str]] = field(default_factory=list)
    nfe: int = 0  # forward passes
    steps: int = 0  # refinement steps
    ms: float = 0.0  # engine time
    canvas_length: int = 0
    score: float = 0.0
    prefill_tokens: int = 0  # context tokens computed for this request (those the context cache did not hold)
    queue_ms: float = 0.0
    total_ms: float = 0.0

    @classmethod
    def from_wire(cls, result: Any) -> "InfillReply":
        r = _params(result, "an infill reply")
        try:
            return cls(list(r["middles"]), [list(c) for c in r.get("candidates") or [r["middles"]]], int(r["nfe"]),
                       int(r["steps"]), float(r["ms"]), int(r["canvas_length"]), float(r["score"]),
                       int(r.get("prefill_tokens", 0)), float(r.get("queue_ms", 0.0)), float(r.get("total_ms", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise DlmError("protocol_error", f"malformed infill reply: {exc}") from None


@dataclass
class StepUpdate(WireMessage):
    """One refinement step of a streamed request: its text so far, undecided slots shown as \u2591."""

    id: str
    step: int
    text: list[str]
    ms: float

    @classmethod
    def from_wire(cls, params: Any) -> "StepUpdate":
        p = _params(params, "refinement")
        return cls(str(p.get("id")), int(p.get("step", 0)), list(p.get("text") or []), float(p.get("ms", 0.0)))


@dataclass
class WarmRequest(WireMessage):
    """Compute the context cache of `segments` under `cache_key`, so a later request there starts warm."""

    cache_key: str
    segments: list[str]
    preamble: str = ""

    @classmethod
    def from_wire(cls, params: Any) -> "WarmRequest":
        p = params if isinstance(params, dict) else {}
        segments = _text_list(p.get("segments"), "warm needs segments: a list of strings", 0)
        _check_holes(segments)
        if not isinstance(p.get("cache_key"), str):
            raise DlmError("invalid_params", "warm needs a cache_key: the entry a later request will reuse")
        preamble = _preamble(p)
        return cls(p["cache_key"], segments, preamble)


@dataclass
class CancelRequest(WireMessage):
    id: str

    @classmethod
    def from_wire(cls, params: Any) -> "CancelRequest":
        if not isinstance(params, dict) or "id" not in params:
            raise DlmError("invalid_params", "cancel needs {id: request id}")
        return cls(str(params["id"]))


@dataclass
class Hello(WireMessage):
    """The first message on a TCP connection: the team's token, and who asks (named in the worker's status)."""

    token: str
    client: str = ""

    @classmethod
    def from_wire(cls, params: Any) -> "Hello":
        p = params if isinstance(params, dict) else {}
        token, client = p.get("token"), p.get("client", "")
        if not isinstance(token, str) or not token:
            raise DlmError("unauthorized", "hello needs {token: the team's token}")
        return cls(token, client[:200] if isinstance(client, str) else "")


def settle(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """Resolve `fut` once (on its loop's thread, as a `done` callback's result arrives from another);
    a future already cancelled stays cancelled."""
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


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


def probe(path: Path) -> bool:
    """Is something accepting connections on this socket?"""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def alive(path: Path, timeout: float = 5.0) -> bool:
    """Does a worker answer a ping on this socket? (A worker being killed may still accept.)"""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        s.sendall(encode(request(0, "ping", {})))
        data = b""
        while len(data) < HEADER.size or len(data) < HEADER.size + HEADER.unpack(data[:4])[0]:
            chunk = s.recv(4096)
            if not chunk:
                return False
            data += chunk
        msg = decode(data[HEADER.size:])
        return msg.kind == RESPONSE and msg.error is None
    except (OSError, DlmError):
        return False
    finally:
        s.close()


@dataclass(frozen=True)
class WorkerAddress:
    """Where a client finds its worker, from a URL: `unix:` (this user's own worker for the model and
    device, started when needed), `unix:PATH`, a team worker at `tcp://HOST:PORT` / `tls://HOST:PORT`,
    or a Ray Serve cluster at `http://HOST:PORT/ROUTE` / `https://HOST:PORT/ROUTE` (worker/cluster.py)."""

    scheme: str  # unix | tcp | tls | http | https
    path: str | None = None  # unix: the socket (None = the endpoint of the model and device); http(s): the route
    host: str = ""
    port: int = 0

    @property
    def remote(self) -> bool:
        return self.scheme != "unix"

    @property
    def cluster(self) -> bool:
        """A Ray Serve application, reached over HTTP (one request per call), not a msgpack-RPC link."""
        return self.scheme in ("http", "https")

    @classmethod
    def parse(cls, url: str | None) -> "WorkerAddress":
        if not url or url == "unix:":
            return cls("unix")
        if url.startswith("unix:"):
            path = url[len("unix:"):]
            return cls("unix", path[2:] if path.startswith("///") else path)
        scheme, sep, rest = url.partition("://")
        if scheme not in ("tcp", "tls", "http", "https") or not sep:
            raise DlmError("config_error", f"worker URL {url!r}: expected unix:, unix:PATH, tcp://HOST:PORT, "
                                           "tls://HOST:PORT, or a cluster's http(s)://HOST:PORT/ROUTE")
        hostport, slash, route = rest.partition("/")
        if scheme in ("tcp", "tls"):
            if route:
                raise DlmError("config_error", f"worker URL {url!r}: a {scheme}:// worker has no path")
            return cls(scheme, None, *parse_host_port(hostport, f"worker URL {url!r}"))
        if "?" in route or "#" in route:
            raise DlmError("config_error", f"worker URL {url!r}: expected http(s)://HOST:PORT/ROUTE, no query")
        return cls(scheme, "/" + route.rstrip("/"), *parse_host_port(hostport, f"worker URL {url!r}"))

    def __str__(self) -> str:
        if self.remote:
            host = "[" + self.host + "]" if ":" in self.host else self.host
            route = self.path if self.cluster and self.path != "/" else ""
            return f"{self.scheme}://{host}:{self.port}{route}"
        return f"unix:{self.path or ''}"


# Over HTTP (a Ray Serve cluster) each call is one POST of one request frame; the answer is a stream
# of frames: `refinement` notifications, then the response. Closing the stream cancels the request.
FRAMES_MEDIA_TYPE = "application/x-dlm-frames"
# The document's routing key travels in Serve's model-multiplexing header, the one request field its
# proxy hands to a request router; ours (worker/serve_replica.py) sends each document to its home replica.
DOCUMENT_HEADER = "serve_multiplexed_model_id"
CLIENT_HEADER = "x-dlm-client"  # who asks, for the replica's per-client fairness and counts


def document_route(cache_key: str | None) -> str | None:
    """The routing value for a request's context-cache key: one per document, whatever the entry
    (a completion's `uri` and a fill's `uri#fill` land on one replica). Hashed: header-safe, and
    no file path travels in the clear in a header."""
    if not cache_key:
        return None
    return hashlib.sha256(cache_key.partition("#")[0].encode("utf-8", "surrogatepass")).hexdigest()[:24]


def token_digest(token: str) -> str:
    """What a cluster's replicas hold instead of the token itself (Ray keeps deployment arguments
    where anyone with cluster access can read them)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """HOST:PORT, or [IPv6]:PORT."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DlmError("config_error", f"{what}: expected HOST:PORT (a port from 1 to 65535), not {text!r}")
    return host, int(port)


TOKEN_MIN_CHARS = 16


def read_token_file(path: str | os.PathLike) -> str:
    """The token in `path`, a file that must be the user's own with no group or other permissions."""
    p = Path(path).expanduser()
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise DlmError("config_error", f"token file {p} does not exist") from None
    except OSError as exc:
        raise DlmError("config_error", f"cannot read token file {p}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise DlmError("config_error", f"token file {p} is not a regular file")
        if st.st_uid != os.getuid():
            raise DlmError("config_error", f"token file {p} belongs to another user; it must be your own, mode 0600")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise DlmError("config_error", f"token file {p} has mode {mode:04o}; it must be 0600 "
                                           f"(readable by you alone): chmod 600 {p}")
        token = f.read(LIMITS.hello_bytes).decode("utf-8", "replace").strip()
    if len(token) < TOKEN_MIN_CHARS:
        raise DlmError("config_error", f"token file {p} holds no token of at least {TOKEN_MIN_CHARS} characters; "
                                       "make one: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return token


def default_model_dir() -> Path:
    """The shipped default model (model/default), found without importing the model package."""
    spec = importlib.util.find_spec("dlm_ls.model")
    if spec is None or not spec.submodule_search_locations:
        raise DlmError("model_error", "the dlm_ls.model package is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "default"


def resolve_model_dir(model: str | None) -> Path:
    path = Path(model).expanduser() if model else default_model_dir()
    if not (path / "config.json").is_file():
        if model:
            raise DlmError("model_error", f"no model checkpoint at {path} (expected config.json there)")
        raise DlmError("model_error", f"the shipped default model is missing at {path}; "
                                      "pass --model DIR (or the `model` setting) with a checkpoint folder")
    return path.resolve()
