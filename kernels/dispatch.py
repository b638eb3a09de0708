"""Which implementation of the kernels runs: Triton or the plain PyTorch reference.

Decided once, at import: Triton when torch sees a CUDA GPU and `triton` imports, the reference
otherwise. `DLM_LS_KERNELS=reference|triton` in the environment, or `use(backend)` at run time,
overrides the choice (tests, benchmarks, bisecting a numerical difference).

Each op module (`select_commit.py`, `canvas_attention.py`) exposes a thin
dispatcher under the op's own name; it asks `triton_path(tensor)` on every call, because three
things can only be known per call: whether the tensors live on the GPU (a model loaded with
`--device cpu` on a GPU machine runs the reference), whether autograd needs a backward (the
kernels have none, so training always runs the reference), and whether the shapes suit the
kernel. The choice of backend itself is made here, once. Nothing here knows about models.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

BACKENDS = ("reference", "triton")
ENV_VAR = "DLM_LS_KERNELS"


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_runnable() -> bool:
    """Whether the kernels are wanted here: a CUDA GPU, Triton's interpreter, or `DLM_LS_KERNELS=triton`
    (say, to compile them for a GPU on a CPU machine). Elsewhere the op modules skip `import triton`
    (half a second of every worker's start on a CPU) and keep the reference."""
    asked = os.environ.get(ENV_VAR, "").strip().lower() == "triton"
    return triton_importable() and (asked or interpreting() or torch.cuda.is_available())


def interpreting() -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors, slowly: for tests."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def default_backend() -> str:
    """The environment's override if set and usable, else Triton on a CUDA machine, else the reference."""
    asked = os.environ.get(ENV_VAR, "").strip().lower()
    if asked:
        if asked not in BACKENDS:
            warnings.warn(f"{ENV_VAR}={asked!r} is not one of {BACKENDS}; choosing automatically", stacklevel=2)
        elif asked == "triton" and not triton_importable():
            warnings.warn(f"{ENV_VAR}=triton, but triton is not installed; using the reference", stacklevel=2)
            return "reference"
        else:
            return asked
    return "triton" if torch.cuda.is_available() and triton_importable() else "reference"


BACKEND: str = default_backend()


def use(backend: str | None) -> str:
    """Switch every op to `backend` ("reference" or "triton"; None re-decides as at import).

    Returns the backend that was active, so a caller can switch back.
    """
    global BACKEND
    previous = BACKEND
    if backend is None:
        BACKEND = default_backend()
        return previous
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if backend == "triton" and not triton_importable():
        raise RuntimeError("the triton backend needs the `triton` package (pip install 'dlm-ls[gpu]')")
    BACKEND = backend
    return previous


def triton_path(t: torch.Tensor) -> bool:
    """Whether an op called on `t` should run its Triton kernel rather than the reference."""
    if BACKEND != "triton":
        return False
    if torch.is_grad_enabled() and t.requires_grad:
        return False  # no backward kernels: training runs the reference
    return t.is_cuda or (t.device.type == "cpu" and interpreting())
