"""The CUDA backend: a model resident on one device worker, driven by jobs.

Weights go to the device once, in their stored form (GGUF blocks or
bf16/fp16/fp32 arrays); norms and biases are converted to float32 here. A
step runs on the worker thread and returns only the sampled token (and
logprobs when asked): the device sampler follows params.py's order with the
same (seed, step) random stream as the host sampler, and the repetition /
presence / frequency state lives on the device, refreshed by deltas.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .. import defaults
from ..config import ModelSource
from ..errors import (ContextLengthError, DeviceError, EngineClosedError,
                      HelexaError, ModelLoadError, UnsupportedModelError)
from ..ggml_types import GGML_TYPE_IDS
from ..params import UINT64_MASK, SampleResult, SamplerState, SamplingParams
from ..rope import inv_freq
from .base import Backend

# Architectures the GPU model runs: a subset of config.SUPPORTED_ARCHS, kept
# apart because the CPU reference supports more (qwen3moe has no GPU
# expert kernels yet).
GPU_ARCHS = ("llama", "qwen2", "qwen3")

# Tokens per prefill pass: bounds activation scratch; GEMMs stay large
# enough to run near tensor-core peak.
DEFAULT_PREFILL_CHUNK = 512

_MATRIX_SUFFIXES = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                    "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


def _native():
    try:
        from .. import _C
    except ImportError as e:
        raise DeviceError(f"the helexa_native extension failed to import: {e}") from e
    if not getattr(_C, "cuda", False) or not getattr(_C, "has_gpu_model", False):
        raise DeviceError("this build of helexa_native has no CUDA support "
                          "(install a CUDA build, or use device='cpu')")
    return _C


def _is_vector(name: str) -> bool:
    return name.endswith("_norm.weight") or name.endswith(".bias")


def _is_matrix(name: str) -> bool:
    if name in ("token_embd.weight", "output.weight"):
        return True
    return name.startswith("blk.") and name.endswith(_MATRIX_SUFFIXES)


def _host_tensors(source: ModelSource) -> list:
    """(name, ggml_type, shape, buffer) for every tensor the GPU model reads."""
    out = []
    for name, t in source.tensors.items():
        if _is_vector(name):
            try:
                v = t.to_float()
            except Exception as e:
                raise ModelLoadError(f"cannot read tensor {name} ({t.dtype}): {e}") from e
            arr = np.ascontiguousarray(torch.as_tensor(v).detach().to("cpu", torch.float32).reshape(-1).numpy())
            out.append((name, 0, [int(arr.size)], arr))
        elif _is_matrix(name):
            tid = GGML_TYPE_IDS.get(str(t.dtype).upper())
            if tid is None:
                raise UnsupportedModelError(f"tensor {name} has type {t.dtype}, which the CUDA backend "
                                            f"does not run (supported: {', '.join(GGML_TYPE_IDS)})")
            data = t.data
            if isinstance(data, torch.Tensor):
                data = data.detach().cpu().contiguous().numpy()
            arr = np.ascontiguousarray(data)
            out.append((name, tid, [int(s) for s in t.shape], arr))
    return out


def _freq_factors(source: ModelSource):
    t = source.tensors.get("rope_freqs.weight")
    return None if t is None else t.to_float()


class CUDABackend(Backend):
    """A model on one CUDA device, run by its device worker."""

    def __init__(self, source: ModelSource, device_index: int = 0, n_ctx: int = 4096,
                 use_graphs: bool = True, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 int8_activations: Optional[bool] = None):
        """int8_activations: decode matvecs over Q4_0/Q8_0/Q4_K/Q6_K weights may
        quantize their input to two int8 terms per element (the value and its
        residual, ~1e-6 relative error per product) and use integer dot
        products. None (default): where that is faster (large Q4_0 and Q8_0
        matrices); True: every such type; False: float math everywhere."""
        if not isinstance(device_index, int) or isinstance(device_index, bool) or device_index < 0:
            raise ValueError(f"device_index must be a non-negative integer, got {device_index!r}")
        if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        if not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        C = _native()
        cfg = source.config
        if cfg.arch not in GPU_ARCHS:
            raise UnsupportedModelError(f"architecture {cfg.arch!r} is not supported by the CUDA backend "
                                        f"(GPU architectures: {', '.join(GPU_ARCHS)}); run it with "
                                        "device='cpu'")
        if cfg.num_heads % cfg.num_kv_heads:
            raise UnsupportedModelError(f"num_heads {cfg.num_heads} is not a multiple of "
                                        f"num_kv_heads {cfg.num_kv_heads}")
        self.config = cfg
        self.n_ctx = n_ctx
        self.device = f"cuda:{device_index}"
        self.device_index = device_index
        self._C = C
        self._model = None
        self.n_filled = 0
        # (SamplerState, prompt length, generated length) the device's penalty
        # state was last brought up to; None when unknown (reset next time).
        self._device_penalties_synced_to = None
        # Per-step objects reused while the parameters stay the same: a decode
        # step then only sets the step counter (jobs run one at a time and the
        # worker reads these only during the call).
        self._step_sampling_cache = None
        self._no_penalty_update = C.PenaltyUpdate()
        self._no_penalty_update.active = False

        # Starts the device's worker (the model handle below runs on it) and
        # refuses a GPU this build has no code for.
        from ..runtime import get_worker
        try:
            get_worker(device_index)
        except HelexaError:
            raise
        except Exception as e:
            raise DeviceError(f"cuda:{device_index}: {e}") from e

        spec = C.ModelSpec()
        spec.arch = cfg.arch
        spec.vocab = int(cfg.vocab_size)
        spec.hidden = int(cfg.hidden_size)
        spec.intermediate = int(cfg.intermediate_size)
        spec.layers = int(cfg.num_layers)
        spec.heads = int(cfg.num_heads)
        spec.kv_heads = int(cfg.num_kv_heads)
        spec.head_dim = int(cfg.head_dim)
        spec.eps = float(cfg.rms_norm_eps)
        spec.rope_style = cfg.rope_style
        spec.qk_norm = bool(cfg.qk_norm)
        spec.inv_freq = [float(x) for x in inv_freq(cfg, _freq_factors(source)).to(torch.float64).tolist()]
        spec.n_ctx = int(n_ctx)
        spec.prefill_chunk = int(min(prefill_chunk, n_ctx))
        spec.use_graphs = bool(use_graphs)
        spec.int8_activations = {None: C.Int8Mode.Auto, False: C.Int8Mode.Never,
                                 True: C.Int8Mode.Always}[int8_activations]
        tensors = _host_tensors(source)
        try:
            self._model = C.GpuModelHandle(device_index, spec, tensors)
        except ValueError as e:
            raise ModelLoadError(f"cannot load the model on cuda:{device_index}: {e}") from e
        except HelexaError:
            raise
        except Exception as e:
            raise DeviceError(f"cuda:{device_index}: loading the model failed: {e}") from e
        self.load_seconds = float(self._model.load_seconds)
        self.device_bytes = int(self._model.bytes)

    # ------------------------------------------------------------------ checks

    def _live(self):
        if self._model is None or self._model.closed:
            raise EngineClosedError("the CUDA backend was closed")
        return self._model

    def _check(self, tokens, start_pos: int) -> list:
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
        if start_pos > self.n_filled:
            raise ValueError(f"start_pos {start_pos} leaves a gap: only {self.n_filled} positions are cached")
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
        """The StepSampling job argument of params at `step`."""
        key = (params.temperature, params.top_k, params.top_p, params.min_p, params.repetition_penalty,
               params.presence_penalty, params.frequency_penalty, params.seed, params.logprobs,
               params.top_logprobs)
        cached = self._step_sampling_cache
        if cached is not None and cached[0] == key:
            sampling = cached[1]
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
        self._step_sampling_cache = (key, sampling)
        return sampling

    def _penalty_update(self, params: SamplingParams, state: SamplerState):
        """Deltas that bring the device's penalty state up to `state`."""
        active = (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
                  or params.frequency_penalty != 0.0)
        if not active:
            return self._no_penalty_update, self._device_penalties_synced_to
        pu = self._C.PenaltyUpdate()
        vocab = self.config.vocab_size
        prompt, gen = state.prompt_tokens, state.generated_tokens
        s = self._device_penalties_synced_to
        pu.active = True
        if s is not None and s[0] is state and s[1] == len(prompt) and s[2] <= len(gen):
            pu.reset = False
            pu.context = []
            pu.generated = [int(t) for t in gen[s[2]:] if 0 <= int(t) < vocab]
        else:
            pu.reset = True
            pu.context = [int(t) for t in prompt if 0 <= int(t) < vocab]
            pu.generated = [int(t) for t in gen if 0 <= int(t) < vocab]
        return pu, (state, len(prompt), len(gen))

    # ------------------------------------------------------------------ Backend API

    def reset(self) -> None:
        """Forget the KV cache contents and the penalty state (the allocation stays)."""
        m = self._live()
        self._call(m.clear_kv)
        self.n_filled = 0
        self._device_penalties_synced_to = None

    def forward(self, tokens: Sequence[int], start_pos: int, all_logits: bool = False) -> torch.Tensor:
        """Run tokens at positions start_pos.., append to the KV cache, return float32 CPU logits."""
        m = self._live()
        ids = self._check(tokens, start_pos)
        self.n_filled = min(self.n_filled, start_pos)
        out = self._call(m.forward_logits, ids, start_pos, bool(all_logits))
        self.n_filled = start_pos + len(ids)
        return torch.from_numpy(out)

    def step(self, tokens: Sequence[int], start_pos: int, params: SamplingParams,
             state: SamplerState) -> SampleResult:
        """Forward `tokens` and sample the next token on the device."""
        return self.step_with_logits(tokens, start_pos, params, state, want_logits=False)[0]

    def step_with_logits(self, tokens: Sequence[int], start_pos: int, params: SamplingParams,
                         state: SamplerState, want_logits: bool = True) -> Tuple[SampleResult, Optional[torch.Tensor]]:
        """step() that also returns the raw logits it sampled from ([vocab], float32 CPU)."""
        m = self._live()
        ids = self._check(tokens, start_pos)
        sampling = self._step_sampling(params, state.step)
        pu, synced = self._penalty_update(params, state)
        self.n_filled = min(self.n_filled, start_pos)
        self._device_penalties_synced_to = None   # unknown until the job succeeds
        if len(ids) == 1:
            tok, lp, top, logits = self._call(m.decode, ids[0], start_pos, sampling, pu, bool(want_logits))
        else:
            tok, lp, top, logits = self._call(m.prefill, ids, start_pos, sampling, pu, bool(want_logits))
        self._device_penalties_synced_to = synced
        self.n_filled = start_pos + len(ids)
        res = SampleResult(token=int(tok))
        if params.logprobs:
            res.logprob = float(lp)
            res.top_logprobs = [(int(t), float(v)) for t, v in (top or [])][:params.top_logprobs]
        return res, (torch.from_numpy(logits) if logits is not None else None)

    def set_graphs(self, enabled: bool) -> None:
        """Turn CUDA-graph replay of decode steps on or off (the plain path gives the same tokens)."""
        m = self._live()
        self._call(m.set_graphs, bool(enabled))

    def is_healthy(self) -> bool:
        """False once the device worker is poisoned or shut down, or the backend closed."""
        m = self._model
        return m is not None and not m.closed and not m.poisoned and not m.shut_down

    def memory_info(self) -> dict:
        """Device bytes held by weights, KV cache and scratch, graph counters, device totals."""
        m = self._model
        if m is None or m.closed:
            return {}
        info = {"device": self.device}
        try:
            info.update(self._call(m.memory))
        except HelexaError:
            info["bytes"] = int(m.bytes)
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
