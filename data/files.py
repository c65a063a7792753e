"""Rows from files: your own data (train.py --data FILE) and GLUE's .tsv files (data/glue.py).
Formats: .csv (RFC 4180, a header line), .tsv (a header line, split on tabs, no quoting, as
GLUE) and .jsonl (one JSON object per line). Files are UTF-8, regular, at most MAX_BYTES; a bad
row raises ValueError naming `file:line`.

    train, labels = to_examples(read_rows("reviews.csv"), "text", None, "label")
"""

import csv
import io
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from lora import read_regular

MAX_BYTES = 1 << 30  # of one file, held in memory (MNLI's train.tsv, the largest, is 80 MB)
FORMATS = (".csv", ".tsv", ".jsonl")
TEXT_FIELDS = ("text", "sentence")  # --text-field's default: the first one the file has
_INT = re.compile(r"-?[0-9]{1,18}")  # an integer label; longer digit strings stay strings
_FLOAT = re.compile(r"\s*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\s*")  # as float()


class Example(NamedTuple):
    text_a: str
    text_b: str | None
    label: int | float  # class id (HF `datasets` ids), or the STS-B score in [0, 5]


class Row(NamedTuple):
    where: str  # "file:line" of the row's first line, for messages
    fields: dict  # name -> value: str from CSV/TSV, any JSON value from JSONL


class Completion(NamedTuple):
    prompt: str
    completion: str


def _csv_records(path: Path, text: str) -> list[tuple[int, list[str]]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records, start = [], 1
    try:
        for values in reader:
            records.append((start, values))
            start = reader.line_num + 1
    except csv.Error as e:
        raise ValueError(f"{path}:{start}: malformed CSV ({e}); fix the row's quoting") from None
    return records


def _table(path: Path, records: list[tuple[int, list[str]]], stray: str,
           header: Sequence[str] | None) -> list[Row]:
    """(line, fields) records as Rows, blank lines dropped, the first one the header if needed."""
    records = [(n, v) for n, v in records if v not in ([], [""])]
    if header is None:
        if not records:
            raise ValueError(f"{path}:1: the file is empty: the first line must name the columns")
        (at, header), records = records[0], records[1:]
        if twice := sorted(h for h, k in Counter(header).items() if k > 1):
            raise ValueError(f"{path}:{at}: column {twice[0]!r} appears twice in the header; "
                             "rename one")
    for n, values in records:
        if len(values) != len(header):
            raise ValueError(f"{path}:{n}: {len(values)} fields, the header has {len(header)}; "
                             f"fix the row (a stray {stray}?)")
    return [Row(f"{path}:{n}", dict(zip(header, values))) for n, values in records]


def _jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({str(e)[:80]}); write one JSON "
                             "object per line") from None
        if not isinstance(value, dict):
            raise ValueError(f"{path}:{n}: a JSON {type(value).__name__}, not an object; write "
                             'one {"field": value, ...} object per line')
        rows.append(Row(f"{path}:{n}", value))
    return rows


def read_rows(path: str | os.PathLike, header: Sequence[str] | None = None) -> list[Row]:
    """The data rows of a .csv, .tsv or .jsonl file, in file order (at least one); `header`
    names the columns of a table that has no header line (GLUE's CoLA).
    read_rows("reviews.csv")[0] == Row("reviews.csv:2", {"text": "fine", "label": "pos"})"""
    path, kind = Path(path), Path(path).suffix.lower()
    data = read_regular(path, MAX_BYTES)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: byte {data[e.start]:#04x} at offset {e.start} is not "
                         "UTF-8; save the file as UTF-8") from None
    if kind == ".csv":
        rows = _table(path, _csv_records(path, text), "comma or quote", header)
    elif kind == ".tsv":  # split on "\n" and "\t" only; a trailing "\r" dropped
        lines = [line.rstrip("\r").split("\t") for line in text.split("\n")]
        rows = _table(path, list(enumerate(lines, 1)), "tab or newline in the text", header)
    elif kind == ".jsonl":
        rows = _jsonl(path, text)
    else:
        hint = " (JSON Lines: one object per line, named .jsonl)" if kind == ".json" else ""
        raise ValueError(f"{path}: unknown format {path.suffix or '(no extension)'!r}{hint}: "
                         f"name the file {', '.join(FORMATS)}")
    if not rows:
        raise ValueError(f"{path}:1: no data rows; add rows (a header-only or empty file)")
    return rows


# -----------------------------------------------------------------------------
# fields


def _text(row: Row, name: str, fix: str, label: bool = False) -> str:
    """Field `name` as non-empty UTF-8 text, else ValueError naming the row and `fix`. A label
    may also be a JSON int (taken as its digits, so CSV and JSONL files agree)."""
    if name not in row.fields:
        has = ", ".join(map(repr, list(row.fields)[:8])) or "none"
        raise ValueError(f"{row.where}: no field {name!r} (the row has {has}); {fix}")
    value = row.fields[name]
    value = str(value) if label and type(value) is int else value  # not a bool
    if not isinstance(value, str):
        what = ("a float: regression is not supported" if isinstance(value, float) else
                f"a {type(value).__name__}")
        raise ValueError(f"{row.where}: field {name!r} is {json.dumps(value)[:40]} ({what}), "
                         f"not a string{' or an integer' if label else ''}; fix the row")
    if not value.strip():
        raise ValueError(f"{row.where}: field {name!r} is empty; fill it or drop the row")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape
        raise ValueError(f"{row.where}: field {name!r} holds a lone surrogate escape, not "
                         "UTF-8 text; fix the row") from None
    return value


def to_examples(rows: Sequence[Row], text_field: str, pair_field: str | None, label_field: str,
                labels: Sequence[str | int] | None = None) -> tuple[list[Example], tuple]:
    """(examples with class ids, the label values in id order): without `labels` the sorted
    unique labels of `rows`, ints when every label is an integer (so "2" < "10"), never a mix.
    to_examples(rows, "text", None, "label") == ([Example("fine", None, 1), ...], (0, 1))"""
    fix = "pass --{}-field NAME or fix the row".format
    texts = [(_text(r, text_field, fix("text")),
              None if pair_field is None else _text(r, pair_field, fix("pair"))) for r in rows]
    raw = [_text(r, label_field, fix("label"), label=True) for r in rows]
    if labels is None:
        ints = all(_INT.fullmatch(v) for v in raw)
        odd = [i for i, v in enumerate(raw) if not re.fullmatch(r"-?[0-9]+", v)]
        if odd and all(_FLOAT.fullmatch(v) for v in raw):
            raise ValueError(f"{rows[odd[0]].where}: label {raw[odd[0]]!r} is a float: regression "
                             "is not supported; use class names or integer ids")
        if 0 < len(odd) < len(raw):  # integer ids and a name: a stray row, not a class
            raise ValueError(f"{rows[odd[0]].where}: label {raw[odd[0]]!r} is not an integer, but "
                             f"{len(raw) - len(odd)} of {len(raw)} labels are: fix the row")
        labels = tuple(sorted({int(v) for v in raw} if ints else set(raw)))
        if len(labels) < 2:
            raise ValueError(f"{rows[0].where}: every label is {labels[0]!r}: classification "
                             f"needs two classes or more (is --label-field {label_field} the "
                             "label column?)")
        if len(labels) == len(raw) > 3:  # no class seen twice: a text or id column, not labels
            raise ValueError(f"{rows[0].where}: every row has a label of its own ({len(raw)} "
                             f"rows, {len(raw)} labels): is --label-field {label_field} the "
                             "label column?")
    ids = {str(v): i for i, v in enumerate(labels)}
    examples = []
    for r, (a, b), v in zip(rows, texts, raw):
        key = str(int(v)) if _INT.fullmatch(v) and isinstance(labels[0], int) else v
        if key not in ids:
            shown = ", ".join(map(repr, labels[:10])) + (", ..." if len(labels) > 10 else "")
            raise ValueError(f"{r.where}: label {v!r} is not one of the training labels "
                             f"({shown}); fix the row or add the class to the training file")
        examples.append(Example(a, b, ids[key]))
    return examples, tuple(labels)


def to_completions(rows: Sequence[Row]) -> list[Completion]:
    """Prompt → completion pairs from the "prompt" and "completion" fields (both non-empty)."""
    fix = "every prompt → completion row needs both fields; fix the row"
    return [Completion(_text(r, "prompt", fix), _text(r, "completion", fix)) for r in rows]
