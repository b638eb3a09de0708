"""The network: a LLaMA/Qwen2-style transformer without a causal restriction of its own.

Reads top to bottom: norm, rotary embedding, attention, feed-forward, block, model. Who sees
whom is not decided here: every call passes an explicit boolean mask (True = attend), built
by `model/layout.py`, so one network serves training (packed examples), context prefill
(causal) and canvas refinement (bidirectional canvas over a cached context).

Parameter names follow Hugging Face's Qwen2 (`model.layers.0.self_attn.q_proj.weight`), so
Qwen2-layout diffusion checkpoints load with no renaming. The network knows nothing of
tokenizers, files or the sampler.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.canvas_attention import canvas_attention
from .config import ModelConfig

# One layer's keys and values for a stretch of tokens: two (b, n_kv_heads, S, head_dim) tensors,
# where b is the batch or 1 for a segment shared by the whole batch (a cached context).
KV = tuple[Tensor, Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32: bf16 sums of squares lose the small channels.
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_tables(cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """cos and sin for every position: two (max_position, head_dim // 2) fp32 tables."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    angles = torch.outer(torch.arange(cfg.max_position, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, D) by (B, 1, T, D/2) angles, halves layout (as Qwen2/LLaMA in transformers)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, bias: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, past: list[KV], mask: Tensor | None) -> tuple[Tensor, KV]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = canvas_attention(q, [*past, (k, v)], mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), (k, v)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, bias=cfg.layout == "dream")  # Qwen2 keeps q/k/v biases
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, past: list[KV], mask: Tensor | None) -> tuple[Tensor, KV]:
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, past, mask)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), kv


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class DiffusionLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Not buffers: .to(bf16) would round the angles, and they are not part of a checkpoint.
        self._rope: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def rope(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """fp32 (max_position, D/2) cos and sin tables on `device`, built once per device."""
        if device not in self._rope:
            self._rope[device] = tuple(t.to(device) for t in rope_tables(self.config))
        return self._rope[device]

    def init_weights(self, seed: int = 0) -> "DiffusionLM":
        """Small-normal init with the output projections scaled by depth (GPT-2's recipe)."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
                continue
            std = 0.02 / (2 * self.config.n_layers) ** 0.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def hidden(self, tokens: Tensor, positions: Tensor, mask: Tensor | None,
               past: list[list[KV]] | None = None) -> tuple[Tensor, list[KV]]:
        """The final-normed hidden states (B, T, dim) and each layer's new keys/values (B, Hkv, T, D).

        Training calls this directly and applies the output layer only at the positions it scores:
        on a CPU the vocabulary-wide projection of every token costs as much as the rest of the network.
        """
        if positions.max() >= self.config.max_position:
            raise ValueError(f"position {int(positions.max())} exceeds max_position {self.config.max_position}")
        x = self.model.embed_tokens(tokens)  # (B, T, dim)
        cos_table, sin_table = self.rope(tokens.device)
        cos = cos_table[positions].unsqueeze(1)  # (B, 1, T, D/2)
        sin = sin_table[positions].unsqueeze(1)
        new_kv: list[KV] = []
        for i, layer in enumerate(self.model.layers):
            x, kv = layer(x, cos, sin, past[i] if past is not None else [], mask)
            new_kv.append(kv)
        return self.model.norm(x), new_kv

    def forward(
        self,
        tokens: Tensor,  # (B, T) token ids
        positions: Tensor,  # (B, T) absolute positions
        mask: Tensor | None,  # (B, 1, T, S + T) bool, True = attend; S = total past length; None = attend to all
        past: list[list[KV]] | None = None,  # per layer, the cached segments the T tokens may attend to
        logits_from: int = 0,  # logits only for tokens[:, logits_from:]; T skips the output layer
    ) -> tuple[Tensor | None, list[KV]]:
        """Returns the logits (B, T - logits_from, V) and each layer's new keys/values (B, Hkv, T, D)."""
        h, new_kv = self.hidden(tokens, positions, mask, past)
        if logits_from >= tokens.shape[1]:
            return None, new_kv
        return self.lm_head(h[:, logits_from:]), new_kv  # (B, T', V)



def token_logits(logits: Tensor, config: ModelConfig) -> Tensor:
    """Logits (B, T, V) from position 0 on, aligned so that position i scores token i. Our layout
    already is; Dream-family checkpoints (`config.logits_shift`) predict token i at position i - 1,
    and their first position predicts itself."""
    if not config.logits_shift:
        return logits
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
