"""GGUF files -> ModelSource, tensor data memory-mapped.

The header (key/values, tensor infos) is parsed here with struct over the
map; the `gguf` package's reader does the same job but builds a numpy
object per vocabulary string, which costs seconds on large vocabularies.
Tensor data stays in the file's map: a RawTensor's `data` is a numpy view
(uint8 rows of blocks, or float32/float16/uint16 for plain types). GGUF
lists dimensions fastest-first (ne0 = row length); shapes here are torch
order, so a linear weight of ne = [k, n] becomes [n, k].

A model split into parts (llama.cpp's gguf-split: NAME-00001-of-0000N.gguf,
`split.no` / `split.count` / `split.tensors.count` in every part, the
model's key/values in the first) loads from any one of its parts: every
part is mapped and its tensors are views of its own map.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any, List, Optional

import numpy as np

from ..config import MOE_ARCHS, SUPPORTED_ARCHS, ModelConfig, ModelSource, RawTensor, TokenizerSource
from ..errors import ModelLoadError, UnsupportedModelError
from ..ggml_types import BLOCK_SIZES, GGML_TYPE_NAMES
from ..progress import track
from .dequant import dequantize_raw
from .validate import ROPE_FREQS, check_dimensions, check_moe_config, check_tensors, expected_shapes

GGUF_MAGIC = b"GGUF"

# Rope layout each architecture's converter produces: llama's permutes q/k
# rows so adjacent pairs rotate together; qwen's keep HF's half split.
GGUF_ROPE_STYLE = {"llama": "pairs", "qwen2": "half", "qwen3": "half", "qwen3moe": "half"}
_DEFAULT_EPS = {"llama": 1e-5, "qwen2": 1e-6, "qwen3": 1e-6, "qwen3moe": 1e-6}


def is_gguf(path: Path) -> bool:
    """True when `path` is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _type_name(type_id: int) -> str:
    if type_id in GGML_TYPE_NAMES:
        return GGML_TYPE_NAMES[type_id]
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(type_id).name
    except (ImportError, ValueError):
        return f"unknown type id {type_id}"


class _Meta:
    """Typed access to GGUF key/value fields with errors that name the file."""

    def __init__(self, fields: dict, where: str) -> None:
        self.fields = fields
        self.where = where

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def number(self, key: str, default: Any = None, kind=int) -> Any:
        v = self.fields.get(key, default)
        if v is None:
            raise ModelLoadError(f"{self.where}: metadata field {key} is missing")
        if isinstance(v, (bool, str, list)):
            raise ModelLoadError(f"{self.where}: metadata field {key} is not a number: {v!r}")
        try:
            if kind is float:
                # GGUF stores float32: read 1e-05, not 9.999999747378752e-06.
                return float(str(np.float32(v)))
            return kind(v)
        except (TypeError, ValueError, OverflowError) as e:
            raise ModelLoadError(f"{self.where}: metadata field {key} is not a number: {v!r}") from e


def _raw_tensor(info, data_start: int, mm, where: str) -> RawTensor:
    name, type_id, ne, offset = info
    qtype = _type_name(type_id)
    if qtype not in BLOCK_SIZES:
        raise ModelLoadError(
            f"{where}: tensor {name} has type {qtype}, which is not supported (supported: {', '.join(BLOCK_SIZES)})"
        )
    shape = tuple(int(d) for d in reversed(ne))
    be, bb = BLOCK_SIZES[qtype]
    n = int(np.prod(shape)) if shape else 1
    if ne and ne[0] % be:
        raise ModelLoadError(f"{where}: tensor {name} rows of {ne[0]} are not whole {qtype} blocks")
    nbytes = n // be * bb
    a = data_start + int(offset)
    if a + nbytes > mm.shape[0]:
        raise ModelLoadError(f"{where}: tensor {name} data runs past the end of the file (truncated?)")
    raw = mm[a : a + nbytes]
    if qtype == "F32":
        data = raw.view(np.float32).reshape(shape)
    elif qtype == "F16":
        data = raw.view(np.float16).reshape(shape)
    elif qtype == "BF16":
        data = raw.view(np.uint16).reshape(shape)
    elif len(shape) > 2:
        # Stacked experts: [experts, rows, row bytes], one expert's rows contiguous.
        data = raw.reshape(*shape[:-1], ne[0] // be * bb)
    else:
        rows = n // ne[0] if ne else 1
        data = raw.reshape(rows, ne[0] // be * bb)
    return RawTensor(name=name, shape=shape, dtype=qtype, data=data, dequantize=dequantize_raw)


def _rope_scaling(meta: _Meta, arch: str, has_freqs: bool, where: str) -> Optional[dict]:
    if has_freqs:
        return {"type": "freq_factors"}
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind is None and meta.get(f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", meta.get(f"{arch}.rope.scale_linear")
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        out = {"type": "linear", "factor": float(factor)}
        orig = meta.get(f"{arch}.rope.scaling.original_context_length")
        if orig is not None:
            out["original_max_position_embeddings"] = int(orig)
        return out
    raise UnsupportedModelError(
        f"{where}: rope scaling type {kind!r} is not supported (none, linear, llama3 frequency factors)"
    )


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP_SCALAR = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32


class _Header:
    """Parser of the GGUF header (key/values and tensor infos) over a map.

    String arrays (vocabularies, merges) hold hundreds of thousands of
    entries; reading them with struct over one buffer keeps loading fast.
    """

    def __init__(self, buf, where: str) -> None:
        self.buf = buf
        self.pos = 0
        self.where = where

    def scalar(self, fmt: str):
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise struct.error("string runs past the end of the file")
        s = str(self.buf[self.pos : self.pos + n], "utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.scalar("<I")
            count = self.scalar("<Q")
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            if etype not in _NP_SCALAR:
                raise ValueError(f"unknown array element type {etype}")
            dt = np.dtype(_NP_SCALAR[etype])
            end = self.pos + count * dt.itemsize
            if end > len(self.buf):
                raise struct.error("array runs past the end of the file")
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
            self.pos = end
            return arr.tolist()
        if vtype not in _SCALAR:
            raise ValueError(f"unknown value type {vtype}")
        return self.scalar(_SCALAR[vtype])


def read_gguf(path: Path):
    """Parse a GGUF file: (fields dict, tensor infos list, data start, the uint8 map).

    Each tensor info is (name, ggml type id, ne list fastest-first, offset
    relative to the data start). Raises ModelLoadError naming the file.
    """
    where = str(path)
    try:
        size = path.stat().st_size
        if size < 24:
            raise ModelLoadError(f"{where}: file is too short ({size} bytes) to be a GGUF model")
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as e:
        raise ModelLoadError(f"{where}: cannot read ({e})") from e
    # struct and slicing on a plain memoryview: cheap per string, unlike
    # numpy slices of the memmap; released before returning so the map
    # can be closed.
    view = memoryview(mm)
    try:
        h = _Header(view, where)
        if bytes(mm[:4]) != GGUF_MAGIC:
            raise ModelLoadError(f"{where}: not a GGUF file (bad magic {bytes(mm[:4])!r})")
        h.pos = 4
        version = h.scalar("<I")
        if version not in (2, 3):
            raise ModelLoadError(f"{where}: GGUF version {version} is not supported (2, 3)")
        n_tensors = h.scalar("<Q")
        n_kv = h.scalar("<Q")
        if n_tensors > size or n_kv > size:
            raise ModelLoadError(f"{where}: corrupt GGUF header (tensor count {n_tensors}, key count {n_kv})")
        fields = {}
        for _ in range(n_kv):
            key = h.string()
            fields[key] = h.value(h.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = h.string()
            n_dims = h.scalar("<I")
            if n_dims > 8:
                raise ModelLoadError(f"{where}: tensor {name} has {n_dims} dimensions")
            ne = [h.scalar("<Q") for _ in range(n_dims)]
            ttype = h.scalar("<I")
            offset = h.scalar("<Q")
            infos.append((name, ttype, ne, offset))
        align = fields.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ModelLoadError(f"{where}: bad general.alignment {align!r}")
        data_start = (h.pos + align - 1) // align * align
    except ModelLoadError:
        view.release()
        _close_map_array(mm)
        raise
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        view.release()
        _close_map_array(mm)
        raise ModelLoadError(f"{where}: corrupt or truncated GGUF header ({e})") from e
    view.release()
    return fields, infos, data_start, mm


def _close_map_array(mm) -> None:
    m = getattr(mm, "_mmap", None)
    if m is not None:
        try:
            m.close()
        except (BufferError, ValueError):
            # Views of the map are still alive somewhere; it closes when they go.
            pass


def load_gguf(path: Path, progress: Optional[bool] = None) -> ModelSource:
    """Read a GGUF file, or every part of a split one, into a ModelSource (tensor data stays memory-mapped)."""
    path = Path(path)
    opened = {}  # file name -> (file, key/values, tensor infos, data start, map); closed on an error
    try:
        opened[path.name] = (path, *read_gguf(path))
        paths = _split_paths(path, opened[path.name][1])
        if paths is None:
            parts = [opened[path.name]]
        else:
            for i, p in enumerate(paths):
                if p.name not in opened:
                    if not p.is_file():
                        raise ModelLoadError(f"{path}: part {i + 1} of {len(paths)} of this split GGUF is missing: {p}")
                    opened[p.name] = (p, *read_gguf(p))
            parts = [opened[p.name] for p in paths]
            _check_parts(parts, path)
        return _build_source(parts[0][1], [part[:1] + part[2:] for part in parts], parts[0][0], progress)
    except BaseException:
        for part in opened.values():
            _close_map_array(part[4])
        raise


_SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def _split_paths(path: Path, fields: dict) -> Optional[List[Path]]:
    """The files of a split model, first part first; None for a whole one."""
    count = fields.get("split.count")
    if count is None:
        return None
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ModelLoadError(f"{path}: bad split.count {count!r}")
    if count == 1:
        return None
    m = _SPLIT_NAME.match(path.name)
    if m is None or int(m["count"]) != count:
        raise ModelLoadError(
            f"{path}: this is one of {count} parts of a split GGUF, but its name does not follow "
            f"NAME-00001-of-{count:05d}.gguf, so the other parts cannot be found"
        )
    return [path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def _check_parts(parts: list, given: Path) -> None:
    """Each part's split.no and split.count agree with its name, and the parts hold every tensor."""
    count = len(parts)
    for i, (p, fields, *_) in enumerate(parts):
        no, n = fields.get("split.no"), fields.get("split.count")
        if n != count or no != i:
            raise ModelLoadError(
                f"{given}: its part {p.name} holds split.no {no!r} of split.count {n!r}, "
                f"expected {i} of {count} (from its name)"
            )
    total = sum(len(part[2]) for part in parts)
    want = parts[0][1].get("split.tensors.count")
    if want is not None and want != total:
        raise ModelLoadError(f"{given}: split.tensors.count is {want!r}, but the {count} parts hold {total} tensors")


def _build_source(fields, parts: list, path: Path, progress: Optional[bool]) -> ModelSource:
    """The model of `fields` (the first part's key/values) over `parts`: (file, tensor infos, data start, map)."""
    where = str(path)
    meta = _Meta(fields, where)
    arch = meta.get("general.architecture")
    if arch is None:
        raise ModelLoadError(f"{where}: metadata field general.architecture is missing")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"{where}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )

    by_name = {}  # name -> (tensor info, data start, map, file) of the part holding it
    for part_path, infos, data_start, mm in parts:
        for info in infos:
            if info[0] in by_name:
                raise ModelLoadError(f"{part_path}: tensor {info[0]} appears twice")
            by_name[info[0]] = (info, data_start, mm, str(part_path))
    if "token_embd.weight" not in by_name:
        raise ModelLoadError(f"{where}: missing tensors token_embd.weight")
    emb_ne = by_name["token_embd.weight"][0][2]
    hidden = meta.number(f"{arch}.embedding_length")
    heads = meta.number(f"{arch}.attention.head_count")
    if heads <= 0 or hidden <= 0:
        raise ModelLoadError(f"{where}: bad dimensions (embedding_length={hidden}, head_count={heads})")
    head_dim = meta.number(f"{arch}.attention.key_length", hidden // heads)
    if arch not in MOE_ARCHS and meta.get(f"{arch}.expert_count"):
        raise UnsupportedModelError(
            f"{where}: mixture-of-experts {arch} models are not supported "
            f"(supported MoE architectures: {', '.join(MOE_ARCHS)})"
        )
    rope_dims = meta.get(f"{arch}.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise UnsupportedModelError(
            f"{where}: partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported"
        )
    cfg = ModelConfig(
        arch=arch,
        vocab_size=int(emb_ne[1]) if len(emb_ne) == 2 else 0,
        hidden_size=hidden,
        intermediate_size=meta.number(f"{arch}.feed_forward_length", 0 if arch in MOE_ARCHS else None),
        num_layers=meta.number(f"{arch}.block_count"),
        num_heads=heads,
        num_kv_heads=meta.number(f"{arch}.attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=meta.number(f"{arch}.attention.layer_norm_rms_epsilon", _DEFAULT_EPS[arch], float),
        rope_theta=meta.number(f"{arch}.rope.freq_base", 10000.0, float),
        rope_style=GGUF_ROPE_STYLE[arch],
        rope_scaling=_rope_scaling(meta, arch, ROPE_FREQS in by_name, where),
        max_position_embeddings=meta.number(f"{arch}.context_length", 4096),
        tie_word_embeddings="output.weight" not in by_name,
        attention_bias="blk.0.attn_q.bias" in by_name,
        qk_norm="blk.0.attn_q_norm.weight" in by_name,
        name=str(meta.get("general.name", "") or ""),
        **(_moe_fields(meta, arch, by_name, where) if arch in MOE_ARCHS else {}),
    )
    check_dimensions(
        cfg,
        where,
        {
            "vocab_size": "token_embd.weight's rows",
            "hidden_size": f"{arch}.embedding_length",
            "intermediate_size": f"{arch}.feed_forward_length",
            "num_layers": f"{arch}.block_count",
            "head_dim": f"{arch}.attention.key_length",
            "rms_norm_eps": f"{arch}.attention.layer_norm_rms_epsilon",
            "rope_theta": f"{arch}.rope.freq_base",
            "max_position_embeddings": f"{arch}.context_length",
        },
    )
    if cfg.num_kv_heads <= 0 or cfg.num_heads % cfg.num_kv_heads:
        raise ModelLoadError(
            f"{where}: head_count {cfg.num_heads} is not a multiple of head_count_kv {cfg.num_kv_heads}"
        )
    if arch in MOE_ARCHS:
        check_moe_config(
            cfg,
            where,
            {
                "num_experts": f"{arch}.expert_count",
                "num_experts_per_tok": f"{arch}.expert_used_count",
                "moe_intermediate_size": f"{arch}.expert_feed_forward_length",
                "mlp_only_layers": "dense layers (no blk.N.ffn_gate_inp.weight)",
                "intermediate_size": f"{arch}.feed_forward_length",
            },
        )

    want = [n for n in expected_shapes(cfg) if n in by_name]
    raw = {n: _raw_tensor(*by_name[n]) for n in track(want, "Mapping tensors", progress=progress)}
    kept = check_tensors(raw, cfg, where)

    prefix = "tokenizer.ggml."
    tok = {k[len(prefix) :]: v for k, v in fields.items() if k.startswith(prefix)}
    eos = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        v = tok.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v not in eos:
            eos.append(v)
    for v in tok.get("eos_token_ids", []) or []:
        if isinstance(v, int) and v not in eos:
            eos.append(v)
    bos = tok.get("bos_token_id")
    template = meta.get("tokenizer.chat_template")

    metadata = {
        "files": [str(part[0]) for part in parts],
        "file_size": sum(int(part[3].shape[0]) for part in parts),
        "context_length": cfg.max_position_embeddings,
        "file_type": meta.get("general.file_type"),
        "ignored_tensors": sorted(set(by_name) - set(kept)),
    }
    pooling = _POOLING_TYPES.get(meta.get(f"{arch}.pooling_type"))
    if pooling is not None:
        metadata["pooling"] = pooling
    src = ModelSource(
        path=path,
        format="gguf",
        config=cfg,
        tensors=kept,
        tokenizer=TokenizerSource(kind="gguf", gguf_meta=tok),
        chat_template=template if isinstance(template, str) else None,
        generation_config=_generation_config(meta),
        bos_token_id=bos if isinstance(bos, int) and not isinstance(bos, bool) else None,
        eos_token_ids=eos,
        metadata=metadata,
    )
    src._closers.append(_closer(src, [part[3] for part in parts]))
    return src


def _moe_fields(meta: _Meta, arch: str, by_name: dict, where: str) -> dict:
    """ModelConfig's expert fields from `{arch}.expert_*` metadata and the layers' tensors.

    llama.cpp always renormalizes qwen3moe's top-k weights, so a file
    without `{arch}.expert_weights_norm` means True. A layer is dense when
    it holds ffn_gate.weight and no router.
    """
    norm = meta.get(f"{arch}.expert_weights_norm", True)
    if not isinstance(norm, bool):
        raise ModelLoadError(f"{where}: metadata field {arch}.expert_weights_norm is not a boolean: {norm!r}")
    n_layers = meta.number(f"{arch}.block_count")
    dense = tuple(
        i
        for i in range(n_layers)
        if f"blk.{i}.ffn_gate_inp.weight" not in by_name and f"blk.{i}.ffn_gate.weight" in by_name
    )
    return dict(
        num_experts=meta.number(f"{arch}.expert_count"),
        num_experts_per_tok=meta.number(f"{arch}.expert_used_count"),
        moe_intermediate_size=meta.number(f"{arch}.expert_feed_forward_length"),
        norm_topk_prob=norm,
        mlp_only_layers=dense,
    )


# llama.cpp's LLAMA_POOLING_TYPE_* values, as embedding GGUFs record them.
_POOLING_TYPES = {0: "none", 1: "mean", 2: "cls", 3: "last"}


# Sampling defaults some GGUFs carry (general.sampling.*), in HF generation_config names.
_SAMPLING_KEYS = {
    "temp": ("temperature", float),
    "top_k": ("top_k", int),
    "top_p": ("top_p", float),
    "min_p": ("min_p", float),
    "penalty_repeat": ("repetition_penalty", float),
}


def _generation_config(meta: _Meta) -> dict:
    out = {}
    for key, (name, kind) in _SAMPLING_KEYS.items():
        full = f"general.sampling.{key}"
        if isinstance(meta.get(full), (int, float)) and not isinstance(meta.get(full), bool):
            out[name] = meta.number(full, kind=kind)
    return out


def _closer(src: ModelSource, maps: list):
    def close() -> None:
        for t in src.tensors.values():
            t.data = None
        for mm in maps:
            _close_map_array(mm)

    return close
