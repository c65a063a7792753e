"""study.grid --select-lr and the grid at the chosen lr: the choice (best held-out metric, ties
to the smaller lr, only once every lr ran), the plan, and a finished cell at another lr refused.
Oracle: hand-written metrics. Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_lr.py
"""

import json

import pytest

from study import grid, report


def lr_cell(root, task, method, lr, value, metric="accuracy"):
    out = root / task / report.lr_folder(method, lr)
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({"args": {}, "metrics": {metric: value}}))


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A GLUE root with SST-2, results/lr with lora done at every lr (1e-3 best) and fim at two."""
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\na\t1\n")
    monkeypatch.chdir(tmp_path)
    for lr, acc in zip(report.LRS, (0.80, 0.81, 0.83)):
        lr_cell(tmp_path / "lr", "sst2", "lora", lr, acc)
    lr_cell(tmp_path / "lr", "sst2", "fim", 2e-4, 0.9)
    return tmp_path


def test_chosen_lr_is_the_best_held_out_metric_ties_to_the_smaller(tmp_path):
    for lr, mcc in zip(report.LRS, (0.3, 0.4, 0.4)):
        lr_cell(tmp_path, "cola", "lora", lr, mcc, "mcc")
    lr_cell(tmp_path, "cola", "fim", 1e-3, 0.5, "mcc")  # one lr only: not chosen yet
    assert report.chosen_lrs(report.lr_results(tmp_path)) == {"cola": {"lora": 5e-4}}
    table = "\n".join(report.lr_lines(tmp_path))
    assert "| cola | lora | 0.3000 | 0.4000 | 0.4000 | 0.0005 |" in table
    assert "(unfinished)" in table


def test_select_lr_dry_run_plans_seed_0_at_every_lr(setup, capsys):
    grid.main(["--select-lr", "--dry-run", "--tasks", "sst2", "--data-root", str(setup),
               "--methods", "lora", "fim", "da", "--root", str(setup / "cells")])
    out = capsys.readouterr().out
    assert "lr selection: 1 task(s) (sst2) x 3 methods x 3 lrs = 9 cells; to run 5:" in out
    assert f"{setup / 'lr' / 'sst2' / 'da-lr0.0002'}" in out and "lora-lr" not in out
    assert not (setup / "lr" / "chosen.json").exists()  # a dry run writes no choice
    with pytest.raises(ValueError, match="--lr is set by --select-lr for each cell .*: drop it"):
        grid.main(["--select-lr", "--dry-run", "--tasks", "sst2", "--data-root", str(setup),
                   "--", "--lr", "1e-3"])


def test_the_grid_runs_each_method_at_its_chosen_lr(setup, monkeypatch):
    ran = {}
    monkeypatch.setattr(grid, "run_grid", lambda cells, *a, extra, **k: ran.update(
        {cells[0][1]: extra}) or {})
    grid.main(["--data-root", str(setup), "--tasks", "sst2", "--methods", "lora", "fim",
               "--seeds", "0", "--root", str(setup / "cells")])
    assert ran == {"lora": ["--lr", "0.001"], "fim": []}  # fim: not chosen, the default
    cell = setup / "cells" / "sst2" / "lora-s0"
    cell.mkdir(parents=True)
    args = vars(grid.train.parse_args(["--model", "minilm", "--group-by-length", "--task", "sst2",
                                       "--data-dir", str(setup), "--out", str(cell)]))
    (cell / "results.json").write_text(json.dumps({"args": args, "metrics": {"accuracy": .8}}))
    with pytest.raises(ValueError, match=r"--lr 0.0005 there, 0.001 here"):
        grid.main(["--dry-run", "--tasks", "sst2", "--data-root", str(setup), "--methods",
                   "lora", "--seeds", "0", "--root", str(setup / "cells")])
    grid.main(["--dry-run", "--tasks", "sst2", "--data-root", str(setup), "--methods", "lora",
               "--seeds", "0", "--root", str(setup / "cells"), "--", "--lr", "5e-4"])  # user's
