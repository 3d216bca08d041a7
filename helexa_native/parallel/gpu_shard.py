"""One tensor-parallel rank on a GPU: what it loads, its GpuModel, and how its steps are waited on.

Each rank's GpuModel (csrc/model/llama_model.h, spec.tp_size >= 1) holds its
query / kv heads and MLP rows, cut by sharding.py's plan (lm_head
"replicated") straight from the loader's memory-mapped tensors, so a rank
reads only its own slice of the file. The embedding and every norm are
whole on every rank. The LM head, output norm and sampler live on rank 0
only (spec.lm_head): the ranks' hidden states are bitwise equal after every
all-reduce (both implementations give every rank the same sum), so a head on
the followers would only repeat rank 0's work, and rank 0's sampled token is
the one used. A row-parallel bias (attn_output.bias) is loaded by rank 0
alone, so the sum adds it once.

Followers receive each step with the leader's sequences (tokens, positions,
block tables, slots, which sequences sample): the same pass structure, hence
the same collectives in the same order; their sampling parameters are
ignored.
"""

from __future__ import annotations

import time
from typing import List, Optional, Sequence

from .. import defaults
from ..backends.cuda import DEFAULT_PREFILL_CHUNK, host_tensors_of, model_spec
from ..config import ModelSource
from ..errors import DeviceError, HelexaError, ModelLoadError
from ..kv_blocks import DEFAULT_BLOCK_SIZE
from .sharding import ShardPlan, shard_plan, shard_tensor

# Tensors only rank 0 loads: the LM head and its norm (the followers have no
# head), and row-parallel biases (added once, before the sum).
_RANK0_ONLY = ("output.weight", "output_norm.weight")
_RANK0_ONLY_SUFFIXES = (".attn_output.bias",)

# Slice of a wait on a rank's job: how often a waiting step looks at the
# other ranks (an error on one of them fails the step at once).
WAIT_SLICE = 0.05


def gpu_plan(source: ModelSource, tensor_parallel: int) -> ShardPlan:
    """The GPU split of `source` over `tensor_parallel` ranks (ShardingError naming what cannot be split)."""
    plan = shard_plan(source.config, tensor_parallel, lm_head="replicated")
    plan.check(source.tensors)
    plan.check_grouped()
    return plan


def rank_tensors(source: ModelSource, plan: ShardPlan, rank: int) -> list:
    """(name, ggml_type, shape, buffer) of every tensor rank `rank`'s GpuModel loads (its slices, as views)."""
    out = []
    for name, t in source.tensors.items():
        if rank != 0 and (name in _RANK0_ONLY or name.endswith(_RANK0_ONLY_SUFFIXES)):
            continue
        out.extend(host_tensors_of(name, shard_tensor(t, plan, rank, name)))
    return out


def rank_spec(
    C,
    source: ModelSource,
    plan: ShardPlan,
    rank: int,
    n_ctx: int,
    *,
    use_graphs: bool = True,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    int8_activations: Optional[bool] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_num_seqs: int = defaults.DEFAULT_MAX_NUM_SEQS,
    num_blocks: int = 0,
    peer_max_bytes: int = defaults.DEFAULT_TP_PEER_MAX_BYTES,
):
    """The `_C.ModelSpec` of rank `rank`: its own heads, kv heads and MLP rows; the LM head on rank 0 only."""
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
    local = plan.rank_config(rank)
    spec.heads = int(local["num_heads"])
    spec.kv_heads = int(local["num_kv_heads"])
    spec.intermediate = int(local["intermediate_size"])
    spec.tp_rank = int(rank)
    spec.tp_size = int(plan.world_size)
    spec.tp_peer_max_bytes = int(peer_max_bytes)
    spec.lm_head = rank == 0
    return spec


def load_rank(C, source: ModelSource, plan: ShardPlan, rank: int, device_index: int, spec):
    """Rank `rank`'s GpuModelHandle on cuda:`device_index` (whose worker already holds the rank's communicator)."""
    tensors = rank_tensors(source, plan, rank)
    try:
        return C.GpuModelHandle(device_index, spec, tensors)
    except ValueError as e:
        raise ModelLoadError(f"cannot load rank {rank}'s shard on cuda:{device_index}: {e}") from e
    except HelexaError:
        raise
    except Exception as e:
        raise DeviceError(f"cuda:{device_index}: loading rank {rank}'s shard failed: {e}") from e


def kv_bytes_per_block(plan: ShardPlan, block_size: int) -> int:
    """Device bytes one KV pool block takes on the rank holding the most kv heads (K and V, every layer, bf16)."""
    cfg = plan.config
    heads = max(b - a for a, b in plan.kv_heads)
    return 2 * int(cfg.num_layers) * heads * int(block_size) * int(cfg.head_dim) * 2


def check_devices(devices) -> List[int]:
    """devices as a list of distinct non-negative ints (ValueError otherwise)."""
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence) or not devices:
        raise ValueError(f"devices must be a non-empty list of GPU indices, got {devices!r}")
    out = []
    for d in devices:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"devices must hold non-negative GPU indices, got {d!r}")
        out.append(int(d))
    if len(set(out)) != len(out):
        raise ValueError(f"devices must be distinct (one rank per GPU), got {out}")
    return out


def visible_gpus() -> int:
    """GPUs this process sees (0 without CUDA)."""
    import torch

    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def check_visible(devices: Sequence[int]) -> None:
    """DeviceError unless every device of `devices` is visible."""
    n = visible_gpus()
    missing = [d for d in devices if d >= n]
    if missing:
        raise DeviceError(
            f"tensor_parallel {len(devices)} over devices {list(devices)} needs "
            f"cuda:{', cuda:'.join(str(d) for d in missing)}, but {n} GPU(s) are visible "
            "(one rank per GPU: NCCL takes no two ranks on one device)"
        )


def follower_inputs(C, seqs, idle_sampling, no_penalties) -> list:
    """The SeqInputs a follower rank runs for the leader's (ids, start, table, slot, sample) sequences."""
    return [
        C.SeqInput(list(ids), int(start), list(table), int(slot), bool(sample), idle_sampling, no_penalties, False)
        for ids, start, table, slot, sample in seqs
    ]


def wait_ranks(pending: list, deadline: float, stop=None, learn: bool = True) -> tuple:
    """Wait for every rank's PendingStep until `deadline` (monotonic): ({rank: result}, {rank: exception}).

    Returns once every rank finished, at the deadline, as soon as a rank
    raised anything but ValueError (bad input fails every rank alike, before
    any device work; anything else leaves the others waiting in a
    collective), or once `stop()` turns true (the watchdog failed the step).
    Waits in slices of WAIT_SLICE seconds on the lowest unfinished rank;
    rank 0's first slice learns the step's duration (JobWaiter) when `learn`.
    """
    results, errors = {}, {}
    first = True
    while True:
        for r, p in enumerate(pending):
            if r not in results and r not in errors and p.done():
                try:
                    results[r] = p.result()
                except BaseException as e:  # each rank's own error, for the caller to judge
                    errors[r] = e
        left = [r for r in range(len(pending)) if r not in results and r not in errors]
        now = time.monotonic()
        if not left or now >= deadline or any(not isinstance(e, ValueError) for e in errors.values()):
            return results, errors
        if stop is not None and stop():
            return results, errors
        r = left[0]
        pending[r].wait(min(WAIT_SLICE, deadline - now), learn and first and r == 0)
        first = False


def rank_embeddings_refusal(backend) -> str:
    """Why a tensor-parallel CUDA backend computes no embeddings (its NotImplementedError)."""
    return (
        f"embeddings do not run with tensor parallelism yet ({type(backend).__name__}, "
        f"{backend.tensor_parallel} GPUs): load the model on one GPU to embed"
    )
