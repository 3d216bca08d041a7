"""The interface every compute backend implements; the Engine uses only this.

A backend holds a model and one paged KV pool (`blocks`, a KVBlockManager
over `blocks.num_blocks` blocks of `blocks.block_size` positions). The batched
step is the one primitive: `step_batch` runs several sequences at once, each
its own slice of tokens at its own positions through its own block table,
and samples a token for the sequences that ask for one. Everything else
(`forward`, `step`, `reset`) is the same step for one private sequence, kept
for tests, benchmarks and teacher forcing.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch

from .. import defaults
from ..config import ModelConfig
from ..embeddings import pool
from ..errors import ContextLengthError
from ..kv_blocks import KVBlockManager, SeqBlocks
from ..params import SampleResult, SamplerState, SamplingParams
from ..sampling import sample_from_logits


def check_positive_ints(**values) -> None:
    """ValueError naming the first of `values` that is not a positive integer (a bool is not one)."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def check_decode_steps_input(seqs: Sequence["SeqStep"], n: int) -> None:
    """ValueError unless n is a positive integer and every sequence feeds one token and samples without a mask."""
    check_positive_ints(n=n)
    for s in seqs:
        if len(s.tokens) != 1 or not s.sample or s.state is None or s.allowed is not None:
            raise ValueError("decode_steps runs sequences that feed one token and sample without a token mask")


@dataclass
class SeqStep:
    """One sequence's share of a batched step.

    tokens run at positions start_pos .. start_pos + len(tokens) - 1 and
    their keys/values are written through `block_table` (physical block ids
    covering at least start_pos + len(tokens) positions; positions below
    start_pos already hold this sequence's cache). `slot` (0 <= slot <
    max_num_seqs) names the sequence's per-sequence sampler state on the
    device (penalty counts); it stays the same for the sequence's life.
    When `sample` is set, a token is sampled after the last one with
    `params` and `state` (state.step is the sampler step); `logit_bias`
    (token ids int64 [k], values float32 [k]) is added to the raw logits and
    `allowed` (a CPU int32 bitmask [ceil(vocab/32)], bit i % 32 of word i // 32
    set for an allowed token i; constraints.py) masks them, both before the
    penalties (params.py steps 1a-1b, sampling.constrain_logits). Backends
    without `supports_constraints` never receive either. A backend with
    `late_masks` may receive a LateMask instead: a row of its table that
    another thread fills while the step runs.
    """

    slot: int
    tokens: List[int]
    start_pos: int
    block_table: List[int]
    sample: bool = True
    params: Optional[SamplingParams] = None
    state: Optional[SamplerState] = None
    want_logits: bool = False  # also return the sampled position's raw logits
    allowed: Optional[Union[torch.Tensor, "LateMask"]] = None
    logit_bias: Optional[Tuple[torch.Tensor, torch.Tensor]] = None


@dataclass(frozen=True)
class LateMask:
    """Row `row` of a late mask table (Backend.late_masks): written, then `table.ready()`, while the step runs."""

    table: Any
    row: int


@dataclass
class StepOutput:
    """What a batched step returns for one sequence."""

    result: Optional[SampleResult]  # None when the sequence did not sample
    logits: Optional[torch.Tensor] = None


class Backend(ABC):
    """A loaded model on one device with a paged KV pool; sequences hold up to `n_ctx` positions."""

    config: ModelConfig
    n_ctx: int
    device: str
    blocks: KVBlockManager
    max_num_seqs: int
    # True when step_batch applies SeqStep.allowed and SeqStep.logit_bias;
    # the Engine refuses structured outputs and logit_bias otherwise.
    supports_constraints: bool = False
    # Decode steps a scheduler runs per decode_steps call unless told: 1 where
    # the call is step_batch in a loop (nothing gained, tokens held back).
    default_decode_steps: int = 1
    # Tokens a step runs at most unless told (Engine max_batch_tokens).
    default_max_batch_tokens: int = defaults.DEFAULT_MAX_BATCH_TOKENS

    def late_masks(self, words: int):
        """A table of token masks that step_batch waits for only when it samples, or None (masks come with the step).

        The table (max_num_seqs + 1 rows of `words` int32 words) has `table`
        (a writable array view), `ready()` and `fail(reason)`; the caller
        fills rows on another thread while the step's forward runs, then
        calls one of the two (fail: the step raises with the reason). One
        table serves one step at a time.
        """
        return None

    @property
    def lock(self) -> threading.RLock:
        """Held around every step: the scheduler's and the private sequence's never interleave."""
        lk = self.__dict__.get("_step_lock")
        if lk is None:
            lk = self.__dict__.setdefault("_step_lock", threading.RLock())
        return lk

    # ------------------------------------------------------------------ batched step

    @abstractmethod
    def step_batch(self, seqs: Sequence[SeqStep]) -> List[StepOutput]:
        """Run every sequence's tokens in one step; sample where asked."""

    @abstractmethod
    def forward_paged(
        self, tokens: Sequence[int], start_pos: int, block_table: Sequence[int], all_logits: bool = False
    ) -> torch.Tensor:
        """One sequence's tokens through its block table; float32 CPU logits ([vocab] or [n, vocab])."""

    def decode_steps_ok(self, params: SamplingParams, logit_bias=None) -> bool:
        """Whether a sequence sampling with `params` (and SeqStep.logit_bias) may take part in decode_steps."""
        return True

    def decode_steps(self, seqs: Sequence[SeqStep], n: int) -> List[List[SampleResult]]:
        """n decode steps in one call; each sampled token is its sequence's input to the next step.

        Every sequence samples, carries no token mask (logit_bias is kept) and
        passes decode_steps_ok; its block table covers start_pos + n
        positions. Step j samples at sampler step state.step + j, as if the
        tokens before it had been generated; `state` itself is not changed
        (the caller advances it with the tokens it keeps). Returns each
        sequence's n results. A stop token mid-way does not end the call: the
        caller drops what follows it. This default runs step_batch n times;
        a backend that feeds the tokens on its device overrides it.
        """
        check_decode_steps_input(seqs, n)
        out: List[List[SampleResult]] = [[] for _ in seqs]
        feed = [int(s.tokens[0]) for s in seqs]
        for j in range(n):
            steps = [
                SeqStep(
                    slot=s.slot,
                    tokens=[feed[i]],
                    start_pos=s.start_pos + j,
                    block_table=s.block_table,
                    params=s.params,
                    state=SamplerState(
                        prompt_tokens=s.state.prompt_tokens,
                        generated_tokens=s.state.generated_tokens + [r.token for r in out[i]],
                        step=s.state.step + j,
                    ),
                    logit_bias=s.logit_bias,
                )
                for i, s in enumerate(seqs)
            ]
            for i, res in enumerate(self.step_batch(steps)):
                out[i].append(res.result)
                feed[i] = int(res.result.token)
        return out

    # ------------------------------------------------------------------ one private sequence

    def _solo_blocks(self) -> SeqBlocks:
        seq = getattr(self, "_solo", None)
        if seq is None or seq.released:
            seq = self._solo = SeqBlocks()
            self._solo_filled = 0
        return seq

    def _solo_prepare(self, start_pos: int, count: int) -> SeqBlocks:
        seq = self._solo_blocks()
        if not isinstance(start_pos, int) or isinstance(start_pos, bool) or start_pos < 0:
            raise ValueError(f"start_pos must be a non-negative integer, got {start_pos!r}")
        if start_pos > self._solo_filled:
            raise ValueError(f"start_pos {start_pos} leaves a gap: only {self._solo_filled} positions are cached")
        end = start_pos + count
        if end > self.n_ctx:
            raise ContextLengthError(f"positions up to {end} exceed the context of {self.n_ctx} tokens")
        self.blocks.ensure(seq, end)
        self._solo_filled = min(self._solo_filled, start_pos)
        return seq

    def reset(self) -> None:
        """Forget the private sequence's cache (its blocks go back to the pool)."""
        with self.lock:
            seq = getattr(self, "_solo", None)
            if seq is not None:
                self.blocks.release(seq)
            self._solo = None
            self._solo_filled = 0

    def forward(self, tokens: Sequence[int], start_pos: int, all_logits: bool = False) -> torch.Tensor:
        """Run tokens at positions start_pos.. of the private sequence; float32 CPU logits.

        Returns [vocab] for the last position, or [len(tokens), vocab] with all_logits.
        """
        tokens = _id_list(tokens)
        with self.lock:
            seq = self._solo_prepare(start_pos, len(tokens))
            out = self.forward_paged(tokens, start_pos, seq.table, all_logits=all_logits)
            self._solo_filled = start_pos + len(tokens)
        return out

    def step(self, tokens: Sequence[int], start_pos: int, params: SamplingParams, state: SamplerState) -> SampleResult:
        """Forward `tokens` of the private sequence and sample the next token."""
        return self.step_with_logits(tokens, start_pos, params, state, want_logits=False)[0]

    def step_with_logits(
        self,
        tokens: Sequence[int],
        start_pos: int,
        params: SamplingParams,
        state: SamplerState,
        want_logits: bool = True,
    ):
        """step() that also returns the raw logits it sampled from ([vocab], float32 CPU)."""
        tokens = _id_list(tokens)
        with self.lock:
            seq = self._solo_prepare(start_pos, len(tokens))
            out = self.step_batch(
                [
                    SeqStep(
                        slot=self.max_num_seqs,
                        tokens=tokens,
                        start_pos=start_pos,
                        block_table=list(seq.table),
                        sample=True,
                        params=params,
                        state=state,
                        want_logits=want_logits,
                    )
                ]
            )[0]
            self._solo_filled = start_pos + len(tokens)
        return out.result, out.logits

    def step_many(
        self, token: int, start_pos: int, n: int, params: SamplingParams, state: SamplerState
    ) -> List[SampleResult]:
        """n decode steps of the private sequence from `token` at start_pos, in one decode_steps call.

        `state` is not advanced (decode_steps); the caller adds what it keeps.
        """
        check_positive_ints(n=n)
        with self.lock:
            seq = self._solo_prepare(start_pos, n)
            step = SeqStep(
                slot=self.max_num_seqs,
                tokens=[int(token)],
                start_pos=start_pos,
                block_table=list(seq.table),
                params=params,
                state=state,
            )
            out = self.decode_steps([step], n)[0]
            self._solo_filled = start_pos + n
        return out

    # ------------------------------------------------------------------ embeddings

    def hidden_states(self, seqs: Sequence[Sequence[int]], pooling: Optional[str] = None) -> List[torch.Tensor]:
        """Final hidden states (after the output norm) of each token sequence, float32 CPU.

        [n_i, hidden] per sequence, or with `pooling` ("last", "mean", "cls":
        embeddings.pool) only the pooled row, [1, hidden]. Each sequence runs
        alone from position 0 (causal attention) through KV blocks borrowed
        from the pool and given back uncached, so it leaves no trace in the
        prefix index and no running sequence's cache changes. For embeddings.
        """
        raise NotImplementedError(f"{type(self).__name__} does not compute hidden states (embeddings)")

    def _in_borrowed_blocks(
        self, lengths: Sequence[int], max_tokens: int, max_seqs: int, run: Callable[[List[int], List[list]], None]
    ) -> None:
        """hidden_states' batching: run(indices, block_tables) for groups of consecutive sequences.

        A group takes sequences while their tokens fit max_tokens (a longer
        one runs alone), at most max_seqs of them; its block tables are
        borrowed from the pool for the call and released uncached after it.
        Call under self.lock. OutOfBlocks when the pool cannot hold a group now.
        """
        i = 0
        while i < len(lengths):
            group, total = [i], lengths[i]
            while (
                i + len(group) < len(lengths)
                and len(group) < max_seqs
                and total + lengths[i + len(group)] <= max_tokens
            ):
                total += lengths[i + len(group)]
                group.append(i + len(group))
            borrowed = []
            try:
                for j in group:
                    sb = SeqBlocks()
                    borrowed.append(sb)
                    self.blocks.ensure(sb, lengths[j])
                run(group, [list(sb.table) for sb in borrowed])
            finally:
                for sb in borrowed:
                    self.blocks.release(sb)
            i += len(group)

    # ------------------------------------------------------------------ facts

    def is_healthy(self) -> bool:
        """False once the device behind it is poisoned."""
        return True

    def memory_info(self) -> dict:
        """Device memory facts for `info` and metrics (may be empty)."""
        return {}

    @abstractmethod
    def close(self) -> None:
        """Free the model and its cache."""


def pooled_rows(rows: torch.Tensor, pooling: Optional[str]) -> torch.Tensor:
    """A sequence's hidden rows [n, hidden] as hidden_states returns them for `pooling`."""
    return rows if pooling is None else pool(rows, pooling)[None]


def _id_list(tokens) -> List[int]:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.reshape(-1).tolist()
    return list(tokens)


class HostSampledBackend(Backend):
    """A backend whose forward returns host logits and whose sampler is the host's (sampling.py).

    Subclasses give `_live()` (a model with check_ids / check_span, raising
    once closed) and `_run(batch, all_logits)` (one pass over (ids,
    start_pos, block_table) sequences, logits per sequence); checking,
    chunking and sampling are shared here.
    """

    supports_constraints = True

    @abstractmethod
    def _live(self):
        """The model that checks inputs; raises once closed."""

    @abstractmethod
    def _run(self, batch: list, all_logits: bool) -> list:
        """One pass: float32 logits per sequence ([n_i, vocab], or [1, vocab] unless all_logits)."""

    def step_batch(self, seqs: Sequence[SeqStep]) -> List[StepOutput]:
        """Run every sequence's tokens in one pass and sample where asked."""
        m = self._live()
        batch = []
        for s in seqs:
            ids = m.check_ids(s.tokens)
            m.check_span(s.start_pos, ids.numel(), s.block_table)
            batch.append((ids, int(s.start_pos), list(s.block_table)))
        if not batch:
            return []
        out = []
        for s, lg in zip(seqs, self._run(batch, all_logits=False)):
            row = lg[0]
            res = (
                sample_from_logits(row, s.params, s.state, allowed=s.allowed, logit_bias=s.logit_bias)
                if s.sample
                else None
            )
            out.append(StepOutput(res, row.clone() if s.want_logits else None))
        return out

    def forward_paged(
        self, tokens: Sequence[int], start_pos: int, block_table: Sequence[int], all_logits: bool = False
    ) -> torch.Tensor:
        """One sequence through its block table, in chunks that bound the attention scores."""
        from ..reference import model as reference_model

        m = self._live()
        ids = m.check_ids(tokens)
        m.check_span(start_pos, ids.numel(), block_table)
        chunk = reference_model.PREFILL_CHUNK
        rows = []
        for a in range(0, ids.numel(), chunk):
            part = ids[a : a + chunk]
            last = a + chunk >= ids.numel()
            lg = self._run([(part, int(start_pos) + a, list(block_table))], all_logits=all_logits)[0]
            if all_logits or last:
                rows.append(lg)
        out = torch.cat(rows)
        return out if all_logits else out[0]
