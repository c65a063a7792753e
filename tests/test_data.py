"""Tests for data/glue.py: reader, batching, metrics (data/planted.py:
tests/test_planted.py).

Oracles: GLUE rows written in tmp_path in the exact download_glue_data.py formats; metrics
against numbers derived by hand in the docstrings and against slow numpy references.
Run: .venv/bin/python -m pytest tests/test_data.py -q
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from data.glue import TASKS, Example, batches, compute_metrics, load_glue, task_spec
from data.glue import class_metrics, f1_score, matthews_corrcoef, pearson, spearman

SST2 = Path(__file__).resolve().parents[1].parent / "shared/data/glue/SST-2"

# -----------------------------------------------------------------------------
# GLUE files exactly as download_glue_data.py ships them (rows shortened from the real data)

MNLI_HEAD = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
             "sentence1_parse\tsentence2_parse\tsentence1\tsentence2")
STSB_HEAD = ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\t"
             "score")
FILES = {  # task: (folder, file name, text, expected first two examples)
    "sst2": ("SST-2", "train.tsv",
             "sentence\tlabel\nit 's a charming journey . \t1\n\" bleak \t0\n",
             [Example("it 's a charming journey . ", None, 1), Example('" bleak ', None, 0)]),
    "cola": ("CoLA", "train.tsv",
             "gj04\t1\t\tOur friends won't buy this.\ngj04\t0\t*\tThey drank the pub \"dry\".\n",
             [Example("Our friends won't buy this.", None, 1),
              Example('They drank the pub "dry".', None, 0)]),
    "rte": ("RTE", "dev.tsv",
            "index\tsentence1\tsentence2\tlabel\n0\tDana \"won\".\tDana won.\tentailment\n"
            "1\tA cat.\tA dog.\tnot_entailment\n",
            [Example('Dana "won".', "Dana won.", 0), Example("A cat.", "A dog.", 1)]),
    "mrpc": ("MRPC", "train.tsv",
             "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
             "1\t702876\t702977\tAmrozi called \" the witness \" .\tHe said \" the witness \" .\n"
             "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought it .\n",
             [Example('Amrozi called " the witness " .', 'He said " the witness " .', 1),
              Example("Yucaipa owned Dominick 's .", "Yucaipa bought it .", 0)]),
    "qnli": ("QNLI", "dev.tsv",
             "index\tquestion\tsentence\tlabel\n0\tWhat came?\tThe law came.\tentailment\n"
             "1\tWho?\tNobody knows.\tnot_entailment\n",
             [Example("What came?", "The law came.", 0), Example("Who?", "Nobody knows.", 1)]),
    "qqp": ("QQP", "train.tsv",
            "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
            "133273\t213221\t213222\tHow is life?\tWhat is jlpt5?\t0\n"
            "402555\t536040\t536041\tHow do I win?\tHow can I win?\t1\n",
            [Example("How is life?", "What is jlpt5?", 0),
             Example("How do I win?", "How can I win?", 1)]),
    "mnli": ("MNLI", "dev_matched.tsv",  # dev has label1..label5 then gold_label: 16 fields
             MNLI_HEAD + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
             "0\t31193\t31193n\tgovernment\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tConceptually cream."
             "\tProduct and geography.\tneutral\tentailment\tneutral\tneutral\tneutral\tneutral\n"
             "1\t1\t1e\ttelephone\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tYes.\tNo.\tcontradiction"
             "\tcontradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction\n",
             [Example("Conceptually cream.", "Product and geography.", 1),
              Example("Yes.", "No.", 2)]),
    "stsb": ("STS-B", "dev.tsv",
             STSB_HEAD + "\n0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\t"
             "A plane is taking off.\tAn air plane is taking off.\t5.000\n"
             "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man.\tA cat.\t0.500\n",
             [Example("A plane is taking off.", "An air plane is taking off.", 5.0),
              Example("A man.", "A cat.", 0.5)]),
}


def _write(root: Path, task: str, text: str | None = None, crlf: bool = False) -> Path:
    folder, name, default, _ = FILES[task]
    path = root / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    text = default if text is None else text
    path.write_bytes((text.replace("\n", "\r\n") if crlf else text).encode("utf-8"))
    return path


def _split(task: str) -> str:
    return "train" if FILES[task][1] == "train.tsv" else "dev"


@pytest.mark.parametrize("crlf", [False, True])
@pytest.mark.parametrize("task", list(FILES))
def test_load_glue_reads_every_task_format(tmp_path, task, crlf):
    """Header/no header, BOM, pairs, string and float labels, bare quotes, CRLF."""
    path = _write(tmp_path, task, crlf=crlf)
    got = load_glue(task, path.parent, _split(task))
    assert got == FILES[task][3]
    assert all(type(e.label) is (float if task == "stsb" else int) for e in got)


def test_load_glue_accepts_glue_root_and_folder_names(tmp_path):
    _write(tmp_path, "mnli")
    assert load_glue("MNLI", tmp_path, "dev") == load_glue("mnli", tmp_path / "MNLI", "dev")
    assert task_spec("STS-B") is TASKS["stsb"] and task_spec("sst-2") is TASKS["sst2"]


def test_load_glue_reads_mnli_train_with_fewer_label_columns(tmp_path):
    """MNLI train.tsv has one annotator label then gold_label (12 fields), dev has 16."""
    text = (MNLI_HEAD + "\tlabel1\tgold_label\n"
            "0\t1\t1e\tfiction\ta\tb\tc\td\tP.\tH.\tentailment\tentailment\n")
    (tmp_path / "train.tsv").write_text(text)
    assert load_glue("mnli", tmp_path, "train") == [Example("P.", "H.", 0)]


@pytest.mark.parametrize("task, row", [
    ("sst2", "a\tb\t1"), ("sst2", "no label"), ("cola", "gj04\t1\tOnly three."),
    ("rte", "2\tA.\tentailment"), ("mrpc", "1\t1\t2\tA\tB\tC"), ("mnli", "0\tx\tentailment"),
    ("stsb", "0\tA.\tB.\t1.0"),
])
def test_load_glue_rejects_wrong_field_count_naming_file_line(tmp_path, task, row):
    text = FILES[task][2].rstrip("\n") + "\n" + row + "\n"
    path = _write(tmp_path, task, text)
    line = text.count("\n")
    with pytest.raises(ValueError, match=rf"{path.name}:{line}: \d fields, the header has \d"):
        load_glue(task, path.parent, _split(task))


@pytest.mark.parametrize("task, old, new", [
    ("sst2", "\t0\n", "\t2\n"), ("cola", "gj04\t0", "gj04\tx"),
    ("rte", "\tnot_entailment", "\tneutral"),
    ("mrpc", "\n0\t2108705", "\n1.0\t2108705"), ("qqp", "\t1\n", "\tyes\n"),
    ("mnli", "\tcontradiction\n", "\t-\n"), ("stsb", "\t0.500\n", "\tfive\n"),
    ("stsb", "\t0.500\n", "\t5.5\n"), ("stsb", "\t0.500\n", "\tnan\n"),
    # float() reads these as 0.5, 5.0, 0.5, 0.5, 1.0: none is how a GLUE score is written
    ("stsb", "\t0.500\n", "\t0_5\n"), ("stsb", "\t0.500\n", "\t5_0\n"),
    ("stsb", "\t0.500\n", "\t 0.5\n"), ("stsb", "\t0.500\n", "\t０.５\n"),
    ("stsb", "\t0.500\n", "\t1e0\n"),
])
def test_load_glue_rejects_bad_label_naming_file_line(tmp_path, task, old, new):
    """The bad label is on the last data row: line 3, or line 2 for CoLA (no header)."""
    text = FILES[task][2]
    assert old in text
    path = _write(tmp_path, task, text.replace(old, new))
    line = 2 if task == "cola" else 3
    with pytest.raises(ValueError, match=rf"{path.name}:{line}: (label|score) "):
        load_glue(task, path.parent, _split(task))


def test_load_glue_checks_header_and_bom(tmp_path):
    """MRPC's BOM must not end up in the header; a header without the label column is refused,
    also when "\r"-only line ends make the whole file one header line (the message stays short)."""
    path = _write(tmp_path, "mrpc")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert len(load_glue("mrpc", path.parent, "train")) == 2
    _write(tmp_path, "sst2", "index\tsentence\n0\tgood\n")  # SST-2's test.tsv header
    with pytest.raises(ValueError, match=r"train.tsv:1: the header has no 'label' column"):
        load_glue("sst2", tmp_path / "SST-2", "train")
    _write(tmp_path, "sst2", FILES["sst2"][2].replace("\n", "\r") * 200)
    with pytest.raises(ValueError, match=r"train.tsv:1: ") as e:
        load_glue("sst2", tmp_path / "SST-2", "train")
    assert len(str(e.value)) < 400 and "\n" not in str(e.value)
    _write(tmp_path, "cola", FILES["sst2"][2])  # CoLA has no header: SST-2's fails at its line 1
    with pytest.raises(ValueError, match=r"train.tsv:1: 2 fields, the header has 4; .*; is this "
                                         "the CoLA train file[?]"):
        load_glue("cola", tmp_path / "CoLA", "train")


def test_load_glue_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="sst2, cola, rte, mrpc, qnli, qqp, mnli, stsb"):
        load_glue("squad", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"nope.*download_glue_data"):
        load_glue("sst2", tmp_path / "nope", "train")
    with pytest.raises(FileNotFoundError, match=r"dev_matched.tsv not found.*download_glue_data"):
        load_glue("mnli", tmp_path, "dev")
    path = _write(tmp_path, "sst2")
    with pytest.raises(FileNotFoundError, match=r"train.tsv not found or not a folder"):
        load_glue("sst2", path, "train")


@pytest.mark.parametrize("task, text", [
    ("sst2", "sentence\tlabel\n"), ("sst2", "sentence\tlabel"),
    ("mrpc", FILES["mrpc"][2].split("\n")[0] + "\r\n"), ("cola", ""), ("cola", "\n\n"),
])
def test_load_glue_rejects_an_empty_split(tmp_path, task, text):
    """A header-only (or empty) file would give zero examples, and a caller's
    `while True: yield from batches(...)` would then spin forever."""
    path = _write(tmp_path, task, text)
    with pytest.raises(ValueError, match=rf"{path.name}:1: no data rows"):
        load_glue(task, path.parent, _split(task))


def test_load_glue_rejects_non_utf8_naming_file_line(tmp_path):
    """Latin-1 "café" (0xe9) on the second data row, i.e. line 3."""
    path = _write(tmp_path, "sst2")
    path.write_bytes(b"sentence\tlabel\ngood\t1\ncaf\xe9 \t0\n")
    with pytest.raises(ValueError, match=rf"{path.name}:3: byte 0xe9 .* not UTF-8"):
        load_glue("sst2", path.parent, "train")


def test_load_glue_real_sst2():
    """The byte-exact GLUE SST-2 release (shared/data/README.md): row and label counts."""
    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"GLUE SST-2 not found at {SST2}")
    for split, n, counts in (("train", 67_349, (29_780, 37_569)), ("dev", 872, (428, 444))):
        rows = load_glue("sst2", SST2, split)
        assert len(rows) == n
        assert (sum(e.label == 0 for e in rows), sum(e.label == 1 for e in rows)) == counts
    assert rows[0] == Example("it 's a charming and often affecting journey . ", None, 1)


# -----------------------------------------------------------------------------
# metrics


def test_metrics_hand_computed_mcc_f1_accuracy():
    """preds/labels below give tp=3, tn=4, fp=1, fn=2 (class 1 positive). Then
    MCC = (3·4 − 1·2)/√((3+1)(3+2)(4+1)(4+2)) = 10/√600, F1 = 2·3/(2·3+1+2) = 2/3, acc = 7/10."""
    labels = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    preds = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    cola = compute_metrics("cola", preds, labels)
    assert cola == pytest.approx({"mcc": 10 / math.sqrt(600), "accuracy": 0.7})
    mrpc = compute_metrics("mrpc", torch.tensor(preds), torch.tensor(labels))
    assert mrpc == pytest.approx({"f1": 2 / 3, "accuracy": 0.7})
    assert compute_metrics("rte", preds, labels) == pytest.approx({"accuracy": 0.7})
    assert matthews_corrcoef([1, 1], [1, 0]) == 0.0  # a constant prediction: empty margin
    both = class_metrics(preds, labels, ("f1", "mcc"))  # --data's binary metrics, in this order
    assert list(both) == ["accuracy", "f1", "mcc"]
    assert both == pytest.approx({"accuracy": 0.7, "f1": 2 / 3, "mcc": 10 / math.sqrt(600)})


def test_metrics_hand_computed_pearson_spearman_with_ties():
    """x=[1,2,3], y=[1,2,4]: dx=[-1,0,1], dy=[-4/3,-1/3,5/3], Σdxdy=3, Σdx²=2, Σdy²=14/3,
    r = 3/√(28/3) = √(27/28). Spearman with ties: x=[1,2,2,3] has average ranks [1,2.5,2.5,4],
    y=[1,3,2,4] ranks [1,3,2,4]; centred: [-1.5,0,0,1.5], [-1.5,.5,-.5,1.5] give
    ρ = 4.5/√(4.5·5) = √0.9."""
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(math.sqrt(27 / 28))
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    got = compute_metrics("stsb", [1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0])
    assert got["spearman"] == pytest.approx(math.sqrt(0.9))
    assert pearson([0.1] * 3, [1, 2, 3]) == 0.0  # constant side: undefined, reported as 0


def _ranks_reference(x: np.ndarray) -> np.ndarray:
    """Average rank, by definition: 1 + #smaller + (#equal − 1)/2."""
    return np.array([1 + (x < v).sum() + ((x == v).sum() - 1) / 2 for v in x])


values = st.lists(st.integers(-5, 5), min_size=2, max_size=30)  # small range: many ties


@given(st.data())
def test_correlations_match_numpy_reference(data):
    x = data.draw(values)
    y = data.draw(st.lists(st.integers(-5, 5), min_size=len(x), max_size=len(x)))
    xa, ya = np.array(x, float), np.array(y, float)
    if xa.std() == 0 or ya.std() == 0:
        assert pearson(x, y) == spearman(x, y) == 0.0
        return
    assert pearson(x, y) == pytest.approx(np.corrcoef(xa, ya)[0, 1], abs=1e-12)
    ref = np.corrcoef(_ranks_reference(xa), _ranks_reference(ya))[0, 1]
    assert spearman(x, y) == pytest.approx(ref, abs=1e-12)
    assert -1 - 1e-12 <= spearman(x, y) <= 1 + 1e-12


@given(values)
def test_spearman_invariant_to_monotone_transforms(x):
    y = list(range(len(x)))
    fx = [v ** 3 + 2 * v for v in x]  # strictly increasing, changes spacing
    assert spearman(fx, y) == pytest.approx(spearman(x, y), abs=1e-12)
    assert spearman([-v for v in x], y) == pytest.approx(-spearman(x, y), abs=1e-12)


bits = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=1, max_size=40)


@given(bits)
def test_binary_metrics_bounded_and_match_torch_reference(pairs):
    p, y = [a for a, _ in pairs], [b for _, b in pairs]
    pt, yt = torch.tensor(p, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    mcc, f1 = matthews_corrcoef(p, y), f1_score(p, y)
    assert -1 <= mcc <= 1 and 0 <= f1 <= 1
    if pt.min() < pt.max() and yt.min() < yt.max():
        assert mcc == pytest.approx(torch.corrcoef(torch.stack([pt, yt]))[0, 1].item())
    tp = (pt * yt).sum().item()
    if pt.sum() + yt.sum() > 0:
        assert f1 == pytest.approx(2 * tp / (pt.sum() + yt.sum()).item())
    assert compute_metrics("sst2", p, y)["accuracy"] == (pt == yt).double().mean().item()


# -----------------------------------------------------------------------------
# batching


class StubTokenizer:
    """Words -> ids (a growing vocabulary), padded with 0 to the longest row; records texts."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.seen: list[tuple[str, str | None]] = []

    def batch(self, texts, pairs=None, max_len=128):
        pairs = pairs or [None] * len(texts)
        self.seen += list(zip(texts, pairs))
        rows = [[self.vocab.setdefault(w, len(self.vocab) + 1)
                 for w in (a + " " + (b or "")).split()][:max_len] for a, b in zip(texts, pairs)]
        T = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
        return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids),
                "attention_mask": (ids != 0).long()}


def _examples(n: int, pair: bool = False, score: bool = False) -> list[Example]:
    return [Example(f"s{i} " + "w " * (i % 4), f"t{i}" if pair else None,
                    i / 4 if score else i % 2) for i in range(n)]


def test_batches_cover_every_example_once_and_follow_the_seed():
    ex = _examples(23)
    orders = []
    for seed in (0, 0, 1):
        tok = StubTokenizer()
        out = list(batches(ex, tok, batch_size=5, max_len=16,
                           generator=torch.Generator().manual_seed(seed)))
        assert [len(b["labels"]) for b in out] == [5, 5, 5, 5, 3]
        assert sorted(tok.seen) == sorted((e.text_a, e.text_b) for e in ex)
        orders.append(tok.seen)
    assert orders[0] == orders[1] and orders[0] != orders[2]
    plain = StubTokenizer()
    list(batches(ex, plain, 5, 16, generator=None, shuffle=False))
    assert plain.seen == [(e.text_a, None) for e in ex]


def test_batches_add_labels_and_pass_pairs():
    """Parse -> tokenise -> batch: labels ride along in the same order as the rows."""
    tok = StubTokenizer()
    (b,) = batches(_examples(4, pair=True, score=True), tok, 8, 3, None, shuffle=False)
    assert b["labels"].dtype == torch.float32 and b["labels"].tolist() == [0, 0.25, 0.5, 0.75]
    assert tok.seen[1] == ("s1 w ", "t1") and b["input_ids"].shape[1] <= 3
    (b,) = batches(_examples(4), StubTokenizer(), 8, 16, None, shuffle=False)
    assert b["labels"].dtype == torch.long and b["labels"].tolist() == [0, 1, 0, 1]
    assert set(b) == {"input_ids", "token_type_ids", "attention_mask", "labels"}


def _old_batches(examples, tokenizer, batch_size, max_len, generator, shuffle=True):
    """data/glue.py's batches() before group_by_length (commit de0c140), copied verbatim: the
    reference the default path must match bit for bit, since training results depend on it."""
    pairs = {e.text_b is not None for e in examples}
    n = len(examples)
    order = torch.randperm(n, generator=generator).tolist() if shuffle else range(n)
    order = list(order)
    for start in range(0, n, batch_size):
        rows = [examples[i] for i in order[start:start + batch_size]]
        batch = dict(tokenizer.batch([e.text_a for e in rows],
                                     pairs=[e.text_b for e in rows] if pairs == {True} else None,
                                     max_len=max_len))
        is_float = any(isinstance(e.label, float) for e in rows)
        batch["labels"] = torch.tensor([e.label for e in rows],
                                       dtype=torch.float32 if is_float else torch.long)
        yield batch


@given(st.integers(1, 40), st.integers(1, 45), st.integers(0, 2**32 - 1), st.booleans(),
       st.booleans(), st.booleans())
def test_batches_default_path_equals_the_old_implementation(n, batch_size, seed, pair, score,
                                                             shuffle):
    """Same generator -> the same tensors (values and dtypes) and the same generator state after
    the epoch, for two epochs in a row as train.py draws them."""
    ex = _examples(n, pair=pair, score=score)
    tok_new, tok_old = StubTokenizer(), StubTokenizer()
    g_new, g_old = (torch.Generator().manual_seed(seed) for _ in range(2))
    for _ in range(2):
        new = list(batches(ex, tok_new, batch_size, 6, g_new if shuffle else None, shuffle))
        old = list(_old_batches(ex, tok_old, batch_size, 6, g_old if shuffle else None, shuffle))
        assert len(new) == len(old)
        for b_new, b_old in zip(new, old):
            assert b_new.keys() == b_old.keys()
            for k in b_old:
                assert b_new[k].dtype == b_old[k].dtype and torch.equal(b_new[k], b_old[k])
    assert torch.equal(g_new.get_state(), g_old.get_state())


def _lengths(batch: dict) -> list[int]:
    return batch["attention_mask"].sum(1).tolist()


def _padding(out: list[dict]) -> int:
    return sum((b["attention_mask"] == 0).sum().item() for b in out)


@given(st.integers(1, 130), st.integers(1, 9), st.integers(0, 2**32 - 1), st.booleans())
def test_batches_yield_every_example_once_per_epoch(n, batch_size, seed, group):
    """Shuffled, with or without length grouping (pools of 50 batches: n up to 130 crosses pools
    at small batch sizes): each example exactly once, all batches full but at most one."""
    ex = [e._replace(label=i) for i, e in enumerate(_ragged(n, seed))]  # label = identity
    out = list(batches(ex, StubTokenizer(), batch_size, 16, torch.Generator().manual_seed(seed),
                       group_by_length=group))
    assert sorted(i for b in out for i in b["labels"].tolist()) == list(range(n))
    sizes = [len(b["labels"]) for b in out]
    assert sum(sizes) == n and sum(s != batch_size for s in sizes) <= 1
    assert max(sizes) == min(batch_size, n)


def _ragged(n: int, seed: int) -> list[Example]:
    """n distinct sentences of 1..20 words, in an order unrelated to their length."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(1, 21, (n,), generator=g).tolist()
    return [Example(f"s{i} " + "w " * (k[i] - 1), None, i % 2) for i in range(n)]


@given(st.integers(1, 60), st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_group_by_length_sorts_one_pool_and_never_pads_more(n, batch_size, seed):
    """One pool (n <= 50·batch_size): the batches cut one length-sorted list, so their
    [min, max] length ranges do not overlap. With full batches (n = k·B) the total padding,
    B·Σ max − Σ lengths, is at most that of any batching, the random one of the same epoch
    included: the i-th largest batch max is >= the ((i−1)·B+1)-th longest row (those rows cannot
    fit in i−1 batches), and sorted cuts reach that bound. (A smaller last batch breaks this:
    lengths [2, 5, 8, 9], B = 3, pad 3 + 6 as [2, 5, 8] + [9] but 4 + 1 as [5, 8, 9] + [2].)"""
    n = max(batch_size, n - n % batch_size)
    ex = _ragged(n, seed)
    g = torch.Generator().manual_seed(seed)
    grouped = list(batches(ex, StubTokenizer(), batch_size, 32, g, group_by_length=True))
    plain = list(batches(ex, StubTokenizer(), batch_size, 32, torch.Generator().manual_seed(seed)))
    ranges = sorted((min(_lengths(b)), max(_lengths(b))) for b in grouped)
    assert all(hi <= lo for (_, hi), (lo, _) in zip(ranges, ranges[1:]))
    assert _padding(grouped) <= _padding(plain)


def test_group_by_length_pools_follow_the_random_order_and_the_seed():
    """n = 2.5 pools: the first 50 batches hold exactly the first 50·B rows of randperm(n) (same
    generator), batch order within a pool is shuffled, and the result follows the seed."""
    B, n = 2, 250
    ex = [e._replace(label=i) for i, e in enumerate(_ragged(n, 0))]  # label = identity

    def run(seed):
        return list(batches(ex, StubTokenizer(), B, 32, torch.Generator().manual_seed(seed),
                            group_by_length=True))
    out, again, other = run(0), run(0), run(1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    for pool in range(3):
        got = [i for b in out[50 * pool:50 * (pool + 1)] for i in b["labels"].tolist()]
        assert sorted(got) == sorted(order[50 * B * pool:50 * B * (pool + 1)])
    assert [len(b["labels"]) for b in out] == [B] * (n // B)
    tops = [max(_lengths(b)) for b in out[:50]]
    assert tops != sorted(tops) and tops != sorted(tops, reverse=True)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(out, again) for k in a)
    assert [b["labels"].tolist() for b in out] != [b["labels"].tolist() for b in other]


# -----------------------------------------------------------------------------
# files that cannot be read: permissions (simulated, since chmod does not stop root), FIFOs


def test_unreadable_train_tsv_names_the_path_and_the_fix(tmp_path, monkeypatch):
    """A train.tsv (or a task folder of mode 000) that cannot be opened: a ValueError naming it."""
    import os
    path = _write(tmp_path, "sst2")
    real_open = os.open

    def denied_open(p, *a, **kw):
        if str(p) == str(path):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *a, **kw)
    monkeypatch.setattr(os, "open", denied_open)
    with pytest.raises(ValueError, match=f"cannot read {path}: Permission denied: make it "
                                         "readable"):
        load_glue("sst2", path.parent, _split("sst2"))


def test_fifo_or_device_as_train_tsv_is_refused_without_blocking(tmp_path):
    import os
    from test_adapter_io import _returns_within
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs os.mkfifo")
    os.mkfifo(tmp_path / "train.tsv")
    e = _returns_within(lambda: load_glue("sst2", tmp_path, "train"))
    assert isinstance(e, ValueError) and "train.tsv is not a regular file" in str(e), e
    (tmp_path / "train.tsv").unlink()
    (tmp_path / "train.tsv").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="train.tsv is not a regular file"):
        load_glue("sst2", tmp_path, "train")
