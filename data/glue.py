"""GLUE (Wang et al. 2018, arXiv:1804.07461) as download_glue_data.py ships it: a validating
reader (a bad row raises ValueError naming `file:line`), batching, and the task metrics.

    train = load_glue("sst2", "../shared/data/glue/SST-2", "train")   # list[Example]
    for batch in batches(train, tok, batch_size=32, max_len=128, generator=g): ...
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from data.metrics import class_metrics, pearson, spearman
from lora import read_regular

MAX_BYTES = 1 << 30  # of one file, held in memory (MNLI's train.tsv, the largest, is 80 MB)
_SCORE = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")  # an STS-B score
GLUE_SOURCE = ("download GLUE with download_glue_data.py from "
               "https://github.com/nyu-mll/GLUE-baselines (or https://gluebenchmark.com/tasks)")
GROUP_POOL = 50  # batches per length-sorted pool, as HF Trainer's group_by_length (megabatch)


class Example(NamedTuple):
    text_a: str
    text_b: str | None
    label: int | float  # class id (HF `datasets` ids), or the STS-B score in [0, 5]


class TaskSpec(NamedTuple):
    folder: str  # the GLUE folder name, e.g. "SST-2"
    dev_file: str
    header: str | None  # the label column's header name; None: no header line (CoLA)
    text_a: int  # column indices; negative counts from the end
    text_b: int | None
    label: int
    labels: tuple[str, ...] | None  # raw label strings in id order; None = float score
    metrics: tuple[str, ...]  # the first one is the usual model-selection metric
    n_fields: int | None = None  # fixed field count when there is no header (CoLA)

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def n_special(self) -> int:  # [CLS] a [SEP], and [SEP] after b for pairs
        return 2 if self.text_b is None else 3


_BIN = ("0", "1")
_NLI = ("entailment", "not_entailment")
TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("SST-2", "dev.tsv", "label", 0, None, 1, _BIN, ("accuracy",)),
    "cola": TaskSpec("CoLA", "dev.tsv", None, 3, None, 1, _BIN, ("mcc", "accuracy"), n_fields=4),
    "rte": TaskSpec("RTE", "dev.tsv", "label", 1, 2, 3, _NLI, ("accuracy",)),
    "mrpc": TaskSpec("MRPC", "dev.tsv", "Quality", 3, 4, 0, _BIN, ("f1", "accuracy")),
    "qnli": TaskSpec("QNLI", "dev.tsv", "label", 1, 2, 3, _NLI, ("accuracy",)),
    "qqp": TaskSpec("QQP", "dev.tsv", "is_duplicate", 3, 4, 5, _BIN, ("f1", "accuracy")),
    "mnli": TaskSpec("MNLI", "dev_matched.tsv", "gold_label", 8, 9, -1,
                     ("entailment", "neutral", "contradiction"), ("accuracy",)),
    "stsb": TaskSpec("STS-B", "dev.tsv", "score", 7, 8, -1, None, ("pearson", "spearman")),
}


def task_spec(task: str) -> TaskSpec:
    """The spec of a GLUE task, by key or folder name.  task_spec("sts-b").folder == "STS-B" """
    key = task.lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {task!r}: use one of {', '.join(TASKS)}")
    return TASKS[key]


# -----------------------------------------------------------------------------
# reading (data/files.py reads --data files with the same two helpers)


def read_text(path: Path, limit: int, fix: str) -> str:
    """The UTF-8 text (a BOM allowed) of a regular file of at most `limit` bytes."""
    data = read_regular(path, limit)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: byte {data[e.start]:#04x} at offset {e.start} is not "
                         f"UTF-8; {fix}") from None


def tsv_lines(text: str) -> list[list[str]]:
    """Each line's fields, split on "\\n" and "\\t" only (no quoting; a trailing "\\r" dropped).
    tsv_lines('a\\t"b\\r\\nc\\n') == [["a", '"b'], ["c"]]"""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    return [line.rstrip("\r").split("\t") for line in lines]


def _task_file(spec: TaskSpec, data_dir: str | Path, split: str) -> Path:
    root = Path(data_dir)
    try:  # Path.is_dir() raises PermissionError inside a folder of mode 000
        if root.is_file():
            raise ValueError(f"data_dir={str(root)!r} is a file: pass the {spec.folder} folder "
                             "holding it (or the GLUE root holding that folder)")
        if not root.is_dir():
            raise FileNotFoundError(f"GLUE folder {root} does not exist: {GLUE_SOURCE}")
        folder = root / spec.folder if (root / spec.folder).is_dir() else root
    except PermissionError as e:
        raise ValueError(f"cannot read {e.filename}: permission denied: make the data folder "
                         "readable (chmod -R u+rX) or run as its owner") from None
    path = folder / ("train.tsv" if split == "train" else spec.dev_file)
    if not os.path.lexists(path):  # a FIFO or device is named by read_regular, not "missing"
        raise FileNotFoundError(f"{path} not found: {GLUE_SOURCE}, and pass the {spec.folder} "
                                "folder (or the GLUE root holding it)")
    return path


def load_glue(task: str, data_dir: str | Path, split: str) -> list[Example]:
    """The examples of a task's train.tsv (split "train") or dev file (split "dev") in data_dir,
    the task folder or the GLUE root holding it; text is kept byte-exact.
    load_glue("sst2", "glue", "dev")[0] == Example("it 's a charming ...", None, 1)"""
    spec = task_spec(task)
    path = _task_file(spec, data_dir, split)
    rows = tsv_lines(read_text(path, MAX_BYTES, "re-download the file (GLUE ships UTF-8)"))
    first = int(spec.header is not None)
    if first and rows:
        header = rows[0]
        last = max(c if c >= 0 else ~c for c in (spec.text_a, spec.text_b or 0, spec.label))
        if len(header) <= last or header[spec.label] != spec.header:
            shown = repr(header)  # a file with "\r" line ends is all one "header" line
            shown = shown if len(shown) <= 120 else shown[:120] + "…"
            raise ValueError(f"{path}:1: header {shown} has no {spec.header!r} label column "
                             f"where {spec.folder} has it; is this the {spec.folder} {split} file?")
    if len(rows) <= first:  # zero rows would make `while True: yield from batches()` spin
        raise ValueError(f"{path}:1: the file is empty or has no data rows; re-download it "
                         f"({GLUE_SOURCE})")
    n_fields = len(rows[0]) if first else spec.n_fields
    examples = []
    for line, fields in enumerate(rows[first:], first + 1):
        if len(fields) != n_fields:
            raise ValueError(f"{path}:{line}: expected {n_fields} tab-separated fields, got "
                             f"{len(fields)}; fix the row (a stray tab or newline in the text?)")
        raw = fields[spec.label]
        if spec.labels is None:  # float() would also take "0_5", " 5", "５"
            label = float(raw) if _SCORE.fullmatch(raw) else math.nan
            if not 0.0 <= label <= 5.0:  # also rejects NaN
                raise ValueError(f"{path}:{line}: score {raw!r} is not a decimal number in "
                                 "[0, 5]; fix or drop the row")
        elif raw not in spec.labels:
            raise ValueError(f"{path}:{line}: label {raw!r} is not one of {list(spec.labels)}; "
                             "fix or drop the row (is this the right task's file?)")
        else:
            label = spec.labels.index(raw)
        text_b = None if spec.text_b is None else fields[spec.text_b]
        examples.append(Example(fields[spec.text_a], text_b, label))
    return examples


# -----------------------------------------------------------------------------
# batching


def epoch(n: int, batch_size: int, generator: torch.Generator | None,
          shuffle: bool = True) -> Iterator[list[int]]:
    """One epoch's batches of row indices, drawn by torch.randperm(n, generator=generator).
    list(epoch(5, 2, None, shuffle=False)) == [[0, 1], [2, 3], [4]]"""
    order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    return (order[s:s + batch_size] for s in range(0, n, batch_size))


def _collate(rows: list[Example], tokenizer, max_len: int) -> dict:
    pairs = rows[0].text_b is not None
    batch = dict(tokenizer.batch([e.text_a for e in rows],
                                 pairs=[e.text_b for e in rows] if pairs else None,
                                 max_len=max_len))
    is_float = isinstance(rows[0].label, float)
    batch["labels"] = torch.tensor([e.label for e in rows],
                                   dtype=torch.float32 if is_float else torch.long)
    return batch


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


def compute_metrics(task: str, preds: Sequence, labels: Sequence) -> dict[str, float]:
    """A GLUE task's metrics of class ids (STS-B: scores), lists or 1-D tensors.
    compute_metrics("cola", [1, 0], [1, 1]) == {"accuracy": 0.5, "mcc": 0.0}"""
    spec = task_spec(task)
    p, y = [x.tolist() if isinstance(x, torch.Tensor) else list(x) for x in (preds, labels)]
    if spec.labels is None:
        return {"pearson": pearson(p, y), "spearman": spearman(p, y)}
    return class_metrics(p, y, [m for m in spec.metrics if m != "accuracy"])
