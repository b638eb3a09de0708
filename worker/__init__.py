"""The worker's process life: a standby spare that takes over when the worker is killed (standby.py).

The worker itself still lives in dlm_ls.model.worker. Nothing here imports torch.
"""
