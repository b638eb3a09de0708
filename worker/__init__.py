"""The shared worker process: the wire protocol both ends speak, the scheduler and the socket server."""
