"""A standby spare for the worker: after a kill -9 it serves in the worker's place within a second.

Most of a worker's start is `import torch` (2-3 s on a small CPU); loading the shipped model takes a
fraction of a second. So the worker forks a spare right after importing torch, before it touches a
device or runs an op (a fork is only safe then: no CUDA context, no OpenMP pool in use). The spare
waits on a pipe from its worker:

- the worker says SERVING once it listens, which arms the spare;
- the worker says DISMISS when it exits of its own accord (shutdown, signal, idle timeout, a load
  that failed): the spare exits;
- the pipe closes with no DISMISS after SERVING: the worker died (kill -9, a crash). The spare then
  forks a spare of its own, loads the model and takes over the socket (the server removes the
  dead worker's socket file). A worker that dies before it ever served is not replaced, so a model
  that crashes at load cannot loop.

While a spare waits, or has taken over but does not listen yet, it holds an exclusive flock on
`<socket>.spare`. A client that finds no worker on the socket asks `await_takeover` before
spawning one, so it waits for the spare instead of starting a second worker. A flock dies with its
process, so a dead spare never leaves a stale claim.

Knows processes, pipes and file locks; nothing of models, torch or the wire protocol.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("dlm_ls.worker.standby")

SERVING, DISMISS = b"s", b"x"
POLL_S = 0.02  # how often a waiting client looks at the socket and the spare's lock


def spare_lock_path(socket_path: Path) -> Path:
    return Path(socket_path).with_suffix(".spare")


def spare_waiting(socket_path: Path) -> bool:
    """Whether a spare for this socket is alive (or taking over and not listening yet)."""
    try:
        fd = os.open(spare_lock_path(socket_path), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock we may have taken
    return False


def await_takeover(socket_path: Path, alive: Callable[[Path], bool], timeout_s: float) -> bool:
    """Wait while a spare is taking over `socket_path`; True once a worker answers there.

    False at once when no spare is waiting, or when the spare gave up or the time ran out: the
    caller then starts a worker itself.
    """
    deadline = time.monotonic() + timeout_s
    while spare_waiting(socket_path):
        if alive(socket_path):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return alive(socket_path)


class Standby:
    """The serving process's end of its spare: arm it once listening, dismiss it on a clean exit."""

    def __init__(self, pid: int | None, pipe: int | None, claim: int | None):
        self.pid, self._pipe, self._claim = pid, pipe, claim

    def serving(self) -> None:
        """The socket listens: drop this process's claim (it is a worker now) and arm the spare."""
        if self._claim is not None:
            os.close(self._claim)
            self._claim = None
        self._say(SERVING)

    def dismiss(self, timeout_s: float = 5.0) -> None:
        """A clean exit: the spare exits too, and is reaped here."""
        if self._claim is not None:
            os.close(self._claim)
            self._claim = None
        self._say(DISMISS)
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
        if self.pid is None:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(self.pid, os.WNOHANG)[0] == 0:
                    time.sleep(POLL_S)
                    continue
            self.pid = None
            return
        log.warning("the spare (pid %d) did not exit; ending it", self.pid)
        with contextlib.suppress(OSError):
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        self.pid = None

    def _say(self, word: bytes) -> None:
        if self._pipe is not None:
            with contextlib.suppress(OSError):  # a spare that died already: nothing to tell
                os.write(self._pipe, word)


def start(socket_path: Path) -> Standby:
    """Fork a spare for the worker about to serve `socket_path`; returns in the process that serves.

    Call it before touching a device or running any torch op. The process it returns in is either
    the caller, or a spare whose worker was killed: that one takes the worker's place, with a new
    spare of its own, and still holds the claim until `Standby.serving()`.
    """
    claim: int | None = None
    while True:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid:
            os.close(read_end)
            return Standby(pid, write_end, claim)
        # the spare
        os.close(write_end)
        if claim is not None:
            os.close(claim)  # the worker-to-be keeps its claim until it listens; ours comes after it
        claim = _claim(socket_path)
        if not _worker_died_serving(read_end):
            os._exit(0)
        os.close(read_end)
        log.warning("the worker died; its spare (pid %d) takes over %s", os.getpid(), socket_path)


def _claim(socket_path: Path) -> int:
    """An exclusive flock on the spare's lock file, waited for (a takeover may still hold it)."""
    fd = os.open(spare_lock_path(socket_path), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _worker_died_serving(pipe: int) -> bool:
    armed = False
    while True:
        try:
            word = os.read(pipe, 1)
        except KeyboardInterrupt:  # Ctrl-C in a terminal reaches the whole group; the worker decides
            continue
        if not word:
            return armed
        if word == DISMISS:
            return False
        armed = armed or word == SERVING
