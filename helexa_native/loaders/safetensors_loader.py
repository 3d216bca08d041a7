"""Hugging Face folders (config.json + safetensors) -> ModelSource.

Each .safetensors file is an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets}}, then the raw tensor bytes. The
file is memory-mapped once and every tensor is a numpy view into it, so no
weight is copied at load time; bf16 stays uint16 bits (numpy has no bf16).
HF names map onto GGUF's canonical names; HF checkpoints keep q/k rows in
rotate-half order, hence rope_style "half" for every architecture. A MoE
checkpoint's per-expert matrices (model.layers.N.mlp.experts.E.*_proj) become
one stacked tensor per layer and kind, as GGUF stores them, without copying:
its `data` is a `StackedArray` of the experts' mapped views.
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
from .validate import check_dimensions, check_moe_config, check_tensors

# model_type -> arch; the architectures list must agree.
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe"}
_ARCH_CLASSES = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
}

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
    "mlp.gate.weight": "ffn_gate_inp.weight",
}
# Per-expert projection -> the canonical name of its layer's stacked tensor.
_EXPERT_NAMES = {
    "gate_proj.weight": "ffn_gate_exps.weight",
    "up_proj.weight": "ffn_up_exps.weight",
    "down_proj.weight": "ffn_down_exps.weight",
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


def expert_name(hf_name: str) -> Optional[tuple]:
    """(stacked canonical name, expert index) for a per-expert HF tensor name, else None."""
    parts = hf_name.split(".", 6)
    if (
        len(parts) == 7
        and parts[:2] == ["model", "layers"]
        and parts[2].isdigit()
        and parts[3:5] == ["mlp", "experts"]
        and parts[5].isdigit()
    ):
        sub = _EXPERT_NAMES.get(parts[6])
        if sub is not None:
            return f"blk.{int(parts[2])}.{sub}", int(parts[5])
    return None


class StackedArray:
    """Equal arrays (one per expert) seen as one array with a leading expert axis.

    The parts stay views into their files' maps; `np.asarray` stacks them
    into one new array only when a consumer asks for it. `parts[e]` is
    expert e's [rows, cols] view.
    """

    def __init__(self, parts: list) -> None:
        self.parts = list(parts)
        self.dtype = self.parts[0].dtype
        self.shape = (len(self.parts), *self.parts[0].shape)
        self.ndim = len(self.shape)
        self.nbytes = sum(int(p.nbytes) for p in self.parts)

    def __len__(self) -> int:
        return len(self.parts)

    def __array__(self, dtype=None, copy=None):
        out = np.stack(self.parts)
        return out if dtype is None else out.astype(dtype, copy=False)


def _stack_experts(experts: dict, where: str) -> dict:
    """Canonical name -> RawTensor of its experts stacked in index order."""
    out = {}
    for name, by_index in experts.items():
        n = max(by_index) + 1
        for e in range(n):
            if e not in by_index:
                layer, kind = name.split(".")[1], name.split(".")[2].split("_")[1]
                raise ModelLoadError(
                    f"{where}: missing tensor model.layers.{layer}.mlp.experts.{e}."
                    f"{kind}_proj.weight (needed for {name})"
                )
        parts = [by_index[e] for e in range(n)]
        first = parts[0]
        for e, t in enumerate(parts):
            if t.dtype != first.dtype or tuple(t.shape) != tuple(first.shape):
                raise ModelLoadError(
                    f"{where}: expert {e} of {name} is {t.dtype} {list(t.shape)}, "
                    f"expert 0 is {first.dtype} {list(first.shape)}"
                )
        data = StackedArray([t.data for t in parts])
        out[name] = RawTensor(name=name, shape=data.shape, dtype=first.dtype, data=data, dequantize=dequantize_raw)
    return out


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
            return {
                "type": "llama3",
                "factor": float(rs["factor"]),
                "low_freq_factor": float(rs["low_freq_factor"]),
                "high_freq_factor": float(rs["high_freq_factor"]),
                "original_max_position_embeddings": int(rs["original_max_position_embeddings"]),
            }
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{where}: rope_scaling {rs!r} is incomplete ({e})") from e
    raise UnsupportedModelError(f"{where}: rope scaling type {kind!r} is not supported (linear, llama3)")


def config_from_hf(hf: dict, where: str) -> ModelConfig:
    """ModelConfig from a parsed HF config.json; `where` names the file in errors."""
    if not isinstance(hf, dict):
        raise ModelLoadError(f"{where}: expected a JSON object")
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ModelLoadError(f"{where}: field architectures must be a list of class names, got {archs!r}")
    if not isinstance(model_type, str):
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is not supported (supported: {', '.join(sorted(_MODEL_TYPES))})"
        )
    if model_type not in _MODEL_TYPES or (archs and not set(archs) & _ARCH_CLASSES):
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} / architectures {archs} is not supported "
            f"(supported: {', '.join(sorted(_ARCH_CLASSES))})"
        )
    arch = _MODEL_TYPES[model_type]

    def num(key, kind=int, default=None):
        v = hf.get(key)
        if v is None:
            v = default
        if v is None:
            raise ModelLoadError(f"{where}: field {key} is missing")
        if isinstance(v, (bool, str)):
            raise ModelLoadError(f"{where}: field {key} is not a number: {v!r}")
        if kind is int and isinstance(v, float) and not v.is_integer():
            raise ModelLoadError(f"{where}: field {key} is not an integer: {v!r}")
        try:
            out = kind(v)
        except (TypeError, ValueError, OverflowError) as e:
            raise ModelLoadError(f"{where}: field {key} is not a number: {v!r}") from e
        return out

    if hf.get("mlp_bias"):
        raise UnsupportedModelError(f"{where}: mlp_bias is not supported")
    hidden = num("hidden_size")
    heads = num("num_attention_heads")
    kv_heads = num("num_key_value_heads", int, heads)
    if hidden <= 0 or heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise ModelLoadError(f"{where}: bad head counts (num_attention_heads={heads}, num_key_value_heads={kv_heads})")
    head_dim = num("head_dim") if hf.get("head_dim") else hidden // heads
    params = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    theta = num("rope_theta", float, params.get("rope_theta", 10000.0))
    # transformers 5 writes the expert count as num_local_experts.
    experts_key = "num_local_experts" if "num_experts" not in hf and "num_local_experts" in hf else "num_experts"
    moe = _moe_fields(hf, num, where, experts_key) if arch == "qwen3moe" else {}
    cfg = ModelConfig(
        arch=arch,
        vocab_size=num("vocab_size"),
        hidden_size=hidden,
        intermediate_size=num("intermediate_size", int, 0 if moe else None),
        num_layers=num("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=num("rms_norm_eps", float, 1e-6),
        rope_theta=theta,
        rope_style="half",
        rope_scaling=_rope_scaling(hf, where),
        max_position_embeddings=num("max_position_embeddings", int, 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
        qk_norm=arch in ("qwen3", "qwen3moe"),
        name=str(hf.get("_name_or_path", "") or ""),
        **moe,
    )
    check_dimensions(
        cfg,
        where,
        {
            "vocab_size": "vocab_size",
            "hidden_size": "hidden_size",
            "intermediate_size": "intermediate_size",
            "num_layers": "num_hidden_layers",
            "head_dim": "head_dim",
            "rms_norm_eps": "rms_norm_eps",
            "rope_theta": "rope_theta",
            "max_position_embeddings": "max_position_embeddings",
        },
    )
    if moe:
        check_moe_config(
            cfg,
            where,
            {
                "num_experts": experts_key,
                "num_experts_per_tok": "num_experts_per_tok",
                "moe_intermediate_size": "moe_intermediate_size",
                "mlp_only_layers": "mlp_only_layers",
                "intermediate_size": "intermediate_size",
            },
        )
    return cfg


def _moe_fields(hf: dict, num, where: str, experts_key: str) -> dict:
    """ModelConfig's expert fields from a Qwen3-MoE config.json.

    A layer is dense when listed in mlp_only_layers or when its number + 1
    is not a multiple of decoder_sparse_step (transformers' rule).
    norm_topk_prob defaults to False, as in transformers.
    """
    n_layers = num("num_hidden_layers")
    step = num("decoder_sparse_step", int, 1)
    if step < 1:
        raise ModelLoadError(f"{where}: field decoder_sparse_step must be at least 1, got {step}")
    only = hf.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise ModelLoadError(f"{where}: field mlp_only_layers must be a list of layer numbers, got {only!r}")
    norm = hf.get("norm_topk_prob", False)
    if not isinstance(norm, bool):
        raise ModelLoadError(f"{where}: field norm_topk_prob must be true or false, got {norm!r}")
    dense = set(only) | {i for i in range(n_layers) if (i + 1) % step}
    return dict(
        num_experts=num(experts_key),
        num_experts_per_tok=num("num_experts_per_tok"),
        moe_intermediate_size=num("moe_intermediate_size"),
        norm_topk_prob=norm,
        mlp_only_layers=tuple(sorted(dense)),
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
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ModelLoadError(f"{self.path}: bad header entry for {name}: {info!r}") from e
        if any(d < 0 for d in shape):
            raise ModelLoadError(f"{self.path}: bad header entry for {name}: negative shape {list(shape)}")
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise ModelLoadError(
                f"{self.path}: tensor {name} has dtype {dtype}, which is not supported (F32, F16, BF16)"
            )
        np_dtype, kind = _ST_DTYPES[dtype]
        nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
        a, b = self.data_start + start, self.data_start + end
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


def _st_pooling(folder: Path) -> Optional[str]:
    """The pooling a sentence-transformers folder names in 1_Pooling/config.json ("last", "mean", "cls")."""
    p = folder / "1_Pooling" / "config.json"
    if not p.is_file():
        return None
    try:
        cfg = _read_json(p, "the pooling config")
    except ModelLoadError:
        return None
    if not isinstance(cfg, dict):
        return None
    for key, name in (
        ("pooling_mode_lasttoken", "last"),
        ("pooling_mode_mean_tokens", "mean"),
        ("pooling_mode_cls_token", "cls"),
    ):
        if cfg.get(key) is True:
            return name
    return None


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
        tensors, experts = {}, {}
        for p in track(_weight_files(folder), "Mapping weights", progress=progress):
            mf = _MappedFile(p)
            files.append(mf)
            for hf_name in mf.header:
                name = canonical_name(hf_name)
                if name is None:
                    stacked = expert_name(hf_name) if cfg.num_experts else None
                    if stacked is not None:
                        by_index = experts.setdefault(stacked[0], {})
                        if stacked[1] in by_index:
                            raise ModelLoadError(f"{p}: tensor {hf_name} appears in more than one file")
                        by_index[stacked[1]] = mf.tensor(hf_name)
                    continue
                if name in tensors:
                    raise ModelLoadError(f"{p}: tensor {hf_name} appears in more than one file")
                tensors[name] = mf.tensor(hf_name)
        tensors.update(_stack_experts(experts, str(folder)))
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
        path=folder,
        format="safetensors",
        config=cfg,
        tensors=kept,
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
    pooling = _st_pooling(folder)
    if pooling is not None:
        src.metadata["pooling"] = pooling

    def close() -> None:
        for t in src.tensors.values():
            t.data = None
        for mf in files:
            mf.close()

    src._closers.append(close)
    return src
