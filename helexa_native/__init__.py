"""helexa_native: an LLM inference engine for llama-family and Qwen3-MoE models."""

import torch  # noqa: F401  (loads libtorch before the extension)

__version__ = "0.1.0"

from .engine import Engine, GenerationResult, StreamChunk  # noqa: E402
from .errors import (  # noqa: E402
    BuildMismatchError,
    ChatTemplateError,
    ContextLengthError,
    DeviceError,
    EngineClosedError,
    HelexaError,
    InvalidParameterError,
    ModelLoadError,
    TokenizerError,
    UnsupportedModelError,
)
from .params import SamplingParams  # noqa: E402

__all__ = [
    "Engine",
    "GenerationResult",
    "StreamChunk",
    "SamplingParams",
    "__version__",
    "HelexaError",
    "ModelLoadError",
    "UnsupportedModelError",
    "TokenizerError",
    "ChatTemplateError",
    "ContextLengthError",
    "DeviceError",
    "EngineClosedError",
    "BuildMismatchError",
    "InvalidParameterError",
]
