"""`dlm-ls bench ceilings` and `dlm-ls bench large`: what the hardware allows, and how close a step comes.

ceilings  the device's memory bandwidth (a large copy) and matrix rate (bf16 on a GPU, fp32 on a
          CPU), measured here; from them the floor of one refinement step (`step_floor`): the
          weights read once plus the cached keys and values, or the matrix work, whichever takes
          longer. Then the loaded model's measured step at a 2k-token context against that floor.
large     a 7B-class architecture (the Qwen2-7B shapes that Dream, Dream-Coder and DiffuCoder use)
          with random weights (speed does not depend on the values) in dlm-ls's own layout, through
          the Engine: single-line (16 tokens) and 64-token infill after a 2k-token context, at a
          fixed step count, `parallel` and `ar`; then the same cases through the Dream-family path
          (natural order, dual cache) that downloaded checkpoints take; latency, tokens per second,
          and each against its floor.

The floors are arithmetic on measured ceilings, not timings. Knows the network's shapes and the
engine's job API; knows nothing of text or the server.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..model.config import ModelConfig, SamplerConfig
from .common import sync

# The Qwen2-7B shapes (Dream-v0-7B, Dream-Coder-v0-7B, DiffuCoder-7B): about 7.6B parameters.
ARCHS: dict[str, dict[str, Any]] = {
    "7b": dict(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_dim=18944,
               rope_theta=1e6, tie_embeddings=False, max_position=8192),
}

# (name, middle tokens, block size, steps per block) of the `large` cases; `ar` takes one step a token.
LARGE_CASES = (("line", 16, 16, 4), ("64-token", 64, 32, 4))
DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def _median_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------- ceilings


def measure_ceilings(device: torch.device, copy_mib: int | None = None, matmul_n: int | None = None,
                     reps: int = 10) -> dict[str, Any]:
    """Memory bandwidth (GB/s, a device-to-device copy: bytes read + written) and matrix rate (TFLOP/s)."""
    gpu = device.type == "cuda"
    copy_mib = copy_mib or (2048 if gpu else 256)
    n = copy_mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), device, reps)
    bandwidth = 2 * n * 4 / (copy_ms / 1e3) / 1e9
    del src, dst
    dtype = torch.bfloat16 if gpu else torch.float32
    matmul_n = matmul_n or (8192 if gpu else 1024)
    a = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
    b = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
    mm_ms = _median_ms(lambda: a @ b, device, reps)
    rate = 2 * matmul_n**3 / (mm_ms / 1e3) / 1e12
    return {"bandwidth_gbs": bandwidth, "matmul_tflops": rate, "matmul_dtype": str(dtype).replace("torch.", ""),
            "copy_mib": copy_mib, "matmul_n": matmul_n, "threads": torch.get_num_threads() if not gpu else None}


@dataclass
class Floor:
    memory_ms: float  # weights + context keys/values read once
    compute_ms: float  # the step's matrix work at the measured rate

    @property
    def ms(self) -> float:
        return max(self.memory_ms, self.compute_ms)


def step_floor(cfg: ModelConfig, context: int, new_tokens: int, ceilings: dict[str, Any], dtype_bytes: int) -> Floor:
    """The fastest one refinement step can be: `new_tokens` (canvas + pending) after `context` cached tokens.

    Every weight is read once (the input embedding only for the rows used); the cached keys and
    values of every layer are read once. Matrix work: 2 x weights x tokens for the projections,
    plus attention's QK^T and AV over context + tokens.
    """
    layers_params = cfg.num_parameters() - cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    head_params = cfg.vocab_size * cfg.dim  # the output projection, read whole
    weight_bytes = (layers_params + head_params + new_tokens * cfg.dim) * dtype_bytes
    kv_bytes = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * (context + new_tokens) * dtype_bytes
    memory_ms = (weight_bytes + kv_bytes) / (ceilings["bandwidth_gbs"] * 1e9) * 1e3
    flops = 2 * (layers_params + head_params) * new_tokens
    flops += cfg.n_layers * 4 * cfg.n_heads * cfg.head_dim * new_tokens * (context + new_tokens)
    compute_ms = flops / (ceilings["matmul_tflops"] * 1e12) * 1e3
    return Floor(memory_ms, compute_ms)


def model_step_vs_floor(infiller, ceilings: dict[str, Any], context: int = 2048, canvases=(1, 16, 32),
                        reps: int = 10) -> list[dict[str, Any]]:
    """The loaded model's measured step (bench step's method) next to its floor."""
    from . import step

    measured = step.measure(infiller, [context], list(canvases), reps)
    nbytes = DTYPE_BYTES[next(infiller.model.parameters()).dtype]
    rows = []
    for r in measured["rows"]:
        floor = step_floor(infiller.model.config, r["context"], r["canvas"], ceilings, nbytes)
        rows.append({"context": r["context"], "canvas": r["canvas"], "step_ms": r["median_ms"],
                     "floor_ms": floor.ms, "floor_memory_ms": floor.memory_ms, "floor_compute_ms": floor.compute_ms,
                     "x_floor": r["median_ms"] / floor.ms})
    return rows


# ---------------------------------------------------------------------------------------------- large


def random_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """The network with torch's default initialisation, built in place on `device` and `dtype`."""
    from ..model.network import DiffusionLM

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DiffusionLM(cfg)
    finally:
        torch.set_default_dtype(before)
    return model.eval()


def large_options(strategy: str, tokens: int, block: int, steps: int) -> SamplerConfig:
    """A fixed amount of work: no PAD before `tokens`, threshold 1 (one commit a step) until the
    block's last allowed step commits the rest. `ar` writes one token a step."""
    return SamplerConfig(strategy=strategy, threshold=1.0, max_steps=steps, block_size=block,
                         canvas_lengths=(min(tokens, block),), max_tokens=tokens, min_tokens=tokens)


def measure_natural_order(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, ceilings: dict[str, Any],
                          context: int, reps: int, cases=LARGE_CASES) -> list[dict[str, Any]]:
    """The same cases through the Dream-family path (natural order, full attention, dual cache;
    model/dual_cache.py), as a downloaded DiffuCoder or Dream-Coder runs: random weights with the
    Dream layout's q/k/v biases. The prefix takes 3/4 of the context, the suffix the rest."""
    import dataclasses

    from ..model import tokens as T
    from ..model.dual_cache import refine_natural_order

    ncfg = dataclasses.replace(cfg, layout="dream", logits_shift=True, mask_id=cfg.vocab_size - 1)
    model = random_model(ncfg, device, dtype)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(T.NUM_SPECIAL, cfg.vocab_size - 1, (context,), generator=gen).tolist()
    prefix, suffix = ids[: context * 3 // 4], ids[context * 3 // 4:]
    nbytes = DTYPE_BYTES[dtype]
    rows = []
    for name, n, block, steps in cases:
        nfe = []

        def run() -> None:
            _, passes = refine_natural_order(model, prefix, suffix, n, block, 1.0, steps, ncfg.mask_id, True)
            nfe.append(passes)

        ms = _median_ms(run, device, reps, warmup=1)
        blocks = (n + block - 1) // block
        # per block: one full pass over the whole sequence (it refreshes the cache), then the
        # block's other steps over the cached prefix, suffix and other slots
        floor = blocks * (step_floor(ncfg, 0, context + n, ceilings, nbytes).ms
                          + (steps - 1) * step_floor(ncfg, context + n - block, block, ceilings, nbytes).ms)
        rows.append({"case": name, "strategy": "dream (dual cache)", "tokens": n, "nfe": nfe[-1],
                     "expected_steps": blocks * steps, "latency_ms": ms, "tokens_per_s": n / (ms / 1e3),
                     "floor_ms": floor, "x_floor": ms / floor})
    del model
    return rows


def measure_large(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, ceilings: dict[str, Any],
                  context: int = 2048, reps: int = 5, cases=LARGE_CASES, natural_order: bool = True) -> dict[str, Any]:
    from ..model import layout
    from ..model import tokens as T
    from ..model.engine import Engine

    model = random_model(cfg, device, dtype)
    engine = Engine(model, max_context_tokens=context + 8)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(T.NUM_SPECIAL, cfg.vocab_size, (context - 3,), generator=gen).tolist()
    ctx = layout.single_hole_context(ids, [])
    key = "bench-large"
    sync(device)
    t0 = time.perf_counter()
    engine.prefill(key, ctx)
    sync(device)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    nbytes = DTYPE_BYTES[dtype]
    rows = []
    for name, n, block, steps in cases:
        for strategy in ("parallel", "ar"):
            opts = large_options(strategy, n, block, steps)
            nfe = []

            def run() -> None:
                job = engine.start(ctx, opts, key)
                engine.run(job)
                nfe.append(job.nfe)

            ms = _median_ms(run, device, reps, warmup=1)
            # the floor of the same steps: parallel refines a block-wide canvas (earlier blocks
            # become pending context tokens once); ar one slot after each committed token
            if strategy == "parallel":
                n_steps = steps * ((n + block - 1) // block)
                floor = sum(step_floor(cfg, context + (k // steps) * block, block + (block if k and k % steps == 0 else 0),
                                       ceilings, nbytes).ms for k in range(n_steps))
            else:
                n_steps = n
                floor = sum(step_floor(cfg, context + k, 1 + (1 if k else 0), ceilings, nbytes).ms for k in range(n))
            rows.append({"case": name, "strategy": strategy, "tokens": n, "nfe": nfe[-1], "expected_steps": n_steps,
                         "latency_ms": ms, "tokens_per_s": n / (ms / 1e3), "floor_ms": floor, "x_floor": ms / floor})
    by = {(r["case"], r["strategy"]): r for r in rows}
    for name, *_ in cases:
        par, ar = by[(name, "parallel")], by[(name, "ar")]
        par["speedup_vs_ar"] = ar["latency_ms"] / par["latency_ms"]
    del engine, model
    if natural_order:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows += measure_natural_order(cfg, device, dtype, ceilings, context, reps, cases)
    return {"arch": {k: v for k, v in cfg.to_dict().items() if k != "special_ids"}, "parameters": cfg.num_parameters(),
            "dtype": str(dtype).replace("torch.", ""), "context": context, "prefill_ms": prefill_ms,
            "prefill_floor_ms": step_floor(cfg, 0, context, ceilings, nbytes).ms, "reps": reps, "rows": rows}


def format_ceilings(c: dict[str, Any]) -> str:
    return (f"memory bandwidth {c['bandwidth_gbs']:.1f} GB/s (copy of {c['copy_mib']} MiB), "
            f"matrix rate {c['matmul_tflops']:.3f} TFLOP/s ({c['matmul_dtype']}, n={c['matmul_n']})")
