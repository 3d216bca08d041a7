"""Text to token ids and back, on Hugging Face `tokenizers`.

Two sources (see `TokenizerSource`):

* GGUF metadata (`tokenizer.ggml.*`). A GGUF stores no tokenizer.json, only
  the vocabulary, merges, scores and token types, so the `tokenizers` object is
  rebuilt here:
    - model "gpt2": byte-level BPE. The pre-tokenizer split regex comes from
      `pre` (the names llama.cpp writes); llama-3-style vocabularies also take a
      whole pre-token that is itself in the vocabulary before trying merges, as
      llama.cpp does for them.
    - model "llama": SentencePiece-style BPE with byte fallback. GGUF keeps no
      merges for these, so they are recovered from the vocabulary: a merge of
      two pieces into a third ranks by the third's score, which is the order
      SentencePiece's BPE applies them in.
* A Hugging Face folder: tokenizer.json plus tokenizer_config.json.

Encoding runs in `tokenizers`. Decoding does not: every id maps to the exact
bytes it stands for (`token_bytes`), and `decode` joins those and decodes
them as UTF-8 (each invalid sequence becomes one U+FFFD). That single rule is
shared with `IncrementalDetokenizer`, which is what lets a stream of deltas
add up to exactly `decode(ids)`. SentencePiece vocabularies drop the one
leading space their encoder added in front of the text.
"""
from __future__ import annotations

import json
import logging
import operator
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from .config import TokenizerSource
from .errors import TokenizerError

log = logging.getLogger(__name__)

# llama.cpp's token types (tokenizer.ggml.token_type).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

SPIECE_SPACE = "\u2581"

# Pre-tokenizer split regexes, applied in order, each isolating its matches.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

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


def _byte_alphabet() -> dict:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = _byte_alphabet()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
# Maps alphabet characters to the latin-1 character of their byte, and every
# character outside the alphabet to one latin-1 cannot encode, so a single
# `translate(...).encode("latin-1")` either yields a token's bytes or fails.
_TO_LATIN1 = {ord(c): chr(b) for c, b in CHAR_TO_BYTE.items()}
_TO_LATIN1.update({cp: "\uffff" for cp in range(256) if chr(cp) not in CHAR_TO_BYTE})

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def byte_level_bytes(token: str) -> bytes:
    """The bytes a byte-level BPE token spells; text outside the alphabet stands for itself."""
    try:
        return token.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        return token.encode("utf-8")


def byte_level_spelling(text: str) -> str:
    """`text`'s UTF-8 bytes written in the byte-level alphabet."""
    return "".join(BYTE_TO_CHAR[b] for b in text.encode("utf-8"))


def _as_int(v) -> Optional[int]:
    """`v` as an int when it is an integer (numpy integers included), else None."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def _sentencepiece_bytes(token: str, is_byte: bool) -> bytes:
    if is_byte:
        m = _BYTE_TOKEN.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
    return token.replace(SPIECE_SPACE, " ").encode("utf-8")


class Tokenizer:
    """Encodes text to ids and decodes ids to text for one model."""

    def __init__(self, backend: _Backend, *, tokens: Sequence[Optional[str]],
                 token_bytes: Sequence[bytes], special_ids: Iterable[int],
                 bos_token_id: Optional[int], eos_token_ids: Sequence[int],
                 prefix_ids: Sequence[int] = (), suffix_ids: Sequence[int] = (),
                 strip_leading_space: bool = False, kind: str = "byte_level") -> None:
        self._backend = backend
        self._tokens = list(tokens)
        self._bytes = list(token_bytes)
        self._special = frozenset(special_ids)
        self._bos = bos_token_id
        self._eos = list(dict.fromkeys(eos_token_ids))
        self._prefix = list(prefix_ids)
        self._suffix = list(suffix_ids)
        self.strip_leading_space = strip_leading_space
        self.kind = kind
        self._token_to_id = {}
        for i, t in enumerate(self._tokens):
            if t is not None:
                self._token_to_id.setdefault(t, i)

    # ---- construction -------------------------------------------------

    @classmethod
    def from_source(cls, ts: TokenizerSource) -> "Tokenizer":
        """Build from a loader's `TokenizerSource` (kind "gguf" or "hf")."""
        if ts.kind == "gguf":
            if not isinstance(ts.gguf_meta, dict):
                raise TokenizerError("GGUF tokenizer source has no metadata")
            return cls.from_gguf_metadata(ts.gguf_meta)
        if ts.kind == "hf":
            if ts.hf_dir is None:
                raise TokenizerError("HF tokenizer source has no folder")
            return cls.from_hf_dir(ts.hf_dir)
        raise TokenizerError(f"unknown tokenizer source kind {ts.kind!r} (expected 'gguf' or 'hf')")

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        """Build from `tokenizer.ggml.*` fields with the prefix stripped."""
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
                types = [_as_int(t) for t in types]
            except TypeError:
                types = []
            if len(types) != n or any(t is None for t in types):
                raise TokenizerError(
                    f"tokenizer.ggml.token_type must be {n} integers, got {len(types)} entries")

        def token_id(key: str) -> Optional[int]:
            raw = meta.get(key)
            if raw is None:
                return None
            v = _as_int(raw)
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
            v = _as_int(raw)
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
            args = (tokens, types, meta.get("scores"), meta.get("merges"),
                    tokens[unk] if unk is not None else None, bool(add_prefix))
            strip = bool(add_prefix)
            kind = "sentencepiece"
        else:
            raise TokenizerError(
                f"unsupported GGUF tokenizer model {model!r} (supported: 'gpt2', 'llama')")

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
                [AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special) if tokens[i]])
            if user:
                backend.add_tokens(
                    [AddedToken(tokens[i], special=False, normalized=False) for i in user])
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
        return cls(backend, tokens=tokens, token_bytes=token_bytes, special_ids=special,
                   bos_token_id=bos, eos_token_ids=eos_ids,
                   prefix_ids=[bos] if add_bos else [], suffix_ids=[eos] if add_eos else [],
                   strip_leading_space=strip, kind=kind)

    @classmethod
    def from_hf_dir(cls, path) -> "Tokenizer":
        """Build from a folder holding tokenizer.json (and tokenizer_config.json)."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"{path} has no tokenizer.json")
        try:
            spec = json.loads(tj.read_text(encoding="utf-8"))
            backend = _Backend.from_str(json.dumps(spec))
        except Exception as e:
            raise TokenizerError(f"could not read {tj}: {e}") from e
        cfg = {}
        cj = path / "tokenizer_config.json"
        if cj.is_file():
            try:
                cfg = json.loads(cj.read_text(encoding="utf-8"))
            except Exception as e:
                raise TokenizerError(f"could not read {cj}: {e}") from e
            if not isinstance(cfg, dict):
                raise TokenizerError(f"{cj} does not hold a JSON object")

        # Added tokens the config declares but tokenizer.json lacks.
        for entry in (cfg.get("added_tokens_decoder") or {}).values():
            content = entry.get("content") if isinstance(entry, dict) else None
            if isinstance(content, str) and content and backend.token_to_id(content) is None:
                special = bool(entry.get("special", True))
                token = AddedToken(content, special=special, normalized=bool(entry.get("normalized", False)))
                if special:
                    backend.add_special_tokens([token])
                else:
                    backend.add_tokens([token])

        def token_text(key):
            v = cfg.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            return v if isinstance(v, str) else None

        def token_of(key):
            text = token_text(key)
            if text is None:
                return None
            tid = backend.token_to_id(text)
            if tid is None:
                raise TokenizerError(f"tokenizer_config.json {key}={text!r} is not in the vocabulary")
            return tid

        bos = token_of("bos_token")
        eos = token_of("eos_token")
        # Named special tokens that tokenizer.json keeps only in its vocabulary
        # still match whole in text and are skippable, as transformers makes them.
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text = token_text(key)
            tid = backend.token_to_id(text) if text else None
            if tid is not None and tid not in backend.get_added_tokens_decoder():
                backend.add_special_tokens([AddedToken(text, special=True, normalized=False)])

        # The post-processor says what encode(add_special_tokens=True) wraps text in;
        # explicit add_bos_token / add_eos_token settings in the config override it.
        probe = "a"
        with_special = backend.encode(probe, add_special_tokens=True).ids
        plain = backend.encode(probe, add_special_tokens=False).ids
        prefix, suffix = [], []
        for k in range(len(with_special) - len(plain) + 1):
            if with_special[k:k + len(plain)] == plain:
                prefix, suffix = with_special[:k], with_special[k + len(plain):]
                break
        if "add_bos_token" in cfg and bos is not None:
            prefix = [t for t in prefix if t != bos]
            if cfg["add_bos_token"]:
                prefix = [bos] + prefix
        if "add_eos_token" in cfg and eos is not None:
            suffix = [t for t in suffix if t != eos]
            if cfg["add_eos_token"]:
                suffix = suffix + [eos]

        size = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        size = max([size] + [i + 1 for i in added])
        tokens = [backend.id_to_token(i) for i in range(size)]
        special = {i for i, t in added.items() if t.special}
        special.update(i for i in (bos, eos) if i is not None)

        model = spec.get("model") or {}
        dtypes = _decoder_types(spec.get("decoder"))
        byte_fallback = bool(model.get("byte_fallback"))
        if "ByteLevel" in dtypes:
            kind = "byte_level"
            strip = False
        elif "ByteFallback" in dtypes or "Metaspace" in dtypes or byte_fallback:
            kind = "sentencepiece"
            strip = _decoder_strips_space(spec.get("decoder"))
        else:
            kind = "plain"
            strip = False
        token_bytes = []
        for i, t in enumerate(tokens):
            if t is None:
                token_bytes.append(b"")
            elif i in added:
                token_bytes.append(t.encode("utf-8"))
            elif kind == "byte_level":
                token_bytes.append(byte_level_bytes(t))
            elif kind == "sentencepiece":
                token_bytes.append(_sentencepiece_bytes(t, byte_fallback))
            else:
                token_bytes.append(backend.decode([i], skip_special_tokens=False).encode("utf-8"))
        return cls(backend, tokens=tokens, token_bytes=token_bytes, special_ids=special,
                   bos_token_id=bos, eos_token_ids=[eos] if eos is not None else [],
                   prefix_ids=prefix, suffix_ids=suffix, strip_leading_space=strip, kind=kind)

    # ---- encode / decode ----------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token text like <|im_start|> maps to its single id."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and (self._prefix or self._suffix):
            return self._prefix + ids + self._suffix
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`: their bytes joined and decoded as UTF-8 (invalid bytes -> U+FFFD)."""
        data = b"".join(self._bytes_for(i) for i in ids
                        if not (skip_special_tokens and i in self._special))
        text = data.decode("utf-8", errors="replace")
        if self.strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text

    def _bytes_for(self, i) -> bytes:
        try:
            return self._bytes[i] if i >= 0 else self._bad_id(i)
        except (IndexError, TypeError):
            return self._bad_id(i)

    def _bad_id(self, i):
        j = _as_int(i)
        if j is not None and 0 <= j < len(self._bytes):
            return self._bytes[j]
        raise ValueError(f"token id {i!r} is outside the vocabulary (size {len(self._bytes)})")

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes `token_id` stands for (special tokens: their text)."""
        return self._bytes_for(token_id)

    # ---- vocabulary ---------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return len(self._bytes)

    @property
    def bos_token_id(self) -> Optional[int]:
        return self._bos

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a generation (eos first)."""
        return list(self._eos)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._eos[0] if self._eos else None

    @property
    def bos_token(self) -> str:
        """Text of the BOS token, "" when the vocabulary has none."""
        return self._tokens[self._bos] if self._bos is not None else ""

    @property
    def eos_token(self) -> str:
        """Text of the EOS token, "" when the vocabulary has none."""
        return self._tokens[self._eos[0]] if self._eos else ""

    @property
    def add_bos(self) -> bool:
        return bool(self._prefix) and self._prefix[0] == self._bos

    @property
    def add_eos(self) -> bool:
        return bool(self._suffix) and self._suffix[-1] in self._eos

    @property
    def special_ids(self) -> frozenset:
        return self._special

    @property
    def backend(self) -> _Backend:
        """The underlying `tokenizers.Tokenizer` (encoding only)."""
        return self._backend

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of a vocabulary entry as the vocabulary spells it, or None."""
        tid = self._token_to_id.get(token)
        if tid is None:
            tid = self._backend.token_to_id(token)
        return tid

    def id_to_token(self, token_id: int) -> Optional[str]:
        """The vocabulary's spelling of `token_id` (e.g. 'Ġhello', '▁hello')."""
        if not isinstance(token_id, int) or not 0 <= token_id < len(self._tokens):
            return None
        return self._tokens[token_id]

    def is_special(self, token_id: int) -> bool:
        """True for control tokens (BOS, EOS, <|im_start|>...), which skip_special_tokens drops."""
        return token_id in self._special

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, "
                f"bos={self._bos}, eos={self._eos})")


# ---- GGUF builders ------------------------------------------------------

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
    backend = _Backend(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                                  ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend, token_bytes


def _split_merge(m: str, vocab: dict):
    for k in range(1, len(m) - 1):
        if m[k] == " " and m[:k] in vocab and m[k + 1:] in vocab:
            return [m[:k], m[k + 1:]]
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
    token_bytes = [_sentencepiece_bytes(t, ty == TOKEN_BYTE) for t, ty in zip(tokens, types)]
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
    backend = _Backend(models.BPE(vocab=vocab, merges=pairs, unk_token=unk_token,
                                  fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPIECE_SPACE, prepend_scheme="first" if add_prefix else "never", split=False)
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


# ---- tokenizer.json helpers ---------------------------------------------

def _decoder_list(dec) -> list:
    if not isinstance(dec, dict):
        return []
    if dec.get("type") == "Sequence":
        out = []
        for d in dec.get("decoders") or []:
            out.extend(_decoder_list(d))
        return out
    return [dec]


def _decoder_types(dec) -> set:
    return {d.get("type") for d in _decoder_list(dec)}


def _decoder_strips_space(dec) -> bool:
    for d in _decoder_list(dec):
        if d.get("type") == "Strip" and d.get("content", " ") == " " and int(d.get("start", 0)) >= 1:
            return True
        if d.get("type") == "Metaspace":
            scheme = d.get("prepend_scheme")
            if scheme is None:
                return bool(d.get("add_prefix_space", True))
            return scheme != "never"
    return False
