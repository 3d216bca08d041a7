"""IncrementalDetokenizer: streamed deltas add up to Tokenizer.decode and never
split a UTF-8 character."""

import numpy as np
import pytest
from test_tokenizer import TEXTS, _spm_meta

from helexa_native.detokenizer import IncrementalDetokenizer
from helexa_native.loaders.gguf_tokenizer import tokenizer_from_gguf
from helexa_native.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def smollm(default_model):
    from helexa_native.loaders import load_source

    src = load_source(default_model, progress=False)
    src.close()
    return Tokenizer.from_source(src.tokenizer)


@pytest.fixture(scope="module")
def spm():
    return tokenizer_from_gguf(_spm_meta())


def stream(tok, ids, skip_special_tokens=False):
    d = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    chunks = [d.push(i) for i in ids]
    chunks.append(d.flush())
    return chunks


def check(tok, ids, skip_special_tokens=False):
    chunks = stream(tok, ids, skip_special_tokens)
    full = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(chunks) == full
    if REPLACEMENT not in full:
        assert not any(REPLACEMENT in c for c in chunks)
    return chunks


def _partial_byte_ids(tok):
    """Ids whose bytes are not valid UTF-8 on their own (pieces of characters)."""
    out = []
    for i in range(tok.vocab_size):
        try:
            tok.token_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            out.append(i)
    return out


@pytest.mark.parametrize("text", TEXTS)
def test_real_text_streams_exactly(smollm, text):
    ids = smollm.encode(text)
    chunks = check(smollm, ids)
    assert "".join(chunks) == text
    check(smollm, ids, skip_special_tokens=True)


def test_emoji_and_cjk_are_held_until_complete(smollm):
    text = "a🎉b中c👩‍👩‍👧"
    ids = smollm.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(smollm)
    held = 0
    out = []
    for i in ids:
        chunk = d.push(i)
        if chunk == "" and d.pending_bytes:
            held += 1
        out.append(chunk)
        # Whatever came out so far is a prefix of the text made of whole characters.
        assert text.startswith("".join(out))
    assert held > 0
    assert d.flush() == "" and "".join(out) == text
    assert d.token_ids == ids


def test_random_sequences_match_decode(smollm):
    rng = np.random.default_rng()
    partial = np.array(_partial_byte_ids(smollm))
    assert len(partial) > 100
    for _ in range(200):
        n = int(rng.integers(1, 60))
        ids = rng.integers(0, smollm.vocab_size, size=n)
        # Mostly byte pieces, so characters are split, completed and broken often.
        mask = rng.random(n) < 0.7
        ids[mask] = rng.choice(partial, size=int(mask.sum()))
        ids = ids.tolist()
        check(smollm, ids)
        check(smollm, ids, skip_special_tokens=True)


def test_truncated_character_flushes_as_replacement(smollm):
    ids = smollm.encode("ok🎉", add_special_tokens=False)[:-1]
    d = IncrementalDetokenizer(smollm)
    text = "".join(d.push(i) for i in ids)
    assert text == "ok" and d.pending_bytes
    tail = d.flush()
    assert tail == REPLACEMENT
    assert text + tail == smollm.decode(ids)


def test_special_tokens_skipped_or_kept(smollm):
    ids = smollm.encode("<|im_start|>user\nhi 🙂<|im_end|>")
    assert "".join(stream(smollm, ids)) == "<|im_start|>user\nhi 🙂<|im_end|>"
    assert "".join(stream(smollm, ids, skip_special_tokens=True)) == "user\nhi 🙂"


def test_sentencepiece_leading_space(spm):
    tid = {spm.id_to_token(i): i for i in range(spm.vocab_size)}
    d = IncrementalDetokenizer(spm)
    assert d.push(tid["\u2581hello"]) == "hello"  # the encoder's added space is dropped
    assert d.push(tid["\u2581world"]) == " world"
    ids = spm.encode("the world and é 中")
    assert ids[0] == spm.bos_token_id
    assert "".join(check(spm, ids, skip_special_tokens=True)) == "the world and é 中"
    assert "".join(check(spm, ids)) == "<s> the world and é 中"


def test_sentencepiece_random_sequences(spm):
    rng = np.random.default_rng()
    for _ in range(200):
        ids = rng.integers(0, spm.vocab_size, size=int(rng.integers(1, 40))).tolist()
        check(spm, ids)
        check(spm, ids, skip_special_tokens=True)


class _CountingTokenizer:
    """Forwards to a tokenizer, counting calls; refuses whole-sequence decodes."""

    def __init__(self, tok):
        self._tok = tok
        self.byte_calls = 0
        self.strip_leading_space = tok.strip_leading_space

    def token_bytes(self, i):
        self.byte_calls += 1
        return self._tok.token_bytes(i)

    def is_special(self, i):
        return self._tok.is_special(i)

    def decode(self, *a, **k):
        raise AssertionError("the detokenizer must not re-decode the sequence")


def test_constant_work_per_token(smollm):
    ids = smollm.encode("Streaming text 中文 🎉 " * 300, add_special_tokens=False)
    counting = _CountingTokenizer(smollm)
    d = IncrementalDetokenizer(counting)
    out = "".join(d.push(i) for i in ids) + d.flush()
    assert counting.byte_calls == len(ids)
    assert out == smollm.decode(ids)


def test_bad_id_leaves_state_unchanged(smollm):
    d = IncrementalDetokenizer(smollm)
    first = smollm.encode("🎉", add_special_tokens=False)
    d.push(first[0])
    with pytest.raises(ValueError):
        d.push(smollm.vocab_size + 5)
    rest = "".join(d.push(i) for i in first[1:]) + d.flush()
    assert rest == "🎉" and d.token_ids == first


def test_continuation_keeps_word_boundary_space(spm):
    # A completion of "Once upon a" must read " time", not "time".
    ids = spm.encode("time flies", add_special_tokens=False)
    assert spm.decode(ids) == "time flies"
    d = IncrementalDetokenizer(spm, keep_leading_space=True)
    out = "".join(d.push(i) for i in ids) + d.flush()
    assert out == " time flies"
    plain = IncrementalDetokenizer(spm)
    assert "".join(plain.push(i) for i in ids) + plain.flush() == "time flies"
