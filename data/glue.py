"""GLUE (Wang et al. 2018, arXiv:1804.07461) as download_glue_data.py ships it: the tasks, a
reader (data/files.py's: a bad row raises ValueError naming `file:line`), batching, and the task
metrics in pure Python (float64 sums) as sklearn / scipy define them, except that an undefined
correlation (a constant side) is 0.

    train = load_glue("sst2", "../shared/data/glue/SST-2", "train")   # list[Example]
    for batch in batches(train, tok, batch_size=32, max_len=128, generator=g): ...
    class_metrics([1, 0, 1], [1, 0, 0], ("f1", "mcc"))   # {"accuracy": 2/3, "f1": 2/3, "mcc": 0.5}
"""

import bisect
import itertools
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from data.files import Example, Row, read_rows

_SCORE = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")  # an STS-B score
GLUE_SOURCE = ("download GLUE with download_glue_data.py from "
               "https://github.com/nyu-mll/GLUE-baselines (or https://gluebenchmark.com/tasks)")
GROUP_POOL = 50  # batches per length-sorted pool, as HF Trainer's group_by_length (megabatch)
COLA_COLUMNS = ("source", "label", "author_label", "sentence")  # CoLA has no header line


class TaskSpec(NamedTuple):
    folder: str  # the GLUE folder name, e.g. "SST-2"
    dev_file: str
    text_a: str  # column names, as in the file's header
    text_b: str | None
    label: str
    labels: tuple[str, ...] | None  # raw label strings in id order; None = float score
    metrics: tuple[str, ...]  # the first one is the usual model-selection metric

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def n_special(self) -> int:  # [CLS] a [SEP], and [SEP] after b for pairs
        return 2 if self.text_b is None else 3


_BIN, _NLI = ("0", "1"), ("entailment", "not_entailment")
_ONE, _PAIR = ("sentence", None, "label"), ("sentence1", "sentence2")
TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("SST-2", "dev.tsv", *_ONE, _BIN, ("accuracy",)),
    "cola": TaskSpec("CoLA", "dev.tsv", *_ONE, _BIN, ("mcc", "accuracy")),
    "rte": TaskSpec("RTE", "dev.tsv", *_PAIR, "label", _NLI, ("accuracy",)),
    "mrpc": TaskSpec("MRPC", "dev.tsv", "#1 String", "#2 String", "Quality", _BIN,
                     ("f1", "accuracy")),
    "qnli": TaskSpec("QNLI", "dev.tsv", "question", "sentence", "label", _NLI, ("accuracy",)),
    "qqp": TaskSpec("QQP", "dev.tsv", "question1", "question2", "is_duplicate", _BIN,
                    ("f1", "accuracy")),
    "mnli": TaskSpec("MNLI", "dev_matched.tsv", *_PAIR, "gold_label",
                     ("entailment", "neutral", "contradiction"), ("accuracy",)),
    "stsb": TaskSpec("STS-B", "dev.tsv", *_PAIR, "score", None, ("pearson", "spearman")),
}


def task_spec(task: str) -> TaskSpec:
    """The spec of a GLUE task, by key or folder name.  task_spec("sts-b").folder == "STS-B" """
    key = task.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {task!r}: use one of {', '.join(TASKS)}")
    return TASKS[key]


def load_glue(task: str, data_dir: str | Path, split: str) -> list[Example]:
    """The examples of a task's train.tsv (split "train") or dev file (split "dev") in data_dir,
    the task folder or the GLUE root holding it; text is kept byte-exact.
    load_glue("sst2", "glue", "dev")[0] == Example("it 's a charming ...", None, 1)"""
    spec, root = task_spec(task), Path(data_dir)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"GLUE folder {root} not found or not a folder: {GLUE_SOURCE}")
    folder = root / spec.folder if os.path.isdir(root / spec.folder) else root
    path = folder / ("train.tsv" if split == "train" else spec.dev_file)
    try:
        rows = read_rows(path, COLA_COLUMNS if spec.folder == "CoLA" else None)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: {GLUE_SOURCE}, and pass the {spec.folder} "
                                "folder (or the GLUE root holding it)") from None
    except ValueError as e:  # e.g. header-less CoLA read from another task's file: line 1
        hint = f"; is this the {spec.folder} {split} file?" if f"{path}:1:" in str(e) else ""
        raise ValueError(f"{e}{hint}") from None
    columns = [c for c in (spec.text_a, spec.text_b, spec.label) if c is not None]
    if missing := [c for c in columns if c not in rows[0].fields]:
        raise ValueError(f"{path}:1: the header has no {missing[0]!r} column; is this the "
                         f"{spec.folder} {split} file?")
    # fields.get(None) is None: a single-sentence task has no text_b
    return [Example(r.fields[spec.text_a], r.fields.get(spec.text_b), _label(spec, r))
            for r in rows]


def _label(spec: TaskSpec, row: Row) -> int | float:
    """The row's class id, or its STS-B score in [0, 5]."""
    raw = row.fields[spec.label]
    if spec.labels is None:  # float() would also take "0_5", " 5", "５"
        label = float(raw) if _SCORE.fullmatch(raw) else math.nan
        if not 0.0 <= label <= 5.0:  # also rejects NaN
            raise ValueError(f"{row.where}: score {raw!r} is not a decimal number in [0, 5]; "
                             "fix or drop the row")
        return label
    if raw not in spec.labels:
        raise ValueError(f"{row.where}: label {raw!r} is not one of {list(spec.labels)}; "
                         "fix or drop the row (is this the right task's file?)")
    return spec.labels.index(raw)


# -----------------------------------------------------------------------------
# batching


def epoch(n: int, batch_size: int, generator: torch.Generator | None,
          shuffle: bool = True) -> Iterator[list[int]]:
    """One epoch's batches of row indices, drawn by torch.randperm(n, generator=generator).
    list(epoch(5, 2, None, shuffle=False)) == [[0, 1], [2, 3], [4]]"""
    order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    return (order[s:s + batch_size] for s in range(0, n, batch_size))


def _collate(rows: list[Example], tokenizer, max_len: int) -> dict:
    texts, pairs, labels = zip(*rows)
    batch = tokenizer.batch(list(texts), pairs=None if pairs[0] is None else list(pairs),
                            max_len=max_len)
    dtype = torch.float32 if isinstance(labels[0], float) else torch.long
    return dict(batch) | {"labels": torch.tensor(labels, dtype=dtype)}


def _grouped(cuts: Iterator[list[int]], examples: Sequence[Example], tokenizer, batch_size: int,
             max_len: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Every GROUP_POOL batches joined into a pool, sorted by token length (stable), cut into
    batches again, and those shuffled."""
    while pool := [i for cut in itertools.islice(cuts, GROUP_POOL) for i in cut]:
        mask = _collate([examples[i] for i in pool], tokenizer, max_len)["attention_mask"]
        lengths = mask.sum(1).tolist()
        pool = [pool[j] for j in sorted(range(len(pool)), key=lengths.__getitem__)]
        cut = [pool[s:s + batch_size] for s in range(0, len(pool), batch_size)]
        yield from (cut[j] for j in torch.randperm(len(cut), generator=generator).tolist())


def batches(examples: Sequence[Example], tokenizer, batch_size: int, max_len: int,
            generator: torch.Generator | None, shuffle: bool = True,
            group_by_length: bool = False) -> Iterator[dict]:
    """One epoch of tokenizer.batch(texts, pairs, max_len=...) plus "labels" (long; float32 for
    STS-B); group_by_length=True, as HF Trainer's, sorts by length within pools (less padding).
    batches(train, tok, 32, 128, g, group_by_length=True)"""
    cuts = epoch(len(examples), batch_size, generator, shuffle)
    if group_by_length:
        cuts = _grouped(cuts, examples, tokenizer, batch_size, max_len, generator)
    return (_collate([examples[i] for i in cut], tokenizer, max_len) for cut in cuts)


# -----------------------------------------------------------------------------
# metrics


def _confusion(preds: Sequence[int], labels: Sequence[int]) -> tuple[int, int, int, int]:
    """(tp, tn, fp, fn) with class 1 as the positive class."""
    n = Counter((p == 1, y == 1) for p, y in zip(preds, labels))
    return n[True, True], n[False, False], n[True, False], n[False, True]


def accuracy(preds: Sequence, labels: Sequence) -> float:
    return sum(p == y for p, y in zip(preds, labels)) / len(labels)


def matthews_corrcoef(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Binary MCC = (tp·tn − fp·fn) / √((tp+fp)(tp+fn)(tn+fp)(tn+fn)); 0 when a margin is empty.
    matthews_corrcoef([1, 0], [1, 0]) == 1.0"""
    tp, tn, fp, fn = _confusion(preds, labels)
    den = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return (tp * tn - fp * fn) / math.sqrt(den) if den else 0.0


def f1_score(preds: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of class 1 = 2tp / (2tp + fp + fn); 0 when there is no positive at all."""
    tp, _, fp, fn = _confusion(preds, labels)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r = Σ(x−x̄)(y−ȳ) / √(Σ(x−x̄)²·Σ(y−ȳ)²); 0 when a side is constant.
    pearson([1, 2], [3, 5]) == 1.0"""
    if min(x) == max(x) or min(y) == max(y):
        return 0.0
    mx, my = math.fsum(x) / len(x), math.fsum(y) / len(y)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = math.fsum((a - mx) ** 2 for a in x), math.fsum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ = Pearson's r of the ranks, ties sharing their average rank: the rank of v is
    (#smaller + #(smaller or equal) + 1) / 2.  spearman([1, 2, 2, 3], [1, 3, 2, 4]) == √0.9"""
    def ranks(v: Sequence[float]) -> list[float]:
        s = sorted(v)
        return [(bisect.bisect_left(s, a) + bisect.bisect_right(s, a) + 1) / 2 for a in v]
    return pearson(ranks(x), ranks(y))


METRICS = {"accuracy": accuracy, "f1": f1_score, "mcc": matthews_corrcoef,
           "pearson": pearson, "spearman": spearman}


def class_metrics(preds: Sequence[int], labels: Sequence[int], extra: Sequence[str] = ()) -> dict:
    """{"accuracy": ..., then each of `extra` ("f1", "mcc")}."""
    return {m: METRICS[m](preds, labels) for m in ("accuracy", *extra)}


def compute_metrics(task: str, preds: Sequence, labels: Sequence) -> dict[str, float]:
    """A GLUE task's metrics of class ids (STS-B: scores), lists or 1-D tensors; accuracy first.
    compute_metrics("cola", [1, 0], [1, 1]) == {"accuracy": 0.5, "mcc": 0.0}"""
    p, y = [x.tolist() if isinstance(x, torch.Tensor) else list(x) for x in (preds, labels)]
    names = sorted(task_spec(task).metrics, key=lambda m: m != "accuracy")
    return {m: METRICS[m](p, y) for m in names}
