"""GPT-2-style byte-level BPE, built from a GGUF file's tokenizer metadata (or in code: tiny_bpe).

    from models.bpe import BPETokenizer
    tok = BPETokenizer.from_gguf(metadata)        # metadata from models.gguf.read_gguf_header
    ids = tok.encode("<|im_start|>user\\nHi!")     # [1, 4093, 198, 26843, 17]
    tok.decode(ids) == "<|im_start|>user\\nHi!"

Encoding (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", sec. 2.2):
1. special tokens (GGUF token types 3 = control, 4 = user-defined) are cut out of the text whole;
2. the rest is pre-tokenised by a regex (below), so merges never cross word/number boundaries;
3. each piece's UTF-8 bytes are spelled with GPT-2's byte -> printable-character map;
4. merges apply by rank: the adjacent pair with the lowest rank merges everywhere, repeat.

Pre-tokenisers (GGUF `tokenizer.ggml.pre`), as llama.cpp's llama-vocab.cpp defines them:
    "gpt2":   's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
    "smollm": every \\p{N} character split off alone first, then the gpt2 regex
(SmolLM2's own tokenizer.json: Digits(individual_digits=True) then ByteLevel). transformers 5.23
loads an unknown `pre` like "smollm" with the gpt2 regex only; the two differ only when merges
join digits, which SmolLM2's vocabulary never does (tests/test_decoder.py checks SST-2 dev).
Python's `re` has no \\p{..}: the classes are built from unicodedata, and \\s is Unicode
White_Space as in Rust/oniguruma (Python's \\s would also match U+001C..U+001F).
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections.abc import Sequence

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types cut out of text whole
PRE_TOKENIZERS = ("gpt2", "smollm")
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte map: printable Latin-1 bytes stand for themselves, the other 68 bytes get
    chr(256 + k) in byte order, so every token is printable.  bytes_to_unicode()[32] -> "Ġ" """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(extra)}}


@functools.cache
def _char_class(prefix: str) -> str:
    """Ranges of every code point whose Unicode category starts with `prefix` ("L" or "N")."""
    ranges, start = [], None
    for cp in range(sys.maxunicode + 2):
        inside = cp <= sys.maxunicode and unicodedata.category(chr(cp)).startswith(prefix)
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            ranges.append(f"\\U{start:08x}-\\U{cp - 1:08x}")
            start = None
    return "".join(ranges)


@functools.cache
def pre_tokenizer_regex() -> re.Pattern:
    """The gpt2 pre-tokeniser regex with \\p{L}, \\p{N}, \\s spelled out for `re`.
    pre_tokenizer_regex().findall("I'm  ok") -> ['I', "'m", ' ', ' ok']"""
    L, N, S = _char_class("L"), _char_class("N"), _WHITE_SPACE
    return re.compile(f"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+"
                      f"|[{S}]+(?![^{S}])|[{S}]+")


@functools.cache
def _digit_regex() -> re.Pattern:
    return re.compile(f"([{_char_class('N')}])")


class BPETokenizer:
    """Byte-level BPE over `tokens` (the vocabulary in GPT-2's byte spelling, id = index) and
    `merges` ("a b" strings or pairs, best first). Ids of `special` tokens match whole in text."""

    def __init__(self, tokens: Sequence[str], merges: Sequence[str | tuple[str, str]],
                 special: Sequence[int] = (), bos_id: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None,
                 pre: str = "gpt2", add_bos: bool = False):
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"pre-tokeniser {pre!r} is not supported: use one of "
                             f"{PRE_TOKENIZERS} (GGUF tokenizer.ggml.pre)")
        self.tokens = list(tokens)
        self.vocab = {t: i for i, t in enumerate(self.tokens)}  # a repeated token keeps the last
        for name, i in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id),
                        *(("special", i) for i in special)):
            if i is not None and not 0 <= i < len(self.tokens):
                raise ValueError(f"{name}={i} is not a token id in [0, {len(self.tokens)})")
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, m in enumerate(merges):
            pair = tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            if len(pair) != 2 or pair[0] + pair[1] not in self.vocab:
                raise ValueError(f"merge {rank} {m!r} is not two tokens whose join is in the "
                                 "vocabulary: tokens and merges do not belong together")
            self.ranks.setdefault(pair, rank)
        self.byte_char = bytes_to_unicode()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        # an empty special token would match between every two characters: it never occurs
        self.special = {self.tokens[i]: i for i in special if self.tokens[i]}
        # longest first, so "<|im_start|>" wins over a special token that is its prefix
        alternation = "|".join(map(re.escape, sorted(self.special, key=len, reverse=True)))
        self._special_re = re.compile(f"({alternation})") if self.special else None
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.pre, self.add_bos = pre, add_bos
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_gguf(cls, metadata: dict) -> BPETokenizer:
        """From GGUF metadata (`tokenizer.ggml.*`); the model must be "gpt2" (byte-level BPE)."""
        get = metadata.get
        if get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"tokenizer.ggml.model={get('tokenizer.ggml.model')!r}: only "
                             "'gpt2' (byte-level BPE) is supported")
        tokens, merges = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.merges")
        types = get("tokenizer.ggml.token_type") or [1] * len(tokens or [])
        if not (isinstance(tokens, list) and isinstance(merges, list) and isinstance(types, list)
                and all(isinstance(t, str) for t in tokens + merges) and len(types) == len(tokens)
                and all(type(t) is int for t in types)):
            raise ValueError("GGUF metadata needs tokenizer.ggml.tokens and .merges as lists of "
                             "strings, and token_type (if present) as many integers as tokens")
        for key in ("bos_token_id", "eos_token_id", "padding_token_id", "pre", "add_bos_token"):
            v = get(f"tokenizer.ggml.{key}")
            want = {"pre": str, "add_bos_token": bool}.get(key, int)
            if v is not None and type(v) is not want:
                raise ValueError(f"GGUF metadata tokenizer.ggml.{key}={v!r} is invalid: use "
                                 f"{'a string' if want is str else want.__name__}")
        pre = get("tokenizer.ggml.pre", "gpt2")
        return cls(tokens, merges, [i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)],
                   get("tokenizer.ggml.bos_token_id"), get("tokenizer.ggml.eos_token_id"),
                   get("tokenizer.ggml.padding_token_id"), "gpt2" if pre == "default" else pre,
                   bool(get("tokenizer.ggml.add_bos_token", False)))

    def __len__(self) -> int:
        return len(self.tokens)

    def _bpe(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-tokenised piece.  _bpe(" the") -> (260,) with SmolLM2's merges"""
        if piece in self._cache:
            return self._cache[piece]
        # bytes without a token are dropped, as transformers does (SmolLM2 lacks 21 of the 256,
        # e.g. 0x1D and 0xF5..0xFF, which no code point below U+140000 uses as a lead byte)
        parts = [c for c in map(self.byte_char.__getitem__, piece.encode("utf-8"))
                 if c in self.vocab]
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, sys.maxsize))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = tuple(self.vocab[p] for p in parts)
        if len(self._cache) >= 1 << 17:  # bound memory on long streams of unique words
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def pre_tokenize(self, text: str) -> list[str]:
        """Pieces that BPE sees (no special tokens).  pre_tokenize(" 42x") -> [" ", "4", "2", "x"]
        with pre="smollm", [" 42", "x"] with "gpt2"."""
        chunks = _digit_regex().split(text) if self.pre == "smollm" else [text]
        return [p for chunk in chunks if chunk for p in pre_tokenizer_regex().findall(chunk)]

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS first if add_bos (default: the GGUF add_bos_token flag)."""
        add_bos = self.add_bos if add_bos is None else add_bos
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True but this tokenizer has no bos_id")
        ids = [self.bos_id] if add_bos else []
        chunks = self._special_re.split(text) if self._special_re else [text]
        for k, chunk in enumerate(chunks):  # odd positions hold the captured special tokens
            if k % 2:
                ids.append(self.special[chunk])
            elif chunk:
                for piece in self.pre_tokenize(chunk):
                    ids.extend(self._bpe(piece))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD, as in GPT-2."""
        out, special_ids = bytearray(), set(self.special.values())
        for i in ids:
            if not 0 <= i < len(self.tokens):
                raise ValueError(f"token id {i} is not in [0, {len(self.tokens)})")
            if i in special_ids:
                if not skip_special:
                    out += self.tokens[i].encode("utf-8")
                continue
            out += bytes(self.char_byte[c] for c in self.tokens[i])
        return out.decode("utf-8", errors="replace")


_TINY_WORDS = (" positive", " negative", " yes", " no", " acceptable", " unacceptable",
               " entailment", " neutral", " contradiction", " the", " a", " and", " of", " is",
               " it", " movie", " film", " good", " bad", "Review", " Sentiment", "Sentence",
               " Question", " Answer", "Premise", " Hypothesis", ":\n", "ing", "ed")


def tiny_bpe() -> BPETokenizer:
    """A small byte-level BPE for tests and the tiny-llama model: 3 special tokens, the 256 byte
    tokens and merges that spell each word of _TINY_WORDS left to right; len(tiny_bpe()) < 512."""
    byte_tokens = list(bytes_to_unicode().values())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_tokens]
    merges: list[tuple[str, str]] = []
    for word in _TINY_WORDS:
        spelled = "".join(bytes_to_unicode()[b] for b in word.encode())
        for k in range(2, len(spelled) + 1):  # merge (prefix, next char) for each prefix
            left, right = spelled[:k - 1], spelled[k - 1]
            if left + right not in tokens:
                tokens.append(left + right)
                merges.append((left, right))
    return BPETokenizer(tokens, merges, special=[0, 1, 2], bos_id=0, eos_id=0, pad_id=0,
                        pre="smollm")
