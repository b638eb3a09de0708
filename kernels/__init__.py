"""Fast ops of the refinement step, each beside its plain PyTorch reference.

Each `kernels/<op>.py` holds a reference implementation (always correct, runs anywhere) and,
where it pays, a Triton kernel with its host wrapper. Which one runs is decided once, at
import (`dispatch.py`): Triton on a CUDA GPU with Triton installed, the reference otherwise.
Nothing here knows about models, tokens or files.
"""
