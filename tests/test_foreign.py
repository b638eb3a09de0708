"""Dream-family and LLaDA checkpoints on our network, and natural-order infilling with a dual cache.

Tiny random checkpoints are written in each model's exact format (config.json keys, tensor
names, safetensors, sharded with an index where the 7B models are), loaded through
`load.load_model`, and checked against an independent forward: transformers' own Qwen2 for the
Dream family (run with a full bidirectional mask, as Dream runs it), and a plain-torch LLaDA
written here from its published modeling code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dlm_ls.model import dual_cache, foreign, load
from dlm_ls.model.config import ModelConfig
from dlm_ls.model.load import CheckpointError

VOCAB = 300


def _save_hf_folder(folder: Path, state: dict[str, torch.Tensor], config: dict, shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    if shards == 1:
        save_file({n: state[n].contiguous() for n in names}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: state[n].contiguous() for n in part}, str(folder / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


# ---------------------------------------------------------------------------------------------
# Dream family: Qwen2 names and keys, checked against transformers' Qwen2ForCausalLM


def _dream_reference(tie: bool, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.3,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=tie)
    hf._attn_implementation = "eager"  # plain matmul-softmax, independent of our SDPA path
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(hf).eval()
    with torch.no_grad():  # HF inits biases to 0 and norms to 1: make every tensor count
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
        model.lm_head.weight.mul_(3.0)  # confidences spread over 0.3-0.95: some steps commit several slots, some one
    config = {
        "architectures": ["DreamModel"], "model_type": "Dream", "hidden_act": "silu",
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "vocab_size": VOCAB,
        "tie_word_embeddings": tie, "max_position_embeddings": 256, "mask_token_id": VOCAB - 2,
        "pad_token_id": VOCAB - 3, "eos_token_id": VOCAB - 3, "bos_token_id": VOCAB - 3,
        "rope_scaling": None, "use_sliding_window": False, "sliding_window": None, "torch_dtype": "float32",
    }
    state = {k: v for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    return model, config, state


@pytest.fixture(scope="module")
def dream_dir(tmp_path_factory):
    model, config, state = _dream_reference(tie=False)
    folder = _save_hf_folder(tmp_path_factory.mktemp("dream"), state, config, shards=3)
    return folder, model


@pytest.mark.parametrize("tie", [False, True])
def test_dream_logits_match_transformers_qwen2_with_full_attention(tmp_path, tie):
    ref, config, state = _dream_reference(tie, seed=1)
    folder = _save_hf_folder(tmp_path / "dream", state, config, shards=1 if tie else 2)
    model = load.load_model(folder, device="cpu", dtype="fp32")
    cfg = model.config
    assert (cfg.layout, cfg.logits_shift, cfg.mask_id, cfg.pad_id, cfg.tie_embeddings) == (
        "dream", True, VOCAB - 2, VOCAB - 3, tie)
    tokens = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(23).expand(2, 23)
    with torch.no_grad():
        ours, _ = model(tokens, positions, None)  # None: every token attends to every token
        full = torch.zeros(2, 1, 23, 23)  # an additive 4D mask of zeros: transformers uses it as given
        theirs = ref(tokens, attention_mask=full).logits
        causal = ref(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert (ours - causal).abs().max() > 1e-2  # the mask did make it bidirectional


# ---------------------------------------------------------------------------------------------
# LLaDA: its own names and keys, checked against a plain-torch forward of its architecture


def _llada_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, hd = cfg["d_model"], cfg["d_model"] // cfg["n_heads"]
    kv, ff, V = cfg["n_kv_heads"] * hd, cfg["mlp_hidden_size"], cfg["embedding_size"]

    def w(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    state = {"model.transformer.wte.weight": w(V, d, scale=1.0),
             "model.transformer.ln_f.weight": 1 + w(d, scale=0.3)}
    if not cfg["weight_tying"]:
        state["model.transformer.ff_out.weight"] = w(V, d, scale=1.0)
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        state.update({p + "q_proj.weight": w(d, d), p + "k_proj.weight": w(kv, d), p + "v_proj.weight": w(kv, d),
                      p + "attn_out.weight": w(d, d), p + "ff_proj.weight": w(ff, d), p + "up_proj.weight": w(ff, d),
                      p + "ff_out.weight": w(d, ff), p + "attn_norm.weight": 1 + w(d, scale=0.3),
                      p + "ff_norm.weight": 1 + w(d, scale=0.3)})
    return state


def _llada_config(tie: bool) -> dict:
    return {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu", "alibi": False,
        "block_type": "llama", "block_group_size": 1, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
        "mlp_hidden_size": 80, "mlp_ratio": 4, "rope": True, "rope_theta": 500000.0, "rope_full_precision": True,
        "rms_norm_eps": 1e-5, "layer_norm_type": "rms", "layer_norm_with_affine": True, "bias_for_layer_norm": False,
        "include_bias": False, "include_qkv_bias": False, "attention_layer_norm": False, "scale_logits": False,
        "input_emb_norm": False, "vocab_size": VOCAB - 20, "embedding_size": VOCAB, "max_sequence_length": 128,
        "mask_token_id": VOCAB - 30, "eos_token_id": VOCAB - 40, "pad_token_id": VOCAB - 40, "weight_tying": tie,
        "use_cache": False, "flash_attention": False,
    }


def llada_reference_forward(state: dict[str, torch.Tensor], cfg: dict, tokens: torch.Tensor) -> torch.Tensor:
    """LLaDA's llama-block forward without a causal mask, after GSAI-ML's modeling_llada.py."""
    nh, nkv, d = cfg["n_heads"], cfg["n_kv_heads"], cfg["d_model"]
    hd, eps, B, T = d // nh, cfg["rms_norm_eps"], *tokens.shape

    def rms(x, w):  # RMSLayerNorm: normalise in fp32, then scale
        return w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps))

    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
    freqs = torch.einsum("i,j->ij", torch.arange(T, dtype=torch.float), inv_freq)
    pos = torch.cat((freqs, freqs), dim=-1)
    sin, cos = pos.sin()[None, None], pos.cos()[None, None]

    def rotate_half(x):
        x1, x2 = x.view(B, x.shape[1], T, 2, hd // 2).unbind(dim=-2)
        return torch.cat((-x2, x1), dim=-1)

    x = F.embedding(tokens, state["model.transformer.wte.weight"])
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = rms(x, state[p + "attn_norm.weight"])
        q = (h @ state[p + "q_proj.weight"].T).view(B, T, nh, hd).transpose(1, 2)
        k = (h @ state[p + "k_proj.weight"].T).view(B, T, nkv, hd).transpose(1, 2)
        v = (h @ state[p + "v_proj.weight"].T).view(B, T, nkv, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v  # no mask: bidirectional
        x = x + att.transpose(1, 2).reshape(B, T, d) @ state[p + "attn_out.weight"].T
        h = rms(x, state[p + "ff_norm.weight"])
        gate, up = h @ state[p + "ff_proj.weight"].T, h @ state[p + "up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ state[p + "ff_out.weight"].T
    x = rms(x, state["model.transformer.ln_f.weight"])
    head = state["model.transformer.wte.weight"] if cfg["weight_tying"] else state["model.transformer.ff_out.weight"]
    return x @ head.T


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory):
    cfg = _llada_config(tie=False)
    return _save_hf_folder(tmp_path_factory.mktemp("llada"), _llada_state(cfg), cfg, shards=2), cfg


@pytest.mark.parametrize("tie", [False, True])
def test_llada_logits_match_an_independent_forward(tmp_path, tie):
    cfg = _llada_config(tie)
    state = _llada_state(cfg, seed=2)
    folder = _save_hf_folder(tmp_path / "llada", state, cfg)
    model = load.load_model(folder, device="cpu", dtype="fp32")
    mc = model.config
    assert (mc.layout, mc.logits_shift, mc.mask_id, mc.vocab_size, mc.ffn_dim) == ("llada", False, VOCAB - 30, VOCAB, 80)
    tokens = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(tokens, torch.arange(19).expand(2, 19), None)
    torch.testing.assert_close(ours, llada_reference_forward(state, cfg, tokens), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Config detection


DREAM_7B = {  # Dream-org/Dream-v0-Instruct-7B's config.json, less auto_map
    "architectures": ["DreamModel"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "mask_token_id": 151666, "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "Dream",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "pad_token_id": 151643,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": False, "use_sliding_window": False,
    "vocab_size": 152064,
}
LLADA_8B = {  # GSAI-ML/LLaDA-8B-Instruct's config.json, the keys that matter
    "architectures": ["LLaDAModelLM"], "activation_type": "silu", "alibi": False, "block_type": "llama",
    "block_group_size": 1, "d_model": 4096, "embedding_size": 126464, "eos_token_id": 126081, "include_bias": False,
    "include_qkv_bias": False, "layer_norm_type": "rms", "mask_token_id": 126336, "max_sequence_length": 4096,
    "mlp_hidden_size": 12288, "model_type": "llada", "n_heads": 32, "n_kv_heads": 32, "n_layers": 32,
    "pad_token_id": 126081, "rms_norm_eps": 1e-05, "rope": True, "rope_theta": 500000.0, "scale_logits": False,
    "vocab_size": 126464, "weight_tying": False,
}


def test_published_configs_convert():
    d = foreign.detect_and_convert_config(DREAM_7B)
    assert (d.dim, d.n_layers, d.n_heads, d.n_kv_heads, d.head_dim, d.ffn_dim, d.vocab_size) == (
        3584, 28, 28, 4, 128, 18944, 152064)
    assert (d.layout, d.logits_shift, d.mask_id, d.pad_id, d.rope_theta, d.norm_eps, d.tie_embeddings) == (
        "dream", True, 151666, 151643, 1e6, 1e-6, False)
    assert d.max_position == foreign.MAX_POSITION_CAP
    ll = foreign.detect_and_convert_config(LLADA_8B)
    assert (ll.dim, ll.n_layers, ll.n_heads, ll.n_kv_heads, ll.ffn_dim, ll.vocab_size, ll.max_position) == (
        4096, 32, 32, 32, 12288, 126464, 4096)
    assert (ll.layout, ll.logits_shift, ll.mask_id, ll.pad_id, ll.rope_theta, ll.tie_embeddings) == (
        "llada", False, 126336, 126081, 5e5, False)
    assert foreign.detect_and_convert_config(ModelConfig.preset("tiny").to_dict()) is None  # our own format


@pytest.mark.parametrize("raw", [
    {**LLADA_8B, "alibi": True, "rope": False},
    {**LLADA_8B, "include_qkv_bias": True},
    {**DREAM_7B, "rope_scaling": {"type": "yarn", "factor": 4.0}},
    {**DREAM_7B, "use_sliding_window": True},
    {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64},
])
def test_unsupported_configs_are_refused(raw):
    with pytest.raises(CheckpointError):
        foreign.detect_and_convert_config(raw)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, llada_dir):
    folder, cfg = llada_dir
    state = _llada_state(cfg)
    state["model.transformer.blocks.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="unexpected"):
        load.load_model(_save_hf_folder(tmp_path / "extra", state, cfg), device="cpu")
    state = _llada_state(cfg)
    del state["model.transformer.blocks.1.up_proj.weight"]
    with pytest.raises(CheckpointError, match="missing"):
        load.load_model(_save_hf_folder(tmp_path / "missing", state, cfg), device="cpu")


# ---------------------------------------------------------------------------------------------
# Natural-order infilling with the dual cache


def no_cache_infill(model, prefix, suffix, n, block, threshold, max_steps, mask_id, shift):
    """The same commit rule with a full forward at every step: written independently, as a reference."""
    x = [*prefix, *[mask_id] * n, *suffix]
    L, nfe = len(x), 0
    for b0 in range(0, n, block):
        lo, hi = len(prefix) + b0, len(prefix) + min(b0 + block, n)
        for step in range(max_steps):
            masked = [i for i in range(lo, hi) if x[i] == mask_id]
            if not masked:
                break
            with torch.no_grad():
                logits = model(torch.tensor([x]), torch.arange(L)[None], None)[0][0]
            nfe += 1
            if shift:  # Dream's convention: position i - 1 predicts token i, position 0 itself
                logits = torch.cat([logits[:1], logits[:-1]])
            slot = logits[masked].float()
            slot[:, mask_id] = float("-inf")  # a slot never becomes the mask token
            conf, tok = torch.softmax(slot, -1).max(-1)
            if step == max_steps - 1:
                take = list(range(len(masked)))
            elif (conf >= threshold).any():
                take = [j for j in range(len(masked)) if conf[j] >= threshold]
            else:
                take = [int(conf.argmax())]
            for j in take:
                x[masked[j]] = int(tok[j])
    return x[len(prefix):len(prefix) + n], nfe


def _count_passes(model):
    lengths: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    return lengths, handle


@pytest.mark.parametrize("which", ["dream", "llada"])
def test_block_pass_over_a_fresh_cache_equals_the_full_pass(which, dream_dir, llada_dir):
    folder = dream_dir[0] if which == "dream" else llada_dir[0]
    model = load.load_model(folder, device="cpu", dtype="fp32")
    shift = model.config.logits_shift
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 250, (1, 30), generator=g)
    x[0, 8:20] = model.config.mask_id
    positions = torch.arange(30)[None]
    with torch.inference_mode():
        logits, cache = dual_cache.full_pass(model, x, positions)
        for lo, hi in ((0, 5), (8, 12), (12, 20), (26, 30)):  # first position, canvas blocks, the end
            want = dual_cache.slot_logits(logits[0], 0, lo, hi, shift)
            got = dual_cache.block_pass(model, x, positions, cache, lo, hi, shift)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # fp32; only the summation order differs


@pytest.mark.parametrize("which,threshold", [("dream", 0.6), ("llada", 0.5)])
def test_refreshing_every_step_equals_no_cache(which, threshold, dream_dir, llada_dir):
    folder = dream_dir[0] if which == "dream" else llada_dir[0]
    model = load.load_model(folder, device="cpu", dtype="fp32")
    cfg = model.config
    prefix, suffix = [5, 17, 42, 7, 99, 3], [11, 12, 13, 14]
    args = dict(n_slots=11, block_size=4, threshold=threshold, max_steps=3, mask_id=cfg.mask_id,
                logits_shift=cfg.logits_shift)
    tokens, nfe = dual_cache.refine_natural_order(model, prefix, suffix, refresh_every=1, **args)
    want, want_nfe = no_cache_infill(model, prefix, suffix, 11, 4, threshold, 3, cfg.mask_id, cfg.logits_shift)
    assert tokens == want and nfe == want_nfe
    assert 3 < nfe < 11  # three blocks, some steps on the cache path, several slots per step somewhere


@pytest.mark.parametrize("which", ["dream", "llada"])
def test_dual_cache_makes_one_full_pass_per_block(which, dream_dir, llada_dir):
    folder = dream_dir[0] if which == "dream" else llada_dir[0]
    model = load.load_model(folder, device="cpu", dtype="fp32")
    cfg = model.config
    prefix, suffix = list(range(20, 40)), list(range(60, 75))
    lengths, handle = _count_passes(model)
    try:
        tokens, nfe = dual_cache.refine_natural_order(model, prefix, suffix, 12, 4, 0.9, 4, cfg.mask_id, cfg.logits_shift)
    finally:
        handle.remove()
    full = sum(1 for n in lengths if n == len(prefix) + 12 + len(suffix))
    assert len(tokens) == 12 and cfg.mask_id not in tokens
    assert nfe == len(lengths) and full == 3 < nfe  # one refresh per block; the other steps ran on the cache
    assert all(n <= 5 for n in lengths if n != len(prefix) + 12 + len(suffix))  # block (+1 when shifted)


# ---------------------------------------------------------------------------------------------
# Through the text layer: `--model` pointed at a Dream folder infills in natural order


def test_infiller_serves_a_dream_folder_in_natural_order(dream_dir, tmp_path):
    import shutil

    from conftest import build_tiny_tokenizer
    from dlm_ls.model.infill import Infiller, InfillError

    folder, _ = dream_dir
    local = tmp_path / "dream"
    shutil.copytree(folder, local)
    build_tiny_tokenizer(local / "tokenizer.json", vocab_size=min(VOCAB - 3, 400))
    inf = Infiller(local, device="cpu")
    assert inf.info()["layout"] == "dream"
    r = inf.complete(["def add(a, b):\n    return ", "\n"], max_tokens=8, block_size=4, max_steps=4)
    assert isinstance(r.middles[0], str) and 1 <= r.nfe <= 8
    with pytest.raises(InfillError, match="one hole"):
        inf.start(["a", "b", "c"])
