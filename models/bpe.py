"""GPT-2-style byte-level BPE, from GGUF tokenizer metadata, an HF tokenizer.json, or in code.

    tok = BPETokenizer.from_gguf(metadata)        # metadata from models.gguf.read_gguf_header
    ids = tok.encode("<|im_start|>user\\nHi!")     # [1, 4093, 198, 26843, 17]

Encoding (Radford et al. 2019, sec. 2.2): special tokens are cut out whole; regexes pre-tokenise
the rest (gpt2's, SmolLM2's digits first, or the Split regex of Llama 3 / Qwen2); each piece's
UTF-8 bytes are spelled with GPT-2's byte map, then merged by rank.
"""

import functools
import itertools
import json
import math
import os
import re
import sys
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from models.checkpoint import exists, field, read_json
from models.tokenizer import Memo

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types cut out of text whole
CACHE_SIZE = 1 << 16  # pieces the piece -> ids cache holds
CACHE_MAX_PIECE = 256  # longer pieces are not cached
TOKENIZER_LIMIT = 1 << 26  # bytes of tokenizer.json (real ones take < 20 MB)
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {"gpt2": (GPT2_SPLIT,), "smollm": (r"\p{N}", GPT2_SPLIT)}  # regexes, in turn


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
    inside = [cp for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp))[0] == prefix]
    runs = itertools.groupby(inside, key=lambda cp, k=itertools.count(): cp - next(k))
    return "".join(f"\\U{r[0]:08x}-\\U{r[-1]:08x}" for r in (list(g) for _, g in runs))


def bpe_merge(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply merges by rank, minbpe's loop: while some adjacent pair has a rank, every
    occurrence of the lowest-ranked pair merges, left to right.
    bpe_merge(list("aaa"), {("a", "a"): 0}) -> ["aa", "a"]"""
    parts = list(parts)
    while len(parts) > 1:
        pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, math.inf))
        if pair not in ranks:
            return parts
        i = 0
        while i < len(parts) - 1:  # the merged token is not looked at again
            if (parts[i], parts[i + 1]) == pair:
                parts[i:i + 2] = [pair[0] + pair[1]]
            i += 1
    return parts


@functools.cache
def split_regex(pattern: str) -> re.Pattern:
    """An HF Split pre-tokenizer regex (Oniguruma syntax) for Python's `re`, compiled once:
    \\p{L}, \\p{N}, \\s and \\S spelled out (\\s as Unicode White_Space); any other escape class
    is refused.  split_regex(r"\\p{N}{1,3}").findall("12345") -> ["123", "45"]"""
    body = {"\\p{L}": _char_class("L"), "\\p{N}": _char_class("N"), "\\s": _WHITE_SPACE}

    def spell(m: re.Match, in_class: bool = False) -> str:
        t = m.group()
        if t[0] == "[":  # a class: the escapes inside it spelled without brackets
            return re.sub(r"\\p\{[LN]\}|\\.", lambda e: spell(e, True), t)
        if t in body or t == "\\S" and not in_class:
            return body[t] if in_class else f"[{body.get(t, '^' + _WHITE_SPACE)}]"
        if t[1] in "rntf\\.'?+*()[]{}|^$-/ ":
            return t
        raise ValueError(f"Split regex escape {t!r} is not supported (\\p{{L}}, \\p{{N}}, "
                         "\\s, \\S and literal escapes only)")
    try:
        return re.compile(re.sub(r"\[(?:\\.|[^\\\]])*\]|\\p\{[LN]\}|\\.", spell, pattern))
    except re.error as e:
        raise ValueError(f"Split regex {pattern!r} does not compile in Python ({e})") from None


def isolate(regex: re.Pattern, text: str) -> list[str]:
    """`text` cut before and after every match of `regex`, empty pieces dropped (HF's Split
    behaviour "Isolated").  isolate(re.compile(r"[0-9]"), "a12") -> ["a", "1", "2"]"""
    pieces, at = [], 0
    for m in regex.finditer(text):
        pieces += [text[at:m.start()], m.group()]
        at = m.end()
    return [p for p in [*pieces, text[at:]] if p]


def _refuse(what: str, obj, fix: str) -> ValueError:
    return ValueError(f"{what} {json.dumps(obj)[:200]} is not supported ({fix})")


def _pre_tokenizer(p) -> tuple[str, str | None]:
    """tokenizer.json's pre_tokenizer -> (pre, split regex): ByteLevel -> ("gpt2", None),
    Digits + ByteLevel (SmolLM2) -> ("smollm", None), Split(regex, Isolated) +
    ByteLevel(use_regex=false) (Llama 3, Qwen2) -> ("gpt2", regex)."""
    steps = p.get("pretokenizers") if isinstance(p, dict) and p.get("type") == "Sequence" else [p]
    *first, last = steps if isinstance(steps, list) and 1 <= len(steps) <= 2 else [None]
    if isinstance(last, dict) and last.get("type") == "ByteLevel" and \
            not last.get("add_prefix_space"):
        use_regex, split = last.get("use_regex", True), (first or [{}])[0]
        if use_regex and first in ([], [{"type": "Digits", "individual_digits": True}]):
            return "smollm" if first else "gpt2", None
        regex = split.get("pattern", {}).get("Regex") if isinstance(split, dict) else None
        if not use_regex and isinstance(regex, str) and split.get("type") == "Split" and \
                split.get("behavior") == "Isolated" and not split.get("invert"):
            return "gpt2", regex
    raise _refuse("pre-tokenizer", p, "ByteLevel with its gpt2 regex and add_prefix_space="
                  "false, optionally after Digits(individual_digits=true), or an isolating "
                  "Split regex then ByteLevel(use_regex=false)")


def _template_bos(p) -> int | None:
    """The BOS id a post-processor prepends: None for none, ByteLevel or a template of `$A`
    alone; the id for `<bos> $A` (Llama 3); anything else is refused."""
    bos, steps = None, p.get("processors") if isinstance(p, dict) and \
        p.get("type") == "Sequence" else [p]
    for q in steps if isinstance(steps, list) else [steps]:
        if q in (None, "ByteLevel") or isinstance(q, dict) and q.get("type") == "ByteLevel":
            continue
        try:  # single = [$A] or [{"SpecialToken": {"id": name}}, $A], name with one id
            *first, seq = q["single"]
            ids = [q["special_tokens"][f["SpecialToken"]["id"]]["ids"] for f in first]
            ok = q["type"] == "TemplateProcessing" and seq["Sequence"]["id"] == "A" and \
                len(ids) <= 1 and all(len(i) == 1 and type(i[0]) is int for i in ids)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise _refuse("post_processor", q, "none, ByteLevel, or a template that prepends "
                          "one token")
        bos = ids[0][0] if ids else bos
    return bos


class BPETokenizer:
    """Byte-level BPE over `tokens` (GPT-2's byte spelling, id = index) and `merges` ("a b" or
    pairs, best first); `special` ids match whole in text; ignore_merges, nfc and split (a Split
    regex replacing gpt2's) are tokenizer.json options."""

    def __init__(self, tokens: Sequence[str], merges: Sequence[str | tuple[str, str]],
                 special: Sequence[int] = (), bos_id: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None,
                 pre: str = "gpt2", add_bos: bool = False, ignore_merges: bool = False,
                 nfc: bool = False, split: str | None = None):
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"pre-tokeniser {pre!r} is not supported: use one of "
                             f"{tuple(PRE_TOKENIZERS)} (GGUF tokenizer.ggml.pre)")
        self.tokens = list(tokens)
        if not all(isinstance(t, str) for t in self.tokens):
            raise ValueError("the tokens must be strings")
        self.vocab = {t: i for i, t in enumerate(self.tokens)}  # a repeated token keeps the last
        for name, i in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id),
                        *(("special", i) for i in special)):
            if i is not None and not (type(i) is int and 0 <= i < len(self.tokens)):
                raise ValueError(f"{name}={i} is not a token id in [0, {len(self.tokens)})")
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, m in enumerate(merges):
            pair = tuple(m.split(" ") if isinstance(m, str) else m if isinstance(m, list | tuple)
                         else ())
            if len(pair) != 2 or not all(isinstance(t, str) for t in pair) or \
                    pair[0] + pair[1] not in self.vocab:
                raise ValueError(f"merge {rank} {m!r} is not two tokens whose join is in the "
                                 "vocabulary: tokens and merges do not belong together")
            self.ranks.setdefault(pair, rank)
        self.byte_char = bytes_to_unicode()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        # an empty special token would match between every two characters: it never occurs
        self.special = {self.tokens[i]: i for i in special if self.tokens[i]}
        # longest first, so "<|im_start|>" wins over a special token that is its prefix
        alternation = "|".join(map(re.escape, sorted(self.special, key=len, reverse=True)))
        self._special_re = re.compile(alternation or "(?!)")  # (?!) never matches
        self.bos_id, self.eos_id, self.pad_id, self.add_bos = bos_id, eos_id, pad_id, add_bos
        self.pre, self.ignore_merges, self.nfc, self.split = pre, ignore_merges, nfc, split
        self._splits = [split_regex(r) for r in ([split] if split else PRE_TOKENIZERS[pre])]
        self._cache = Memo(self._bpe_ids, CACHE_SIZE, CACHE_MAX_PIECE)  # piece -> ids

    @classmethod
    def from_gguf(cls, metadata: dict, where: str = "GGUF metadata") -> "BPETokenizer":
        """From GGUF metadata (`tokenizer.ggml.*`, model "gpt2"); errors name `where`."""
        if (model := metadata.get("tokenizer.ggml.model")) != "gpt2":
            raise ValueError(f"{where}: tokenizer.ggml.model={model!r}: only 'gpt2' (byte-level "
                             "BPE) is supported")
        tokens, merges = (field(metadata, f"tokenizer.ggml.{k}", "list", where)
                          for k in ("tokens", "merges"))
        types = field(metadata, "tokenizer.ggml.token_type", "list", where, [1] * len(tokens))
        if len(types) != len(tokens):
            raise ValueError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for "
                             f"{len(tokens)} tokens")
        ids = [field(metadata, f"tokenizer.ggml.{k}_token_id", "index?", where, None)
               for k in ("bos", "eos", "padding")]
        pre = field(metadata, "tokenizer.ggml.pre", "str", where, "gpt2")
        add_bos = field(metadata, "tokenizer.ggml.add_bos_token", "bool", where, False)
        special = [i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)]
        try:
            return cls(tokens, merges, special, *ids, "gpt2" if pre == "default" else pre, add_bos)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def from_tokenizer_json(cls, tj: dict, special_tokens: dict | None = None,
                            where: str = "tokenizer.json") -> "BPETokenizer":
        """From a parsed tokenizer.json: a BPE model, added tokens, normalizer none or NFC, the
        pre-tokenizers and BOS template _pre_tokenizer / _template_bos read; the rest is refused
        naming `where`. special_tokens: {"bos_token": str or {"content": str}, ...}
        (tokenizer_config.json) or {"bos_token_id": int, ...} (config.json); pad falls back to
        eos, then to id 0."""
        try:
            model, added, roles = tj.get("model"), tj.get("added_tokens") or [], {}
            if not isinstance(model, dict) or model.get("type") != "BPE":
                kind = model.get("type") if isinstance(model, dict) else model
                raise ValueError(f"model type {kind!r} is not supported (byte-level BPE only)")
            # byte-level BPE drops a byte without a token: then an unk_token would differ
            unk = not set(bytes_to_unicode().values()) <= set(model["vocab"])
            for name in ("dropout", "continuing_subword_prefix", "end_of_word_suffix",
                         "byte_fallback", "unk_token"):
                if model.get(name) and (name != "unk_token" or unk):
                    raise ValueError(f"BPE {name}={model[name]!r} is not supported")
            for a, flag in ((a, f) for a in added for f in ("lstrip", "rstrip", "single_word")):
                if a.get(flag):
                    raise ValueError(f"added token {a['content']!r} has {flag}=true, which is "
                                     "not supported")
            by_id = {i: t for t, i in model["vocab"].items() if type(i) is int} | {
                a["id"]: a["content"] for a in added}
            if len(by_id) < len(model["vocab"]) or set(by_id) != set(range(len(by_id))):
                raise ValueError(f"token ids must run 0..{len(by_id) - 1} without gaps")
            tokens = [by_id[i] for i in range(len(by_id))]
            if tj.get("normalizer") not in (None, {"type": "NFC"}):
                raise _refuse("normalizer", tj["normalizer"], "none or NFC")
            pre, regex = _pre_tokenizer(tj.get("pre_tokenizer"))
            bos = _template_bos(tj.get("post_processor"))
            ids, special_tokens = {t: i for i, t in enumerate(tokens)}, special_tokens or {}
            for role in ("bos", "eos", "pad"):
                v = special_tokens.get(f"{role}_token")
                v = v.get("content") if isinstance(v, dict) else v
                if isinstance(v, str) and v not in ids:
                    raise ValueError(f"{role}_token {v!r} is not a token")
                v = ids[v] if isinstance(v, str) else special_tokens.get(f"{role}_token_id")
                roles[role] = v if type(v) is int else None  # Llama 3.1 lists several eos ids
            pad = next(i for i in (roles["pad"], roles["eos"], 0) if i is not None)
            return cls(tokens, model["merges"], [a["id"] for a in added],
                       roles["bos"] if bos is None else bos, roles["eos"], pad, pre,
                       bos is not None, bool(model.get("ignore_merges")),
                       tj.get("normalizer") is not None, regex)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        except (TypeError, AttributeError, KeyError) as e:  # a field of the wrong JSON type
            raise ValueError(f"{where} is not a tokenizer.json this reader understands "
                             f"({type(e).__name__}: {e})") from None

    @classmethod
    def from_hf_folder(cls, folder: str | os.PathLike) -> "BPETokenizer":
        """tokenizer.json, with the bos/eos/pad tokens of tokenizer_config.json, else the
        *_token_id of config.json."""
        folder, names = Path(folder), {}
        for name in ("config.json", "tokenizer_config.json"):  # the second wins
            if exists(folder / name):
                names.update(read_json(folder / name))
        return cls.from_tokenizer_json(read_json(folder / "tokenizer.json", TOKENIZER_LIMIT),
                                       names, str(folder / "tokenizer.json"))

    def __len__(self) -> int:
        return len(self.tokens)

    def _bpe_ids(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-tokenised piece.  _bpe_ids(" the") -> (260,) with SmolLM2's merges"""
        # bytes without a token are dropped, as transformers does (SmolLM2 lacks 21 of the 256)
        parts = [c for c in map(self.byte_char.__getitem__, piece.encode("utf-8"))
                 if c in self.vocab]
        if self.ignore_merges and "".join(parts) in self.vocab:  # a whole-word token wins
            return (self.vocab["".join(parts)],)
        return tuple(self.vocab[p] for p in bpe_merge(parts, self.ranks))

    def pre_tokenize(self, text: str) -> list[str]:
        """Pieces that BPE sees (no special tokens): each regex of the pre-tokeniser isolates
        its matches in turn.  pre_tokenize(" 42x") -> [" ", "4", "2", "x"] with pre="smollm",
        [" 42", "x"] with "gpt2"."""
        pieces = [unicodedata.normalize("NFC", text) if self.nfc else text]
        for regex in self._splits:
            pieces = [p for c in pieces for p in isolate(regex, c)]
        return pieces

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS first if add_bos (default: the tokenizer's add_bos)."""
        add_bos = self.add_bos if add_bos is None else add_bos
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True but this tokenizer has no bos_id")
        ids = [self.bos_id] if add_bos else []
        for chunk in isolate(self._special_re, text):  # a special token is always cut out whole
            if chunk in self.special:
                ids.append(self.special[chunk])
            else:
                ids += [i for piece in self.pre_tokenize(chunk) for i in self._cache[piece]]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD, as in GPT-2."""
        out, special_ids = bytearray(), set(self.special.values())
        for i in ids:
            if i in special_ids:
                out += b"" if skip_special else self.tokens[i].encode("utf-8")
            else:
                out += bytes(self.char_byte[c] for c in self.tokens[i])
        return out.decode("utf-8", errors="replace")


_TINY_WORDS = (" positive", " negative", " yes", " no", " acceptable", " unacceptable",
               " entailment", " neutral", " contradiction", " the", " a", " and", " of", " is",
               " it", " movie", " film", " good", " bad", "Review", " Sentiment", "Sentence",
               " Question", " Answer", "Premise", " Hypothesis", ":\n", "ing", "ed")


def tiny_bpe() -> BPETokenizer:
    """A byte-level BPE for tests and tiny-llama: 3 specials, the 256 bytes and merges spelling
    each of _TINY_WORDS left to right; len(tiny_bpe()) < 512."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values()]
    merges: list[tuple[str, str]] = []
    for word in _TINY_WORDS:
        spelled = "".join(bytes_to_unicode()[b] for b in word.encode())
        for k in range(1, len(spelled)):  # merge (prefix, next char) for each prefix
            if spelled[:k + 1] not in tokens:
                tokens.append(spelled[:k + 1])
                merges.append((spelled[:k], spelled[k]))
    return BPETokenizer(tokens, merges, special=[0, 1, 2], bos_id=0, eos_id=0, pad_id=0,
                        pre="smollm")
