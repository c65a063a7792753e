"""GLUE in the standard folder layout: a validating reader, batching, and the task metrics.

    from data.glue import load_glue, batches, compute_metrics
    train = load_glue("sst2", "../shared/data/glue/SST-2", "train")   # list[Example]
    for batch in batches(train, tok, batch_size=32, max_len=128, generator=g):
        ...  # dict(input_ids, token_type_ids, attention_mask, labels)
    compute_metrics("sst2", preds, labels)   # {"accuracy": ...}

Files are read exactly as the standard `download_glue_data.py` ships them
(https://github.com/nyu-mll/GLUE-baselines): tab-separated, csv quoting OFF (GLUE text contains
bare quotes), MRPC with a UTF-8 BOM, CoLA without a header. Every row is validated; a bad row
raises ValueError naming `file:line`. Label ids follow the HF `datasets` GLUE convention.

References: GLUE, Wang et al. 2018, arXiv:1804.07461.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from data.metrics import f1_score, matthews_corrcoef, pearson, spearman
from lora import read_regular

GLUE_LIMIT = 1 << 30  # bytes of one .tsv (MNLI's train.tsv, the largest, is 80 MB)
_SCORE = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")  # float() would also take "0_5", " 5", "５"
GLUE_SOURCE = ("download GLUE with download_glue_data.py from "
               "https://github.com/nyu-mll/GLUE-baselines (or https://gluebenchmark.com/tasks)")


class Example(NamedTuple):
    text_a: str
    text_b: str | None
    label: int | float  # class id, or the STS-B similarity score in [0, 5]


@dataclass(frozen=True)
class TaskSpec:
    folder: str  # the GLUE folder name, e.g. "SST-2"
    dev_file: str
    header: str | None  # the label column's header name; None: no header line (CoLA)
    text_a: int  # column indices; negative counts from the end
    text_b: int | None
    label: int
    labels: tuple[str, ...] | None  # raw label strings in id order; None = float score
    metrics: tuple[str, ...]  # the first one is the usual model-selection metric
    n_fields: int | None = None  # fixed field count when there is no header

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def n_special(self) -> int:
        """Special tokens per encoded example: [CLS] a [SEP], and [SEP] after b for pairs."""
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
    """The spec of a GLUE task; accepts "sst2", "SST-2", "sts-b", ...  task_spec("SST-2").folder"""
    key = task.lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {task!r}: use one of {', '.join(TASKS)}")
    return TASKS[key]


# -----------------------------------------------------------------------------
# reading


def _task_file(spec: TaskSpec, data_dir: str | Path, split: str) -> Path:
    if split not in ("train", "dev"):
        raise ValueError(f"split={split!r}: use 'train' or 'dev' (GLUE test files have no labels)")
    try:
        return _find_task_file(spec, Path(data_dir), split)
    except PermissionError as e:  # Path.is_dir() raises it inside a folder of mode 000
        raise ValueError(f"cannot read {e.filename}: permission denied: make the data folder "
                         "readable (chmod -R u+rX) or run as its owner") from None


def _find_task_file(spec: TaskSpec, root: Path, split: str) -> Path:
    if root.is_file():
        raise ValueError(f"data_dir={str(root)!r} is a file: pass the {spec.folder} folder "
                         "holding it (or the GLUE root holding that folder)")
    if not root.is_dir():
        raise FileNotFoundError(f"GLUE folder {root} does not exist: {GLUE_SOURCE}")
    folder = root / spec.folder if (root / spec.folder).is_dir() else root
    path = folder / ("train.tsv" if split == "train" else spec.dev_file)
    if not os.path.lexists(path):  # a FIFO or device is named by read_regular, not "missing"
        raise FileNotFoundError(f"{path} not found: {GLUE_SOURCE}, and pass the {spec.folder} "
                                "folder (or the GLUE root holding it)")
    return path


def _parse_label(spec: TaskSpec, raw: str, where: str) -> int | float:
    if spec.labels is not None:
        if raw not in spec.labels:
            raise ValueError(f"{where}: label {raw!r} is not one of {list(spec.labels)}; fix or "
                             "drop the row (is this the right task's file?)")
        return spec.labels.index(raw)
    score = float(raw) if _SCORE.fullmatch(raw) else math.nan
    if not 0.0 <= score <= 5.0:  # also rejects NaN
        raise ValueError(f"{where}: score {raw!r} is not a decimal number in [0, 5]; fix or drop "
                         "the row")
    return score


def load_glue(task: str, data_dir: str | Path, split: str) -> list[Example]:
    """Read `<data_dir>/train.tsv` or the dev file (MNLI: dev_matched.tsv) of a GLUE task.

    data_dir is the task folder (…/glue/SST-2) or the GLUE root holding it (…/glue). Lines are
    split on "\\n" and "\\t" only (a trailing "\\r" is dropped); text is kept byte-exact."""
    spec = task_spec(task)
    path = _task_file(spec, data_dir, split)
    data = read_regular(path, GLUE_LIMIT)
    try:
        text = data.decode("utf-8-sig")  # -sig: MRPC files start with a BOM
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: byte {data[e.start]:#04x} at offset {e.start} is not "
                         "UTF-8; re-download the file (GLUE ships UTF-8)") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    n_fields, first = spec.n_fields, 0
    if spec.header is not None:  # every row must have as many fields as the header
        if not lines:
            raise ValueError(f"{path}:1: the file is empty (no header); re-download it: "
                             f"{GLUE_SOURCE}")
        header = lines[0].rstrip("\r").split("\t")
        columns = [spec.text_a, spec.label] + ([spec.text_b] if spec.text_b is not None else [])
        if len(header) <= max(c if c >= 0 else -c - 1 for c in columns) or \
                header[spec.label] != spec.header:
            shown = repr(header)  # a file with "\r" line ends is all one "header" line
            shown = shown if len(shown) <= 120 else shown[:120] + "…"
            raise ValueError(f"{path}:1: header {shown} has no {spec.header!r} label column "
                             f"where {spec.folder} has it; is this the {spec.folder} {split} file?")
        n_fields, first = len(header), 1
    if len(lines) <= first:
        # callers loop `while True: yield from batches(...)`; zero rows would spin forever
        raise ValueError(f"{path}: no data rows{' after the header' if first else ''}; the file "
                         f"is truncated: re-download it ({GLUE_SOURCE})")
    examples = []
    for i in range(first, len(lines)):
        where = f"{path}:{i + 1}"
        fields = lines[i].rstrip("\r").split("\t")
        if len(fields) != n_fields:
            raise ValueError(f"{where}: expected {n_fields} tab-separated fields, got "
                             f"{len(fields)}; fix the row (a stray tab or newline in the text?)")
        label = _parse_label(spec, fields[spec.label], where)
        text_b = fields[spec.text_b] if spec.text_b is not None else None
        examples.append(Example(fields[spec.text_a], text_b, label))
    return examples


# -----------------------------------------------------------------------------
# batching


GROUP_POOL = 50  # batches per length-sorted pool, as HF Trainer's group_by_length (megabatch)


def _collate(rows: list[Example], tokenizer, max_len: int, pairs: bool) -> dict:
    batch = dict(tokenizer.batch([e.text_a for e in rows],
                                 pairs=[e.text_b for e in rows] if pairs else None,
                                 max_len=max_len))
    is_float = any(isinstance(e.label, float) for e in rows)
    batch["labels"] = torch.tensor([e.label for e in rows],
                                   dtype=torch.float32 if is_float else torch.long)
    return batch


def _grouped_order(examples: Sequence[Example], order: list[int], tokenizer, batch_size: int,
                   max_len: int, pairs: bool, generator: torch.Generator) -> Iterator[list[int]]:
    """Cut `order` into pools of GROUP_POOL·batch_size, sort each pool by token length (stable,
    so ties keep the random order), cut it into batches and shuffle those batches."""
    pool_size = GROUP_POOL * batch_size
    for p in range(0, len(order), pool_size):
        pool = order[p:p + pool_size]
        # lengths after truncation, which is what padding is computed on
        mask = _collate([examples[i] for i in pool], tokenizer, max_len, pairs)["attention_mask"]
        lengths = mask.sum(1).tolist()
        pool = [pool[j] for j in sorted(range(len(pool)), key=lengths.__getitem__)]
        cut = [pool[s:s + batch_size] for s in range(0, len(pool), batch_size)]
        yield from (cut[j] for j in torch.randperm(len(cut), generator=generator).tolist())


def batches(examples: Sequence[Example], tokenizer, batch_size: int, max_len: int,
            generator: torch.Generator | None, shuffle: bool = True,
            group_by_length: bool = False) -> Iterator[dict]:
    """One epoch: every example once, in batches of batch_size but one smaller batch (the last)
    when batch_size does not divide n. Order is torch.randperm(n, generator=generator), so it
    follows the seed. group_by_length=True (HF Trainer's): cut that order into pools of 50
    batches, sort each pool by token length and shuffle its batches with the generator: less
    padding, and the smaller batch holds the last pool's longest rows. Arguments are checked at
    the call. tokenizer.batch(texts, pairs, max_len=...) pads; "labels" is added (long for
    classes, float32 for STS-B).  batches(train, tok, 32, 128, g, group_by_length=True)"""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use batch_size >= 1")
    if shuffle and generator is None:
        raise ValueError("shuffle=True needs generator=torch.Generator().manual_seed(seed)")
    if group_by_length and not shuffle:
        raise ValueError("group_by_length=True needs shuffle=True and a generator: it draws the "
                         "pools at random")
    if len(examples) == 0:
        raise ValueError("examples is empty, so an epoch has no batches: pass at least one "
                         "example (an empty split, or --max-train 0?)")
    pairs = {e.text_b is not None for e in examples}
    if len(pairs) > 1:
        raise ValueError("examples mix single sentences and pairs; batch one task at a time")
    n_special = 3 if pairs == {True} else 2  # [CLS] a [SEP] (b [SEP])
    if max_len < n_special:
        raise ValueError(f"max_len={max_len} leaves no room for the {n_special} special tokens: "
                         f"use max_len >= {n_special}")
    is_pair, n = pairs == {True}, len(examples)

    def epoch() -> Iterator[dict]:  # a generator apart, so checks run now but draws lazily
        order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
        if group_by_length:
            cuts = _grouped_order(examples, order, tokenizer, batch_size, max_len, is_pair,
                                  generator)
        else:
            cuts = (order[s:s + batch_size] for s in range(0, n, batch_size))
        for cut in cuts:
            yield _collate([examples[i] for i in cut], tokenizer, max_len, is_pair)
    return epoch()


# -----------------------------------------------------------------------------
# metrics


def _as_list(x) -> list:
    if isinstance(x, torch.Tensor):
        if x.dim() != 1:
            raise ValueError(f"expected a 1-D tensor, got shape {tuple(x.shape)}: pass class ids "
                             "(logits.argmax(-1)) or scores (logits.squeeze(-1))")
        return x.tolist()
    return list(x)


def compute_metrics(task: str, preds, labels) -> dict[str, float]:
    """The GLUE metrics of a task: accuracy (all classification tasks), plus MCC (CoLA) or
    F1 of class 1 (MRPC, QQP); Pearson and Spearman for STS-B. preds are class ids
    (STS-B: scores), as lists or 1-D tensors."""
    spec = task_spec(task)
    p, y = _as_list(preds), _as_list(labels)
    if len(p) != len(y) or not p:
        raise ValueError(f"got {len(p)} predictions for {len(y)} labels: need equal, non-zero "
                         "lengths")
    if spec.labels is None:
        return {"pearson": pearson(p, y), "spearman": spearman(p, y)}
    out = {"accuracy": sum(a == b for a, b in zip(p, y)) / len(y)}
    if "mcc" in spec.metrics:
        out["mcc"] = matthews_corrcoef(p, y)
    if "f1" in spec.metrics:
        out["f1"] = f1_score(p, y)
    return out
