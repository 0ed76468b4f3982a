"""The runner: one subprocess per instance shard that owns the MLX model and generates tokens.

`protocol` is the wire format between worker and runner, `engine` the in-process generation
engine, `main` the subprocess entry point and `process` the worker-side handle to it.
"""
