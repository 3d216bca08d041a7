"""Which slice of each weight a tensor-parallel rank holds, and cutting it out of a loader's tensor.

Megatron-style splits of a llama-family decoder over N ranks:
  - column-parallel (rows of the [out, in] weight): attn_q, attn_k, attn_v
    (and their biases) by whole heads, ffn_gate and ffn_up by rows of the
    intermediate size. Each rank computes its heads / its slice of the MLP
    from the full hidden state, with no communication.
  - row-parallel (columns): attn_output by the same query heads, ffn_down by
    the same intermediate rows. Each rank's product is a partial sum of the
    hidden state; the ranks add theirs (one all-reduce after attn_output,
    one after ffn_down), and a row-parallel bias is added once, after the sum.
  - output.weight (the LM head), lm_head="vocab" (the CPU path): by
    vocabulary rows: each rank computes the logits of its slice of the
    vocabulary and the leader concatenates them, so sampling sees exactly the
    logits of the unsplit model. A tied model's head is the embedding, and
    the rank uses its vocabulary slice of it. lm_head="replicated" (the GPU
    path) leaves it whole: the device sampler, its penalty state and the
    decode graph stay one rank's, with no gather of [rows, vocab] logits
    (512 KB a row at a 128K vocabulary, against 16 KB for a hidden-state
    all-reduce); only rank 0 loads and runs it (backends decide who).
  - replicated: token_embd (a row lookup costs nothing, and splitting it would
    add a collective before the first layer), every norm, q/k norms and
    rope_freqs.

Query heads must divide evenly by N. Key/value heads are split when
num_kv_heads is a multiple of N; otherwise each rank holds the kv heads its
own query heads read (one head per rank when N is a multiple of
num_kv_heads), so a kv head is replicated on several ranks.

A row split never cuts a quantized block (a GGUF row is whole blocks); a
column split of a quantized tensor must fall on block boundaries, else
ShardingError names the tensor and the block size. `shard_tensor` slices
the loader's numpy view (memory-mapped for both formats): a rank's shard
is a view of the file, and only its bytes are ever read.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

from ..config import ModelConfig, RawTensor
from ..errors import ShardingError, UnsupportedModelError
from ..ggml_types import BLOCK_SIZES, FLOAT_TYPES

# Architectures whose decoder the plan describes: dense llama-family blocks.
SHARDABLE_ARCHS = ("llama", "qwen2", "qwen3")

ROWS, COLUMNS = "rows", "columns"

# Per-layer tensor suffix -> (direction, the dimension whose slice it takes).
_LAYER_SPLITS = {
    "attn_q.weight": (ROWS, "q"),
    "attn_q.bias": (ROWS, "q"),
    "attn_k.weight": (ROWS, "kv"),
    "attn_k.bias": (ROWS, "kv"),
    "attn_v.weight": (ROWS, "kv"),
    "attn_v.bias": (ROWS, "kv"),
    "attn_output.weight": (COLUMNS, "q"),
    "ffn_gate.weight": (ROWS, "ffn"),
    "ffn_up.weight": (ROWS, "ffn"),
    "ffn_down.weight": (COLUMNS, "ffn"),
}
_GLOBAL_SPLITS = {"output.weight": (ROWS, "vocab")}

# Where the LM head lives: split by vocabulary, or whole (see the module docstring).
LM_HEAD_LAYOUTS = ("vocab", "replicated")


@dataclass(frozen=True)
class TensorSplit:
    """How one tensor is cut: along `direction` (rows or columns), rank r keeps [bounds[r][0], bounds[r][1])."""

    direction: str
    bounds: Tuple[Tuple[int, int], ...]


def _even(total: int, n: int) -> List[Tuple[int, int]]:
    per = total // n
    return [(r * per, (r + 1) * per) for r in range(n)]


class ShardPlan:
    """The split of one model over `world_size` ranks (see the module docstring)."""

    def __init__(self, config: ModelConfig, world_size: int, lm_head: str = "vocab"):
        if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral) or world_size < 1:
            raise ValueError(f"tensor_parallel must be a positive integer, got {world_size!r}")
        if lm_head not in LM_HEAD_LAYOUTS:
            raise ValueError(f"lm_head must be one of {', '.join(LM_HEAD_LAYOUTS)}, got {lm_head!r}")
        self.lm_head = lm_head
        if config.arch not in SHARDABLE_ARCHS:
            raise UnsupportedModelError(
                f"tensor parallelism does not support architecture {config.arch!r} "
                f"(supported: {', '.join(SHARDABLE_ARCHS)})"
            )
        n = int(world_size)
        cfg = config
        self.config = cfg
        self.world_size = n
        nq, nk, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if nq % n:
            raise ShardingError(
                f"num_heads {nq} is not a multiple of tensor_parallel {n}: the attention "
                f"heads cannot be split evenly over {n} ranks"
            )
        if cfg.intermediate_size % n:
            raise ShardingError(
                f"intermediate_size {cfg.intermediate_size} is not a multiple of "
                f"tensor_parallel {n}: the MLP cannot be split evenly over {n} ranks"
            )
        if cfg.vocab_size < n:
            raise ShardingError(f"vocab_size {cfg.vocab_size} is smaller than tensor_parallel {n}")
        if nk < 1 or nq % nk:
            raise ShardingError(f"num_heads {nq} is not a multiple of num_kv_heads {nk}")
        hq, group = nq // n, nq // nk
        self.q_heads = [(r * hq, (r + 1) * hq) for r in range(n)]
        # kv heads split evenly, or each rank keeps the ones its query heads read.
        self.kv_split = nk % n == 0
        if self.kv_split:
            self.kv_heads = _even(nk, n)
        else:
            self.kv_heads = [(a // group, (b - 1) // group + 1) for a, b in self.q_heads]
        self.ffn = _even(cfg.intermediate_size, n)
        per = -(-cfg.vocab_size // n)
        self.vocab = [(min(r * per, cfg.vocab_size), min((r + 1) * per, cfg.vocab_size)) for r in range(n)]
        # Every rank's vocabulary slice is padded to this width when gathered.
        self.vocab_width = per
        dims = {
            "q": [(a * d, b * d) for a, b in self.q_heads],
            "kv": [(a * d, b * d) for a, b in self.kv_heads],
            "ffn": self.ffn,
            "vocab": self.vocab,
        }
        self._dims = {k: tuple(v) for k, v in dims.items()}

    # ------------------------------------------------------------------ facts

    def split(self, name: str) -> Optional[TensorSplit]:
        """How tensor `name` is cut, or None when every rank holds all of it."""
        rule = _GLOBAL_SPLITS.get(name) if self.lm_head == "vocab" else None
        if rule is None and name.startswith("blk."):
            parts = name.split(".", 2)
            if len(parts) == 3:
                rule = _LAYER_SPLITS.get(parts[2])
        if rule is None or self.world_size == 1:
            return None
        direction, dim = rule
        return TensorSplit(direction, self._dims[dim])

    def kv_of_q(self, rank: int) -> List[int]:
        """For each of the rank's query heads, the index of its kv head among the rank's kv heads."""
        cfg = self.config
        group = cfg.num_heads // cfg.num_kv_heads
        (qa, qb), (ka, _) = self.q_heads[rank], self.kv_heads[rank]
        return [q // group - ka for q in range(qa, qb)]

    def rank_config(self, rank: int) -> dict:
        """The rank's own sizes: heads, kv heads, intermediate rows and vocabulary slice."""
        (qa, qb), (ka, kb), (fa, fb), (va, vb) = (
            self.q_heads[rank],
            self.kv_heads[rank],
            self.ffn[rank],
            self.vocab[rank],
        )
        return {"num_heads": qb - qa, "num_kv_heads": kb - ka, "intermediate_size": fb - fa, "vocab": (va, vb)}

    def describe(self) -> dict:
        """The plan as plain data (for `info` and logs)."""
        return {
            "tensor_parallel": self.world_size,
            "q_heads": self.q_heads,
            "kv_heads": self.kv_heads,
            "kv_split": self.kv_split,
            "ffn": self.ffn,
            "vocab": self.vocab,
            "embedding": "replicated",
            "lm_head": "split by vocabulary" if self.lm_head == "vocab" else "replicated",
        }

    def check_grouped(self) -> None:
        """ShardingError unless each rank's query heads read its kv heads in equal consecutive groups.

        The GPU attention kernels take the usual grouped layout (query head i
        reads kv head i // (heads / kv_heads)); a rank whose query heads
        straddle kv heads unevenly (e.g. 12 heads over 3 kv heads on 2 ranks)
        runs on the CPU reference only.
        """
        for r in range(self.world_size):
            local = self.rank_config(r)
            nq, nk = local["num_heads"], local["num_kv_heads"]
            g = nq // nk if nk and nq % nk == 0 else 0
            if g == 0 or self.kv_of_q(r) != [i // g for i in range(nq)]:
                cfg = self.config
                raise ShardingError(
                    f"tensor_parallel {self.world_size}: rank {r}'s {nq} query heads read kv heads "
                    f"{self.kv_of_q(r)} of its {nk}, not in equal groups; the GPU attention needs each rank's "
                    f"query heads to split evenly over its kv heads (num_heads {cfg.num_heads}, num_kv_heads "
                    f"{cfg.num_kv_heads}): use a tensor-parallel size that divides num_kv_heads or is a "
                    "multiple of it"
                )

    # ------------------------------------------------------------------ checks

    def check(self, tensors: Dict[str, RawTensor]) -> None:
        """Raise ShardingError unless every tensor's split is possible for every rank (nothing is read)."""
        for name, raw in tensors.items():
            sp = self.split(name)
            if sp is not None:
                for a, b in sp.bounds:
                    _check_bounds(name, raw, sp.direction, a, b)


def shard_plan(config: ModelConfig, tensor_parallel: int, lm_head: str = "vocab") -> ShardPlan:
    """The plan for splitting `config`'s model over `tensor_parallel` ranks (ShardingError when it cannot be)."""
    return ShardPlan(config, tensor_parallel, lm_head)


def _check_bounds(name: str, raw: RawTensor, direction: str, a: int, b: int) -> None:
    shape = tuple(int(s) for s in raw.shape)
    axis = 0 if direction == ROWS else len(shape) - 1
    if direction == COLUMNS and len(shape) < 2:
        raise ShardingError(f"tensor {name} of shape {list(shape)} has no columns to split")
    if not 0 <= a <= b <= shape[axis]:
        raise ShardingError(
            f"tensor {name} of shape {list(shape)}: slice [{a}, {b}) of its {direction} is out of range"
        )
    if direction == COLUMNS and raw.dtype not in FLOAT_TYPES:
        be = BLOCK_SIZES[raw.dtype][0]
        for edge in (a, b):
            if edge % be:
                raise ShardingError(
                    f"tensor {name} ({raw.dtype}, shape {list(shape)}) cannot be split at column "
                    f"{edge}: {raw.dtype} stores rows in blocks of {be} weights and a split must fall on "
                    f"a block boundary (use a tensor-parallel size whose slices are multiples of {be}, "
                    "or a model quantized with smaller blocks)"
                )


def shard_tensor(raw: RawTensor, plan: ShardPlan, rank: int, name: Optional[str] = None) -> RawTensor:
    """Rank `rank`'s slice of `raw` as a RawTensor whose data is a view of raw's (no copy, nothing read).

    `name` is the tensor's canonical name, its key in ModelSource.tensors
    (default raw.name, which is the canonical name in GGUF files; HF folders
    keep the checkpoint's own name there). A replicated tensor comes back as
    `raw` itself.
    """
    if not 0 <= rank < plan.world_size:
        raise ValueError(f"rank {rank} is outside the {plan.world_size} ranks of the plan")
    name = raw.name if name is None else name
    sp = plan.split(name)
    if sp is None:
        return raw
    a, b = sp.bounds[rank]
    _check_bounds(name, raw, sp.direction, a, b)
    shape = tuple(int(s) for s in raw.shape)
    data = raw.data
    if sp.direction == ROWS:
        # Float data has the tensor's shape; block data is [rows, bytes per row].
        data = data[a:b]
        out_shape = (b - a,) + shape[1:]
    else:
        if raw.dtype in FLOAT_TYPES:
            data = data[..., a:b]
        else:
            be, bb = BLOCK_SIZES[raw.dtype]
            data = data[..., a // be * bb : b // be * bb]
        out_shape = shape[:-1] + (b - a,)
    return RawTensor(name=raw.name, shape=out_shape, dtype=raw.dtype, data=data, dequantize=raw.dequantize)


def model_fingerprint(config: ModelConfig, tensors: Dict[str, RawTensor]) -> str:
    """A digest of a model's config and tensor types and shapes: ranks compare it to agree on one model."""
    h = hashlib.sha256(json.dumps(asdict(config), sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(int(s) for s in t.shape)};".encode())
    return h.hexdigest()[:16]
