"""Backend contract pieces that need no GPU.

Hidden states for embeddings (pooling, KV blocks borrowed and given back) on
the CPU backend, and the CUDA backend's host side of structured outputs and
embeddings: it declares both, and converts a step's mask and logit_bias to
the arrays its device step takes.
"""

import numpy as np
import pytest
import torch

from helexa_native.backends.base import Backend, SeqStep, pooled_rows
from helexa_native.backends.cpu import CPUBackend
from helexa_native.backends.cuda import CUDABackend, constraint_arrays
from helexa_native.constraints import allocate_mask, unpack_mask
from helexa_native.embeddings import pool
from helexa_native.kv_blocks import KVBlockManager
from helexa_native.sampling import make_logit_bias

VOCAB = 1500


@pytest.fixture(scope="module")
def cpu(tmp_path_factory):
    from helexa_native import synthetic
    from helexa_native.loaders import load_source

    path = tmp_path_factory.mktemp("contract") / "model.gguf"
    synthetic.write_synthetic_gguf(path, "qwen3-0.6b", "Q8_0", seed=1, num_layers=1, vocab_size=VOCAB)
    src = load_source(path)
    be = CPUBackend(src, 96, max_num_seqs=2)
    yield be
    be.close()
    src.close()


def _tokens(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def test_hidden_states_pool_on_request(cpu):
    seqs = [_tokens(1, 5), _tokens(2, 1), _tokens(3, 70)]
    full = cpu.hidden_states(seqs)
    assert [h.shape for h in full] == [(5, cpu.config.hidden_size), (1, cpu.config.hidden_size), (70, 1024)]
    for pooling in ("last", "mean", "cls"):
        got = cpu.hidden_states(seqs, pooling=pooling)
        for g, f in zip(got, full):
            assert g.shape == (1, cpu.config.hidden_size)
            assert torch.allclose(g[0], pool(f, pooling), atol=1e-6)
            assert torch.equal(pooled_rows(f, pooling), pool(f, pooling)[None])
    assert pooled_rows(full[0], None) is full[0]
    with pytest.raises(ValueError, match="pooling"):
        cpu.hidden_states(seqs, pooling="max")
    assert cpu.blocks.used_blocks == 0


class _PoolOnly(Backend):
    """Just a block pool: enough for Backend._in_borrowed_blocks."""

    def __init__(self, num_blocks):
        self.blocks = KVBlockManager(num_blocks, 16)

    def step_batch(self, seqs):
        raise NotImplementedError

    def forward_paged(self, tokens, start_pos, block_table, all_logits=False):
        raise NotImplementedError

    def close(self):
        pass


def test_borrowed_blocks_group_and_always_return():
    be = _PoolOnly(64)
    groups = []

    def run(group, tables):
        assert [len(t) for t in tables] == [be.blocks.blocks_for(lengths[j]) for j in group]
        assert be.blocks.used_blocks == sum(len(t) for t in tables)
        groups.append(group)

    lengths = [3, 4, 5, 40, 2, 2, 2, 2, 100, 1]
    be._in_borrowed_blocks(lengths, 16, 3, run)
    # Up to 16 tokens and 3 sequences a group; a longer one alone.
    assert groups == [[0, 1, 2], [3], [4, 5, 6], [7], [8], [9]]
    assert be.blocks.used_blocks == 0

    def fail(group, tables):
        raise RuntimeError("device error")

    with pytest.raises(RuntimeError):
        be._in_borrowed_blocks(lengths, 16, 3, fail)
    assert be.blocks.used_blocks == 0 and be.blocks.free_blocks == 64


def test_cuda_backend_declares_structured_outputs_and_embeddings():
    assert CUDABackend.supports_constraints is True
    assert CUDABackend.hidden_states is not Backend.hidden_states


def test_constraint_arrays_for_the_device_step():
    mask = allocate_mask(VOCAB)
    mask[3] = 0x0F0F0F0F
    bias = make_logit_bias({7: 2.5, 1499: -100.0}, VOCAB)
    step = SeqStep(slot=0, tokens=[1], start_pos=0, block_table=[0], allowed=mask, logit_bias=bias)
    allowed, ids, vals = constraint_arrays(step, VOCAB)
    assert allowed.dtype == np.int32 and np.array_equal(allowed, mask.numpy())
    assert ids.dtype == np.int32 and ids.tolist() == [7, 1499]
    assert vals.dtype == np.float32 and vals.tolist() == [2.5, -100.0]

    # A bool mask is packed into the same words.
    as_bool = unpack_mask(mask, VOCAB)
    packed, _, _ = constraint_arrays(SeqStep(slot=0, tokens=[1], start_pos=0, block_table=[0], allowed=as_bool), VOCAB)
    assert packed.dtype == np.int32 and packed.size == mask.numel()
    assert torch.equal(unpack_mask(torch.from_numpy(packed), VOCAB), as_bool)

    assert constraint_arrays(SeqStep(slot=0, tokens=[1], start_pos=0, block_table=[0]), VOCAB) == (None, None, None)
    with pytest.raises(TypeError):
        constraint_arrays(
            SeqStep(slot=0, tokens=[1], start_pos=0, block_table=[0], allowed=torch.zeros(4, dtype=torch.int64)),
            VOCAB,
        )
    with pytest.raises(ValueError):
        constraint_arrays(
            SeqStep(slot=0, tokens=[1], start_pos=0, block_table=[0], allowed=torch.ones(VOCAB - 1, dtype=torch.bool)),
            VOCAB,
        )
