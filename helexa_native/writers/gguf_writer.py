"""Write llama-family and qwen3moe GGUF files (for tests and benchmarks) with `gguf.GGUFWriter`.

`write_gguf` takes float32 weights in torch order plus a type per tensor and
produces a file `load_source` reads back to the same config. `GGUFStream`
is the streaming form used for multi-GB synthetic models: metadata and
tensor infos first, then each tensor's bytes as they are produced.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from ..config import ModelConfig
from ..ggml_types import BLOCK_SIZES, row_bytes
from ..loaders.gguf_loader import GGUF_ROPE_STYLE
from ..loaders.gguf_tokenizer import TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNUSED
from ..loaders.validate import ROPE_FREQS
from ..tokenizer import BYTE_TO_CHAR

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# MoE router weights: kept F32 by llama.cpp's quantizer, and here.
ROUTER_SUFFIX = "ffn_gate_inp.weight"

# Special tokens of the minimal vocabulary, at ids 0, 1, 2.
MINIMAL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def minimal_tokenizer_meta(vocab_size: int) -> dict:
    """A small valid byte-level BPE vocabulary padded to `vocab_size` (gguf `tokenizer.ggml.*` fields).

    Ids 0-2 are <|endoftext|>, <|im_start|>, <|im_end|> (eos); then the 256
    byte tokens, a few merges of common letter pairs, and unused fillers.
    """
    chars = [BYTE_TO_CHAR[b] for b in range(256)]
    tokens = list(MINIMAL_SPECIALS) + chars
    types = [TOKEN_CONTROL] * len(MINIMAL_SPECIALS) + [TOKEN_NORMAL] * 256
    if vocab_size < len(tokens):
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level vocabulary (needs {len(tokens)})")
    merges = []
    alphabet = [chars[ord(" ")]] + list("etaoinshrdlu")
    seen = set(tokens)
    for a in alphabet:
        for b in alphabet:
            if len(tokens) >= vocab_size:
                break
            if a + b not in seen:
                merges.append(f"{a} {b}")
                tokens.append(a + b)
                types.append(TOKEN_NORMAL)
                seen.add(a + b)
    i = 0
    while len(tokens) < vocab_size:
        tokens.append(f"<|unused_{i}|>")
        types.append(TOKEN_UNUSED)
        i += 1
    return {
        "model": "gpt2",
        "pre": "gpt2",
        "tokens": tokens,
        "token_type": types,
        "merges": merges,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "padding_token_id": 0,
        "unknown_token_id": 0,
        "add_bos_token": False,
        "add_eos_token": False,
    }


def llama3_freq_factors(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """Per-frequency divisors (GGUF `rope_freqs.weight`) equivalent to HF's llama3 rope scaling."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    orig = float(scaling.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
    # smooth = 1: high frequency, untouched; 0: low frequency, divided by factor.
    scale = (1 - smooth) / factor + smooth
    return (1.0 / scale).astype(np.float32)


def _qk_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # Rows of each head go from [first halves..., second halves...] to
    # interleaved pairs, so adjacent-pair rotation equals HF's rotate_half.
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _qk_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def hf_to_gguf_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q or k projection rows (or bias) from HF layout to llama GGUF layout."""
    return _qk_permute(np.asarray(w), n_head)


def gguf_to_hf_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `hf_to_gguf_qk`."""
    return _qk_unpermute(np.asarray(w), n_head)


def _ggml_type(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


def _add_value(w, key: str, v) -> None:
    if isinstance(v, bool):
        w.add_bool(key, v)
    elif isinstance(v, int):
        w.add_uint32(key, v) if v >= 0 else w.add_int32(key, v)
    elif isinstance(v, float):
        w.add_float32(key, v)
    elif isinstance(v, str):
        w.add_string(key, v)
    elif isinstance(v, (list, tuple)):
        if len(v):
            w.add_array(key, list(v))
    else:
        raise ValueError(f"metadata {key}: cannot write a {type(v).__name__}")


class GGUFStream:
    """Writes a GGUF file tensor by tensor: declare all tensors, then feed their bytes in order."""

    def __init__(
        self,
        path: Union[str, os.PathLike],
        config: ModelConfig,
        *,
        tokenizer_meta: Optional[dict] = None,
        chat_template: Optional[str] = None,
        file_type: Optional[int] = None,
        sampling: Optional[dict] = None,
    ) -> None:
        from gguf import GGUFWriter

        self.path = Path(path)
        self.config = config
        self._w = GGUFWriter(self.path, config.arch)
        self._order = []
        self._started = False
        w, a, c = self._w, config.arch, config
        if c.name:
            w.add_name(c.name)
        w.add_uint32(f"{a}.context_length", c.max_position_embeddings)
        w.add_uint32(f"{a}.embedding_length", c.hidden_size)
        w.add_uint32(f"{a}.feed_forward_length", c.intermediate_size)
        w.add_uint32(f"{a}.block_count", c.num_layers)
        w.add_uint32(f"{a}.attention.head_count", c.num_heads)
        w.add_uint32(f"{a}.attention.head_count_kv", c.num_kv_heads)
        w.add_uint32(f"{a}.attention.key_length", c.head_dim)
        w.add_uint32(f"{a}.attention.value_length", c.head_dim)
        w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
        w.add_float32(f"{a}.rope.freq_base", c.rope_theta)
        w.add_uint32(f"{a}.rope.dimension_count", c.head_dim)
        w.add_uint32(f"{a}.vocab_size", c.vocab_size)
        if c.num_experts:
            w.add_uint32(f"{a}.expert_count", c.num_experts)
            w.add_uint32(f"{a}.expert_used_count", c.num_experts_per_tok)
            w.add_uint32(f"{a}.expert_feed_forward_length", c.moe_intermediate_size)
            w.add_bool(f"{a}.expert_weights_norm", bool(c.norm_topk_prob))
        rs = c.rope_scaling or {}
        if rs.get("type") == "linear":
            w.add_string(f"{a}.rope.scaling.type", "linear")
            w.add_float32(f"{a}.rope.scaling.factor", float(rs["factor"]))
            if "original_max_position_embeddings" in rs:
                w.add_uint32(f"{a}.rope.scaling.original_context_length", int(rs["original_max_position_embeddings"]))
        if file_type is not None:
            w.add_uint32("general.file_type", file_type)
        for k, v in (sampling or {}).items():  # general.sampling.temp, top_k, top_p, ...
            if k == "top_k":
                w.add_int32(f"general.sampling.{k}", int(v))
            else:
                w.add_float32(f"general.sampling.{k}", float(v))
        w.add_uint32("general.quantization_version", 2)
        if tokenizer_meta is None:
            tokenizer_meta = minimal_tokenizer_meta(c.vocab_size)
            if chat_template is None:
                chat_template = CHATML_TEMPLATE
        for k, v in tokenizer_meta.items():
            _add_value(w, f"tokenizer.ggml.{k}", v)
        if chat_template is not None:
            w.add_string("tokenizer.chat_template", chat_template)

    def declare(self, name: str, shape: tuple, qtype: str) -> int:
        """Announce a tensor (torch-order shape, type name); returns its byte size."""
        if qtype not in BLOCK_SIZES:
            raise ValueError(f"tensor {name}: unsupported type {qtype!r}")
        shape = tuple(int(s) for s in shape)
        rb = row_bytes(qtype, shape[-1])
        n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        byte_shape = (*shape[:-1], rb)
        nbytes = n_rows * rb
        self._w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=_ggml_type(qtype))
        self._order.append((name, nbytes))
        return nbytes

    def write(self, name: str, data: np.ndarray) -> None:
        """Write the next declared tensor's bytes (any dtype; its raw bytes are written)."""
        if not self._started:
            self._w.write_header_to_file()
            self._w.write_kv_data_to_file()
            self._w.write_ti_data_to_file()
            self._started = True
        want, nbytes = self._order.pop(0)
        if want != name:
            raise ValueError(f"tensor {name} written out of order (expected {want})")
        buf = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if buf.nbytes != nbytes:
            raise ValueError(f"tensor {name}: {buf.nbytes} bytes given, {nbytes} declared")
        self._w.write_tensor_data(buf)

    def close(self) -> int:
        """Finish the file; returns its size in bytes."""
        if self._order:
            raise ValueError(f"{len(self._order)} declared tensors were never written ({self._order[0][0]}...)")
        if not self._started:
            self._w.write_header_to_file()
            self._w.write_kv_data_to_file()
            self._w.write_ti_data_to_file()
            self._started = True
        self._w.close()
        return self.path.stat().st_size

    def abort(self) -> None:
        """Close and delete a partly written file."""
        try:
            self._w.close()
        finally:
            self.path.unlink(missing_ok=True)


def encode(x: np.ndarray, qtype: str) -> np.ndarray:
    """float32 array in torch order -> the bytes GGUF stores for `qtype`."""
    x = np.asarray(x, dtype=np.float32)
    if qtype == "F32":
        return np.ascontiguousarray(x)
    if qtype == "F16":
        return x.astype(np.float16)
    if qtype == "BF16":
        # round to nearest even on the top 16 bits
        u = np.ascontiguousarray(x).view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.astype(np.uint16)
    from .quantize import quantize

    return quantize(x, qtype)


def tensor_order(config: ModelConfig, names: Iterable[str]) -> list:
    """Names sorted as llama.cpp writes them: embedding, layers in order, then output."""

    def key(n: str):
        if n.startswith("blk."):
            return (1, int(n.split(".")[1]), n)
        return (0 if n in ("token_embd.weight", ROPE_FREQS) else 2, 0, n)

    return sorted(names, key=key)


def write_gguf(
    path: Union[str, os.PathLike],
    config: ModelConfig,
    tensors: dict,
    types: Union[str, dict] = "F32",
    *,
    tokenizer_meta: Optional[dict] = None,
    chat_template: Optional[str] = None,
    raw_tensors: Optional[dict] = None,
    hf_qk_permute: bool = False,
    progress: Optional[bool] = False,
) -> Path:
    """Write a GGUF model file from float32 weights (torch order, canonical names).

    `types` is one type for every 2-D and 3-D weight or a dict name -> type
    (missing names are F32); 1-D tensors (norms, biases, rope_freqs) are
    always F32, and so are MoE routers (ffn_gate_inp) unless the dict names
    them, as llama.cpp keeps them. Stacked expert tensors [E, rows, cols]
    are quantized row by row, each expert's rows after the previous one's.
    `raw_tensors` maps names to already-encoded (uint8 bytes, type, shape).
    With `hf_qk_permute` (arch llama only) q/k rows are reordered from HF's
    rotate-half layout as llama.cpp's converter does; without it a llama
    config must already say rope_style "pairs" (qwen: "half"). When `tokenizer_meta`
    is None a minimal byte-level vocabulary and a ChatML template are written.
    """
    from ..progress import track

    raw_tensors = dict(raw_tensors or {})
    tensors = dict(tensors)
    if hf_qk_permute and config.arch != "llama":
        raise ValueError("hf_qk_permute applies to arch llama only")
    # The loader infers the rope style from the arch; weights laid out for
    # the other style would load silently wrong.
    file_style = GGUF_ROPE_STYLE.get(config.arch)
    given_style = "pairs" if hf_qk_permute else config.rope_style
    if file_style is not None and given_style != file_style:
        hint = " (pass hf_qk_permute=True for HF-layout weights)" if config.arch == "llama" else ""
        raise ValueError(
            f"arch {config.arch} GGUFs use rope_style {file_style!r}, "
            f"but the weights are laid out for {config.rope_style!r}{hint}"
        )
    if hf_qk_permute:
        for name in list(tensors):
            if name.endswith(("attn_q.weight", "attn_q.bias")):
                tensors[name] = hf_to_gguf_qk(tensors[name], config.num_heads)
            elif name.endswith(("attn_k.weight", "attn_k.bias")):
                tensors[name] = hf_to_gguf_qk(tensors[name], config.num_kv_heads)
    rs = config.rope_scaling or {}
    if rs.get("type") == "llama3" and ROPE_FREQS not in tensors and ROPE_FREQS not in raw_tensors:
        tensors[ROPE_FREQS] = llama3_freq_factors(config.head_dim, config.rope_theta, rs)
    if rs.get("type") == "freq_factors" and ROPE_FREQS not in tensors and ROPE_FREQS not in raw_tensors:
        raise ValueError("rope_scaling freq_factors needs a rope_freqs.weight tensor")
    both = set(tensors) & set(raw_tensors)
    if both:
        raise ValueError(f"tensor {sorted(both)[0]} given both as float and raw")

    def type_of(name: str, shape) -> str:
        if len(shape) < 2:
            return "F32"
        if isinstance(types, str):
            t = "F32" if name.endswith(ROUTER_SUFFIX) else types
        else:
            t = types.get(name, "F32")
        if t not in BLOCK_SIZES:
            raise ValueError(f"tensor {name}: unsupported type {t!r}")
        return t

    stream = GGUFStream(path, config, tokenizer_meta=tokenizer_meta, chat_template=chat_template)
    try:
        plan = []
        for name in tensor_order(config, list(tensors) + list(raw_tensors)):
            if name in raw_tensors:
                data, qtype, shape = raw_tensors[name]
                plan.append((name, None, data))
            else:
                arr = np.asarray(tensors[name], dtype=np.float32)
                shape, qtype = arr.shape, type_of(name, arr.shape)
                plan.append((name, qtype, arr))
            stream.declare(name, tuple(shape), qtype)
        for name, qtype, arr in track(plan, "Writing GGUF", progress=progress):
            stream.write(name, arr if qtype is None else encode(arr, qtype))
        stream.close()
    except BaseException:
        stream.abort()
        raise
    return Path(path)
