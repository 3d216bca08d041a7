"""CUDA-graph capture for the kernel tests."""

from __future__ import annotations

import torch


def captured(launch):
    """(graph, output) of `launch` captured in a CUDA graph, after one warm-up run outside capture."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        launch()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = launch()
    return g, out
