"""bench.py, the speed bench (`make bench`): its checks before any timing and its operator count.
The grid, report, peers and planted study are tested in tests/test_study.py.

Run: .venv/bin/python -m pytest tests/test_bench.py -q
"""

import re

import pytest
import torch
import torch.nn as nn

import bench


def test_op_count_counts_dispatched_aten_operators():
    x = torch.ones(3)
    assert bench.op_count(lambda: None) == 0
    assert bench.op_count(lambda: (x + 1) * 2) >= 2  # add and mul at least


@pytest.mark.parametrize("flag,value", [("--repeats", "0"), ("--setup-repeats", "0"),
                                        ("--batch-size", "0"), ("--r", "0"), ("--warmup", "-1"),
                                        ("--threads", "-1")])
def test_bad_bench_arguments_are_refused_before_the_model_loads(tmp_path, monkeypatch, flag,
                                                               value):
    monkeypatch.setattr(bench, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match=f"{flag} {value}: use >= "):
        bench.main([flag, value, "--out", str(tmp_path / "b.json")])
    assert list(tmp_path.iterdir()) == []


def test_a_bench_written_outside_results_leaves_the_readme_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("# mine\n")
    monkeypatch.setattr(bench, "load_model", lambda *a, **k: (nn.Linear(1, 1), None))
    monkeypatch.setattr(bench, "step_rows", lambda *a, **k: (
        [], {"embedding_output_requires_grad": False}))
    bench.main(["--no-peers", "--sst2", str(tmp_path / "none"), "--out",
                str(tmp_path / "elsewhere" / "b.json")])
    assert (tmp_path / "elsewhere" / "b.json").is_file()
    assert (tmp_path / "README.md").read_text() == "# mine\n"
    assert not (tmp_path / "results").exists()
    assert "README.md left alone" in capsys.readouterr().out


@pytest.mark.parametrize("out", ["/dev/null/x.json", "/dev/null/deeper/x.json", "."])
def test_a_bench_output_that_cannot_be_written_is_refused_before_the_model_loads(out,
                                                                                monkeypatch):
    """make bench wrote its file only after minutes of timing: a path under a file, or a
    folder, is refused first."""
    monkeypatch.setattr(bench, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match=f"--out {re.escape(out)}: cannot be written"):
        bench.main(["--no-peers", "--out", out])


def test_a_bench_rank_above_the_models_width_is_refused_before_timing(tmp_path, monkeypatch):
    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.dense = nn.Linear(8, 8), nn.Linear(8, 16)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "load_model", lambda *a, **k: (Fake(), None))
    monkeypatch.setattr(bench, "step_rows", lambda *a, **k: pytest.fail("timed"))
    with pytest.raises(ValueError, match="--r 9 is above 8, the smallest side of MiniLM's "
                                         "adapted matrices .*use --r <= 8"):
        bench.main(["--no-peers", "--r", "9", "--out", str(tmp_path / "results" / "b.json")])
    assert list(tmp_path.iterdir()) == []


def test_a_missing_gpu_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="--devices cuda but CUDA is not available"):
        bench.main(["--devices", "cuda", "--out", str(tmp_path / "b.json")])
