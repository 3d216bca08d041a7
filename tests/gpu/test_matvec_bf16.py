"""GPU tests of the bf16 fragment matvec (torch.ops.helexa.matvec_bf16, matvec_mma.cu).

bf16 weights and bf16 activations, so the products are exact in fp32 and the
only difference from a float64 reference is fp32 summation: the result is
checked per output against sum_j |w_ij x_tj|. fp32 activations (up to 4
tokens) are multiplied as hi + lo, two bf16 roundings: the reference takes
exactly those values, and the result is also held against x itself. The
op's output starts NaN-filled, so an element the kernel skips fails the test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from graph_capture import captured

pytestmark = pytest.mark.gpu

DEV = "cuda"
TOLERANCE = 1e-5  # |got - want| / sum_j |w x|: fp32 sums of a few thousand exact products
MAX_TOKENS = 32
F32_TOKENS = 4
SPLIT_TOLERANCE = 2e-5  # against the unrounded x: hi + lo keeps about 16 significant bits


@pytest.fixture(scope="module")
def ops():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import helexa_native._C  # noqa: F401  (registers torch.ops.helexa)

    return torch.ops.helexa


def bf16(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16).to(DEV)


def reference(w: torch.Tensor, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(x W^T, |x| |W|^T) in float64 from the bf16 values."""
    wd, xd = w.double().cpu().numpy(), x.double().cpu().numpy()
    return xd @ wd.T, np.abs(xd) @ np.abs(wd).T


def split_x(x: torch.Tensor) -> torch.Tensor:
    """fp32 x as the kernel multiplies it: bf16(x) + bf16(x - bf16(x)), in float64."""
    hi = x.to(torch.bfloat16)
    lo = (x - hi.float()).to(torch.bfloat16)
    return hi.double() + lo.double()


def runs(y: torch.Tensor, n_tok: int, bounds: list[int]) -> np.ndarray:
    """[n_tok, n_out] from y's memory holding row runs [b_i, b_i+1) as [n_tok][run] one after another."""
    flat, out, off = y.reshape(-1).cpu().numpy(), [], 0
    for a, b in zip(bounds, bounds[1:]):
        out.append(flat[off : off + n_tok * (b - a)].reshape(n_tok, b - a))
        off += n_tok * (b - a)
    return np.concatenate(out, axis=1)


def check(got: np.ndarray, want: np.ndarray, scale: np.ndarray, tag: str) -> None:
    assert np.isfinite(got).all(), f"{tag}: non-finite outputs (rows the kernel did not write?)"
    err = np.abs(got - want) / np.maximum(scale, 1e-30)
    worst = np.unravel_index(np.argmax(err), err.shape)
    assert err.max() <= TOLERANCE, f"{tag}: relative error {err.max():.3g} at {worst}"


# Shapes: one tile, rows past the last full tile, k of one chunk and of many
# (4096, 14336: the k-splits), token counts in each of the 8 / 16 / 32 tiles.
CASES = [
    (16, 64, 1),
    (40, 128, 3),
    (1000, 576, 5),
    (4096, 4096, 8),
    (333, 14336, 9),
    (2048, 2048, 16),
    (4100, 1024, 17),
    (1024, 4096, 32),
    (30011, 256, 24),
]


@pytest.mark.parametrize("n_out,k,n_tok", CASES)
def test_bf16_fragment_matvec_matches_reference(ops, n_out, k, n_tok):
    rng = np.random.default_rng(n_out * 7 + k + n_tok)
    w = bf16(rng.standard_normal((n_out, k)) * 0.05)
    x = bf16(rng.standard_normal((n_tok, k)))
    y = ops.matvec_bf16(w, x, None, None)
    want, scale = reference(w, x)
    check(y.cpu().numpy(), want, scale, f"{n_out}x{k} n_tok={n_tok}")


F32_CASES = [(16, 64, 1), (40, 128, 2), (1000, 576, 3), (4096, 4096, 1), (333, 14336, 4), (30011, 256, 2)]


@pytest.mark.parametrize("n_out,k,n_tok", F32_CASES)
def test_bf16_fragment_matvec_fp32_x_matches_reference(ops, n_out, k, n_tok):
    rng = np.random.default_rng(n_out * 3 + k + n_tok)
    w = bf16(rng.standard_normal((n_out, k)) * 0.05)
    # Magnitudes far apart, so hi alone would lose the small ones' share.
    x = torch.from_numpy((rng.standard_normal((n_tok, k)) * np.exp(rng.uniform(-8, 8, (n_tok, k)))).astype(np.float32))
    y = ops.matvec_bf16(w, x.to(DEV), None, None).cpu().numpy()
    wd = w.double().cpu().numpy()
    seen = split_x(x).numpy()
    scale = np.abs(seen) @ np.abs(wd).T
    check(y, seen @ wd.T, scale, f"fp32 x {n_out}x{k} n_tok={n_tok}")
    xd = x.double().numpy()
    err = np.abs(y - xd @ wd.T) / np.maximum(np.abs(xd) @ np.abs(wd).T, 1e-30)
    assert err.max() <= SPLIT_TOLERANCE, f"fp32 x {n_out}x{k}: {err.max():.3g} from the unrounded product"


@pytest.mark.parametrize("n_tok", [1, 7, 12, 32])
def test_bf16_fragment_matvec_runs_bias_and_accumulate(ops, n_tok):
    # A fused q|k|v matrix into three runs (uneven, not multiples of 16),
    # with a bias and onto a previous y; and a gate|up split in two.
    rng = np.random.default_rng(100 + n_tok)
    n_out, k = 8 * 64 + 2 * 72, 512
    s1, s2 = 8 * 64, 8 * 64 + 72
    w = bf16(rng.standard_normal((n_out, k)))
    x = bf16(rng.standard_normal((n_tok, k)) * 3)
    bias = torch.from_numpy(rng.standard_normal(n_out).astype(np.float32)).to(DEV)
    prev = torch.from_numpy(rng.standard_normal((n_tok, n_out)).astype(np.float32)).to(DEV)
    want, scale = reference(w, x)
    bounds = [0, s1, s2, n_out]
    prev_rows = runs(prev, n_tok, bounds)
    y = ops.matvec_bf16(w, x, bias, prev, s1, s2)
    expect = want + bias.cpu().numpy()[None, :] + prev_rows
    check(runs(y, n_tok, bounds), expect, scale + np.abs(prev_rows) + 1, f"runs n_tok={n_tok}")
    y2 = ops.matvec_bf16(w, x, None, None, 300, 300)
    check(runs(y2, n_tok, [0, 300, n_out]), want, scale, f"two runs n_tok={n_tok}")
    if n_tok <= F32_TOKENS:
        # fp32 x (bf16 values, so hi + lo is x exactly) through the same runs.
        y3 = ops.matvec_bf16(w, x.float(), bias, prev, s1, s2)
        check(runs(y3, n_tok, bounds), expect, scale + np.abs(prev_rows) + 1, f"fp32 x runs n_tok={n_tok}")


def test_bf16_fragment_matvec_is_deterministic_and_graph_safe(ops):
    rng = np.random.default_rng(5)
    n_out, k, n_tok = 6144, 4096, 8
    w = bf16(rng.standard_normal((n_out, k)) * 0.02)
    x = bf16(rng.standard_normal((n_tok, k)))
    first = ops.matvec_bf16(w, x, None, None)
    for _ in range(3):
        assert torch.equal(ops.matvec_bf16(w, x, None, None), first), "results differ between runs"
    y = torch.full((n_tok, n_out), float("nan"), device=DEV)

    def launch():
        ops.matvec_bf16_out(w, x, y)
        return y

    g, _ = captured(launch)
    y.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, first), "graph replay differs from a direct launch"


def test_bf16_fragment_matvec_rejects_bad_sizes(ops):
    w = torch.zeros(32, 96, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        ops.matvec_bf16(w, torch.zeros(1, 96, dtype=torch.bfloat16, device=DEV), None, None)
    w = torch.zeros(32, 128, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(RuntimeError, match="tokens"):
        ops.matvec_bf16(w, torch.zeros(MAX_TOKENS + 1, 128, dtype=torch.bfloat16, device=DEV), None, None)
    with pytest.raises(RuntimeError, match="float32"):
        ops.matvec_bf16(w, torch.zeros(F32_TOKENS + 1, 128, device=DEV), None, None)
    with pytest.raises(RuntimeError, match="row runs"):
        ops.matvec_bf16(w, torch.zeros(2, 128, dtype=torch.bfloat16, device=DEV), None, None, 20, 10)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.matvec_bf16(w.float(), torch.zeros(2, 128, dtype=torch.bfloat16, device=DEV), None, None)
