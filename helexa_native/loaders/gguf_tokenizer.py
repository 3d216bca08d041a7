"""A `Tokenizer` rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.

A GGUF stores no tokenizer.json, only the vocabulary, merges, scores and
token types, so the `tokenizers` object is rebuilt here:
  - model "gpt2": byte-level BPE. The pre-tokenizer split regex comes from
    `pre` (the names llama.cpp writes); llama-3-style vocabularies also take a
    whole pre-token that is itself in the vocabulary before trying merges, as
    llama.cpp does for them.
  - model "llama": SentencePiece-style BPE with byte fallback. GGUF keeps no
    merges for these, so they are recovered from the vocabulary: a merge of
    two pieces into a third ranks by the third's score, which is the order
    SentencePiece's BPE applies them in.
"""

from __future__ import annotations

import logging
from typing import Optional

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from ..errors import TokenizerError
from ..tokenizer import (
    CHAR_TO_BYTE,
    SPIECE_SPACE,
    Tokenizer,
    byte_level_bytes,
    byte_level_spelling,
    int_or_none,
    sentencepiece_bytes,
)

log = logging.getLogger(__name__)

# llama.cpp's token types (tokenizer.ggml.token_type).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# Pre-tokenizer split regexes, applied in order, each isolating its matches.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# name -> (split regexes in order, ignore_merges, add_bos default)
_PRE_TOKENIZERS = {
    "gpt2": ((_GPT2_SPLIT,), False, False),
    "default": ((_GPT2_SPLIT,), False, False),
    # StarCoder-lineage vocabularies (SmolLM among them) isolate every digit first.
    "smollm": ((r"\p{N}", _GPT2_SPLIT), False, False),
    "starcoder": ((r"\p{N}", _GPT2_SPLIT), False, False),
    "refact": ((r"\p{N}", _GPT2_SPLIT), False, False),
    "codeshell": ((r"\p{N}", _GPT2_SPLIT), False, False),
    "llama3": ((_LLAMA3_SPLIT,), True, True),
    "llama-v3": ((_LLAMA3_SPLIT,), True, True),
    "llama-bpe": ((_LLAMA3_SPLIT,), True, True),
    "falcon3": ((_LLAMA3_SPLIT,), True, True),
    "pixtral": ((_LLAMA3_SPLIT,), True, True),
    "smaug-bpe": ((_LLAMA3_SPLIT,), False, False),
    "dbrx": ((_LLAMA3_SPLIT,), False, False),
    "qwen2": ((_QWEN2_SPLIT,), False, False),
    "deepseek-r1-qwen": ((_QWEN2_SPLIT,), False, False),
    "megrez": ((_QWEN2_SPLIT,), False, False),
    "tekken": ((_TEKKEN_SPLIT,), False, False),
}
_DEFAULT_PRE = "gpt2"


def tokenizer_from_gguf(meta: dict) -> Tokenizer:
    """The Tokenizer a GGUF file describes, from its `tokenizer.ggml.*` fields with the prefix stripped."""
    model = meta.get("model")
    tokens = meta.get("tokens")
    if not isinstance(tokens, (list, tuple)) or not tokens:
        raise TokenizerError("GGUF metadata has no tokenizer.ggml.tokens")
    if not all(isinstance(t, str) for t in tokens):
        raise TokenizerError("tokenizer.ggml.tokens must be a list of strings")
    tokens = list(tokens)
    n = len(tokens)
    types = meta.get("token_type")
    if types is None:
        types = [TOKEN_NORMAL] * n
    else:
        try:
            types = [int_or_none(t) for t in types]
        except TypeError:
            types = []
        if len(types) != n or any(t is None for t in types):
            raise TokenizerError(f"tokenizer.ggml.token_type must be {n} integers, got {len(types)} entries")

    def token_id(key: str) -> Optional[int]:
        raw = meta.get(key)
        if raw is None:
            return None
        v = int_or_none(raw)
        if v is None or not 0 <= v < n:
            # bos/eos are used on every request; a stray pad/unk/eot id is only a nuisance.
            if key in ("bos_token_id", "eos_token_id"):
                raise TokenizerError(f"tokenizer.ggml.{key}={raw!r} is not a token id (vocabulary of {n})")
            log.warning("ignoring tokenizer.ggml.%s=%r: not a token id", key, raw)
            return None
        return v

    bos = token_id("bos_token_id")
    eos = token_id("eos_token_id")
    unk = token_id("unknown_token_id")
    pad = token_id("padding_token_id")
    eos_ids = [eos] if eos is not None else []
    extra_eos = meta.get("eos_token_ids") or []
    if not isinstance(extra_eos, (list, tuple)):
        extra_eos = [extra_eos]
    for raw in extra_eos:
        v = int_or_none(raw)
        if v is None or not 0 <= v < n:
            raise TokenizerError(f"tokenizer.ggml.eos_token_ids holds {raw!r}, not a token id")
        eos_ids.append(v)
    for key in ("eot_token_id", "eom_token_id"):
        v = token_id(key)
        if v is not None:
            eos_ids.append(v)

    if model == "gpt2":
        pre = meta.get("pre") or _DEFAULT_PRE
        if pre not in _PRE_TOKENIZERS:
            log.warning("unknown GGUF pre-tokenizer %r; splitting text as GPT-2 does", pre)
            pre = _DEFAULT_PRE
        splits, ignore_merges, add_bos_default = _PRE_TOKENIZERS[pre]
        builder = _build_gguf_byte_level
        args = (tokens, types, meta.get("merges"), splits, ignore_merges)
        strip = False
        kind = "byte_level"
    elif model == "llama":
        add_bos_default = True
        add_prefix = meta.get("add_space_prefix", True)
        builder = _build_gguf_sentencepiece
        args = (
            tokens,
            types,
            meta.get("scores"),
            meta.get("merges"),
            tokens[unk] if unk is not None else None,
            bool(add_prefix),
        )
        strip = bool(add_prefix)
        kind = "sentencepiece"
    else:
        raise TokenizerError(f"unsupported GGUF tokenizer model {model!r} (supported: 'gpt2', 'llama')")

    try:
        backend, token_bytes = builder(*args)
    except TokenizerError:
        raise
    except Exception as e:  # tokenizers raises plain Exceptions on bad vocab/merges
        raise TokenizerError(f"could not build the {model} tokenizer from GGUF metadata: {e}") from e

    special = {i for i, t in enumerate(types) if t == TOKEN_CONTROL}
    special.update(i for i in (bos, eos, unk, pad) if i is not None)
    special.update(eos_ids)
    user = [i for i, t in enumerate(types) if t == TOKEN_USER_DEFINED and i not in special and tokens[i]]
    try:
        backend.add_special_tokens(
            [AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special) if tokens[i]]
        )
        if user:
            backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
    except Exception as e:
        raise TokenizerError(f"could not register the GGUF special tokens: {e}") from e
    # Added tokens keep their text: their bytes are what they read as.
    for i in list(special) + user:
        token_bytes[i] = tokens[i].encode("utf-8")

    add_bos = meta.get("add_bos_token")
    add_bos = add_bos_default if add_bos is None else bool(add_bos)
    add_eos = bool(meta.get("add_eos_token", False))
    if add_bos and bos is None:
        raise TokenizerError("tokenizer.ggml.add_bos_token is set but there is no bos_token_id")
    if add_eos and eos is None:
        raise TokenizerError("tokenizer.ggml.add_eos_token is set but there is no eos_token_id")
    return Tokenizer(
        backend,
        tokens=tokens,
        token_bytes=token_bytes,
        special_ids=special,
        bos_token_id=bos,
        eos_token_ids=eos_ids,
        prefix_ids=[bos] if add_bos else [],
        suffix_ids=[eos] if add_eos else [],
        strip_leading_space=strip,
        kind=kind,
    )


def _build_gguf_byte_level(tokens, types, merges, splits, ignore_merges):
    vocab = {}
    token_bytes = []
    respelled = {}
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        spelled = tok
        if ty in (TOKEN_NORMAL, TOKEN_BYTE) and not all(c in CHAR_TO_BYTE for c in tok):
            # Some converters store plain text for a few normal tokens.
            spelled = byte_level_spelling(tok)
            respelled[tok] = spelled
        vocab.setdefault(spelled, i)
        token_bytes.append(byte_level_bytes(spelled))
    if merges is None:
        raise TokenizerError("GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
    pairs = []
    for k, m in enumerate(merges):
        if not isinstance(m, str):
            raise TokenizerError(f"tokenizer.ggml.merges[{k}] is not a string")
        parts = m.split(" ")
        if len(parts) != 2:
            parts = _split_merge(m, vocab)
            if parts is None:
                raise TokenizerError(f"tokenizer.ggml.merges[{k}]={m!r} is not 'left right'")
        pair = tuple(respelled.get(p, p) for p in parts)
        if pair[0] not in vocab or pair[1] not in vocab:
            raise TokenizerError(f"tokenizer.ggml.merges[{k}]={m!r} names a token not in the vocabulary")
        pairs.append(pair)
    backend = _Backend(
        models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges)
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend, token_bytes


def _split_merge(m: str, vocab: dict):
    for k in range(1, len(m) - 1):
        if m[k] == " " and m[:k] in vocab and m[k + 1 :] in vocab:
            return [m[:k], m[k + 1 :]]
    return None


def _build_gguf_sentencepiece(tokens, types, scores, merges, unk_token, add_prefix):
    n = len(tokens)
    if scores is None:
        scores = [-float(i) for i in range(n)]
    else:
        scores = list(scores)
        if len(scores) != n:
            raise TokenizerError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
        try:
            scores = [float(s) for s in scores]
        except (TypeError, ValueError) as e:
            raise TokenizerError(f"tokenizer.ggml.scores must be numbers: {e}") from e
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    token_bytes = [sentencepiece_bytes(t, ty == TOKEN_BYTE) for t, ty in zip(tokens, types)]
    if merges:
        pairs = []
        for k, m in enumerate(merges):
            parts = m.split(" ") if isinstance(m, str) else None
            if parts is None or len(parts) != 2:
                raise TokenizerError(f"tokenizer.ggml.merges[{k}]={m!r} is not 'left right'")
            if parts[0] not in vocab or parts[1] not in vocab:
                raise TokenizerError(f"tokenizer.ggml.merges[{k}]={m!r} names a token not in the vocabulary")
            pairs.append(tuple(parts))
    else:
        pairs = _merges_from_scores(tokens, types, scores, vocab)
    backend = _Backend(models.BPE(vocab=vocab, merges=pairs, unk_token=unk_token, fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPIECE_SPACE, prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend, token_bytes


def _merges_from_scores(tokens, types, scores, vocab):
    """BPE merges implied by a scored vocabulary: every split of a piece into two
    pieces, ranked by the merged piece's score (best first); ties go to the longer
    left part, then the longer right part, then vocabulary order."""
    mergeable = {t for t, ty in zip(tokens, types) if ty in (TOKEN_NORMAL, TOKEN_USER_DEFINED)}
    found = []
    for i, tok in enumerate(tokens):
        if types[i] not in (TOKEN_NORMAL, TOKEN_USER_DEFINED) or vocab.get(tok) != i:
            continue
        local = []
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            if left in mergeable and right in mergeable:
                local.append((vocab[left], vocab[right], left, right))
        local.sort()
        for _, _, left, right in local:
            found.append((scores[i], len(left), len(right), len(found), left, right))
    found.sort(key=lambda f: (-f[0], -f[1], -f[2], f[3]))
    return [(f[4], f[5]) for f in found]
