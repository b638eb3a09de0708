"""The worker's settings, the one place their defaults live: `dlm-ls worker` flags are generated from them.

The language server's `Settings` take their worker defaults from `WorkerConfig()`, and a client that
spawns a worker passes `WorkerConfig.to_argv()`, so a default is written once for both processes.
Torch-free; it knows nothing of models or LSP.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from .protocol import LIMITS, DlmError

DTYPES = ("fp32", "bf16", "fp16")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Says the default where there is one to say (not for an unset or a false flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def _flag(help: str, **argparse_kwargs: Any) -> dict[str, Any]:
    return {"help": help, **argparse_kwargs}


def default_cpu_threads(cores: int | None = None) -> int:
    """Half the cores, at most 4. Each op of a small model is microseconds of work, and every thread
    waits for the others at its end: when something else keeps one of those cores busy (a build, a
    training run, the editor), each op waits for a time slice. On this project's 2-core machine a
    line completion took 100 ms on 2 threads alone, 402 ms on 2 threads beside one spinning process,
    and 142-144 ms on 1 thread either way (`python -m dlm_ls.bench.threads`, bench/results)."""
    cores = cores or os.cpu_count() or 1
    return max(1, min(4, cores // 2))


@dataclass
class WorkerConfig:
    model: str | None = field(default=None, metadata=_flag(
        "checkpoint folder (default: the shipped model)", metavar="DIR"))
    device: str = field(default="auto", metadata=_flag("auto | cpu | cuda | cuda:N"))
    dtype: str | None = field(default=None, metadata=_flag(
        "default: bf16 on a GPU, fp32 on a CPU", choices=DTYPES))
    socket: str | None = field(default=None, metadata=_flag(
        "default: in the private runtime directory, named after the model folder and device", metavar="PATH"))
    # A worker with no request for this long exits and frees its memory.
    idle_timeout_s: float = field(default=600.0, metadata=_flag(
        "exit after this many seconds without a request (not with --listen)", flag="--idle-timeout", metavar="S"))
    # Concurrent requests one worker accepts; more get a "busy" error.
    max_jobs: int = field(default=32, metadata=_flag("concurrent requests", metavar="N"))
    # Fairness between connections (scheduler.py): one connection's requests beyond these wait or are busy.
    max_client_jobs: int = field(default=8, metadata=_flag(
        "requests one connection may have running; more wait their turn", metavar="N"))
    # torch's CPU threads for the engine (a GPU device ignores it). Default: `default_cpu_threads()`.
    threads: int | None = field(default=None, metadata=_flag(
        "torch CPU threads for the engine (default: half the cores, at most 4)", metavar="N"))
    max_client_slots: int = field(default=2048, metadata=_flag(
        "canvas slots one connection's waiting requests may hold; more are answered busy", metavar="N"))
    # A team worker (docs/team.md): TCP beside the Unix socket, every connection authenticated first.
    listen: str | None = field(default=None, metadata=_flag(
        "also serve a team on TCP at HOST:PORT (needs --token-file)", metavar="HOST:PORT"))
    token_file: str | None = field(default=None, metadata=_flag(
        "the team's token: a file of your own with mode 0600", metavar="PATH"))
    tls_cert: str | None = field(default=None, metadata=_flag("serve TLS with this certificate (PEM)", metavar="PATH"))
    tls_key: str | None = field(default=None, metadata=_flag("... and this private key (PEM)", metavar="PATH"))
    insecure: bool = field(default=False, metadata=_flag(
        "allow plain TCP on an address other than loopback (the token crosses the network in clear)"))
    hello_timeout_s: float = field(default=LIMITS.hello_timeout_s, metadata=_flag(
        argparse.SUPPRESS, flag="--hello-timeout"))
    max_frame_bytes: int = field(default=LIMITS.max_frame_bytes, metadata=_flag(argparse.SUPPRESS))
    max_context_tokens: int | None = field(default=None, metadata=_flag(
        "longest context the engine accepts (default: the engine's own limit)"))
    # Replay the refinement step as a CUDA graph at bucketed shapes (model/captured.py); GPU only.
    captured_step: bool = field(default=False, metadata=_flag(
        "replay the refinement step as a CUDA graph at bucketed shapes (GPU)"))
    # A standby process forked after `import torch` takes the socket over when the worker is killed
    # (worker/standby.py), so a crash costs a model load, not a whole start.
    no_spare: bool = field(default=False, metadata=_flag(
        "no standby process (it takes over within a second when the worker is killed)"))
    debug: bool = field(default=False, metadata=_flag("log every request"))

    def checked(self) -> "WorkerConfig":
        """These settings, or a DlmError("config_error") naming the flag that is wrong."""
        if self.max_context_tokens is not None:
            LIMITS.check("--max-context-tokens", self.max_context_tokens, "max_context_tokens", "config_error")
        for name in ("max_jobs", "max_client_jobs", "max_client_slots"):
            if getattr(self, name) < 1:
                raise DlmError("config_error", f"--{name.replace('_', '-')} must be at least 1")
        team = {"--token-file": self.token_file, "--tls-cert": self.tls_cert, "--tls-key": self.tls_key,
                "--insecure": self.insecure}
        if not self.listen and any(team.values()):
            raise DlmError("config_error", f"{', '.join(k for k, v in team.items() if v)} only apply with --listen")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise DlmError("config_error", "--tls-cert and --tls-key go together")
        return self

    def cpu_threads(self) -> int:
        return self.threads if self.threads and self.threads > 0 else default_cpu_threads()

    @staticmethod
    def flag(f: dataclasses.Field) -> str:
        return f.metadata.get("flag") or "--" + f.name.replace("_", "-")

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser, names: tuple[str, ...] | None = None,
                      unset: bool = False) -> None:
        """Add the flags of these fields (all by default). `unset`: a flag not given parses as None, so a
        caller with settings of its own (`dlm-ls serve`) overrides only what was typed; the help then
        says the default itself."""
        for f in dataclasses.fields(cls):
            if names is not None and f.name not in names:
                continue
            kwargs = {k: v for k, v in f.metadata.items() if k != "flag"}
            if unset and f.default not in (None, False) and kwargs.get("help") != argparse.SUPPRESS:
                kwargs["help"] = f"{kwargs['help']} (default: {f.default:g})" if isinstance(f.default, float) \
                    else f"{kwargs['help']} (default: {f.default})"
            if f.type in ("bool", bool):
                p.add_argument(cls.flag(f), dest=f.name, action="store_true", default=None if unset else False,
                               **kwargs)
            else:
                kind = int if f.type in ("int", "int | None") else float if f.type == "float" else str
                p.add_argument(cls.flag(f), dest=f.name, type=kind, default=None if unset else f.default, **kwargs)

    @classmethod
    def parser(cls, prog: str = "dlm-ls worker", description: str | None = None) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_DefaultsFormatter)
        cls.add_arguments(p)
        return p

    @classmethod
    def from_argv(cls, argv: list[str] | None = None, description: str | None = None) -> "WorkerConfig":
        return cls(**vars(cls.parser(description=description).parse_args(argv)))

    def to_argv(self) -> list[str]:
        """The flags that start a worker with these settings (only those that differ from the defaults)."""
        out: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default or value is None:
                continue
            out += [self.flag(f)] if value is True else [self.flag(f), str(value)]
        return out
