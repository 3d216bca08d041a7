"""Text to token ids and back, on Hugging Face `tokenizers`.

A `Tokenizer` comes from a loader's `TokenizerSource`: a Hugging Face folder
(tokenizer.json plus tokenizer_config.json, read here) or GGUF metadata,
which loaders/gguf_tokenizer.py rebuilds into a `tokenizers` object.

Encoding runs in `tokenizers`. Decoding does not: every id maps to the exact
bytes it stands for (`token_bytes`), and `decode` joins those and decodes
them as UTF-8 (each invalid sequence becomes one U+FFFD). That single rule is
shared with `IncrementalDetokenizer`, which is what lets a stream of deltas
add up to exactly `decode(ids)`. SentencePiece vocabularies drop the one
leading space their encoder added in front of the text.

Byte-level BPE vocabularies spell bytes in GPT-2's printable alphabet
(`BYTE_TO_CHAR`), defined here once for readers and writers alike.
"""

from __future__ import annotations

import json
import operator
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

from .config import TokenizerSource
from .errors import TokenizerError

SPIECE_SPACE = "\u2581"


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


def int_or_none(v) -> Optional[int]:
    """`v` as an int when it is an integer (numpy integers included), else None."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def sentencepiece_bytes(token: str, is_byte: bool) -> bytes:
    """The bytes a SentencePiece token spells: <0xNN> byte tokens their byte, U+2581 a space."""
    if is_byte:
        m = _BYTE_TOKEN.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
    return token.replace(SPIECE_SPACE, " ").encode("utf-8")


def check_unicode(text: str) -> None:
    """ValueError where `text` holds an unpaired surrogate (a str can; Unicode text cannot, nor any tokenizer)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"text holds an unpaired surrogate U+{ord(text[e.start]):04X} at index {e.start}; it is not Unicode text"
        ) from None


class Tokenizer:
    """Encodes text to ids and decodes ids to text for one model."""

    def __init__(
        self,
        backend: _Backend,
        *,
        tokens: Sequence[Optional[str]],
        token_bytes: Sequence[bytes],
        special_ids: Iterable[int],
        bos_token_id: Optional[int],
        eos_token_ids: Sequence[int],
        prefix_ids: Sequence[int] = (),
        suffix_ids: Sequence[int] = (),
        strip_leading_space: bool = False,
        kind: str = "byte_level",
    ) -> None:
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
            from .loaders.gguf_tokenizer import tokenizer_from_gguf

            return tokenizer_from_gguf(ts.gguf_meta)
        if ts.kind == "hf":
            if ts.hf_dir is None:
                raise TokenizerError("HF tokenizer source has no folder")
            return cls.from_hf_dir(ts.hf_dir)
        raise TokenizerError(f"unknown tokenizer source kind {ts.kind!r} (expected 'gguf' or 'hf')")

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
            if with_special[k : k + len(plain)] == plain:
                prefix, suffix = with_special[:k], with_special[k + len(plain) :]
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
                token_bytes.append(sentencepiece_bytes(t, byte_fallback))
            else:
                token_bytes.append(backend.decode([i], skip_special_tokens=False).encode("utf-8"))
        return cls(
            backend,
            tokens=tokens,
            token_bytes=token_bytes,
            special_ids=special,
            bos_token_id=bos,
            eos_token_ids=[eos] if eos is not None else [],
            prefix_ids=prefix,
            suffix_ids=suffix,
            strip_leading_space=strip,
            kind=kind,
        )

    # ---- encode / decode ----------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token text like <|im_start|> maps to its single id."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        check_unicode(text)
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and (self._prefix or self._suffix):
            return self._prefix + ids + self._suffix
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`: their bytes joined and decoded as UTF-8 (invalid bytes -> U+FFFD)."""
        data = b"".join(self._bytes_for(i) for i in ids if not (skip_special_tokens and i in self._special))
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
        j = int_or_none(i)
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
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, bos={self._bos}, eos={self._eos})"


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
