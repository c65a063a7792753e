"""study/: the report on synthetic cells (mean ± std, paired Δ with its Student t interval, wins,
verdicts, the rank map, README blocks, damaged cells), the grid (skip / resume / busy with a fake
runner, bad input, Ctrl-C), the peers' checks and the planted study (its controls, the oracle
search, the criterion).

Oracles: hand-computed means, intervals and wins; published t tables; brute force for the study's
rank helpers. Run: .venv/bin/python -m pytest tests/test_study.py -q
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest
import torch

import runfolder
import train
from conftest import ROOT, SST2
from study import grid, peers, planted, report, scores
from study.report import folder

LAYER = "bert.encoder.layer.{}.{}"
MODULES = ("attention.self.query", "attention.self.value", "output.dense")
BLOCKS = "\n".join(["# x", "", "hand text", *report.BLOCKS["run"], "", *report.BLOCKS["results"],
                    "## After", "tail", ""])


def ranks(seed: int) -> dict[str, int]:
    r = {LAYER.format(i, m): 1 + (i + j + seed) % 16 for i in range(3)
         for j, m in enumerate(MODULES)}
    return r | {"bert.pooler.dense": 16}


def write_cell(root, task, method, seed, acc, params=1000, per_step=0.5, **extra):
    out = root / task / folder(method, seed)
    out.mkdir(parents=True)
    res = {"args": {"threads": 1}, "seed": seed, "metrics": {"accuracy": acc},
           "trainable_parameters": params, "seconds": {"calibration": 2.0, "per_step": per_step},
           "ranks": ranks(seed)} | extra
    (out / "results.json").write_text(json.dumps(res))
    return out


@pytest.fixture
def cells(tmp_path):
    """sst2: lora seeds 0-2, fim seeds 0-2 (Δ = +1, −0.5, +2), fim+da seed 1 only."""
    root = tmp_path / "cells"
    for seed, (base, fim) in enumerate([(0.80, 0.81), (0.85, 0.845), (0.82, 0.84)]):
        write_cell(root, "sst2", "lora", seed, base)
        write_cell(root, "sst2", "fim", seed, fim, params=1200)
    write_cell(root, "sst2", "fim+da", 1, 0.86)
    return root


def row_of(markdown: str, method: str) -> list[str]:
    line = next(x for x in markdown.splitlines() if x.startswith(f"| {method} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def page(root) -> str:
    c = report.read_root(root)
    return report.results_page(c, report.verdicts(c), {}, root)


# -----------------------------------------------------------------------------
# report


def test_folder_names_round_trip(tmp_path):
    methods = ("lora", "fim+da", "peft-lora", "fim+da-params", "fim-per-example-params")
    for method in methods:
        write_cell(tmp_path, "sst2", method, 12, 0.5)
    write_cell(tmp_path, "sst2", "notes", 1, 0.5).rename(tmp_path / "sst2" / "notes")
    assert {(c["method"], c["seed"]) for c in report.read_root(tmp_path)} == {
        (m, 12) for m in methods}
    assert report.score_method("efim") == "fim-params"
    assert report.score_method("kfac") == "fim-kfac-params"


def test_table_mean_std_per_seed_paired_difference_interval_and_wins(cells):
    md = page(cells)
    lora = row_of(md, "lora")  # mean(80, 85, 82) = 82.33, sample std = 2.52
    assert lora[1:8] == ["3 of 3", "82.33 ± 2.52", "80.00, 85.00, 82.00", *["–"] * 4]
    # paired Δ = (+1, −0.5, +2): mean 0.83, std 1.26; 95 % interval
    # 0.833 ± 4.302653 · 1.258 / √3 = [−2.29, +3.96]; wins 2 of 3 (seed 1 loses)
    fim = row_of(md, "fim")
    assert fim[4:8] == ["+0.83 ± 1.26", "[-2.29, +3.96]", "2 of 3", "level (interval holds 0)"]
    assert fim[8:] == ["–", "–", "1,200", "0.50"]  # no random allocation cells, no args.lr
    one = row_of(md, "fim+da")  # one seed: no interval, never a fake one
    assert one[1:8] == ["1 of 3", "86.00", "–, 86.00, –", "+1.00", "n/a", "1 of 1",
                        "undecided (1 paired seed, no interval)"]
    assert "| fw |" not in md  # a method with no cell in the table gets no row


@pytest.mark.parametrize("df, t", [(1, 12.706), (2, 4.303), (3, 3.182), (9, 2.262), (30, 2.042)])
def test_t_table_matches_published_values(df, t):
    """Oracle: Student t tables (two-sided 95 %, 3 decimals); the table falls toward 1.960."""
    assert report.T975[df - 1] == t
    assert all(a > b > 1.96 for a, b in zip(report.T975, report.T975[1:]))


def test_paired_stats_on_hand_made_values():
    # Δ = (+1, −0.5, +2) over seeds 0-2; seed 3 has no lora and does not count
    value = {("lora", 0): 80, ("lora", 1): 85, ("lora", 2): 82, ("m", 0): 81, ("m", 1): 84.5,
             ("m", 2): 84, ("m", 3): 99, ("one", 1): 86}
    st = report.delta_stats(value, "m", "lora")
    half = 4.303 * 1.258306 / 3 ** 0.5  # t(0.975, 2) · sample sd / √n
    assert st["n"] == 3 and st["wins"] == 2 and st["mean"] == pytest.approx(5 / 6)
    assert (st["low"], st["high"]) == pytest.approx((5 / 6 - half, 5 / 6 + half), abs=1e-5)
    one = report.delta_stats(value, "one", "lora")
    assert one["n"] == 1 and one["low"] is None and report.shown(one)[1] == "n/a"
    assert report.delta_stats(value, "x", "lora") is None and report.shown(None)[1] == "–"


def acc_cells(table: dict, device: str = "cpu") -> list[dict]:
    """Cells of sst2 on device from {method: [accuracy % per seed]} (None: no cell)."""
    return [{"task": "sst2", "device": device, "method": m, "seed": s,
             "metrics": {"accuracy": a / 100}} for m, accs in table.items()
            for s, a in enumerate(accs) if a is not None]


def test_verdict_needs_an_interval_off_zero_and_a_win_over_the_random_control():
    lora, rnd = [80, 85, 82], [82.1, 87.1, 83.9]  # random − lora = (+2.1, +2.1, +1.9)
    table = {"lora": lora, "fim-random-params": rnd,
             "up": [82, 87.2, 83.8],        # Δ (+2, +2.2, +1.8) > 0, but level with random
             "best": [83, 88.2, 84.8],      # Δ (+3, +3.2, +2.8), and +0.9 to +1.1 over random
             "down": [78, 82.8, 80.2],      # Δ (−2, −2.2, −1.8)
             "flat": [81, 84, 82],          # Δ (+1, −1, 0)
             "one": [90, None, None]}       # a single seed
    v = report.verdicts(acc_cells(table))["tables"]["sst2 on cpu"]["methods"]
    assert {m: v[m]["verdict"] for m in v} == {
        "fim-random-params": "level", "up": "level", "best": "better", "down": "worse",
        "flat": "level", "one": "undecided"}
    assert v["up"]["low"] > 0 and "does not beat the random control" in v["up"]["why"]
    no_control = report.verdicts(acc_cells({m: a for m, a in table.items()
                                            if m != "fim-random-params"}))
    assert no_control["methods"]["best"] == "undecided"
    assert "no random control" in no_control["tables"]["sst2 on cpu"]["methods"]["best"]["why"]
    # across tables: better on one, worse on another is mixed
    across = report.verdicts(acc_cells(table) + acc_cells(
        {"lora": lora, "best": [78, 82.8, 80.2]}, "cuda"))
    assert across["methods"]["best"] == "mixed"
    assert "no method is better than uniform LoRA" in across["line"]
    assert "mixed: best (sst2 on cpu, sst2 on cuda)" in across["line"]
    assert "worse: down (sst2 on cpu)" in across["line"]  # a verdict names its tables
    assert "sst2 on cuda (3 seeds)" in across["line"]


def test_scores_are_paired_with_the_random_control_in_the_table(cells):
    for seed, (rnd, kfac) in enumerate([(0.81, 0.83), (0.84, 0.86), (0.82, 0.85)]):
        write_cell(cells, "sst2", "fim-random-params", seed, rnd)
        write_cell(cells, "sst2", "fim-kfac-params", seed, kfac)
    md = page(cells)
    assert row_of(md, "fim-random-params")[4:9:4] == ["+0.00 ± 1.00", "–"]  # (+1, −1, 0)
    # kfac − lora = (+3, +1, +3), kfac − random = (+2, +2, +3)
    assert row_of(md, "fim-kfac-params")[4:9:4] == ["+2.33 ± 1.15", "+2.33 ± 0.58"]


def test_rank_svg_draws_train_layer_table_one_rect_per_matrix(cells):
    r = ranks(0)
    svg = ET.fromstring(report.rank_svg(r, "FIM <ranks> & co"))
    assert len(svg.findall("{http://www.w3.org/2000/svg}rect")) == len(r) == 10
    texts = {t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")}
    assert {float(t) for t in texts if t.replace(".", "").isdigit()} == set(map(float, r.values()))
    mean, n = report.mean_ranks(report.read_root(cells), "sst2")
    name = LAYER.format(0, MODULES[0])
    assert n == 3 and mean[name] == pytest.approx(sum(ranks(s)[name] for s in range(3)) / 3)


def test_report_writes_the_page_the_rank_map_and_only_the_readme_blocks(cells, tmp_path):
    """The README keeps every byte outside its two marker pairs; the results block holds the
    verdict line and the link, the run block what make run printed (rank map and comparison)."""
    out, readme = tmp_path / "results", tmp_path / "README.md"
    (out / "make_run").mkdir(parents=True)
    readme.write_text(BLOCKS)
    (out / "make_run" / "results.json").write_text(json.dumps({
        "args": {"r": 8}, "ranks": {"layer.0.query": 3, "layer.0.value": 13},
        "adapter_parameters": 1234, "compare": {"method": "fim", "run": 0.2, "uniform": 0.3,
                                                "oracle": 0.1, "gap_closed": 0.5}}))
    v = report.write_report(cells, out, readme)
    text = readme.read_text()
    results = " ".join(text[text.index(report.BLOCKS["results"][0]):].split())
    assert v["line"] in results and f"[{out.as_posix()}/README.md]" in results
    assert "ranks (total 16, budget 16 ranks; 1,234 adapter parameters):" in text
    assert "fim beat uniform LoRA and closed 50% of the uniform→oracle gap" in text
    for kept in ("# x\n\nhand text\n", "## After\ntail\n"):
        assert kept in text
    assert ET.parse(out / "ranks_sst2.svg").getroot() is not None
    assert "| fim | 3 of 3 | 83.17 ± 1.89 |" in (out / "README.md").read_text()  # 81, 84.5, 84
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="lacks the markers <!-- results:begin -->"):
        report.write_report(cells, out, readme)


def test_a_kill_while_the_report_is_written_leaves_the_old_files(cells, tmp_path, monkeypatch):
    """Every file is computed first, then each written atomically (lora.atomic_write): a kill
    while the first one is written leaves the README and the old page as they were."""
    readme, out = tmp_path / "README.md", tmp_path / "results"
    readme.write_text(BLOCKS)
    out.mkdir()
    old = "# Results\n\n_Generated by `python -m study.report` from 1 cell (old)"
    (out / "README.md").write_text(old)

    def dies(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "fsync", dies)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(cells, out, readme)
    assert readme.read_text() == BLOCKS and [p.name for p in out.iterdir()] == ["README.md"]
    assert (out / "README.md").read_text() == old


def test_a_report_that_fails_half_way_writes_nothing(cells, tmp_path):
    """results/planted_study.json not JSON: the error names it and nothing is written."""
    out, readme = tmp_path / "results", tmp_path / "README.md"
    readme.write_text(BLOCKS)
    out.mkdir()
    (out / "planted_study.json").write_text("{")
    with pytest.raises(ValueError, match="results/planted_study.json is not JSON"):
        report.write_report(cells, out, readme)
    assert [p.name for p in out.iterdir()] == ["planted_study.json"]
    assert readme.read_text() == BLOCKS


def test_the_project_report_reads_grid5_and_the_gpu_cells_not_the_retired_grid(
        cells, tmp_path, monkeypatch):
    """The project's results/grid5 and results/cells_cuda make one report, a table per task and
    device (the device its results.json names) over that table's own seeds; results/cells (the
    retired 3-seed grid) is named once and never read; a missing grid5 still reports."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text(BLOCKS)
    write_cell(report.RESULTS / "cells", "sst2", "lora", 0, 0.10)  # retired: never in a mean
    gpu = report.RESULTS / "cells_cuda"
    for seed, acc in enumerate([0.70, 0.72, 0.74]):
        write_cell(gpu, "sst2", "lora", seed, acc, device="cuda:0")
    write_cell(gpu, "sst2", "fim-kfac-params", 0, 0.75, device="cuda")
    only_gpu = report.main([])  # no results/grid5 yet: the GPU table alone
    assert list(only_gpu["tables"]) == ["sst2 on cuda"] and "sst2 on cuda (3 seeds)" in \
        (tmp_path / "README.md").read_text().replace("\n", " ")
    root = shutil.move(cells, report.CELLS)
    for seed in (3, 4):
        write_cell(root, "sst2", "lora", seed, 0.83)
    write_cell(root, "cola", "lora", 0, 0.5, metrics={"mcc": 0.5})
    got = report.read_root(root)
    assert {c["device"] for c in got} == {"cpu", "cuda"} and 10.0 not in [
        100 * c["metrics"].get("accuracy", 0) for c in got]
    report.main([])
    md = (report.RESULTS / "README.md").read_text()
    assert "`results/cells/` (the first SST-2 grid" in " ".join(md.split())
    assert [x for x in md.splitlines() if x.startswith("## ")] == [
        "## cola on cpu (`results/grid5/cola/`)", "## sst2 on cpu (`results/grid5/sst2/`)",
        "## sst2 on cuda (`results/cells_cuda/sst2/`)"]
    cpu, cuda = md.split("## sst2 on cuda")
    cpu = cpu[cpu.index("## sst2 on cpu"):]  # the table, not the verdict line above it
    assert row_of(cpu, "lora")[1:4] == ["5 of 5", "82.60 ± 1.82", "80.00, 85.00, 82.00, 83.00, "
                                                                  "83.00"]
    assert row_of(cpu, "fim")[1] == "3 of 5" and "fim-kfac-params" not in cpu
    assert row_of(cuda, "lora")[1:3] == ["3 of 3", "72.00 ± 2.00"]
    assert row_of(cuda, "fim-kfac-params")[1:5] == ["1 of 3", "75.00", "75.00, –, –",
                                                    "+5.00"]  # paired with the GPU lora only
    assert "| lora | 1 of 1 | 50.00 |" in md.split("## cola on cpu")[1]
    assert "Length-grouped batches: no." in cuda  # what its cells' args say


def test_a_report_elsewhere_reads_and_writes_exactly_its_root(cells, tmp_path, monkeypatch):
    """--root X/cells reads X/cells alone (a sibling X/cells_backup or X/cells_cuda never enters
    its means) and writes only inside it: results/ and README.md stay byte for byte."""
    for sibling in ("cells_backup", "cells_cuda"):
        write_cell(cells.parent / sibling, "sst2", "lora", 0, 0.99)
    project = tmp_path / "project"
    (project / "results" / "grid5").mkdir(parents=True)
    (project / "README.md").write_text(BLOCKS)
    monkeypatch.chdir(project)
    before = {p: p.read_bytes() if p.is_file() else None for p in project.rglob("*")}
    report.main(["--root", str(cells)])
    assert {p: p.read_bytes() if p.is_file() else None for p in project.rglob("*")} == before
    md = (cells / "README.md").read_text()
    assert row_of(md, "lora")[2:4] == ["82.33 ± 2.52", "80.00, 85.00, 82.00"]
    assert f"`{cells.as_posix()}/sst2/`" in md.replace("\n", " ")
    assert (cells / "ranks_sst2.svg").is_file()
    assert "Recipe: `train.py --model minilm --group-by-length`" in md.replace("\n", " ")
    tiny = tmp_path / "tiny" / "cells"  # cells trained with '-- --model tiny': the page says so
    write_cell(tiny, "sst2", "lora", 0, 0.7, args={"model": "tiny", "group_by_length": True})
    report.main(["--root", str(tiny)])
    assert "Recipe: `train.py --model tiny --group-by-length`" in \
        (tiny / "README.md").read_text().replace("\n", " ")
    with pytest.raises(ValueError, match="no such folder, no cells to report"):
        report.main(["--root", str(tmp_path / "none")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for name, what in (("empty", "holds no cells"), ("file", "is not a folder")):
        with pytest.raises(ValueError, match=f"{what}, no cells to report"):
            report.main(["--root", str(tmp_path / name)])
    assert not (tmp_path / "empty" / "README.md").exists()


def _set(field, value):
    """A setup that puts `value` at `field` (a dotted path) of a good cell's results.json."""
    def setup(out):
        res = json.loads((out / "results.json").read_text())
        *parents, last = field.split(".")
        node = res
        for key in parents:
            node = node[key]
        node[last] = value
        (out / "results.json").write_text(json.dumps(res))
    return setup


def _as(make):
    return lambda out: (out / "results.json").unlink() or make(out / "results.json")


# damaged or hostile cells: (case, setup(cell folder), what the message names)
HOSTILE_CELLS = [
    *[(f"accuracy {v!r}", _set("metrics.accuracy", v), f"metrics.accuracy = {shown}")
      for v, shown in ((1e308, "1e+308, not a number"), (None, "null"), (float("nan"), "NaN"),
                       (True, "true"), ("0.9", '"0.9"'))],
    ("empty metrics", _set("metrics", {}), "its metrics have no 'accuracy', the sst2"),
    *[(f"{f} {v!r}", _set(f, v), f) for f, v in (
        ("seconds.per_step", "fast"), ("trainable_parameters", "1,000"), ("ranks", {"m": "8"}))],
    *[(f"{f} {v!r}", _set(f, v), f"{f} is a {type(v).__name__}, not an object")
      for f, v in (("seconds", [1]), ("args", [1]), ("machine", "x"), ("ranks", [1]))],
    ("device a number", _set("device", 3), "device 3"),
    ("device a path", _set("device", "../x"), "device '../x'"),
    ("results.json a folder", _as(lambda p: p.mkdir()), "is not a regular file"),
    ("results.json a link to /dev/zero", _as(lambda p: p.symlink_to("/dev/zero")),
     "is not a regular file"),
    ("results.json a FIFO", _as(os.mkfifo), "is not a regular file"),
    ("results.json deeply nested", _as(lambda p: p.write_text("[" * 100000)),
     "is damaged (not JSON"),
    ("results.json over the byte bound", _as(lambda p: p.write_text(
        " " * (report.READ_LIMIT + 1))), "bytes, over the 16,777,216"),
    ("results.json not text", _as(lambda p: p.write_bytes(b"\xff")), "is damaged (not JSON"),
    ("run.json a list", lambda out: (out / "run.json").write_text("[]"),
     "run.json is damaged (not a results object"),
    ("run.json machine a list", lambda out: (out / "run.json").write_text('{"machine": []}'),
     "run.json is damaged (machine is a list, not an object"),
]


@pytest.mark.parametrize("label,setup,field", HOSTILE_CELLS, ids=[h[0] for h in HOSTILE_CELLS])
def test_a_damaged_cell_is_named_with_its_field_and_nothing_is_written(cells, tmp_path, label,
                                                                       setup, field):
    """A value its field cannot take, or a results.json that is not a regular file: ValueError
    naming the cell file and the field (printed as `error:`), no unbounded read, no file
    written."""
    setup(cells / "sst2" / "fim-s1")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=r"fim-s1/(results|run)\.json") as e:
        report.write_report(cells)
    assert field in str(e.value) and "remove" in str(e.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# -----------------------------------------------------------------------------
# grid


class FakeRunner:
    """Records commands; 'trains' by writing results.json unless told to fail."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, cmd, log):
        self.calls.append(cmd)
        out = report.Path(cmd[cmd.index("--resume" if "--resume" in cmd else "--out") + 1])
        if out.name in self.fail:
            return 1
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text('{"metrics": {"accuracy": 0.5}}')
        return 0


def test_grid_skips_finished_resumes_checkpoints_and_runs_the_rest(tmp_path, monkeypatch):
    root = tmp_path / "cells"
    write_cell(root, "sst2", "lora", 0, 0.8)
    for stopped in ("fim-s0", "peft-lora-s1"):  # a stopped cell of ours and a stopped peer
        (root / "sst2" / stopped).mkdir(parents=True)
        (root / "sst2" / stopped / runfolder.CHECKPOINT).write_bytes(b"")
    monkeypatch.setattr(grid, "missing", lambda m: "peft not installed" if m == "peft-eva"
                        else None)
    cells = [("sst2", m, 0) for m in ("lora", "fim", "fim+da", "peft-lora", "peft-eva",
                                       "fim-kfac-params")] + [("sst2", "peft-lora", 1)]
    fake = FakeRunner(fail={"fim_da-s0"})
    outcome = grid.run_grid(cells, {"sst2": tmp_path}, root, 1, run=fake)
    assert {k: [c[1] for c in v] for k, v in outcome.items()} == {
        "done": ["lora"], "resumed": ["fim", "peft-lora"], "ran": ["peft-lora", "fim-kfac-params"],
        "failed": ["fim+da"], "missing": ["peft-eva"], "busy": []}
    resume, fresh, peer, score, peer_resume = fake.calls
    assert resume[1:] == ["train.py", "--resume", str(root / "sst2" / "fim-s0"), "--threads", "1"]
    assert fresh[1:4] == ["train.py", "--method", "fim+da"] and "--seed" in fresh
    assert peer[1:8] == ["-m", "study.peers", "peft-lora", "--", "--method", "lora", "--model"]
    assert score[1:7] == ["-m", "study.peers", "fim-kfac-params", "--", "--method", "lora"]
    assert peer_resume[1:] == ["-m", "study.peers", "peft-lora", "--", "--resume",
                               str(root / "sst2" / "peft-lora-s1"), "--threads", "1"]
    assert (root / "sst2" / "fim-s0" / "run.json").exists()
    assert not (root / "sst2" / "fim_da-s0" / "run.json").exists()
    again = FakeRunner()  # a second pass runs only the failed cell
    grid.run_grid(cells, {"sst2": tmp_path}, root, 1, run=again)
    assert [c[c.index("--method") + 1] for c in again.calls] == ["fim+da"]


def test_method_flags_for_every_train_py_grid_method():
    assert grid.method_flags("lora") == ["--method", "lora"]
    assert grid.method_flags("fim+da-params") == ["--method", "fim+da", "--budget", "params"]
    assert grid.method_flags("fim-variance-params") == ["--method", "fim", "--score", "variance",
                                                       "--budget", "params"]
    assert grid.method_flags("fim-per-example-params") == ["--method", "fim", "--per-example",
                                                           "--budget", "params"]
    assert [s for s in report.SCORES if grid.by_peers(report.score_method(s))] == [
        "gradw", "kfac", "lorada", "random", "shuffled"]


def test_a_cell_whose_folder_another_run_holds_is_busy_not_failed(tmp_path, capsys):
    """A second trainer on a cell is refused by train.py's lock on its --out (runfolder.lock):
    the grid reports that cell busy (left alone, its log untouched), not failed; an owner that
    takes the lock between the grid's check and the trainer's start is busy too; an old refusal
    in the log does not make a later plain failure look busy."""
    root = tmp_path / "cells"
    log = root / "sst2" / "lora-s0" / "train.log"
    log.parent.mkdir(parents=True)
    log.write_text("an earlier run: error: --out x is in use by pid 7 (host h)\n")
    cell = [("sst2", "lora", 0)]
    extra = ["--model", "tiny", "--max-train", "8", "--steps", "1"]
    with runfolder.lock(log.parent):  # held by this process: the cell's train.py is refused
        outcome = grid.run_grid(cell, {"sst2": SST2}, root, 1, extra=extra)
    assert [c[2] for c in outcome["busy"]] == [0] and outcome["failed"] == []
    assert log.read_text() == "an earlier run: error: --out x is in use by pid 7 (host h)\n"

    def owner_starts_now(cmd, log):  # the race: an owner locks after the grid's check
        with runfolder.lock(log.parent):
            return grid.run_cell(cmd, log)

    outcome = grid.run_grid(cell, {"sst2": SST2}, root, 1, run=owner_starts_now, extra=extra)
    assert [c[2] for c in outcome["busy"]] == [0] and outcome["failed"] == []
    assert "is in use by pid" in log.read_text().splitlines()[-1]
    outcome = grid.run_grid(cell, {"sst2": tmp_path}, root, 1, run=lambda c, l: 1)
    assert outcome["failed"] == cell and outcome["busy"] == []


def _damaged(out):
    out.mkdir(parents=True)
    (out / "results.json").write_text("{")
    return []


def _other_recipe(t):
    out = write_cell(t / "cells", "sst2", "lora", 0, 0.8)
    res = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps(res | {"args": {"grad_accum": 4}}))
    return ["--methods", "lora", "--seeds", "0"]


# the grid's bad input: (what the user did, setup(tmp) -> arguments, message text)
GRID_ERRORS = [
    ("--data-root that does not exist", lambda t: ["--data-root", str(t / "none")],
     "no such folder; pass the folder that holds the GLUE task folders"),
    ("--tasks not under --data-root", lambda t: ["--wet", "--tasks", "sst2", "rte"],
     "holds no SST-2/train.tsv, RTE/train.tsv: pass the folder of the GLUE download"),
    ("--root is a file", lambda t: (t / "f").write_text("x") and ["--root", str(t / "f")],
     "is a file: pass the cells' folder"),
    ("a grid-owned train.py flag", lambda t: ["--", "--seed", "3"],
     "--seed is set by the grid for each cell; use --tasks"),
    ("an unknown train.py flag", lambda t: ["--", "--bogus"], re.compile("after '--': .*--bogus")),
    ("a finished cell of another recipe (--grad-accum)", _other_recipe,
     "another recipe (--grad-accum 4 there, 1 here): give this recipe its own --root"),
    ("a damaged results.json", lambda t: _damaged(t / "cells" / "sst2" / "lora-s0"),
     "results.json is damaged (not JSON): remove"),
    ("peers on a decoder", lambda t: ["--peers", "peft-lora", "--", "--model", "smollm2"],
     "the peers (transformers + PEFT) train a BERT encoder on a GLUE task"),
    ("peft-adalora with --grad-accum", lambda t: ["--methods", "--peers", "peft-adalora", "--",
                                                  "--grad-accum", "2"],
     "--grad-accum 2: peft-adalora trains one batch per step"),
    ("nothing to run", lambda t: ["--methods"], "nothing to run"),
    ("the user's README.md in --root", lambda t: _own_file(t / "mine" / "README.md"),
     "README.md exists and this tool did not write it: move it"),
    ("the user's rank map in --root", lambda t: _own_file(t / "mine" / "ranks_cola.svg"),
     "ranks_cola.svg exists and this tool did not write it"),
]


def _own_file(path):
    path.parent.mkdir()
    path.write_text("<svg>my own notes</svg>\n")
    return ["--wet", "--root", str(path.parent), "--tasks", "cola", "--data-root", str(SST2.parent)]


@pytest.mark.parametrize("label,setup,match", GRID_ERRORS, ids=[g[0] for g in GRID_ERRORS])
def test_bad_grid_input_is_refused_before_any_work_or_write(tmp_path, monkeypatch, label, setup,
                                                            match):
    monkeypatch.chdir(tmp_path)  # the report would go to ./results and ./README.md
    monkeypatch.setattr(grid, "run_grid", lambda *a, **k: pytest.fail("ran the grid"))
    monkeypatch.setattr(grid, "GLUE", tmp_path)  # holds no GLUE task folder
    argv = setup(tmp_path)
    rest = argv[argv.index("--"):] if "--" in argv else []
    argv = argv[:len(argv) - len(rest)]
    argv += [] if "--root" in argv else ["--root", str(tmp_path / "cells")]
    argv = [a for a in argv if a != "--wet"] if "--wet" in argv else [*argv, "--dry-run"]
    before = sorted((p, p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    pattern = match if isinstance(match, re.Pattern) else re.escape(match)
    with pytest.raises(ValueError, match=pattern):
        grid.main([*argv, *rest])
    assert sorted((p, p.read_bytes() if p.is_file() else None)
                  for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("argv", [["--seeds", "0", "-1"], ["--seeds", str(2**32)],
                                  ["--threads", "-1"]])
def test_out_of_range_numbers_are_refused_by_argparse(argv, capsys):
    with pytest.raises(SystemExit):
        grid.main(argv)
    assert f"{argv[-1]}: use " in capsys.readouterr().err


def test_a_dry_run_plans_seeds_once_and_scores_at_the_parameter_budget(tmp_path, monkeypatch,
                                                                       capsys):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\na\t1\n")
    monkeypatch.chdir(tmp_path)
    grid.main(["--dry-run", "--tasks", "sst2", "--data-root", str(tmp_path), "--methods", "lora",
               "--seeds", "1", "1", "0", "--scores", "efim", "kfac", "--root",
               str(tmp_path / "cells")])
    assert "1 task(s) (sst2) x 3 methods x 2 seeds = 6 cells" in capsys.readouterr().out
    assert (tmp_path / "cells" / "README.md").is_file() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("how,code", [("ctrl-c", 130), ("kill", 143)])
def test_a_stopped_grid_leaves_a_checkpoint_and_the_same_command_resumes(tmp_path, how, code):
    """A terminal Ctrl-C (SIGINT to the whole process group) or `kill <grid pid>` (SIGTERM to the
    grid alone) while a cell trains: the grid exits 130 / 143 with one line and no traceback, its
    cell is not left training, it keeps a checkpoint, and the same command again resumes it."""
    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"SST-2 not found at {SST2}")
    cmd = [sys.executable, "-m", "study.grid", "--root", str(tmp_path / "cells"), "--methods",
           "lora", "--seeds", "0", "--data-root", str(SST2.parent), "--tasks", "sst2", "--",
           "--model", "tiny", "--max-train", "128", "--max-eval", "16", "--steps", "40",
           "--batch-size", "32", "--log-every", "1", "--save-every", "1000"]
    cell = tmp_path / "cells" / "sst2" / "lora-s0"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and "step      2/" not in (
            (cell / "train.log").read_text() if (cell / "train.log").exists() else ""):
        time.sleep(0.2)
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code and "run the same command again" in err, err
    assert "Traceback" not in err and not (cell / "results.json").exists()
    assert (cell / "checkpoint.pt").is_file()
    left = subprocess.run(["pgrep", "-f", str(cell)], capture_output=True, text=True).stdout
    assert not left, f"the cell still trains after its grid stopped: pid {left}"
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "resumed 1" in done.stdout, done.stdout + done.stderr
    assert (cell / "results.json").is_file()


# -----------------------------------------------------------------------------
# peers (without transformers: the checks before any work; test_peers.py runs them on PEFT)


@pytest.mark.parametrize("peer,model", [("peft-lora", "tiny"), ("peft-eva", "tiny-llama"),
                                        ("peft-adalora", "smollm2")])
def test_a_peer_refuses_a_model_it_cannot_build_before_any_work(tmp_path, peer, model):
    with pytest.raises(ValueError, match=f"--model {model} --task .*: the peers"):
        peers.cell(peer, ["--model", model, "--task", "sst2", "--data-dir", str(tmp_path),
                          "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="peft-adalora cells do not checkpoint"):
        peers.cell("peft-adalora", ["--resume", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_a_cell_writes_its_fields_once_under_the_folder_lock(tmp_path, monkeypatch):
    """peers.cell's fields (the adapt step's name, its ranks and time) reach results.json
    through train.run's own save, while --out's lock is held. A tiny planted run with a score
    allocation stands in for a GLUE cell."""
    import fcntl

    out, writes = tmp_path / "cell", []

    def spy(real):
        def write(path, obj):
            fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                writes.append("unlocked")
            except BlockingIOError:
                writes.append("locked")
            finally:
                os.close(fd)
            return real(path, obj)
        return write
    for module in (runfolder, train):  # train.py may call either name
        if hasattr(module, "write_json"):
            monkeypatch.setattr(module, "write_json", spy(module.write_json))
    res = peers.cell("fim-random-params", ["--steps", "2", "--threads", "1", "--log-every", "1",
                                           "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert res["score"] == saved["score"] == "fim-random-params" and writes[-1] == "locked"
    assert saved["ranks"] == res["ranks"] and sum(saved["ranks"].values()) > 0


# -----------------------------------------------------------------------------
# the planted study


def test_structure_ranks_keep_the_budget_and_the_bounds():
    names = [f"m{i}" for i in range(12)]
    holders = names[2:8] + names[10:]
    got = planted.structure_ranks(names, holders, budget=96, r_min=1, r_max=24)
    assert planted.structure_ranks(["q", "v", "o"], ["v", "o"], budget=9) == {"q": 1, "v": 4,
                                                                             "o": 4}
    assert sum(got.values()) == 96 and list(got) == names
    assert all(got[n] == 1 for n in names if n not in holders)
    assert {got[n] for n in holders} == {11, 12} and max(got.values()) <= 24
    with pytest.raises(ValueError, match="budget=300 cannot give 8 holders"):
        planted.structure_ranks(names, holders, budget=300, r_min=1, r_max=24)
    with pytest.raises(ValueError, match="cannot give 0 holders"):
        planted.structure_ranks(names, ["x"], budget=96)


def test_shuffled_ranks_permute_the_scores_own_multiset_within_equal_cost_and_cap():
    r = {f"m{i}": v for i, v in enumerate([24, 24, 2, 1, 1, 3, 7, 30, 1, 2, 1])}
    out = scores.shuffled(r, None, 32, torch.Generator().manual_seed(5))
    assert list(out) == list(r) and sorted(out.values()) == sorted(r.values()) and out != r
    assert out == scores.shuffled(r, None, 32, torch.Generator().manual_seed(5))
    costs = {n: 3 if i < 5 else 7 for i, n in enumerate(r)}  # two groups: each keeps its ranks
    caps = {n: 30 if i < 8 else 2 for i, n in enumerate(r)}  # and a third, by cap
    for seed in range(20):
        out = scores.shuffled(r, costs, caps, torch.Generator().manual_seed(seed))
        for group in (list(r)[:5], list(r)[5:8], list(r)[8:]):
            assert sorted(out[n] for n in group) == sorted(r[n] for n in group)


def test_the_shuffle_stream_is_apart_from_every_training_stream():
    """The shuffle's seed is none of the study's stream seeds (the CPU generator keeps 32 bits),
    so its draws differ from seed s + 1's data stream (and every other)."""
    seeds = {g.initial_seed() for s in range(60) for g in train.random_streams(s).values()}
    for s in range(50):
        for i in range(7):
            g = planted.shuffle_generator(s, i)
            assert g.initial_seed() % 2**32 not in seeds
            assert not torch.equal(torch.randperm(12, generator=g), torch.randperm(
                12, generator=train.random_streams(s + 1)["data"]))
    with pytest.raises(ValueError, match="index=1000"):
        planted.shuffle_generator(0, 1000)


def test_search_oracle_starts_at_oracle_ranks_and_keeps_the_best():
    """A loss with its optimum at planted ranks (20, 24) inside the cap: the search tries
    oracle_ranks first, finds the optimum by the coordinate pass, never trains a candidate
    twice or outside the cap, and stays within its stated size."""
    from data.planted import oracle_ranks
    names, truth = ["a", "b", "c", "d", "e"], {"b": 24, "d": 24}

    def loss_of(r):
        return (r["b"] - 20) ** 2 + (r["d"] - 24) ** 2 + 0.1 * r["a"]
    best, tried = planted.search_oracle(names, truth, 60, 24, loss_of, grid=(24, 20, 16), step=4)
    assert tried[0]["planted_ranks"] == truth
    assert tried[0]["final_loss"] == loss_of(oracle_ranks(names, truth, 60))
    assert best == oracle_ranks(names, {"b": 20, "d": 24}, 60) and sum(best.values()) == 60
    assert min(t["final_loss"] for t in tried) == loss_of(best) <= tried[0]["final_loss"]
    fixed = [tuple(t["planted_ranks"].values()) for t in tried]
    assert len(fixed) == len(set(fixed)) <= 3 + 2 * len(truth)
    assert all(1 <= r <= 24 for f in fixed for r in f)


def test_one_study_seed_runs_every_allocation_and_its_controls(tmp_path, monkeypatch):
    """A real uniform run (2 steps), then study_seed with every other run faked (its loss from
    the ranks): uniform, the searched oracle (the best candidate), every score, efim at the
    parameter budget, the structure prior and each score's shuffled control, all at the rank
    budget; each score's shuffle is its own multiset in another placement."""
    uniform = planted.train_one(0, 2, 1, "reach", None)
    names, truth = list(uniform["ranks"]), uniform["planted"]
    assert sum(uniform["ranks"].values()) == 8 * len(names) and set(truth) <= set(names)

    def fake(seed, steps, threads, plants, allocation):
        if allocation is None:
            return dict(uniform)
        r = allocation if isinstance(allocation, dict) else {n: 8 for n in names}
        loss = sum(abs(r[n] - truth.get(n, 1)) for n in names) / 100
        return uniform | {"ranks": dict(r), "final_loss": loss, "loss_ratio": loss}
    monkeypatch.setattr(planted, "train_one", fake)
    got = planted.study_seed(0, 2, 1, "reach")
    runs = got["runs"]
    assert list(runs) == ["uniform", "oracle", *planted.STUDIED, "efim params", "structure",
                          *(f"shuffled {s}" for s in planted.STUDIED)]
    assert runs["oracle"]["final_loss"] == min(t["final_loss"] for t in got["oracle_search"])
    assert all(sum(r["ranks"].values()) == 8 * len(names) for r in runs.values())
    assert not {n.rsplit(".", 1)[1] for n in got["structure_holders"]} & {"query", "key"}
    assert runs["structure"]["ranks"] == planted.structure_ranks(
        names, got["structure_holders"], 8 * len(names), 1, 24)


def test_plants_anywhere_reach_query_and_key():
    """train.py --plants anywhere reaches query/key in the tiny planted task; the default never
    does, over the same seeds."""
    hit = {"reach": set(), "anywhere": set()}
    for seed in range(4):
        for plants in hit:
            res = train.parse_args(["--seed", str(seed), "--plants", plants, "--out", "unused"])
            task = train.build_task(res, torch.device("cpu"), train.random_streams(seed))
            hit[plants] |= {n.rsplit(".", 1)[1] for n in task.planted}
    assert hit["anywhere"] & {"query", "key"} and not hit["reach"] & {"query", "key"}


def made_up_study(score_losses: list[float]) -> dict:
    """A study of one seed per loss of gradw, the other runs' losses fixed."""
    run = {"loss_ratio": 0.5, "share_planted": 0.5, "calibration_seconds": 0.0, "ranks": {}}
    per = []
    for seed, score_loss in enumerate(score_losses):
        losses = {"uniform": 1.0, "oracle": 0.4, "structure": 0.8, "gradw": score_loss,
                  "shuffled gradw": 0.9}
        per.append({"seed": seed, "oracle_search": [
            {"planted_ranks": {"a": 24}, "final_loss": 0.5},
            {"planted_ranks": {"a": 20}, "final_loss": 0.4}], "runs": {
                n: run | {"final_loss": v, "vs_uniform": v, "vs_oracle": v / 0.4,
                          "gap_closed": (1 - v) / 0.6} for n, v in losses.items()}})
    return {"args": {"seeds": len(per), "steps": 9, "threads": 1, "plants": "reach"},
            "criterion": planted.CRITERION, "scores_run": ["gradw"], "per_seed": per}


def test_the_study_judges_each_score_by_both_controls():
    """(control − score) / uniform over 3 seeds: structure − gradw = (0.3, 0.25, 0.2), an
    interval 0.25 ± 4.303 · 0.05 / √3 above 0; the tables print as the report renders them."""
    out = planted.summary(made_up_study([0.5, 0.55, 0.6]))
    assert out["criterion_held"] and out["finds"]["gradw"]["finds_plants"]
    st = out["finds"]["gradw"]["structure"]
    assert st["mean"] == pytest.approx(0.25) and st["low"] == pytest.approx(
        0.25 - 4.303 * 0.05 / 3**0.5, abs=1e-9)
    md = "\n".join(report.planted_lines(out))
    assert "| gradw | +0.250 [" in md and "find the plants by the criterion: gradw." in md
    assert "best planted ranks per seed: 20; 20; 20" in md
    wide = planted.summary(made_up_study([0.7, 0.6, 0.5]))  # 3 wins, a wide spread
    assert wide["finds"]["gradw"]["structure"]["wins"] == 3
    assert not wide["finds"]["gradw"]["finds_plants"]


def test_the_planted_study_refuses_a_users_file_at_out_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(planted, "study_seed", lambda *a: pytest.fail("trained"))
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    with pytest.raises(ValueError, match="notes.json exists and this tool did not write it"):
        planted.main(["--out", str(tmp_path / "notes.json")])
    assert (tmp_path / "notes.json").read_text() == '{"mine": 1}'
    planted.check_ours(ROOT / "results" / "planted_study.json", (b'{\n  "what": "',))  # its own
    for out in (tmp_path / "notes.json" / "sub.json", tmp_path):  # under a file; a folder
        with pytest.raises(ValueError, match="cannot be written"):  # not after hours of study
            planted.main(["--out", str(out)])


def test_ctrl_c_in_the_planted_study_says_nothing_was_written(tmp_path):
    """The study writes its JSON only at the end: an interrupted one leaves nothing behind and
    its Ctrl-C line promises no resume."""
    out = tmp_path / "study.json"
    proc = subprocess.Popen([sys.executable, "-m", "study.planted", "--steps", "100000",
                             "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert "criterion, stated before running" in proc.stdout.readline()
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "nothing was written" in err, err
    assert "Traceback" not in err and not out.exists()


def test_the_report_never_overwrites_a_users_file_in_its_root(tmp_path):
    """A report into a user's folder: its own README.md (or a rank map of ours, rewritten) is
    fine, the user's README.md is named and left as it was, and nothing else is written."""
    write_cell(tmp_path / "cells", "sst2", "lora", 0, 0.8)
    report.main(["--root", str(tmp_path / "cells")])
    report.main(["--root", str(tmp_path / "cells")])  # its own page: regenerated
    page = tmp_path / "cells" / "README.md"
    page.write_text("# my notes on these cells\n")
    with pytest.raises(ValueError, match="README.md exists and this tool did not write it"):
        report.main(["--root", str(tmp_path / "cells")])
    assert page.read_text() == "# my notes on these cells\n"
