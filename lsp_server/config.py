"""Settings of the language server: the one place where their defaults live.

Precedence, lowest first: these defaults, `dlm-ls serve` flags, the client's
`initializationOptions`, then `workspace/didChangeConfiguration`. Keys may be written
camelCase (`maxContextChars`, as editors do) or snake_case, at the top level or under a
`dlm` / `dlm-ls` section. This module knows nothing of LSP, sockets or models.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from ..model.prompt import EXTRA_CONTEXT_CHARS
from ..worker.config import WorkerConfig
from ..worker.protocol import LIMITS, DlmError, WorkerAddress
from .policy import CACHE_ENTRIES

WORKER = WorkerConfig()  # the worker's defaults, which these settings share

# Sampler fields the client may override per server; None means "the checkpoint's sampler.json".
SAMPLER_KEYS = ("strategy", "threshold", "max_steps", "block_size", "canvas_lengths", "max_tokens", "min_tokens",
                "temperature")


@dataclass
class Settings:
    model: str | None = WORKER.model  # checkpoint folder; None = the shipped default model (model/default)
    device: str = WORKER.device  # auto | cpu | cuda | cuda:N; auto takes the GPU when torch sees one
    dtype: str | None = WORKER.dtype  # fp32 | bf16 | fp16; None = bf16 on a GPU, fp32 on a CPU
    in_process: bool = False  # run the engine inside the server (tests, single-user setups); imports torch
    # Where the worker is: None (or "unix:") = this user's own worker for the model and device, started
    # when needed; "unix:PATH", a team worker at "tcp://HOST:PORT" / "tls://HOST:PORT", or a Ray Serve cluster at
    # "http(s)://HOST:PORT/ROUTE" (docs/team.md).
    worker: str | None = None
    token_file: str | None = None  # the team worker's token (a file of the user's own, mode 0600)
    tls_ca_file: str | None = None  # the certificate (or CA) a tls:// worker is checked against; None = the system's
    # Replay the refinement step as a CUDA graph at bucketed shapes (model/captured.py). GPU only; a
    # worker already running for the model and device keeps the setting it was started with.
    captured_step: bool = WORKER.captured_step
    # A message whose Content-Length is above this ends the stream (its bytes cannot be framed): one
    # clear log line and a non-zero exit, never a multi-GB read.
    max_message_bytes: int = LIMITS.max_message_bytes
    idle_timeout_s: float = WORKER.idle_timeout_s  # a worker with no request for this long exits
    spawn_timeout_s: float = 180.0  # how long a new worker may take to import torch and load the model
    request_timeout_s: float = 60.0  # one completion, end to end; then a clear error, never a hang
    debounce_ms: int = 15  # wait this long for the next keystroke before asking the model (0 = never wait)
    max_context_chars: int = 16_000  # each side of the cursor; the engine then cuts to its token budget
    max_context_tokens: int | None = WORKER.max_context_tokens  # None = the engine's own limit
    max_jobs: int = WORKER.max_jobs  # concurrent requests one worker accepts; more get a "busy" error
    threads: int | None = WORKER.threads  # torch CPU threads for the engine (None = WorkerConfig's rule)
    stream_refinement: bool = False  # send dlm/refinement notifications with each refinement step
    # textDocument/completion: "auto" serves it only to clients without inline completion (VS Code
    # would otherwise show every suggestion twice and run the model twice per keystroke).
    completion_fallback: str = "auto"  # auto | always | never
    max_syntax_chars: int = 1_000_000  # larger documents get line rules instead of a parse tree
    # Among candidate lengths, show the cleaned one that leaves the fewest parse errors and never one
    # that adds errors (postprocess.choose_best); false = the best-scored cleaned candidate.
    parse_filter: bool = True
    # Free suggestions (policy.py):
    cache_entries: int = CACHE_ENTRIES  # suggestions remembered by context (0 = no cache)
    speculative: bool = True  # after showing a suggestion, compute the next as if it were accepted
    warm: bool = True  # compute a document's context cache when it opens and when typing pauses
    warm_delay_ms: int = 400  # "typing paused": this long after the last edit with no completion request
    # Chunks of other open documents shown to the model before the prefix (extra_context.py); they
    # take this many characters of the prefix's budget (0 = none).
    extra_context_chars: int = EXTRA_CONTEXT_CHARS
    # Chunks scoring below this are left out (extra_context.py: identifier overlap 0..1, +1 for a
    # chunk that defines a name the cursor line uses, +0.2/+0.5 for imported modules and names).
    extra_context_min_score: float = 0.0
    hole_marker: str = "<|hole|>"  # dlm/fill fills every occurrence ...
    python_ellipsis_holes: bool = True  # ... and, in Python, every lone `...` statement
    # Sampler overrides (None = the model's sampler.json):
    strategy: str | None = None
    threshold: float | None = None
    max_steps: int | None = None
    block_size: int | None = None
    canvas_lengths: tuple[int, ...] | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None  # no suggestion shorter than this many tokens (the model may not end before)
    temperature: float | None = None
    log_level: str = "info"  # debug | info | warning | error
    log_file: str | None = None  # also log here (the server always logs to stderr, which editors keep)
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept so the log shows them

    def sampler_overrides(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in SAMPLER_KEYS if getattr(self, k) is not None}
        if "canvas_lengths" in out:
            out["canvas_lengths"] = list(out["canvas_lengths"])
        return out

    def worker_config(self, **where: Any) -> WorkerConfig:
        """The worker these settings ask for (`where`: its model folder and socket, once resolved)."""
        mine = {"model": self.model, "device": self.device, "dtype": self.dtype,
                "idle_timeout_s": self.idle_timeout_s, "max_jobs": self.max_jobs,
                "max_context_tokens": self.max_context_tokens, "captured_step": self.captured_step,
                "threads": self.threads}
        return WorkerConfig(**{**mine, **where})

    def backend_key(self) -> tuple:
        """The settings that choose the engine: when one changes, the server switches backends."""
        return (self.model, self.device, self.dtype, self.in_process, self.worker, self.token_file, self.tls_ca_file,
                self.threads)

    def public(self) -> dict[str, Any]:
        """What `dlm/status` and the start-up log show."""
        d = dataclasses.asdict(self)
        if d["canvas_lengths"] is not None:
            d["canvas_lengths"] = list(d["canvas_lengths"])
        if not d["extra"]:
            d.pop("extra")
        return d

    def merged(self, data: Any) -> tuple["Settings", list[str]]:
        """A copy with `data` applied; bad keys are skipped and described in the returned list."""
        problems: list[str] = []
        if data is None:
            return dataclasses.replace(self), problems
        if not isinstance(data, dict):
            return dataclasses.replace(self), [f"settings must be an object, not {type(data).__name__}"]
        data = _section(data)
        changes: dict[str, Any] = {}
        extra = dict(self.extra)
        for raw_key, value in data.items():
            key = _snake(str(raw_key))
            if key not in _FIELDS or key == "extra":
                extra[str(raw_key)] = value
                continue
            try:
                changes[key] = _coerce(key, value)
            except DlmError as exc:
                problems.append(exc.message)
        if extra:
            problems.append("unknown settings ignored: " + ", ".join(sorted(extra)))
        return dataclasses.replace(self, **changes, extra=extra), problems


def _section(data: dict[str, Any]) -> dict[str, Any]:
    for name in ("dlm", "dlm-ls", "dlmLs", "dlm_ls"):
        inner = data.get(name)
        if isinstance(inner, dict):
            rest = {k: v for k, v in data.items() if k != name}
            return {**rest, **inner}
    return data


def _snake(key: str) -> str:
    key = key.replace("-", "_")
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).lower()


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_OPTIONAL = {"model", "dtype", "max_context_tokens", "log_file", "worker", "token_file", "tls_ca_file", *SAMPLER_KEYS}
_CHOICES = {
    "log_level": ("debug", "info", "warning", "error"),
    "strategy": ("parallel", "ar"),
    "dtype": ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16", "auto"),
    "completion_fallback": ("auto", "always", "never"),
}
_INTS = {"debounce_ms", "max_context_chars", "max_syntax_chars", "max_context_tokens", "max_jobs", "max_steps",
         "block_size", "max_tokens", "min_tokens", "cache_entries", "warm_delay_ms", "extra_context_chars",
         "max_message_bytes", "threads"}
_ZERO_OK = {"debounce_ms", "cache_entries", "warm_delay_ms", "extra_context_chars", "min_tokens"}  # 0 switches the feature off
_FLOATS = {"idle_timeout_s", "spawn_timeout_s", "request_timeout_s", "threshold", "temperature",
           "extra_context_min_score"}
# Settings that size what the worker allocates or the server reads, and the limit (worker/protocol.py
# LIMITS) each must stay under: the same bounds the worker enforces on any client.
_LIMITED = {"max_tokens": "max_tokens", "block_size": "max_tokens", "min_tokens": "max_tokens", "max_steps": "max_steps",
            "max_context_tokens": "max_context_tokens", "max_message_bytes": "max_message_bytes",
            "max_context_chars": "max_document_chars", "max_syntax_chars": "max_document_chars"}
_BOOLS = {"in_process", "stream_refinement", "speculative", "warm", "python_ellipsis_holes", "parse_filter",
          "captured_step"}


def _coerce(key: str, value: Any) -> Any:
    def bad(why: str) -> DlmError:
        return DlmError("config_error", f"setting {key!r}: {why} (got {value!r})")

    if value is None or (value == "" and key in _OPTIONAL):  # editors send "" for an unset text setting
        if key in _OPTIONAL:
            return None
        raise bad("may not be null")
    if key in _BOOLS:
        if isinstance(value, bool):
            return value
        raise bad("must be true or false")
    if key in _INTS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise bad("must be an integer")
        if value < 0 or (value == 0 and key not in _ZERO_OK):
            raise bad("must be positive")
        if key in _LIMITED:
            LIMITS.check(f"setting {key!r}", int(value), _LIMITED[key], "config_error")
        return int(value)
    if key in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("must be a number")
        if value < 0:
            raise bad("must not be negative")
        if key == "threshold" and value > 1:
            raise bad("must be between 0 and 1")
        return float(value)
    if key == "canvas_lengths":
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value or not all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value):
            raise bad("must be a non-empty list of positive integers")
        LIMITS.check(f"the number of lengths in setting {key!r}", len(value), "max_canvas_lengths", "config_error")
        LIMITS.check(f"the longest length in setting {key!r}", max(value), "max_canvas_length", "config_error")
        return tuple(value)
    if not isinstance(value, str):
        raise bad("must be a string")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise bad("must be one of " + ", ".join(_CHOICES[key]))
    if key == "device" and not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
        raise bad("must be auto, cpu, cuda or cuda:N")
    if key == "worker":
        try:
            WorkerAddress.parse(value)
        except DlmError as exc:
            raise bad(exc.message) from None
    return value
