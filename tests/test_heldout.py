"""GLUE's --eval-fraction (a slice of train.tsv, fixed for every seed and lr, dev.tsv unread) and
--group-by-length (the same rows each epoch, only grouped). Oracle: the rows of train.tsv as
glue.load_glue reads them, and glue.batches as train.py called it before the flag existed.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_heldout.py
"""

from collections import Counter

import pytest
import torch

import train
from conftest import SHARED
from data import glue, tasks
from models import load_model

LOAD = glue.load_glue  # before any test patches it
COLA = SHARED / "data" / "glue" / "CoLA"
pytestmark = pytest.mark.skipif(not (COLA / "train.tsv").is_file(), reason="no CoLA download")


def rows_seen(tmp_path, monkeypatch, *flags: str) -> dict:
    """The train and eval rows glue_task hands to classify_task, and the files it read."""
    args = train.parse_args(["--task", "cola", "--data-dir", str(COLA), "--out",
                             str(tmp_path / "o"), *flags])
    seen: dict = {"splits": []}
    monkeypatch.setattr(glue, "load_glue", lambda t, d, split: seen["splits"].append(split)
                        or LOAD(t, d, split))
    monkeypatch.setattr(tasks, "classify_task", lambda a, d, r, tr, dev, *_: seen.update(
        train=tr, dev=dev))
    tasks.glue_task(args, torch.device("cpu"), train.random_streams(args.seed))
    return seen


def test_held_out_slice_is_disjoint_fixed_and_never_dev(tmp_path, monkeypatch):
    full = glue.load_glue("cola", COLA, "train")
    a = rows_seen(tmp_path, monkeypatch, "--eval-fraction", "0.1")
    b = rows_seen(tmp_path, monkeypatch, "--eval-fraction", "0.1", "--seed", "3", "--lr",
                  "1e-3")
    assert a["splits"] == ["train"]  # dev.tsv is not read
    assert Counter(a["train"]) + Counter(a["dev"]) == Counter(full)  # a partition of train.tsv
    assert len(a["dev"]) == round(0.1 * len(full))
    assert a["dev"] == b["dev"] and a["train"] == b["train"]  # whatever --seed and --lr
    plain = rows_seen(tmp_path, monkeypatch)  # unset: dev.tsv, as before
    assert plain["dev"] == glue.load_glue("cola", COLA, "dev") and plain["train"] == full
    assert train.parse_args(["--task", "cola", "--data-dir", str(COLA)]).eval_fraction is None


def test_group_by_length_keeps_each_epochs_rows_and_the_default_batches(tmp_path):
    flags = ["--task", "cola", "--data-dir", str(COLA), "--max-train", "400", "--batch-size",
             "8", "--out", str(tmp_path / "o")]
    _, tok = load_model("tiny")
    rows = glue.load_glue("cola", COLA, "train")[:400]

    def epoch(*extra: str) -> list[dict]:
        args = train.parse_args([*flags, *extra])
        task = tasks.glue_task(args, torch.device("cpu"), train.random_streams(0))
        return [next(b) for b in [task.train_batches(torch.Generator().manual_seed(1))]
                for _ in range(50)]

    def examples(batches: list[dict]) -> Counter:
        return Counter((tuple(ids[m.bool()].tolist()), int(y)) for b in batches
                       for ids, m, y in zip(b["input_ids"], b["attention_mask"], b["labels"]))

    plain, grouped = epoch(), epoch("--group-by-length")
    before = glue.batches(rows, tok, 8, 128, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y[k]) for x, y in zip(plain, before) for k, x in x.items())
    assert examples(plain) == examples(grouped)  # the same rows in the epoch
    width = lambda bs: sum(b["input_ids"].numel() for b in bs)  # noqa: E731
    assert width(grouped) < width(plain)  # less padding
