"""Your own data: a validating reader for CSV, TSV and JSONL files (train.py --data FILE).

    from data.files import read_rows, to_examples, to_completions
    rows = read_rows("reviews.csv")                       # list[Row], one per data row
    train, labels = to_examples(rows, "text", None, "label")   # Example(text, None, class id)
    dev, _ = to_examples(read_rows("dev.csv"), "text", None, "label", labels)
    pairs = to_completions(read_rows("chat.jsonl"))       # Completion(prompt, completion)

The format follows the extension: .csv is RFC 4180 (a header line, "quoted" fields may hold
commas, quotes and newlines); .tsv is one row per line split on tabs, no quoting (as GLUE and
IANA's text/tab-separated-values), with a header line; .jsonl is one JSON object per line
(blank lines skipped). Files are UTF-8 (a BOM is allowed), regular files of at most MAX_BYTES.
Every row is validated before anything else runs; a bad one raises ValueError naming
`file:line` and the fix, as data/glue.py does.

Class labels may be strings or ints. Their ids are the sorted unique values of the training
file (numerically when every label is an integer, so "2" < "10"); an eval file's label outside
that set is an error. Regression is not supported: a float label is refused.
"""

from __future__ import annotations

import csv
from collections import Counter
import io
import json
import math
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from data.glue import Example

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
MAX_BYTES = 1 << 30  # the file is held in memory, decoded: a bound, not a limit of the format
TEXT_FIELDS = ("text", "sentence")  # --text-field's default: the first one the file has
_INT = re.compile(r"-?[0-9]{1,18}")  # an integer label; longer digit strings stay strings


class Row(NamedTuple):
    where: str  # "file:line" of the row's first line, for messages
    fields: dict  # name -> value: str from CSV/TSV, any JSON value from JSONL


class Completion(NamedTuple):
    prompt: str
    completion: str


def _check_file(path: Path, max_bytes: int) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"data file {path} does not exist: check the path") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file (a folder, device or pipe): pass a "
                         f"{'/'.join(FORMATS)} file")
    if st.st_size > max_bytes:
        raise ValueError(f"{path} holds {st.st_size:,} bytes, more than the {max_bytes:,} the "
                         "reader takes: split the file or sample it")


def _read_text(path: Path, max_bytes: int) -> str:
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)  # the file may have grown since stat
    if len(data) > max_bytes:
        raise ValueError(f"{path} grew past {max_bytes:,} bytes while being read")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: byte {data[e.start]:#04x} at offset {e.start} is not "
                         "UTF-8; save the file as UTF-8") from None


def _delimited(path: Path, text: str, kind: str) -> list[Row]:
    """CSV through the csv module (strict quoting), TSV split on tabs; header first."""
    if kind == "csv":
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        records, start = [], 1
        try:
            for values in reader:
                records.append((start, values))
                start = reader.line_num + 1
        except csv.Error as e:
            raise ValueError(f"{path}:{start}: malformed CSV ({e}); fix the quoting of the "
                             "row") from None
    else:
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the final newline
        records = [(i + 1, line.rstrip("\r").split("\t")) for i, line in enumerate(lines)]
    records = [(n, v) for n, v in records if v != [""] and v != []]  # blank lines
    if not records:
        raise ValueError(f"{path}:1: the file is empty: the first line must name the columns")
    _, header = records[0]
    twice = sorted(h for h, k in Counter(header).items() if k > 1)
    if twice:
        raise ValueError(f"{path}:{records[0][0]}: column {twice[0]!r} appears twice in the "
                         "header; rename one")
    rows = []
    for n, values in records[1:]:
        if len(values) != len(header):
            stray = "comma or quote" if kind == "csv" else "tab or newline in the text"
            raise ValueError(f"{path}:{n}: {len(values)} fields, the header has {len(header)}; "
                             f"fix the row (a stray {stray}?)")
        rows.append(Row(f"{path}:{n}", dict(zip(header, values))))
    return rows


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (use a finite number or null)")


def _jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    for i, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        where = f"{path}:{i + 1}"
        try:
            value = json.loads(line, parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{where}: not a JSON line ({str(e)[:80]}); write one JSON object "
                             "per line") from None
        if not isinstance(value, dict):
            raise ValueError(f"{where}: a JSON {type(value).__name__}, not an object; write one "
                             '{"field": value, ...} object per line')
        rows.append(Row(where, value))
    return rows


def read_rows(path: str | os.PathLike, max_bytes: int = MAX_BYTES) -> list[Row]:
    """The data rows of a .csv, .tsv or .jsonl file, in file order (at least one).
    read_rows("a.csv")[0] -> Row("a.csv:2", {"text": "fine", "label": "1"})"""
    path = Path(path)
    _check_file(path, max_bytes)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        hint = " (JSON Lines: one object per line, named .jsonl)" if path.suffix == ".json" else ""
        raise ValueError(f"{path}: unknown format {path.suffix or '(no extension)'!r}{hint}: "
                         f"name the file {', '.join(FORMATS)}")
    text = _read_text(path, max_bytes)
    rows = _jsonl(path, text) if kind == "jsonl" else _delimited(path, text, kind)
    if not rows:
        raise ValueError(f"{path}:1: no data rows; add rows (a header-only or empty file)")
    return rows


# -----------------------------------------------------------------------------
# fields


def _field(row: Row, name: str, fix: str):
    if name not in row.fields:
        have = ", ".join(map(repr, list(row.fields)[:8])) or "none"
        raise ValueError(f"{row.where}: no field {name!r} (the row has {have}); {fix}")
    return row.fields[name]


def _text(row: Row, name: str, fix: str) -> str:
    value = _field(row, name, fix)
    if not isinstance(value, str):
        raise ValueError(f"{row.where}: field {name!r} is {json.dumps(value)[:40]} (a "
                         f"{type(value).__name__}), not a string; quote it")
    if not value.strip():
        raise ValueError(f"{row.where}: field {name!r} is empty; fill it or drop the row")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape
        raise ValueError(f"{row.where}: field {name!r} holds a lone surrogate escape, not "
                         "UTF-8 text; fix the row") from None
    return value


def default_text_field(rows: Sequence[Row]) -> str:
    """The first of TEXT_FIELDS the first row has, else ValueError naming its fields."""
    for name in TEXT_FIELDS:
        if name in rows[0].fields:
            return name
    raise ValueError(f"{rows[0].where}: no 'text' or 'sentence' field (the row has "
                     f"{', '.join(map(repr, list(rows[0].fields)[:8]))}); pass --text-field NAME")


def is_completion_data(rows: Sequence[Row]) -> bool:
    """Prompt → completion data: the first row has both a "prompt" and a "completion" field."""
    return "prompt" in rows[0].fields and "completion" in rows[0].fields


def _label(row: Row, name: str) -> str:
    """The label as a string (a JSON int as its digits), so CSV and JSONL files agree."""
    value = _field(row, name, "pass --label-field NAME or fix the row")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        what = "a float: regression is not supported" if isinstance(value, float) else \
            f"a {type(value).__name__}"
        raise ValueError(f"{row.where}: label {json.dumps(value)[:40]} is {what}; labels are "
                         "class names (strings) or ids (ints)")
    return _text(Row(row.where, {name: str(value)}), name, "")


def _is_float(s: str) -> bool:
    try:
        return math.isfinite(float(s))
    except ValueError:
        return False


def to_examples(rows: Sequence[Row], text_field: str, pair_field: str | None, label_field: str,
                labels: Sequence[str | int] | None = None) -> tuple[list[Example], tuple]:
    """(examples with class ids, the label values in id order). Without `labels` they are the
    sorted unique labels of `rows` (ints when every label is an integer); with them, a label
    outside raises.  to_examples(rows, "text", None, "label") -> ([Example(...)], (0, 1))"""
    texts = [(_text(r, text_field, "pass --text-field NAME or fix the row"),
              None if pair_field is None else
              _text(r, pair_field, "pass --pair-field NAME or fix the row")) for r in rows]
    raw = [_label(r, label_field) for r in rows]
    if labels is None:
        ints = all(_INT.fullmatch(v) for v in raw)
        if not ints and all(map(_is_float, raw)):
            i = next(i for i, v in enumerate(raw) if not _INT.fullmatch(v))
            raise ValueError(f"{rows[i].where}: label {raw[i]!r} is a float: regression is not "
                             "supported; use class names or integer ids")
        labels = tuple(sorted({int(v) for v in raw} if ints else set(raw)))
        if len(labels) < 2:
            raise ValueError(f"{rows[0].where}: every label is {labels[0]!r}: classification "
                             f"needs two classes or more (is --label-field {label_field} the "
                             "label column?)")
    labels = tuple(labels)
    ids = {str(v): i for i, v in enumerate(labels)}
    examples = []
    for r, (a, b), v in zip(rows, texts, raw):
        key = str(int(v)) if _INT.fullmatch(v) and isinstance(labels[0], int) else v
        if key not in ids:
            shown = ", ".join(map(repr, labels[:10])) + (", ..." if len(labels) > 10 else "")
            raise ValueError(f"{r.where}: label {v!r} is not one of the training labels "
                             f"({shown}); fix the row or add the class to the training file")
        examples.append(Example(a, b, ids[key]))
    return examples, labels


def to_completions(rows: Sequence[Row]) -> list[Completion]:
    """Prompt → completion pairs from the "prompt" and "completion" fields (both non-empty)."""
    fix = "every prompt → completion row needs both fields; fix the row"
    return [Completion(_text(r, "prompt", fix), _text(r, "completion", fix)) for r in rows]
