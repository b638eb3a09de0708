"""Checkpoint folders: bitwise round trips, shards, dtypes, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from dlm_ls.model import load
from dlm_ls.model.config import ModelConfig, SamplerConfig
from dlm_ls.model.network import DiffusionLM


def test_save_and_load_round_trip_is_bitwise(tmp_path):
    model = DiffusionLM(ModelConfig.preset("tiny")).init_weights(5)
    load.save_checkpoint(model, tmp_path, SamplerConfig(threshold=0.8))
    back = load.load_model(tmp_path, "cpu", "fp32")
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    tokens = torch.randint(0, 512, (1, 12))
    pos = torch.arange(12)[None]
    assert torch.equal(model(tokens, pos, None)[0], back(tokens, pos, None)[0])
    assert load.load_sampler_config(tmp_path).threshold == 0.8
    assert back.lm_head.weight is back.model.embed_tokens.weight  # tied after loading too


def test_large_weights_are_sharded_under_15_mb(tmp_path):
    model = DiffusionLM(ModelConfig.preset("small")).init_weights()
    files = load.save_weights(model, tmp_path, torch.bfloat16)
    assert len(files) >= 2
    assert all(f.stat().st_size <= load.SHARD_BYTES + 64 * 1024 for f in files)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    back = load.load_model(tmp_path, "cpu", "bf16")
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(back.model.embed_tokens.weight, model.model.embed_tokens.weight.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_loads_in_each_dtype(tiny_model_dir, dtype):
    model = load.load_model(tiny_model_dir, "cpu", dtype)
    assert next(model.parameters()).dtype == load.DTYPES[dtype]
    logits, _ = model(torch.tensor([[5, 6, 7]]), torch.arange(3)[None], None)
    assert torch.isfinite(logits.float()).all()


def test_tokenizer_loads_through_transformers(tiny_model_dir):
    from transformers import PreTrainedTokenizerFast

    tok = load.load_tokenizer(tiny_model_dir)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.convert_tokens_to_ids("<|mask|>") == 2


def test_missing_or_mismatched_folders_are_clear_errors(tmp_path):
    with pytest.raises(load.CheckpointError, match="no config.json"):
        load.load_model(tmp_path, "cpu")
    model = DiffusionLM(ModelConfig.preset("tiny")).init_weights()
    load.save_checkpoint(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(load.CheckpointError, match="do not match"):
        load.load_model(tmp_path, "cpu")


def test_no_pickle_in_a_checkpoint(tiny_model_dir):
    names = sorted(p.name for p in tiny_model_dir.iterdir())
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
