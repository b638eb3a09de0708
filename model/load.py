"""Checkpoint folders: write and read a model, its tokenizer and its sampler defaults.

A folder holds `config.json` (ModelConfig), `sampler.json` (SamplerConfig), `tokenizer.json`,
and the weights as safetensors: `model.safetensors`, or, above the shard size, numbered
shards with a Hugging Face `model.safetensors.index.json`. Never pickle. Foreign checkpoint
formats (Dream, LLaDA) are mapped onto our names in `model/foreign.py`; this module only
knows our own. What both share (errors, device and dtype, putting weights into a network) is in
`model/checkpoint.py`, so neither imports the other at module level. It does not know how the model
is used.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import DTYPES, CheckpointError, assign_weights, resolve_device, resolve_dtype  # noqa: F401 (re-exported)
from .config import ModelConfig, SamplerConfig
from .network import DiffusionLM

SHARD_BYTES = 15 * 1024 * 1024  # keeps every file under git hosts' soft limits and our 15 MB rule
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default"


def _state_to_save(model: DiffusionLM, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_embeddings and name == "lm_head.weight":
            continue  # the same tensor as model.embed_tokens.weight
        t = tensor.detach().to("cpu")
        state[name] = (t.to(dtype) if dtype is not None else t).contiguous()
    return state


def save_weights(model: DiffusionLM, folder: str | os.PathLike, dtype: torch.dtype | None = None,
                 shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """Write the weights, sharded above `shard_bytes`; returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
        old.unlink()
    state = _state_to_save(model, dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        path = folder / "model.safetensors"
        save_file(shards[0], str(path), metadata=meta)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = folder / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata=meta)
        paths.append(path)
        weight_map.update({name: path.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1, sort_keys=True))
    return paths


def save_checkpoint(model: DiffusionLM, folder: str | os.PathLike, sampler: SamplerConfig | None = None,
                    tokenizer_file: str | os.PathLike | None = None, dtype: torch.dtype | None = None) -> Path:
    folder = Path(folder)
    save_weights(model, folder, dtype)
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=1, sort_keys=True))
    (folder / "sampler.json").write_text(json.dumps((sampler or SamplerConfig()).to_dict(), indent=1, sort_keys=True))
    if tokenizer_file is not None and Path(tokenizer_file).resolve() != (folder / "tokenizer.json").resolve():
        (folder / "tokenizer.json").write_bytes(Path(tokenizer_file).read_bytes())
    return folder


def read_weights(folder: Path, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The folder's tensors by name, each read once and put on `device` in `dtype` (default: as stored)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder} holds no model.safetensors (nor an index of shards)")
    state: dict[str, torch.Tensor] = {}
    with _one_thread():
        for name in files:
            with safe_open(str(folder / name), framework="pt", device="cpu") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key).to(device=device, dtype=dtype)
    return state


@contextlib.contextmanager
def _one_thread():
    """Copies and dtype conversions are memory-bound: a second thread gains nothing, and on a shared
    CPU each op waits for it at a barrier (the shipped model's conversion: 0.03 s alone, 0.4 s beside
    a busy core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def load_config(folder: str | os.PathLike) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder} is not a checkpoint folder: no config.json")
    raw = json.loads(path.read_text())
    from .foreign import detect_and_convert_config  # Dream/LLaDA folders: Hugging Face config keys

    return detect_and_convert_config(raw) or ModelConfig.from_dict(raw)


def load_sampler_config(folder: str | os.PathLike) -> SamplerConfig:
    path = Path(folder) / "sampler.json"
    return SamplerConfig.from_dict(json.loads(path.read_text())) if path.exists() else SamplerConfig()


def load_model(folder: str | os.PathLike | None = None, device: str | torch.device = "auto",
               dtype: str | torch.dtype | None = None) -> DiffusionLM:
    """Load a checkpoint folder (default: the model shipped in the repository) for inference."""
    folder = Path(folder) if folder is not None else DEFAULT_MODEL_DIR
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    cfg = load_config(folder)
    if cfg.layout != "dlm":
        from .foreign import load_foreign  # Dream/LLaDA folders: a name mapping onto our network

        return load_foreign(folder, cfg, dev, resolve_dtype(dtype, dev))
    model = build_on_meta(cfg)
    state = read_weights(folder, dev, resolve_dtype(dtype, dev))  # each tensor converted once, as it is read
    unexpected = set(state) - set(model.state_dict())
    assign_weights(model, state, folder, unexpected)
    return model.eval()


def build_on_meta(cfg: ModelConfig) -> DiffusionLM:
    """The network's shape with no storage, for weights to be assigned into.

    Its layers' own initialisation is skipped: on meta tensors it does nothing, yet under
    `torch.device("meta")` it goes through torch's Python references, which import torch._dynamo
    (seconds of every worker start).
    """
    with torch.device("meta"), _skip_init():
        return DiffusionLM(cfg)


@contextlib.contextmanager
def _skip_init():
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def load_tokenizer(folder: str | os.PathLike | None = None):
    """The checkpoint's tokenizer as a transformers `PreTrainedTokenizerFast`."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder) if folder is not None else DEFAULT_MODEL_DIR
    path = folder / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{folder} has no tokenizer.json")
    return PreTrainedTokenizerFast(tokenizer_file=str(path))
