"""The shared worker process: the wire protocol both ends speak (protocol.py), the scheduler, the
socket server, and the standby spare that takes over when the worker is killed (standby.py)."""
