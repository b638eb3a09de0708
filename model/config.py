"""Configuration of the network and of the sampler: the one place where their defaults live.

`ModelConfig` is what `config.json` in a checkpoint folder holds; `SamplerConfig` is what
`sampler.json` beside it holds. Neither knows anything about tensors or files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from . import tokens


@dataclass
class ModelConfig:
    vocab_size: int = 16384  # a multiple of 64 for the matrix units; ids 0..13 are the layout's tokens
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 4  # grouped-query attention: the context cache is n_heads / n_kv_heads times smaller
    ffn_dim: int = 1152  # SwiGLU hidden width
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_position: int = 16384  # longest context + canvas the RoPE tables are built for
    tie_embeddings: bool = True  # shares 8M parameters between input and output; halves the shipped size
    # How the checkpoint lays out infill (see model/tokens.py):
    #   "dlm"   our own suffix-first layout, causal context + bidirectional canvas, exact cache;
    #   "dream" natural order [prefix][mask x N][suffix], full attention, logits shifted by one;
    #   "llada" natural order, full attention, logits in place.
    layout: str = "dlm"
    logits_shift: bool = False  # Dream-family models predict token i at position i-1
    mask_id: int = tokens.MASK_ID
    pad_id: int = tokens.PAD_ID
    special_ids: dict[str, int] = field(default_factory=lambda: dict(tokens.SPECIAL_IDS))
    # The longest row (context + committed blocks + canvas) the weights were trained on, written by
    # training. Positions past it are ones the model never saw (measured: held-out NLL per token 6.68
    # at a 480-token context budget, 6.87 at 2048, for a model trained on 512-token rows), so the
    # Infiller's default context budget stays inside it. None: unknown (foreign checkpoints).
    trained_context: int | None = None

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def num_parameters(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + self.dim


PRESETS: dict[str, ModelConfig] = {
    # Random fixtures for unit tests: fast on any CPU.
    "tiny": ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_position=4096),
    # What two CPU cores can train in a couple of hours (about 8.6M parameters).
    "small": ModelConfig(dim=256, n_layers=6, n_heads=4, n_kv_heads=2, ffn_dim=704),
    # The default model trained on a GPU: about 29M parameters, 58 MB in bf16.
    "default": ModelConfig(),
}


@dataclass
class SamplerConfig:
    strategy: str = "parallel"  # "parallel": refine a block of slots at once; "ar": one token per forward pass
    threshold: float = 0.9  # commit every masked slot whose probability clears this (at least one per step)
    max_steps: int = 16  # per block; what is still masked after the last step is committed at once
    block_size: int = 32  # longer middles are decoded block by block, each finished block joining the context
    canvas_lengths: tuple[int, ...] = (8, 16, 32)  # refined together in one batch; the best-scoring one wins
    max_tokens: int = 64  # longest middle
    min_tokens: int = 1  # no pad before this many tokens: an empty suggestion is no suggestion
    temperature: float = 0.0  # 0 = deterministic argmax; above 0 samples with Gumbel noise
    seed: int | None = None  # for temperature > 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["canvas_lengths"] = list(self.canvas_lengths)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamplerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "canvas_lengths" in kwargs:
            kwargs["canvas_lengths"] = tuple(int(n) for n in kwargs["canvas_lengths"])
        return cls(**kwargs).validated()

    def replace(self, **changes: Any) -> "SamplerConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None}).validated()

    def validated(self) -> "SamplerConfig":
        if self.strategy not in ("parallel", "ar"):
            raise ValueError(f"strategy must be 'parallel' or 'ar', not {self.strategy!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], not {self.threshold}")
        if self.max_steps < 1 or self.block_size < 1 or self.max_tokens < 1:
            raise ValueError("max_steps, block_size and max_tokens must be at least 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be between 0 and max_tokens")
        if not self.canvas_lengths or min(self.canvas_lengths) < 1:
            raise ValueError("canvas_lengths must be a non-empty list of positive lengths")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        return self
