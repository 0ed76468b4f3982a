"""Model files for the worker: importing the bundled GGUF into an MLX model directory."""
