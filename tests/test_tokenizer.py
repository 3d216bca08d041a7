"""Tokenizer: the default model's GGUF vocabulary against transformers' own GGUF
conversion, synthetic llama-3 / qwen2 / SentencePiece vocabularies written as
GGUF files, tokenizer.json folders, and bad metadata."""

import json
import logging

import gguf
import numpy as np
import pytest
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFBackend

from helexa_native.config import TokenizerSource
from helexa_native.errors import TokenizerError
from helexa_native.loaders.gguf_tokenizer import (
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_USER_DEFINED,
    tokenizer_from_gguf,
)
from helexa_native.tokenizer import BYTE_TO_CHAR, Tokenizer

transformers = pytest.importorskip("transformers")


def read_gguf_tokenizer_meta(path) -> dict:
    """`tokenizer.ggml.*` fields of a GGUF file, prefix stripped, as plain values."""
    reader = gguf.GGUFReader(str(path))
    prefix = "tokenizer.ggml."
    return {k[len(prefix) :]: f.contents() for k, f in reader.fields.items() if k.startswith(prefix)}


def write_tokenizer_gguf(path, arch: str, meta: dict) -> None:
    """A minimal GGUF holding `meta` as tokenizer.ggml.* plus one tensor."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(meta["model"])
    if "pre" in meta:
        w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["token_type"])
    if "merges" in meta:
        w.add_token_merges(meta["merges"])
    if "scores" in meta:
        w.add_token_scores(meta["scores"])
    w.add_bos_token_id(meta["bos_token_id"])
    w.add_eos_token_id(meta["eos_token_id"])
    if "unknown_token_id" in meta:
        w.add_unk_token_id(meta["unknown_token_id"])
    if "add_bos_token" in meta:
        w.add_add_bos_token(meta["add_bos_token"])
    w.add_tensor("token_embd.weight", np.zeros((len(meta["tokens"]), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def hf_from_gguf(tmp_dir, name="model.gguf"):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tmp_dir), gguf_file=name)


TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 12:45 and I've 3,141,592 reasons.",
    "Ünïcödé façade naïve — “quotes” ‘single’ … ©®™",
    "emoji: 🎉🚀👩‍👩‍👧‍👦 ❤️ 🇯🇵 and skin tone 👍🏽",
    "中文字符测试，日本語のテキスト、한국어 텍스트。",
    "def f(x):\n\treturn x**2  # square\n\n\nclass A:\n    pass\n",
    "spaces    between\t\ttabs\n\n\nnewlines   \n  trailing   ",
    "   leading spaces",
    "numbers 0 12 345 6789 1234567890 3.14159 -42 1e10 ²³",
    "mixed123abc456 x1y2 ABC's DON'T we'll they'RE",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi 🙂<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>glued<|endoftext|>",
    "",
    " ",
    "\n",
    "a\u00a0b\u200bc\u3000d",
    "ﷺ 𝕳𝖊𝖑𝖑𝖔 \U0001f9d1\u200d\U0001f4bb",
]


# ---- default model (SmolLM2, gpt2 BPE, pre "smollm") --------------------


@pytest.fixture(scope="session")
def smollm_meta(default_model):
    return read_gguf_tokenizer_meta(default_model)


@pytest.fixture(scope="session")
def smollm_tok(smollm_meta):
    return Tokenizer.from_source(TokenizerSource(kind="gguf", gguf_meta=smollm_meta))


@pytest.fixture(scope="session")
def smollm_hf(default_model, tmp_path_factory):
    """transformers' conversion of the GGUF vocabulary, split as SmolLM2's own
    tokenizer.json splits: every digit isolated, then GPT-2's regex. (The
    conversion knows no "smollm" split and uses GPT-2's alone, which differs
    only on numerals that are not ASCII digits, e.g. "²".)"""
    d = tmp_path_factory.mktemp("smollm_gguf")
    (d / "model.gguf").symlink_to(default_model)
    hf = hf_from_gguf(d)
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return hf


@pytest.mark.parametrize("text", TEXTS)
def test_default_model_encode_matches_transformers(smollm_tok, smollm_hf, text):
    ref = smollm_hf.encode(text, add_special_tokens=False)
    assert smollm_tok.encode(text, add_special_tokens=False) == ref
    assert smollm_tok.encode(text) == smollm_hf.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_default_model_decode_matches_transformers(smollm_tok, smollm_hf, text):
    ids = smollm_hf.encode(text, add_special_tokens=False)
    assert smollm_tok.decode(ids) == smollm_hf.decode(ids, skip_special_tokens=False) == text
    assert smollm_tok.decode(ids, skip_special_tokens=True) == smollm_hf.decode(ids, skip_special_tokens=True)


def test_default_model_isolates_numerals(smollm_tok):
    # "Ġ" + "²" (SmolLM2 learnt no merge across a numeral), not "ĠÂ" + "²".
    ids = smollm_tok.encode(" ²", add_special_tokens=False)
    assert [smollm_tok.id_to_token(i) for i in ids] == ["Ġ", "Â²"]
    assert smollm_tok.encode("2024", add_special_tokens=False) == [34, 32, 34, 36]


def test_default_model_vocabulary(smollm_tok, smollm_hf):
    t = smollm_tok
    assert t.vocab_size == 49152 == len(smollm_hf)
    assert t.bos_token_id == 1 and t.bos_token == "<|im_start|>" == smollm_hf.bos_token
    assert t.eos_token_ids == [2] and t.eos_token == "<|im_end|>" == smollm_hf.eos_token
    assert not t.add_bos and not t.add_eos
    assert t.token_to_id("<|im_start|>") == 1
    assert t.token_to_id("Ġworld") == smollm_hf.convert_tokens_to_ids("Ġworld")
    assert t.token_to_id("no such token here") is None
    for i in (0, 1, 2, 198, 905, 28120, 49151):
        assert t.id_to_token(i) == smollm_hf.convert_ids_to_tokens(i)
    assert t.id_to_token(49152) is None and t.id_to_token(-1) is None
    assert t.is_special(0) and t.is_special(1) and t.is_special(2)
    assert not t.is_special(905)
    assert set(smollm_hf.all_special_ids) <= t.special_ids


def test_default_model_token_bytes(smollm_tok, smollm_hf):
    t = smollm_tok
    assert t.token_bytes(t.token_to_id("Ġworld")) == b" world"
    assert t.token_bytes(198) == b"\n"
    assert t.token_bytes(1) == b"<|im_start|>"
    for text in TEXTS:
        ids = t.encode(text, add_special_tokens=False)
        assert b"".join(t.token_bytes(i) for i in ids) == text.encode("utf-8")
    # An emoji split over byte tokens: each holds part of the character.
    ids = t.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1
    assert all(len(t.token_bytes(i)) < 4 for i in ids)


def test_default_model_random_decode_matches_transformers(smollm_tok, smollm_hf):
    # Arbitrary id sequences, including broken UTF-8, decode as transformers does.
    rng = np.random.default_rng()
    for _ in range(50):
        ids = rng.integers(0, smollm_tok.vocab_size, size=int(rng.integers(1, 40))).tolist()
        assert smollm_tok.decode(ids) == smollm_hf.decode(ids)
    # Byte tokens of an emoji in the wrong order / truncated.
    ids = smollm_tok.encode("🎉中", add_special_tokens=False)
    for cut in (ids[:1], ids[1:], ids[::-1], ids[:-1]):
        assert smollm_tok.decode(cut) == smollm_hf.decode(cut)


def test_bad_ids_raise(smollm_tok):
    with pytest.raises(ValueError):
        smollm_tok.decode([10**9])
    with pytest.raises(ValueError):
        smollm_tok.token_bytes(-1)
    with pytest.raises(TypeError):
        smollm_tok.encode(None)


# ---- tokenizer.json folder ------------------------------------------------


def test_hf_folder_from_saved_gguf_tokenizer(smollm_hf, tmp_path):
    smollm_hf.save_pretrained(tmp_path)
    t = Tokenizer.from_source(TokenizerSource(kind="hf", hf_dir=tmp_path))
    assert t.kind == "byte_level"
    assert t.bos_token_id == 1 and t.eos_token_ids == [2]
    for text in TEXTS:
        ids = smollm_hf.encode(text)
        assert t.encode(text) == ids
        assert t.decode(ids) == smollm_hf.decode(ids)
        assert t.decode(ids, skip_special_tokens=True) == smollm_hf.decode(ids, skip_special_tokens=True)


def test_hf_folder_add_bos_from_config(tmp_path):
    # A llama-style tokenizer.json with no post-processor; the config asks for BOS.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581": 3, "h": 4, "i": 5, "\u2581h": 6, "hi": 7, "\u2581hi": 8}
    vocab.update({f"<0x{b:02X}>": 9 + b for b in range(256)})
    backend = HFBackend(
        models.BPE(
            vocab=vocab,
            merges=[("\u2581", "h"), ("h", "i"), ("\u2581h", "i")],
            unk_token="<unk>",
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    from tokenizers import AddedToken

    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ("<unk>", "<s>", "</s>")])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": {"content": "</s>"},
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": True,
            }
        )
    )
    t = Tokenizer.from_hf_dir(tmp_path)
    assert t.kind == "sentencepiece" and t.strip_leading_space
    assert t.encode("hi hi") == [1, 8, 8, 2]
    assert t.encode("hi hi", add_special_tokens=False) == [8, 8]
    assert t.decode([1, 8, 8, 2]) == "<s> hi hi</s>"
    assert t.decode([8, 8]) == "hi hi" == backend.decode([8, 8])
    assert t.decode([1, 8, 8, 2], skip_special_tokens=True) == "hi hi"
    # é has no piece: byte fallback, and its bytes come back whole.
    ids = t.encode("hé", add_special_tokens=False)
    assert ids == [6, 9 + 0xC3, 9 + 0xA9]
    assert t.decode(ids) == "hé" == backend.decode(ids)
    assert t.token_bytes(9 + 0xC3) == b"\xc3"


# ---- synthetic byte-level vocabularies (llama3 / qwen2 pre-tokenizers) ----

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "It's 2024 and they're shipping version 12345.678 of the tokenizer; we'll see what's new.",
    "def tokenize(text):\n    return [t for t in text.split()]\n\n\tindented\ttabs\n",
    "中文字符测试中文字符 日本語のテキスト 한국어 텍스트 🎉🎉🚀🚀 naïve façade café",
    "numbers 1 22 333 4444 55555 666666 and words again and again the the the",
]
SPECIALS = {
    "llama-bpe": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}
PROBES = [
    "The quick brown fox, it's 12345 and 3.14!",
    "the lazy dog's   spaces\n\n\ttabs\r\nCRLF",
    "中文 日本語 🎉🚀 café naïve",
    "version 12345.678 of 4444 and 55555",
    "def tokenize(text):\n    return 1\n",
    "We'LL SEE what'S new   ",
]


def _train_byte_level(pre: str, split: str, vocab_size: int = 420):
    backend = HFBackend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    specials = SPECIALS[pre]
    token_type = [TOKEN_NORMAL] * len(tokens) + [TOKEN_CONTROL] * len(specials)
    tokens = tokens + specials
    if pre == "qwen2":
        tokens.append("<tool_call>")
        token_type.append(TOKEN_USER_DEFINED)
    return dict(
        model="gpt2",
        pre=pre,
        tokens=tokens,
        token_type=token_type,
        merges=merges,
        bos_token_id=tokens.index(specials[0]),
        eos_token_id=tokens.index(specials[-1]),
    )


LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@pytest.fixture(scope="module", params=["llama-bpe", "qwen2"])
def synthetic_bpe(request, tmp_path_factory):
    pre = request.param
    meta = _train_byte_level(pre, LLAMA3_SPLIT if pre == "llama-bpe" else QWEN2_SPLIT)
    meta["add_bos_token"] = pre == "llama-bpe"
    d = tmp_path_factory.mktemp(pre)
    write_tokenizer_gguf(d / "model.gguf", "llama" if pre == "llama-bpe" else "qwen2", meta)
    ours = tokenizer_from_gguf(read_gguf_tokenizer_meta(d / "model.gguf"))
    return pre, meta, ours, hf_from_gguf(d)


def test_synthetic_bpe_matches_transformers(synthetic_bpe):
    pre, meta, ours, hf = synthetic_bpe
    texts = PROBES + [f"{meta['tokens'][meta['bos_token_id']]}hi{meta['tokens'][meta['eos_token_id']]} there"]
    if pre == "qwen2":
        texts.append('<|im_start|>user\n<tool_call>{"a": 1}<|im_end|>')
    for text in texts:
        ids = hf.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=False) == ids, text
        assert ours.decode(ids) == hf.decode(ids) == text
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert ours.add_bos == (pre == "llama-bpe")
    assert (ours.encode("hi")[0] == meta["bos_token_id"]) == (pre == "llama-bpe")


def _pieces(tok, text):
    return [tok.token_bytes(i).decode("utf-8", "replace") for i in tok.encode(text, add_special_tokens=False)]


def test_digit_grouping_follows_pre_tokenizer(synthetic_bpe):
    pre, meta, ours, _ = synthetic_bpe
    pieces = _pieces(ours, "x 1234567")
    digits = [p for p in pieces if p.strip().isdigit()]
    if pre == "llama-bpe":
        # llama-3 groups up to three digits; the leading space is its own pre-token.
        assert "".join(digits) == "1234567"
        assert all(len(p) <= 3 for p in digits) and len(digits) >= 3
    else:
        assert digits == list("1234567")


def test_special_and_user_defined_tokens_are_single(synthetic_bpe):
    pre, meta, ours, _ = synthetic_bpe
    for s in SPECIALS[pre]:
        sid = meta["tokens"].index(s)
        assert ours.encode(f"a{s}b", add_special_tokens=False).count(sid) == 1
        assert ours.is_special(sid)
    if pre == "qwen2":
        uid = meta["tokens"].index("<tool_call>")
        assert uid in ours.encode("x<tool_call>y", add_special_tokens=False)
        assert not ours.is_special(uid)
        assert ours.decode([uid], skip_special_tokens=True) == "<tool_call>"


def test_llama3_whole_word_ignores_merges():
    # "abc" is a token no merge can build; llama-3 takes it whole, qwen2 cannot.
    byte_tokens = [BYTE_TO_CHAR[b] for b in range(256)]
    tokens = byte_tokens + ["ab", "abc", "<|s|>"]
    types = [TOKEN_NORMAL] * (len(tokens) - 1) + [TOKEN_CONTROL]
    base = dict(
        model="gpt2",
        tokens=tokens,
        token_type=types,
        merges=["a b"],
        bos_token_id=len(tokens) - 1,
        eos_token_id=len(tokens) - 1,
    )
    llama3 = tokenizer_from_gguf(dict(base, pre="llama-bpe"))
    qwen2 = tokenizer_from_gguf(dict(base, pre="qwen2"))
    abc, ab, c = tokens.index("abc"), tokens.index("ab"), tokens.index("c")
    assert llama3.encode("abc", add_special_tokens=False) == [abc]
    assert qwen2.encode("abc", add_special_tokens=False) == [ab, c]
    assert llama3.encode("abc") == [len(tokens) - 1, abc]  # llama-3 adds BOS by default
    assert qwen2.encode("abc") == [ab, c]


def test_unknown_pre_tokenizer_warns_and_works(caplog):
    tokens = [BYTE_TO_CHAR[b] for b in range(256)] + ["<e>"]
    meta = dict(
        model="gpt2",
        pre="some-future-model",
        tokens=tokens,
        token_type=[TOKEN_NORMAL] * 256 + [TOKEN_CONTROL],
        merges=[],
        bos_token_id=256,
        eos_token_id=256,
    )
    with caplog.at_level(logging.WARNING):
        t = tokenizer_from_gguf(meta)
    assert "some-future-model" in caplog.text
    assert t.decode(t.encode("héllo wörld")) == "héllo wörld"


# ---- synthetic SentencePiece ("llama") vocabulary ------------------------


def _spm_meta():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 256
    scores = [0.0] * len(tokens)
    merged = [
        "\u2581t",
        "he",
        "\u2581the",
        "\u2581a",
        "in",
        "\u2581w",
        "or",
        "ld",
        "orld",
        "\u2581world",
        "ll",
        "llo",
        "\u2581he",
        "\u2581hello",
        "\u2581\u2581",
        "\u2581in",
        "\u2581and",
        "an",
        "nd",
        "\u2581an",
        "wor",
    ]
    for k, piece in enumerate(merged):
        tokens.append(piece)
        types.append(TOKEN_NORMAL)
        scores.append(-1.0 - k)
    for k, ch in enumerate("\u2581abcdefghijklmnopqrstuvwxyzTHW,.!?'"):
        tokens.append(ch)
        types.append(TOKEN_NORMAL)
        scores.append(-100.0 - k)
    return dict(
        model="llama",
        tokens=tokens,
        token_type=types,
        scores=scores,
        bos_token_id=1,
        eos_token_id=2,
        unknown_token_id=0,
    )


@pytest.fixture(scope="module")
def synthetic_spm(tmp_path_factory):
    meta = _spm_meta()
    d = tmp_path_factory.mktemp("spm")
    write_tokenizer_gguf(d / "model.gguf", "llama", meta)
    ours = Tokenizer.from_source(TokenizerSource(kind="gguf", gguf_meta=read_gguf_tokenizer_meta(d / "model.gguf")))
    return meta, ours, hf_from_gguf(d)


SPM_TEXTS = [
    "the world",
    "hello world and the world",
    " the  world ",
    "Hello, World!",
    "in and an",
    "naïve café 中文 🎉",
    "line\nbreak\ttab",
    "<s>the</s> world",
    "",
    "  leading",
    "wor world worl",
]


def test_spm_hand_computed(synthetic_spm):
    meta, t, _ = synthetic_spm
    tid = {tok: i for i, tok in enumerate(meta["tokens"])}
    # ▁ t h e ▁ w o r l d -> (▁,t) (h,e) (▁t,he) (▁,w) (o,r) (l,d) (or,ld) (▁w,orld)
    assert t.encode("the world") == [1, tid["\u2581the"], tid["\u2581world"]]
    assert t.add_bos and not t.add_eos
    assert t.encode("hello", add_special_tokens=False) == [tid["\u2581hello"]]
    # é is not a piece: its two UTF-8 bytes come from byte fallback.
    ids = t.encode("é", add_special_tokens=False)
    assert ids == [tid["\u2581"], tid["<0xC3>"], tid["<0xA9>"]]
    assert t.token_bytes(tid["<0xC3>"]) == b"\xc3"
    assert t.token_bytes(tid["\u2581world"]) == b" world"
    assert t.decode(ids) == "é"
    assert t.decode([1] + ids) == "<s> é"
    assert t.decode([1] + ids, skip_special_tokens=True) == "é"
    assert t.bos_token == "<s>" and t.eos_token == "</s>"
    assert t.is_special(0) and t.is_special(1) and t.is_special(2)


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_spm_matches_transformers(synthetic_spm, text):
    meta, t, hf = synthetic_spm
    ref = hf.encode(text)
    assert t.encode(text) == ref
    assert t.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert t.decode(ref) == hf.decode(ref)
    assert t.decode(ref, skip_special_tokens=True) == hf.decode(ref, skip_special_tokens=True)


def test_spm_hf_folder_matches_transformers(synthetic_spm, tmp_path):
    _, _, hf = synthetic_spm
    hf.save_pretrained(tmp_path)
    t = Tokenizer.from_source(TokenizerSource(kind="hf", hf_dir=tmp_path))
    assert t.kind == "sentencepiece" and t.strip_leading_space
    assert t.bos_token_id == 1 and t.eos_token_ids == [2] and t.add_bos
    for text in SPM_TEXTS:
        ids = hf.encode(text)
        assert t.encode(text) == ids
        assert t.decode(ids) == hf.decode(ids)
        assert t.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


# ---- bad metadata ---------------------------------------------------------


def _good_meta():
    return dict(
        model="gpt2",
        pre="gpt2",
        tokens=[BYTE_TO_CHAR[b] for b in range(256)] + ["<e>"],
        token_type=[TOKEN_NORMAL] * 256 + [TOKEN_CONTROL],
        merges=[],
        bos_token_id=256,
        eos_token_id=256,
    )


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(tokens=None), "tokens"),
        (dict(tokens=[]), "tokens"),
        (dict(tokens=[1, 2, 3]), "strings"),
        (dict(model="bert"), "bert"),
        (dict(model=None), "model"),
        (dict(token_type=[1, 1]), "token_type"),
        (dict(merges=None), "merges"),
        (dict(merges=["nospace"]), "merges"),
        (dict(merges=["a zz"]), "merge"),
        (dict(bos_token_id=10**6), "bos_token_id"),
        (dict(eos_token_id="x"), "eos_token_id"),
        (dict(add_bos_token=True, bos_token_id=None), "bos"),
    ],
)
def test_bad_gguf_metadata_raises(change, words):
    meta = dict(_good_meta(), **change)
    meta = {k: v for k, v in meta.items() if v is not None}
    with pytest.raises(TokenizerError, match=words):
        tokenizer_from_gguf(meta)


def test_bad_spm_metadata_raises():
    meta = _spm_meta()
    meta["scores"] = meta["scores"][:-1]
    with pytest.raises(TokenizerError, match="scores"):
        tokenizer_from_gguf(meta)


def test_bad_sources_raise(tmp_path):
    with pytest.raises(TokenizerError, match="kind"):
        Tokenizer.from_source(TokenizerSource(kind="sentencepiece"))
    with pytest.raises(TokenizerError):
        Tokenizer.from_source(TokenizerSource(kind="gguf", gguf_meta=None))
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_source(TokenizerSource(kind="hf", hf_dir=tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError):
        Tokenizer.from_hf_dir(tmp_path)


def test_numpy_metadata_values_are_accepted():
    meta = _good_meta()
    meta.update(
        token_type=np.array(meta["token_type"], dtype=np.int32),
        bos_token_id=np.uint32(256),
        eos_token_id=np.int64(256),
        add_bos_token=np.bool_(True),
    )
    t = tokenizer_from_gguf(meta)
    assert t.bos_token_id == 256 and type(t.bos_token_id) is int
    assert t.encode("hi") == [256, ord("h"), ord("i")]


def test_stray_optional_ids_are_ignored(caplog):
    meta = dict(_good_meta(), padding_token_id=10**6, unknown_token_id=-1)
    with caplog.at_level(logging.WARNING):
        t = tokenizer_from_gguf(meta)
    assert "padding_token_id" in caplog.text
    assert t.special_ids == {256}


def test_loader_source_builds_the_same_tokenizer(default_model, smollm_tok):
    from helexa_native.loaders import load_source

    src = load_source(default_model, progress=False)
    try:
        t = Tokenizer.from_source(src.tokenizer)
    finally:
        src.close()
    for text in TEXTS:
        assert t.encode(text) == smollm_tok.encode(text)
    assert t.eos_token_ids == smollm_tok.eos_token_ids and t.vocab_size == smollm_tok.vocab_size
