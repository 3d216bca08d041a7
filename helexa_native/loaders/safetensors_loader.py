"""Hugging Face folders (config.json + safetensors) -> ModelSource.

Each .safetensors file is an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets}}, then the raw tensor bytes. The
file is memory-mapped once and every tensor is a numpy view into it, so no
weight is copied at load time; bf16 stays uint16 bits (numpy has no bf16).
HF names map onto GGUF's canonical names; HF checkpoints keep q/k rows in
rotate-half order, hence rope_style "half" for every architecture.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import ModelConfig, ModelSource, RawTensor, TokenizerSource
from ..errors import ModelLoadError, UnsupportedModelError
from ..progress import track
from .dequant import dequantize_raw
from .validate import check_tensors

# model_type -> arch; the architectures list must agree.
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_ARCH_CLASSES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}

_ST_DTYPES = {"F32": (np.float32, "F32"), "F16": (np.float16, "F16"), "BF16": (np.uint16, "BF16")}

_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def canonical_name(hf_name: str) -> Optional[str]:
    """GGUF-style name for an HF checkpoint tensor name, or None if unused."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        sub = _LAYER_NAMES.get(parts[3])
        if sub is not None:
            return f"blk.{int(parts[2])}.{sub}"
    return None


def is_hf_folder(path: Path) -> bool:
    """True when `path` is a directory holding config.json."""
    return path.is_dir() and (path / "config.json").is_file()


def _read_json(path: Path, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read {what} ({e})") from e


def _rope_scaling(hf: dict, where: str) -> Optional[dict]:
    rs = hf.get("rope_scaling")
    params = hf.get("rope_parameters")
    if rs is None and isinstance(params, dict):
        rs = params
    if not rs:
        return None
    if not isinstance(rs, dict):
        raise ModelLoadError(f"{where}: rope_scaling must be an object, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    try:
        if kind == "linear":
            return {"type": "linear", "factor": float(rs["factor"])}
        if kind == "llama3":
            return {"type": "llama3", "factor": float(rs["factor"]),
                    "low_freq_factor": float(rs["low_freq_factor"]),
                    "high_freq_factor": float(rs["high_freq_factor"]),
                    "original_max_position_embeddings": int(rs["original_max_position_embeddings"])}
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{where}: rope_scaling {rs!r} is incomplete ({e})") from e
    raise UnsupportedModelError(f"{where}: rope scaling type {kind!r} is not supported (linear, llama3)")


def config_from_hf(hf: dict, where: str) -> ModelConfig:
    """ModelConfig from a parsed HF config.json; `where` names the file in errors."""
    if not isinstance(hf, dict):
        raise ModelLoadError(f"{where}: expected a JSON object")
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type not in _MODEL_TYPES or (archs and not set(archs) & _ARCH_CLASSES):
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} / architectures {archs} is not supported "
            f"(supported: {', '.join(sorted(_ARCH_CLASSES))})")
    arch = _MODEL_TYPES[model_type]

    def num(key, kind=int, default=None):
        v = hf.get(key)
        if v is None:
            v = default
        if v is None:
            raise ModelLoadError(f"{where}: field {key} is missing")
        try:
            out = kind(v)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{where}: field {key} is not a number: {v!r}") from e
        return out

    if hf.get("mlp_bias"):
        raise UnsupportedModelError(f"{where}: mlp_bias is not supported")
    hidden = num("hidden_size")
    heads = num("num_attention_heads")
    kv_heads = num("num_key_value_heads", int, heads)
    if hidden <= 0 or heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise ModelLoadError(f"{where}: bad head counts (num_attention_heads={heads}, num_key_value_heads={kv_heads})")
    head_dim = hf.get("head_dim")
    head_dim = int(head_dim) if head_dim else hidden // heads
    params = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    return ModelConfig(
        arch=arch,
        vocab_size=num("vocab_size"),
        hidden_size=hidden,
        intermediate_size=num("intermediate_size"),
        num_layers=num("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=num("rms_norm_eps", float, 1e-6),
        rope_theta=float(theta),
        rope_style="half",
        rope_scaling=_rope_scaling(hf, where),
        max_position_embeddings=num("max_position_embeddings", int, 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
        qk_norm=arch == "qwen3",
        name=str(hf.get("_name_or_path", "") or ""),
    )


class _MappedFile:
    """One memory-mapped .safetensors file and its parsed header."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ModelLoadError(f"{path}: too short to be a safetensors file")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100 << 20:
                    raise ModelLoadError(f"{path}: bad safetensors header length {n} (file is {size} bytes)")
                header = json.loads(f.read(n).decode("utf-8"))
        except OSError as e:
            raise ModelLoadError(f"{path}: cannot read ({e})") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{path}: safetensors header is not valid JSON ({e})") from e
        if not isinstance(header, dict):
            raise ModelLoadError(f"{path}: safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + n
        self.size = size
        self.map = np.memmap(path, dtype=np.uint8, mode="r") if size > self.data_start else np.zeros(0, np.uint8)

    def tensor(self, name: str) -> RawTensor:
        info = self.header[name]
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{self.path}: bad header entry for {name}") from e
        if dtype not in _ST_DTYPES:
            raise ModelLoadError(f"{self.path}: tensor {name} has dtype {dtype}, which is not supported (F32, F16, BF16)")
        np_dtype, kind = _ST_DTYPES[dtype]
        nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
        a, b = self.data_start + int(start), self.data_start + int(end)
        if b - a != nbytes or a < self.data_start:
            raise ModelLoadError(f"{self.path}: tensor {name} spans {b - a} bytes, shape {list(shape)} needs {nbytes}")
        if b > self.size:
            raise ModelLoadError(f"{self.path}: tensor {name} runs past the end of the file (truncated?)")
        data = self.map[a:b].view(np_dtype).reshape(shape)
        return RawTensor(name=name, shape=shape, dtype=kind, data=data, dequantize=dequantize_raw)

    def close(self) -> None:
        mm = getattr(self.map, "_mmap", None)
        self.map = None
        if mm is not None:
            try:
                mm.close()
            except (BufferError, ValueError):
                pass


def _weight_files(folder: Path) -> list:
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        idx = _read_json(index, "the safetensors index")
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise ModelLoadError(f"{index}: weight_map is missing or empty")
        files = []
        for fname in wm.values():
            if fname not in files:
                files.append(fname)
        out = []
        for fname in files:
            p = folder / fname
            if not p.is_file():
                raise ModelLoadError(f"{index}: shard {fname} is listed but missing")
            out.append(p)
        return out
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    raise ModelLoadError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _chat_template(folder: Path, tok_cfg: dict) -> Optional[str]:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{jinja}: cannot read ({e})") from e
    t = tok_cfg.get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) else None


def _ids(v) -> list:
    if isinstance(v, bool):
        return []
    if isinstance(v, int):
        return [v]
    if isinstance(v, list):
        return [int(x) for x in v if isinstance(x, int) and not isinstance(x, bool)]
    return []


def load_safetensors(folder: Path, progress: Optional[bool] = None) -> ModelSource:
    """Read an HF model folder into a ModelSource (weights stay memory-mapped)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    hf = _read_json(cfg_path, "config.json")
    cfg = config_from_hf(hf, str(cfg_path))

    gen_path = folder / "generation_config.json"
    gen = _read_json(gen_path, "generation_config.json") if gen_path.is_file() else {}
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = _read_json(tok_cfg_path, "tokenizer_config.json") if tok_cfg_path.is_file() else {}
    if not isinstance(gen, dict):
        raise ModelLoadError(f"{gen_path}: expected a JSON object")
    if not isinstance(tok_cfg, dict):
        raise ModelLoadError(f"{tok_cfg_path}: expected a JSON object")

    files = []
    try:
        tensors = {}
        for p in track(_weight_files(folder), "Mapping weights", progress=progress):
            mf = _MappedFile(p)
            files.append(mf)
            for hf_name in mf.header:
                name = canonical_name(hf_name)
                if name is None:
                    continue
                if name in tensors:
                    raise ModelLoadError(f"{p}: tensor {hf_name} appears in more than one file")
                tensors[name] = mf.tensor(hf_name)
        if cfg.tie_word_embeddings:
            tensors.pop("output.weight", None)
        kept = check_tensors(tensors, cfg, str(folder))
    except BaseException:
        for mf in files:
            mf.close()
        raise

    eos = _ids(gen.get("eos_token_id")) or _ids(hf.get("eos_token_id"))
    bos = _ids(gen.get("bos_token_id")) or _ids(hf.get("bos_token_id"))
    src = ModelSource(
        path=folder, format="safetensors", config=cfg, tensors=kept,
        tokenizer=TokenizerSource(kind="hf", hf_dir=folder),
        chat_template=_chat_template(folder, tok_cfg),
        generation_config=gen,
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=eos,
        metadata={
            "files": [str(mf.path) for mf in files],
            "file_size": sum(mf.size for mf in files),
            "context_length": cfg.max_position_embeddings,
            "torch_dtype": hf.get("torch_dtype", hf.get("dtype")),
            "sliding_window": hf.get("sliding_window") if hf.get("use_sliding_window", True) else None,
        },
    )

    def close() -> None:
        for t in src.tensors.values():
            t.data = None
        for mf in files:
            mf.close()
    src._closers.append(close)
    return src
