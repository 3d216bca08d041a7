"""Qwen3-MoE (qwen3moe): loaders, routing, the CPU reference against transformers, synthetic models.

The reference's MoE FFN is checked against Hugging Face transformers on
tiny random checkpoints (one with norm_topk_prob and a dense layer from
mlp_only_layers, one without and with decoder_sparse_step 2), loaded from
the HF folder and from GGUF files written from the same weights. Routing
ties are resolved by expert id, which the unit tests pin down.
"""

import copy
import json
import threading
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from hf_factory import VOCAB, hf_logits
from moe_routing import NEAR_TIE, alternatives, cosines, follow, follow_logits, teacher_forced

from helexa_native import Engine
from helexa_native.backends.cpu import CPUBackend
from helexa_native.config import SUPPORTED_ARCHS, ModelConfig
from helexa_native.errors import ModelLoadError, UnsupportedModelError
from helexa_native.loaders import active_params, describe, load_source
from helexa_native.loaders.safetensors_loader import StackedArray
from helexa_native.loaders.validate import expected_shapes
from helexa_native.params import SamplerState, SamplingParams
from helexa_native.reference import model as reference_model
from helexa_native.reference.model import moe_ffn, route, routing_margins
from helexa_native.synthetic import preset_config, write_synthetic_gguf, write_synthetic_safetensors
from helexa_native.writers.gguf_writer import write_gguf
from helexa_native.writers.quantize import quantize

pytest.importorskip("transformers")

ATOL = 1e-4  # test_reference's tolerance for fp32 logits
N_PROMPT, N_DECODE, N_GREEDY = 10, 12, 8
MOE_VARIANTS = ("qwen3moe", "qwen3moe_unnormed")


def _tokens(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def _backend(path, n_ctx=64):
    src = load_source(path, progress=False)
    try:
        return CPUBackend(src, n_ctx, progress=False)
    finally:
        src.close()


def _ours(backend, prompt, decode):
    rows = [backend.forward(prompt, 0, all_logits=True)]
    for i, t in enumerate(decode):
        rows.append(backend.forward([t], len(prompt) + i)[None])
    return torch.cat(rows)


def _assert_logits_close(got, want, atol=ATOL):
    assert got.shape == want.shape and got.dtype == torch.float32
    err = (got - want).abs().max().item()
    assert err < atol, f"max abs error {err:.3g} (logit scale {want.abs().max().item():.3g})"
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def _greedy_ours(backend, prompt, n):
    backend.reset()
    out, pos, feed = [], 0, prompt
    for _ in range(n):
        res = backend.step(feed, pos, SamplingParams(temperature=0.0), SamplerState(prompt_tokens=prompt))
        pos += len(feed)
        feed = [res.token]
        out.append(res.token)
    return out


def _greedy_hf(hf, prompt, n):
    out = []
    for _ in range(n):
        out.append(int(hf_logits(hf, prompt + out)[-1].argmax()))
    return out


def _check_against(backend, hf, seed=1):
    prompt, decode = _tokens(seed, N_PROMPT), _tokens(seed + 1, N_DECODE)
    _assert_logits_close(_ours(backend, prompt, decode), hf_logits(hf, prompt, decode))
    assert _greedy_ours(backend, prompt, N_GREEDY) == _greedy_hf(hf, prompt, N_GREEDY)


# ---------------------------------------------------------------- HF folders


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_hf_folder_matches_transformers(hf_models, variant):
    folder, hf = hf_models(variant)
    src = load_source(folder, progress=False)
    try:
        c, h = src.config, hf.config
        assert c.arch == "qwen3moe" and c.qk_norm and c.rope_style == "half"
        assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.norm_topk_prob) == (
            h.num_experts,
            h.num_experts_per_tok,
            h.moe_intermediate_size,
            h.norm_topk_prob,
        )
        dense = [i for i, layer in enumerate(hf.model.layers) if not hasattr(layer.mlp, "experts")]
        assert list(c.mlp_only_layers) == dense and dense
        # The per-expert HF tensors, stacked without a copy into GGUF's layout.
        moe = [i for i in range(c.num_layers) if i not in dense]
        L = hf.model.layers[moe[0]].mlp
        p = f"blk.{moe[0]}."
        gate, up = L.experts.gate_up_proj.chunk(2, dim=1)
        for name, want in (
            ("ffn_gate_exps", gate),
            ("ffn_up_exps", up),
            ("ffn_down_exps", L.experts.down_proj),
            ("ffn_gate_inp", L.gate.weight),
        ):
            t = src.tensors[p + name + ".weight"]
            assert t.shape == tuple(want.shape)
            assert torch.equal(t.to_float(), want.detach().float()), name
        stacked = src.tensors[p + "ffn_up_exps.weight"].data
        assert isinstance(stacked, StackedArray) and all(isinstance(a, np.memmap) for a in stacked.parts)
        assert p + "ffn_gate.weight" not in src.tensors and f"blk.{dense[0]}.ffn_gate.weight" in src.tensors
        assert f"blk.{dense[0]}.ffn_gate_inp.weight" not in src.tensors
        backend = CPUBackend(src, 64, progress=False)
    finally:
        src.close()
    _check_against(backend, hf)


# ---------------------------------------------------------------- GGUF files


def _write_gguf_from_hf(folder, out, qtype):
    src = load_source(folder, progress=False)
    tensors = {name: raw.to_float().numpy() for name, raw in src.tensors.items()}
    cfg = src.config
    src.close()
    write_gguf(out, cfg, tensors, qtype)
    return out


@torch.no_grad()
def _hf_with_gguf_rounding(hf, qtype):
    """A copy of `hf` whose matrices (not the router, which GGUF keeps F32) went through gguf's quantizer."""
    t = gguf.GGMLQuantizationType[qtype]
    model = copy.deepcopy(hf)
    for name, p in model.named_parameters():
        if p.ndim >= 2 and not name.endswith("mlp.gate.weight"):
            q = gguf.quants.quantize(p.numpy().astype(np.float32), t)
            p.copy_(torch.from_numpy(np.asarray(gguf.quants.dequantize(q, t), dtype=np.float32)).reshape(p.shape))
    return model


@pytest.mark.parametrize("variant,qtype", [("qwen3moe", "F32"), ("qwen3moe_unnormed", "F16"), ("qwen3moe", "Q8_0")])
def test_gguf_matches_transformers(hf_models, tmp_path, variant, qtype):
    folder, hf = hf_models(variant)
    path = _write_gguf_from_hf(folder, tmp_path / f"{variant}.{qtype}.gguf", qtype)
    hf_src = load_source(folder, progress=False)
    hf_cfg = hf_src.config
    hf_src.close()
    src = load_source(path, progress=False)
    try:
        assert src.format == "gguf"
        for field in (
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "norm_topk_prob",
            "mlp_only_layers",
            "intermediate_size",
            "head_dim",
            "tie_word_embeddings",
        ):
            assert getattr(src.config, field) == getattr(hf_cfg, field), field
        moe = next(i for i in range(hf_cfg.num_layers) if hf_cfg.is_moe_layer(i))
        assert src.tensors[f"blk.{moe}.ffn_down_exps.weight"].dtype == qtype
        assert src.tensors[f"blk.{moe}.ffn_gate_inp.weight"].dtype == "F32"
        backend = CPUBackend(src, 64, progress=False)
    finally:
        src.close()
    if qtype == "F32":
        _check_against(backend, hf)
        return
    # Against transformers on the same rounded weights: only summation order differs.
    _check_against(backend, _hf_with_gguf_rounding(hf, qtype))
    prompt, decode = _tokens(8, N_PROMPT), _tokens(9, N_DECODE)
    exact = hf_logits(hf, prompt, decode)
    budget = {"F16": 3e-3, "Q8_0": 0.06}[qtype] * exact.abs().max().item()
    assert (_ours(backend, prompt, decode) - exact).abs().max().item() < budget


def test_gguf_stacked_layout_is_per_expert_rows(tmp_path):
    """Expert e's rows are the blocks of w[e] quantized alone, right after expert e-1's."""
    cfg = preset_config("qwen3moe-tiny", n_layers=1)
    rng = np.random.default_rng(0)
    w = {n: (0.02 * rng.standard_normal(s)).astype(np.float32) for n, s in expected_shapes(cfg).items()}
    types = {n: "Q8_0" for n, s in expected_shapes(cfg).items() if len(s) > 1}
    types["blk.0.ffn_down_exps.weight"] = "Q6_K"
    types["blk.0.ffn_gate_inp.weight"] = "Q8_0"  # a quantized router loads too
    path = write_gguf(tmp_path / "layout.gguf", cfg, w, types)
    src = load_source(path, progress=False)
    try:
        reader = {t.name: t for t in gguf.GGUFReader(path).tensors}
        E, F, H = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        for name, qtype, shape in (
            ("blk.0.ffn_gate_exps.weight", "Q8_0", (E, F, H)),
            ("blk.0.ffn_up_exps.weight", "Q8_0", (E, F, H)),
            ("blk.0.ffn_down_exps.weight", "Q6_K", (E, H, F)),
        ):
            t = src.tensors[name]
            assert (t.dtype, t.shape) == (qtype, shape)
            assert list(reader[name].shape) == [shape[2], shape[1], shape[0]]  # GGUF's ne, fastest first
            rb = (
                shape[2]
                // gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
                * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]
            )
            assert t.data.dtype == np.uint8 and t.data.shape == (shape[0], shape[1], rb)
            for e in (0, 3, E - 1):
                assert np.array_equal(t.data[e], quantize(w[name][e], qtype))
            ref = gguf.quants.dequantize(reader[name].data, reader[name].tensor_type).reshape(shape)
            np.testing.assert_array_equal(t.to_float().numpy(), ref)
        assert src.tensors["blk.0.ffn_gate_inp.weight"].dtype == "Q8_0"
    finally:
        src.close()


def test_k_quant_mix_runs_on_its_dequantized_weights(tmp_path):
    """Q4_K_M: Q4_K experts with Q6_K down projections; the reference equals an F32 file of the decoded weights."""
    path, _ = write_synthetic_gguf(tmp_path / "mix.gguf", "qwen3moe-tiny", "Q4_K_M", progress=False)
    src = load_source(path, progress=False)
    try:
        types = {n: t.dtype for n, t in src.tensors.items()}
        assert types["blk.1.ffn_gate_exps.weight"] == types["blk.1.ffn_up_exps.weight"] == "Q4_K"
        assert types["blk.1.ffn_down_exps.weight"] == "Q6_K" and types["blk.1.ffn_gate_inp.weight"] == "F32"
        decoded = {n: t.to_float().numpy() for n, t in src.tensors.items()}
        cfg = src.config
        quantized = CPUBackend(src, 32, progress=False)
    finally:
        src.close()
    plain = _backend(write_gguf(tmp_path / "plain.gguf", cfg, decoded, "F32"), 32)
    tokens = list(range(3, 20))
    torch.testing.assert_close(
        quantized.forward(tokens, 0, all_logits=True), plain.forward(tokens, 0, all_logits=True), rtol=0, atol=1e-5
    )


# ---------------------------------------------------------------- routing


def test_route_ties_go_to_the_lower_expert_id():
    h = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    w = torch.zeros(8, 16)
    weights, experts = route(h, w, 3, normalize=False)  # all eight equal
    assert experts.tolist() == [[0, 1, 2]] * 5
    torch.testing.assert_close(weights, torch.full((5, 3), 1 / 8))
    weights, experts = route(h, w, 3, normalize=True)
    torch.testing.assert_close(weights, torch.full((5, 3), 1 / 3))

    # Router logits 3 for experts 2, 5 and 6, 2 for 1 and 7, 0 for the rest, exactly (the
    # other coordinates meet zero weights): the k best keep id order.
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    x[:, 0] = 1.0
    w = torch.zeros(8, 16)
    w[:, 0] = torch.tensor([0.0, 2.0, 3.0, 0.0, 0.0, 3.0, 3.0, 2.0])
    for k, want in ((1, [2]), (2, [2, 5]), (3, [2, 5, 6]), (4, [2, 5, 6, 1]), (5, [2, 5, 6, 1, 7])):
        _, experts = route(x, w, k, normalize=True)
        assert experts.tolist() == [want] * 4, k


def test_route_matches_softmax_topk():
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(50, 32, generator=g), torch.randn(16, 32, generator=g)
    weights, experts = route(h, w, 4, normalize=False)
    probs = torch.softmax(h @ w.T, -1)
    top, idx = torch.topk(probs, 4, -1)
    assert torch.equal(experts, idx)
    torch.testing.assert_close(weights, top)
    weights, _ = route(h, w, 4, normalize=True)
    torch.testing.assert_close(weights, top / top.sum(-1, keepdim=True))


@pytest.mark.parametrize("normalize", [False, True])
def test_moe_ffn_is_the_weighted_sum_of_chosen_experts(normalize):
    g = torch.Generator().manual_seed(3)
    T, H, F, E, k = 7, 32, 24, 6, 2
    h = torch.randn(T, H, generator=g)
    w_router = torch.randn(E, H, generator=g)
    gate, up, down = (
        torch.randn(E, F, H, generator=g),
        torch.randn(E, F, H, generator=g),
        torch.randn(E, H, F, generator=g),
    )
    got = moe_ffn(h, w_router, torch.cat([gate, up], 1), down, k, normalize)
    probs = torch.softmax(h @ w_router.T, -1)
    want = torch.zeros(T, H)
    for t in range(T):
        order = sorted(range(E), key=lambda e: (-probs[t, e].item(), e))[:k]
        total = sum(probs[t, e] for e in order) if normalize else 1.0
        for e in order:
            y = down[e] @ (torch.nn.functional.silu(gate[e] @ h[t]) * (up[e] @ h[t]))
            want[t] += probs[t, e] / total * y
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_routing_margins_are_the_relative_gap_after_the_kth_choice():
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(routing_margins(p, 2), torch.tensor([(0.3 - 0.2) / 0.3, 0.0, 0.0]))
    torch.testing.assert_close(routing_margins(p, 1), torch.tensor([0.25, 0.0, 1.0]))
    assert torch.isinf(routing_margins(p, 4)).all()  # every expert chosen: nothing to tip

    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(9, 32, generator=g), torch.randn(6, 32, generator=g)
    margins, probs = [], []
    want = route(h, w, 3, normalize=True)
    got = route(h, w, 3, normalize=True, margins=margins, probs_out=probs)
    assert all(torch.equal(a, b) for a, b in zip(got, want))  # the hooks change nothing
    top = torch.softmax(h @ w.T, -1).sort(-1, descending=True).values
    torch.testing.assert_close(margins[0], (top[:, 2] - top[:, 3]) / top[:, 2])
    torch.testing.assert_close(probs[0], torch.softmax(h @ w.T, -1))


def test_route_choose_takes_the_given_experts_at_their_own_weights():
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(4, 16, generator=g), torch.randn(8, 16, generator=g)
    probs = torch.softmax(h @ w.T, -1)
    plain_w, plain_e = route(h, w, 2, normalize=True)
    weights, experts = route(h, w, 2, normalize=True, choose={1: (6, 2), 3: (0, 7)})
    assert experts[1].tolist() == [6, 2] and experts[3].tolist() == [0, 7]
    torch.testing.assert_close(weights[1], probs[1, [6, 2]] / probs[1, [6, 2]].sum())
    assert torch.equal(experts[[0, 2]], plain_e[[0, 2]]) and torch.equal(weights[[0, 2]], plain_w[[0, 2]])
    weights, _ = route(h, w, 2, normalize=False, choose={0: (3, 4)})
    torch.testing.assert_close(weights[0], probs[0, [3, 4]])
    with pytest.raises(ValueError, match="2 expert ids"):
        route(h, w, 2, normalize=True, choose={0: (3,)})


def test_alternatives_fill_the_kth_place_from_the_band():
    # Ranks: 0.30 (id 2), 0.2 (id 0), 0.199 (id 3), 0.1985 (id 1), 0.1 (id 4): ids 0, 3 and 1 tie within 1%.
    p = torch.tensor([0.2, 0.1985, 0.3, 0.199, 0.1])
    assert alternatives(p, 2, 1e-2) == [(2, 3), (2, 1)]
    assert alternatives(p, 2, 6e-3) == [(2, 3)]  # 0.1985 is out of this band
    assert alternatives(p, 3, 1e-2) == [(2, 0, 1), (2, 3, 1)]
    assert alternatives(p, 5, 1e-2) == []
    # Ids 0 and 1 are equal bit for bit: 1 never comes in without 0.
    assert alternatives(torch.tensor([0.25, 0.25, 0.249, 0.251]), 2, 1e-2) == [(3, 2), (0, 1), (0, 2)]
    assert alternatives(torch.full((8,), 0.125), 2) == []


def test_route_margins_of_a_model_match_its_router_logits(hf_models, monkeypatch):
    folder, _ = hf_models("qwen3moe")  # 3 layers, layer 1 dense; 8 experts, 2 per token
    backend = _backend(folder)
    model = backend.model
    seen = []
    plain_route = reference_model.route

    def spy(h, w_router, k, normalize, *rest):
        seen.append((h.clone(), w_router))
        return plain_route(h, w_router, k, normalize, *rest)

    monkeypatch.setattr(reference_model, "route", spy)
    prompt, more = _tokens(30, 7), _tokens(31, 3)
    want = torch.cat([backend.forward(prompt, 0, all_logits=True), backend.forward(more, 7, all_logits=True)])
    assert model.route_margins is None  # off: nothing is kept

    model.route_margins, model.route_probs = [], []
    seen.clear()
    backend.reset()
    got = torch.cat([backend.forward(prompt, 0, all_logits=True), backend.forward(more, 7, all_logits=True)])
    assert torch.equal(got, want)
    assert [m.shape for m in model.route_margins] == [(7,), (3,)]
    assert [sorted(d) for d in model.route_probs] == [[0, 2], [0, 2]]
    for margins, probs in zip(model.route_margins, model.route_probs):
        layers = [seen.pop(0) for _ in range(2)]
        direct = []
        for li, (h, w_router) in zip((0, 2), layers):
            logits = h.double() @ w_router.double().T
            top = torch.softmax(logits, -1).sort(-1, descending=True).values
            direct.append((top[:, 1] - top[:, 2]) / top[:, 1])
            torch.testing.assert_close(probs[li].double(), torch.softmax(logits, -1), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(margins.double(), torch.stack(direct).min(0).values, rtol=1e-4, atol=1e-6)

    # A dense model has no routing to tip.
    dense = _backend(hf_models("qwen3")[0])
    dense.model.route_margins = []
    dense.forward(prompt, 0)
    assert torch.isinf(dense.model.route_margins[0]).all() and dense.model.route_margins[0].shape == (7,)


# Teacher-forced runs of the GPU MoE tests: a 16-token prompt, then 127 tokens one at a time.
PROXY_PROMPT, PROXY_STEPS = 16, 127


def _proxy_backends(tmp_path, qtype):
    """The tiny MoE preset with its float32-KV reference (standing in for the device) and bf16-KV reference."""
    path, _ = write_synthetic_gguf(tmp_path / "m.gguf", "qwen3moe-tiny", qtype, seed=11, progress=False)
    src = load_source(path, progress=False)
    try:
        n_ctx = PROXY_PROMPT + PROXY_STEPS + 8
        return CPUBackend(src, n_ctx, progress=False), CPUBackend(src, n_ctx, progress=False, kv_dtype=torch.bfloat16)
    finally:
        src.close()


def _proxy_run(backend, seed, choices=None):
    """A teacher-forced run: (passes, logits by position 15..142, router probabilities by position and layer).

    choices: {position: {layer: expert ids}} the run takes instead of its own.
    """
    prompt = torch.randint(0, 512, (PROXY_PROMPT,), generator=torch.Generator().manual_seed(seed)).tolist()
    teacher = torch.randint(0, 512, (PROXY_STEPS,), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    passes = teacher_forced(prompt, teacher)
    model = backend.model
    backend.reset()
    rows, probs = {}, {}
    for tokens, start in passes:
        picks = {}
        for p, by_layer in (choices or {}).items():
            for li, ids in by_layer.items():
                if start <= p < start + len(tokens):
                    picks.setdefault(li, {})[p - start] = ids
        model.route_choices, model.route_probs = picks or None, []
        try:
            logits = backend.forward(tokens, start, all_logits=True)
            for j in range(len(tokens)):
                probs[start + j] = {li: pr[j] for li, pr in model.route_probs[0].items()}
        finally:
            model.route_choices = model.route_probs = None
        rows[start + len(tokens) - 1] = logits[-1]
    return passes, rows, probs


@pytest.mark.parametrize("qtype", ["Q4_K", "IQ4_NL", "F32"])
def test_bf16_kv_reference_follows_the_routing_of_a_float32_kv_run(tmp_path, qtype):
    # The GPU MoE tests' criterion, on the CPU: a float32 KV cache against the
    # bf16 one tips the same near-ties the device's rounding does. Followed,
    # every row agrees to a cosine of 0.999 with few re-routed near-ties.
    device, reference = _proxy_backends(tmp_path, qtype)
    passes, rows, _ = _proxy_run(device, seed=1)
    followed, want = follow_logits(reference, passes, rows, 0.999)
    # Top-1 as the GPU tests count it: the reference's argmax, or within 1% of
    # the row's logit spread of it (random weights leave near-flat rows).
    got = torch.stack(list(rows.values()))
    picked = want.gather(-1, got.argmax(-1, keepdim=True))[:, 0]
    assert (picked >= want.max(-1).values - 0.01 * want.std(-1)).double().mean().item() >= 0.99
    assert all(m < NEAR_TIE for _, _, m in followed.reroutes)


def test_following_takes_near_ties_and_catches_other_routing(tmp_path):
    device, reference = _proxy_backends(tmp_path, "Q8_0")
    passes, _, probs = _proxy_run(reference, seed=1)

    def margin(p):
        return float(routing_margins(probs[p][0].sort(descending=True).values[None], 2)[0])

    def cosine_checks(rows):
        return {p: (lambda want, g=g: cosines(g, want).item() >= 0.999) for p, g in rows.items()}

    # A device that takes the other side of a near-tie in layer 0 (it reaches
    # the later rows through layer 1's keys and values) is followed there.
    near = next(p for p in range(40, 120) if margin(p) < NEAR_TIE and alternatives(probs[p][0], 2))
    _, rows, _ = _proxy_run(device, seed=1, choices={near: {0: alternatives(probs[near][0], 2)[0]}})
    followed = follow(reference, passes, cosine_checks(rows))
    assert not followed.failures and (near, 0) in [(p, li) for p, li, _ in followed.reroutes]

    # One that picks its third most probable expert where the router is far
    # from a tie fails right there.
    far = next(p for p in range(40, 120) if margin(p) > 0.1)
    order = probs[far][0].argsort(descending=True).tolist()
    _, rows, _ = _proxy_run(device, seed=1, choices={far: {0: (order[0], order[2])}})
    followed = follow(reference, passes, cosine_checks(rows))
    assert followed.failures[:1] == [far]


# ---------------------------------------------------------------- bad input


def _raises(exc, path, *words):
    with pytest.raises(exc) as e:
        load_source(path, progress=False)
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    return msg


def _tiny_cfg(**kw):
    return preset_config("qwen3moe-tiny", n_layers=2, **kw)


def _weights(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return {n: (0.02 * rng.standard_normal(s)).astype(np.float32) for n, s in expected_shapes(cfg).items()}


def test_gguf_missing_or_inconsistent_expert_fields(tmp_path):
    cfg = _tiny_cfg()
    path = write_gguf(tmp_path / "ok.gguf", cfg, _weights(cfg), "F16")
    data = path.read_bytes()
    for key in (b"qwen3moe.expert_count", b"qwen3moe.expert_used_count", b"qwen3moe.expert_feed_forward_length"):
        bad = tmp_path / "nokey.gguf"
        at = data.index(key)
        bad.write_bytes(data[: at + len(key) - 1] + b"X" + data[at + len(key) :])
        _raises(ModelLoadError, bad, key.decode(), "missing")

    # More experts per token than experts.
    c = _tiny_cfg(num_experts=4, num_experts_per_tok=5)
    _raises(
        ModelLoadError,
        write_gguf(tmp_path / "k.gguf", c, _weights(c), "F16"),
        "qwen3moe.expert_used_count",
        "between 1 and the expert count 4",
    )
    c = _tiny_cfg(moe_intermediate_size=0)
    w = _weights(_tiny_cfg())
    _raises(ModelLoadError, write_gguf(tmp_path / "f.gguf", c, w, "F16"), "qwen3moe.expert_feed_forward_length")

    # A MoE llama (Mixtral-style) is refused by name, not by missing tensors.
    c = ModelConfig(**{**_tiny_cfg().__dict__, "arch": "llama", "qk_norm": False, "rope_style": "pairs"})
    _raises(
        UnsupportedModelError, write_gguf(tmp_path / "mixtral.gguf", c, _weights(c), "F16"), "mixture-of-experts llama"
    )


def test_gguf_mismatched_or_missing_expert_tensors(tmp_path):
    cfg = _tiny_cfg()
    w = _weights(cfg)
    w["blk.1.ffn_up_exps.weight"] = w["blk.1.ffn_up_exps.weight"][:, :128]
    path = write_gguf(tmp_path / "shape.gguf", cfg, w, "Q8_0")
    _raises(ModelLoadError, path, "blk.1.ffn_up_exps.weight", "[8, 128, 256]", "[8, 256, 256]")

    w = _weights(cfg)
    w["blk.0.ffn_down_exps.weight"] = w["blk.0.ffn_down_exps.weight"][:7]  # one expert short
    _raises(
        ModelLoadError,
        write_gguf(tmp_path / "short.gguf", cfg, w, "F16"),
        "blk.0.ffn_down_exps.weight",
        "[7, 256, 256]",
    )

    w = _weights(cfg)
    del w["blk.1.ffn_gate_exps.weight"]
    _raises(
        ModelLoadError,
        write_gguf(tmp_path / "gone.gguf", cfg, w, "F16"),
        "missing tensors",
        "blk.1.ffn_gate_exps.weight",
    )


def _rewrite_hf(folder, edit_config=None, edit_tensors=None):
    from safetensors.torch import load_file, save_file

    if edit_config:
        cfg = json.loads((folder / "config.json").read_text())
        edit_config(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        t = load_file(folder / "model.safetensors")
        edit_tensors(t)
        save_file(t, folder / "model.safetensors", metadata={"format": "pt"})


def test_hf_missing_or_inconsistent_expert_fields(hf_models, tmp_path):
    import shutil

    src_folder, _ = hf_models("qwen3moe")

    def fresh(name):
        f = tmp_path / name
        shutil.copytree(src_folder, f)
        return f

    def drop_count(c):
        c.pop("num_experts", None)
        c.pop("num_local_experts", None)

    f = fresh("nocount")
    _rewrite_hf(f, drop_count)
    _raises(ModelLoadError, f / "config.json", "num_experts", "missing")

    for key, value, words in (
        ("num_experts_per_tok", 0, ("num_experts_per_tok", "between 1")),
        ("num_experts_per_tok", 9, ("num_experts_per_tok", "expert count 8")),
        ("moe_intermediate_size", None, ("moe_intermediate_size", "missing")),
        ("mlp_only_layers", [5], ("mlp_only_layers", "layer 5")),
        ("norm_topk_prob", "yes", ("norm_topk_prob",)),
        ("decoder_sparse_step", 0, ("decoder_sparse_step",)),
    ):
        f = fresh(f"{key}-{value}")
        _rewrite_hf(f, lambda c, key=key, value=value: c.pop(key) if value is None else c.__setitem__(key, value))
        _raises(ModelLoadError, f / "config.json", *words)


def test_hf_mismatched_or_missing_expert_tensors(hf_models, tmp_path):
    import shutil

    src_folder, _ = hf_models("qwen3moe")
    f = tmp_path / "shape"
    shutil.copytree(src_folder, f)
    key = "model.layers.2.mlp.experts.3.up_proj.weight"
    _rewrite_hf(f, edit_tensors=lambda t: t.__setitem__(key, t[key][:16].clone()))
    _raises(ModelLoadError, f, "expert 3 of blk.2.ffn_up_exps.weight", "[16, 64]", "[32, 64]")

    f = tmp_path / "gone"
    shutil.copytree(src_folder, f)
    _rewrite_hf(f, edit_tensors=lambda t: t.pop("model.layers.0.mlp.experts.5.gate_proj.weight"))
    _raises(ModelLoadError, f, "model.layers.0.mlp.experts.5.gate_proj.weight")

    f = tmp_path / "norouter"
    shutil.copytree(src_folder, f)
    _rewrite_hf(f, edit_tensors=lambda t: t.pop("model.layers.2.mlp.gate.weight"))
    _raises(ModelLoadError, f, "missing tensors", "blk.2.ffn_gate_inp.weight")


def test_cuda_backend_runs_every_supported_arch():
    import helexa_native.backends.cuda as cuda

    assert set(cuda.GPU_ARCHS) == set(SUPPORTED_ARCHS) and "qwen3moe" in cuda.GPU_ARCHS


def test_cuda_backend_refuses_archs_outside_its_list(tmp_path, monkeypatch):
    import helexa_native.backends.cuda as cuda

    path, _ = write_synthetic_gguf(tmp_path / "t.gguf", "qwen3moe-tiny", "Q8_0", progress=False)
    monkeypatch.setattr(cuda, "_native", lambda: SimpleNamespace())
    monkeypatch.setattr(cuda, "GPU_ARCHS", ("llama", "qwen2", "qwen3"))
    # Constructible without the batched GPU step: only the refusal in __init__ is under test.
    monkeypatch.setattr(cuda.CUDABackend, "__abstractmethods__", frozenset())
    src = load_source(path, progress=False)
    try:
        with pytest.raises(
            UnsupportedModelError,
            match=r"'qwen3moe' is not supported by the CUDA backend.*"
            r"device='cpu'",
        ):
            cuda.CUDABackend(src, 0, 64)
    finally:
        src.close()


@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_cuda_host_tensors_hand_over_routers_and_experts(tmp_path, fmt):
    """Routers go as float32; GGUF's stacked experts go whole, an HF folder's per expert, never copied."""
    from helexa_native.backends.cuda import _host_tensors
    from helexa_native.ggml_types import GGML_TYPE_IDS

    if fmt == "gguf":
        path, _ = write_synthetic_gguf(tmp_path / "t.gguf", "qwen3moe-tiny", "Q4_K_M", progress=False)
    else:
        path, _ = write_synthetic_safetensors(tmp_path / "t", "qwen3moe-tiny", "bf16", progress=False)
    src = load_source(path, progress=False)
    try:
        cfg = src.config
        E, F, H = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        got = {name: (tid, shape, arr) for name, tid, shape, arr in _host_tensors(src)}
        for i in range(cfg.num_layers):
            p = f"blk.{i}."
            tid, shape, arr = got[p + "ffn_gate_inp.weight"]
            assert (tid, shape, arr.dtype, arr.flags.c_contiguous) == (0, [E, H], np.float32, True)
            np.testing.assert_array_equal(arr, src.tensors[p + "ffn_gate_inp.weight"].to_float().numpy())
            for name, rows, cols in (
                ("ffn_gate_exps.weight", F, H),
                ("ffn_up_exps.weight", F, H),
                ("ffn_down_exps.weight", H, F),
            ):
                t = src.tensors[p + name]
                want_tid = GGML_TYPE_IDS[t.dtype.upper()]
                if fmt == "gguf":
                    tid, shape, arr = got[p + name]
                    assert (tid, shape, arr.nbytes) == (want_tid, [E, rows, cols], t.nbytes)
                    assert np.may_share_memory(arr, t.data)
                    assert not any(k.startswith(p + name + ":") for k in got)
                else:
                    assert isinstance(t.data, StackedArray) and p + name not in got
                    for e in range(E):
                        tid, shape, arr = got[f"{p}{name}:{e}"]
                        assert (tid, shape, arr.nbytes) == (want_tid, [rows, cols], t.nbytes // E)
                        assert np.may_share_memory(arr, t.data.parts[e])
    finally:
        src.close()


# ---------------------------------------------------------------- parameters, info, engine


def _shapes_params(cfg):
    shapes = expected_shapes(cfg)
    return active_params(cfg, [SimpleNamespace(name=n, shape=s) for n, s in shapes.items()]), sum(
        int(np.prod(s)) for s in shapes.values()
    )


def test_qwen3_30b_a3b_preset_has_the_real_shapes_and_counts():
    c = preset_config("qwen3-30b-a3b")
    assert (c.arch, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (
        "qwen3moe",
        48,
        2048,
        32,
        4,
        128,
        151936,
    )
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.norm_topk_prob) == (128, 8, 768, True)
    assert c.qk_norm and not c.tie_word_embeddings and c.mlp_only_layers == ()
    active, total = _shapes_params(c)
    # The model card: 30.5B parameters, 3.3B activated (embedding and head included).
    assert int(total / 1e8) == 305 and int(active / 1e8) == 33
    attn = 2048 * (4096 + 512 + 512) + 4096 * 2048 + 2 * 128 + 2 * 2048
    expert = 3 * 2048 * 768
    assert active == 2 * 151936 * 2048 + 2048 + 48 * (attn + 128 * 2048 + 8 * expert)


def test_describe_info_and_cli_show_experts(hf_models, capsys):
    from helexa_native.cli import main

    folder, hf = hf_models("qwen3moe")
    h = hf.config
    src = load_source(folder, progress=False)
    try:
        d = describe(src)
    finally:
        src.close()
    total = sum(p.numel() for p in hf.parameters())
    n_moe = h.num_hidden_layers - len(h.mlp_only_layers)
    inactive = n_moe * (h.num_experts - h.num_experts_per_tok) * 3 * h.hidden_size * h.moe_intermediate_size
    assert d["params"] == total and d["active_params"] == total - inactive
    assert (
        d["num_experts"],
        d["num_experts_per_tok"],
        d["moe_intermediate_size"],
        d["norm_topk_prob"],
        d["mlp_only_layers"],
    ) == (8, 2, 32, True, [1])
    json.dumps(d)
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    for k, v in (("num_experts", 8), ("num_experts_per_tok", 2), ("active_params", f"{total - inactive:,}")):
        assert f"{k:<20} {v}\n" in out, out
    with Engine(folder, device="cpu", n_ctx=32) as eng:
        info = eng.info()
        assert info["n_params"] == total and info["n_active_params"] == total - inactive
        assert info["source"]["num_experts"] == 8 and info["config"]["num_experts_per_tok"] == 2


PROMPTS = [_tokens(10 + i, n) for i, n in enumerate((3, 17, 9, 33, 5))]


def test_engine_concurrent_requests_equal_each_alone(hf_models):
    folder, _ = hf_models("qwen3moe")
    with Engine(folder, device="cpu", n_ctx=128, prefix_cache=False, max_batch_tokens=24) as eng:
        alone = [eng.generate(p, temperature=0, max_tokens=10, ignore_eos=True).token_ids for p in PROMPTS]
        results, threads = {}, []
        for i, p in enumerate(PROMPTS):

            def work(i=i, p=p):
                results[i] = eng.generate(p, temperature=0, max_tokens=10 - i, ignore_eos=True).token_ids

            threads.append(threading.Thread(target=work))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [results[i] for i in range(len(PROMPTS))] == [a[: 10 - i] for i, a in enumerate(alone)]
        assert max(eng.load()["batch_size_histogram"]) > 1


# ---------------------------------------------------------------- synthetic models


def test_synthetic_real_shape_gguf(tmp_path):
    # The real layer shapes with fewer experts and one layer, to stay quick.
    path, nbytes = write_synthetic_gguf(
        tmp_path / "a3b.gguf", "qwen3-30b-a3b", "Q4_K_M", progress=False, n_layers=1, vocab_size=1024, num_experts=16
    )
    assert nbytes == path.stat().st_size
    src = load_source(path, progress=False)
    try:
        c = src.config
        assert (c.hidden_size, c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok) == (2048, 768, 16, 8)
        assert c.norm_topk_prob and c.intermediate_size == 6144 and c.mlp_only_layers == ()
        t = src.tensors
        assert (t["blk.0.ffn_gate_exps.weight"].dtype, t["blk.0.ffn_gate_exps.weight"].shape) == (
            "Q4_K",
            (16, 768, 2048),
        )
        assert (t["blk.0.ffn_down_exps.weight"].dtype, t["blk.0.ffn_down_exps.weight"].shape) == (
            "Q6_K",
            (16, 2048, 768),
        )
        assert (t["blk.0.ffn_gate_inp.weight"].dtype, t["blk.0.ffn_gate_inp.weight"].shape) == ("F32", (16, 2048))
        for name in ("blk.0.ffn_down_exps.weight", "blk.0.ffn_gate_inp.weight"):
            w = t[name].to_float()
            assert torch.isfinite(w).all() and abs(float(w.mean())) < 0.003 and 0.017 < float(w.std()) < 0.023
        assert describe(src)["active_params"] < describe(src)["params"]
    finally:
        src.close()


def test_synthetic_tiny_hf_folder_loads_in_transformers(tmp_path):
    import transformers

    folder, _ = write_synthetic_safetensors(tmp_path / "tiny", "qwen3moe-tiny", "fp32", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    src = load_source(folder, progress=False)
    try:
        assert src.config == preset_config("qwen3moe-tiny", name="")
        backend = CPUBackend(src, 32, progress=False)
    finally:
        src.close()
    tokens = list(range(3, 15))
    want = hf_logits(hf, tokens)
    torch.testing.assert_close(
        backend.forward(tokens, 0, all_logits=True), want, rtol=0, atol=1e-4 * max(1.0, want.abs().max().item())
    )
    gg, _ = write_synthetic_gguf(tmp_path / "tiny.gguf", "qwen3moe-tiny", "Q8_0", progress=False)
    src = load_source(gg, progress=False)
    assert src.config == preset_config("qwen3moe-tiny")
    src.close()
