"""The CUDA backend: a model resident on one device worker, driven by jobs.

Weights go to the device once, in their stored form (GGUF blocks or
bf16/fp16/fp32 arrays); norms and biases are converted to float32 here. The
KV cache is one paged pool on the device whose blocks `self.blocks` hands
out. A batched step runs on the worker thread and returns only the sampled
tokens (and logprobs when asked): the device sampler follows params.py's
order with the same (seed, step) random stream as the host sampler, and the
repetition / presence / frequency state lives on the device, one slot per
sequence, refreshed by deltas. Structured-output masks and logit_bias
(SeqStep.allowed / logit_bias) travel with the step and are applied on the
device before the penalties. Embeddings' hidden states come from a job of
their own over KV blocks borrowed for it.

Pool size: the weights and scratch are loaded first; then, unless
`kv_cache_memory` fixes it, the pool takes the smaller of 80% of the device
memory still free and what max_num_seqs sequences of n_ctx positions need,
and is allocated by a second job.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch

from .. import defaults
from ..config import ModelSource
from ..embeddings import check_pooling
from ..errors import (
    ContextLengthError,
    DeviceError,
    EngineClosedError,
    HelexaError,
    ModelLoadError,
    UnsupportedModelError,
)
from ..ggml_types import GGML_TYPE_IDS
from ..kv_blocks import DEFAULT_BLOCK_SIZE, KVBlockManager
from ..params import UINT64_MASK, SampleResult, SamplerState, SamplingParams
from ..rope import inv_freq
from .base import Backend, LateMask, SeqStep, StepOutput, check_decode_steps_input, check_positive_ints

# Architectures the GPU model runs: a subset of config.SUPPORTED_ARCHS (all
# of them today), kept apart so an architecture can reach the CPU reference
# before its GPU kernels exist.
GPU_ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe")

# Tokens per prefill pass: bounds activation scratch; GEMMs stay large
# enough to run near tensor-core peak.
DEFAULT_PREFILL_CHUNK = 512

# Share of the device memory left after weights and scratch that the KV pool
# may take when no size is given (the rest covers cuBLAS, graphs, other work).
KV_FREE_FRACTION = 0.8

_MATRIX_SUFFIXES = (
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
)


def _native():
    try:
        from .. import _C
    except ImportError as e:
        raise DeviceError(f"the helexa_native extension failed to import: {e}") from e
    if not getattr(_C, "cuda", False) or not getattr(_C, "has_gpu_model", False):
        raise DeviceError("this build of helexa_native has no CUDA support (install a CUDA build, or use device='cpu')")
    return _C


def _is_vector(name: str) -> bool:
    return name.endswith("_norm.weight") or name.endswith(".bias")


_ROUTER_SUFFIX = "ffn_gate_inp.weight"
_EXPERT_SUFFIXES = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")


def _is_matrix(name: str) -> bool:
    if name in ("token_embd.weight", "output.weight"):
        return True
    return name.startswith("blk.") and name.endswith(_MATRIX_SUFFIXES + _EXPERT_SUFFIXES)


def _float32(name: str, t) -> np.ndarray:
    """A tensor's values as a contiguous float32 array of its shape."""
    try:
        v = t.to_float()
    except Exception as e:
        raise ModelLoadError(f"cannot read tensor {name} ({t.dtype}): {e}") from e
    return np.ascontiguousarray(torch.as_tensor(v).detach().to("cpu", torch.float32).numpy())


def _stored(name: str, t, data) -> tuple:
    """(ggml type id, contiguous buffer) of stored data in the tensor's type."""
    tid = GGML_TYPE_IDS.get(str(t.dtype).upper())
    if tid is None:
        raise UnsupportedModelError(
            f"tensor {name} has type {t.dtype}, which the CUDA backend "
            f"does not run (supported: {', '.join(GGML_TYPE_IDS)})"
        )
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().contiguous().numpy()
    return tid, np.ascontiguousarray(data)


def host_tensors_of(name: str, t) -> list:
    """(name, ggml_type, shape, buffer) items of tensor `name` as the GPU model reads it ([] when it reads none).

    Norms, biases and MoE routers go as float32 (the router's logits pick
    experts, so the device computes them in float32 like the reference);
    matrices keep their stored bytes (a contiguous view of the file where
    the loader mapped it; a strided view, such as a tensor-parallel column
    slice, is copied, reading only its own bytes). A stacked expert tensor
    whose data is a list of per-expert arrays (an HF checkpoint's) goes as
    one item per expert, "<name>:<e>", so it is never stacked in host memory.
    """
    if _is_vector(name):
        arr = _float32(name, t).reshape(-1)
        return [(name, 0, [int(arr.size)], arr)]
    if name.startswith("blk.") and name.endswith(_ROUTER_SUFFIX):
        return [(name, 0, [int(s) for s in t.shape], _float32(name, t))]
    if _is_matrix(name):
        parts = getattr(t.data, "parts", None)
        if name.endswith(_EXPERT_SUFFIXES) and parts is not None:
            out = []
            for e, part in enumerate(parts):
                tid, arr = _stored(name, t, part)
                out.append((f"{name}:{e}", tid, [int(s) for s in t.shape[1:]], arr))
            return out
        tid, arr = _stored(name, t, t.data)
        return [(name, tid, [int(s) for s in t.shape], arr)]
    return []


def _host_tensors(source: ModelSource) -> list:
    """(name, ggml_type, shape, buffer) for every tensor the GPU model reads.

    Norms, biases and MoE routers go as float32 (the router's logits pick
    experts, so the device computes them in float32 like the reference);
    everything else in its stored type. A stacked expert tensor whose data
    is a list of per-expert arrays (an HF checkpoint's) goes as one tensor
    per expert, "<name>:<e>", so it is never stacked in host memory.
    """
    out = []
    for name, t in source.tensors.items():
        out.extend(host_tensors_of(name, t))
    return out


def _freq_factors(source: ModelSource):
    t = source.tensors.get("rope_freqs.weight")
    return None if t is None else t.to_float()


def _kv_bytes_per_block(cfg, block_size: int, kv_heads: Optional[int] = None) -> int:
    """Device bytes one block of the KV pool takes (K and V, every layer, bf16; kv_heads: a shard's own)."""
    heads = int(cfg.num_kv_heads if kv_heads is None else kv_heads)
    return 2 * int(cfg.num_layers) * heads * int(block_size) * int(cfg.head_dim) * 2


def budget_blocks(kv_cache_memory: Optional[int], per_block: int, n_ctx: int, block_size: int, where: str = "") -> int:
    """KV blocks a kv_cache_memory budget holds (0: None, sized later from free memory).

    ModelLoadError when the budget cannot hold one sequence of n_ctx
    positions; `where` qualifies the count (" per rank").
    """
    if kv_cache_memory is None:
        return 0
    need_blocks = -(-n_ctx // block_size)
    num_blocks = min(kv_cache_memory // per_block, (2**31 - 1) // block_size)
    if num_blocks < need_blocks:
        raise ModelLoadError(
            f"kv_cache_memory of {kv_cache_memory} bytes holds {num_blocks} KV blocks{where}; "
            f"one sequence of n_ctx={n_ctx} positions needs {need_blocks} ({need_blocks * per_block} bytes)"
        )
    return num_blocks


def check_block_size(block_size) -> None:
    """ValueError unless block_size is a power of two >= 16 (the GPU pool's block)."""
    check_positive_ints(block_size=block_size)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")


def pass_rows(prefill_chunk: int, n_ctx: int, max_num_seqs: int) -> int:
    """Rows of one forward pass: `prefill_chunk`, but no more than a step can hold.

    A step holds at most `max_num_seqs` sequences of up to `n_ctx` tokens
    each, so a pass wider than that would only size scratch that is never
    used; a narrower context does not cap it, since one step may carry
    several prompts.
    """
    return int(min(prefill_chunk, n_ctx * max_num_seqs))


def model_spec(
    C,
    source: ModelSource,
    n_ctx: int,
    *,
    use_graphs: bool = True,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    int8_activations: Optional[bool] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_num_seqs: int = defaults.DEFAULT_MAX_NUM_SEQS,
    num_blocks: int = 0,
):
    """The `_C.ModelSpec` of `source`'s whole model (a tensor-parallel rank overrides its shard's sizes)."""
    cfg = source.config
    spec = C.ModelSpec()
    spec.arch = cfg.arch
    spec.vocab = int(cfg.vocab_size)
    spec.hidden = int(cfg.hidden_size)
    spec.intermediate = int(cfg.intermediate_size or 0)
    spec.layers = int(cfg.num_layers)
    spec.heads = int(cfg.num_heads)
    spec.kv_heads = int(cfg.num_kv_heads)
    spec.head_dim = int(cfg.head_dim)
    spec.eps = float(cfg.rms_norm_eps)
    spec.rope_style = cfg.rope_style
    spec.qk_norm = bool(cfg.qk_norm)
    spec.inv_freq = [float(x) for x in inv_freq(cfg, _freq_factors(source)).to(torch.float64).tolist()]
    spec.n_ctx = int(n_ctx)
    spec.prefill_chunk = pass_rows(prefill_chunk, n_ctx, max_num_seqs)
    spec.use_graphs = bool(use_graphs)
    spec.int8_activations = {None: C.Int8Mode.Auto, False: C.Int8Mode.Never, True: C.Int8Mode.Always}[int8_activations]
    spec.block_size = int(block_size)
    spec.max_num_seqs = int(max_num_seqs)
    spec.num_blocks = int(num_blocks)
    if cfg.num_experts:
        spec.num_experts = int(cfg.num_experts)
        spec.experts_per_tok = int(cfg.num_experts_per_tok)
        spec.expert_ffn = int(cfg.moe_intermediate_size)
        spec.norm_topk_prob = bool(cfg.norm_topk_prob)
        spec.mlp_only_layers = [int(i) for i in cfg.mlp_only_layers]
    return spec


def check_gpu_arch(cfg) -> None:
    """UnsupportedModelError unless the GPU model runs `cfg`'s architecture and head grouping."""
    if cfg.arch not in GPU_ARCHS:
        raise UnsupportedModelError(
            f"architecture {cfg.arch!r} is not supported by the CUDA backend "
            f"(GPU architectures: {', '.join(GPU_ARCHS)}); run it with "
            "device='cpu'"
        )
    if cfg.num_heads % cfg.num_kv_heads:
        raise UnsupportedModelError(f"num_heads {cfg.num_heads} is not a multiple of num_kv_heads {cfg.num_kv_heads}")


def constraint_arrays(step: SeqStep, vocab: int):
    """A sampling SeqStep's mask and logit_bias as the arrays SeqInput takes: (allowed, bias_ids, bias_values).

    allowed: int32 [ceil(vocab / 32)] words (a bool [vocab] mask is packed to
    them) or None; bias_ids int32 and bias_values float32 [k], or None.
    """
    allowed = None
    if step.allowed is not None and not isinstance(step.allowed, LateMask):
        a = step.allowed.detach().to("cpu").reshape(-1)
        if a.dtype == torch.bool:
            if a.numel() != vocab:
                raise ValueError(f"a bool mask of {a.numel()} entries does not match a vocabulary of {vocab}")
            allowed = np.packbits(a.numpy(), bitorder="little")
            allowed = np.pad(allowed, (0, -len(allowed) % 4)).view("<i4")
        elif a.dtype == torch.int32:
            allowed = a.contiguous().numpy()
        else:
            raise TypeError(f"a token mask must be an int32 bitmask or bool, got {a.dtype}")
    ids = vals = None
    if step.logit_bias is not None:
        t, v = step.logit_bias
        ids = t.detach().to("cpu", torch.int32).reshape(-1).numpy()
        vals = v.detach().to("cpu", torch.float32).reshape(-1).numpy()
    return allowed, ids, vals


class CUDABackend(Backend):
    """A model on one CUDA device, run by its device worker."""

    supports_constraints = True
    # decode_steps runs as one device job that feeds each sampled token to the
    # next step on the device (model_decode_steps); the tensor-parallel
    # subclasses, whose ranks need the token on the host, loop step_batch.
    device_decode_steps = True

    @property
    def default_max_batch_tokens(self) -> int:
        """One pass: a step of prefill_chunk rows runs as one forward."""
        return self.prefill_chunk

    @property
    def default_decode_steps(self) -> int:
        """8 where decode_steps is one device job (an H100 gained 1-10% over one step a job), else 1."""
        return 8 if self.device_decode_steps else 1

    def __init__(
        self,
        source: ModelSource,
        device_index: int = 0,
        n_ctx: int = 4096,
        use_graphs: bool = True,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        int8_activations: Optional[bool] = None,
        max_num_seqs: int = defaults.DEFAULT_MAX_NUM_SEQS,
        kv_cache_memory: Optional[int] = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        prefix_cache: bool = True,
    ):
        """n_ctx: the longest sequence. max_num_seqs: sequences stepped
        together (one more, private, serves forward/step). kv_cache_memory:
        bytes of the KV pool; None sizes it from the free device memory
        (see the module docstring); either way it holds at least one
        sequence of n_ctx positions. block_size: positions per pool block
        (a power of two >= 16). prefix_cache: whether `blocks` shares cached
        prompt prefixes between sequences.

        int8_activations: decode matvecs over Q4_0/Q8_0/Q4_K/Q6_K weights may
        quantize their input to two int8 terms per element (the value and its
        residual, ~1e-6 relative error per product) and use integer dot
        products. None (default): where that is faster (large Q4_0 and Q8_0
        matrices); True: every such type; False: float math everywhere."""
        for name, v in (
            ("device_index", device_index),
            ("n_ctx", n_ctx),
            ("prefill_chunk", prefill_chunk),
            ("max_num_seqs", max_num_seqs),
            ("block_size", block_size),
        ):
            lo = 0 if name == "device_index" else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be a {'non-negative' if lo == 0 else 'positive'} integer, got {v!r}")
        check_block_size(block_size)
        if kv_cache_memory is not None and (
            not isinstance(kv_cache_memory, int) or isinstance(kv_cache_memory, bool) or kv_cache_memory < 1
        ):
            raise ValueError(f"kv_cache_memory must be a positive number of bytes or None, got {kv_cache_memory!r}")
        C = _native()
        cfg = source.config
        check_gpu_arch(cfg)
        self.config = cfg
        self.n_ctx = n_ctx
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk = pass_rows(prefill_chunk, n_ctx, max_num_seqs)
        self.device = f"cuda:{device_index}"
        self.device_index = device_index
        self._model = None
        self._init_sampling_state(C)

        per_block = _kv_bytes_per_block(cfg, block_size)
        num_blocks = budget_blocks(kv_cache_memory, per_block, n_ctx, block_size)
        need_blocks = -(-n_ctx // block_size)
        most_blocks = (2**31 - 1) // block_size

        # Starts the device's worker (the model handle below runs on it) and
        # refuses a GPU this build has no code for.
        from ..runtime import get_worker

        try:
            get_worker(device_index)
        except HelexaError:
            raise
        except Exception as e:
            raise DeviceError(f"cuda:{device_index}: {e}") from e

        spec = model_spec(
            C,
            source,
            n_ctx,
            use_graphs=use_graphs,
            prefill_chunk=prefill_chunk,
            int8_activations=int8_activations,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            num_blocks=num_blocks,
        )
        tensors = _host_tensors(source)
        try:
            self._model = C.GpuModelHandle(device_index, spec, tensors)
        except ValueError as e:
            raise ModelLoadError(f"cannot load the model on cuda:{device_index}: {e}") from e
        except HelexaError:
            raise
        except Exception as e:
            raise DeviceError(f"cuda:{device_index}: loading the model failed: {e}") from e
        if num_blocks == 0:
            try:
                num_blocks = self._size_pool(per_block, need_blocks, most_blocks)
            except BaseException:
                self.close()
                raise
        self.blocks = KVBlockManager(num_blocks, block_size, prefix_cache=bool(prefix_cache))
        self.load_seconds = float(self._model.load_seconds)
        self.device_bytes = int(self._call(self._model.memory)["total_bytes"])

    def _init_sampling_state(self, C) -> None:
        """The host-side sampling caches step_batch keeps (shared with the tensor-parallel backends)."""
        self._C = C
        # slot -> (SamplerState, prompt length, generated length) the device's
        # penalty state of that slot reflects.
        self._device_penalties_synced_to = {}
        # StepSampling per parameter set, reused while the parameters stay the
        # same (SeqInput copies it, so only the step counter is set per use).
        self._step_sampling_cache = {}
        self._no_penalty_update = C.PenaltyUpdate()
        self._no_penalty_update.active = False
        self._idle_step_sampling = C.StepSampling()

    def _pool_terms(self) -> tuple:
        """How _size_pool's errors speak of the memory: where, the unit of the sizes, what was loaded, what to do."""
        return str(self.device), "", "the weights", "a smaller n_ctx or model"

    def _size_pool(self, per_block: int, need_blocks: int, most_blocks: int) -> int:
        """Allocates the pool from the memory left after weights and scratch; returns its blocks."""
        m = self._model
        where, per, loaded, advice = self._pool_terms()
        free = int(self._call(m.memory)["device_free_bytes"])
        want = min(int(free * KV_FREE_FRACTION), per_block * need_blocks * self.max_num_seqs)
        num_blocks = min(want // per_block, most_blocks)
        if num_blocks < need_blocks:
            raise ModelLoadError(
                f"{where}: the KV cache for one sequence of n_ctx={self.n_ctx} positions needs "
                f"{need_blocks * per_block} bytes{per}; {free} bytes are free after loading {loaded} "
                f"(the cache may take {KV_FREE_FRACTION:.0%} of them): use {advice}"
            )
        try:
            m.allocate_kv(num_blocks)
        except Exception as e:
            raise ModelLoadError(
                f"{where}: allocating a KV cache of {num_blocks * per_block} bytes{per} failed: {e}"
            ) from e
        return num_blocks

    # ------------------------------------------------------------------ checks

    def _live(self):
        if self._model is None or self._model.closed:
            raise EngineClosedError("the CUDA backend was closed")
        return self._model

    def _token_ids(self, tokens, start_pos) -> list:
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.reshape(-1).tolist()
        ids = list(tokens)
        if not ids:
            raise ValueError("tokens must not be empty")
        if not isinstance(start_pos, int) or isinstance(start_pos, bool) or start_pos < 0:
            raise ValueError(f"start_pos must be a non-negative integer, got {start_pos!r}")
        end = start_pos + len(ids)
        if end > self.n_ctx:
            raise ContextLengthError(f"positions up to {end} exceed the context of {self.n_ctx} tokens")
        vocab = self.config.vocab_size
        for t in ids:
            if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not 0 <= int(t) < vocab:
                raise ValueError(f"token id {t!r} is outside the vocabulary (size {vocab})")
        return [int(t) for t in ids]

    def _call(self, fn, *args):
        """Run one job; device failures become DeviceError, bad input stays ValueError."""
        try:
            return fn(*args)
        except (HelexaError, ValueError):
            raise
        except Exception as e:
            raise DeviceError(f"{self.device}: {e}") from e

    # ------------------------------------------------------------------ sampling state

    def _step_sampling(self, params: SamplingParams, step: int):
        """The StepSampling job argument of params at `step` (one object per parameter set)."""
        key = (
            params.temperature,
            params.top_k,
            params.top_p,
            params.min_p,
            params.repetition_penalty,
            params.presence_penalty,
            params.frequency_penalty,
            params.seed,
            params.logprobs,
            params.top_logprobs,
        )
        sampling = self._step_sampling_cache.get(key)
        if sampling is not None:
            sampling.step = int(step)
            return sampling
        sampling = self._C.StepSampling()
        vocab = self.config.vocab_size
        sampling.temperature = float(params.temperature)
        sampling.top_k = int(params.top_k) if 0 < int(params.top_k) < vocab else 0
        sampling.top_p = float(params.top_p)
        sampling.min_p = float(params.min_p)
        sampling.repetition_penalty = float(params.repetition_penalty)
        sampling.presence_penalty = float(params.presence_penalty)
        sampling.frequency_penalty = float(params.frequency_penalty)
        sampling.seed = int(params.seed) & UINT64_MASK
        sampling.step = int(step)
        sampling.logprobs = bool(params.logprobs)
        sampling.top_logprobs = max(0, min(int(params.top_logprobs or 0), defaults.MAX_TOP_LOGPROBS))
        if len(self._step_sampling_cache) >= 256:
            self._step_sampling_cache.clear()
        self._step_sampling_cache[key] = sampling
        return sampling

    def _penalty_update(self, slot: int, params: SamplingParams, state: SamplerState):
        """Deltas that bring slot's device penalty state up to `state`, and the record once applied.

        A step without penalties sends nothing and keeps the slot's record.
        """
        active = params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        if not active:
            return self._no_penalty_update, self._device_penalties_synced_to.get(slot)
        pu = self._C.PenaltyUpdate()
        vocab = self.config.vocab_size
        prompt, gen = state.prompt_tokens, state.generated_tokens
        s = self._device_penalties_synced_to.get(slot)
        pu.active = True
        if s is not None and s[0] is state and s[1] == len(prompt) and s[2] <= len(gen):
            pu.reset = False
            pu.context = []
            pu.generated = [int(t) for t in gen[s[2] :] if 0 <= int(t) < vocab]
        else:
            pu.reset = True
            pu.context = [int(t) for t in prompt if 0 <= int(t) < vocab]
            pu.generated = [int(t) for t in gen if 0 <= int(t) < vocab]
        return pu, (state, len(prompt), len(gen))

    # ------------------------------------------------------------------ Backend API

    def step_batch(self, seqs: Sequence[SeqStep]) -> List[StepOutput]:
        """Run every sequence's tokens in one device step; sample where asked."""
        m = self._live()
        if not seqs:
            return []
        inputs, records = zip(*(self._seq_input(s) for s in seqs))
        out = self._call_synced(seqs, records, m.step_batch, list(inputs))
        results = []
        for s, (tok, lp, top, logits) in zip(seqs, out):
            res = None
            if s.sample:
                res = SampleResult(token=int(tok))
                if s.params.logprobs:
                    res.logprob = float(lp)
                    res.top_logprobs = [(int(t), float(v)) for t, v in (top or [])][: s.params.top_logprobs]
            results.append(StepOutput(result=res, logits=torch.from_numpy(logits) if logits is not None else None))
        return results

    def _seq_input(self, s: SeqStep):
        """The job input of one sequence's share of a step, and its penalty record (None: nothing sent)."""
        ids = self._token_ids(s.tokens, s.start_pos)
        allowed = bias_ids = bias_values = None
        if s.sample:
            if s.params is None or s.state is None:
                raise ValueError("a sequence that samples needs params and state")
            sampling = self._step_sampling(s.params, s.state.step)
            pu, record = self._penalty_update(s.slot, s.params, s.state)
            if s.allowed is not None or s.logit_bias is not None:
                allowed, bias_ids, bias_values = constraint_arrays(s, self.config.vocab_size)
        else:
            sampling, pu, record = self._idle_step_sampling, self._no_penalty_update, None
        inp = self._C.SeqInput(
            ids,
            s.start_pos,
            s.block_table,
            int(s.slot),
            bool(s.sample),
            sampling,
            pu,
            bool(s.want_logits),
            allowed,
            bias_ids,
            bias_values,
        )
        if s.sample and isinstance(s.allowed, LateMask):
            inp.late, inp.late_row = s.allowed.table, int(s.allowed.row)
        return inp, (record if pu.active else None)

    def _call_synced(self, seqs, records, fn, *args, counted: int = 0):
        """_call(fn, *args) for a job whose inputs carry the penalty updates `records` (_seq_input).

        Each updated slot's record is unknown while the job runs and set once it
        succeeded, `counted` tokens past its state (those the device counted itself).
        """
        for s, record in zip(seqs, records):
            if record is not None:
                self._device_penalties_synced_to.pop(s.slot, None)
        out = self._call(fn, *args)
        for s, record in zip(seqs, records):
            if record is not None:
                state, prompt, gen = record
                self._device_penalties_synced_to[s.slot] = (state, prompt, gen + counted)
        return out

    def decode_steps_ok(self, params: SamplingParams, logit_bias=None) -> bool:
        """Steps the device job runs: no logprobs or logit_bias (penalties are counted on the device)."""
        return not self.device_decode_steps or (not params.logprobs and logit_bias is None)

    def decode_steps(self, seqs: Sequence[SeqStep], n: int) -> List[List[SampleResult]]:
        """n decode steps as one device job (Backend.decode_steps); tensor-parallel subclasses loop step_batch."""
        if not self.device_decode_steps:
            return super().decode_steps(seqs, n)
        m = self._live()
        check_decode_steps_input(seqs, n)
        for s in seqs:
            if not self.decode_steps_ok(s.params, s.logit_bias):
                raise ValueError("logprobs and logit_bias need one decode step per job")
        inputs, records = zip(*(self._seq_input(s) for s in seqs))
        # The device counts all n tokens of each sequence in its penalty state (n_steps in [1, 64] is its check).
        out = self._call_synced(seqs, records, m.decode_steps, list(inputs), n, counted=n)
        return [[SampleResult(token=int(t)) for t in toks] for toks in out]

    def late_masks(self, words: int):
        """The device worker waits for these masks after the step's forward (Backend.late_masks)."""
        tables = self.__dict__.setdefault("_late_tables", {})  # mask words -> C.LateMasks
        t = tables.get(words)
        if t is None:
            t = tables[words] = self._C.LateMasks(self.max_num_seqs + 1, int(words))
        else:
            t.reset()
        return t

    def forward_paged(
        self, tokens: Sequence[int], start_pos: int, block_table: Sequence[int], all_logits: bool = False
    ) -> torch.Tensor:
        """One sequence's tokens through its block table; float32 CPU logits ([vocab] or [n, vocab])."""
        m = self._live()
        ids = self._token_ids(tokens, start_pos)
        out = self._call(m.forward_logits, ids, start_pos, list(block_table), bool(all_logits))
        return torch.from_numpy(out)

    def hidden_states(self, seqs: Sequence[Sequence[int]], pooling: Optional[str] = None) -> List[torch.Tensor]:
        """Final hidden states of each sequence (only the pooled row when `pooling` is given), computed on the device.

        Sequences run together while their tokens fit one prefill chunk (a
        longer one runs alone, in chunks), at most max_num_seqs + 1 per job,
        through KV blocks borrowed from the pool for the job; only the rows
        asked for come back. OutOfBlocks when the pool cannot hold a group now.
        """
        C = self._C
        mode = C.HiddenPooling.All
        if pooling is not None:
            mode = {"last": C.HiddenPooling.Last, "mean": C.HiddenPooling.Mean, "cls": C.HiddenPooling.First}[
                check_pooling(pooling)
            ]
        m = self._live()
        ids = [self._token_ids(s, 0) for s in seqs]
        out: List[Optional[torch.Tensor]] = [None] * len(ids)

        def run(group, tables):
            rows = self._call(m.hidden_states, [ids[j] for j in group], tables, mode)
            for j, r in zip(group, rows):
                out[j] = torch.from_numpy(r)

        with self.lock:
            self._in_borrowed_blocks([len(x) for x in ids], self.prefill_chunk, self.max_num_seqs + 1, run)
        return out

    def reset(self) -> None:
        """Forget the private sequence's cache and its penalty state record."""
        super().reset()
        self._device_penalties_synced_to.pop(self.max_num_seqs, None)

    def set_graphs(self, enabled: bool) -> None:
        """Turn CUDA-graph replay of decode steps on or off (the plain path gives the same tokens)."""
        m = self._live()
        self._call(m.set_graphs, bool(enabled))

    def is_healthy(self) -> bool:
        """False once the device worker is poisoned or shut down, or the backend closed."""
        m = self._model
        return m is not None and not m.closed and not m.poisoned and not m.shut_down

    def memory_info(self) -> dict:
        """Device bytes held by weights, KV pool and scratch, pool blocks in use, graph counters, device totals."""
        m = self._model
        if m is None or m.closed:
            return {}
        info = {"device": self.device}
        try:
            info.update(self._call(m.memory))
        except HelexaError:
            info["bytes"] = int(m.bytes)
        blocks = getattr(self, "blocks", None)
        if blocks is not None:
            info.update(blocks.stats())
        return info

    def synchronize(self) -> None:
        """Every call already waits for its job; nothing is left in flight."""

    def close(self) -> None:
        """Free the model and its cache on the worker thread."""
        m, self._model = self._model, None
        if m is not None:
            try:
                m.close()
            except Exception:
                # A poisoned or shut-down worker has already given up the memory.
                pass
