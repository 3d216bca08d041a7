"""Model loaders: a GGUF file or an HF safetensors folder -> ModelSource."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from ..config import ModelSource
from ..errors import ModelLoadError
from .dequant import dequantize
from .gguf_loader import is_gguf, load_gguf
from .safetensors_loader import is_hf_folder, load_safetensors

__all__ = ["load_source", "describe", "dequantize", "active_params", "active_bytes"]

# Stacked expert tensors: a token reads num_experts_per_tok of their num_experts slices.
_EXPERT_SUFFIXES = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")


def load_source(path: Union[str, os.PathLike], progress: Optional[bool] = None) -> ModelSource:
    """Open a model (GGUF file or HF folder with config.json) as a ModelSource.

    Tensor data stays memory-mapped until `ModelSource.close()`. Raises
    ModelLoadError (UnsupportedModelError for unknown architectures) naming
    the path on any bad input.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file or directory")
    # A file inside an HF folder (config.json, a weights shard, the index) means the folder.
    if p.is_file() and (p.suffix == ".safetensors" or p.name.endswith(".json")) and is_hf_folder(p.parent):
        p = p.parent
    if p.is_dir():
        if is_hf_folder(p):
            return load_safetensors(p, progress=progress)
        raise ModelLoadError(f"{p}: folder has no config.json (expected a Hugging Face model folder)")
    if is_gguf(p):
        return load_gguf(p, progress=progress)
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"{p}: cannot read ({e})") from e
    raise ModelLoadError(f"{p}: not a GGUF file (magic {head!r}, expected b'GGUF') and not a Hugging Face model folder")


def active_params(config, tensors) -> int:
    """Parameters one token's forward uses: every tensor's, but only the routed share of the experts.

    A stacked expert tensor counts num_experts_per_tok / num_experts of its
    size; the router, attention, norms, embedding table and output head
    count whole (as model cards count "active" parameters). Equals the total
    for dense models. `tensors` are RawTensors (anything with a `shape`).
    """
    n = 0
    for t in tensors:
        size = 1
        for s in t.shape:
            size *= int(s)
        if config.num_experts and t.name.endswith(_EXPERT_SUFFIXES):
            size = size // config.num_experts * config.num_experts_per_tok
        n += size
    return n


def active_bytes(config, tensors) -> int:
    """Stored bytes one decode token's forward reads, counted as active_params counts parameters.

    Every tensor's bytes, but only num_experts_per_tok / num_experts of a
    stacked expert tensor's (the routed experts' slices). Equals the total
    for dense models. `tensors` are RawTensors (anything with `name` and `nbytes`).
    """
    n = 0
    for t in tensors:
        size = int(t.nbytes)
        if config.num_experts and t.name.endswith(_EXPERT_SUFFIXES):
            size = size // config.num_experts * config.num_experts_per_tok
        n += size
    return n


def describe(source: ModelSource) -> dict:
    """Facts about a loaded model for `helexa-native info`: arch, dims, params, quant mix."""
    cfg = source.config
    types: dict = {}
    params = 0
    for t in source.tensors.values():
        n = 1
        for s in t.shape:
            n *= int(s)
        params += n
        e = types.setdefault(t.dtype, {"count": 0, "bytes": 0, "params": 0})
        e["count"] += 1
        e["bytes"] += t.nbytes if t.data is not None else 0
        e["params"] += n
    tensor_bytes = sum(e["bytes"] for e in types.values())
    moe = {}
    if cfg.num_experts:
        moe = {
            "num_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "norm_topk_prob": cfg.norm_topk_prob,
            "mlp_only_layers": list(cfg.mlp_only_layers),
            "active_params": active_params(cfg, source.tensors.values()),
        }
    return {
        "path": str(source.path),
        "format": source.format,
        "name": cfg.name,
        "arch": cfg.arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_style": cfg.rope_style,
        "rope_scaling": cfg.rope_scaling,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "qk_norm": cfg.qk_norm,
        "context_length": cfg.max_position_embeddings,
        "params": params,
        **moe,
        "tensor_types": dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"])),
        "tensor_bytes": tensor_bytes,
        "bits_per_weight": 8.0 * tensor_bytes / params if params else 0.0,
        "file_size": source.metadata.get("file_size"),
        "files": len(source.metadata.get("files") or []) or None,
        "chat_template": source.chat_template is not None,
        "tokenizer": source.tokenizer.kind,
        "bos_token_id": source.bos_token_id,
        "eos_token_ids": list(source.eos_token_ids),
    }
