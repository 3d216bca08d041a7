"""The pure-PyTorch reference forward (CPU backend and numerical oracle)."""

from .model import ReferenceModel, rms_norm

__all__ = ["ReferenceModel", "rms_norm"]
