"""GPU tests of the weight-reading kernels: torch.ops.helexa.matvec / matmul_tc / dequantize.

Weights are random raw GGUF blocks (random bytes with finite fp16 scale
fields) or random float rows; the reference is the gguf package's own
dequantizer followed by a float64 product. Every result starts NaN-filled
inside the op, so an element the kernel skips fails the test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from graph_capture import captured
from int8_reference import DP4A_TYPES, quantized_x, stage_fits

pytestmark = pytest.mark.gpu

DEV = "cuda"

# name -> (GGML id, byte offsets of the fp16 fields inside one block)
TYPES = {
    "F32": (0, []),
    "F16": (1, []),
    "BF16": (30, []),
    "Q4_0": (2, [0]),
    "Q4_1": (3, [0, 2]),
    "Q5_0": (6, [0]),
    "Q5_1": (7, [0, 2]),
    "Q8_0": (8, [0]),
    "Q2_K": (10, [80, 82]),
    "Q3_K": (11, [108]),
    "Q4_K": (12, [0, 2]),
    "Q5_K": (13, [0, 2]),
    "Q6_K": (14, [208]),
    "IQ4_NL": (20, [0]),
    "IQ4_XS": (23, [0]),
}
FLOAT_TYPES = {"F32", "F16", "BF16"}

# Largest |got - want| / sum_j |x_j w_ij| per output: fp32 accumulation over
# up to a few thousand terms (the quant path also folds offsets into a
# biased sum, which costs a few more ulps).
TOLERANCE = {name: (1e-5 if name in FLOAT_TYPES else 2e-5) for name in TYPES}

# DP4A_TYPES (int8_reference.py) can quantize x to int8 blocks of 32 (asked
# for with int8=True). matvec_launch's default is the precise mode: two int8
# terms per element (x, then its quantization residual), used when
# 2 * n_tok * k * 1.375 bytes fit 48 KiB, else the float kernel runs. The exact
# reference is then the product with that two-term x; against the float x the
# result is within INT8_X_TOLERANCE. Without int8 every type uses float math.
INT8_X_TOLERANCE = 2e-2
INT8_X_TERMS = 2


def x_seen_by(name: str, x: np.ndarray, int8: bool = False, terms: int = INT8_X_TERMS) -> np.ndarray:
    """x as the kernel multiplies it: quantized to int8 terms where the int8
    kernel runs (int8_reference.quantized_x), x itself for the float paths."""
    if not (int8 and stage_fits(name, x.shape[0], x.shape[1], terms)):
        return x
    return quantized_x(x, terms)


def qk_of(name: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[name]][0]


@pytest.fixture(scope="module")
def ops():
    import helexa_native._C  # noqa: F401  (registers torch.ops.helexa)

    return torch.ops.helexa


class SeededRng:
    """numpy Generator that remembers its (fresh) seed for failure messages."""

    def __init__(self):
        self.seed_value = int(np.random.SeedSequence().entropy % (2**32))
        self._g = np.random.default_rng(self.seed_value)

    def __getattr__(self, name):
        return getattr(self._g, name)


@pytest.fixture()
def rng():
    return SeededRng()


def make_weights(name: str, n_out: int, k: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(stored bytes [n_out, row_bytes] uint8, reference float32 [n_out, k])."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qt = GGMLQuantizationType[name]
    if name in FLOAT_TYPES:
        w = rng.standard_normal((n_out, k)).astype(np.float32)
        if name == "F32":
            raw = w.view(np.uint8)
        elif name == "F16":
            raw = w.astype(np.float16).view(np.uint8)
        else:
            raw = torch.from_numpy(w).to(torch.bfloat16).view(torch.uint8).numpy()
        raw = np.ascontiguousarray(raw).reshape(n_out, -1)
    else:
        bs, bb = GGML_QUANT_SIZES[qt]
        nb = n_out * k // bs
        raw = rng.integers(0, 256, size=(nb, bb), dtype=np.uint8)
        for off in TYPES[name][1]:
            scale = (rng.standard_normal(nb) * 0.02).astype(np.float16)
            raw[:, off : off + 2] = scale.view(np.uint8).reshape(nb, 2)
        raw = raw.reshape(n_out, -1)
    ref = dequantize(raw, qt).reshape(n_out, k).astype(np.float32)
    assert np.isfinite(ref).all()
    return raw, ref


def check_matvec(got: torch.Tensor, w: np.ndarray, x: np.ndarray, extra: np.ndarray | None, tol: float, msg: str):
    got = got.detach().cpu().double().numpy()
    w64, x64 = w.astype(np.float64), x.astype(np.float64)
    want = x64 @ w64.T
    scale = np.abs(x64) @ np.abs(w64).T + 1e-30
    if extra is not None:
        want = want + extra
        scale = scale + np.abs(extra)
    assert got.shape == want.shape, f"{msg}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all(), f"{msg}: NaN/inf in output (unwritten element?)"
    err = np.max(np.abs(got - want) / scale)
    assert err <= tol, f"{msg}: relative error {err:.3e} > {tol:.1e}"


def k_cases(name: str) -> list[int]:
    if name in FLOAT_TYPES:
        return [1, 7, 8, 3 * 256 + 4, 4096 + 256]
    qk = qk_of(name)
    ks = [qk, 3 * qk, 4096 + 256]
    if qk == 32:
        ks += [9 * 32, 4096 + 96]  # rows ending inside a 256-element pass
    return ks


MATVEC_CASES = [
    (name, n_out, k) for name in TYPES for k in k_cases(name) for n_out in ([1, 257] if k > 1024 else [1, 3, 257, 1000])
]


@pytest.mark.parametrize("n_tok", [1, 3, 8])
@pytest.mark.parametrize("name,n_out,k", MATVEC_CASES)
def test_matvec_matches_gguf_reference(ops, rng, name, n_out, k, n_tok):
    raw, ref = make_weights(name, n_out, k, rng)
    x = rng.standard_normal((n_tok, k)).astype(np.float32)
    y = ops.matvec(TYPES[name][0], torch.from_numpy(raw).to(DEV), torch.from_numpy(x).to(DEV), n_out, k, None, None)
    check_matvec(
        y,
        ref,
        x_seen_by(name, x),
        None,
        TOLERANCE[name],
        f"{name} n_out={n_out} k={k} n_tok={n_tok} seed={rng.seed_value}",
    )


@pytest.mark.parametrize("n_tok", [1, 2, 5])
@pytest.mark.parametrize("name", list(TYPES))
def test_matvec_bias_and_accumulate(ops, rng, name, n_tok):
    qk = max(qk_of(name), 8)
    n_out, k = 131, 4 * qk if qk == 256 else 40 * qk
    raw, ref = make_weights(name, n_out, k, rng)
    x = rng.standard_normal((n_tok, k)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    y0 = rng.standard_normal((n_tok, n_out)).astype(np.float32)
    w_d, x_d = torch.from_numpy(raw).to(DEV), torch.from_numpy(x).to(DEV)
    b_d, y0_d = torch.from_numpy(bias).to(DEV), torch.from_numpy(y0).to(DEV)
    tid, tol, tag = TYPES[name][0], TOLERANCE[name], f"{name} n_tok={n_tok} seed={rng.seed_value}"

    y = ops.matvec(tid, w_d, x_d, n_out, k, b_d, None)
    check_matvec(y, ref, x_seen_by(name, x), np.broadcast_to(bias, (n_tok, n_out)), tol, f"{tag} bias")
    y = ops.matvec(tid, w_d, x_d, n_out, k, None, y0_d)
    check_matvec(y, ref, x_seen_by(name, x), y0.astype(np.float64), tol, f"{tag} accumulate")
    y = ops.matvec(tid, w_d, x_d, n_out, k, b_d, y0_d)
    check_matvec(y, ref, x_seen_by(name, x), y0.astype(np.float64) + bias, tol, f"{tag} bias+accumulate")
    assert torch.equal(y0_d.cpu(), torch.from_numpy(y0)), "y_accumulate must not be modified"


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16"])
@pytest.mark.parametrize("n_out,k", [(4096, 4096), (1024, 4096), (512, 14336)])
def test_matvec_llama_shapes(ops, rng, name, n_out, k):
    raw, ref = make_weights(name, n_out, k, rng)
    x = rng.standard_normal((1, k)).astype(np.float32)
    y = ops.matvec(TYPES[name][0], torch.from_numpy(raw).to(DEV), torch.from_numpy(x).to(DEV), n_out, k, None, None)
    check_matvec(y, ref, x_seen_by(name, x), None, TOLERANCE[name], f"{name} {n_out}x{k} seed={rng.seed_value}")


@pytest.mark.parametrize("name", sorted(DP4A_TYPES))
@pytest.mark.parametrize("n_tok,k", [(1, 32 * 9), (1, 4096), (2, 14336), (8, 4096)])
def test_matvec_int8_activations_stay_close_to_float(ops, rng, name, n_tok, k):
    # The int8 activation path (two terms by default) against the unquantized product.
    k = -(-k // qk_of(name)) * qk_of(name)  # whole blocks of this type
    raw, ref = make_weights(name, 64, k, rng)
    x = rng.standard_normal((n_tok, k)).astype(np.float32)
    w_d, x_d = torch.from_numpy(raw).to(DEV), torch.from_numpy(x).to(DEV)
    y = ops.matvec(TYPES[name][0], w_d, x_d, 64, k, None, None, True)
    tag = f"{name} n_tok={n_tok} k={k} seed={rng.seed_value}"
    check_matvec(y, ref, x_seen_by(name, x, int8=True), None, TOLERANCE[name], tag + " vs int8 x")
    check_matvec(y, ref, x, None, INT8_X_TOLERANCE, tag + " vs float x")


@pytest.mark.parametrize("name", sorted(DP4A_TYPES))
@pytest.mark.parametrize("n_out,n_tok,k", [(64, 1, 32 * 9), (4096, 1, 4096), (1000, 2, 14336), (4096, 8, 2048)])
def test_matvec_prequantized_x_matches_per_cta(ops, rng, name, n_out, n_tok, k):
    # x quantized once by its own grid (as the model runs decode) against each
    # CTA quantizing it: the same function on the same values, so the same bits.
    k = -(-k // qk_of(name)) * qk_of(name)
    raw, ref = make_weights(name, n_out, k, rng)
    x = rng.standard_normal((n_tok, k)).astype(np.float32)
    w_d, x_d = torch.from_numpy(raw).to(DEV), torch.from_numpy(x).to(DEV)
    per_cta = ops.matvec(TYPES[name][0], w_d, x_d, n_out, k, None, None, True, False)
    pre = ops.matvec(TYPES[name][0], w_d, x_d, n_out, k, None, None, True, True)
    tag = f"{name} {n_out}x{k} n_tok={n_tok} seed={rng.seed_value}"
    assert torch.equal(pre, per_cta), f"{tag}: prequantized x differs by {(pre - per_cta).abs().max().item():.3e}"
    check_matvec(pre, ref, x_seen_by(name, x, int8=True), None, TOLERANCE[name], tag + " vs int8 x")


def test_matvec_many_rows(ops, rng):
    # A grid of thousands of CTAs, and rows past the last full group of four.
    n_out, k = 40003, 256
    raw, ref = make_weights("Q4_K", n_out, k, rng)
    x = rng.standard_normal((2, k)).astype(np.float32)
    y = ops.matvec(TYPES["Q4_K"][0], torch.from_numpy(raw).to(DEV), torch.from_numpy(x).to(DEV), n_out, k, None, None)
    check_matvec(y, ref, x_seen_by("Q4_K", x), None, TOLERANCE["Q4_K"], f"Q4_K {n_out}x{k} seed={rng.seed_value}")


# ---------------------------------------------------------------- Q4_K fragment kernel (matvec_mma.cu)


def fragment_x(x: np.ndarray) -> np.ndarray:
    """x as the fragment kernel multiplies it: each token's 256-element
    super-block scaled by the power of two that puts its largest |x| in
    [2^14, 2^15), rounded to fp16, scaled back (11 significant bits)."""
    t, k = x.shape
    blk = x.astype(np.float32).reshape(t, k // 256, 256)
    m = np.abs(blk).max(axis=2, keepdims=True)
    e = np.where(m > 0, np.frexp(m)[1], 0)
    e = np.maximum(e, -100)
    scale = np.ldexp(np.float32(1.0), 15 - e).astype(np.float32)
    r = (blk * scale).astype(np.float16).astype(np.float32) / scale
    return r.reshape(t, k)


# fp32 sums of exact fp16 x integer products (the tensor core's accumulation)
FRAGMENT_TOLERANCE = 1e-4


# local: each CTA prepares x in its shared memory (one token, or a few of
# short rows); otherwise, and for larger stages always, the prep kernel does.
@pytest.mark.parametrize("local", [False, True], ids=["prep", "local"])
@pytest.mark.parametrize("n_tok", [1, 2, 3, 8])
@pytest.mark.parametrize("n_out,k", [(1, 256), (17, 512), (257, 4096 + 256), (4096, 4096), (1000, 14336)])
def test_q4k_fragment_matvec_matches_reference(ops, rng, n_out, k, n_tok, local):
    raw, ref = make_weights("Q4_K", n_out, k, rng)
    x = rng.standard_normal((n_tok, k)).astype(np.float32)
    w_d, x_d = torch.from_numpy(raw).to(DEV), torch.from_numpy(x).to(DEV)
    tag = f"Q4_K fragment {n_out}x{k} n_tok={n_tok} local={local} seed={rng.seed_value}"
    y = ops.matvec(12, w_d, x_d, n_out, k, None, None, False, False, 8, local)
    check_matvec(y, ref, fragment_x(x), None, FRAGMENT_TOLERANCE, tag)
    # Against x itself: the rounding to 11 bits is all that separates them.
    check_matvec(y, ref, x, None, 2e-3, tag + " (unrounded x)")
    # Above its token limit the launch takes the float kernel.
    if n_tok > 1:
        y = ops.matvec(12, w_d, x_d, n_out, k, None, None, False, False, n_tok - 1, local)
        check_matvec(y, ref, x, None, TOLERANCE["Q4_K"], tag + " (float kernel)")


# bf16 x (the forward's batches past the float matvec): the same kernel, the
# prep reading bf16; equal to the fp32-x launch on x rounded to bf16.
@pytest.mark.parametrize("local", [False, True], ids=["prep", "local"])
@pytest.mark.parametrize("n_tok", [1, 4, 8])
@pytest.mark.parametrize("n_out,k", [(17, 512), (4096, 4096), (1000, 14336)])
def test_q4k_fragment_matvec_on_bf16_x(ops, rng, n_out, k, n_tok, local):
    raw, ref = make_weights("Q4_K", n_out, k, rng)
    x = rng.standard_normal((n_tok, k)).astype(np.float32)
    x[0, :256] *= 1e5  # a super-block far outside fp16's range
    xb = torch.from_numpy(x).to(torch.bfloat16)
    x_seen = xb.float().numpy()
    w_d = torch.from_numpy(raw).to(DEV)
    bias = rng.standard_normal(n_out).astype(np.float32)
    y0 = rng.standard_normal((n_tok, n_out)).astype(np.float32)
    tag = f"Q4_K fragment bf16 x {n_out}x{k} n_tok={n_tok} local={local} seed={rng.seed_value}"
    y = ops.matvec_q4k_frag(w_d, xb.to(DEV), n_out, k, None, None, local)
    check_matvec(y, ref, fragment_x(x_seen), None, FRAGMENT_TOLERANCE, tag)
    same = ops.matvec(12, w_d, torch.from_numpy(x_seen).to(DEV), n_out, k, None, None, False, False, 8, local)
    assert torch.equal(y, same), tag + ": differs from the fp32-x launch on the same values"
    y = ops.matvec_q4k_frag(
        w_d, xb.to(DEV), n_out, k, torch.from_numpy(bias).to(DEV), torch.from_numpy(y0).to(DEV), local
    )
    check_matvec(y, ref, fragment_x(x_seen), y0.astype(np.float64) + bias, FRAGMENT_TOLERANCE, tag + " bias+acc")


@pytest.mark.parametrize("local", [False, True], ids=["prep", "local"])
def test_q4k_fragment_matvec_bias_accumulate_and_range(ops, rng, local):
    n_out, k, n_tok = 131, 1024, 5
    raw, ref = make_weights("Q4_K", n_out, k, rng)
    x = rng.standard_normal((n_tok, k)).astype(np.float32)
    # Super-blocks far outside fp16's range both ways, and one of zeros: the
    # per-block scale keeps every one exact to 11 bits.
    x[0, :256] *= 1e6
    x[1, 256:512] *= 1e-9
    x[2, 512:768] = 0.0
    x[3, 768:] *= 3e4
    bias = rng.standard_normal(n_out).astype(np.float32)
    y0 = rng.standard_normal((n_tok, n_out)).astype(np.float32)
    w_d, x_d = torch.from_numpy(raw).to(DEV), torch.from_numpy(x).to(DEV)
    b_d, y0_d = torch.from_numpy(bias).to(DEV), torch.from_numpy(y0).to(DEV)
    xf, tag = fragment_x(x), f"Q4_K fragment seed={rng.seed_value}"
    y = ops.matvec(12, w_d, x_d, n_out, k, None, None, False, False, 8, local)
    check_matvec(y, ref, xf, None, FRAGMENT_TOLERANCE, tag)
    y = ops.matvec(12, w_d, x_d, n_out, k, b_d, y0_d, False, False, 8, local)
    check_matvec(y, ref, xf, y0.astype(np.float64) + bias, FRAGMENT_TOLERANCE, tag + " bias+accumulate")
    assert torch.equal(y0_d.cpu(), torch.from_numpy(y0)), "y_accumulate must not be modified"


@pytest.mark.parametrize("local", [False, True], ids=["prep", "local"])
def test_q4k_fragment_matvec_is_deterministic_and_graph_safe(ops, rng, local):
    n_out, k = 4096, 4096
    raw, ref = make_weights("Q4_K", n_out, k, rng)
    w_d = torch.from_numpy(raw).to(DEV)
    x_d = torch.zeros(3, k, device=DEV)
    g, y = captured(lambda: ops.matvec(12, w_d, x_d, n_out, k, None, None, False, False, 8, local))
    x = rng.standard_normal((3, k)).astype(np.float32)
    x_d.copy_(torch.from_numpy(x))
    g.replay()
    torch.cuda.synchronize()
    first = y.clone()
    check_matvec(y, ref, fragment_x(x), None, FRAGMENT_TOLERANCE, f"graph replay seed={rng.seed_value}")
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(first, y), "two replays of one product differ"
    direct = ops.matvec(12, w_d, x_d, n_out, k, None, None, False, False, 8, local)
    assert torch.equal(first, direct), "the graph and a direct launch differ"


def test_matvec_in_cuda_graph(ops, rng):
    n_out, k = 300, 512
    raw, ref = make_weights("Q6_K", n_out, k, rng)
    w_d = torch.from_numpy(raw).to(DEV)
    x_d = torch.zeros(1, k, device=DEV)
    g, y = captured(lambda: ops.matvec(14, w_d, x_d, n_out, k, None, None))
    for _ in range(2):
        x = rng.standard_normal((1, k)).astype(np.float32)
        x_d.copy_(torch.from_numpy(x))
        g.replay()
        torch.cuda.synchronize()
        check_matvec(y, ref, x_seen_by("Q6_K", x), None, TOLERANCE["Q6_K"], f"graph replay seed={rng.seed_value}")


# ---------------------------------------------------------------- tensor-core product (1..64 tokens)

# The kernel rounds each decoded weight and takes x as bf16: the exact
# reference is the float64 product of those bf16 values, which fp32
# accumulation of exact bf16 x bf16 products matches to a few ulps.
TC_TOLERANCE = 1e-5


def bf16_values(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16).float().numpy()


def tc_cases(name: str) -> list[tuple[int, int]]:
    qk = max(qk_of(name), 8)
    cases = [(64, 4096 + 256), (1000, 3 * 256), (4096, 1024)]  # split-K, partial row tile, many tiles
    cases += [(128, 512)]  # a small model's k/v slice: two row tiles, two passes
    if qk == 32:
        cases += [(200, 9 * 32), (70, 4096 + 96)]  # rows ending inside a 256-element pass
    if name in FLOAT_TYPES:
        cases += [(130, 3 * 256 + 8)]
    return cases


# The staged product's integer path (Q4_K, Q6_K) applies each group's scale
# to an MMA of exact integer weights: no bf16 rounding of the weights, so its
# reference is the exact dequantization. Q4_K sums (128 + q) x and subtracts
# 128 sum x, which costs a few more fp32 ulps of the larger sums.
TC_INT_TYPES = ("Q4_K", "Q6_K")
TC_INT_TOKENS = 32  # the staged runs below take the integer path up to here
TC_INT_TOLERANCE = 5e-5


@pytest.fixture(params=["v1", "staged"])
def tc_kernel(request, monkeypatch):
    """Both implementations of the product (HELEXA_TC_KERNEL and HELEXA_TC_INT, read by the test op at each call)."""
    monkeypatch.setenv("HELEXA_TC_KERNEL", request.param)
    monkeypatch.setenv("HELEXA_TC_INT", str(TC_INT_TOKENS))
    return request.param


def tc_reference(tc_kernel: str, name: str, n_tok: int, ref: np.ndarray) -> tuple[np.ndarray, float]:
    """The weights a product sees, and its tolerance: exact on the integer path, else rounded to bf16."""
    if tc_kernel == "staged" and name in TC_INT_TYPES and n_tok <= TC_INT_TOKENS:
        return ref, TC_INT_TOLERANCE
    return bf16_values(ref), TC_TOLERANCE


def tc_product(ops, rng, name: str, n_out: int, k: int, n_tok: int):
    """One product of random weights and bf16 activations: (y, reference weights, x, tag)."""
    raw, ref = make_weights(name, n_out, k, rng)
    x = bf16_values(rng.standard_normal((n_tok, k)))
    x_d = torch.from_numpy(x).to(torch.bfloat16).to(DEV)
    y = ops.matmul_tc(TYPES[name][0], torch.from_numpy(raw).to(DEV), x_d, n_out, k, None, None)
    return y, ref, x, f"{name} n_out={n_out} k={k} n_tok={n_tok} seed={rng.seed_value}"


@pytest.mark.parametrize("n_tok", [1, 2, 8, 9, 33, 64])
@pytest.mark.parametrize("name,n_out,k", [(name, n, k) for name in TYPES for n, k in tc_cases(name)])
def test_matmul_tc_matches_gguf_reference(ops, rng, tc_kernel, name, n_out, k, n_tok):
    y, ref, x, tag = tc_product(ops, rng, name, n_out, k, n_tok)
    wref, tol = tc_reference(tc_kernel, name, n_tok, ref)
    check_matvec(y, wref, x, None, tol, tag)


@pytest.mark.parametrize("wide", ["0", "4"])  # CTAs of 4 warps everywhere, or of 8 from 4 token tiles
@pytest.mark.parametrize("n_tok", [17, 40, 64])
@pytest.mark.parametrize("n_out,k", [(200, 4096 + 256), (4096, 1024)])  # split-K and a partial 128-row tile
@pytest.mark.parametrize("name", ["Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16"])
def test_matmul_tc_cta_widths(ops, rng, monkeypatch, name, n_out, k, n_tok, wide):
    """HELEXA_TC_WIDE: the staged product in CTAs of 4 or 8 warps computes the same exact products."""
    monkeypatch.setenv("HELEXA_TC_KERNEL", "staged")
    monkeypatch.setenv("HELEXA_TC_INT", "0")
    monkeypatch.setenv("HELEXA_TC_WIDE", wide)
    y, ref, x, tag = tc_product(ops, rng, name, n_out, k, n_tok)
    check_matvec(y, bf16_values(ref), x, None, TC_TOLERANCE, f"{tag} wide={wide}")


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q6_K", "BF16"])
@pytest.mark.parametrize("n_out,k", [(96, 4096), (4096, 512)])  # with and without split-K
@pytest.mark.parametrize("n_tok", [12, 24, 40])  # 2, 4 and 8 token tiles
def test_matmul_tc_bias_and_accumulate(ops, rng, tc_kernel, name, n_out, k, n_tok):
    raw, ref = make_weights(name, n_out, k, rng)
    x = bf16_values(rng.standard_normal((n_tok, k)))
    bias = rng.standard_normal(n_out).astype(np.float32)
    y0 = rng.standard_normal((n_tok, n_out)).astype(np.float32)
    w_d, x_d = torch.from_numpy(raw).to(DEV), torch.from_numpy(x).to(torch.bfloat16).to(DEV)
    b_d, y0_d = torch.from_numpy(bias).to(DEV), torch.from_numpy(y0).to(DEV)
    tid, tag = TYPES[name][0], f"{name} {n_out}x{k} seed={rng.seed_value}"
    wb, tol = tc_reference(tc_kernel, name, n_tok, ref)
    y = ops.matmul_tc(tid, w_d, x_d, n_out, k, b_d, y0_d)
    check_matvec(y, wb, x, y0.astype(np.float64) + bias, tol, tag + " bias+accumulate")
    assert torch.equal(y0_d.cpu(), torch.from_numpy(y0)), "y_accumulate must not be modified"


def test_matmul_tc_is_deterministic(ops, rng, tc_kernel):
    # Split-K partials are added in a fixed order: the same inputs give the same bits.
    raw, _ = make_weights("Q4_K", 128, 14336, rng)
    w_d = torch.from_numpy(raw).to(DEV)
    x_d = torch.from_numpy(bf16_values(rng.standard_normal((32, 14336)))).to(torch.bfloat16).to(DEV)
    first = ops.matmul_tc(12, w_d, x_d, 128, 14336, None, None)
    for _ in range(3):
        assert torch.equal(ops.matmul_tc(12, w_d, x_d, 128, 14336, None, None), first)


def test_matmul_tc_rejects_bad_arguments(ops):
    w = torch.zeros(256 // 32 * 18 * 4, dtype=torch.uint8, device=DEV)
    with pytest.raises(RuntimeError, match="1..64 tokens"):
        ops.matmul_tc(2, w, torch.zeros(65, 256, dtype=torch.bfloat16, device=DEV), 4, 256, None, None)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.matmul_tc(2, w, torch.zeros(2, 256, device=DEV), 4, 256, None, None)


_BAD_ARGUMENT_CALLS = """
import torch, helexa_native._C  # noqa: F401
ops = torch.ops.helexa
w = torch.zeros(4 * 18, dtype=torch.uint8, device="cuda")
x = torch.zeros(1, 32, device="cuda")
q4k = torch.zeros(144, dtype=torch.uint8, device="cuda")
calls = [  # (call, words the message must hold)
    (lambda: ops.matvec(2, w, torch.zeros(1, 48, device="cuda"), 2, 48, None, None), "k=48"),
    (lambda: ops.matvec(2, w, torch.zeros(9, 32, device="cuda"), 4, 32, None, None), "got 9"),
    (lambda: ops.matvec(5, w, x, 4, 32, None, None), "type id 5"),
    (lambda: ops.matvec(2, w, x, 5, 32, None, None), "holds 72 bytes"),
    (lambda: ops.matvec(2, w.float(), x, 4, 32, None, None), "uint8"),
    (lambda: ops.dequantize(12, q4k, 1, 128, True), "k=128"),
    (lambda: ops.dequantize(12, q4k, 2, 256, True), "need 288"),
    (lambda: ops.embedding(q4k, 5, torch.zeros(1, dtype=torch.int32, device="cuda"),
                           torch.zeros(1, 32, device="cuda"), 4), "type id 5"),
]
for i, (call, words) in enumerate(calls):
    try:
        call()
    except (RuntimeError, ValueError) as e:
        assert words in str(e), f"call {i}: message lacks {words!r}: {e}"
        continue
    raise SystemExit(f"call {i} did not raise")
y = ops.matvec(2, w, x, 4, 32, None, None)  # the process is still usable
torch.cuda.synchronize()
assert torch.equal(y.cpu(), torch.zeros(1, 4)), y
print("all rejected")
"""


def test_ops_reject_bad_arguments_with_clear_messages():
    # In a child process: a crash on bad arguments must fail this test, not
    # take the rest of the file down with it.
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _BAD_ARGUMENT_CALLS], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "all rejected" in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])


DEQUANT_CASES = [
    (name, n_out, k)
    for name in TYPES
    for n_out, k in (
        [(1, 1), (3, 7), (257, 256), (64, 4096 + 256)]
        if name in FLOAT_TYPES
        else [(1, qk_of(name)), (257, 3 * qk_of(name)), (64, 4096 + 256)] + ([(5, 9 * 32)] if qk_of(name) == 32 else [])
    )
]


@pytest.mark.parametrize("name,n_out,k", DEQUANT_CASES)
def test_dequantize_matches_gguf(ops, rng, name, n_out, k):
    raw, ref = make_weights(name, n_out, k, rng)
    w_d = torch.from_numpy(raw).to(DEV)
    tag = f"{name} {n_out}x{k} seed={rng.seed_value}"
    f32 = ops.dequantize(TYPES[name][0], w_d, n_out, k, False).cpu()
    assert f32.dtype == torch.float32 and f32.shape == (n_out, k)
    assert torch.equal(f32, torch.from_numpy(ref)), (
        f"{tag}: float32 differs from gguf (max diff {(f32 - torch.from_numpy(ref)).abs().max().item():.3g})"
    )
    b16 = ops.dequantize(TYPES[name][0], w_d, n_out, k, True).cpu()
    assert b16.dtype == torch.bfloat16 and b16.shape == (n_out, k)
    want = torch.from_numpy(ref).to(torch.bfloat16)
    assert torch.equal(b16, want), f"{tag}: bf16 is not the rounded reference"


@pytest.mark.parametrize("name", ["Q4_K", "Q8_0", "BF16"])
def test_out_variants_write_in_place(ops, rng, name):
    n_out, k, n_tok = 77, 512, 2
    raw, ref = make_weights(name, n_out, k, rng)
    x = rng.standard_normal((n_tok, k)).astype(np.float32)
    y0 = rng.standard_normal((n_tok, n_out)).astype(np.float32)
    w_d, x_d = torch.from_numpy(raw).to(DEV), torch.from_numpy(x).to(DEV)
    y = torch.from_numpy(y0).to(DEV)
    ops.matvec_out(TYPES[name][0], w_d, x_d, y, n_out, k, None, True)
    check_matvec(
        y, ref, x_seen_by(name, x), y0.astype(np.float64), TOLERANCE[name], f"{name} matvec_out seed={rng.seed_value}"
    )
    out = torch.full((n_out, k), float("nan"), dtype=torch.bfloat16, device=DEV)
    ops.dequantize_out(TYPES[name][0], w_d, out, n_out, k)
    assert torch.equal(out.cpu(), torch.from_numpy(ref).to(torch.bfloat16))
