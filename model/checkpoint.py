"""What every checkpoint reader shares: its error, the device and dtype it loads to, and how a state
dict (our tensor names) goes into a network built on the meta device.

`load.py` (our folders) and `foreign.py` (Dream, LLaDA) both import this module and not each other
at module level. It knows nothing of file layouts.
"""

from __future__ import annotations

import torch

from .network import DiffusionLM

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


class CheckpointError(Exception):
    """A checkpoint folder that is missing, incomplete or not ours."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for, but torch sees no CUDA GPU")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32  # CPUs lack fast bf16 matmuls
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16")
    return DTYPES[dtype]


def assign_weights(model: DiffusionLM, state: dict[str, torch.Tensor], folder, unexpected) -> None:
    """Put `state` (our names) into a meta-device `model`, or say which tensors are missing or extra."""
    tied = model.config.tie_embeddings
    if tied:
        state.pop("lm_head.weight", None)
    missing = set(model.state_dict()) - set(state) - ({"lm_head.weight"} if tied else set())
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match config.json (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
