"""Open diffusion checkpoints (Dream family, LLaDA) loaded onto our own network by renaming weights.

Knows two published formats, from their Hugging Face folders (`config.json` + safetensors):

  Dream family (Dream-org/Dream-v0-*-7B, Dream-Coder-v0-*-7B, apple/DiffuCoder-7B-*):
    `model_type: "Dream"`, Qwen2 keys (`hidden_size`, `num_key_value_heads`, ...) and Qwen2
    tensor names, which are ours: nothing to rename. q/k/v projections carry biases. The
    logits are shifted by one (the output at position i predicts token i + 1), mask id 151666.
  LLaDA (GSAI-ML/LLaDA-8B-*, LLaDA-1.5): `model_type: "llada"`, OLMo-style keys (`d_model`,
    `n_layers`, `mlp_hidden_size`, `weight_tying`, ...) and names (`model.transformer.blocks.N.
    {q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out,attn_norm,ff_norm}`). Its llama block
    computes ff_out(silu(ff_proj(x)) * up_proj(x)): ff_proj is our gate_proj. Logits in place,
    mask id 126336.

Both are LLaMA-like transformers (RMSNorm, RoPE in the halves layout, SwiGLU, GQA) trained with
full bidirectional attention, so they run on `network.DiffusionLM` unchanged; `ModelConfig.layout`
("dream" / "llada") tells the engine to infill in natural order (`model/dual_cache.py`).
Variants outside that architecture (ALiBi, LayerNorm, biases LLaDA does not ship, RoPE scaling,
sliding windows, q/k norms) are refused with a clear error rather than loaded wrong. Never
`trust_remote_code`: only tensors and JSON are read. Nothing here knows about tokenizers or sampling.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from . import tokens
from .config import ModelConfig
from .checkpoint import CheckpointError, assign_weights
from .network import DiffusionLM

# RoPE tables are built for max_position positions on each device. Dream's configs say 131072,
# which would cost 64 MB per device for positions the engine's context limit never reaches.
MAX_POSITION_CAP = 32768

DREAM_MASK_ID = 151666
LLADA_MASK_ID = 126336


def detect_and_convert_config(raw: dict[str, Any]) -> ModelConfig | None:
    """A foreign config.json -> our ModelConfig; None for our own format (no `model_type`).

    Raises CheckpointError for a Hugging Face config of a model we cannot run.
    """
    kind = _kind(raw)
    if kind == "dream":
        return _dream_config(raw)
    if kind == "llada":
        return _llada_config(raw)
    if "model_type" in raw or "architectures" in raw:
        raise CheckpointError(
            f"unsupported checkpoint (model_type {raw.get('model_type')!r}, architectures {raw.get('architectures')}): "
            "dlm-ls runs its own checkpoints, Dream-family (Dream, Dream-Coder, DiffuCoder) and LLaDA")
    return None


def _kind(raw: dict[str, Any]) -> str | None:
    model_type = str(raw.get("model_type", "")).lower()
    archs = [str(a) for a in raw.get("architectures") or []]
    if model_type == "dream" or "DreamModel" in archs:
        return "dream"
    if model_type == "llada" or "LLaDAModelLM" in archs:
        return "llada"
    return None


def _refuse(name: str, why: str) -> None:
    raise CheckpointError(f"this {name} checkpoint is not supported: {why}")


def _special_ids(eos: int | None, pad: int, mask: int) -> dict[str, int]:
    ids = {tokens.PAD: pad, tokens.MASK: mask}
    if eos is not None:
        ids[tokens.ENDOFTEXT] = eos
    return ids


def _dream_config(raw: dict[str, Any]) -> ModelConfig:
    if raw.get("hidden_act", "silu") != "silu":
        _refuse("Dream", f"activation {raw['hidden_act']!r} (SwiGLU with silu only)")
    if raw.get("use_sliding_window"):
        _refuse("Dream", "sliding-window attention")
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        _refuse("Dream", f"RoPE scaling {rope}")
    dim, n_heads = raw["hidden_size"], raw["num_attention_heads"]
    if raw.get("head_dim") not in (None, dim // n_heads) or dim % n_heads:
        _refuse("Dream", f"head_dim {raw.get('head_dim')} != hidden_size / num_attention_heads")
    mask_id = raw.get("mask_token_id", DREAM_MASK_ID)
    eos = raw.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    pad = raw.get("pad_token_id") if raw.get("pad_token_id") is not None else (eos if eos is not None else mask_id)
    return ModelConfig(
        vocab_size=raw["vocab_size"],
        dim=dim,
        n_layers=raw["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=raw.get("num_key_value_heads") or n_heads,
        ffn_dim=raw["intermediate_size"],
        rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position=min(int(raw.get("max_position_embeddings", MAX_POSITION_CAP)), MAX_POSITION_CAP),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        layout="dream",
        logits_shift=True,
        mask_id=mask_id,
        pad_id=pad,
        special_ids=_special_ids(eos, pad, mask_id),
    )


def _llada_config(raw: dict[str, Any]) -> ModelConfig:
    checks = {
        "block_type": ("llama", "only the llama block (separate q/k/v and up_proj) is mapped"),
        "activation_type": ("silu", "only silu(ff_proj) * up_proj is mapped"),
        "layer_norm_type": ("rms", "only RMSNorm is mapped"),
        "rope": (True, "positions must be rotary"),
        "alibi": (False, "ALiBi"),
        "include_bias": (False, "linear biases"),
        "include_qkv_bias": (False, "q/k/v biases"),
        "attention_layer_norm": (False, "q/k layer norms"),
        "scale_logits": (False, "scaled logits"),
        "input_emb_norm": (False, "scaled input embeddings"),
        "block_group_size": (1, "block groups"),
        "bias_for_layer_norm": (False, "norm biases"),
    }
    for key, (want, why) in checks.items():
        if key in raw and raw[key] is not None and raw[key] != want:
            _refuse("LLaDA", f"{key}={raw[key]!r} ({why})")
    if raw.get("yarn"):
        _refuse("LLaDA", "YaRN RoPE scaling")
    dim, n_heads = raw["d_model"], raw["n_heads"]
    n_kv = 1 if raw.get("multi_query_attention") else (raw.get("n_kv_heads") or n_heads)
    ffn = raw.get("mlp_hidden_size") or raw.get("mlp_ratio", 4) * dim
    mask_id = raw.get("mask_token_id", LLADA_MASK_ID)
    eos = raw.get("eos_token_id")
    pad = raw.get("pad_token_id") if raw.get("pad_token_id") is not None else (eos if eos is not None else mask_id)
    return ModelConfig(
        vocab_size=raw.get("embedding_size") or raw["vocab_size"],  # the embedding's rows, padded past the tokenizer
        dim=dim,
        n_layers=raw["n_layers"],
        n_heads=n_heads,
        n_kv_heads=n_kv,
        ffn_dim=int(ffn),
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        max_position=min(int(raw.get("max_sequence_length", 4096)), MAX_POSITION_CAP),
        tie_embeddings=bool(raw.get("weight_tying", False)),
        layout="llada",
        logits_shift=False,
        mask_id=mask_id,
        pad_id=pad,
        special_ids=_special_ids(eos, pad, mask_id),
    )


# ---------------------------------------------------------------------------------------------
# Tensor names: theirs -> ours (None = not a weight of the network, skip it).

_LLADA_BLOCK = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_proj": "mlp.gate_proj",  # silu is applied to ff_proj's output: it is the gate
    "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
}
_LLADA_TOP = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}
_LLADA_BLOCK_RE = re.compile(r"^model\.transformer\.blocks\.(\d+)\.(\w+)\.weight$")


def dream_name(name: str) -> str | None:
    if name.endswith("rotary_emb.inv_freq"):
        return None  # a buffer some exports include; we build our own tables
    return name


def llada_name(name: str) -> str | None:
    if name in _LLADA_TOP:
        return _LLADA_TOP[name]
    m = _LLADA_BLOCK_RE.match(name)
    if m and m.group(2) in _LLADA_BLOCK:
        return f"model.layers.{m.group(1)}.{_LLADA_BLOCK[m.group(2)]}.weight"
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return name  # unknown: reported as unexpected below


RENAME = {"dream": dream_name, "llada": llada_name}


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no safetensors weights (pickled .bin checkpoints are not read)")
    return files


def load_foreign(folder: str | os.PathLike, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> DiffusionLM:
    """Build our network for a Dream/LLaDA folder and fill it with the checkpoint's renamed tensors.

    Tensors are read one at a time straight onto `device` in `dtype`, so the peak memory is the
    model plus one tensor, not two copies of a 7B model.
    """
    folder = Path(folder)
    if cfg.layout not in RENAME:
        raise CheckpointError(f"{folder}: no weight mapping for layout {cfg.layout!r}")
    rename = RENAME[cfg.layout]
    with torch.device("meta"):
        model = DiffusionLM(cfg)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for path in _weight_files(folder):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                ours = rename(name)
                if ours is None:
                    continue
                if ours not in expected:
                    unexpected.append(name)
                    continue
                t = f.get_tensor(name)
                if tuple(t.shape) != tuple(expected[ours].shape):
                    raise CheckpointError(f"{folder}: {name} has shape {tuple(t.shape)}, config.json implies "
                                          f"{tuple(expected[ours].shape)} for {ours}")
                state[ours] = t.to(dtype)
    assign_weights(model, state, folder, unexpected)
    return model.to(device=device, dtype=dtype).eval()
