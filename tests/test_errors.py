"""The error catalogue: every bad input a user can give (flags, data, output folders, checkpoints,
adapters) fails with ValueError/FileNotFoundError before any work or write, with a short message
naming the bad value and the fix; the CLI prints it without a traceback and exits non-zero.
The README points here (test_the_readme_points_to_the_catalogue) instead of copying the list.

Run: .venv/bin/python -m pytest tests/test_errors.py -q     (python tests/test_errors.py prints
the catalogue as a markdown table)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from lora import add_lora, load_adapter, save_adapter  # noqa: E402

GLUE = ["--task", "sst2", "--data-dir"]  # followed by a folder the entry's setup writes


def tsv(rows: str):
    """A setup writing an SST-2 folder whose train.tsv is `rows` (dev.tsv is valid)."""
    def setup(tmp: Path) -> list[str]:
        d = tmp / "SST-2"
        d.mkdir()
        (d / "train.tsv").write_bytes(rows.encode("latin-1"))
        (d / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
        return [*GLUE, str(d)]
    return setup


def out_with(kind: str):
    """A setup giving --out a folder that already holds something."""
    def setup(tmp: Path) -> list[str]:
        out = tmp / "o"
        out.mkdir()
        if kind == "finished":
            (out / "results.json").write_text("{}")
        elif kind == "unfinished":
            (out / "checkpoint.pt").write_text("{}")
        return ["--out", str(out)]
    return setup


def checkpoint(write):
    """A setup giving --resume a folder whose checkpoint.pt write(path) makes."""
    def setup(tmp: Path) -> list[str]:
        (tmp / "o").mkdir()
        write(tmp / "o" / "checkpoint.pt")
        return ["--resume", str(tmp / "o")]
    return setup


def plain(*argv):
    return lambda tmp: list(argv)


def own(files: dict[str, str | bytes], *argv: str):
    """A setup writing --data files into tmp; an argv item naming one becomes its path."""
    def setup(tmp: Path) -> list[str]:
        for name, text in files.items():
            (tmp / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        return [str(tmp / a) if a in files else a for a in argv]
    return setup


ROWS = "text,label\ngood,pos\nbad,neg\n"  # a valid --data file
def stsb(score: str):
    """A setup writing an STS-B folder whose train.tsv row has the score `score`."""
    def setup(tmp: Path) -> list[str]:
        d = tmp / "STS-B"
        d.mkdir()
        head = "i\tg\tf\ty\to\ts1\ts2\tsentence1\tsentence2\tscore\n"
        (d / "train.tsv").write_text(head + f"0\tg\tf\ty\to\tn\tn\tA.\tB.\t{score}\n")
        (d / "dev.tsv").write_text(head + "0\tg\tf\ty\to\tn\tn\tA.\tB.\t1.0\n")
        return ["--task", "stsb", "--data-dir", str(d)]
    return setup


def model_folder(edit=None, fifo: str | None = None, sharded: bool = False):
    """A setup writing an HF BERT folder of the tiny encoder, config.json changed by `edit`,
    `fifo` (a file name) replaced by a FIFO, or the weights saved as a shard and an index that
    also lists a second shard, missing."""
    def setup(tmp: Path) -> list[str]:
        import dataclasses
        import os
        from lora import write_safetensors
        from models import TINY, BertModel, tiny_vocab
        m = tmp / "bert"
        m.mkdir()
        cfg = dataclasses.asdict(TINY) | {"model_type": "bert"}
        (m / "config.json").write_text(json.dumps(cfg | (edit or {})))
        (m / "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n")
        write_safetensors(m / "model.safetensors", BertModel(TINY).state_dict())
        if fifo:
            (m / fifo).unlink()
            os.mkfifo(m / fifo)
        if sharded:
            (m / "model.safetensors").rename(m / "model-00001-of-00002.safetensors")
            names = dict.fromkeys(BertModel(TINY).state_dict(), "model-00001-of-00002.safetensors")
            names["pooler.dense.bias"] = "model-00002-of-00002.safetensors"
            (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))
        return ["--model", str(m)]
    return setup


def fifo_tsv(tmp: Path) -> list[str]:
    import os
    argv = tsv("sentence\tlabel\na\t1\n")(tmp)
    (tmp / "SST-2" / "train.tsv").unlink()
    os.mkfifo(tmp / "SST-2" / "train.tsv")
    return argv


def hf_llama(**edit):
    """A setup writing a tiny HF llama folder (tests/test_hf_llama.py) with `edit` applied:
    config.json fields, or pre_tokenizer in tokenizer.json; then --model <it> on SST-2."""
    def setup(tmp: Path) -> list[str]:
        from test_hf_llama import ours, write_folder
        folder = write_folder(tmp / "llama", ours())
        for name, keys in (("config.json", ("num_hidden_layers",)),
                           ("tokenizer.json", ("pre_tokenizer",))):
            raw = json.loads((folder / name).read_text())
            raw.update({k: v for k, v in edit.items() if k in keys})
            (folder / name).write_text(json.dumps(raw))
        return ["--model", str(folder), *tsv("sentence\tlabel\na\t1\n")(tmp)]
    return setup


# (what the user did, setup -> argv, text the message must contain)
CLI = [
    ("--r 0", plain("--r", "0"), "--r 0: use >= 1"),
    ("--r 65 on a 64-wide model", plain("--r", "65"), "min(d_in, d_out) = 64"),
    ("--steps 0", plain("--steps", "0"), "--steps 0: use >= 1"),
    ("--epochs inf", plain("--epochs", "inf"), "--epochs inf: use a finite number"),
    ("--epochs 0", plain("--epochs", "0"), "--epochs 0: use > 0"),
    ("--steps and --epochs", plain("--epochs", "1", "--steps", "5"), "pick one"),
    ("--epochs on the endless planted task", plain("--epochs", "1"), "use --steps for planted"),
    ("--batch-size 0", plain("--batch-size", "0"), "--batch-size 0: use a number in [1, 65536]"),
    ("--max-len 0", plain("--max-len", "0"), "--max-len 0: use >= 1"),
    ("--max-len 2 on a sentence-pair task", plain("--task", "rte", "--data-dir", "/nonexistent",
                                                 "--max-len", "2"),
     "--max-len 2: rte examples need 3 special tokens; use --max-len >= 3"),
    ("--max-len above the positions",
     lambda t: [*tsv("sentence\tlabel\na\t1\n")(t), "--max-len", "4096"],
     "exceeds the model's 128"),
    ("--max-train 0", plain("--max-train", "0"), "--max-train 0: use >= 1"),
    ("--max-eval -1", plain("--max-eval", "-1"), "--max-eval -1: use >= 1"),
    ("--log-every 0", plain("--log-every", "0"), "--log-every 0: use >= 1"),
    ("--seed -1", plain("--seed", "-1"), "--seed -1: use a number in [0, 4294967295]"),
    # torch's CPU generator keeps a seed's low 32 bits: 2**32 would silently repeat seed 0
    ("--seed 2**32", plain("--seed", str(2**32)), "--seed 4294967296: use a number in [0, "),
    ("--seed 1e20", plain("--seed", "1" + "0" * 20), "use a number in [0, 4294967295]"),
    ("--threads -1", plain("--threads", "-1"), "--threads -1: use a number in [0, "),
    ("--save-every -2", plain("--save-every", "-2"), "--save-every -2: use >= 0"),
    ("--grad-clip -1", plain("--grad-clip", "-1"), "--grad-clip -1: use >= 0"),
    ("--fw-warmup 0", plain("--method", "fw", "--fw-warmup", "0"), "--fw-warmup 0: use >= 1"),
    ("--fw-track-every 0", plain("--method", "fw", "--fw-track-every", "0"),
     "--fw-track-every 0: use >= 1"),
    ("--lr 0", plain("--lr", "0"), "--lr 0: use a number in (0, 1e+15]"),
    ("--lr nan", plain("--lr", "nan"), "--lr nan: use a finite number"),
    ("--alpha inf", plain("--alpha", "inf"), "--alpha inf: use a finite number"),
    ("--dropout 1", plain("--dropout", "1"), "--dropout 1: use a number in [0, 1)"),
    ("--warmup 1.5", plain("--warmup", "1.5"), "--warmup 1.5: use a number in [0, 1)"),
    ("--weight-decay -0.1", plain("--weight-decay", "-0.1"), "--weight-decay -0.1: use >= 0"),
    ("--fw-lambda -1", plain("--method", "fw", "--fw-lambda", "-1"), "--fw-lambda -1: use >= 0"),
    ("--da-gamma 0", plain("--method", "da", "--da-gamma", "0"), "--da-gamma 0: use > 0"),
    ("--power nan", plain("--method", "fim", "--power", "nan"), "--power nan: use a finite number"),
    ("--r-min above --r", plain("--method", "fim", "--r-min", "9"),
     "the base rank must lie in [r_min, r_max]"),
    ("--r-max below --r-min", plain("--method", "fim", "--r-min", "5", "--r-max", "4"),
     "raise --r-max"),
    ("--score variance, one batch", plain("--method", "fim", "--score", "variance",
                                          "--calib-batches", "1"), "--calib-batches >= 2"),
    ("--device cuda without CUDA", plain("--device", "cuda"), "use --device auto or cpu"),
    ("--targets that match nothing (planted)", plain("--targets", "query,qkv"),
     "qkv matches no nn.Linear"),
    ("--targets that match nothing (GLUE)", lambda t: [*tsv("sentence\tlabel\na\t1\n")(t),
                                                       "--targets", "q_proj"],
     "target 'q_proj' matches no nn.Linear"),
    ("--model: a missing folder", plain("--model", "/nonexistent/bert"), "/nonexistent/bert"),
    ("--task sst2 without --data-dir", plain("--task", "sst2"), "needs --data-dir"),
    ("--data-dir that does not exist", plain(*GLUE, "/nonexistent/SST-2"), "/nonexistent"),
    ("--data-dir: a header-only train.tsv", tsv("sentence\tlabel\n"), "no data rows"),
    ("--data-dir: a bad label", tsv("sentence\tlabel\ngood\t7\n"), "label"),
    ("--data-dir: a row with 3 fields", tsv("sentence\tlabel\ngood\t1\textra\n"), "train.tsv:2"),
    ("--data-dir: non-UTF-8 bytes", tsv("sentence\tlabel\ncaf\xe9\t1\n"), "not UTF-8"),
    ("--out: an existing file", lambda t: (t / "f").write_text("x") and ["--out", str(t / "f")],
     "f is not a writable folder"),
    ("--out /dev/null/x", plain("--out", "/dev/null/x"), "is not a writable folder"),
    ("--out: a finished run", out_with("finished"), "pass --overwrite to replace it"),
    ("--out: an unfinished run", out_with("unfinished"), "train.py --resume"),
    ("--resume and --overwrite", lambda t: ["--resume", str(t), "--overwrite"],
     "drop --overwrite"),
    ("--resume with other flags", lambda t: ["--resume", str(t), "--lr", "1e-3"], "drop --lr"),
    ("--resume: no such folder", plain("--resume", "/nonexistent/run"),
     "/nonexistent/run: not a folder; pass the run's --out"),
    ("--resume: a file", own({"results.json": "{}"}, "--resume", "results.json"),
     "results.json: not a folder; pass the run's --out"),
    ("--resume: no checkpoint", lambda t: ["--resume", str(t)], "no checkpoint.pt"),
    ("--resume: an older fimlora's checkpoint/ folder", lambda t: (t / "checkpoint").mkdir() or
     ["--resume", str(t)], "checkpoint/ is an older fimlora's: start over with --overwrite"),
    ("--resume: checkpoint.pt garbage", checkpoint(lambda p: p.write_bytes(b"x")),
     "checkpoint.pt is not a readable fimlora checkpoint"),
    ("--resume: checkpoint.pt another program's dict", checkpoint(lambda p: torch.save(
        {"step": 3}, p)), "lacks the fields of a fimlora checkpoint"),
    ("--data: a row without the label field", own({"d.jsonl": '{"text": "a", "label": 1}\n'
                                                  '{"text": "b"}\n'}, "--data", "d.jsonl"),
     "d.jsonl:2: no field 'label'"),
    ("--data: an eval label the training file lacks",
     own({"d.csv": ROWS, "e.csv": "text,label\nok,pos\nmeh,mid\n"}, "--data", "d.csv",
         "--eval-data", "e.csv"), "e.csv:3: label 'mid' is not one of the training labels"),
    ("--data: an empty text", own({"d.csv": ROWS + ",neg\n"}, "--data", "d.csv"),
     "d.csv:4: field 'text' is empty"),
    ("--data: a number as text (JSONL)", own({"d.jsonl": '{"text": 5, "label": 0}\n'},
                                             "--data", "d.jsonl"), "(a int), not a string"),
    ("--data: a float label", own({"d.jsonl": '{"text": "a", "label": 0.5}\n'}, "--data",
                                  "d.jsonl"), "regression is not supported"),
    ("--data: integer labels and one class name (JSONL)",
     own({"d.jsonl": '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n' * 2
          + '{"text": "c", "label": "x"}\n'}, "--data", "d.jsonl"),
     "d.jsonl:5: label 'x' is not an integer, but 4 of 5 labels are: fix the row"),
    ("--data: non-UTF-8 bytes", own({"d.csv": ROWS.encode() + b"caf\xe9,pos\n"}, "--data",
                                    "d.csv"), "d.csv:4: byte 0xe9 at offset 31 is not UTF-8"),
    ("--data: a malformed JSON line", own({"d.jsonl": '{"text": "a", "label": 1\n'}, "--data",
                                          "d.jsonl"), "d.jsonl:1: not a JSON line"),
    ("--data: a CSV row with 3 fields", own({"d.csv": ROWS + "a,pos,x\n"}, "--data", "d.csv"),
     "d.csv:4: 3 fields, the header has 2"),
    ("--data: an unclosed CSV quote", own({"d.csv": ROWS + '"a,pos\n'}, "--data", "d.csv"),
     "d.csv:4: malformed CSV"),
    ("--data: one class only", own({"d.csv": "text,label\na,x\nb,x\n"}, "--data", "d.csv"),
     "classification needs two classes or more"),
    ("--data: a folder", lambda t: ["--data", str(t)], "is not a regular file"),
    ("--data: a .json file", own({"d.json": "[]"}, "--data", "d.json"), "unknown format '.json'"),
    ("--data: an eval completion outside the label set",
     own({"d.jsonl": '{"prompt": "p", "completion": " a"}\n' * 2 + '{"prompt": "q", '
          '"completion": " b"}\n' * 2, "e.jsonl": '{"prompt": "p", "completion": " c"}\n'},
         "--data", "d.jsonl", "--eval-data", "e.jsonl", "--model", "tiny-llama"),
     "e.jsonl:1: completion ' c' is not one of the 2 completions"),
    ("--data: prompt → completion on an encoder",
     own({"d.jsonl": '{"prompt": "p", "completion": " c"}\n'}, "--data", "d.jsonl"),
     "train them on a decoder"),
    ("--data with --task", own({"d.csv": ROWS}, "--data", "d.csv", "--task", "sst2"),
     "--data FILE replaces --task and --data-dir"),
    ("--eval-fraction 1", own({"d.csv": ROWS}, "--data", "d.csv", "--eval-fraction", "1"),
     "--eval-fraction 1: use a number in (0, 1)"),
    ("--eval-data without --data", plain("--eval-data", "e.csv"), "--eval-data needs --data"),
    ("--eval-data with --eval-fraction", own({"d.csv": ROWS}, "--data", "d.csv", "--eval-data",
                                             "d.csv", "--eval-fraction", "0.2"),
     "--eval-data and --eval-fraction both given: pick one"),
    ("--pair-field the text column", own({"d.csv": ROWS}, "--data", "d.csv", "--pair-field",
                                         "text"), "--pair-field text, --label-field label: one "
     "column named twice"),
    ("--label-field an id column", own({"d.csv": "id,text,label\n" + "".join(
        f"{i},t{i},{i % 2}\n" for i in range(6))}, "--data", "d.csv", "--label-field", "id"),
     "d.csv:2: every row has a label of its own (6 rows, 6 labels): is --label-field id"),
    ("--eval-fraction 0 on GLUE", plain("--task", "sst2", "--data-dir", ".", "--eval-fraction",
                                        "0"), "--eval-fraction 0: use a number in (0, 1)"),
    ("--eval-fraction on the planted task", plain("--eval-fraction", "0.1"),
     "--task planted draws its own rows, so --eval-fraction would do nothing"),
    ("--group-by-length on the planted task", plain("--group-by-length"),
     "so --group-by-length would do nothing: drop them or use GLUE or --data"),
    ("--max-train, --max-eval and --max-len on the planted task",
     plain("--max-train", "5", "--max-eval", "1", "--max-len", "64"),
     "so --max-train, --max-eval, --max-len would do nothing"),
    ("--r-max 0 (not the default 2r)", plain("--method", "fim", "--r-min", "0", "--r-max", "0"),
     "--r-max 0: use >= 1"),
    ("--max-train leaving one class of a sorted file",
     own({"d.csv": "text,label\n" + "a,neg\n" * 6 + "b,pos\n" * 6}, "--data", "d.csv",
         "--max-train", "3"), "the 3 training rows left by --max-train 3 are all of class 'neg'"),
    ("--max-train leaving one class (GLUE)",
     lambda t: [*tsv("sentence\tlabel\na\t1\nb\t1\nc\t0\n")(t), "--max-train", "2"],
     "the 2 training rows left by --max-train 2 are all of class 1"),
    ("--targets ''", plain("--targets", ""), "--targets '' has an empty name"),
    ("--targets ,", plain("--targets", ","), "--targets ',' has an empty name"),
    ("--targets query, (lora.add_lora's rule, before any work)", plain("--targets", "query,"),
     "--targets 'query,' has an empty name"),
    ("--weight-decay 300 at the planted lr 5e-3", plain("--weight-decay", "300"),
     "--weight-decay 300 x --lr 0.005 >= 1 flips every weight's sign"),
    ("--weight-decay 2000 at GLUE's lr 5e-4", plain(*GLUE, ".", "--weight-decay", "2000"),
     "--weight-decay 2000 x --lr 0.0005 >= 1"),
    ("--group-by-length on a decoder", plain("--model", "tiny-llama", "--task", "sst2",
                                             "--data-dir", ".", "--group-by-length"),
     "--group-by-length batches encoder classification only"),
    ("--alpha 0", plain("--alpha", "0"), "--alpha 0: use > 0"),
    ("--alpha 1e308", plain("--alpha", "1e308"), "the LoRA scale alpha/r = 1.25e+307 overflows"),
    ("--lr 1e20", plain("--lr", "1e20"), "--lr 1e20: use a number in (0, 1e+15]"),
    ("--batch-size 10**9", plain("--batch-size", str(10**9)),
     "--batch-size 1000000000: use a number in [1, 65536]"),
    ("--threads 5000", plain("--threads", "5000"), "--threads 5000: use a number in [0, "),
    ("--targets lm_head on a tied decoder", plain("--model", "tiny-llama", "--targets",
                                                  "q_proj,lm_head"), "drop lm_head from the targets"),
    ("--budget with --method lora", plain("--budget", "params"),
     "--method lora ignores --budget (used by --method fim / fim+da only)"),
    ("--fw-warmup with --method lora", plain("--fw-warmup", "10"),
     "--method lora ignores --fw-warmup (used by --method fw only)"),
    ("--da-samples with --method fim", plain("--method", "fim", "--da-samples", "64"),
     "--method fim ignores --da-samples (used by --method da / fim+da only)"),
    ("--compare on a GLUE task", plain(*GLUE, "/nonexistent", "--compare"),
     "--compare needs --task planted (its oracle): drop it"),
    ("--data-dir: an STS-B score 0_5", stsb("0_5"), "train.tsv:2: score '0_5'"),
    ("--data-dir: train.tsv is a FIFO", fifo_tsv, "train.tsv is not a regular file"),
    ("--model: config.json with a string size", model_folder({"hidden_size": "64"}),
     "config.json: hidden_size='64' is invalid: use an int"),
    ("--model: config.json claims 100000 layers", model_folder({"num_hidden_layers": 100000}),
     "num_hidden_layers=100000 but the weights hold 2 blocks"),
    ("--model: vocab.txt is a FIFO", model_folder(fifo="vocab.txt"),
     "vocab.txt is not a regular file"),
    ("--model: weights in shards, one missing", model_folder(sharded=True),
     "model-00002-of-00002.safetensors not found: model.safetensors.index.json lists it"),
    ("--model: an HF llama folder claiming 100000 layers", hf_llama(num_hidden_layers=100000),
     "num_hidden_layers=100000 but the weights hold 2 blocks"),
    ("--model: an HF folder with a SentencePiece tokenizer.json",
     hf_llama(pre_tokenizer={"type": "Metaspace"}), "pre-tokenizer {\"type\": \"Metaspace\"} "
                                                    "is not supported"),
    ("--targets inside a head (GLUE)", lambda t: [*tsv("sentence\tlabel\na\t1\n")(t),
                                                  "--targets", "query,classifier", "--r", "2"],
     "lie inside heads"),
    ("--out: a name over NAME_MAX", lambda t: ["--out", str(t / ("x" * 300))],
     "cannot create it (File name too long): pick another"),
    ("--out: a dangling symlink", lambda t: (t / "l").symlink_to(t / "gone") or
     ["--out", str(t / "l" / "o")], "cannot create it (File exists): pick another"),
    ("--resume: checkpoint.pt a FIFO", checkpoint(os.mkfifo),
     "checkpoint.pt is not a regular file"),
    ("--resume: checkpoint.pt a link to /dev/zero", checkpoint(lambda p: p.symlink_to("/dev/zero")),
     "checkpoint.pt is not a regular file"),
    ("--score lorada (a study score: study/scores.py)", plain("--method", "fim", "--score",
                                                               "lorada"),
     "--score invalid choice: 'lorada'"),
    ("--plants with a GLUE task", plain(*GLUE, "/nonexistent", "--plants", "anywhere"),
     "--plants needs --task planted: drop it"),
    ("--r 1.5", plain("--r", "1.5"), "--r invalid int value: '1.5'"),
]


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("label,setup,match", CLI, ids=[c[0] for c in CLI])
def test_bad_cli_input_fails_before_any_write(tmp_path, label, setup, match):
    argv = setup(tmp_path)
    if "--out" not in argv and "--resume" not in argv:
        argv += ["--out", str(tmp_path / "new")]
    before = snapshot(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        base = ["--batch-size", "4", "--threads", "1"]
        base += [] if "--epochs" in argv else ["--steps", "2"]
        train.main(argv if "--resume" in argv else [*base, *argv])
    msg = str(e.value)
    assert match in msg, msg
    assert len(msg) < 600 and msg.count("\n") < 10  # one screen
    assert snapshot(tmp_path) == before  # nothing written, nothing changed


# adapters and checkpoints through the API: (what, call(tmp) -> raises, text)
def _adapted():
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 2))
    add_lora(model, ["0"], r=2, alpha=4, heads=["1"])
    return model


def _saved(tmp: Path, edit) -> Path:
    model = _adapted()
    save_adapter(tmp / "a", model, ["0"], heads=["1"])
    cfg = json.loads((tmp / "a" / "adapter_config.json").read_text())
    edit(cfg)
    (tmp / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    return tmp / "a"


def _saved_peft(tmp: Path, fields: dict) -> Path:
    save_adapter(tmp / "p", _adapted(), ["0"], heads=["1"], format="peft")
    cfg = json.loads((tmp / "p" / "adapter_config.json").read_text())
    (tmp / "p" / "adapter_config.json").write_text(json.dumps(cfg | fields))
    return tmp / "p"


API = [
    ("load_adapter: no such folder", lambda t: load_adapter(t / "none", _adapted()),
     "adapter_config.json not found"),
    ("load_adapter: ranks as a list", lambda t: load_adapter(
        _saved(t, lambda c: c.update(ranks=[2])), _adapted()), "ranks"),
    ("load_adapter: alpha not finite", lambda t: load_adapter(
        _saved(t, lambda c: c["alphas"].update({"0": float("nan")})), _adapted()), "alpha"),
    ("load_adapter: rank disagrees with the tensors", lambda t: load_adapter(
        _saved(t, lambda c: c["ranks"].update({"0": 3})), _adapted()), "shape"),
    ("load_adapter: config is not JSON", lambda t: (
        _saved(t, lambda c: None) / "adapter_config.json").write_text("{x") and
        load_adapter(t / "a", _adapted()), "adapter_config.json"),
    ("load_adapter: an alpha_pattern key that is not a regex", lambda t: load_adapter(
        _saved_peft(t, {"alpha_pattern": {"0.(": 4}}), _adapted()),
     "alpha_pattern key '0.(' is not a valid regular expression"),
    ("load_adapter: PEFT's pickled adapter_model.bin", lambda t: load_adapter(
        (_saved_peft(t, {}) / "adapter_model.safetensors").rename(t / "p" / "adapter_model.bin")
        .parent, _adapted()), "adapter_model.bin: a pickle"),
]


@pytest.mark.parametrize("label,call,match", API, ids=[a[0] for a in API])
def test_bad_adapter_fails_and_leaves_the_model_alone(tmp_path, label, call, match):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        call(tmp_path)
    assert match in str(e.value), str(e.value)


def test_catalogue_has_at_least_40_entries():
    assert len(CLI) + len(API) >= 40


@pytest.mark.parametrize("argv", [["--lr", "nan"], ["--resume", "/nonexistent/run"]])
def test_cli_prints_one_line_and_no_traceback(tmp_path, argv):
    out = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.startswith("error: "), out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1


def test_divergence_stops_with_the_step_and_the_cause(tmp_path):
    """An absurd learning rate without clipping: stopped at the first non-finite step, the cause
    named, no results written; the last good checkpoint stays."""
    out = tmp_path / "o"
    with pytest.raises(train.Diverged, match=r"at step \d+; likely cause: no gradient clipping"):
        train.main(["--steps", "60", "--batch-size", "4", "--lr", "1e12", "--weight-decay", "0", "--grad-clip", "0",
                    "--warmup", "0", "--save-every", "1", "--threads", "1", "--out", str(out)])
    assert not (out / "results.json").exists()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(bool(torch.isfinite(v).all()) for v in ckpt["model"].values()) and ckpt["step"] >= 1


def test_divergence_names_a_scale_flag_moved_from_its_default(tmp_path):
    """LoRA-DA with an absurd β: the loss is NaN from step 1, and the error names --da-beta, not
    only the lr the user never changed."""
    with pytest.raises(train.Diverged, match=r"lower --lr 0.005 or --da-beta 1e\+30 \(or NaN"):
        train.main(["--method", "da", "--da-beta", "1e30", "--steps", "4", "--threads", "1",
                    "--out", str(tmp_path / "o")])


def catalogue_table() -> str:
    rows = ["| bad input | the message names |", "|---|---|"]
    rows += [f"| {label} | `{match}` |" for label, _, match in CLI + API]
    return "\n".join(rows)


def test_the_readme_points_to_the_catalogue(capsys):
    """README.md and docs/training.md do not copy the catalogue (a copy goes stale): they name
    this file and the command that prints it, and that command prints every entry."""
    import runpy
    for doc in ("README.md", "docs/training.md"):
        text = (ROOT / doc).read_text()
        assert "`tests/test_errors.py`" in text and "`python tests/test_errors.py`" in text, doc
    runpy.run_path(__file__, run_name="__main__")  # python tests/test_errors.py, in-process
    out = capsys.readouterr().out
    assert out == catalogue_table() + "\n"
    assert out.count("\n") - 2 == len(CLI + API)  # the header, the rule, one line per entry


if __name__ == "__main__":
    print(catalogue_table())
