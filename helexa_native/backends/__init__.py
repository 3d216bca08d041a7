"""Compute backends: the CPU reference and the CUDA device-worker backend."""
