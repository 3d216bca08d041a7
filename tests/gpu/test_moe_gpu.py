"""qwen3moe on the CUDA backend against the CPU reference.

Synthetic models of the qwen3moe-tiny shape (rows of 256, so every block
type applies to every matrix, experts included) go through the real
loaders; the CPU backend runs the same weights in float32, with the bf16 KV
cache the device keeps, and is the oracle. Where the router's k-th and
(k+1)-th probabilities nearly tie, the device's rounding may pick either
expert, and a swap below the last layer reaches every later row through
the keys and values: the whole-model checks make the reference follow the
device's choice at such near-ties (tests/moe_routing.py) and hold every
row to the full criterion against it, with few re-routings allowed.

A prompt of 16 tokens runs the grouped expert path (pairs sorted by expert
on the device), single-token decode steps the fused pair path inside the
decode CUDA graph, and batches of more than 8 sequences the grouped path
inside the graph. Routing ties are crafted with router rows that are equal
bit for bit: both paths must pick the lower expert ids, as the reference does.
The kernels come first, one by one through their torch ops (routing against
the reference's `route`, grouping, combine, the expert products against
each expert's own product), so a failure names its kernel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from moe_routing import follow, follow_logits, teacher_forced
from test_model_gpu import (
    GGUF_TYPES,
    _batched_greedy,
    _cosines,
    _gpu_generate,
    _gpu_teacher_forced,
    _near_argmax,
    _tokens,
    _top1_agreement,
)
from test_quant_kernels import (
    FLOAT_TYPES,
    TC_INT_TOKENS,
    TOLERANCE,
    TYPES,
    SeededRng,
    bf16_values,
    check_matvec,
    make_weights,
    tc_reference,
)

from helexa_native.backends.cpu import CPUBackend
from helexa_native.backends.cuda import CUDABackend
from helexa_native.loaders import load_source
from helexa_native.loaders.validate import expected_shapes
from helexa_native.reference.model import route
from helexa_native.synthetic import preset_config, write_synthetic_gguf, write_synthetic_safetensors
from helexa_native.writers.gguf_writer import write_gguf

pytestmark = pytest.mark.gpu

DEV = "cuda"
PRESET = "qwen3moe-tiny"
N_PROMPT = 16  # > 8 rows: the prompt's pass takes the grouped expert path
N_TEACHER = 127  # 128 compared rows: 99% agreement allows one disagreement
N_GREEDY = 16
MIN_COSINE = 0.999
MIN_TOP1 = 0.99

# (format, type, overrides)
MODELS = (
    [("gguf", q, {}) for q in GGUF_TYPES]
    + [("safetensors", "bf16", {})]  # per-expert HF tensors, handed over one by one
    # No renormalisation, and a dense layer among the MoE ones.
    + [("safetensors", "f32", dict(norm_topk_prob=False, mlp_only_layers=(1,)))]
    # More experts than the grid of a small batch holds, 4 per token, a dense first layer.
    + [("gguf", "Q4_K_M", dict(n_layers=3, num_experts=32, num_experts_per_tok=4, mlp_only_layers=(0,)))]
)


# ---------------------------------------------------------------------------
# Kernels


@pytest.fixture(scope="module")
def ops():
    import helexa_native._C  # noqa: F401  (registers torch.ops.helexa)

    return torch.ops.helexa


@pytest.fixture()
def rng():
    return SeededRng()


@pytest.mark.parametrize("logits_kind", ["grid", "normal"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("E,k", [(8, 2), (128, 8), (1000, 7), (5, 5), (33, 1)])
@pytest.mark.parametrize("n", [1, 5, 37])
def test_route_kernel_matches_reference(ops, n, E, k, normalize, logits_kind):
    g = torch.Generator().manual_seed(1000 * E + 10 * k + n)
    if logits_kind == "grid":
        # Six distinct values: most rows hold exact ties, which both sides give to the lower id.
        logits = torch.randint(0, 6, (n, E), generator=g).float() * 0.5
    else:
        logits = torch.randn(n, E, generator=g) * 2.0
    want_w, want_ids = route(logits, torch.eye(E), k, normalize)  # the identity router passes logits through
    ids = torch.full((n, k), -7, dtype=torch.int32, device=DEV)
    w = torch.full((n, k), float("nan"), device=DEV)
    ops.moe_route(logits.to(DEV), k, normalize, ids, w)
    assert torch.equal(ids.cpu().long(), want_ids)
    torch.testing.assert_close(w.cpu(), want_w, rtol=2e-6, atol=1e-7)


def _routed_ids(n, E, k, seed, used=None):
    """[n, k] int32: each row k distinct experts among the first `used` (default all E)."""
    g = torch.Generator().manual_seed(seed)
    used = used or E
    return torch.stack([torch.randperm(used, generator=g)[:k] for _ in range(n)]).to(torch.int32)


def _max_tiles(P, E, tile_rows):
    return -(-P // tile_rows) + min(E, P)


def _align_tiles(ops, ids, E, k, tile_rows=8):
    """moe_align's outputs on the host: offsets, active, n_active, pair_slot, slot_token, tiles, n_tiles."""
    P = ids.numel()
    out = [torch.full((m,), -5, dtype=torch.int32, device=DEV) for m in (E + 1, E, 1, P, P)]
    tiles = torch.full((_max_tiles(P, E, tile_rows), 4), -5, dtype=torch.int32, device=DEV)
    n_tiles = torch.full((1,), -5, dtype=torch.int32, device=DEV)
    ops.moe_align(ids.flatten().to(DEV), E, k, *out, tile_rows, tiles, n_tiles)
    return [t.cpu().long() for t in out] + [tiles.cpu().long(), int(n_tiles[0])]


def _align(ops, ids, E, k):
    return _align_tiles(ops, ids, E, k)[:5]


@pytest.mark.parametrize("tile_rows", [8, 32])
@pytest.mark.parametrize("E,k,n,used", [(8, 2, 1, 8), (128, 8, 512, 128), (1000, 4, 300, 700), (64, 64, 3, 64)])
def test_align_kernel_sorts_pairs_by_expert(ops, E, k, n, used, tile_rows):
    ids = _routed_ids(n, E, k, seed=E + n, used=used)
    offsets, active, n_active, pair_slot, slot_token, tiles, n_tiles = _align_tiles(ops, ids, E, k, tile_rows)
    flat = ids.flatten().long()
    counts = torch.bincount(flat, minlength=E)
    assert torch.equal(offsets, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    na = int(n_active[0])
    assert na == int((counts > 0).sum())
    assert torch.equal(active[:na], torch.nonzero(counts).flatten())
    assert torch.equal(pair_slot.sort().values, torch.arange(flat.numel()))
    assert bool(((offsets[flat] <= pair_slot) & (pair_slot < offsets[flat + 1])).all())
    assert torch.equal(slot_token[pair_slot], torch.arange(flat.numel()) // k)
    # The tile list: each expert's slots in order, cut into tiles of tile_rows.
    want = [
        [e, int(offsets[e]) + r, min(tile_rows, int(counts[e]) - r), 0]
        for e in range(E)
        for r in range(0, int(counts[e]), tile_rows)
    ]
    assert n_tiles == len(want) <= _max_tiles(flat.numel(), E, tile_rows)
    assert tiles[:n_tiles].tolist() == want


def test_align_tiles_spread_a_crowded_expert(ops):
    # Every pair routed to expert 3 (a skewed prefill): its 300 rows become
    # ceil(300 / 32) tiles, one CTA row each, not one CTA's loop.
    E, k, n = 16, 1, 300
    ids = torch.full((n, k), 3, dtype=torch.int32)
    *_, tiles, n_tiles = _align_tiles(ops, ids, E, k, 32)
    assert n_tiles == 10
    assert tiles[:n_tiles, 0].tolist() == [3] * 10
    assert tiles[:n_tiles, 1].tolist() == list(range(0, 300, 32))
    assert tiles[:n_tiles, 2].tolist() == [32] * 9 + [12]


@pytest.mark.parametrize("slotted", [False, True])
@pytest.mark.parametrize("n,k,h", [(1, 8, 2048), (7, 2, 256), (19, 3, 250)])
def test_combine_kernel_adds_weighted_expert_rows(ops, n, k, h, slotted):
    g = torch.Generator().manual_seed(n * k + h)
    x = torch.randn(n, h, generator=g)
    y = torch.randn(n * k, h, generator=g)
    w = torch.rand(n, k, generator=g)
    slot = torch.randperm(n * k, generator=g).to(torch.int32) if slotted else torch.arange(n * k, dtype=torch.int32)
    want = x.double() + (w.double()[:, :, None] * y.double()[slot.long()].reshape(n, k, h)).sum(1)
    got = x.to(DEV)
    ops.moe_combine(got, y.to(DEV), w.to(DEV), slot.to(DEV) if slotted else None)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5)


def _stacked_experts(name, E, n_out, k, rng):
    """([E, stride] uint8 device tensor, stride 16-byte aligned and zero-padded; [E, n_out, k] float refs)."""
    raws, refs = zip(*(make_weights(name, n_out, k, rng) for _ in range(E)))
    nbytes = raws[0].size
    stride = -(-nbytes // 16) * 16
    w = np.zeros((E, stride), dtype=np.uint8)
    for e, raw in enumerate(raws):
        w[e, :nbytes] = raw.reshape(-1)
    return torch.from_numpy(w).to(DEV), np.stack(refs)


@pytest.mark.parametrize("name", list(TYPES))
def test_expert_pair_products_read_the_routed_experts(ops, rng, name):
    E, n_out, n, k_tok = 6, 67, 5, 3
    k = 512  # whole blocks of every type, and a multiple of 4
    w, refs = _stacked_experts(name, E, n_out, k, rng)
    ids = _routed_ids(n, E, k_tok, seed=3).flatten()
    x = rng.standard_normal((n, k)).astype(np.float32)
    y = torch.full((n * k_tok, n_out), float("nan"), device=DEV)
    ops.matvec_expert_pairs(TYPES[name][0], w, ids.to(DEV), torch.from_numpy(x).to(DEV), k_tok, y, n_out, k)
    for p in range(n * k_tok):
        e, t = int(ids[p]), p // k_tok
        msg = f"{name} pair {p} (expert {e}, row {t}) seed={rng.seed_value}"
        check_matvec(y[p : p + 1], refs[e], x[t : t + 1], None, TOLERANCE[name], msg)


@pytest.mark.parametrize("name", list(TYPES))
def test_expert_group_products_read_each_expert_for_its_rows(ops, rng, name):
    # 9 experts of which 7 get rows (two idle, so the grid has CTAs with no
    # expert), about 10 rows each: several passes of 8 rows per expert.
    E, n_out, n, k_tok = 9, 67, 23, 3
    k = 512
    w, refs = _stacked_experts(name, E, n_out, k, rng)
    ids = _routed_ids(n, E, k_tok, seed=4, used=7)
    offsets, active, n_active, pair_slot, slot_token = (t.to(DEV).int() for t in _align(ops, ids, E, k_tok))
    x = rng.standard_normal((n, k)).astype(np.float32)
    xs = x[slot_token.cpu().numpy()]  # rows in slot order, as the model gathers them
    P = n * k_tok
    y = torch.full((P, n_out), float("nan"), device=DEV)
    ops.matvec_expert_groups(
        TYPES[name][0], w, offsets, active, n_active, min(E, P), torch.from_numpy(xs).to(DEV), y, n_out, k
    )
    slot_of = pair_slot.cpu().numpy()
    for p in range(P):
        s, e = int(slot_of[p]), int(ids.flatten()[p])
        msg = f"{name} pair {p} (expert {e}, slot {s}) seed={rng.seed_value}"
        check_matvec(y[s : s + 1], refs[e], xs[s : s + 1], None, TOLERANCE[name], msg)


@pytest.mark.parametrize("f", [67, 1, 256])
@pytest.mark.parametrize("name", list(TYPES))
def test_expert_pairs_with_swiglu_equal_pairs_then_swiglu(ops, rng, name, f):
    # The fused launch pairs gate row i with up row i in one CTA: its output
    # has the bits of the plain pairs followed by the SwiGLU kernel (an odd f
    # leaves the last CTA half empty), and both are the reference product.
    E, n, k_tok, k = 6, 3, 4, 512
    w, refs = _stacked_experts(name, E, 2 * f, k, rng)
    ids = _routed_ids(n, E, k_tok, seed=6).flatten().to(DEV)
    x = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)).to(DEV)
    P = n * k_tok
    gu = torch.full((P, 2 * f), float("nan"), device=DEV)
    ops.matvec_expert_pairs(TYPES[name][0], w, ids, x, k_tok, gu, 2 * f, k)
    want = torch.full((P, f), float("nan"), device=DEV)
    ops.swiglu(gu[:, :f].contiguous(), gu[:, f:].contiguous(), want, None)
    got = torch.full((P, f), float("nan"), device=DEV)
    ops.matvec_expert_pairs_glu(TYPES[name][0], w, ids, x, k_tok, got, f, k)
    assert torch.equal(got, want), f"{name} f={f}: fused SwiGLU differs from pairs + swiglu, seed={rng.seed_value}"
    # And against float64: silu(gate) * up of the exact products.
    xn = x.cpu().double().numpy()
    for p in range(P):
        e, t = int(ids[p]), p // k_tok
        g, u = refs[e][:f] @ xn[t], refs[e][f:] @ xn[t]
        with np.errstate(over="ignore"):  # exp(-g) = inf: silu(g) = -0
            ref = g / (1 + np.exp(-g)) * u
        scale = (np.abs(refs[e][:f]) @ np.abs(xn[t])) * (np.abs(refs[e][f:]) @ np.abs(xn[t])) + 1e-30
        err = np.max(np.abs(got[p].cpu().double().numpy() - ref) / scale)
        assert err <= 4 * TOLERANCE[name], f"{name} pair {p}: relative error {err:.2e}, seed={rng.seed_value}"


@pytest.mark.parametrize("n", [1, 3, 6])
@pytest.mark.parametrize("name", list(TYPES))
def test_expert_combine_adds_each_tokens_weighted_experts(ops, rng, name, n):
    # x[t] += sum_j mix[t, j] * W_ids[t, j] act[t * top_k + j]: the second
    # expert product and the weighted sum in one launch, against float64.
    E, n_out, k_tok = 7, 67, 3
    k = 768  # three 256-element passes: the (expert, step) walk crosses experts mid-warp
    w, refs = _stacked_experts(name, E, n_out, k, rng)
    ids = _routed_ids(n, E, k_tok, seed=7)
    mix = rng.random((n, k_tok)).astype(np.float32)
    act = rng.standard_normal((n * k_tok, k)).astype(np.float32)
    x0 = rng.standard_normal((n, n_out)).astype(np.float32)
    x = torch.from_numpy(x0).to(DEV)
    ops.matvec_expert_combine(
        TYPES[name][0], w, ids.to(DEV), torch.from_numpy(mix).to(DEV), torch.from_numpy(act).to(DEV), x, n_out, k
    )
    got = x.cpu().double().numpy()
    a64 = act.astype(np.float64)
    for t in range(n):
        want, scale = x0[t].astype(np.float64), np.abs(x0[t]).astype(np.float64)
        for j in range(k_tok):
            e, row = int(ids[t, j]), t * k_tok + j
            want = want + float(mix[t, j]) * (refs[e] @ a64[row])
            scale = scale + float(mix[t, j]) * (np.abs(refs[e]) @ np.abs(a64[row]))
        err = np.max(np.abs(got[t] - want) / scale)
        assert err <= TOLERANCE[name], f"{name} token {t} of {n}: relative error {err:.2e}, seed={rng.seed_value}"


@pytest.mark.parametrize("rows_hint", [1, 64])  # tiles of 8 rows (several an expert), 64 (one)
@pytest.mark.parametrize("name", [n for n in TYPES if n not in FLOAT_TYPES])
def test_tensor_core_expert_groups_read_each_expert_for_its_rows(ops, rng, name, rows_hint, monkeypatch):
    # The grouped layout above, x in bf16: each row is its expert's matrix
    # (rounded to bf16, as the product decodes it; exact on the integer path
    # of Q4_K / Q6_K, taken for 8 rows per pass) times the row.
    monkeypatch.setenv("HELEXA_TC_INT", str(TC_INT_TOKENS))
    E, n_out, n, k_tok = 9, 67, 23, 3
    k = 512
    w, refs = _stacked_experts(name, E, n_out, k, rng)
    ids = _routed_ids(n, E, k_tok, seed=5, used=7)
    tile_rows = ops.moe_tile_rows(rows_hint)
    assert tile_rows == (8 if rows_hint <= 8 else 64)
    _, _, _, pair_slot, slot_token, tiles, n_tiles = _align_tiles(ops, ids, E, k_tok, tile_rows)
    x = bf16_values(rng.standard_normal((n, k)))
    xs = x[slot_token.cpu().numpy()]
    P = n * k_tok
    y = torch.full((P, n_out), float("nan"), device=DEV)
    x_d = torch.from_numpy(xs).to(torch.bfloat16).to(DEV)
    tiles_d = tiles.to(torch.int32).to(DEV)
    n_tiles_d = torch.tensor([n_tiles], dtype=torch.int32, device=DEV)
    ops.matmul_tc_expert_groups(TYPES[name][0], w, tiles_d, n_tiles_d, tile_rows, x_d, y, n_out, k)
    slot_of = pair_slot.cpu().numpy()
    for p in range(P):
        s, e = int(slot_of[p]), int(ids.flatten()[p])
        msg = f"{name} pair {p} (expert {e}, slot {s}, rows_hint {rows_hint}) seed={rng.seed_value}"
        wref, tol = tc_reference("staged", name, 8 if rows_hint <= 8 else 64, refs[e])
        check_matvec(y[s : s + 1], wref, xs[s : s + 1], None, tol, msg)


# ---------------------------------------------------------------------------
# Whole model


def _id(m):
    fmt, qtype, over = m
    return "-".join([fmt, qtype] + [f"{k}{v}" for k, v in sorted(over.items())]).replace(" ", "")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(format, type, overrides) -> ModelSource of the tiny MoE preset, written once per module."""
    cache = {}

    def get(model):
        fmt, qtype, over = model
        key = _id(model)
        if key not in cache:
            d = tmp_path_factory.mktemp(key.replace(".", "_").replace(",", "_").replace("(", "").replace(")", ""))
            if fmt == "gguf":
                path = d / "model.gguf"
                write_synthetic_gguf(path, PRESET, qtype, seed=11, progress=False, **over)
            else:
                path = d / "model"
                write_synthetic_safetensors(path, PRESET, qtype, seed=11, progress=False, **over)
            cache[key] = load_source(path, progress=False)
        return cache[key]

    yield get
    for src in cache.values():
        src.close()


def _reference(src, n_ctx):
    """The oracle: the CPU reference in float32 over a bf16 KV cache, as the device stores it."""
    return CPUBackend(src, n_ctx, kv_dtype=torch.bfloat16)


def _check_logits(cpu, passes, rows):
    """Device logits `rows` (position -> [vocab]) of the token `passes` against the reference.

    The reference follows the device's routing at near-ties (moe_routing):
    every row then reaches MIN_COSINE, few near-ties were re-routed, and the
    top-1 agreement over all rows is at least MIN_TOP1.
    """
    got = torch.stack(list(rows.values()))
    assert bool(torch.isfinite(got).all())
    _, want = follow_logits(cpu, passes, rows, MIN_COSINE)
    agree = _top1_agreement(got, want)
    assert agree >= MIN_TOP1, f"top-1 agreement {agree:.3f}"


def _check_teacher_forced(cpu, gpu, vocab, seed=1):
    prompt, teacher = _tokens(seed, N_PROMPT, vocab), _tokens(seed + 1, N_TEACHER, vocab)
    got = _gpu_teacher_forced(gpu, prompt, teacher)
    assert got.shape == (N_TEACHER + 1, vocab)
    _check_logits(cpu, teacher_forced(prompt, teacher), {N_PROMPT - 1 + s: row for s, row in enumerate(got)})


def _check_greedy(cpu, prompt, tokens):
    """Device greedy `tokens` after `prompt`: each a greedy pick (up to a float tie) of the reference.

    The reference is teacher-forced along the device's own tokens and
    follows its routing at near-ties, so every step is checked even after
    a tie sent the two apart.
    """

    def check(tok):
        return lambda want: bool(_near_argmax(want[None], torch.tensor([tok]))[0])

    n = len(prompt)
    f = follow(cpu, teacher_forced(prompt, tokens[:-1]), {n - 1 + j: check(t) for j, t in enumerate(tokens)})
    bad = [p - n + 1 for p in f.failures]
    assert not bad, f"greedy steps {bad} of {tokens} are not greedy picks of the reference (re-routed: {f.reroutes})"
    most = f.max_reroutes(len(tokens))
    assert len(f.reroutes) <= most, f"{len(f.reroutes)} re-routed near-ties (at most {most}): {f.reroutes}"


def _tokens_agree(cpu, prompt, got, want):
    """Equal token lists, or both greedy runs of the reference (float and routing ties)."""
    if got == want:
        return
    _check_greedy(cpu, prompt, got)
    _check_greedy(cpu, prompt, want)


@pytest.mark.parametrize("model", MODELS, ids=_id)
def test_moe_matches_reference(sources, model):
    src = sources(model)
    vocab = src.config.vocab_size
    n_ctx = N_PROMPT + N_TEACHER + 8
    cpu = _reference(src, n_ctx)
    gpu = CUDABackend(src, 0, n_ctx)
    try:
        _check_teacher_forced(cpu, gpu, vocab)
        assert gpu.memory_info()["graph_replays"] > 0
        gpu.reset()
        prompt = _tokens(3, N_PROMPT, vocab)
        _check_greedy(cpu, prompt, _gpu_generate(gpu, prompt, N_GREEDY))
    finally:
        gpu.close()


CHUNK_MODELS = [MODELS[GGUF_TYPES.index("Q4_K_M")], MODELS[len(GGUF_TYPES)], MODELS[-1]]


@pytest.mark.parametrize("model", CHUNK_MODELS, ids=_id)
def test_moe_chunked_prefill_all_logits(sources, model):
    # Passes of 32, 32 and 5 rows through the grouped experts (5 rows: the
    # fewest that are grouped by default), then 3 rows on top of the cache
    # through the pair launches.
    src = sources(model)
    vocab = src.config.vocab_size
    prompt, more = _tokens(4, 69, vocab), _tokens(5, 3, vocab)
    cpu = _reference(src, 96)
    gpu = CUDABackend(src, 0, 96, prefill_chunk=32)
    try:
        got = torch.cat([gpu.forward(prompt, 0, all_logits=True), gpu.forward(more, 69, all_logits=True)])
        assert got.shape == (72, vocab)
        _check_logits(cpu, [(prompt, 0), (more, 69)], dict(enumerate(got)))
    finally:
        gpu.close()


BATCH_PROMPTS = [(21, 5), (22, 17), (23, 40), (24, 1), (25, 70)]  # (seed, length)


@pytest.mark.parametrize("model", [CHUNK_MODELS[0], CHUNK_MODELS[2]], ids=_id)
@pytest.mark.parametrize("chunk", [512, 16])
def test_moe_batched_step_equals_each_sequence_alone(sources, model, chunk):
    # Five prompts of different lengths, two joining later, so prompt rows and
    # one-token rows of other sequences share passes (and their expert groups).
    src = sources(model)
    vocab = src.config.vocab_size
    prompts = [_tokens(seed, n, vocab) for seed, n in BATCH_PROMPTS]
    cpu = _reference(src, 128)
    gpu = CUDABackend(src, 0, 128, prefill_chunk=chunk, max_num_seqs=8)
    try:
        batched = _batched_greedy(gpu, prompts, N_GREEDY, join_at=[0, 0, 0, 3, 7])
        for prompt, got in zip(prompts, batched):
            _tokens_agree(cpu, prompt, got, _gpu_generate(gpu, prompt, N_GREEDY))
    finally:
        gpu.close()


@pytest.mark.parametrize("model", [CHUNK_MODELS[0], CHUNK_MODELS[2]], ids=_id)
@pytest.mark.parametrize("batch,fused", [(3, False), (12, False), (3, True)])
def test_moe_decode_graph_matches_plain_path_and_each_alone(sources, model, batch, fused, monkeypatch):
    # 3 sequences decode on the pair launches, 12 (bucket 16) on the grouped
    # experts: both inside the captured graph, both equal to the plain path
    # and to each sequence alone. fused: the pairs' SwiGLU and weighted sum
    # fused into their launches (the default), else four launches.
    monkeypatch.setenv("HELEXA_MOE_FUSE", "1" if fused else "0")
    src = sources(model)
    vocab = src.config.vocab_size
    prompts = [_tokens(60 + i, 3 + 2 * i, vocab) for i in range(batch)]
    cpu = _reference(src, 96)
    gpu = CUDABackend(src, 0, 96, max_num_seqs=16)
    try:
        runs = {}
        for graphs in (True, False):
            gpu.set_graphs(graphs)
            before = gpu.memory_info()["graph_replays"]
            runs[graphs] = _batched_greedy(gpu, prompts, 12, join_at=[0] * batch)
            replays = gpu.memory_info()["graph_replays"] - before
            assert (replays > 0) if graphs else (replays == 0)
        assert runs[True] == runs[False]
        gpu.set_graphs(True)
        for prompt, got in zip(prompts, runs[True]):
            _tokens_agree(cpu, prompt, got, _gpu_generate(gpu, prompt, 12))
    finally:
        gpu.close()


# ---------------------------------------------------------------------------
# Routing ties


def _tie_weights(seed=5):
    """Float32 weights of the tiny preset whose routers tie exactly.

    Layer 0: router rows 0-2, 3-5 and 6-7 are three rows repeated, so a
    token's best group always ties at the top-2 boundary (3 equal rows) or
    fills it (2); the lower ids must win. Layer 1: a zero router, every
    expert equally likely, so experts 0 and 1 serve every token.
    """
    cfg = preset_config(PRESET)
    rng = np.random.default_rng(seed)
    w = {n: (0.02 * rng.standard_normal(s)).astype(np.float32) for n, s in expected_shapes(cfg).items()}
    for n, s in expected_shapes(cfg).items():
        if n.endswith("norm.weight"):
            w[n] = (1.0 + 0.02 * rng.standard_normal(s)).astype(np.float32)
    r0 = w["blk.0.ffn_gate_inp.weight"]
    for e, base in ((1, 0), (2, 0), (4, 3), (5, 3), (7, 6)):
        r0[e] = r0[base]
    w["blk.1.ffn_gate_inp.weight"][:] = 0.0
    return cfg, w


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_K_M"])
def test_routing_ties_go_to_the_lower_expert_ids(tmp_path, qtype):
    cfg, w = _tie_weights()
    # Precondition: the reference's router logits of equal rows are equal bit for bit.
    h = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    logits = F.linear(h, torch.from_numpy(w["blk.0.ffn_gate_inp.weight"]))
    assert torch.equal(logits[:, 0], logits[:, 2]) and torch.equal(logits[:, 3], logits[:, 5])
    if qtype == "Q4_K_M":  # the mix: Q6_K down projections, routers left in F32
        types = {n: ("Q6_K" if "down" in n else "Q4_K") for n in w if w[n].ndim > 1 and "gate_inp" not in n}
    else:
        types = qtype
    path = write_gguf(tmp_path / "ties.gguf", cfg, w, types)
    src = load_source(path, progress=False)
    n_ctx = N_PROMPT + N_TEACHER + 8
    try:
        cpu = _reference(src, n_ctx)
        gpu = CUDABackend(src, 0, n_ctx)
        try:
            _check_teacher_forced(cpu, gpu, cfg.vocab_size, seed=7)
            gpu.reset()
            prompt = _tokens(8, N_PROMPT, cfg.vocab_size)
            _check_greedy(cpu, prompt, _gpu_generate(gpu, prompt, N_GREEDY))
        finally:
            gpu.close()
    finally:
        src.close()
    if qtype != "F32":
        return
    # The check above can fail: the tied experts' identities matter. With
    # expert 0's weights swapped for expert 2's in both layers (same routing,
    # since ties pick 0 and 1), the reference's logits move well away.
    for name in ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"):
        for layer in (0, 1):
            t = w[f"blk.{layer}.{name}"]
            t[[0, 2]] = t[[2, 0]]
    swapped = load_source(write_gguf(tmp_path / "swapped.gguf", cfg, w, "F32"), progress=False)
    src = load_source(path, progress=False)
    try:
        prompt = _tokens(9, N_PROMPT, cfg.vocab_size)
        a = CPUBackend(src, 32).forward(prompt, 0, all_logits=True)
        b = CPUBackend(swapped, 32).forward(prompt, 0, all_logits=True)
        assert _cosines(a, b).min().item() < MIN_COSINE
    finally:
        src.close()
        swapped.close()
