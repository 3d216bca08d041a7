"""Checks of the tensor-parallel options an Engine takes."""
from __future__ import annotations


def check_tensor_parallel(tensor_parallel) -> int:
    """tensor_parallel as a positive int (None means 1), or ValueError."""
    if tensor_parallel is None:
        return 1
    if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise ValueError(f"tensor_parallel must be a positive integer, got {tensor_parallel!r}")
    return tensor_parallel


def check_step_timeout(step_timeout) -> float:
    """step_timeout as a positive float, or ValueError."""
    if isinstance(step_timeout, bool) or not isinstance(step_timeout, (int, float)) or not step_timeout > 0:
        raise ValueError(f"step_timeout must be a positive number of seconds, got {step_timeout!r}")
    return float(step_timeout)
