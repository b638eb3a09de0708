"""A team worker's TCP side: what `dlm-ls worker --listen` checks at start, and each connection's hello.

`TeamListener.from_config` refuses to start (one clear `config_error`) on a token file that is not
the user's own with mode 0600, on a TLS certificate without its key, and on plain TCP at an
address other than loopback unless `--insecure` says the network is trusted. TLS is the standard
library's `ssl`.

Every TCP connection authenticates first: its first frame must be a `Hello` (worker/protocol.py)
of at most `LIMITS.hello_bytes`, arriving within `hello_timeout_s`, whose token matches the file's
(compared in constant time). Anything else gets one error frame and the connection is closed;
nothing of it reaches the scheduler. The socket server (server.py) serves the connections that
pass. This module knows nothing of models, documents or LSP.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import ssl
from dataclasses import dataclass
from typing import Any, Callable

from . import protocol
from .config import WorkerConfig
from .protocol import LIMITS, DlmError, Hello


class Refused(DlmError):
    """A connection that did not authenticate; `msgid` is its first request's, when it sent one."""

    def __init__(self, message: str, msgid: int | None = None):
        super().__init__("unauthorized", message)
        self.msgid = msgid


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything, so it is not loopback
        return False


@dataclass
class TeamListener:
    host: str
    port: int
    token: bytes
    tls: ssl.SSLContext | None
    hello_timeout_s: float = LIMITS.hello_timeout_s

    @classmethod
    def from_config(cls, cfg: WorkerConfig) -> "TeamListener | None":
        if not cfg.listen:
            return None
        host, port = protocol.parse_host_port(cfg.listen, "--listen")
        if not cfg.token_file:
            raise DlmError("config_error", "--listen needs --token-file: a file of your own, mode 0600, "
                                           "holding the token every client must present")
        token = protocol.read_token_file(cfg.token_file).encode()
        tls = None
        if cfg.tls_cert:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                tls.load_cert_chain(cfg.tls_cert, cfg.tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise DlmError("config_error", f"cannot load the TLS certificate {cfg.tls_cert} with the key "
                                               f"{cfg.tls_key}: {exc}") from None
        elif not is_loopback(host) and not cfg.insecure:
            raise DlmError("config_error", f"refusing plain TCP on {host}, which is not loopback: the token would "
                                           "cross the network in clear; give --tls-cert and --tls-key, or "
                                           "--insecure on a network you trust")
        return cls(host, port, token, tls, cfg.hello_timeout_s)

    @property
    def url(self) -> str:
        return str(protocol.WorkerAddress("tls" if self.tls else "tcp", None, self.host, self.port))

    async def start(self, serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
                    limit: int) -> asyncio.Server:
        extra: dict[str, Any] = {"ssl": self.tls, "ssl_handshake_timeout": self.hello_timeout_s} if self.tls else {}
        return await asyncio.start_server(serve, self.host, self.port, limit=limit, **extra)

    async def authenticate(self, reader: asyncio.StreamReader) -> tuple[int, Hello]:
        """The msgid and Hello of a connection's first frame, or `Refused`."""
        try:
            body = await asyncio.wait_for(self._first_frame(reader), self.hello_timeout_s)
        except asyncio.TimeoutError:
            raise Refused(f"no hello within {self.hello_timeout_s:g} s") from None
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ssl.SSLError):
            raise Refused("the connection closed before its hello") from None
        try:
            msg = protocol.decode(body)
        except protocol.ProtocolError as exc:
            raise Refused(f"the first message must be hello {{token}}: {exc}", exc.msgid) from None
        if msg.kind != protocol.REQUEST or msg.method != "hello":
            raise Refused("authenticate first: the first message must be hello {token}", msg.msgid)
        try:
            hello = Hello.from_wire(msg.params)
        except DlmError as exc:
            raise Refused(exc.message, msg.msgid) from None
        if not hmac.compare_digest(hello.token.encode("utf-8", "surrogatepass"), self.token):
            raise Refused("authentication failed: wrong token", msg.msgid)
        return msg.msgid, hello

    @staticmethod
    async def _first_frame(reader: asyncio.StreamReader) -> bytes:
        (size,) = protocol.HEADER.unpack(await reader.readexactly(protocol.HEADER.size))
        if size > LIMITS.hello_bytes:  # not read, not skipped: an unauthenticated peer gets no buffer
            raise Refused(f"the first frame is {size} bytes, above the limit hello_bytes={LIMITS.hello_bytes}")
        return await reader.readexactly(size)
