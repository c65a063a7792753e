"""bench.py's evidence machinery on synthetic cells: the summary and README section (mean ± std,
paired differences, wins, missing cells), the rank-map SVG, the README markers, and the grid
runner's skip / resume / blank logic with a fake runner (no training).

Run: .venv/bin/python -m pytest tests/test_bench.py -q
"""

import json
import re
import signal
import os
import shutil
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn as nn

import bench

LAYER = "bert.encoder.layer.{}.{}"
MODULES = ("attention.self.query", "attention.self.value", "output.dense")


def ranks(seed: int) -> dict[str, int]:
    r = {LAYER.format(i, m): 1 + (i + j + seed) % 16 for i in range(3)
         for j, m in enumerate(MODULES)}
    return r | {"bert.pooler.dense": 16}


def write_cell(root, task, method, seed, acc, params=1000, per_step=0.5, with_ranks=True):
    out = root / task / bench.Cell(task, method, seed).folder
    out.mkdir(parents=True)
    res = {"args": {"threads": 1}, "seed": seed, "metrics": {"accuracy": acc},
           "trainable_parameters": params, "seconds": {"calibration": 2.0, "per_step": per_step},
           "ranks": ranks(seed) if with_ranks else {}}
    (out / "results.json").write_text(json.dumps(res))
    return out


@pytest.fixture
def grid(tmp_path):
    """sst2: lora seeds 0-2, fim seeds 0-2 (Δ = +1, −0.5, +2), fim+da seed 1 only."""
    root = tmp_path / "cells"
    for seed, (base, fim) in enumerate([(0.80, 0.81), (0.85, 0.845), (0.82, 0.84)]):
        write_cell(root, "sst2", "lora", seed, base)
        write_cell(root, "sst2", "fim", seed, fim, params=1200)
    write_cell(root, "sst2", "fim+da", 1, 0.86)
    recipe = bench.default_recipe(methods=("lora", "fim", "fim+da", "fw"), peers=["peft-eva"],
                                  notes={"peft-eva": "peft not installed"})
    return root, recipe


def row_of(markdown: str, method: str) -> list[str]:
    line = next(x for x in markdown.splitlines() if x.startswith(f"| {method} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_parse_folder_inverts_cell_folder():
    for method in ("lora", "fim+da", "peft-lora", "fim+da-params"):
        assert bench.parse_folder(bench.Cell("sst2", method, 12).folder) == (method, 12)
    assert bench.parse_folder("notes") is None


def test_summary_reads_every_cell_with_its_fields(grid):
    root, recipe = grid
    s = bench.summarize(root, recipe)
    assert len(s["cells"]) == 7 and s["recipe"] == recipe and s["generated"]
    c = next(c for c in s["cells"] if (c["method"], c["seed"]) == ("fim+da", 1))
    assert c["task"] == "sst2" and c["metrics"] == {"accuracy": 0.86}
    assert c["seconds_per_step"] == 0.5 and c["setup_seconds"] == 2.0
    assert c["ranks"] == ranks(1) and c["machine"]["threads"] == 1


def test_table_mean_std_per_seed_paired_difference_and_wins(grid):
    root, recipe = grid
    md = bench.results_markdown(bench.summarize(root, recipe), None, {})
    lora = row_of(md, "lora")
    # mean(80, 85, 82) = 82.33, sample std = 2.52
    assert lora[1] == "82.33 ± 2.52" and lora[2] == "80.00, 85.00, 82.00"
    assert lora[3:6] == ["–", "–", "–"]
    fim = row_of(md, "fim")
    # paired Δ = (+1, −0.5, +2): mean 0.83, std 1.26; 95 % interval
    # 0.833 ± 4.302653 · 1.258 / √3 = [−2.29, +3.96]; wins 2 of 3 (seed 1 loses)
    assert fim[3:6] == ["+0.83 ± 1.26", "[-2.29, +3.96]", "2 of 3"]
    assert fim[6] == "1,200" and fim[7] == "0.50"


def test_missing_cells_show_a_dash_and_the_seed_count(grid):
    root, recipe = grid
    md = bench.results_markdown(bench.summarize(root, recipe), None, {})
    partial = row_of(md, "fim+da")
    assert partial[1] == "86.00 (1 of 3 seeds)" and partial[2] == "–, 86.00, –"
    assert partial[3:6] == ["+1.00", "n/a", "1 of 1"]  # one seed: no interval, never a fake one
    empty = row_of(md, "fw")
    assert empty[1] == "– (0 of 3 seeds)" and empty[2:6] == ["–, –, –", "–", "–", "–"]
    assert "peft not installed" in row_of(md, "peft-eva")[1]


def test_rank_svg_is_xml_with_one_rect_per_matrix():
    r = ranks(0)
    root = ET.fromstring(bench.rank_svg(r, "FIM <ranks> & co"))
    rects = root.findall("{http://www.w3.org/2000/svg}rect")
    assert len(rects) == len(r) == 10
    fills = {float(t.text) for t in root.iter("{http://www.w3.org/2000/svg}text")
             if t.text.replace(".", "").isdigit()}
    assert fills == {float(v) for v in r.values()}


def test_mean_ranks_average_over_seeds(grid):
    root, _ = grid
    mean, n = bench.mean_ranks(bench.read_cells(root), "sst2")
    assert n == 3
    name = LAYER.format(0, MODULES[0])
    assert mean[name] == pytest.approx(sum(ranks(s)[name] for s in range(3)) / 3)


def test_readme_markers_replaced_and_nothing_else_changed(tmp_path):
    start, end = bench.MARKERS
    text = f"# title\n\nintro\n\n## Results\n\nhand text\n\n{start}\nold\n{end}\n\n## After\ntail\n"
    new = bench.replace_section(text, "fresh\ntable\n")
    assert new == text.replace(f"{start}\nold\n{end}", f"{start}\nfresh\ntable\n{end}")
    assert bench.replace_section(new, "fresh\ntable\n") == new  # idempotent


def test_readme_markers_added_once_at_the_end():
    start, end = bench.MARKERS
    text = "# title\n\n## Usage\n\nrun it\n"
    new = bench.replace_section(text, "s")
    assert new == f"{text}\n## Results\n\n{start}\ns\n{end}\n"
    assert bench.replace_section(new, "t").count("## Results") == 1
    last = "# title\n\n## Results\n\nhand text\n"
    assert bench.replace_section(last, "s") == f"{last}\n{start}\ns\n{end}\n"


def test_write_report_writes_summary_svg_and_readme(grid, tmp_path):
    root, recipe = grid
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n")
    bench.write_report(root, recipe, tmp_path / "results", readme)
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert len(summary["cells"]) == 7
    assert ET.parse(tmp_path / "results" / "ranks_sst2.svg").getroot() is not None
    text = readme.read_text()
    assert text.startswith("# x\n\n## Results\n") and "ranks_sst2.svg" in text
    assert "| fim | 83.17 ± 1.89 |" in text  # (81, 84.5, 84)


@pytest.mark.parametrize("kill_at", [1, 2, 3])  # summary.json, the rank map, the README
def test_a_kill_while_the_report_is_written_leaves_every_old_file(grid, tmp_path, monkeypatch,
                                                                  kill_at):
    """Every report file is written whole to a temp file first and all are renamed after: a
    write that dies at any file leaves the README and summary.json as they were (never one new
    and the other old), and no temp file behind."""
    root, recipe = grid
    readme, results = tmp_path / "README.md", tmp_path / "results"
    readme.write_text("# x\n\n## Results\nold\n")
    results.mkdir()
    (results / "summary.json").write_text("{}")
    calls, real = [], os.fsync

    def dies(fd):
        calls.append(fd)
        if len(calls) == kill_at:
            raise KeyboardInterrupt
        return real(fd)
    monkeypatch.setattr(os, "fsync", dies)
    with pytest.raises(KeyboardInterrupt):
        bench.write_report(root, recipe, results, readme)
    assert readme.read_text() == "# x\n\n## Results\nold\n"
    assert [p.name for p in results.iterdir()] == ["summary.json"]
    assert (results / "summary.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


class FakeRunner:
    """Records commands; 'trains' by writing results.json unless told to fail."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, cmd, log):
        self.calls.append(cmd)
        out = cmd[cmd.index("--resume" if "--resume" in cmd else "--out") + 1]
        if out.rsplit("/", 1)[-1] in self.fail:
            return 1
        (bench.Path(out) / "results.json").write_text('{"metrics": {"accuracy": 0.5}}')
        return 0


def test_grid_skips_finished_resumes_checkpoints_and_runs_the_rest(tmp_path, monkeypatch):
    root = tmp_path / "cells"
    write_cell(root, "sst2", "lora", 0, 0.8)
    ckpt = root / "sst2" / "fim-s0" / "checkpoint"
    ckpt.mkdir(parents=True)
    old = 1e9  # an old checkpoint: its run is not alive
    os.utime(ckpt, (old, old))
    (root / "sst2" / "peft-lora-s1" / "checkpoint").mkdir(parents=True)  # a stopped peer
    monkeypatch.setattr(bench, "missing_peer", lambda m: "peft not installed"
                        if m == "peft-eva" else None)
    cells = [bench.Cell("sst2", m, 0) for m in ("lora", "fim", "fim+da", "peft-lora",
                                                  "peft-eva")]
    cells.append(bench.Cell("sst2", "peft-lora", 1))
    fake = FakeRunner(fail={"fim_da-s0"})
    outcome = bench.run_grid(cells, {"sst2": tmp_path}, root, 1, run=fake)
    names = {k: [c.method for c in v] for k, v in outcome.items()}
    assert names == {"done": ["lora"], "resumed": ["fim", "peft-lora"], "ran": ["peft-lora"],
                     "failed": ["fim+da"], "missing": ["peft-eva"], "busy": []}
    resume, fresh, peer, peer_resume = fake.calls
    assert resume[1:] == ["train.py", "--resume", str(root / "sst2" / "fim-s0"),
                          "--threads", "1"]
    assert fresh[1:4] == ["train.py", "--method", "fim+da"] and "--seed" in fresh
    assert peer[1:8] == ["bench.py", "--peer", "peft-lora", "--", "--method", "lora",
                         "--model"] and "--save-every" not in peer  # it checkpoints as ours
    assert peer_resume[1:] == ["bench.py", "--peer", "peft-lora", "--", "--resume",
                               str(root / "sst2" / "peft-lora-s1"), "--threads", "1"]
    assert (root / "sst2" / "fim-s0" / "run.json").exists()
    assert not (root / "sst2" / "fim_da-s0" / "run.json").exists()
    # a second pass runs only the failed cell again
    again = FakeRunner()
    bench.run_grid(cells, {"sst2": tmp_path}, root, 1, run=again)
    assert [c[c.index("--method") + 1] for c in again.calls] == ["fim+da"]


def claimed(root, folder, host, pid, age=0.0):
    out = root / "sst2" / folder
    (out / "checkpoint").mkdir(parents=True)
    (out / bench.CLAIM).write_text(json.dumps({"host": host, "pid": pid}))
    stamp = time.time() - age
    for p in [out, *out.rglob("*")]:
        os.utime(p, (stamp, stamp))
    return out


def test_grid_leaves_a_cell_claimed_by_a_live_process_alone(tmp_path):
    root = tmp_path / "cells"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        claimed(root, "fw-s1", socket.gethostname(), live.pid, age=10**6)  # old files, live pid
        claimed(root, "fw-s2", "gpu-box", 1, age=0)  # another host, written just now
        fake = FakeRunner()
        cells = [bench.Cell("sst2", "fw", s) for s in (1, 2)]
        outcome = bench.run_grid(cells, {"sst2": tmp_path}, root, 1, run=fake)
        assert fake.calls == [] and [c.seed for c in outcome["busy"]] == [1, 2]
    finally:
        live.kill()
        live.wait()


def test_grid_takes_over_stale_claims_and_releases_its_own(tmp_path):
    root = tmp_path / "cells"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claimed(root, "fw-s1", socket.gethostname(), dead.pid)  # its process is gone
    claimed(root, "fw-s2", "gpu-box", 1, age=2 * bench.BUSY_SECONDS)  # quiet for too long
    (root / "sst2" / "fw-s3" / "checkpoint").mkdir(parents=True)  # no claim: a killed run
    fake = FakeRunner()
    cells = [bench.Cell("sst2", "fw", s) for s in (1, 2, 3)]
    outcome = bench.run_grid(cells, {"sst2": tmp_path}, root, 1, run=fake)
    assert [c.seed for c in outcome["resumed"]] == [1, 2, 3] and len(fake.calls) == 3
    assert not list(root.rglob(bench.CLAIM))  # released after each cell


def test_claim_is_exclusive_within_a_host(tmp_path):
    out = tmp_path / "cell"
    assert bench.claim(out) and not bench.busy(out)  # our own claim does not block us
    owner = json.loads((out / bench.CLAIM).read_text())
    assert owner == {"host": socket.gethostname(), "pid": os.getpid()}
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (out / bench.CLAIM).write_text(json.dumps(owner | {"pid": live.pid}))
        assert bench.busy(out) and not bench.claim(out)
    finally:
        live.kill()
        live.wait()
    assert bench.claim(out)  # now stale: taken over


def test_estimate_uses_measured_cells_of_the_same_method_first(grid):
    root, _ = grid
    known = bench.read_cells(root)
    for c in known:
        c["seconds_per_step"] = 2.0 if c["method"] == "fim" else 1.0
    sec, measured = bench.estimate_seconds(bench.Cell("sst2", "fim", 5), known, 100)
    assert measured and sec == pytest.approx(100 * 2.0 + 2.0)
    sec, measured = bench.estimate_seconds(bench.Cell("rte", "fw", 0), [], 100)
    assert not measured and sec == pytest.approx(100 * bench.SECONDS_PER_STEP_GUESS)


def test_steps_left_counts_from_the_checkpoint(tmp_path):
    assert bench.steps_left(tmp_path / "new", 1000) == 1000
    for name, step in (("checkpoint.old", 300), ("checkpoint", 770)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(json.dumps({"step": step}))
        assert bench.steps_left(tmp_path, 1000) == 1000 - step
    (tmp_path / "checkpoint" / "meta.json").write_text("{damaged")
    assert bench.steps_left(tmp_path, 1000) == 700  # the older one still counts


def test_find_tasks_sees_standard_glue_folders(tmp_path):
    for folder in ("SST-2", "RTE", "MNLI", "junk"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "train.tsv").write_text("x\n")
    (tmp_path / "CoLA").mkdir()  # no train.tsv
    assert bench.find_tasks(tmp_path) == {t: tmp_path / f for t, f in
                                          (("sst2", "SST-2"), ("rte", "RTE"), ("mnli", "MNLI"))}


def test_method_flags_for_every_grid_method():
    assert bench.method_flags("lora") == ["--method", "lora"]
    assert bench.method_flags("fim+da-params") == ["--method", "fim+da", "--budget", "params"]
    assert bench.method_flags("fim-kfac-params") == ["--method", "fim", "--score", "kfac",
                                                     "--budget", "params"]
    assert bench.method_flags("fim-per-example-params") == ["--method", "fim", "--per-example",
                                                            "--budget", "params"]
    assert bench.score_method("efim") == "fim-params"
    assert bench.score_method("kfac") == "fim-kfac-params"
    for score in bench.FIM_SCORES:  # every score cell round-trips through its folder name
        method = bench.score_method(score)
        assert bench.parse_folder(bench.Cell("sst2", method, 0).folder) == (method, 0)


def test_score_cells_are_planned_at_the_parameter_budget(tmp_path, capsys, monkeypatch):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\na\t1\n")
    (tmp_path / "README.md").write_text("# x\n")
    monkeypatch.chdir(tmp_path)  # were the report to go to ./results, it would go here
    bench.main(["--results", "--dry-run", "--data-root", str(tmp_path), "--methods",
                "--scores", "efim", "kfac", "per-example", "--root", str(tmp_path / "cells")])
    out = capsys.readouterr().out
    assert "1 task(s) (sst2) x 3 methods x 3 seeds = 9 cells" in out


def test_a_gpu_grid_beside_the_cpu_grid_gets_its_own_table(grid, tmp_path, monkeypatch):
    """The project's own results/cells and results/cells_cuda make one report, a table each."""
    root, recipe = grid
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    root = shutil.move(root, bench.Path("results/cells"))
    gpu = bench.Path("results/cells_cuda")
    for seed, acc in enumerate([0.70, 0.72, 0.74]):
        res = write_cell(gpu, "sst2", "lora", seed, acc) / "results.json"
        res.write_text(json.dumps(json.loads(res.read_text()) | {"device": "cuda:0"}))
    write_cell(gpu, "sst2", "fim-kfac-params", 0, 0.75)
    summary = bench.summarize(root, recipe)
    assert {c["device"] for c in summary["cells"]} == {"cpu", "cuda"}
    from_gpu = bench.summarize(gpu, recipe)  # the GPU grid's --root sees the CPU cells too
    assert from_gpu["cells"] == summary["cells"]
    md = bench.results_markdown(summary, None, {})
    cpu, cuda = md.split("#### sst2 on cuda")
    cpu = cpu[cpu.index("#### sst2 on cpu"):]  # the table, not the verdict line above it
    assert "#### sst2 on cpu" in cpu and "| lora | 82.33 ± 2.52 |" in cpu
    assert "| lora | 72.00 ± 2.00 |" in cuda
    assert "| fim-kfac-params | 75.00 (1 of 3 seeds) |" in cuda
    assert "fim-kfac-params" not in cpu  # a method without cells on a device is not listed there
    assert row_of(cuda, "fim-kfac-params")[3] == "+5.00"  # paired with the GPU lora only


def test_a_report_elsewhere_reads_exactly_its_root(grid):
    """Outside results/, --root X/cells reads X/cells alone: a sibling X/cells_backup (a copy
    with other values) or X/cells_cuda never enters its seeds or means."""
    root, recipe = grid
    for sibling in ("cells_backup", "cells_cuda"):
        write_cell(root.parent / sibling, "sst2", "lora", 0, 0.99)
        write_cell(root.parent / sibling, "sst2", "lora", 7, 0.99)
    cells = bench.summarize(root, recipe)["cells"]
    assert len(cells) == 7 and {c["root"] for c in cells} == {root.as_posix()}
    md = bench.results_markdown(bench.summarize(root, recipe), None, {})
    assert row_of(md, "lora")[1:3] == ["82.33 ± 2.52", "80.00, 85.00, 82.00"]


def test_op_count_counts_dispatched_aten_operators():
    x = torch.ones(3)
    assert bench.op_count(lambda: None) == 0
    assert bench.op_count(lambda: (x + 1) * 2) >= 2  # add and mul at least


def test_score_table_pairs_each_score_with_lora_and_the_random_control(grid):
    root, _ = grid  # lora: 80, 85, 82
    for seed, (rnd, kfac) in enumerate([(0.81, 0.83), (0.84, 0.86), (0.82, 0.85)]):
        write_cell(root, "sst2", "fim-random-params", seed, rnd)
        write_cell(root, "sst2", "fim-kfac-params", seed, kfac)
    lines = bench.score_lines(bench.read_cells(root), "sst2")
    md = "\n".join(lines)
    assert row_of(md, "random")[1:3] == ["+0.00 ± 1.00", "1 of 3"]  # (+1, −1, 0)
    # kfac − lora = (+3, +1, +3), kfac − random = (+2, +2, +3)
    assert row_of(md, "kfac")[1:] == ["+2.33 ± 1.15", "3 of 3", "+2.33 ± 0.58", "3 of 3"]


@pytest.mark.parametrize("df, p, t", [(1, .975, 12.706205), (2, .975, 4.302653),
                                      (3, .975, 3.182446), (4, .975, 2.776445),
                                      (9, .975, 2.262157), (30, .975, 2.042272),
                                      (5, .95, 2.015048), (10**4, .975, 1.960201)])
def test_t_quantile_matches_published_tables(df, p, t):
    """Oracle: Student t tables (R's qt to 6 decimals); df 10^4 is the normal's 1.96 almost."""
    assert bench.t_quantile(p, df) == pytest.approx(t, abs=1e-6)


def test_paired_delta_interval_and_wins_on_hand_made_values():
    # Δ = (+1, −0.5, +2) over seeds 0-2; seed 3 has no lora and does not count
    value = {("lora", 0): 80, ("lora", 1): 85, ("lora", 2): 82, ("m", 0): 81, ("m", 1): 84.5,
             ("m", 2): 84, ("m", 3): 99, ("one", 1): 86}
    st = bench.delta_stats(value, "m", "lora")
    half = 4.302653 * 1.258306 / 3 ** 0.5  # t(0.975, 2) · sample sd / √n
    assert st["n"] == 3 and st["wins"] == 2 and st["mean"] == pytest.approx(5 / 6)
    assert (st["low"], st["high"]) == pytest.approx((5 / 6 - half, 5 / 6 + half), abs=1e-5)
    one = bench.delta_stats(value, "one", "lora")  # one seed: a mean, never an interval
    assert one["n"] == 1 and one["low"] is None and bench.interval(one) == "n/a"
    assert bench.delta_stats(value, "x", "lora") is None and bench.interval(None) == "–"


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
    methods = ["lora", "fim-random-params", "up", "best", "down", "flat", "one"]
    v = bench.verdicts(acc_cells(table), methods)["tables"]["sst2 on cpu"]["methods"]
    got = {m: v[m]["verdict"] for m in v}
    assert got == {"fim-random-params": "level", "up": "level",
                   "best": "better", "down": "worse", "flat": "level", "one": "undecided"}
    assert v["up"]["low"] > 0 and "does not beat the random control" in v["up"]["why"]
    # without random cells a gain cannot be checked: undecided, and the reason says so
    no_control = {m: a for m, a in table.items() if m != "fim-random-params"}
    out = bench.verdicts(acc_cells(no_control), methods)
    assert out["methods"]["best"]["verdict"] == "undecided"
    assert "no random control" in out["methods"]["best"]["tables"]["sst2 on cpu"]["why"]
    # across tables: better on one, worse on another is mixed; level + undecided is level
    both = acc_cells(table) + acc_cells({"lora": lora, "best": [78, 82.8, 80.2]}, "cuda")
    across = bench.verdicts(both, methods)
    assert across["methods"]["best"]["verdict"] == "mixed"
    assert "no method is better than uniform LoRA" in across["line"]
    assert "mixed: best" in across["line"] and "sst2 on cuda (3 seeds)" in across["line"]


def test_the_readme_verdict_line_follows_the_cells(grid, tmp_path):
    """The one-line verdict is computed from the cells: new cells, a new line; summary.json
    holds the same line."""
    root, recipe = grid  # fim: Δ (+1, −0.5, +2), level; fim+da: one seed, undecided
    readme, results = tmp_path / "README.md", tmp_path / "results"

    def line() -> str:
        bench.write_report(root, recipe, results, readme)
        text = " ".join(readme.read_text().split())
        got = re.search(r"Verdict \(generated[^.]*\.", text).group(0)
        assert got == json.loads((results / "summary.json").read_text())["verdicts"]["line"]
        return got

    before = line()
    assert before == ("Verdict (generated from the intervals below): no method is better than "
                      "uniform LoRA on sst2 on cpu (3 seeds); level: fim; undecided: fim+da.")
    for seed, (rnd, kfac) in enumerate([(0.81, 0.84), (0.86, 0.89), (0.83, 0.86)]):
        write_cell(root, "sst2", "fim-random-params", seed, rnd)
        write_cell(root, "sst2", "fim-kfac-params", seed, kfac)
    after = line()  # kfac − lora = (+4, +4, +4), kfac − random = (+3, +3, +3)
    assert after.startswith("Verdict (generated from the intervals below): better than "
                            "uniform LoRA: fim-kfac-params on sst2 on cpu (3 seeds)")


def test_an_empty_grid_and_a_missing_gpu_are_refused_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="nothing to run"):
        bench.main(["--results", "--dry-run", "--methods", "--root", str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="--devices cuda but CUDA is not available"):
        bench.main(["--devices", "cuda", "--out", str(tmp_path / "b.json")])


def test_bench_table_reads_the_noise_floor_off_the_merged_forward_row():
    rows = [bench.row("merged LoRA forward / base forward (inference), 32×64", 0.96, 1.0, "×",
                      "d"), bench.row("LoRA train step / full", 0.74, 0.7, "×", "d")]
    lines = bench.bench_table({"rows": rows})
    assert "| merged LoRA forward / base forward (inference), 32×64 | 0.96× | ≤ 1× | met |" in \
        "\n".join(lines)
    assert "0.960×" in lines[-1] and "±4 %" in lines[-1]
    assert not any("noise" in x for x in bench.bench_table({"rows": rows[1:]}))


def test_ctrl_c_stops_the_grid_with_a_checkpoint_and_the_same_command_resumes(tmp_path):
    """A terminal Ctrl-C (SIGINT to the whole process group) while a cell trains: bench.py exits
    130 with one line and no traceback, the cell keeps a checkpoint and no claim, and the same
    command again resumes it to results.json."""
    from conftest import ROOT, SST2
    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"SST-2 not found at {SST2}")
    cmd = [sys.executable, "bench.py", "--results", "--root", str(tmp_path / "cells"),
           "--methods", "lora", "--seeds", "0", "--data-root", str(SST2.parent), "--",
           "--model", "tiny", "--max-train", "1024", "--max-eval", "64", "--steps", "5",
           "--batch-size", "128", "--log-every", "1", "--save-every", "1000"]  # ~1 s steps
    cell = tmp_path / "cells" / "sst2" / "lora-s0"
    code = tmp_path / "code"  # a copy: the grid writes results/ and README.md where it runs
    code.mkdir()
    for name in ("train.py", "runfolder.py", "bench.py", "lora.py", "fimlora.py", "README.md",
                 "models", "data"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, code / name)
    proc = subprocess.Popen(cmd, cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and "step      2/" not in (
            (cell / "train.log").read_text() if (cell / "train.log").exists() else ""):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "run the same command again" in err, err
    assert "Traceback" not in err and not (cell / "results.json").exists()
    assert (cell / "checkpoint" / "meta.json").is_file() and not (cell / bench.CLAIM).exists()
    done = subprocess.run(cmd, cwd=code, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "resumed 1" in done.stdout, done.stdout + done.stderr
    assert (cell / "results.json").is_file()


def _other_recipe_cell(tmp):
    out = write_cell(tmp / "cells", "sst2", "lora", 0, 0.8)
    res = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps(res | {"args": {"steps": 1000, "lr": 5e-4}}))
    return ["--", "--steps", "10"]


def _damaged_cell(tmp, text):
    out = tmp / "cells" / "sst2" / "lora-s0"
    out.mkdir(parents=True)
    (out / "results.json").write_text(text)
    return ["--methods", "lora"]


@pytest.mark.parametrize("text", ["[]", '{"metrics": 3}', "\xff"])
def test_readme_names_a_damaged_cell_file(tmp_path, monkeypatch, text):
    monkeypatch.chdir(tmp_path)
    _damaged_cell(tmp_path, text)
    with pytest.raises(ValueError, match="lora-s0/results.json is damaged"):
        bench.main(["--readme", "--root", str(tmp_path / "cells")])


# make results' bad input: (what the user did, setup(tmp) -> bench.py arguments, message text)
GRID_ERRORS = [
    ("--seeds -1", lambda t: ["--seeds", "0", "-1"], "--seeds -1: use seeds >= 0"),
    ("--data-root that does not exist", lambda t: ["--data-root", str(t / "none")],
     "no such folder; pass the folder that holds the GLUE task folders"),
    ("--data-root without GLUE folders", lambda t: ["--data-root", str(t)],
     "holds no standard GLUE folder with a train.tsv (SST-2, CoLA"),
    ("--tasks not under --data-root", lambda t: ["--tasks", "rte"], "--tasks rte: no such GLUE"),
    ("--root is a file", lambda t: (t / "f").write_text("x") and ["--root", str(t / "f")],
     "is a file: pass the cells' folder"),
    ("a grid-owned train.py flag", lambda t: ["--", "--seed", "3"],
     "--seed is set by the grid for each cell; use --tasks"),
    ("an unknown train.py flag", lambda t: ["--", "--bogus"],
     "--bogus is not a valid train.py argument list"),
    ("a bad train.py value", lambda t: ["--", "--lr", "-1"], "--lr -1.0: use > 0"),
    ("a finished cell of another recipe", _other_recipe_cell,
     "trained with another recipe (--steps 1000 there, 10 here): give this recipe its own --root"),
    ("no SST-2 and no --data-root", lambda t: ["--wet"], "not found: pass --data-root"),
    ("--threads -1", lambda t: ["--threads", "-1"], "--threads -1: use >= 0"),
    ("a damaged results.json", lambda t: _damaged_cell(t, '{"args": {'),
     "results.json is damaged (not a results object with metrics): remove"),
    ("peers on a decoder", lambda t: ["--peers", "peft-lora", "--", "--model", "smollm2"],
     "the peers (transformers + PEFT) train a BERT encoder on a GLUE task"),
    ("a seed past numpy's range", lambda t: ["--seeds", str(2**32)],
     "--seeds 4294967296: use seeds >= 0 and <= 4294967295"),
]


@pytest.mark.parametrize("peer", bench.PEERS)
@pytest.mark.parametrize("model", ["tiny", "tiny-llama", "smollm2"])
def test_a_peer_refuses_a_model_it_cannot_build_before_any_work(tmp_path, peer, model):
    with pytest.raises(ValueError, match=f"--model {model} --task .*: the peers"):
        bench.peer_train(peer, ["--model", model, "--task", "sst2", "--data-dir", str(tmp_path),
                                "--out", str(tmp_path / "o")])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("label,setup,match", GRID_ERRORS, ids=[g[0] for g in GRID_ERRORS])
def test_bad_grid_input_is_refused_before_any_work_or_write(tmp_path, monkeypatch, label, setup,
                                                            match):
    monkeypatch.chdir(tmp_path)  # the report would go to ./results and ./README.md
    monkeypatch.setattr(bench, "run_grid", lambda *a, **k: pytest.fail("ran the grid"))
    argv = setup(tmp_path)
    rest = argv[argv.index("--"):] if "--" in argv else []
    argv = argv[:len(argv) - len(rest)]
    if "--root" not in argv:
        argv += ["--root", str(tmp_path / "cells")]
    argv = [a for a in argv if a != "--wet"] if "--wet" in argv else [*argv, "--dry-run"]
    before = sorted((p, p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=re.escape(match)):
        bench.main(["--results", *argv, *rest])
    assert sorted((p, p.read_bytes() if p.is_file() else None)
                  for p in tmp_path.rglob("*")) == before


def test_repeated_seeds_count_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("# x\n")
    bench.main(["--results", "--dry-run", "--methods", "lora", "--seeds", "1", "1", "0", "1",
                "--root", str(tmp_path / "cells")])
    assert "1 methods x 2 seeds = 2 cells" in capsys.readouterr().out


def test_readme_from_a_missing_cells_folder_is_refused_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="no such folder, no cells to summarise"):
        bench.main(["--readme", "--root", str(tmp_path / "none")])
    assert list(tmp_path.iterdir()) == []


def test_adalora_rows_say_their_parameters_are_counted_before_pruning(grid):
    root, recipe = grid
    assert "counted at its start" not in bench.results_markdown(
        bench.summarize(root, recipe), None, {})
    write_cell(root, "sst2", "peft-adalora", 0, 0.79, params=1500)
    md = " ".join(bench.results_markdown(bench.summarize(root, recipe), None, {}).split())
    assert "trainable parameters are counted at its start (init_r = 1.5 × r per matrix)" in md


def test_ctrl_c_in_the_planted_study_says_nothing_was_written(tmp_path):
    """Outside the grid the Ctrl-C line does not promise a resume: the study writes its JSON
    only at the end, so an interrupted one leaves nothing behind."""
    from conftest import ROOT
    out = tmp_path / "study.json"
    proc = subprocess.Popen([sys.executable, "bench.py", "--planted-study", "--seeds", "3",
                             "--steps", "100000", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    proc.stdout.readline()  # the first line is printed inside the first run (after imports,
    time.sleep(1)  # which take longer than any fixed sleep on a loaded machine)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "nothing was written" in err, err
    assert "Traceback" not in err and "resumes" not in err and not out.exists()



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


def _hostile(field, value):
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


def _replace(make):
    def setup(out):
        (out / "results.json").unlink()
        make(out / "results.json")
    return setup


# damaged or hostile cells: (case, setup(cell folder), the field the message names)
HOSTILE_CELLS = [
    ("accuracy 1e308", _hostile("metrics.accuracy", 1e308), "metrics.accuracy = 1e+308"),
    ("accuracy null", _hostile("metrics.accuracy", None), "metrics.accuracy = null"),
    ("accuracy NaN", _hostile("metrics.accuracy", float("nan")), "metrics.accuracy = NaN"),
    ("accuracy -5", _hostile("metrics.accuracy", -5), "metrics.accuracy = -5, not a number in "
     "[0, 1]"),
    ("accuracy true", _hostile("metrics.accuracy", True), "metrics.accuracy = true"),
    ("accuracy a string", _hostile("metrics.accuracy", "0.9"), 'metrics.accuracy = "0.9"'),
    ("empty metrics", _hostile("metrics", {}), "its metrics have no 'accuracy', the sst2"),
    ("seconds.per_step a string", _hostile("seconds.per_step", "fast"), "seconds.per_step"),
    ("seconds a list", _hostile("seconds", [1]), "seconds is a list, not a dict"),
    ("trainable_parameters a string", _hostile("trainable_parameters", "1,000"),
     "trainable_parameters"),
    ("trainable_parameters a float", _hostile("trainable_parameters", 1.5),
     "trainable_parameters"),
    ("args a list", _hostile("args", [1]), "args is a list, not a dict"),
    ("machine a string", _hostile("machine", "x"), "machine is a str, not a dict"),
    ("machine.cuda a list", _hostile("machine", {"cuda": [1]}), "machine.cuda"),
    ("device a number", _hostile("device", 3), "device is a int, not a str"),
    ("device a path", _hostile("device", "../x"), "device '../x'"),
    ("ranks a list", _hostile("ranks", [1]), "ranks is a list, not a dict"),
    ("a rank a string", _hostile("ranks", {"m": "8"}), "ranks.m"),
    ("results.json a folder", _replace(lambda p: p.mkdir()), "is not a regular file"),
    ("results.json a link to /dev/zero", _replace(lambda p: p.symlink_to("/dev/zero")),
     "is not a regular file"),
    ("results.json a FIFO", _replace(lambda p: os.mkfifo(p)), "is not a regular file"),
    ("results.json deeply nested", _replace(lambda p: p.write_text("[" * 100000)),
     "is damaged (not a results object"),
    ("results.json over the byte bound", _replace(lambda p: p.write_text(
        " " * (bench.READ_LIMIT + 1))), "bytes, over the 16,777,216"),
    ("run.json a list", lambda out: (out / "run.json").write_text("[]"),
     "run.json is damaged (not a results object"),
    ("run.json machine a list", lambda out: (out / "run.json").write_text('{"machine": []}'),
     "run.json is damaged (machine is a list"),
]


@pytest.mark.parametrize("label,setup,field", HOSTILE_CELLS, ids=[h[0] for h in HOSTILE_CELLS])
def test_readme_on_a_damaged_cell_names_it_and_writes_nothing(grid, tmp_path, monkeypatch, label,
                                                              setup, field):
    """bench.py --readme on a cell whose results.json holds a value its field cannot take, or is
    not a regular file: a ValueError naming the cell file and the field (main prints it as
    `error:`), never a traceback or an unbounded read, and no report file written."""
    root, recipe = grid
    monkeypatch.chdir(tmp_path)  # were the report to go to ./results, it would go here
    setup(root / "sst2" / "fim-s1")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=r"fim-s1/(results|run)\.json") as e:
        bench.write_report(root, recipe)
    assert field in str(e.value) and "remove" in str(e.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_a_cell_folder_with_a_seed_out_of_range_is_refused(grid):
    root, recipe = grid
    write_cell(root, "sst2", "lora", 99999999999999999999, 0.8)
    with pytest.raises(ValueError, match=r"lora-s99999999999999999999: seed .* is outside "
                                         r"0\.\.4294967295"):
        bench.summarize(root, recipe)


def test_a_grid_elsewhere_leaves_the_projects_evidence_alone(grid, tmp_path, monkeypatch):
    """--results --dry-run / --readme with --root other/cells: its summary.json and report go
    to other/cells/, and results/ and README.md stay byte for byte as they were."""
    root, _ = grid
    project = tmp_path / "project"
    (project / "results" / "cells" / "sst2").mkdir(parents=True)
    (project / "results" / "summary.json").write_text('{"mine": 1}')
    (project / "README.md").write_text("# mine\n")
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "train.tsv").write_text("x\t1\t\tok\n")
    monkeypatch.chdir(project)
    snapshot = {p: p.read_bytes() if p.is_file() else None for p in project.rglob("*")}
    bench.main(["--results", "--data-root", str(tmp_path), "--tasks", "cola", "--methods",
                "lora", "--root", str(root), "--dry-run"])
    bench.main(["--readme", "--root", str(root)])
    assert {p: p.read_bytes() if p.is_file() else None for p in project.rglob("*")} == snapshot
    summary = json.loads((root / "summary.json").read_text())
    assert len(summary["cells"]) == 7 and summary["recipe"]["tasks"] == ["cola"]
    report = (root / "README.md").read_text().replace("\n", "")  # unwrap the long paths
    assert f"{root.as_posix()}/summary.json" in report and "results/summary.json" not in report
    assert f"(`{root.as_posix()}/cola/`)" in report and "results/cells" not in report
    assert (root / "ranks_sst2.svg").is_file()


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


def test_a_cell_that_train_py_finds_in_use_is_reported_busy_not_failed(tmp_path, capsys):
    """A second trainer on a cell is refused by train.py's own lock on its --out; the grid
    reports that cell busy (left alone), not failed."""
    root = tmp_path / "cells"
    log = root / "sst2" / "fw-s1" / "train.log"
    log.parent.mkdir(parents=True)
    log.write_text("an earlier run: error: --out x is in use by pid 7 (host h)\n")

    def refused(cmd, log):
        with open(log, "a") as f:
            f.write("error: --out x is in use by pid 4242 (host h): wait for that run\n")
        return 1
    cells = [bench.Cell("sst2", "fw", s) for s in (1, 2)]
    outcome = bench.run_grid(cells, {"sst2": tmp_path}, root, 1, run=refused)
    assert [c.seed for c in outcome["busy"]] == [1, 2] and outcome["failed"] == []
    assert "fw-s1: its folder is in use by another train.py" in capsys.readouterr().out
    # an old refusal in the log does not make a later plain failure look busy
    outcome = bench.run_grid(cells[:1], {"sst2": tmp_path}, root, 1, run=lambda c, l: 1)
    assert [c.seed for c in outcome["failed"]] == [1] and outcome["busy"] == []


def test_a_claim_whose_grid_died_but_whose_cell_lives_is_busy(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        out = claimed(tmp_path, "fw-s1", socket.gethostname(), dead.pid)
        (out / bench.CLAIM).write_text(json.dumps({"host": socket.gethostname(),
                                                   "pid": dead.pid, "cell": live.pid}))
        assert bench.busy(out) and not bench.claim(out)
    finally:
        live.kill()
        live.wait()
    assert not bench.busy(out) and bench.claim(out)


def _gone(pid: int) -> bool:
    """Dead (or a zombie nobody reaped yet)."""
    return not bench.pid_alive(pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_kill_9_of_the_grid_takes_its_cell_down(tmp_path):
    """kill -9 of `bench.py --results` while a cell runs: the cell's process dies with it (no
    orphan trains on beside the next grid), and the next grid finds the cell free."""
    from conftest import ROOT
    root = tmp_path / "cells"
    script = ("import sys; from pathlib import Path; import bench\n"
              "bench.cell_command = lambda *a, **k: [sys.executable, '-c', "
              "'import time; time.sleep(300)']\n"
              f"bench.run_grid([bench.Cell('sst2', 'lora', 0)], {{'sst2': Path('.')}}, "
              f"Path({str(root)!r}), 1)\n")
    grid = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL)
    claim, cell = root / "sst2" / "lora-s0" / bench.CLAIM, None
    try:
        deadline = time.time() + 120
        while cell is None and time.time() < deadline and grid.poll() is None:
            time.sleep(0.1)
            try:
                cell = json.loads(claim.read_text()).get("cell")
            except (OSError, ValueError):
                pass
        assert cell and bench.pid_alive(cell) and bench.busy(claim.parent)
        os.kill(grid.pid, signal.SIGKILL)
        grid.wait()
        deadline = time.time() + 30
        while not _gone(cell) and time.time() < deadline:
            time.sleep(0.1)
        assert _gone(cell), "the cell outlived its grid"
        assert not bench.busy(claim.parent)  # the dead grid's claim is stale: taken over
    finally:
        grid.kill()
        if cell and not _gone(cell):
            os.kill(cell, signal.SIGKILL)


def test_the_grid_reads_claims_and_checkpoint_steps_bounded(tmp_path):
    """A claim or a checkpoint's meta.json that is a link to /dev/zero or a FIFO is read as
    damaged (bounded, regular files only), never read to exhaustion or waited on."""
    for i, make in enumerate((lambda p: p.symlink_to("/dev/zero"), os.mkfifo)):
        out = tmp_path / f"cell{i}"
        (out / "checkpoint").mkdir(parents=True)
        make(out / bench.CLAIM)
        make(out / "checkpoint" / "meta.json")
        old = time.time() - 2 * bench.BUSY_SECONDS
        for p in (out, *out.rglob("*")):
            os.utime(p, (old, old), follow_symlinks=False)
        assert not bench.busy(out, now=time.time())
        assert bench.steps_left(out, 1000) == 1000


def test_a_report_that_fails_half_way_writes_nothing(grid, tmp_path):
    """A file the report reads after the cells (results/bench.json) that is not JSON: the
    error names it, and summary.json, the rank maps and the README are all left as they were
    (the report is computed whole before anything is written)."""
    root, recipe = grid
    readme, results = tmp_path / "README.md", tmp_path / "results"
    readme.write_text("# x\n")
    results.mkdir()
    (results / "summary.json").write_text("{}")
    (results / "bench.json").write_text("{")
    with pytest.raises(ValueError, match="results/bench.json is not JSON"):
        bench.write_report(root, recipe, results, readme)
    assert sorted(p.name for p in results.iterdir()) == ["bench.json", "summary.json"]
    assert (results / "summary.json").read_text() == "{}" and readme.read_text() == "# x\n"


def test_a_cell_trained_with_another_grad_accum_is_another_recipe(tmp_path, monkeypatch):
    """--grad-accum changes the update's numerics and memory: a cell trained with 4 is not
    skipped as this recipe's (grad_accum is one of RECIPE_KEYS)."""
    monkeypatch.chdir(tmp_path)
    out = write_cell(tmp_path / "cells", "sst2", "lora", 0, 0.8)
    res = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps(res | {"args": {"grad_accum": 4}}))
    with pytest.raises(ValueError, match="another recipe \\(--grad-accum 4 there, 1 here\\)"):
        bench.main(["--results", "--dry-run", "--methods", "lora", "--seeds", "0",
                    "--root", str(tmp_path / "cells")])


def test_peft_adalora_refuses_grad_accum_before_any_work(tmp_path, monkeypatch):
    """AdaLoRA's own loop steps once per batch: --grad-accum > 1 is refused by the cell and by
    the grid, before any model is loaded or folder written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "_hf_twin", lambda *a: pytest.fail("built a model"))
    argv = ["--model", "minilm", "--task", "sst2", "--data-dir", str(tmp_path), "--grad-accum",
            "2", "--out", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="--grad-accum 2: peft-adalora trains one batch per"):
        bench.peer_train("peft-adalora", argv)
    with pytest.raises(ValueError, match="--grad-accum 2: peft-adalora trains one batch per"):
        bench.main(["--results", "--dry-run", "--methods", "--peers", "peft-adalora",
                    "--root", str(tmp_path / "cells"), "--", "--model", "minilm",
                    "--grad-accum", "2"])
    assert list(tmp_path.iterdir()) == []


def test_a_peer_cell_writes_its_results_once_under_the_folder_lock(tmp_path, monkeypatch):
    """peer_train's fields (the peer's name) reach results.json through train.run's own save,
    while --out's lock is held: every results.json write finds the lock taken (a second flock
    on <out>/.lock fails). A tiny planted run stands in for the transformers model."""
    import fcntl

    import train
    out = tmp_path / "cell"
    writes = []

    def spy(real):
        def write(path, obj):
            fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                writes.append((path.name, "unlocked"))
            except BlockingIOError:
                writes.append((path.name, "locked"))
            finally:
                os.close(fd)
            return real(path, obj)
        return write
    monkeypatch.setattr(train, "write_json", spy(train.write_json))
    monkeypatch.setattr(bench, "write_json", spy(bench.write_json))
    monkeypatch.setattr(bench, "peer_args", lambda argv, adalora=False: train.parse_args(argv))
    monkeypatch.setattr(bench, "peft_adapt", train.add_adapters)
    res = bench.peer_train("peft-lora", ["--steps", "2", "--threads", "1", "--log-every", "1",
                                         "--out", str(out)])
    assert res["peer"] == "peft-lora"
    assert json.loads((out / "results.json").read_text())["peer"] == "peft-lora"
    assert ("results.json", "locked") in writes and ("results.json", "unlocked") not in writes


def test_the_study_criterion_needs_the_interval_above_zero_not_just_wins():
    """(control - score) / uniform over 3 seeds: t(2 df) = 4.303, so three wins with a wide
    spread do not count; a tight one does (hand-computed half widths 0.248 and 0.124)."""
    wide, tight = bench.beats([0.1, 0.2, 0.3]), bench.beats([0.2, 0.25, 0.3])
    assert wide["wins"] == 3 and not wide["above_zero"]
    assert wide["low"] == pytest.approx(0.2 - 4.303 * 0.1 / 3**0.5)
    assert tight["above_zero"] and tight["low"] == pytest.approx(0.25 - 4.303 * 0.05 / 3**0.5)
    assert "beats both data-free controls" in bench.PLANTED_CRITERION


def study_run(tmp_path, allocation, steps=30):
    import train
    record: dict = {}
    out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    args = train.parse_args(["--method", "lora", "--steps", str(steps), "--threads", "1",
                             "--log-every", str(steps), "--out", str(out)])
    res = train.run(args, bench._planted_adapt(allocation, record, 24))
    return res, record


def test_the_study_oracle_search_is_at_least_as_good_as_oracle_ranks(tmp_path):
    """On a short planted run (30 steps) the searched oracle's loss, retrained, is the lowest
    it tried and at most that of planted.oracle_ranks, which it tries first."""
    from data import planted
    res, record = study_run(tmp_path, "uniform")
    names, truth = list(record["ranks"]), res["planted"]
    budget = sum(record["ranks"].values())

    def loss_of(ranks):
        return study_run(tmp_path, ranks)[0]["metrics"]["loss"]

    best, tried = planted.search_oracle(names, truth, budget, 24, loss_of, grid=(24, 16),
                                        step=8)
    base = loss_of(planted.oracle_ranks(names, truth, budget))
    assert tried[0]["final_loss"] == base and len(tried) <= 2 + 2 * 3
    lowest = min(tried, key=lambda t: t["final_loss"])
    assert best == planted.oracle_ranks(names, lowest["planted_ranks"], budget)
    assert loss_of(best) == lowest["final_loss"] <= base


def test_the_study_plants_anywhere_reach_query_and_key():
    """--plants anywhere (args.plants) reaches query/key in the tiny planted task; the default
    (no attribute: train.py's task) never does, over the same seeds."""
    import train
    hit = {"reach": set(), "anywhere": set()}
    for seed in range(4):
        for plants in hit:
            args = train.parse_args(["--seed", str(seed), "--out", "unused"])
            if plants == "anywhere":
                args.plants = plants
            task = train.build_task(args, torch.device("cpu"), train.random_streams(seed))
            hit[plants] |= {n.rsplit(".", 1)[1] for n in task.planted}
    assert hit["anywhere"] & {"query", "key"} and not hit["reach"] & {"query", "key"}


def study_part(tmp_path, seed: int, score_loss: float) -> str:
    """A one-seed part as --only-seed writes it, with made-up losses."""
    run = {"loss_ratio": 0.5, "share_planted": 0.5, "calibration_seconds": 0.0, "ranks": {}}
    losses = {"uniform": 1.0, "oracle": 0.4, "structure": 0.8, "gradw": score_loss,
              "shuffled gradw": 0.9}
    runs = {n: run | {"final_loss": v, "vs_uniform": v, "vs_oracle": v / 0.4,
                      "gap_closed": (1 - v) / 0.6} for n, v in losses.items()}
    part = {"args": {"seeds": 1, "steps": 9, "threads": 1, "plants": "reach"},
            "design": {"lr": 5e-3, "oracle_grid": [24, 20, 16], "oracle_step": 4},
            "criterion": bench.PLANTED_CRITERION, "scores_run": ["gradw"],
            "per_seed": [{"seed": seed, "runs": runs, "oracle_search": [
                {"planted_ranks": {"a": 24}, "final_loss": 0.5},
                {"planted_ranks": {"a": 20}, "final_loss": 0.4}]}]}
    path = tmp_path / f"part{seed}.json"
    path.write_text(json.dumps(part))
    return str(path)


def test_the_study_merges_parts_and_judges_each_score_by_both_controls(tmp_path):
    parts = [study_part(tmp_path, s, v) for s, v in ((2, 0.6), (0, 0.5), (1, 0.55))]
    out = bench.planted_study_main(["--planted-study", "--merge", *parts,
                                    "--out", str(tmp_path / "study.json")])
    assert [s["seed"] for s in out["per_seed"]] == [0, 1, 2] and out["args"]["seeds"] == 3
    assert out["criterion_held"] and out["finds"]["gradw"]["finds_plants"]
    assert out["finds"]["gradw"]["structure"]["mean"] == pytest.approx(0.25)
    md = "\n".join(bench.planted_markdown(out))
    assert "| gradw | +0.250 [" in md and "find the plants by the criterion: gradw." in md
    assert "best planted ranks per seed: 20; 20; 20" in md
    worse = [study_part(tmp_path, s, 0.85) for s in (3, 4, 5)]  # beats shuffled, not structure
    out = bench.planted_study_main(["--planted-study", "--merge", *worse,
                                    "--out", str(tmp_path / "study2.json")])
    assert not out["finds"]["gradw"]["finds_plants"]
    with pytest.raises(ValueError, match=r"seeds \[0, 0, 1, 2\]"):
        bench.planted_study_main(["--planted-study", "--merge", parts[1], *parts,
                                  "--out", str(tmp_path / "study3.json")])
