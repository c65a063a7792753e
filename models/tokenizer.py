"""BERT's WordPiece tokenizer from vocab.txt, written from scratch.

    tok = WordPieceTokenizer.from_file("vocab.txt")    # uncased: lower-case, strip accents
    tok.tokenize("Héllo, unaffable!")   # ['hello', ',', 'una', '##ffa', '##ble', '!']

As BERT's tokenization.py: clean, space out CJK and punctuation, lower-case and strip accents,
split on whitespace; then greedy longest-match-first WordPiece per word ([UNK] for a word it
cannot spell). References: arXiv:1810.04805, arXiv:1609.08144.
"""

import os
import unicodedata
from collections.abc import Callable, Sequence
from itertools import chain
from pathlib import Path

import torch

from lora import read_regular

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
MAX_CHARS_PER_WORD = 100
VOCAB_LIMIT = 1 << 26  # bytes of vocab.txt (BERT's: 0.2 MB, multilingual 1 MB)

# the CJK Unified Ideographs blocks BERT splits into single characters
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))

# for the `tiny` model: every lower-case ASCII word tokenizes (letters and ##letters), common
# English and sentiment words are whole tokens, so GLUE text runs end to end
_TINY_WORDS = """
the a an and or but not no of to in on at for with by from as is are was were be been it its
this that these he she they we you i me my his her their them there here what which who when
where why how all any some more most other such only so than too very can will just would could
do does did have has had get make made go come see say know think take give find work like
film movie story characters director actors performance plot script scene comedy drama action
audience time life love world people man way one two first new old good great best better bad
worst funny fun boring dull long little big real beautiful charming moving powerful brilliant
clever smart sweet fresh original entertaining enjoyable interesting wonderful perfect stupid
silly awful terrible mess predictable tedious flat weak well much many even never also still
nothing something while because if about into over after through without up out off then now
"""
_ASCII_PUNCT = "".join(chr(c) for c in range(33, 127) if not chr(c).isalnum())


def tiny_vocab() -> list[str]:
    """A ~300-token vocab.txt-like list for the `tiny` model: specials, ASCII punctuation, digits,
    letters, their ## continuations and common words.  tiny_vocab()[:2] == [PAD, UNK]"""
    chars = list(_ASCII_PUNCT) + list("0123456789abcdefghijklmnopqrstuvwxyz")
    words = [w for w in dict.fromkeys(_TINY_WORDS.split()) if w not in chars]
    return [PAD, UNK, CLS, SEP, MASK] + chars + ["##" + c for c in chars if c.isalnum()] + words


class Memo(dict):
    """A dict that fills a missing key with fn(key), emptied when full (`size` entries); keys
    over max_key characters are not kept, so memory stays bounded.  Memo(len, 99)["ab"] == 2"""

    def __init__(self, fn: Callable, size: int, max_key: int | None = None):
        super().__init__()
        self.fn, self.size, self.max_key = fn, size, max_key

    def __missing__(self, key):
        out = self.fn(key)
        if self.max_key is None or len(key) <= self.max_key:
            if len(self) >= self.size:
                self.clear()
            self[key] = out
        return out


def _space_punctuation(cp: int) -> str:  # BERT's: ASCII non-alphanumerics and Unicode P*
    ch = chr(cp)
    return f" {ch} " if ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P") else ch


MEMO_SIZE = 1 << 16  # entries of a memo: code points, or words of <= MAX_CHARS_PER_WORD
_PUNCT_TABLE = Memo(_space_punctuation, MEMO_SIZE)


def _truncate(a: list[int], b: list[int] | None, budget: int) -> tuple[list[int], list[int] | None]:
    """Longest-first, as HF tokenizers truncate a pair: the shorter kept whole if it fits in
    half the budget, else ⌊budget/2⌋ of it, the rest to the longer (the second on a tie).
    _truncate([1]*5, [2]*5, 7) -> 3 and 4 tokens;  _truncate([1]*6, [2]*5, 7) -> 4 and 3"""
    if b is None:
        return a[:budget], None
    short = min(len(a), len(b), budget // 2)  # a pair that fits keeps both whole
    return (a[:budget - short], b[:short]) if len(a) > len(b) else (a[:short], b[:budget - short])


# -----------------------------------------------------------------------------


class WordPieceTokenizer:
    """vocab: the tokens of vocab.txt in id order; it must contain [PAD], [UNK], [CLS], [SEP].
    do_lower_case: lower-case (uncased vocabularies); strip_accents: None follows do_lower_case."""

    def __init__(self, vocab: Sequence[str], do_lower_case: bool = True,
                 strip_accents: bool | None = None):
        self.vocab = {tok: i for i, tok in enumerate(vocab)}
        missing = [t for t in (PAD, UNK, CLS, SEP) if t not in self.vocab]
        if missing:
            raise ValueError(f"vocab lacks the special tokens {missing}: add them to vocab.txt")
        self.pad_id, self.unk_id = self.vocab[PAD], self.vocab[UNK]
        self.cls_id, self.sep_id = self.vocab[CLS], self.vocab[SEP]
        self.do_lower_case = do_lower_case
        self.strip_accents = do_lower_case if strip_accents is None else strip_accents
        self._tokens = list(vocab)  # id -> token, to give tokenize() the pieces behind the ids
        self._clean_table = Memo(self._clean_cp, MEMO_SIZE)
        # ASCII text (all of SST-2) needs one translate: the general path's steps per character
        self._ascii_table = {cp: self._clean_cp(cp).translate(_PUNCT_TABLE) for cp in range(128)}
        # SST-2 has ~15k distinct words in 67k rows: split each once
        self._word_ids = Memo(self._split_word_ids, MEMO_SIZE, MAX_CHARS_PER_WORD)

    @classmethod
    def from_file(cls, path: str | os.PathLike, do_lower_case: bool = True,
                  strip_accents: bool | None = None) -> "WordPieceTokenizer":
        """One token per line, the line number is the id (BERT's vocab.txt)."""
        try:
            text = read_regular(Path(path), VOCAB_LIMIT).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"vocab file {path} is not UTF-8 (byte {e.start}): is it vocab.txt?"
                             ) from None
        return cls(text.removesuffix("\n").split("\n"), do_lower_case, strip_accents)

    def __len__(self) -> int:
        return len(self.vocab)

    def _clean_cp(self, cp: int) -> str:
        ch = chr(cp)
        if ch in "\x00\ufffd" or ch not in "\t\n\r" and unicodedata.category(ch)[0] == "C":
            return ""  # \t \n \r are not "control": they stay, and str.split() splits on them
        if any(lo <= cp <= hi for lo, hi in _CJK):
            return f" {ch} "
        # per character like HF's Rust normalizer (no final-sigma context)
        return ch.lower() if self.do_lower_case else ch

    def basic_tokenize(self, text: str) -> list[str]:
        """Stage 1, before WordPiece.  basic_tokenize("Héllo,world") == ["hello", ",", "world"]"""
        if text.isascii():
            return text.translate(self._ascii_table).split()
        text = text.translate(self._clean_table)
        if self.strip_accents and not text.isascii():  # NFD, then drop the combining marks
            text = "".join(c for c in unicodedata.normalize("NFD", text)
                           if unicodedata.category(c) != "Mn")
        return text.translate(_PUNCT_TABLE).split()

    def _split_word_ids(self, word: str) -> tuple[int, ...]:
        if len(word) > MAX_CHARS_PER_WORD:
            return (self.unk_id,)
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):  # longest match first
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
            else:
                return (self.unk_id,)
            ids.append(self.vocab[piece])
            start = end
        return tuple(ids)

    def _ids(self, text: str) -> list[int]:
        """The WordPiece ids of text, no special tokens."""
        return list(chain.from_iterable(map(self._word_ids.__getitem__, self.basic_tokenize(text))))

    def tokenize(self, text: str) -> list[str]:
        """tokenize("unaffable") == ["una", "##ffa", "##ble"] with BERT's uncased vocab."""
        return [self._tokens[i] for i in self._ids(text)]

    def encode(self, text: str, pair: str | None = None,
               max_len: int | None = None) -> tuple[list[int], list[int]]:
        """[CLS] text [SEP] (pair [SEP]) -> (ids, token_type_ids), at most max_len tokens."""
        a = self._ids(text)
        b = None if pair is None else self._ids(pair)
        if max_len is not None:
            n_special = 2 if b is None else 3
            if max_len < n_special:
                raise ValueError(f"max_len={max_len} leaves no room for the {n_special} special "
                                 f"tokens: use max_len >= {n_special}")
            a, b = _truncate(a, b, max_len - n_special)
        ids = [self.cls_id, *a, self.sep_id]
        types = [0] * len(ids)
        if b is not None:
            ids += [*b, self.sep_id]
            types += [1] * (len(b) + 1)
        return ids, types

    def batch(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
              max_len: int = 128) -> dict[str, torch.Tensor]:
        """Encode and pad to the longest row of this batch: input_ids, token_type_ids and
        attention_mask (1 = token, 0 = padding), each a (B, T) LongTensor."""
        rows = [self.encode(t, None if pairs is None else pairs[i], max_len)
                for i, t in enumerate(texts)]
        T = max(len(ids) for ids, _ in rows)

        def padded(lists: list[list[int]], fill: int) -> torch.Tensor:
            return torch.tensor([x + [fill] * (T - len(x)) for x in lists])
        return {"input_ids": padded([ids for ids, _ in rows], self.pad_id),
                "token_type_ids": padded([types for _, types in rows], 0),
                "attention_mask": padded([[1] * len(ids) for ids, _ in rows], 0)}
