"""Fast ops of the refinement step, each beside its plain PyTorch reference.

Each `kernels/<op>.py` holds a reference implementation (always correct, runs anywhere), a
Triton kernel and its host wrapper, and a thin dispatcher under the op's own name, which is
what the rest of the code calls: `select_commit` (sampler), `canvas_attention` (network).
(A fused RMSNorm + RoPE kernel was removed: the network never called it; docs/architecture.md.) Which implementation runs is decided once, at import (`dispatch.py`): Triton
on a CUDA GPU with Triton installed, the reference otherwise; `DLM_LS_KERNELS=reference|triton`
or `dispatch.use(...)` overrides it. `bench/kernels.py` times the two.
Nothing here knows about models, tokens or files.
"""
