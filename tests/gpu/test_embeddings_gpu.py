"""Hidden states and embeddings on the CUDA backend against the CPU reference.

CUDABackend.hidden_states runs its own job over KV blocks borrowed from the
pool; each sequence's final-normed rows (or only the pooled row) must match
the CPU backend's to cosine >= 0.999, long inputs spanning several prefill
passes included, and running sequences must not notice it happened.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helexa_native.backends.base import SeqStep
from helexa_native.embeddings import pool
from helexa_native.kv_blocks import SeqBlocks
from helexa_native.params import SamplerState, SamplingParams

pytestmark = pytest.mark.gpu

MIN_COSINE = 0.999
N_CTX = 200

MODELS = [
    ("qwen3-0.6b", "Q8_0", dict(num_layers=2, vocab_size=1536)),
    ("smollm2-135m", "Q4_1", dict(num_layers=2, vocab_size=1536)),
    (
        "llama3-8b",
        "Q4_K_M",
        dict(
            num_layers=2,
            vocab_size=2048,
            hidden_size=512,
            intermediate_size=1536,
            num_heads=8,
            num_kv_heads=2,
            head_dim=64,
        ),
    ),
]


@pytest.fixture(scope="module", params=MODELS, ids=lambda m: f"{m[0]}-{m[1]}")
def backends(request, tmp_path_factory):
    from helexa_native import synthetic
    from helexa_native.backends.cpu import CPUBackend
    from helexa_native.backends.cuda import CUDABackend
    from helexa_native.loaders import load_source

    preset, quant, overrides = request.param
    path = tmp_path_factory.mktemp(preset.replace(".", "_")) / "model.gguf"
    synthetic.write_synthetic_gguf(path, preset, quant, seed=11, **overrides)
    src = load_source(path)
    cpu = CPUBackend(src, N_CTX)
    # A short prefill chunk: the longer inputs run in several passes.
    gpu = CUDABackend(src, 0, N_CTX, max_num_seqs=4, prefill_chunk=32)
    yield cpu, gpu
    gpu.close()
    src.close()


def _tokens(seed, n, vocab):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _inputs(vocab):
    # One token, short ones that share a pass, some longer than a pass, one at the full context.
    lengths = [1, 7, 12, 5, 45, 3, 90, N_CTX, 30, 2, 2, 9]
    return [_tokens(100 + i, n, vocab) for i, n in enumerate(lengths)]


def _cos(a, b):
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def test_hidden_rows_match_reference(backends):
    cpu, gpu = backends
    seqs = _inputs(cpu.config.vocab_size)
    free = gpu.blocks.free_blocks
    got = gpu.hidden_states(seqs)
    want = cpu.hidden_states(seqs)
    assert gpu.blocks.free_blocks == free and gpu.blocks.used_blocks == 0
    for s, g, w in zip(seqs, got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape == (len(s), cpu.config.hidden_size)
        cos = _cos(g, w)
        assert cos.min().item() >= MIN_COSINE, f"length {len(s)}: row {int(cos.argmin())} cosine {cos.min():.6f}"


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
def test_pooled_rows_match_reference(backends, pooling):
    cpu, gpu = backends
    seqs = _inputs(cpu.config.vocab_size)
    got = gpu.hidden_states(seqs, pooling=pooling)
    full = gpu.hidden_states(seqs)
    want = cpu.hidden_states(seqs, pooling=pooling)
    for s, g, f, w in zip(seqs, got, full, want):
        assert g.shape == w.shape == (1, cpu.config.hidden_size)
        assert _cos(g[0], w[0]).item() >= MIN_COSINE, f"length {len(s)}"
        # The device's pooling is the pooling of its own rows.
        assert torch.allclose(g[0], pool(f, pooling), rtol=1e-4, atol=1e-5)


def test_embeddings_leave_running_sequences_alone(backends):
    cpu, gpu = backends
    vocab = cpu.config.vocab_size
    prompt = _tokens(7, 20, vocab)
    params = SamplingParams(temperature=0.0)

    def generate(interrupt):
        blocks = SeqBlocks()
        state = SamplerState(prompt_tokens=list(prompt))
        out, pos, toks = [], 0, list(prompt)
        try:
            for step in range(16):
                gpu.blocks.ensure(blocks, pos + len(toks))
                (res,) = gpu.step_batch(
                    [
                        SeqStep(
                            slot=0,
                            tokens=toks,
                            start_pos=pos,
                            block_table=list(blocks.table),
                            params=params,
                            state=state,
                        )
                    ]
                )
                pos += len(toks)
                toks = [res.result.token]
                out.append(res.result.token)
                state.generated_tokens.append(res.result.token)
                state.step += 1
                if interrupt and step in (0, 7):
                    gpu.hidden_states(_inputs(vocab), pooling="mean")
        finally:
            gpu.blocks.release(blocks)
        return out

    assert generate(True) == generate(False)


def test_engine_embed_on_gpu_matches_cpu(tmp_path):
    from helexa_native import Engine, synthetic

    path = tmp_path / "qwen3.gguf"
    synthetic.write_synthetic_gguf(path, "qwen3-0.6b", "Q8_0", seed=2, num_layers=2, vocab_size=2048)
    texts = ["A cat sleeps on the warm sofa.", "The kitten naps.", "Revenue grew by eight percent.", "x"]
    with Engine(path, device="cpu", n_ctx=128) as cpu, Engine(path, device="cuda", n_ctx=128) as gpu:
        for pooling in ("last", "mean", "cls"):
            got = gpu.embed(texts, pooling=pooling)
            want = cpu.embed(texts, pooling=pooling)
            assert got.shape == want.shape == (len(texts), gpu.config.hidden_size)
            assert torch.allclose(got.norm(dim=1), torch.ones(len(texts)), atol=1e-5)
            assert _cos(got, want).min().item() >= MIN_COSINE
        short = gpu.embed(texts[:1], dimensions=32)
        assert short.shape == (1, 32)
        # Embeddings and generation share the device: both keep working.
        assert len(gpu.generate("Hello", max_tokens=4, ignore_eos=True, temperature=0).token_ids) == 4


def test_sum_rows_kernel():
    import helexa_native._C  # noqa: F401

    ops = torch.ops.helexa
    for n, h in ((1, 7), (33, 1000), (512, 4096)):
        src = torch.randn(n, h, device="cuda")
        dst = torch.full((h,), float("nan"), device="cuda")
        ops.sum_rows(src, dst, False)
        assert torch.allclose(dst, src.double().sum(0).float(), rtol=1e-5, atol=1e-4)
        ops.sum_rows(src, dst, True)
        assert torch.allclose(dst, 2 * src.double().sum(0).float(), rtol=1e-5, atol=2e-4)
