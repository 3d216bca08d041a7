"""Batched device sampler (torch.ops.helexa.*_batch) against the single-row launchers and the CPU sampler.

A batch mixes rows: greedy, top-k, top-p, min-p and penalties, each row with
its own seed, step and penalty slot, over logits with NaN, -inf, +inf, all
-inf rows, exact ties and flat rows. Every batched row must equal the
single-row device launcher on that row exactly (the batched kernels run the
same arithmetic), in both the candidate-prefix mode and the full-sort mode,
and must agree with helexa_native.sampling.sample_from_logits and a float64
reading of params.py up to float32 near-ties: where it differs from either,
the device token must be one that either gives with u, top_p and min_p nudged by
1e-5, and picks off the float64 reading must stay rare. Outputs are poisoned
before every call.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from sampling_reference import ref_allowed, ref_sample

from helexa_native import params as hparams
from helexa_native import sampling as hsampling
from helexa_native.params import SamplerState, SamplingParams

pytestmark = pytest.mark.gpu

DEV = "cuda"
MAX_TOP = 20  # kMaxTopLogprobs
CAND = 4096  # candidates the batched sampler sorts per row before it falls back
NUDGE = 1e-5


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


def _clean(x):
    """NaN -> -inf, infinities kept (torch.nan_to_num alone maps them to the largest finite floats)."""
    return torch.nan_to_num(x, nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def poisoned(*shape, dtype=torch.float32):
    t = torch.empty(*shape, dtype=dtype, device=DEV)
    if dtype.is_floating_point:
        t.fill_(float("nan"))
    else:
        t.fill_(-7)
    return t


# temperature, top_k, top_p, min_p, repetition, presence, frequency
ROW_CONFIGS = [
    (0.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0),  # greedy
    (0.7, 40, 1.0, 0.0, 1.0, 0.0, 0.0),  # top-k
    (1.0, 0, 0.9, 0.0, 1.0, 0.0, 0.0),  # top-p
    (1.0, 0, 1.0, 0.05, 1.0, 0.0, 0.0),  # min-p
    (0.8, 50, 0.95, 0.02, 1.3, 0.5, 0.25),  # everything, with penalties
    (1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0),  # plain temperature
    (0.0, 0, 1.0, 0.0, 1.2, 0.0, 0.5),  # greedy with penalties
    (2.5, 0, 1.0, 0.0, 1.0, 0.0, 0.0),  # flat: deep picks
    (1.0, 1, 1.0, 0.0, 0.9, -1.0, 0.0),  # top_k 1 with penalties
    (1.3, 0, 0.5, 0.0, 1.0, 1.5, 0.0),  # top-p, presence penalty
    (1.0, 200000, 0.9, 0.0, 1.0, 0.0, -0.5),  # top_k beyond the vocabulary
    (0.6, 5000, 1.0, 0.0, 1.0, 0.0, 0.0),  # top_k beyond the candidate prefix
]
FLAVORS = ["normal", "ties", "nan", "peaked", "zeros", "normal", "ninf", "pinf"]


def _row_logits(flavor, vocab, gen):
    x = torch.randn(vocab, generator=gen) * 3.0
    if flavor == "ties":
        x = torch.round(x * 2) / 2  # many exact ties: lower id first
    elif flavor == "nan":
        idx = torch.randint(0, vocab, (max(1, vocab // 50),), generator=gen)
        x[idx[::2]] = float("nan")
        x[idx[1::2]] = -math.inf
    elif flavor == "peaked":
        x = torch.randn(vocab, generator=gen)
        x[int(torch.randint(0, vocab, (1,), generator=gen))] = 30.0
    elif flavor == "zeros":
        x = torch.zeros(vocab)
    elif flavor == "ninf":
        x = torch.full((vocab,), -math.inf)
    elif flavor == "pinf":
        i, j = torch.randint(0, vocab, (2,), generator=gen).tolist()
        x[i] = x[j] = math.inf  # the lower id wins
    return x


def _params(ops, cfg, seed):
    t, k, tp, mp, rep, pres, freq = cfg
    signed = seed - (1 << 64) if seed >= (1 << 63) else seed
    return ops.sampling_params_device(t, k, tp, mp, rep, pres, freq, signed, torch.device(DEV))


def _cpu_token(x, cfg, seed, prompt, generated, step, du=0.0, dp=0.0, dm=0.0):
    """helexa_native.sampling's pick, with u (through sampling.uniform), top_p and min_p nudged."""
    t, k, tp, mp, rep, pres, freq = cfg
    p = SamplingParams(
        temperature=t,
        top_k=k,
        top_p=tp + dp,
        min_p=mp + dm,
        repetition_penalty=rep,
        presence_penalty=pres,
        frequency_penalty=freq,
        seed=seed,
    )
    st = SamplerState(prompt_tokens=list(prompt), generated_tokens=list(generated), step=step)
    if du == 0.0:
        return hsampling.sample_from_logits(x, p, st).token
    real = hsampling.uniform
    hsampling.uniform = lambda s, n: real(s, n) + du
    try:
        return hsampling.sample_from_logits(x, p, st).token
    finally:
        hsampling.uniform = real


def _allowed(x, work, cfg, seed, prompt, generated, step):
    """Tokens a correct float32 sampler may pick near a tie: CPU sampler and float64 reference, nudged.

    u is nudged by up to NUDGE either way: over a flat distribution that
    much mass spans several candidates, and every one of them between the
    two nudged picks of the reference is allowed, not only those two.
    """
    t, k, tp, mp = cfg[:4]
    dus = (-NUDGE, 0.0, NUDGE)
    dps = (-NUDGE, 0.0, NUDGE) if tp < 1.0 else (0.0,)
    dms = (-NUDGE, 0.0, NUDGE) if mp > 0.0 else (0.0,)
    u = hparams.uniform(seed, step)
    out = ref_allowed(work, t, k, tp, mp, u, NUDGE)
    for dp in dps:
        for dm in dms:
            for du in dus:
                out.add(_cpu_token(x, cfg, seed, prompt, generated, step, du, dp, dm))
    return out


class Batch:
    """B mixed rows: logits, parameters, seeds, steps and a penalty slot pool built through the ops."""

    def __init__(self, ops, gen, B, vocab, shift=0):
        self.B, self.vocab = B, vocab
        self.cfgs = [ROW_CONFIGS[(b + shift) % len(ROW_CONFIGS)] for b in range(B)]
        self.flavors = [FLAVORS[(b + b // len(ROW_CONFIGS) + 3 * shift) % len(FLAVORS)] for b in range(B)]
        self.logits = torch.stack([_row_logits(f, vocab, gen) for f in self.flavors])
        self.logits_d = self.logits.to(DEV)
        # Half the seeds have the top bit set (negative as int64 on the way to the device).
        self.seeds = [int(torch.randint(0, 2**62, (1,), generator=gen)) | ((b % 2) << 63) for b in range(B)]
        self.param_rows = [_params(ops, c, s) for c, s in zip(self.cfgs, self.seeds)]
        self.params = torch.cat(self.param_rows)
        self.steps = torch.randint(0, 2**31 - 64, (B,), generator=gen, dtype=torch.int32)
        self.steps[0] = 0

        # Penalty slots: a permutation of a pool larger than B; every fifth row has none.
        self.max_slots = B + 3
        perm = torch.randperm(self.max_slots, generator=gen)[:B].to(torch.int32)
        perm[4::5] = -1
        self.slots = perm
        self.prompts, self.generated = [], []
        tok, slot_of = [[], []], [[], []]
        for b in range(B):
            s = int(perm[b])
            if s < 0:
                self.prompts.append([])
                self.generated.append([])
                continue
            x = _clean(self.logits[b])
            top = torch.topk(x, min(5, vocab)).indices.tolist()
            n_p = int(torch.randint(0, 40, (1,), generator=gen))
            prompt = torch.randint(0, vocab, (n_p,), generator=gen).tolist() + [-1, vocab] + top[:2]
            n_g = int(torch.randint(0, 30, (1,), generator=gen))
            pool = top + torch.randint(0, vocab, (8,), generator=gen).tolist()
            generated = [pool[int(i)] for i in torch.randint(0, len(pool), (n_g,), generator=gen)]
            self.prompts.append(prompt)
            self.generated.append(generated)
            tok[0] += prompt
            slot_of[0] += [s] * len(prompt)
            tok[1] += generated + [vocab + 5]
            slot_of[1] += [s] * len(generated) + [s]
        # Entries naming no valid slot are skipped.
        for i in (0, 1):
            tok[i] += [0, vocab - 1]
            slot_of[i] += [-1, self.max_slots]
        self.present = torch.full((self.max_slots, vocab), 7, dtype=torch.int32, device=DEV)
        self.counts = torch.full((self.max_slots, vocab), 7, dtype=torch.int32, device=DEV)
        used = perm[perm >= 0]
        ops.penalty_reset_batch(used.to(DEV), self.present, self.counts)
        t32 = lambda v: torch.tensor(v, dtype=torch.int32, device=DEV)  # noqa: E731
        ops.penalty_update_batch(t32(tok[0]), t32(slot_of[0]), self.present, None)
        ops.penalty_update_batch(t32(tok[1]), t32(slot_of[1]), self.present, self.counts)

    def expected_pool(self):
        present = torch.full((self.max_slots, self.vocab), 7, dtype=torch.int32)
        counts = torch.full((self.max_slots, self.vocab), 7, dtype=torch.int32)
        for b in range(self.B):
            s = int(self.slots[b])
            if s < 0:
                continue
            present[s] = 0
            counts[s] = 0
            for t in self.prompts[b] + self.generated[b]:
                if 0 <= t < self.vocab:
                    present[s, t] = 1
            for t in self.generated[b]:
                if 0 <= t < self.vocab:
                    counts[s, t] += 1
        return present, counts

    def slot_rows(self, b):
        s = int(self.slots[b])
        if s < 0:
            z = torch.zeros(self.vocab, dtype=torch.int32, device=DEV)
            return z, z
        return self.present[s], self.counts[s]


def _penalty_ref(x, present, counts, cfg):
    """The device formula in float32 (sampling.py's arithmetic), over a presence mask and counts."""
    rep, pres, freq = cfg[4:]
    x = _clean(x)
    sel = present.bool()
    x[sel] = torch.where(x[sel] > 0, x[sel] / rep, x[sel] * rep)
    c = counts.float()
    x -= pres * (c > 0).float()
    x -= freq * c
    return x


# ----------------------------------------------------------- penalty pool


def test_penalty_slots(ops, gen):
    vocab, max_slots = 1001, 6
    present = torch.full((max_slots, vocab), 7, dtype=torch.int32, device=DEV)
    counts = torch.full((max_slots, vocab), 7, dtype=torch.int32, device=DEV)
    ops.penalty_reset_batch(torch.tensor([4, 1, -1, 6, 1], dtype=torch.int32, device=DEV), present, counts)
    want_p = torch.full((max_slots, vocab), 7, dtype=torch.int32)
    want_c = want_p.clone()
    want_p[[1, 4]] = 0
    want_c[[1, 4]] = 0
    assert torch.equal(present.cpu(), want_p) and torch.equal(counts.cpu(), want_c)
    # Prompt tokens: present only.
    toks = torch.randint(-3, vocab + 3, (500,), generator=gen, dtype=torch.int32)
    sl = torch.tensor([1, 4, -1, 6], dtype=torch.int32)[torch.randint(0, 4, (500,), generator=gen)]
    ops.penalty_update_batch(toks.to(DEV), sl.to(DEV), present, None)
    for t, s in zip(toks.tolist(), sl.tolist()):
        if 0 <= t < vocab and 0 <= s < max_slots:
            want_p[s, t] = 1
    assert torch.equal(present.cpu(), want_p) and torch.equal(counts.cpu(), want_c)
    # Generated tokens, many repeats: present and counts.
    toks = torch.randint(0, 12, (3000,), generator=gen, dtype=torch.int32)
    toks[::97] = vocab
    sl = torch.tensor([1, 4, 6], dtype=torch.int32)[torch.randint(0, 3, (3000,), generator=gen)]
    ops.penalty_update_batch(toks.to(DEV), sl.to(DEV), present, counts)
    for t, s in zip(toks.tolist(), sl.tolist()):
        if 0 <= t < vocab and 0 <= s < max_slots:
            want_p[s, t] = 1
            want_c[s, t] += 1
    assert torch.equal(present.cpu(), want_p) and torch.equal(counts.cpu(), want_c)
    # Resetting one slot leaves the others alone; counts=None resets present only.
    ops.penalty_reset_batch(torch.tensor([4], dtype=torch.int32, device=DEV), present, None)
    want_p[4] = 0
    assert torch.equal(present.cpu(), want_p) and torch.equal(counts.cpu(), want_c)
    # An odd-sized pool row (not 16-byte aligned) resets through the scalar path.
    odd = torch.full((3, 37), 5, dtype=torch.int32, device=DEV)
    ops.penalty_reset_batch(torch.tensor([2, 1], dtype=torch.int32, device=DEV), odd, None)
    assert torch.equal(odd[0].cpu(), torch.full((37,), 5, dtype=torch.int32))
    assert int(odd[1:].abs().sum()) == 0


@pytest.mark.parametrize("B,vocab", [(1, 1001), (3, 7), (17, 32000), (64, 151936)])
def test_penalties_batch(ops, gen, B, vocab):
    bt = Batch(ops, gen, B, vocab, shift=int(torch.randint(0, 12, (1,), generator=gen)))
    want_p, want_c = bt.expected_pool()
    assert torch.equal(bt.present.cpu(), want_p), "slot pool present"
    assert torch.equal(bt.counts.cpu(), want_c), "slot pool counts"
    out = poisoned(B, vocab)
    ops.penalties_batch(bt.logits_d, out, bt.params, bt.slots.to(DEV), bt.present, bt.counts)
    for b in range(B):
        pr, cn = bt.slot_rows(b)
        one = poisoned(vocab)
        ops.penalties(bt.logits_d[b], one, bt.param_rows[b], pr, cn)
        assert torch.equal(out[b], one), f"row {b}: batched penalties differ from the single-row launcher"
        want = _penalty_ref(bt.logits[b], pr.cpu(), cn.cpu(), bt.cfgs[b])
        assert torch.equal(out[b].cpu(), want), f"row {b} ({bt.cfgs[b]}): penalties differ from the reference"
    # In place (out aliasing logits) gives the same.
    inplace = bt.logits_d.clone()
    ops.penalties_batch(inplace, inplace, bt.params, bt.slots.to(DEV), bt.present, bt.counts)
    assert torch.equal(inplace, out)


# ------------------------------------------------------------------ argmax


@pytest.mark.parametrize("B", [1, 3, 17, 64])
@pytest.mark.parametrize("vocab", [1, 7, 1001, 4097, 49152, 151936])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("sliced", [False, True], ids=["one-block", "sliced"])
def test_argmax_batch(ops, gen, B, vocab, offset, sliced):
    # sliced: the model's form (rows cut into blocks of their own, then a pick
    # among the slices' bests); kind 1 puts a tie in two slices.
    x = torch.randn(B, vocab, generator=gen) * 3
    for b in range(B):
        kind = b % 4
        if kind == 1 and vocab > 10:
            x[b, vocab // 2] = x[b].max() + 1
            x[b, vocab - 1] = x[b, vocab // 2]  # tie: the lower id wins
            x[b, 3] = float("nan")  # NaN counts as -inf
        elif kind == 2:
            x[b] = -math.inf  # all -inf: 0
        elif kind == 3:
            x[b] = torch.round(x[b])
    # offset 1: rows start 4 bytes past an aligned address and take the scalar path.
    flat = torch.cat([torch.zeros(offset), x.flatten()]).to(DEV)
    xd = flat[offset:].view(B, vocab)
    out = poisoned(B, dtype=torch.int32)
    ops.argmax_batch(xd, out, sliced)
    want = torch.argmax(_clean(x), dim=1)
    assert out.cpu().tolist() == want.tolist()
    for b in range(B):
        one = poisoned(1, dtype=torch.int32)
        ops.argmax(xd[b], one)
        assert int(one) == int(out[b])


# ---------------------------------------------------------------- logprobs


@pytest.mark.parametrize("B", [1, 3, 17, 64])
@pytest.mark.parametrize("vocab", [5, 32000, 151936])
@pytest.mark.parametrize("top_n", [0, 1, 5, 20])
def test_logprobs_batch(ops, gen, B, vocab, top_n):
    x = torch.randn(B, vocab, generator=gen) * 4
    for b in range(B):
        if vocab > 30 and b % 3 == 1:
            x[b, 10] = x[b, 20] = x[b].max() + 0.5  # tie at the top: id 10 first
            x[b, 7] = float("nan")
        if b % 3 == 2:
            x[b] = torch.round(x[b])
    tokens = torch.randint(0, vocab, (B,), generator=gen, dtype=torch.int32)
    if B > 2:
        tokens[1] = -1
        tokens[2] = vocab  # outside the vocabulary: -inf
    xd = x.to(DEV)
    lp_out = poisoned(B)
    ids = poisoned(B, MAX_TOP, dtype=torch.int32)
    top = poisoned(B, MAX_TOP)
    ops.logprobs_batch(xd, top_n, tokens.to(DEV), lp_out, ids, top)
    lp = torch.log_softmax(_clean(x).double(), dim=1)
    n = min(top_n, vocab)
    for b in range(B):
        # The single-row launcher runs the same kernel: identical bits.
        one_lp, one_ids, one_top = poisoned(1), poisoned(MAX_TOP, dtype=torch.int32), poisoned(MAX_TOP)
        ops.logprobs(xd[b], top_n, tokens[b : b + 1].to(DEV), one_lp, one_ids, one_top)
        assert torch.equal(lp_out[b : b + 1], one_lp)
        assert torch.equal(ids[b, :top_n], one_ids[:top_n])
        assert torch.equal(top[b, :top_n].cpu(), one_top[:top_n].cpu())
        t = int(tokens[b])
        if 0 <= t < vocab:
            torch.testing.assert_close(lp_out[b].cpu().double(), lp[b, t], rtol=1e-4, atol=2e-5)
        else:
            assert float(lp_out[b]) == -math.inf
        if n:
            order = torch.sort(_clean(x[b]), descending=True, stable=True).indices[:n]
            assert ids[b, :n].cpu().tolist() == order.tolist()
            torch.testing.assert_close(top[b, :n].cpu().double(), lp[b, order], rtol=1e-4, atol=2e-5)
        # Entries past top_n (and past the vocabulary) are never written.
        assert (ids[b, top_n:].cpu() == -7).all()
        assert torch.isnan(top[b, top_n:].cpu()).all()


# ------------------------------------------------------------------ sample


def _check_batch(ops, bt, rounds=3):
    """Samples bt for `rounds` steps in both modes; returns (near-tie picks, sampled rows).

    A near-tie pick differs from the float64 reading of params.py without
    nudges; it must still be one that reading or the CPU sampler gives under
    nudges. A pick that differs only from the CPU sampler is not counted: on
    flat rows with top_p the CPU sampler's float32 cumulative sum drifts by
    far more than 1e-5, and there the device follows the float64 reading.
    """
    B, vocab = bt.B, bt.vocab
    work = poisoned(B, vocab)
    slots_d = bt.slots.to(DEV)
    ops.penalties_batch(bt.logits_d, work, bt.params, slots_d, bt.present, bt.counts)
    work_cpu = work.cpu()
    mismatches = sampled = 0
    for r in range(rounds):
        steps = bt.steps + r
        steps_d = steps.to(DEV)
        got = {}
        for prefix in (True, False):
            out = poisoned(B, dtype=torch.int32)
            full = poisoned(B, dtype=torch.int32)
            ops.sample_batch(work, bt.params, steps_d, out, prefix, full)
            got[prefix] = out.cpu().tolist()
            flags = full.cpu().tolist()
            assert set(flags) <= {0, 1}, f"sorted_in_full not written: {flags}"
            for b in range(B):
                if bt.cfgs[b][0] == 0.0:
                    assert flags[b] == 0, f"row {b}: a greedy row was sorted"
        for b in range(B):
            one = poisoned(1, dtype=torch.int32)
            ops.sample(work[b], bt.param_rows[b], steps_d[b : b + 1], one)
            single = int(one)
            what = f"row {b} cfg={bt.cfgs[b]} flavor={bt.flavors[b]} step={int(steps[b])}"
            assert got[True][b] == single, f"{what}: prefix mode {got[True][b]}, single-row launcher {single}"
            assert got[False][b] == single, f"{what}: full-sort mode {got[False][b]}, single-row launcher {single}"
            assert 0 <= single < vocab, f"{what}: token {single} outside the vocabulary"
            st = int(steps[b])
            cpu = _cpu_token(bt.logits[b], bt.cfgs[b], bt.seeds[b], bt.prompts[b], bt.generated[b], st)
            t, k, tp, mp = bt.cfgs[b][:4]
            ref = ref_sample(work_cpu[b], t, k, tp, mp, hparams.uniform(bt.seeds[b], st))
            if t != 0.0:
                sampled += 1
            if cpu != single or ref != single:
                allowed = _allowed(
                    bt.logits[b], work_cpu[b], bt.cfgs[b], bt.seeds[b], bt.prompts[b], bt.generated[b], st
                )
                assert single in allowed, (
                    f"{what}: device {single}, CPU sampler {cpu}, float64 reading {ref}, near-tie set {sorted(allowed)}"
                )
                mismatches += ref != single
    return mismatches, sampled


@pytest.mark.parametrize(
    "B,vocab",
    [(1, 1001), (1, 151936), (3, 7), (3, 1001), (3, 151936), (17, 1001), (17, 151936), (64, 1001), (64, 151936)],
)
def test_sample_batch(ops, gen, B, vocab):
    # Small batches go through every row configuration in turn.
    shifts = range(len(ROW_CONFIGS)) if B < 4 else [int(torch.randint(0, 12, (1,), generator=gen))]
    mismatches = sampled = 0
    for shift in shifts:
        bt = Batch(ops, gen, B, vocab, shift=shift)
        m, s = _check_batch(ops, bt)
        mismatches += m
        sampled += s
    assert mismatches <= sampled // 8 + 1, f"{mismatches} of {sampled} sampled picks were near-ties"


def test_sample_batch_paths(ops, gen):
    """Which rows the candidate prefix serves and which need the full sort."""
    vocab = 151936
    rows = [
        ("peaked", (1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0), 0),  # nearly all mass on one token
        ("normal", (0.7, 40, 1.0, 0.0, 1.0, 0.0, 0.0), 0),  # top_k inside ~2700 candidates
        ("zeros", (1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0), 1),  # one bucket holds every value
        ("normal", (0.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0), 0),  # greedy: no sort
        ("normal", (1.0, 5000, 1.0, 0.0, 1.0, 0.0, 0.0), 1),  # top_k past the candidates
        ("ninf", (1.0, 0, 0.9, 0.0, 1.0, 0.0, 0.0), 0),  # nothing finite: argmax
    ]
    x = torch.stack([_row_logits(f, vocab, gen) for f, _, _ in rows])
    xd = x.to(DEV)
    seeds = [int(torch.randint(0, 2**62, (1,), generator=gen)) for _ in rows]
    prow = [_params(ops, c, s) for (_, c, _), s in zip(rows, seeds)]
    params = torch.cat(prow)
    steps = torch.randint(0, 1000, (len(rows),), generator=gen, dtype=torch.int32).to(DEV)
    for prefix in (True, False):
        out = poisoned(len(rows), dtype=torch.int32)
        full = poisoned(len(rows), dtype=torch.int32)
        ops.sample_batch(xd, params, steps, out, prefix, full)
        want_full = [w if prefix else int(c[0] > 0 and f != "ninf") for f, c, w in rows]
        assert full.cpu().tolist() == want_full, f"candidate_prefix={prefix}: {full.cpu().tolist()} != {want_full}"
        for b in range(len(rows)):
            one = poisoned(1, dtype=torch.int32)
            ops.sample(xd[b], prow[b], steps[b : b + 1], one)
            assert int(out[b]) == int(one), f"row {b} ({rows[b][0]}), candidate_prefix={prefix}"
    assert int(out[5]) == 0, "an all -inf row gives token 0"


def test_sample_batch_graph_replay(ops, gen):
    """penalties -> sample -> logprobs for a batch, captured once and replayed with new steps."""
    B, vocab = 9, 50000
    bt = Batch(ops, gen, B, vocab, shift=1)
    slots_d = bt.slots.to(DEV)
    steps = bt.steps.to(DEV)
    work = poisoned(B, vocab)
    out = poisoned(B, dtype=torch.int32)
    lp = poisoned(B)
    ids = poisoned(B, MAX_TOP, dtype=torch.int32)
    top = poisoned(B, MAX_TOP)

    def step():
        ops.penalties_batch(bt.logits_d, work, bt.params, slots_d, bt.present, bt.counts)
        ops.sample_batch(work, bt.params, steps, out)
        ops.logprobs_batch(bt.logits_d, MAX_TOP, out, lp, ids, top)

    step()  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for r in range(5):
        steps.copy_((bt.steps + 7 * r).to(DEV))
        for t in (work, lp, top):
            t.fill_(float("nan"))
        for t in (out, ids):
            t.fill_(-7)
        graph.replay()
        torch.cuda.synchronize()
        w_e, o_e, lp_e = poisoned(B, vocab), poisoned(B, dtype=torch.int32), poisoned(B)
        ids_e, top_e = poisoned(B, MAX_TOP, dtype=torch.int32), poisoned(B, MAX_TOP)
        ops.penalties_batch(bt.logits_d, w_e, bt.params, slots_d, bt.present, bt.counts)
        ops.sample_batch(w_e, bt.params, steps, o_e)
        ops.logprobs_batch(bt.logits_d, MAX_TOP, o_e, lp_e, ids_e, top_e)
        assert torch.equal(work, w_e)
        assert out.cpu().tolist() == o_e.cpu().tolist(), f"replay {r}"
        assert torch.equal(ids, ids_e)
        assert torch.equal(
            lp.cpu().nan_to_num(nan=1.5, posinf=2.5, neginf=-2.5),
            lp_e.cpu().nan_to_num(nan=1.5, posinf=2.5, neginf=-2.5),
        )


def test_sample_batch_bad_arguments(ops):
    x = torch.zeros(3, 10, device=DEV)
    p1 = _params(ops, ROW_CONFIGS[1], 5)
    steps = torch.zeros(3, dtype=torch.int32, device=DEV)
    out = poisoned(3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="params"):
        ops.sample_batch(x, torch.cat([p1, p1]), steps, out)
    with pytest.raises(RuntimeError, match=r"\[B, vocab\]"):
        ops.sample_batch(x.flatten(), torch.cat([p1, p1, p1]), steps, out)
    with pytest.raises(RuntimeError, match="steps"):
        ops.sample_batch(x, torch.cat([p1, p1, p1]), steps[:2], out)
    assert (out.cpu() == -7).all()  # nothing written by a refused call
    # An empty batch is a no-op.
    ops.sample_batch(torch.zeros(0, 10, device=DEV), torch.zeros(0, dtype=torch.uint8, device=DEV), steps[:0], out[:0])
