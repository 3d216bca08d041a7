"""helexa_native: a single-request LLM engine for llama-family models."""
import torch  # noqa: F401  (loads libtorch before the extension)

__version__ = "0.1.0"
