"""Forward kernels (everything but the weight matvec / dequant) against torch references.

Each test calls one torch op (torch.ops.helexa.*) on fresh random inputs of
awkward shapes, with outputs NaN-poisoned first so an unwritten element
fails, and compares with a float64 (or exact) torch reference using the
tolerance table below. Attention is checked against plain softmax attention
on the bf16 cache values; sampling against a straightforward implementation
of params.py's order driven by params.uniform.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from sampling_reference import ref_allowed, ref_sample

from helexa_native import params as hparams
from helexa_native.rope import apply_rope, rope_cos_sin

pytestmark = pytest.mark.gpu

DEV = "cuda"

# (rtol, atol) per kind of result. "f32": float32 kernel vs float64
# reference (rounding order only); "f32_sum": float32 sums over thousands of
# terms; "bf16": a result rounded to bf16 (one bf16 ulp); "mma": tensor-core
# attention, whose q and softmax weights are rounded to bf16.
TOL = {
    "exact": (0.0, 0.0),
    "f32": (2e-6, 1e-6),
    "f32_sum": (1e-4, 2e-5),
    "bf16": (8e-3, 1e-5),
    "mma": (1e-2, 1e-2),
}


def assert_close(got, want, kind, msg=""):
    rtol, atol = TOL[kind]
    got = got.detach().to("cpu", torch.float64)
    want = want.detach().to("cpu", torch.float64)
    assert got.shape == want.shape, f"{msg} shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not torch.isnan(got).any(), f"{msg} output has NaN (unwritten or wrong)"
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=False, msg=lambda m: f"{msg}: {m}")


def poisoned(*shape, dtype=torch.float32):
    t = torch.empty(*shape, dtype=dtype, device=DEV)
    if dtype.is_floating_point:
        t.fill_(float("nan"))
    else:
        t.fill_(-7)
    return t


@pytest.fixture(scope="module")
def ops():
    import helexa_native._C  # noqa: F401  (registers torch.ops.helexa)

    return torch.ops.helexa


@pytest.fixture()
def gen(request):
    """A generator with a fresh seed each run (recorded in the test's user_properties)."""
    seed = int.from_bytes(os.urandom(6), "little")
    request.node.user_properties.append(("seed", seed))
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def randn(*shape, gen, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEV)


# --------------------------------------------------------------- embedding

# GGML ids and the offsets of the fp16 scale fields inside one block.
QUANT_TYPES = {
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


def _quant_table(name, vocab, hidden, rng):
    import gguf
    from gguf.quants import dequantize

    qtype = gguf.GGMLQuantizationType[name]
    qk, bb = gguf.GGML_QUANT_SIZES[qtype]
    nblk = vocab * hidden // qk
    raw = rng.integers(0, 256, size=(nblk, bb), dtype=np.uint8)
    for off in QUANT_TYPES[name][1]:
        raw[:, off : off + 2] = (rng.standard_normal(nblk) * 0.05).astype(np.float16).view(np.uint8).reshape(nblk, 2)
    raw = raw.reshape(vocab, -1)
    ref = dequantize(raw, qtype).reshape(vocab, hidden).astype(np.float32)
    return torch.from_numpy(raw.copy()), torch.from_numpy(ref)


def _ids(vocab, n, gen):
    ids = torch.randint(0, vocab, (n,), generator=gen, dtype=torch.int32)
    extras = torch.tensor([0, vocab - 1, -1, vocab, vocab + 1000, -(2**31)], dtype=torch.int32)
    return torch.cat([ids, extras])


@pytest.mark.parametrize("name", list(QUANT_TYPES))
@pytest.mark.parametrize("n", [1, 9])
def test_embedding_quantized(ops, gen, name, n):
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    qk = 256 if name.endswith("_K") or name == "IQ4_XS" else 32
    vocab, hidden = 37, qk * 3
    table, ref = _quant_table(name, vocab, hidden, rng)
    ids = _ids(vocab, n, gen)
    out = poisoned(ids.numel(), hidden)
    ops.embedding(table.to(DEV), QUANT_TYPES[name][0], ids.to(DEV), out, vocab)
    valid = (ids >= 0) & (ids < vocab)
    want = torch.zeros(ids.numel(), hidden)
    want[valid] = ref[ids[valid].long()]
    assert_close(out, want, "f32", name)


@pytest.mark.parametrize("dtype,type_id", [(torch.float32, 0), (torch.float16, 1), (torch.bfloat16, 30)])
@pytest.mark.parametrize("hidden", [1, 37, 576])
def test_embedding_float(ops, gen, dtype, type_id, hidden):
    vocab = 101
    table = randn(vocab, hidden, gen=gen, dtype=dtype)
    ids = _ids(vocab, 5, gen)
    out = poisoned(ids.numel(), hidden)
    ops.embedding(table, type_id, ids.to(DEV), out, vocab)
    valid = (ids >= 0) & (ids < vocab)
    want = torch.zeros(ids.numel(), hidden)
    want[valid] = table.cpu().float()[ids[valid].long()]
    assert_close(out, want, "exact", str(dtype))


# ------------------------------------------------------------------ norms


def _rms_ref(r, w, eps):
    r = r.double()
    return r / torch.sqrt((r * r).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("h", [1, 33, 576, 1000, 4096, 5123, 8192, 8196])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm(ops, gen, h, n, with_delta):
    eps = 1e-5
    res = randn(n, h, gen=gen, scale=3.0)
    delta = randn(n, h, gen=gen) if with_delta else None
    w = randn(h, gen=gen)
    want_res = res.double() + (delta.double() if with_delta else 0.0)
    want = _rms_ref(want_res, w, eps)
    out_f = poisoned(n, h)
    out_b = poisoned(n, h, dtype=torch.bfloat16)
    ops.add_rms_norm(res, delta, w, eps, out_f, out_b)
    assert_close(res, want_res, "f32", "residual")
    assert_close(out_f, want, "f32", "out_f32")
    assert_close(out_b.float(), want, "bf16", "out_bf16")


def test_add_rms_norm_single_output(ops, gen):
    res = randn(3, 64, gen=gen)
    w = randn(64, gen=gen)
    want = _rms_ref(res, w, 1e-6)
    out_b = poisoned(3, 64, dtype=torch.bfloat16)
    ops.add_rms_norm(res, None, w, 1e-6, None, out_b)
    assert_close(out_b.float(), want, "bf16")


@pytest.mark.parametrize("d", [64, 128, 80])
@pytest.mark.parametrize("n,heads", [(1, 1), (7, 9)])
def test_head_rms_norm(ops, gen, d, n, heads):
    x = randn(n, heads, d, gen=gen, scale=2.0)
    w = randn(d, gen=gen)
    want = _rms_ref(x, w, 1e-6)
    ops.head_rms_norm(x, w, 1e-6)
    assert_close(x, want, "f32")


# ------------------------------------------------------------------- rope


def _rope_direct(x, pos, inv, style):
    """Float64 rotation straight from the definition."""
    x = x.double().cpu()
    n, h, d = x.shape
    ang = pos.double().cpu()[:, None] * inv.double().cpu()[None, :]  # [n, d/2]
    c, s = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    if style == "half":
        i0, i1 = torch.arange(d // 2), torch.arange(d // 2) + d // 2
    else:
        i0, i1 = torch.arange(0, d, 2), torch.arange(1, d, 2)
    out = x.clone()
    out[..., i0] = x[..., i0] * c - x[..., i1] * s
    out[..., i1] = x[..., i1] * c + x[..., i0] * s
    return out


@pytest.mark.parametrize("style", ["half", "pairs"])
@pytest.mark.parametrize("d", [64, 128, 80])
@pytest.mark.parametrize("freq_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,nq,nk", [(1, 1, 1), (17, 9, 3)])
def test_rope(ops, gen, style, d, freq_dtype, n, nq, nk):
    inv64 = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    inv = inv64.to(freq_dtype)
    pos = torch.randint(0, 131072, (n,), generator=gen, dtype=torch.int32)
    pos[0] = 0
    q, k = randn(n, nq, d, gen=gen), randn(n, nk, d, gen=gen)
    q0, k0 = q.clone(), k.clone()
    ops.rope(q, k, pos.to(DEV), inv.to(DEV), style)
    # Direct formula in float64 (angles from the frequencies the kernel got).
    inv_used = inv.double()
    assert_close(q, _rope_direct(q0, pos, inv_used, style), "f32", "q direct")
    assert_close(k, _rope_direct(k0, pos, inv_used, style), "f32", "k direct")
    # The CPU reference's own rotation: float64 cos/sin, float32 arithmetic.
    cos, sin = rope_cos_sin(inv_used, pos.long())
    want_q = apply_rope(q0.cpu(), cos, sin, style)
    want_k = apply_rope(k0.cpu(), cos, sin, style)
    assert_close(q, want_q, "f32", "q reference")
    assert_close(k, want_k, "f32", "k reference")


def _inv_freq(d):
    return 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))


@pytest.mark.parametrize("d", [64, 128, 80])
def test_rope_table(ops, gen, d):
    inv = _inv_freq(d)
    length = 3000
    table = poisoned(length, d // 2, 2)
    ops.rope_table(inv.to(DEV), table)
    cos, sin = rope_cos_sin(inv, torch.arange(length))
    # Same float64 angles rounded once to float32 as the CPU reference.
    assert_close(table[..., 0], cos[:, : d // 2].float(), "f32", "cos")
    assert_close(table[..., 1], sin[:, : d // 2].float(), "f32", "sin")


@pytest.mark.parametrize("style", ["half", "pairs"])
@pytest.mark.parametrize("d", [64, 128, 80])
@pytest.mark.parametrize("n,nq,nk", [(1, 1, 1), (1, 32, 8), (17, 9, 3)])
@pytest.mark.parametrize("mode", ["table", "no_table", "short_table", "qk_norm"])
def test_rope_kv_append(ops, gen, style, d, n, nq, nk, mode):
    """Fused norm + rope + pool append equals head_rms_norm, rope and kv_append run apart.

    The rotation uses the logical positions `pos`, the pool write the
    unrelated pool positions `slot_pos` (a paged layout)."""
    cap = 64
    inv = _inv_freq(d).to(DEV)
    pos = torch.randperm(cap, generator=gen)[:n].to(torch.int32)
    slot_pos = torch.randperm(cap, generator=gen)[:n].to(torch.int32)
    if n > 2:
        pos[1], pos[2] = -1, cap  # rotated with the float64 fallback
        slot_pos[1], slot_pos[2] = cap, -1  # not written
    pos_d, slot_d = pos.to(DEV), slot_pos.to(DEV)
    q, k, v = randn(n, nq, d, gen=gen), randn(n, nk, d, gen=gen), randn(n, nk, d, gen=gen)
    q0, k0 = q.clone(), k.clone()
    qn = randn(d, gen=gen) if mode == "qk_norm" else None
    kn = randn(d, gen=gen) if mode == "qk_norm" else None
    # Reference: the standalone kernels (float64 frequencies, the same values the table holds).
    q_ref, k_ref = q.clone(), k.clone()
    if qn is not None:
        ops.head_rms_norm(q_ref, qn, 1e-6)
        ops.head_rms_norm(k_ref, kn, 1e-6)
    ops.rope(q_ref, k_ref, pos_d, inv, style)
    kc_ref = poisoned(nk, cap, d, dtype=torch.bfloat16)
    vc_ref = poisoned(nk, cap, d, dtype=torch.bfloat16)
    ops.kv_append(k_ref, v, kc_ref, vc_ref, slot_d)

    table = None
    if mode != "no_table":
        table = poisoned(cap if mode != "short_table" else cap // 2, d // 2, 2)
        ops.rope_table(inv, table)
    kc = poisoned(nk, cap, d, dtype=torch.bfloat16)
    vc = poisoned(nk, cap, d, dtype=torch.bfloat16)
    ops.rope_kv_append(q, k, v, kc, vc, pos_d, slot_d, table, inv, qn, kn, 1e-6, style)
    assert_close(q, q_ref, "f32", "q")
    assert_close(k, k_ref, "f32", "k")
    # Pool rows: written exactly where kv_append writes them, NaN elsewhere.
    written = torch.zeros(cap, dtype=torch.bool)
    for t in range(n):
        p = int(slot_pos[t])
        if 0 <= p < cap:
            written[p] = True
    kc_c, vc_c, kr_c, vr_c = kc.cpu().float(), vc.cpu().float(), kc_ref.cpu().float(), vc_ref.cpu().float()
    assert torch.isnan(kc_c[:, ~written]).all() and torch.isnan(vc_c[:, ~written]).all()
    assert torch.equal(vc_c[:, written], vr_c[:, written])
    assert_close(kc_c[:, written], kr_c[:, written], "bf16", "k cache")
    if qn is None:
        # And straight from the definition, in float64.
        assert_close(q, _rope_direct(q0, pos, inv, style), "f32", "q direct")
        assert_close(k, _rope_direct(k0, pos, inv, style), "f32", "k direct")


def test_rope_kv_append_bad_sizes(ops, gen):
    q, k, v = randn(1, 2, 8, gen=gen), randn(1, 1, 8, gen=gen), randn(1, 1, 8, gen=gen)
    kc = poisoned(1, 4, 8, dtype=torch.bfloat16)
    vc = poisoned(1, 4, 8, dtype=torch.bfloat16)
    pos = torch.zeros(1, dtype=torch.int32, device=DEV)
    with pytest.raises((RuntimeError, ValueError), match="together"):
        ops.rope_kv_append(q, k, v, kc, vc, pos, pos, None, _inv_freq(8).to(DEV), randn(8, gen=gen), None, 1e-6, "half")
    with pytest.raises((RuntimeError, ValueError), match="style"):
        ops.rope_kv_append(q, k, v, kc, vc, pos, pos, None, _inv_freq(8).to(DEV), None, None, 1e-6, "diagonal")
    with pytest.raises((RuntimeError, ValueError), match="slot_pos"):
        ops.rope_kv_append(
            q,
            k,
            v,
            kc,
            vc,
            pos,
            torch.zeros(2, dtype=torch.int32, device=DEV),
            None,
            _inv_freq(8).to(DEV),
            None,
            None,
            1e-6,
            "half",
        )
    assert torch.isnan(kc.float()).all()  # nothing written by a refused call


# --------------------------------------------------------------- kv cache


@pytest.mark.parametrize("d", [64, 128, 6])
@pytest.mark.parametrize("n", [1, 13])
def test_kv_append(ops, gen, d, n):
    nk, cap = 3, 40
    k, v = randn(n, nk, d, gen=gen), randn(n, nk, d, gen=gen)
    slot_pos = torch.randperm(cap, generator=gen)[:n].to(torch.int32)
    if n > 2:
        slot_pos[1], slot_pos[2] = -1, cap  # dropped, never written
    kc = poisoned(nk, cap, d, dtype=torch.bfloat16)
    vc = poisoned(nk, cap, d, dtype=torch.bfloat16)
    ops.kv_append(k, v, kc, vc, slot_pos.to(DEV))
    kc_c, vc_c = kc.cpu().float(), vc.cpu().float()
    written = torch.zeros(cap, dtype=torch.bool)
    for t in range(n):
        p = int(slot_pos[t])
        if 0 <= p < cap:
            written[p] = True
            assert torch.equal(kc_c[:, p], k[t].cpu().to(torch.bfloat16).float())
            assert torch.equal(vc_c[:, p], v[t].cpu().to(torch.bfloat16).float())
    assert torch.isnan(kc_c[:, ~written]).all() and torch.isnan(vc_c[:, ~written]).all()


# --------------------------------------------------------- swiglu, casts


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 4096), (5, 1377)])
def test_swiglu(ops, gen, shape):
    g, u = randn(*shape, gen=gen, scale=4.0), randn(*shape, gen=gen)
    want = g.double() * torch.sigmoid(g.double()) * u.double()
    out_f = poisoned(*shape)
    out_b = poisoned(*shape, dtype=torch.bfloat16)
    ops.swiglu(g, u, out_f, out_b)
    assert_close(out_f, want, "f32")
    assert_close(out_b.float(), want, "bf16")


@pytest.mark.parametrize("n", [1, 7, 4096, 100003])
def test_casts(ops, gen, n):
    x = randn(n, gen=gen, scale=100.0)
    if n >= 7:
        x[:6] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 1e-40, 3.3895e38], device=DEV)
    b = poisoned(n, dtype=torch.bfloat16)
    ops.f32_to_bf16(x, b)
    assert torch.equal(b.view(torch.int16).cpu(), x.to(torch.bfloat16).view(torch.int16).cpu())
    f = poisoned(n)
    ops.bf16_to_f32(b, f)
    assert torch.equal(f.cpu(), b.float().cpu())


# -------------------------------------------------------------- attention


def _seq_kv(nk, length, d, gen):
    """One sequence's keys and values in position order, [nk, length, d] bf16."""
    return (randn(nk, length, d, gen=gen, dtype=torch.bfloat16), randn(nk, length, d, gen=gen, dtype=torch.bfloat16))


def _paged(seqs, block_size, gen, max_blocks=None, spare=3):
    """Scatter sequences' K/V ([nk, len, d] each) into a pool of randomly permuted blocks.

    Returns (k_pool, v_pool, tables [B, max_blocks] int32 on the device). Pool
    rows no sequence owns, and positions past each sequence's end inside its
    last block, hold NaN; table entries past a sequence's blocks name a spare
    (all-NaN) block. Reading anything a kernel must not read shows as NaN.
    """
    nk, _, d = seqs[0][0].shape
    need = [-(-k.shape[1] // block_size) for k, _ in seqs]
    width = max_blocks or max(max(need), 1)
    total = sum(need) + spare
    perm = torch.randperm(total, generator=gen).tolist()
    k_pool = torch.full((nk, total * block_size, d), float("nan"), dtype=torch.bfloat16, device=DEV)
    v_pool = torch.full_like(k_pool, float("nan"))
    tables = torch.full((len(seqs), width), perm[-1], dtype=torch.int32)
    used = 0
    for b, (k, v) in enumerate(seqs):
        ids = perm[used : used + need[b]]
        used += need[b]
        for j, blk in enumerate(ids):
            lo, hi = j * block_size, min(k.shape[1], (j + 1) * block_size)
            k_pool[:, blk * block_size : blk * block_size + hi - lo] = k[:, lo:hi]
            v_pool[:, blk * block_size : blk * block_size + hi - lo] = v[:, lo:hi]
        tables[b, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return k_pool, v_pool, tables.to(DEV)


def _attn_ref(q, kc, vc, q_pos, scale):
    """Softmax attention in float64; q [n, nq, d], query i sees keys <= q_pos[i]."""
    n, nq, d = q.shape
    nk = kc.shape[0]
    G = nq // nk
    last = int(max(q_pos)) + 1
    K = kc[:, :last].double()
    V = vc[:, :last].double()
    out = torch.empty(n, nq, d, dtype=torch.float64, device=q.device)
    keys = torch.arange(last, device=q.device)
    for s in range(0, n, 512):
        qs = q[s : s + 512].double()
        pos = torch.as_tensor(q_pos[s : s + 512], device=q.device)
        for h in range(nq):
            sc = qs[:, h] @ K[h // G].T * scale
            sc = sc.masked_fill(keys[None, :] > pos[:, None], -math.inf)
            out[s : s + 512, h] = torch.softmax(sc, dim=-1) @ V[h // G]
    return out


def _decode_ref(q, seqs, lens, scale):
    """Per sequence b: attention of q[b] over its first lens[b] positions (zeros when 0)."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for b, (k, v) in enumerate(seqs):
        if lens[b] > 0:
            out[b] = _attn_ref(q[b][None], k, v, [lens[b] - 1], scale)[0]
    return out


@pytest.mark.parametrize("d", [64, 128, 80, 96])
@pytest.mark.parametrize("G", [1, 4, 7])
@pytest.mark.parametrize("seq", [1, 17, 4096, 8192])
def test_attention_decode(ops, gen, d, G, seq):
    nk, bs = 2, 16
    nq = nk * G
    k, v = _seq_kv(nk, seq, d, gen)
    k_pool, v_pool, tables = _paged([(k, v)], bs, gen, max_blocks=-(-(seq + 37) // bs))
    q = randn(1, nq, d, gen=gen)
    out = poisoned(1, nq, d)
    scale = 1.0 / math.sqrt(d)
    lens = torch.tensor([seq], dtype=torch.int32, device=DEV)
    ops.attention_decode(q, k_pool, v_pool, lens, tables, bs, out, scale)
    assert_close(out, _decode_ref(q, [(k, v)], [seq], scale), "f32_sum", f"d={d} G={G} seq={seq}")


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("lens", [[1, 17, 300, 0, 2049], [33, 5, 1, 64, 65, 100, 2, 7, 1000]])
def test_attention_decode_batched(ops, gen, d, G, bs, lens):
    """B sequences of different lengths, each through its own shuffled blocks, in one launch."""
    nk = 2
    nq = nk * G
    seqs = [_seq_kv(nk, max(n, 1), d, gen) for n in lens]
    k_pool, v_pool, tables = _paged(seqs, bs, gen)
    q = randn(len(lens), nq, d, gen=gen)
    out = poisoned(len(lens), nq, d)
    scale = 1.0 / math.sqrt(d)
    ops.attention_decode(q, k_pool, v_pool, torch.tensor(lens, dtype=torch.int32, device=DEV), tables, bs, out, scale)
    assert_close(out, _decode_ref(q, seqs, lens, scale), "f32_sum", f"lens={lens}")


# ------------------------------------------------ int8 matvec stages from producers


def _stage_of(ops, x):
    """The two-term int8 stage quantize_x writes for float32 x (the matvec's own), and its byte count."""
    n = x.numel()
    need = 2 * (n + n // 32 * 4 + n // 16 * 4)
    stage = torch.full((need + 16,), 0xA5, dtype=torch.uint8, device=DEV)
    ops.quantize_x(x.contiguous(), stage)
    return stage, need


def _poisoned_stage(like):
    return torch.full_like(like, 0x5A)


def _assert_same_stage(got, want_need):
    """The producer wrote the stage's bytes as quantize_x does, and nothing past them."""
    want, need = want_need
    assert torch.equal(got[:need], want[:need])
    assert (got[need:] == 0x5A).all()


@pytest.mark.parametrize("h", [32, 576, 2048, 4096, 8192, 12288])
@pytest.mark.parametrize("n", [1, 3])
def test_add_rms_norm_writes_the_int8_stage(ops, gen, h, n):
    # 12288 is past the register kernel: the launch quantizes the written output.
    res = randn(n, h, gen=gen, scale=3.0)
    w = randn(h, gen=gen)
    plain, staged = poisoned(n, h), poisoned(n, h)
    ops.add_rms_norm(res.clone(), None, w, 1e-5, plain, None)
    want = _stage_of(ops, plain)
    got = _poisoned_stage(want[0])
    ops.add_rms_norm(res.clone(), None, w, 1e-5, staged, None, got)
    assert torch.equal(staged, plain)
    _assert_same_stage(got, want)


@pytest.mark.parametrize("n_elems", [32, 2816, 3 * 14336, 5 * 1536])
def test_swiglu_writes_the_int8_stage(ops, gen, n_elems):
    g, u = randn(n_elems, gen=gen, scale=4.0), randn(n_elems, gen=gen)
    plain, staged = poisoned(n_elems), poisoned(n_elems)
    ops.swiglu(g, u, plain, None)
    want = _stage_of(ops, plain)
    got = _poisoned_stage(want[0])
    ops.swiglu(g, u, staged, None, got)
    assert torch.equal(staged, plain)
    _assert_same_stage(got, want)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("lens", [[17], [1, 300, 0, 2049]])
def test_attention_decode_writes_the_int8_stage(ops, gen, d, lens):
    nk, G, bs = 2, 4, 16
    seqs = [_seq_kv(nk, max(n, 1), d, gen) for n in lens]
    k_pool, v_pool, tables = _paged(seqs, bs, gen)
    q = randn(len(lens), nk * G, d, gen=gen)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEV)
    plain, staged = poisoned(len(lens), nk * G, d), poisoned(len(lens), nk * G, d)
    ops.attention_decode(q, k_pool, v_pool, lens_t, tables, bs, plain, 0.1)
    want = _stage_of(ops, plain)
    got = _poisoned_stage(want[0])
    ops.attention_decode(q, k_pool, v_pool, lens_t, tables, bs, staged, 0.1, got)
    assert torch.equal(staged, plain)
    _assert_same_stage(got, want)


def test_int8_stage_refuses_shapes_it_cannot_hold(ops, gen):
    stage = torch.zeros(4096, dtype=torch.uint8, device=DEV)
    with pytest.raises((RuntimeError, ValueError), match="h % 32"):
        ops.add_rms_norm(randn(1, 48, gen=gen), None, randn(48, gen=gen), 1e-5, poisoned(1, 48), None, stage)
    with pytest.raises((RuntimeError, ValueError), match="float32 output"):
        ops.add_rms_norm(
            randn(1, 64, gen=gen), None, randn(64, gen=gen), 1e-5, None, poisoned(1, 64, dtype=torch.bfloat16), stage
        )
    with pytest.raises((RuntimeError, ValueError), match="n_elems % 32"):
        ops.swiglu(randn(40, gen=gen), randn(40, gen=gen), poisoned(40), None, stage)
    with pytest.raises((RuntimeError, ValueError), match="needs"):
        ops.swiglu(randn(4096, gen=gen), randn(4096, gen=gen), poisoned(4096), None, stage[:64])


def test_attention_decode_graph_replay(ops, gen):
    """One captured launch serves every length and table: the grid depends only on the sizes."""
    nk, G, d, bs, B = 4, 4, 128, 16, 3
    cap_seq = 6000
    seqs = [_seq_kv(nk, cap_seq, d, gen) for _ in range(B)]
    k_pool, v_pool, tables = _paged(seqs, bs, gen)
    q = randn(B, nk * G, d, gen=gen)
    lens_t = torch.ones(B, dtype=torch.int32, device=DEV)
    tables_t = tables.clone()
    out = poisoned(B, nk * G, d)
    scale = 0.125
    ops.attention_decode(q, k_pool, v_pool, lens_t, tables_t, bs, out, scale)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.attention_decode(q, k_pool, v_pool, lens_t, tables_t, bs, out, scale)
    for lens in ([3, 1, 700], [5999, 6000, 0], [1, 2, 3]):
        # Rotate which sequence each row reads: new tables, same graph.
        order = torch.randperm(B, generator=gen).tolist()
        tables_t.copy_(tables[order])
        out.fill_(float("nan"))
        lens_t.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        want = _decode_ref(q, [seqs[i] for i in order], lens, scale)
        assert_close(out, want, "f32_sum", f"lens={lens} order={order}")


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 7])
@pytest.mark.parametrize("n,start", [(1, 0), (1, 300), (17, 0), (200, 33), (129, 4000)])
@pytest.mark.parametrize("bs", [16, 32])
def test_attention_prefill(ops, gen, d, G, n, start, bs):
    nk = 2
    nq = nk * G
    k, v = _seq_kv(nk, start + n, d, gen)
    k_pool, v_pool, tables = _paged([(k, v)], bs, gen, max_blocks=-(-(start + n + 5) // bs))
    table = tables[0].contiguous()
    q = randn(n, nq, d, gen=gen)
    scale = 1.0 / math.sqrt(d)
    want = _attn_ref(q, k, v, [start + i for i in range(n)], scale)
    out = poisoned(n, nq, d)
    ops.attention_prefill(q, k_pool, v_pool, table, bs, start, out, scale)
    assert_close(out, want, "mma", "tensor cores")
    out_s = poisoned(n, nq, d)
    ops.attention_prefill(q, k_pool, v_pool, table, bs, start, out_s, scale, scalar=True)
    assert_close(out_s, want, "f32_sum", "scalar")


@pytest.mark.parametrize("n,start,G,bs", [(4096, 0, 1, 16), (8192, 0, 4, 32), (1000, 7000, 7, 16)])
def test_attention_prefill_long(ops, gen, n, start, G, bs):
    nk, d = 1, 128
    nq = nk * G
    k, v = _seq_kv(nk, start + n, d, gen)
    k_pool, v_pool, tables = _paged([(k, v)], bs, gen)
    q = randn(n, nq, d, gen=gen)
    scale = 1.0 / math.sqrt(d)
    out = poisoned(n, nq, d)
    ops.attention_prefill(q, k_pool, v_pool, tables[0].contiguous(), bs, start, out, scale)
    want = _attn_ref(q, k, v, [start + i for i in range(n)], scale)
    assert_close(out, want, "mma")


@pytest.mark.parametrize("d", [80, 96, 2])
def test_attention_prefill_other_head_dims(ops, gen, d):
    nk, G, n, start, bs = 3, 2, 21, 10, 16
    k, v = _seq_kv(nk, start + n, d, gen)
    k_pool, v_pool, tables = _paged([(k, v)], bs, gen)
    q = randn(n, nk * G, d, gen=gen)
    out = poisoned(n, nk * G, d)
    ops.attention_prefill(q, k_pool, v_pool, tables[0].contiguous(), bs, start, out, 0.1)
    assert_close(out, _attn_ref(q, k, v, [start + i for i in range(n)], 0.1), "f32_sum")


def test_attention_bad_sizes(ops, gen):
    k, v = _seq_kv(2, 16, 12, gen)
    k_pool, v_pool, tables = _paged([(k, v)], 16, gen)
    lens = torch.tensor([4], dtype=torch.int32, device=DEV)
    with pytest.raises((RuntimeError, ValueError), match="head_dim"):
        ops.attention_decode(randn(1, 2, 12, gen=gen), k_pool, v_pool, lens, tables, 16, poisoned(1, 2, 12), 1.0)
    k, v = _seq_kv(2, 16, 64, gen)
    k_pool, v_pool, tables = _paged([(k, v)], 16, gen)
    table = tables[0].contiguous()
    with pytest.raises((RuntimeError, ValueError), match="start_pos"):
        ops.attention_prefill(randn(10, 2, 64, gen=gen), k_pool, v_pool, table, 16, 10, poisoned(10, 2, 64), 1.0)
    with pytest.raises((RuntimeError, ValueError), match="block_size"):
        ops.attention_prefill(randn(4, 2, 64, gen=gen), k_pool, v_pool, table, 8, 0, poisoned(4, 2, 64), 1.0)
    with pytest.raises((RuntimeError, ValueError), match="block_size"):
        ops.attention_decode(randn(1, 2, 64, gen=gen), k_pool, v_pool, lens, tables, 24, poisoned(1, 2, 64), 1.0)


# --------------------------------------------------------------- sampling


def _params(ops, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, rep=1.0, pres=0.0, freq=0.0, seed=0):
    signed = seed - (1 << 64) if seed >= (1 << 63) else seed
    return ops.sampling_params_device(temperature, top_k, top_p, min_p, rep, pres, freq, signed, torch.device(DEV))


def _logits(vocab, gen, scale=3.0, ties=False):
    x = torch.randn(vocab, generator=gen) * scale
    if ties:
        x = torch.round(x * 2) / 2  # many exact ties: order must be lower id first
    return x


@pytest.mark.parametrize("vocab", [1, 7, 1001, 151936])
@pytest.mark.parametrize("offset", [0, 1])
def test_argmax(ops, gen, vocab, offset):
    x = _logits(vocab, gen)
    if vocab > 10:
        x[vocab // 2] = x.max() + 1
        x[vocab - 1] = x[vocab // 2]  # tie: the lower id wins
        x[3] = float("nan")  # NaN counts as -inf
    # offset 1: a view 4 bytes past an aligned start takes the scalar path.
    xd = torch.cat([torch.zeros(offset), x]).to(DEV)[offset:]
    out = poisoned(1, dtype=torch.int32)
    ops.argmax(xd, out)
    assert int(out) == int(torch.argmax(torch.nan_to_num(x, nan=-math.inf)))


def _penalty_ref(x, present, counts, rep, pres, freq):
    """sampling.py's arithmetic, float32, over a presence mask and counts."""
    x = torch.nan_to_num(x.clone(), nan=-math.inf)
    sel = present.bool()
    x[sel] = torch.where(x[sel] > 0, x[sel] / rep, x[sel] * rep)
    c = counts.float()
    x -= pres * (c > 0).float()
    x -= freq * c
    return x


@pytest.mark.parametrize("rep,pres,freq", [(1.0, 0.0, 0.0), (1.3, 0.0, 0.0), (0.8, 0.5, 0.25), (1.1, -1.5, 2.0)])
def test_penalties(ops, gen, rep, pres, freq):
    vocab = 32000
    x = _logits(vocab, gen)
    x[5] = float("nan")
    counts = torch.randint(0, 4, (vocab,), generator=gen, dtype=torch.int32)
    counts[torch.rand(vocab, generator=gen) < 0.9] = 0
    present = ((counts > 0) | (torch.rand(vocab, generator=gen) < 0.05)).to(torch.int32)
    out = poisoned(vocab)
    ops.penalties(x.to(DEV), out, _params(ops, rep=rep, pres=pres, freq=freq), present.to(DEV), counts.to(DEV))
    want = _penalty_ref(x, present, counts, rep, pres, freq)
    assert torch.equal(out.cpu(), want), (out.cpu() - want).abs().max()


# How far u and the cut-offs may move for a float32 sampler's pick to count (ref_allowed).
SAMPLE_EPS = 1e-5


SAMPLE_CONFIGS = [
    # temperature, top_k, top_p, min_p
    (1.0, 0, 1.0, 0.0),
    (0.7, 40, 1.0, 0.0),
    (1.0, 1, 1.0, 0.0),
    (1.0, 0, 0.9, 0.0),
    (1.3, 0, 0.5, 0.0),
    (1.0, 0, 1.0, 0.05),
    (0.8, 50, 0.95, 0.02),
    (1.0, 200000, 0.9, 0.0),  # top_k beyond the vocabulary: off
    (2.5, 0, 1.0, 0.0),  # flat distribution: deep tail picks
    (0.0, 0, 1.0, 0.0),  # greedy through the sampler
]


@pytest.mark.parametrize("vocab,ties", [(7, False), (1000, True), (151936, False), (151936, True)])
@pytest.mark.parametrize("cfg", SAMPLE_CONFIGS)
def test_sample_matches_reference(ops, gen, vocab, ties, cfg):
    temperature, top_k, top_p, min_p = cfg
    x = _logits(vocab, gen, ties=ties)
    xd = x.to(DEV)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen)) * 3
    p = _params(ops, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    step = torch.zeros(1, dtype=torch.int32, device=DEV)
    out = poisoned(1, dtype=torch.int32)
    ambiguous = 0
    steps = 12
    for st in range(steps):
        step.fill_(st)
        out.fill_(-7)
        ops.sample(xd, p, step, out)
        got = int(out)
        u = hparams.uniform(seed, st)
        want = ref_sample(x, temperature, top_k, top_p, min_p, u)
        if got != want:
            allowed = ref_allowed(x, temperature, top_k, top_p, min_p, u, SAMPLE_EPS)
            assert got in allowed, f"step {st}: got {got}, want {want} (u={u}, near-tie set {sorted(allowed)})"
            ambiguous += 1
    assert ambiguous <= steps // 4, f"{ambiguous} of {steps} picks differed from the reference"


def test_sample_uniform_bits(ops):
    """Equal logits over 2^16 ids: the pick is floor(u * 2^16), exposing uniform(seed, step)."""
    vocab = 1 << 16
    x = torch.zeros(vocab, device=DEV)
    step = torch.zeros(1, dtype=torch.int32, device=DEV)
    out = poisoned(1, dtype=torch.int32)
    for seed in [0, 1, 12345, (1 << 63) + 17, (1 << 64) - 1]:
        p = _params(ops, seed=seed)
        for st in [0, 1, 2, 1000, 2**31 - 1]:
            step.fill_(st)
            ops.sample(x, p, step, out)
            assert int(out) == int(hparams.uniform(seed, st) * vocab), (seed, st)


def test_sample_graph_replay(ops, gen):
    vocab = 50000
    x = _logits(vocab, gen, scale=2.0).to(DEV)
    seed = 987654321
    p = _params(ops, temperature=0.9, top_p=0.95, seed=seed)
    step = torch.zeros(1, dtype=torch.int32, device=DEV)
    out = poisoned(1, dtype=torch.int32)
    ops.sample(x, p, step, out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.sample(x, p, step, out)
    for st in range(8):
        step.fill_(st)
        graph.replay()
        torch.cuda.synchronize()
        u = hparams.uniform(seed, st)
        assert int(out) in ref_allowed(x.cpu(), 0.9, 0, 0.95, 0.0, u, SAMPLE_EPS)


@pytest.mark.parametrize("vocab", [5, 32000, 151936])
@pytest.mark.parametrize("top_n", [0, 1, 5, 20])
def test_logprobs(ops, gen, vocab, top_n):
    x = _logits(vocab, gen, scale=4.0)
    if vocab > 30:
        x[10] = x[20] = x.max() + 0.5  # tie at the top: id 10 first
        x[7] = float("nan")
    lp = torch.log_softmax(torch.nan_to_num(x, nan=-math.inf).double(), dim=0)
    token = int(torch.randint(0, vocab, (1,), generator=gen))
    out_lp = poisoned(1)
    ids = poisoned(max(top_n, 1), dtype=torch.int32)
    top = poisoned(max(top_n, 1))
    ops.logprobs(x.to(DEV), top_n, torch.tensor([token], dtype=torch.int32, device=DEV), out_lp, ids, top)
    assert_close(out_lp, lp[token : token + 1], "f32_sum", "chosen")
    n = min(top_n, vocab)
    if n:
        order = torch.sort(torch.nan_to_num(x, nan=-math.inf), descending=True, stable=True).indices[:n]
        assert ids[:n].cpu().tolist() == order.tolist()
        assert_close(top[:n], lp[order], "f32_sum", "top")
