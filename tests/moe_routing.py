"""Checking a MoE forward against the CPU reference where routing near-ties may tip either way.

A router picks each token's k most probable experts. Where the k-th and
(k+1)-th probabilities nearly tie, the rounding of another implementation
(bf16 activations, a bf16 KV cache) can pick the (k+1)-th expert instead:
both are faithful results of the same weights, yet that row's output moves
far beyond rounding. In a layer below the last, the swap also changes the
row's keys and values in the layers above, so every later position attends
to different values, and later rows whose own routing is far from a tie
(margins up to 0.1 on qwen3moe-tiny) can then swap too: against one fixed
reference run, rows drift apart after the first such swap, whatever the
rows' own margins, so exempting rows by their margin cannot hold.

`follow` runs the reference (a CPUBackend, ideally with the bf16 KV cache
the device keeps) pass by pass over the same tokens as the device and makes
it follow the device's routing: when a checked row disagrees, it looks for
a near-tie (a routing margin, `routing_margins`, below `NEAR_TIE` in some
layer) whose other choice makes the reference agree, takes that choice
(`ReferenceModel.route_choices`) and goes on from there. Every checked row
is then held to the full criterion against a reference that routed as the
device did; the number of such re-routings is bounded (MAX_REROUTED).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from helexa_native.reference import model as reference_model
from helexa_native.reference.model import routing_margins

# Routing margins, (p_k - p_{k+1}) / p_k, below which the device may have
# taken another expert than the reference. On the CPU, a float32 KV cache
# against the bf16 one (teacher-forced runs of qwen3moe-tiny, all weight
# types of tests/gpu/test_moe_gpu.py, 570 runs) needed re-routings at
# margins up to 3.9e-3, once 7.9e-3 (a tie tipped where an earlier tipped
# one, in the prompt, had not been followed); the device's bf16 products
# tipped ties up to 3e-3.
NEAR_TIE = 2e-2

# Near-ties of earlier positions tried for one row, smallest margins first.
LOOK_BACK = 32

# At most this share of the checked rows may need a re-routing (at least two
# are always allowed: a 16-token greedy run on the device's integer-weight
# products tipped two, at margins 4.5e-3 and 2.4e-3): a device whose routing
# is wrong beyond near-ties fails.
MAX_REROUTED = 0.05
MIN_REROUTED = 2


def alternatives(probs: torch.Tensor, k: int, near_tie: float = NEAR_TIE) -> List[Tuple[int, ...]]:
    """The other sets of k experts a near tie allows for one row's router probabilities [E].

    Experts whose probability is within `near_tie` (relative) of the k-th
    largest form the band; those above it are always chosen, and each other
    way of filling the remaining places from the band is an alternative (k
    ids, most probable first). Probabilities that are equal bit for bit
    stay ordered by expert id, as the reference breaks exact ties.
    """
    p, ids = torch.sort(probs.float(), descending=True, stable=True)
    p, ids = p.tolist(), ids.tolist()
    if k >= len(p):
        return []
    pk = p[k - 1]
    band = [j for j in range(len(p)) if abs(p[j] - pk) < near_tie * max(p[j], pk)]
    sure = [j for j in range(k) if j not in band]
    need = k - len(sure)
    out = []
    for pick in combinations(band, need):
        if list(pick) == band[:need]:
            continue
        chosen = set(pick)
        # An exact tie must go to the lower id: never skip a rank for one of equal probability.
        if any(p[i] == p[j] for i in chosen for j in band if j not in chosen and j < i):
            continue
        out.append(tuple(ids[j] for j in sorted(sure + list(pick))))
    return out


@dataclass
class Followed:
    """What `follow` found.

    rows: pos -> the reference's float32 logits at that position, as finally
    routed. reroutes: (pos, layer, margin) of each near-tie that took
    another choice. failures: checked positions no near-tie explains.
    margins: pos -> [num_layers] routing margins of the final run
    (`routing_margins`, infinite in dense layers).
    """

    rows: Dict[int, torch.Tensor] = field(default_factory=dict)
    reroutes: List[Tuple[int, int, float]] = field(default_factory=list)
    failures: List[int] = field(default_factory=list)
    margins: Dict[int, torch.Tensor] = field(default_factory=dict)

    def max_reroutes(self, checked: int) -> int:
        return max(MIN_REROUTED, int(MAX_REROUTED * checked))


def follow(
    cpu,
    passes: Sequence[Tuple[Sequence[int], int]],
    checks: Dict[int, Callable[[torch.Tensor], bool]],
    near_tie: float = NEAR_TIE,
) -> Followed:
    """Run `passes` ((tokens, start_pos), in order, as the device ran them) on the reference, following the device.

    checks: position -> a test of the reference's logits row at that
    position (does the device's row agree with it?). A failing row tries
    the other choices at near-ties, smallest margins first: its own (in
    any MoE layer; a choice in one layer moves the router input of the
    layers above, so their near-ties are looked up again after it) and
    those of earlier positions in layers below the last (they reach this
    row through the keys and values; at most LOOK_BACK of them). A choice
    is kept when it makes the row pass and leaves fewer failing rows in the
    pass (a row it breaks was explained by the old choice only by chance: it
    is checked, and fixed or failed, in its turn); a row nothing fixes is a
    failure, and the check goes on (without looking back any more). The
    private sequence of `cpu` is reset first.
    """
    model = cpu.model
    k = model.config.num_experts_per_tok
    n_layers = len(model.layers)
    starts = [int(s) for _, s in passes]
    for (tokens, start), nxt in zip(passes, starts[1:] + [None]):
        if len(tokens) > reference_model.PREFILL_CHUNK:
            raise ValueError("a pass longer than the reference's prefill chunk")
        if nxt is not None and nxt != start + len(tokens):
            raise ValueError("passes must follow one another")
    out = Followed()
    probs: Dict[int, Dict[int, torch.Tensor]] = {}  # pos -> {layer: [E]}
    chosen: Dict[Tuple[int, int], tuple] = {}  # (pos, layer) -> expert ids taken instead
    stale = [None]  # first position whose rows predate a change of `chosen`

    def run(i: int) -> None:
        tokens, start = passes[i]
        by_layer: Dict[int, dict] = {}
        for (p, li), ids in chosen.items():
            if start <= p < start + len(tokens):
                by_layer.setdefault(li, {})[p - start] = ids
        model.route_choices = by_layer or None
        model.route_probs = []
        try:
            logits = cpu.forward(list(tokens), start, all_logits=True)
            (layers,) = model.route_probs
        finally:
            model.route_choices = model.route_probs = None
        for j in range(len(tokens)):
            pos = start + j
            out.rows[pos] = logits[j]
            probs[pos] = {li: pr[j] for li, pr in layers.items()}
            m = torch.full((n_layers,), math.inf)
            for li, pr in probs[pos].items():
                m[li] = routing_margins(torch.sort(pr, descending=True).values[None], k)[0]
            out.margins[pos] = m

    def pass_of(pos: int) -> int:
        return max(i for i, s in enumerate(starts) if s <= pos)

    def rerun_to(i: int) -> None:
        if stale[0] is not None:
            for j in range(pass_of(stale[0]), i + 1):
                run(j)
            stale[0] = None

    def failing(first: int, last: int) -> set:
        return {p for p in range(first, last + 1) if p in checks and not checks[p](out.rows[p])}

    def options(pos: int, layers) -> List[Tuple[float, int, int, tuple]]:
        return [
            (float(out.margins[pos][li]), pos, li, ids)
            for li, pr in sorted(probs[pos].items())
            if li in layers and (pos, li) not in chosen and float(out.margins[pos][li]) < near_tie
            for ids in alternatives(pr, k, near_tie)
        ]

    def set_choice(c, on: bool) -> None:
        _, p, li, ids = c
        if on:
            chosen[(p, li)] = ids
        else:
            del chosen[(p, li)]
        stale[0] = p if stale[0] is None else min(stale[0], p)

    def fix(pos: int, i: int, last: int) -> bool:
        """Take a near-tie's other choice that makes row pos pass; False when none does."""

        def tries(c, deeper: bool, before=None) -> bool:
            rerun_to(i)
            if before is None:
                before = failing(c[1], last)
            set_choice(c, True)
            rerun_to(i)
            after = failing(c[1], last)
            if pos not in after and len(after) < len(before):
                out.reroutes.append((c[1], c[2], c[0]))
                return True
            # The row still fails: a near-tie of a layer above, as routed now, may also have tipped.
            if deeper:
                for c2 in options(pos, range(c[2] + 1, n_layers)):
                    if tries(c2, False, before):
                        out.reroutes.insert(-1, (c[1], c[2], c[0]))
                        return True
            set_choice(c, False)
            return False

        # The smallest margins first, wherever they are: a tie tipped by rounding
        # is a close one, and a farther one may only seem to fix the row.
        own = [(c, True) for c in options(pos, range(n_layers))]
        earlier = []
        if not out.failures:  # already failing: no costly search for what follows
            earlier = sorted(c for p in range(pos) for c in options(p, range(n_layers - 1)))[:LOOK_BACK]
        for c, deeper in sorted(own + [(c, False) for c in earlier], key=lambda x: x[0][0]):
            if tries(c, deeper):
                return True
        rerun_to(i)
        return False

    cpu.reset()
    done = set()  # failures already recorded
    i = 0
    while i < len(passes):
        run(i)
        last = starts[i] + len(passes[i][0]) - 1
        bad = sorted(failing(starts[i], last) - done)
        if not bad:
            i += 1
        elif not fix(bad[0], i, last):
            out.failures.append(bad[0])
            done.add(bad[0])
    return out


def teacher_forced(prompt: Sequence[int], teacher: Sequence[int]) -> List[Tuple[List[int], int]]:
    """The passes of a teacher-forced run: the prompt, then one token at a time.

    Row s of such a run's logits (after the prompt, then after each teacher
    token) sits at position len(prompt) - 1 + s.
    """
    n = len(prompt)
    return [(list(prompt), 0)] + [([int(t)], n + i) for i, t in enumerate(teacher)]


def cosines(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(got.double(), want.double(), dim=-1)


def follow_logits(
    cpu, passes: Sequence[Tuple[Sequence[int], int]], rows: Dict[int, torch.Tensor], min_cosine: float
) -> Tuple[Followed, torch.Tensor]:
    """The device's logits `rows` (position -> [vocab]) against the reference following its routing.

    Asserts that every row reaches `min_cosine` and that few near-ties
    (MAX_REROUTED) took the other choice. Returns what `follow` found and
    the reference's rows in the order of `rows`.
    """

    def check(got):
        return lambda want: cosines(got, want).item() >= min_cosine

    f = follow(cpu, passes, {p: check(g) for p, g in rows.items()})
    want = torch.stack([f.rows[p] for p in rows])
    if f.failures:
        detail = ", ".join(
            f"position {p}: cosine {cosines(rows[p], f.rows[p]).item():.6f}, "
            f"margins {[round(float(m), 6) for m in f.margins[p]]}"
            for p in f.failures
        )
        raise AssertionError(f"rows no routing near-tie explains ({detail}); re-routed: {f.reroutes}")
    most = f.max_reroutes(len(rows))
    assert len(f.reroutes) <= most, f"{len(f.reroutes)} re-routed near-ties (at most {most}): {f.reroutes}"
    return f, want
