"""The CPU reference forward against Hugging Face transformers on tiny random models.

The reference is the oracle for every GPU result, so it is itself checked
here: fp32 logits over a prefill plus cached single-token decode steps must
match transformers for each architecture and rope scaling, through the real
loaders (HF folders and GGUF files written from the same weights).
"""

import pytest
import torch
from hf_factory import VARIANTS, VOCAB, hf_logits

import helexa_native.reference.model as reference_model
from helexa_native.backends.cpu import CPUBackend
from helexa_native.errors import ContextLengthError, EngineClosedError, ModelLoadError
from helexa_native.loaders import load_source
from helexa_native.reference import ReferenceModel

pytest.importorskip("transformers")

ATOL = 1e-4
N_PROMPT, N_DECODE = 10, 16


def _tokens(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def _ours(backend, prompt, decode):
    """Prefill logits for every prompt position, then one row per decode step."""
    rows = [backend.forward(prompt, 0, all_logits=True)]
    for i, t in enumerate(decode):
        rows.append(backend.forward([t], len(prompt) + i)[None])
    return torch.cat(rows)


def _assert_logits_close(got, want, atol=ATOL):
    assert got.shape == want.shape and got.dtype == torch.float32
    err = (got - want).abs().max().item()
    assert err < atol, f"max abs error {err:.3g} (logit scale {want.abs().max().item():.3g})"
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_transformers(hf_models, variant):
    folder, hf = hf_models(variant)
    prompt, decode = _tokens(1, N_PROMPT), _tokens(2, N_DECODE)
    want = hf_logits(hf, prompt, decode)
    src = load_source(folder, progress=False)
    try:
        backend = CPUBackend(src, 64, progress=False)
    finally:
        src.close()
    _assert_logits_close(_ours(backend, prompt, decode), want)
    # Last-position logits are the matching row of the full set.
    backend.reset()
    torch.testing.assert_close(backend.forward(prompt, 0), want[N_PROMPT - 1], rtol=0, atol=ATOL)


@pytest.mark.parametrize("variant", ["llama3_scaled", "qwen3"])
def test_batched_prefill_equals_token_by_token(hf_models, variant, monkeypatch):
    folder, _ = hf_models(variant)
    model = CPUBackend(load_source(folder, progress=False), 32, progress=False)
    tokens = _tokens(3, 13)
    batched = model.forward(tokens, 0, all_logits=True)
    model.reset()
    stepped = torch.stack([model.forward([t], i) for i, t in enumerate(tokens)])
    torch.testing.assert_close(batched, stepped, rtol=0, atol=1e-5)
    # Chunked prefill (long prompts) and a prefill continuing a cached prefix
    # see the same cache as one batch.
    model.reset()
    monkeypatch.setattr(reference_model, "PREFILL_CHUNK", 4)
    chunked = torch.cat([model.forward(tokens[:6], 0, all_logits=True), model.forward(tokens[6:], 6, all_logits=True)])
    torch.testing.assert_close(chunked, stepped, rtol=0, atol=1e-5)


def test_rewind_overwrites_cache(hf_models):
    folder, hf = hf_models("qwen2")
    model = CPUBackend(load_source(folder, progress=False), 32, progress=False)
    a, b = _tokens(4, 12), _tokens(5, 5)
    model.forward(a, 0)
    # Positions 7.. are rewritten; nothing of a[7:] may leak into the result.
    got = model.forward(b, 7, all_logits=True)
    _assert_logits_close(got, hf_logits(hf, a[:7] + b)[7:])


def test_context_length_and_bad_input(hf_models):
    folder, _ = hf_models("llama")
    backend = CPUBackend(load_source(folder, progress=False), 8, progress=False)
    assert backend.n_ctx == 8 and backend.device == "cpu"
    with pytest.raises(ContextLengthError):
        backend.forward(_tokens(6, 9), 0)
    assert backend.forward(_tokens(6, 8), 0).shape == (VOCAB,)
    with pytest.raises(ContextLengthError):
        backend.forward([5], 8)
    backend.reset()
    with pytest.raises(ValueError, match="gap"):
        backend.forward([5], 1)
    with pytest.raises(ValueError, match="vocabulary"):
        backend.forward([VOCAB], 0)
    with pytest.raises(ValueError, match="vocabulary"):
        backend.forward([-1], 0)
    with pytest.raises(ValueError, match="empty"):
        backend.forward([], 0)
    with pytest.raises(ValueError, match="start_pos"):
        backend.forward([5], -1)
    assert backend.forward([5, 6], 0, all_logits=True).shape == (2, VOCAB)
    # Four contexts of 8 positions: two blocks of 16, 2 layers x 2 kv heads x 16 dims, float32, k and v.
    assert backend.memory_info()["kv_cache_bytes"] == 2 * 2 * 2 * 2 * 16 * 16 * 4
    with pytest.raises(ValueError, match="max_context"):
        ReferenceModel(load_source(folder, progress=False), 0, progress=False)
    backend.close()
    with pytest.raises(EngineClosedError):
        backend.forward([5], 0)


def test_greedy_step_picks_transformers_argmax(hf_models):
    from helexa_native.params import SamplerState, SamplingParams

    folder, hf = hf_models("qwen2_untied")
    backend = CPUBackend(load_source(folder, progress=False), 32, progress=False)
    tokens, want = _tokens(10, 6), []
    for _ in range(5):
        want.append(int(hf_logits(hf, tokens + want)[-1].argmax()))
    got, pos, feed = [], 0, tokens
    for _ in range(5):
        res = backend.step(feed, pos, SamplingParams(temperature=0.0), SamplerState(prompt_tokens=tokens))
        pos += len(feed)
        feed = [res.token]
        got.append(res.token)
    assert got == want


def test_missing_or_misshapen_tensor(hf_models):
    folder, _ = hf_models("qwen3")
    src = load_source(folder, progress=False)
    del src.tensors["blk.1.attn_k_norm.weight"]
    with pytest.raises(ModelLoadError, match="attn_k_norm"):
        ReferenceModel(src, 8, progress=False)
    src = load_source(folder, progress=False)
    t = src.tensors["blk.0.ffn_down.weight"]
    t.shape = (t.shape[1], t.shape[0])
    with pytest.raises(ModelLoadError, match="ffn_down"):
        ReferenceModel(src, 8, progress=False)


def test_bfloat16_compute_stays_close(hf_models):
    folder, hf = hf_models("qwen3")
    tokens = _tokens(7, 10)
    want = hf_logits(hf, tokens)
    got = CPUBackend(load_source(folder, progress=False), 16, dtype=torch.bfloat16, progress=False).forward(
        tokens, 0, all_logits=True
    )
    assert got.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cos.min().item() > 0.99


def _cached(backend, layer, n):
    """Keys and values of the private sequence's positions 0..n-1 in `layer`: [n, kv heads, head_dim] each."""
    m, table = backend.model, backend._solo.table
    blk = torch.as_tensor([table[p // m.block_size] for p in range(n)])
    off = torch.arange(n) % m.block_size
    return m.k_pool[layer][blk, :, off], m.v_pool[layer][blk, :, off]


def _greedy(backend, prompt, n):
    backend.reset()
    out, row = [], backend.forward(prompt, 0)
    for i in range(n):
        out.append(int(row.argmax()))
        row = backend.forward([out[-1]], len(prompt) + i)
    return out


def test_bfloat16_kv_cache_rounds_keys_and_values(hf_models, monkeypatch):
    folder, _ = hf_models("qwen3")
    src = load_source(folder, progress=False)
    try:
        full = CPUBackend(src, 64, progress=False)
        rounded = CPUBackend(src, 64, progress=False, kv_dtype=torch.bfloat16)
    finally:
        src.close()
    assert full.model.k_pool.dtype == torch.float32 and rounded.model.v_pool.dtype == torch.bfloat16
    assert 2 * rounded.memory_info()["kv_cache_bytes"] == full.memory_info()["kv_cache_bytes"]
    prompt, decode = _tokens(3, 20), _tokens(4, 12)
    want, got = _ours(full, prompt, decode), _ours(rounded, prompt, decode)
    n = len(prompt) + len(decode)

    # Layer 0's keys and values come from the embeddings alone, so they are
    # the float32 run's, rounded (to nearest even); the layers above see
    # attention over rounded values and only stay close.
    for a, b in zip(_cached(full, 0, n), _cached(rounded, 0, n)):
        assert torch.equal(b, a.to(torch.bfloat16))
    for layer in range(1, len(full.model.layers)):
        for a, b in zip(_cached(full, layer, n), _cached(rounded, layer, n)):
            torch.testing.assert_close(b.float(), a, rtol=2e-2, atol=2e-2)

    # Rounding moves the logits a little, not the greedy tokens.
    assert got.dtype == torch.float32 and not torch.equal(got, want)
    torch.testing.assert_close(got, want, rtol=0, atol=5e-2)  # logits up to about 5 here
    assert torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=-1).min().item() > 0.9999
    assert _greedy(rounded, prompt, 16) == _greedy(full, prompt, 16)

    # Attention runs in float32 over the rounded values: the float32 cache fed
    # with pre-rounded keys and values gives the very same logits.
    attend = ReferenceModel._paged_attention

    def pre_rounded(self, li, q, k, v, lay, kv_index=None):
        k, v = (t.to(torch.bfloat16).to(t.dtype) for t in (k, v))
        return attend(self, li, q, k, v, lay, kv_index)

    monkeypatch.setattr(ReferenceModel, "_paged_attention", pre_rounded)
    full.reset()
    assert torch.equal(_ours(full, prompt, decode), got)


def test_kv_dtype_is_checked(hf_models):
    folder, _ = hf_models("llama")
    src = load_source(folder, progress=False)
    try:
        for bad in (torch.float16, torch.int8, "bf16"):
            with pytest.raises(ValueError, match="kv_dtype"):
                CPUBackend(src, 16, progress=False, kv_dtype=bad)
            with pytest.raises(ValueError, match="kv_dtype"):
                ReferenceModel(src, 16, progress=False, kv_dtype=bad)
        # By default the cache keeps the compute dtype; either may be asked for explicitly.
        assert CPUBackend(src, 16, dtype=torch.bfloat16, progress=False).model.k_pool.dtype == torch.bfloat16
        mixed = CPUBackend(src, 16, dtype=torch.bfloat16, kv_dtype=torch.float32, progress=False)
        assert mixed.model.k_pool.dtype == torch.float32
        assert mixed.forward(_tokens(5, 6), 0).dtype == torch.float32
    finally:
        src.close()


# ---------------------------------------------------------------- GGUF round trip


def _hf_name(canonical):
    """HF parameter name for a canonical tensor name (the inverse of the loader's map)."""
    top = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if canonical in top:
        return top[canonical]
    _, i, rest = canonical.split(".", 2)
    per_layer = {
        "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight",
        "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight",
        "attn_output.weight": "self_attn.o_proj.weight",
        "attn_q.bias": "self_attn.q_proj.bias",
        "attn_k.bias": "self_attn.k_proj.bias",
        "attn_v.bias": "self_attn.v_proj.bias",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    }
    return f"model.layers.{i}.{per_layer[rest]}"


def _write_gguf_from_hf(folder, out, qtype):
    from helexa_native.writers.gguf_writer import write_gguf

    src = load_source(folder, progress=False)
    tensors = {name: raw.to_float().numpy() for name, raw in src.tensors.items()}
    cfg = src.config
    src.close()
    write_gguf(out, cfg, tensors, qtype, hf_qk_permute=cfg.arch == "llama")
    return out


@torch.no_grad()
def _hf_with_gguf_rounding(hf, qtype):
    """A copy of `hf` whose 2-D weights went through gguf's own quantize/dequantize."""
    import copy

    import gguf
    import numpy as np

    t = gguf.GGMLQuantizationType[qtype]
    model = copy.deepcopy(hf)
    for _, p in model.named_parameters():
        if p.ndim == 2:
            q = gguf.quants.quantize(p.numpy().astype(np.float32), t)
            p.copy_(torch.from_numpy(np.asarray(gguf.quants.dequantize(q, t), dtype=np.float32)))
    return model


@pytest.mark.parametrize(
    "variant,qtype",
    [
        ("llama", "F32"),
        ("llama3_scaled", "F32"),
        ("llama_linear", "F32"),
        ("llama", "F16"),
        ("llama_tied", "Q8_0"),
        ("llama3_scaled", "Q8_0"),
        ("qwen2", "F32"),
        ("qwen2_untied", "Q8_0"),
        ("qwen3", "F16"),
    ],
)
def test_gguf_round_trip(hf_models, tmp_path, variant, qtype):
    folder, hf = hf_models(variant)
    path = _write_gguf_from_hf(folder, tmp_path / f"{variant}.{qtype}.gguf", qtype)
    src = load_source(path, progress=False)
    assert src.format == "gguf"
    if VARIANTS[variant][0] == "llama":
        # Permuted q/k rows rotated as adjacent pairs must equal HF's rotate_half.
        assert src.config.rope_style == "pairs"
    if qtype != "F32":
        assert src.tensors["blk.0.ffn_up.weight"].dtype == qtype
    backend = CPUBackend(src, 64, progress=False)
    src.close()
    prompt, decode = _tokens(8, N_PROMPT), _tokens(9, N_DECODE)
    got = _ours(backend, prompt, decode)
    exact = hf_logits(hf, prompt, decode)
    if qtype == "F32":
        _assert_logits_close(got, exact)
        return
    # Against HF on the same rounded weights: only summation order differs.
    _assert_logits_close(got, hf_logits(_hf_with_gguf_rounding(hf, qtype), prompt, decode))
    # And the rounding itself costs little.
    budget = {"F16": 3e-3, "Q8_0": 0.06}[qtype] * exact.abs().max().item()
    assert (got - exact).abs().max().item() < budget
