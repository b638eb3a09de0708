"""The diffusion engine: network, checkpoint folder, context cache and sampler.

It is token ids in, token ids out. It knows nothing of LSP, files or editors;
text appears only at its edges (the tokenizer in `load.py`, `dlm-ls fill`).
"""
