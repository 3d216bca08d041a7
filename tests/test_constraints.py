"""Structured outputs: masks, matchers and the grammar cache, then greedy decoding of the
default model on CPU under each kind of constraint."""

import json
import re

import jsonschema
import pytest
import torch

from helexa_native import constraints
from helexa_native.constraints import (
    GrammarCompiler,
    GrammarSpec,
    _unpack_shifts,
    allocate_mask,
    apply_mask,
    fill_masks,
    grammar_spec,
    json_object_spec,
    json_schema_spec,
    regex_spec,
    response_format_spec,
    tool_call_spec,
    unpack_mask,
)
from helexa_native.errors import ConstraintError
from helexa_native.loaders.gguf_tokenizer import (
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    tokenizer_from_gguf,
)
from helexa_native.tokenizer import Tokenizer
from helexa_native.tool_calls import parse_tool_calls

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 20},
        "likes_cats": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "likes_cats"],
    "additionalProperties": False,
}
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 24},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Current time in a timezone",
            "parameters": {
                "type": "object",
                "properties": {"tz": {"type": "string", "maxLength": 24}},
                "required": ["tz"],
            },
        },
    },
]


@pytest.fixture(scope="module")
def tok(default_model):
    from helexa_native.loaders import load_source

    src = load_source(default_model)
    try:
        return Tokenizer.from_source(src.tokenizer)
    finally:
        src.close()


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompiler(tok)


def allowed_ids(mask, vocab):
    return set(unpack_mask(mask, vocab).nonzero().flatten().tolist())


def force(matcher, tok, target: str) -> list:
    """Drive `matcher` to spell `target`, at each step taking the allowed token that covers the
    most of what is left; fails if the grammar does not allow the text. Returns the ids."""
    data = target.encode("utf-8")
    ids = []
    while data:
        allowed = allowed_ids(matcher.fill_mask(), matcher.vocab_size)
        best = max(
            (
                t
                for t in allowed
                if t not in tok.special_ids and tok.token_bytes(t) and data.startswith(tok.token_bytes(t))
            ),
            key=lambda t: len(tok.token_bytes(t)),
            default=None,
        )
        assert best is not None, f"grammar allows no token for {data[:40]!r}"
        assert matcher.accept(best), matcher.error
        ids.append(best)
        data = data[len(tok.token_bytes(best)) :]
    return ids


# ---- masks and matchers (no model run) ------------------------------------


def test_schema_walk_mask_and_end(compiler, tok):
    doc = json.dumps({"name": 'Zoë "Z"\n', "age": 41, "city": "Köln", "likes_cats": False}, ensure_ascii=False)
    m = compiler.matcher(json_schema_spec(PERSON))
    eos = tok.eos_token_id
    for t in tok.encode(doc, add_special_tokens=False):
        mask = m.fill_mask()
        allowed = allowed_ids(mask, compiler.vocab_size)
        assert eos not in allowed and not m.is_finished()
        if t not in allowed:  # forced text is allowed only in the tokenizer's own spelling
            force(m, tok, tok.decode([t]))
        else:
            assert m.accept(t), m.error
    assert m.is_accepting()
    allowed = allowed_ids(m.fill_mask(), compiler.vocab_size)
    assert allowed == {eos} and m.is_finished()
    assert m.accept(eos) and m.error is None


def test_force_helper_and_rejection(compiler, tok):
    m = compiler.matcher(json_schema_spec(PERSON))
    force(m, tok, '{"name": "Al", "age": 7, "city": "Oslo", "likes_cats": true}')
    assert m.is_finished()
    m = compiler.matcher(json_schema_spec(PERSON))
    bad = tok.encode("hello", add_special_tokens=False)[0]
    assert bad not in allowed_ids(m.fill_mask(), compiler.vocab_size)
    assert not m.accept(bad)
    assert m.error and m.is_finished()
    # A matcher in error allows only the end of the sequence.
    assert allowed_ids(m.fill_mask(), compiler.vocab_size) == {tok.eos_token_id}


def test_every_eos_id_and_padded_vocabulary(tok):
    comp = GrammarCompiler(tok, vocab_size=tok.vocab_size + 40, eos_token_ids=[2, 0])
    assert comp.mask_words == (tok.vocab_size + 40 + 31) // 32
    m = comp.matcher(regex_spec("ab?"))
    allowed = allowed_ids(m.fill_mask(), comp.vocab_size)
    assert not allowed & {0, 2}
    assert not any(i >= tok.vocab_size for i in allowed)
    force(m, tok, "a")
    allowed = allowed_ids(m.fill_mask(), comp.vocab_size)
    assert {0, 2} <= allowed and not m.is_finished()
    assert m.accept(0) and m.is_finished()  # a second end id ends the grammar as the first does
    with pytest.raises(ValueError):
        GrammarCompiler(tok, vocab_size=10)
    with pytest.raises(ValueError):
        GrammarCompiler(tok, eos_token_ids=[])


def test_fill_mask_into_batch_rows(compiler, tok):
    batch = allocate_mask(compiler.vocab_size, batch=2)
    a = compiler.matcher(regex_spec("x+"))
    b = compiler.matcher(regex_spec("y+"))
    a.fill_mask(batch[0])
    b.fill_mask(batch[1])
    x = tok.encode("x", add_special_tokens=False)[0]
    y = tok.encode("y", add_special_tokens=False)[0]
    rows = unpack_mask(batch, compiler.vocab_size)
    assert rows[0, x] and not rows[0, y] and rows[1, y] and not rows[1, x]
    with pytest.raises(ValueError):
        a.fill_mask(torch.zeros(3, dtype=torch.int32))


@pytest.mark.parametrize("pool", [True, False], ids=["thread-pool", "without-executor"])
def test_fill_masks_in_parallel_equal_row_by_row(tok, pool, monkeypatch):
    if not pool:  # an llguidance without LLExecutor: the rows are filled one by one
        monkeypatch.setattr(constraints, "_executor", False)
    # Two end ids (the end-token fix-up runs per row), matchers at different
    # places of different grammars, one in error (only the ends allowed).
    comp = GrammarCompiler(tok, vocab_size=tok.vocab_size + 40, eos_token_ids=[2, 0])
    matchers = [comp.matcher(regex_spec("ab?")), comp.matcher(regex_spec("x+")), comp.matcher(regex_spec("[0-9]{3}"))]
    force(matchers[0], tok, "a")
    force(matchers[2], tok, "12")
    broken = comp.matcher(regex_spec("q"))
    assert not broken.accept(tok.encode("z", add_special_tokens=False)[0])
    matchers.append(broken)
    table = fill_masks(matchers, allocate_mask(comp.vocab_size, batch=len(matchers)))
    for m, row in zip(matchers, table):
        assert torch.equal(row, m.fill_mask())
    assert allowed_ids(table[3], comp.vocab_size) == {0, 2}
    with pytest.raises(ValueError):
        fill_masks(matchers, allocate_mask(comp.vocab_size, batch=2))
    with pytest.raises(ValueError):
        fill_masks(matchers, torch.zeros(len(matchers), comp.mask_words))


def test_forced_tokens(compiler, tok):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    m = compiler.matcher(compiler.tool_call_spec(tools, "required", "hermes", parallel_tool_calls=False))
    target = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    forced = m.forced_tokens()
    prefix = tok.decode(forced)
    assert target.startswith(prefix) and len(prefix) > len("<tool_call>\n")
    for t in forced:
        assert m.accept(t)
    force(m, tok, target[len(prefix) :])
    assert m.is_finished() and m.forced_tokens() == []
    assert compiler.matcher(regex_spec("[ab]")).forced_tokens() == []


def test_rollback_and_reset(compiler, tok):
    m = compiler.matcher(regex_spec("[0-9]{3}"))
    ids = force(m, tok, "123")
    assert m.is_finished() and m.tokens_accepted == len(ids)
    m.rollback(1)
    assert not m.is_finished()
    m.reset()
    assert m.tokens_accepted == 0
    with pytest.raises(ValueError):
        m.rollback(1)


@pytest.mark.parametrize("as_bool", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_apply_mask(as_bool, batched):
    vocab = 70
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[[0, 31, 32, 33, 63, 64, 69]] = True
    words = torch.zeros(3, dtype=torch.int64)
    for i in allowed.nonzero().flatten().tolist():
        words[i // 32] |= 1 << (i % 32)
    bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    assert torch.equal(unpack_mask(bitmask, vocab), allowed)
    assert torch.equal(_unpack_shifts(bitmask, vocab), allowed)  # the path for GPU masks
    mask = allowed if as_bool else bitmask
    logits = torch.randn(vocab)
    if batched:
        logits = logits.repeat(2, 1)
        mask = mask.repeat(2, 1)
    ref = logits.clone()
    with torch.inference_mode():
        inf_logits = logits.clone()  # backends return inference tensors
    for lg in (logits, inf_logits):
        out = apply_mask(lg, mask)
        assert out is lg
        keep = allowed.expand_as(lg)
        assert torch.equal(lg[keep], ref[keep])
        assert torch.isneginf(lg[~keep]).all()
    with pytest.raises(ValueError):
        apply_mask(torch.zeros(100), bitmask)
    with pytest.raises(TypeError):
        apply_mask(torch.zeros(vocab), torch.zeros(3))


@pytest.mark.gpu
def test_apply_mask_on_gpu_logits(compiler, tok):
    m = compiler.matcher(regex_spec("[0-9]+"))
    mask = m.fill_mask()
    logits = torch.randn(compiler.vocab_size, device="cuda")
    apply_mask(logits, mask)
    allowed = unpack_mask(mask, compiler.vocab_size)
    assert torch.equal(torch.isfinite(logits).cpu(), allowed)


def test_cache_by_spec(tok):
    comp = GrammarCompiler(tok, cache_size=2)
    a = comp.compile(json_schema_spec(PERSON))
    assert comp.compile(json_schema_spec(json.dumps(PERSON))) is a  # keyed by canonical text
    assert comp.compile(json_schema_spec(PERSON, strict=False)) is not a
    comp.compile(regex_spec("a+"))
    assert comp.cached == 2 and comp.compile(regex_spec("a+")) is comp.compile(regex_spec("a+"))
    assert comp.compile(json_schema_spec(PERSON)) is not a  # evicted, compiled again
    m1, m2 = a.matcher(), a.matcher()
    force(m1, tok, '{"name": "')
    assert m2.tokens_accepted == 0 and not m2.is_finished()


def test_sentencepiece_leading_space():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 256
    pieces = ["\u2581{", "\u2581", "{", "}", '"', ":", ",", "a", "b", "1", "2", "\u25811", '":', '\u2581"']
    tokens += pieces
    types += [TOKEN_NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(k) for k in range(len(pieces))]
    spm = tokenizer_from_gguf(
        dict(
            model="llama",
            tokens=tokens,
            token_type=types,
            scores=scores,
            bos_token_id=1,
            eos_token_id=2,
            unknown_token_id=0,
        )
    )
    assert spm.strip_leading_space
    comp = GrammarCompiler(spm)
    assert comp.leading_space
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    m = comp.matcher(json_schema_spec(schema))
    first = allowed_ids(m.fill_mask(), comp.vocab_size)
    assert spm.token_to_id("\u2581{") in first and spm.token_to_id("{") in first
    ids = spm.encode('{"a": 12}', add_special_tokens=False)
    assert spm.token_bytes(ids[0]).startswith(b" ")
    for t in ids:
        assert m.accept(t), (spm.token_bytes(t), m.error)
    assert m.is_finished() and spm.decode(ids) == '{"a": 12}'
    assert not GrammarCompiler(spm, leading_space=False).leading_space


# ---- specs and their errors ----------------------------------------------


def test_response_format_specs():
    assert response_format_spec(None) is None
    assert response_format_spec({"type": "text"}) is None
    assert response_format_spec({"type": "json_object"}) == json_object_spec()
    spec = response_format_spec(
        {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    )
    assert spec.kind == "json_schema" and not spec.lenient and json.loads(spec.source) == PERSON
    assert list(json.loads(spec.source)["properties"]) == list(PERSON["properties"])  # order kept
    assert response_format_spec({"type": "json_schema", "json_schema": {"schema": PERSON}}).lenient
    assert response_format_spec({"type": "json_schema", "json_schema": {"name": "x"}}) == json_object_spec()
    assert response_format_spec({"type": "regex", "regex": "a|b"}) == regex_spec("a|b")
    assert response_format_spec({"type": "grammar", "grammar": 'root ::= "x"', "syntax": "gbnf"}) == GrammarSpec(
        "gbnf", 'root ::= "x"'
    )


@pytest.mark.parametrize(
    "rf,match",
    [
        ("json", "response_format must be an object"),
        ({"type": "yaml"}, "response_format.type 'yaml' is not supported"),
        ({}, "response_format.type None is not supported"),
        ({"type": "json_schema"}, "response_format.json_schema must be an object"),
        ({"type": "json_schema", "json_schema": {"schema": [1]}}, "schema must be a JSON object"),
        ({"type": "json_schema", "json_schema": {"schema": "{bad"}}, "schema is not valid JSON"),
        ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}, "strict must be a boolean"),
        ({"type": "regex"}, "regex must be a non-empty string"),
        ({"type": "grammar", "grammar": "start: x", "syntax": "peg"}, "syntax 'peg' is not supported"),
    ],
)
def test_bad_response_format(rf, match):
    with pytest.raises(ConstraintError, match=re.escape(match)):
        response_format_spec(rf)


@pytest.mark.parametrize(
    "spec,match",
    [
        (json_schema_spec({"type": "foo"}), "invalid JSON schema: Invalid type: foo"),
        (
            json_schema_spec({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}),
            "/$defs/missing' does not exist",
        ),
        (
            json_schema_spec({"type": "string", "minLength": 5, "maxLength": 2}),
            "minLength (5) is greater than maxLength (2)",
        ),
        (json_schema_spec({"type": "string", "format": "no-such-format"}), "Unknown format: no-such-format"),
        (json_schema_spec({"type": "string", "pattern": "(ab"}), "unclosed group"),
        (regex_spec("(ab"), "invalid regex"),
        (grammar_spec("start: undefined_rule"), 'unknown name: "undefined_rule"'),
        (grammar_spec("root ::= missing-rule", syntax="gbnf"), "Rule 'missing-rule' not found"),
        (GrammarSpec("yaml", "x"), "unknown grammar kind 'yaml'"),
    ],
)
def test_bad_grammars_raise_clear_errors(compiler, spec, match):
    with pytest.raises(ConstraintError, match=re.escape(match)) as e:
        compiler.compile(spec)
    assert isinstance(e.value, ValueError)
    assert "\n" not in str(e.value)


def test_lenient_schema_ignores_unknown_keywords(compiler, tok):
    m = compiler.matcher(json_schema_spec({"type": "string", "format": "no-such-format", "maxLength": 3}, strict=False))
    force(m, tok, '"abc"')
    assert m.is_finished()


def test_gbnf_grammar(compiler, tok):
    m = compiler.matcher(grammar_spec('root ::= "yes" | "no"', syntax="gbnf"))
    force(m, tok, "no")
    assert m.is_finished()


# ---- tool-call grammars -----------------------------------------------------


class _Markers:
    """A tokenizer view that claims some marker texts as tokens (special or not)."""

    def __init__(self, tok, special=(), plain=()):
        self._tok = tok
        self._ids = {t: 100000 + i for i, t in enumerate(list(special) + list(plain))}
        self._special = {self._ids[t] for t in special}

    def token_to_id(self, text):
        return self._ids.get(text, self._tok.token_to_id(text))

    def is_special(self, tid):
        return tid in self._special or self._tok.is_special(tid)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_tool_spec_choices(tok):
    assert tool_call_spec(WEATHER_TOOLS, "auto", "hermes", tok) is None
    assert tool_call_spec(WEATHER_TOOLS, "none", "hermes", tok) is None
    assert tool_call_spec(WEATHER_TOOLS, None, "hermes", tok) is None
    req = tool_call_spec(WEATHER_TOOLS, "required", "hermes", tok)
    assert 'start: call ("\\n" call)*' in req.source and "anyOf" in req.source
    one = tool_call_spec(WEATHER_TOOLS, "required", "hermes", tok, parallel_tool_calls=False)
    assert "start: call\n" in one.source
    named = tool_call_spec(WEATHER_TOOLS, {"type": "function", "function": {"name": "get_time"}}, "llama3_json", tok)
    assert "get_time" in named.source and "get_weather" not in named.source and '"parameters"' in named.source
    special = tool_call_spec(WEATHER_TOOLS, "required", "mistral", _Markers(tok, special=["[TOOL_CALLS]"]))
    assert special.source.startswith("start: <[100000]>")
    new_form = tool_call_spec(WEATHER_TOOLS, "required", "mistral", _Markers(tok, special=["[TOOL_CALLS]", "[ARGS]"]))
    assert "start: call+" in new_form.source and '"get_weather" <[100001]> j0' in new_form.source


@pytest.mark.parametrize(
    "tools,choice,match",
    [
        ([], "required", "tools must be a non-empty list"),
        ([{"type": "retrieval"}], "required", "tools[0] must be"),
        ([{"type": "function", "function": {"name": "bad name"}}], "required", "tools[0].function.name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": [1]}}],
            "required",
            "tools[0].function.parameters must be a JSON object",
        ),
        (WEATHER_TOOLS, {"type": "function", "function": {"name": "nope"}}, "names function 'nope'"),
        (WEATHER_TOOLS, "always", "tool_choice must be"),
    ],
)
def test_bad_tools(tok, tools, choice, match):
    with pytest.raises(ConstraintError, match=re.escape(match)):
        tool_call_spec(tools, choice, "hermes", tok)


def test_bad_tool_schema_fails_to_compile(compiler):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "strict": True,
                "parameters": {"type": "object", "properties": {"a": {"type": "foo"}}},
            },
        }
    ]
    with pytest.raises(ConstraintError, match="Invalid type: foo"):
        compiler.compile(compiler.tool_call_spec(tools, "required", "hermes"))


@pytest.mark.parametrize(
    "parser,text",
    [
        (
            "hermes",
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>',
        ),
        (
            "llama3_json",
            '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}; '
            '{"name": "get_time", "parameters": {"tz": "CET"}}',
        ),
        (
            "mistral",
            '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}, '
            '{"name": "get_time", "arguments": {"tz": "CET"}}]',
        ),
        (
            "mistral_args",
            '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo", "unit": "celsius"}[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}',
        ),
    ],
)
def test_tool_grammar_accepts_its_format(tok, parser, text):
    view = _Markers(tok, plain=["[ARGS]"]) if parser == "mistral_args" else tok
    parser = parser.replace("_args", "")
    comp = GrammarCompiler(tok)
    spec = tool_call_spec(WEATHER_TOOLS, "required", parser, view)
    m = comp.matcher(spec)
    force(m, tok, text)
    assert m.is_accepting()
    calls = parse_tool_calls(text, parser).tool_calls
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    # Arguments outside the tool's schema are refused.
    m = comp.matcher(spec)
    bad = text.replace('"celsius"', '"kelvin"')
    with pytest.raises(AssertionError, match="grammar allows no token"):
        force(m, tok, bad)


# ---- greedy decoding of the default model under constraints --------------


@pytest.fixture(scope="module")
def engine(default_model):
    from helexa_native.engine import Engine

    with Engine(default_model, device="cpu") as eng:
        yield eng


def greedy(engine, compiler, messages, spec, max_tokens=64, fast_forward=True) -> str:
    """Greedy decoding with the grammar's mask applied to every step's logits; with
    fast_forward, tokens the grammar forces run through the model in one pass."""
    matcher = compiler.matcher(spec)
    ids = engine.apply_chat_template(messages, tokenize=True)
    backend = engine.backend
    backend.reset()
    logits = backend.forward(ids, 0)
    pos, out = len(ids), []
    while len(out) < max_tokens:
        step = matcher.forced_tokens() if fast_forward else []
        if not step:
            apply_mask(logits, matcher.fill_mask())
            step = [int(torch.argmax(logits))]
            if step[0] in compiler.eos_token_ids:
                break
        for tok in step:
            assert matcher.accept(tok), matcher.error
        out += step
        if matcher.is_finished():
            break
        logits = backend.forward(step, pos)
        pos += len(step)
    assert matcher.is_finished() or matcher.is_accepting(), "ran out of tokens inside the grammar"
    return engine.tokenizer.decode(out)


@pytest.fixture(scope="module")
def engine_compiler(engine):
    return GrammarCompiler(
        engine.tokenizer, vocab_size=engine.config.vocab_size, eos_token_ids=engine.tokenizer.eos_token_ids
    )


@pytest.mark.slow
def test_model_json_schema(engine, engine_compiler):
    text = greedy(
        engine,
        engine_compiler,
        [{"role": "user", "content": "Describe Alice, a 30 year old from Paris who likes cats, as JSON."}],
        response_format_spec(
            {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
        ),
    )
    value = json.loads(text)
    jsonschema.validate(value, PERSON)
    assert list(value) == list(PERSON["properties"])


@pytest.mark.slow
def test_model_json_object(engine, engine_compiler):
    text = greedy(
        engine,
        engine_compiler,
        [{"role": "user", "content": 'Return JSON with the keys "city" and "country" for Paris.'}],
        response_format_spec({"type": "json_object"}),
    )
    assert isinstance(json.loads(text), dict)


@pytest.mark.slow
def test_model_regex(engine, engine_compiler):
    pattern = r"\(\d{3}\) \d{3}-\d{4}"
    text = greedy(
        engine,
        engine_compiler,
        [{"role": "user", "content": "Give me a US phone number."}],
        regex_spec(pattern),
        fast_forward=False,
    )
    assert re.fullmatch(pattern, text)


@pytest.mark.slow
def test_model_lark_grammar(engine, engine_compiler):
    grammar = 'start: ANSWER ", because " REASON "."\nANSWER: "yes" | "no"\nREASON: /[a-z ]{1,40}/'
    text = greedy(engine, engine_compiler, [{"role": "user", "content": "Is the sky blue?"}], grammar_spec(grammar))
    assert re.fullmatch(r"(yes|no), because [a-z ]{1,40}\.", text)


@pytest.mark.slow
@pytest.mark.parametrize("parser", ["hermes", "llama3_json", "mistral"])
def test_model_tool_call(engine, engine_compiler, parser):
    spec = engine_compiler.tool_call_spec(
        WEATHER_TOOLS, {"type": "function", "function": {"name": "get_weather"}}, parser
    )
    text = greedy(engine, engine_compiler, [{"role": "user", "content": "What's the weather in Paris?"}], spec)
    res = parse_tool_calls(text, parser)
    assert res.content is None and len(res.tool_calls) == 1
    fn = res.tool_calls[0]["function"]
    assert fn["name"] == "get_weather"
    jsonschema.validate(json.loads(fn["arguments"]), WEATHER_TOOLS[0]["function"]["parameters"])
