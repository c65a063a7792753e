"""results/README.md (every table, the rank maps) and README.md's two generated blocks.

    python -m study.report                     # results/grid5 + cells_cuda -> results/, README.md
    python -m study.report --root other/cells  # -> other/cells/README.md and its rank maps only
"""

import argparse
import json
import math
import os
import re
import statistics
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from xml.sax.saxutils import escape

import train
from data import glue
from lora import atomic_write, read_regular

RESULTS, README = Path("results"), Path("README.md")
CELLS = RESULTS / "grid5"  # issue 19's grid: SST-2 and CoLA, 5 seeds, each method at its lr
OWN = (CELLS, RESULTS / "cells_cuda")  # the project's grids, read together: a table per device
RETIRED = ("`results/cells/` (the first SST-2 grid: 3 seeds, every method at lr 5e-4, batches "
           "not length-grouped) stays in git and is no longer reported; `results/grid5/` "
           "replaces it.")
METHODS = ("lora", "fim", "fw", "da", "fim+da")
PEERS = ("peft-lora", "peft-adalora", "peft-eva")
# the order indexes the planted study's shuffle streams (planted.shuffle_generator): keep it
SCORES = ("efim", "variance", "per-example", "gradw", "kfac", "lorada", "random", "shuffled")
RECIPE = ["--model", "minilm"]  # the rest is train.py's GLUE defaults
GROUPED = "--group-by-length"  # the grid adds it on encoders: length-grouped batches
LRS = (2e-4, 5e-4, 1e-3)  # issue 19: each method's lr chosen from these (study.grid --select-lr)
BLOCKS = {"run": ("<!-- run:start -->", "<!-- run:end -->"),
          "results": ("<!-- results:begin -->", "<!-- results:end -->")}
READ_LIMIT = 16 << 20  # bytes: a cell's results.json is kilobytes; a bigger file is not one
# Two-sided 95 % Student t quantiles t(0.975, df), df = 1..30, as published (e.g. NIST/SEMATECH
# e-Handbook, table 1.3.6.7.2); past 30 the df = 30 value, slightly wide (conservative).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
RULE = ("Δ = method − lora paired by seed; better: its 95 % t interval and the one against the "
        "random allocation (fim-random-params) above 0; worse: below 0; level: holds 0; "
        "undecided: under 2 paired seeds (no interval).")


def score_method(score: str) -> str:
    """The grid method of a score at the parameter budget.
    score_method("kfac") -> "fim-kfac-params"; score_method("efim") -> "fim-params" """
    return "fim-params" if score == "efim" else f"fim-{score}-params"


def folder(method: str, seed: int) -> str:
    """A cell's folder ("+" written "_").  folder("fim+da", 2) -> "fim_da-s2" """
    return f"{method.replace('+', '_')}-s{seed}"


def lr_folder(method: str, lr: float) -> str:
    """A lr-selection cell's folder.  lr_folder("fim+da", 5e-4) -> "fim_da-lr0.0005" """
    return f"{method.replace('+', '_')}-lr{lr:g}"


def bounded(low: int, high: int | None = None):
    """An argparse type: an int in [low, high] (no bound above: None).
    bounded(0, 9)("12") -> error "12: use 0..9"; bounded(1)("0") -> error "0: use >= 1" """
    def parse(text: str) -> int:
        if int(text) < low or (high is not None and int(text) > high):
            raise argparse.ArgumentTypeError(f"{text}: use " + (
                f">= {low}" if high is None else f"{low}..{high}"))
        return int(text)
    return parse


def metric_of(task: str) -> str:
    return glue.task_spec(task).metrics[0] if task in glue.TASKS else "loss"


# -----------------------------------------------------------------------------
# reading: a cell the report cannot read is refused, naming its file and field


def read_json(path: Path):
    """The JSON of a regular file of at most READ_LIMIT bytes, or ValueError naming it."""
    try:
        return json.loads(read_regular(path, READ_LIMIT))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not JSON ({e})") from None


def bad_field(res) -> str | None:
    """What the report cannot read in a results.json or run.json object, or None.
    bad_field({"metrics": {"accuracy": "0.9"}}) -> 'metrics.accuracy = "0.9", not a number'"""
    if not isinstance(res, dict):
        return "not a results object"
    for key in ("metrics", "args", "machine", "versions", "seconds", "ranks"):
        if res.get(key) is not None and not isinstance(res[key], dict):
            return f"{key} is a {type(res[key]).__name__}, not an object"
    numbers = {"trainable_parameters": res.get("trainable_parameters")} | {
        f"{part}.{k}": v for part in ("metrics", "ranks", "seconds")
        for k, v in (res.get(part) or {}).items()}
    for field, v in numbers.items():  # |v| < 1e15 is False for NaN and inf too
        if (v is not None or field.startswith("metrics.")) and (
                type(v) not in (int, float) or not abs(v) < 1e15):
            return f"{field} = {json.dumps(v)[:40]}, not a number"
    if not re.fullmatch(r"([a-z]+(:\d+)?)?", str(res.get("device") or "")):  # names a table
        return f"device {res['device']!r}"
    return None


def read_result(path: Path) -> dict:
    """A cell's results.json (with metrics) or run.json, or ValueError naming it, the bad field
    (bad_field) and the fix."""
    try:
        res = read_json(path)
        what = bad_field(res) or ("it has no metrics" if path.name == "results.json"
                                  and res.get("metrics") is None else None)
    except ValueError as e:  # read_regular's words for a folder, FIFO, device or huge file
        what = "not JSON" if "is not JSON" in str(e) else str(e)
    if what:
        raise ValueError(f"{path} is damaged ({what}): remove {path.parent} and run the grid "
                         "again to redo that cell")
    return res


def read_root(root: Path) -> list[dict]:
    """One record per <root>/<task>/<method>-s<seed>/results.json (run.json beside it checked
    too), on the device its results.json names; the project's CELLS are read with OWN's rest."""
    roots = [r for r in OWN if r.is_dir()] if root.resolve() == CELLS.resolve() else [root]
    cells = []
    for p in (p for r in roots for p in sorted(r.glob("*/*/results.json"))):
        name, task = re.fullmatch(r"(.+)-s([0-9]+)", p.parent.name), p.parent.parent.name
        if not name:  # ASCII digits above: int() reads other scripts' too
            continue
        res = read_result(p)
        if (p.parent / "run.json").exists():  # the grid's record of the run
            read_result(p.parent / "run.json")
        if metric_of(task) not in res["metrics"]:
            raise ValueError(f"{p} is damaged (its metrics have no {metric_of(task)!r}, the "
                             f"{task} metric): remove {p.parent} and run the grid again")
        cells.append({"task": task, "method": name[1].replace("_", "+"), "seed": int(name[2]),
                      "root": p.parents[2].as_posix(), "lr": (res.get("args") or {}).get("lr"),
                      "grouped": bool((res.get("args") or {}).get("group_by_length")),
                      "model": (res.get("args") or {}).get("model"),
                      "device": (res.get("device") or "cpu").split(":")[0],
                      "metrics": res["metrics"], "ranks": res.get("ranks") or {},
                      "params": res.get("trainable_parameters"),
                      "per_step": (res.get("seconds") or {}).get("per_step")})
    return cells


def lr_results(root: Path) -> dict[str, dict[str, dict[float, float]]]:
    """{task: {method: {lr: held-out metric}}} of root's finished lr-selection cells."""
    out: dict = {}
    for p in sorted(root.glob("*/*/results.json")):
        m, task = re.fullmatch(r"(.+)-lr([0-9.e-]+)", p.parent.name), p.parent.parent.name
        if m and task in glue.TASKS:
            out.setdefault(task, {}).setdefault(m[1].replace("_", "+"), {})[float(m[2])] = \
                read_result(p)["metrics"][metric_of(task)]
    return out


def chosen_lrs(results: dict) -> dict[str, dict[str, float]]:
    """{task: {method: lr}}: the best held-out metric of a method run at every lr in LRS; a tie
    goes to the smaller lr.  {"cola": {"lora": {2e-4: .3, 5e-4: .4, 1e-3: .4}}} -> 5e-4"""
    return {t: {m: max(sorted(v), key=v.get) for m, v in ms.items() if set(LRS) <= set(v)}
            for t, ms in results.items()}


# -----------------------------------------------------------------------------
# paired statistics: method - reference in the same seed (same batches, same initial A)


def paired_stats(d: list[float]) -> dict | None:
    """{"n", "mean", "std", "low", "high", "wins"} of paired differences d, the interval
    mean ± T975[n − 2]·sd/√n (None under 2), wins #(d > 0); None without pairs.
    paired_stats([1, 2, 3])["low"] -> 2 − 4.303·1/√3 = −0.484"""
    if not d:
        return None
    n, mean = len(d), statistics.mean(d)
    std = statistics.stdev(d) if n > 1 else None
    half = None if std is None else T975[min(n - 1, 30) - 1] * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "low": None if half is None else mean - half,
            "high": None if half is None else mean + half, "wins": sum(x > 0 for x in d)}


def delta_stats(value: dict, method: str, ref: str) -> dict | None:
    """paired_stats of value[method, s] − value[ref, s] over the seeds holding both."""
    return paired_stats([v - value[ref, s] for (m, s), v in value.items()
                         if m == method and (ref, s) in value])


def shown(st: dict | None) -> list[str]:
    """"Δ ± std", "[low, high]" ("n/a" under 2 seeds) and "k of n" wins; "–" without a pair."""
    if st is None:
        return ["–"] * 3
    return [f"{st['mean']:+.2f}" + ("" if st["std"] is None else f" ± {st['std']:.2f}"),
            "n/a" if st["low"] is None else f"[{st['low']:+.2f}, {st['high']:+.2f}]",
            f"{st['wins']} of {st['n']}"]


def tables(cells: list[dict]) -> dict[str, dict]:
    """{"<task> on <device>": {"task", "cells", "value": {(method, seed): metric in %}}}."""
    out: dict = {}
    for c in cells:
        t = out.setdefault(f"{c['task']} on {c['device']}", {"task": c["task"], "cells": [],
                                                             "value": {}})
        t["cells"].append(c)
        t["value"][c["method"], c["seed"]] = 100 * c["metrics"][metric_of(c["task"])]
    return out


def table_verdict(value: dict, method: str) -> dict | None:
    """delta_stats vs lora of one table with its "verdict" and "why" (RULE)."""
    st, rnd = (delta_stats(value, method, ref) for ref in ("lora", score_method("random")))
    if st is None:
        return None
    if st["low"] is None:
        v, why = "undecided", f"{st['n']} paired seed, no interval"
    elif st["high"] < 0:
        v, why = "worse", "interval below 0"
    elif st["low"] <= 0:
        v, why = "level", "interval holds 0"
    elif rnd is None or rnd["low"] is None:
        v, why = "undecided", "gain, but no random control in 2 seeds to check it against"
    elif rnd["low"] > 0:
        v, why = "better", f"beats the random control by {' '.join(shown(rnd)[:2])}"
    else:
        v, why = "level", f"does not beat the random control ({' '.join(shown(rnd)[:2])})"
    return st | {"verdict": v, "why": why}


def verdicts(cells: list[dict]) -> dict:
    """Every method against uniform LoRA per table (task on device) and across tables (RULE),
    and the one-line verdict."""
    methods = list(dict.fromkeys([*METHODS, *PEERS, *(c["method"] for c in cells)]))
    out = {name: {"seeds": sum(m == "lora" for m, _ in t["value"]), "methods": {
        m: v for m in methods if m != "lora" and (v := table_verdict(t["value"], m))}}
        for name, t in tables(cells).items()}
    kinds, overall = ("better", "worse", "mixed", "level", "undecided"), {}
    for m in methods:
        if got := {t["methods"][m]["verdict"] for t in out.values() if m in t["methods"]}:
            overall[m] = "mixed" if {"better", "worse"} <= got else next(k for k in kinds
                                                                          if k in got)
    def at(m: str) -> str:  # which tables a better / worse / mixed verdict comes from
        hits = [t for t, r in out.items()
                if r["methods"].get(m, {}).get("verdict") in ("better", "worse")]
        return f"{m} ({', '.join(hits)})" if overall[m] in ("better", "worse", "mixed") else m
    named = {k: [at(m) for m, v in overall.items() if v == k] for k in kinds}
    where = ", ".join(f"{t} ({r['seeds']} seed{'s' * (r['seeds'] != 1)})" for t, r in out.items())
    line = "Verdict (generated from the cells' paired 95 % intervals): " + (
        f"better than uniform LoRA: {', '.join(named['better'])}" if named["better"] else
        "no method is better than uniform LoRA") + f" on {where or 'no cells'}" + "".join(
        f"; {k}: {', '.join(ms)}" for k, ms in named.items() if k != "better" and ms) + "."
    return {"tables": out, "methods": overall, "line": line}


# -----------------------------------------------------------------------------
# tables: one writer for every one (the grid's, the planted study's, SmolLM2's, the lrs)


def table(head: list[str], align: str, rows: list[list]) -> list[str]:
    """Markdown table lines, one align letter (l or r) per column.
    table(["a", "b"], "lr", [[1, 2]]) -> ["| a | b |", "|---|---:|", "| 1 | 2 |"]"""
    rule = "|".join("---:" if a == "r" else "---" for a in align)
    return [f"| {' | '.join(head)} |", f"|{rule}|",
            *(f"| {' | '.join(map(str, r))} |" for r in rows)]


def section(title: str, *blocks: str | list[str]) -> list[str]:
    """A page section: its title, then each block (a paragraph or table lines) after a blank.
    section("T", "text", ["| a |"]) -> ["", "## T", "", "text", "", "| a |"]"""
    return ["", f"## {title}", *(x for b in blocks for x in ["", *([b] if isinstance(b, str)
                                                                   else b)])]


def task_table(t: dict, verdict: dict) -> list[str]:
    """One task on one device: per method its seeds, mean ± std, each seed, the paired Δ vs
    lora with its interval and wins, the verdict, the paired Δ vs the random allocation, and
    its lr, trainable parameters and s/step."""
    value, rows, rnd = t["value"], [], score_method("random")
    seeds = sorted({s for _, s in value})
    for m in dict.fromkeys([*METHODS, *PEERS, *(m for m, _ in value)]):
        if not (got := [value[m, s] for s in seeds if (m, s) in value]):
            continue  # a method with no cell here (yet)
        mine, v = [c for c in t["cells"] if c["method"] == m], verdict.get(m)
        steps = [c["per_step"] for c in mine if c["per_step"]]
        mean = f"{got[0]:.2f}" if len(got) == 1 else \
            f"{statistics.mean(got):.2f} ± {statistics.stdev(got):.2f}"
        rows.append([m, f"{len(got)} of {len(seeds)}", mean,
                     ", ".join(f"{value[m, s]:.2f}" if (m, s) in value else "–" for s in seeds),
                     *shown(v), f"{v['verdict']} ({v['why']})" if v else "–",
                     shown(delta_stats(value, m, rnd))[0] if m != rnd else "–",
                     *(" / ".join(f"{x:{f}}" for x in sorted({c[k] for c in mine} - {None}))
                       or "–" for k, f in (("lr", "g"), ("params", ","))),
                     f"{statistics.mean(steps):.2f}" if steps else "–"])
    return table(["method", "seeds", f"{metric_of(t['task'])} (mean ± std)",
                  f"per seed ({', '.join(map(str, seeds))})", "paired Δ vs lora",
                  "95 % interval", "wins", "verdict", "Δ vs random", "lr", "trainable params",
                  "s/step"], "lrrlrlrlrrrr", rows)


def mean_ranks(cells: list[dict], task: str, method: str = "fim") -> tuple[dict, int]:
    """({matrix: mean rank over seeds}, seeds) of one method's cells on one task."""
    maps = [c["ranks"] for c in cells if (c["task"], c["method"]) == (task, method)
            and c["ranks"]]
    names = list(dict.fromkeys(n for m in maps for n in m))
    return {n: statistics.mean(m[n] for m in maps if n in m) for n in names}, len(maps)


def rank_svg(ranks: dict[str, float], title: str) -> str:
    """train.layer_table drawn as an SVG heatmap: a <rect> per matrix, darker = higher rank."""
    head, *lines = (x.split() for x in train.layer_table(ranks, "{:.3g}").splitlines())
    cols = head[1:] or ["matrix"]  # a matrix outside the layers ("name: v"): a row of its own
    rows = [(x[0][:-1].removesuffix(".dense"), x[1:]) if x[0].endswith(":") else
            (f"layer {x[0]}", x[1:]) for x in lines]
    W, H, X0, Y0 = 64, 24, 92, 44
    top = max(ranks.values(), default=1) or 1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{X0 + W * len(cols) + 8}" '
           f'height="{Y0 + H * len(rows) + 8}" font-family="sans-serif" font-size="11">',
           f'<text x="4" y="14" font-size="12">{escape(title)}</text>']
    out += [f'<text x="{X0 + W * j + W / 2}" y="{Y0 - 6}" text-anchor="middle">{escape(c)}'
            "</text>" for j, c in enumerate(cols)]
    for i, (label, values) in enumerate(rows):
        y = Y0 + H * i
        out.append(f'<text x="{X0 - 6}" y="{y + 16}" text-anchor="end">{escape(label)}</text>')
        for j, v in ((j, v) for j, v in enumerate(values) if v != "-"):
            t = float(v) / top
            fill = "#%02x%02x%02x" % tuple(round(255 + (c - 255) * t) for c in (33, 102, 172))
            out += [f'<rect x="{X0 + W * j}" y="{y}" width="{W - 2}" height="{H - 2}" '
                    f'fill="{fill}"/>', f'<text x="{X0 + W * j + W / 2 - 1}" y="{y + 15}" '
                    f'text-anchor="middle" fill="{"white" if t > 0.55 else "black"}">{v}</text>']
    return "\n".join(out + ["</svg>"]) + "\n"


def planted_lines(study: dict) -> list[str]:
    """The planted study's section (results/planted_study*.json from python -m study.planted)."""
    per, ratios = study["per_seed"], study["criterion_oracle_over_uniform"]
    best = "; ".join("/".join(map(str, min(s["oracle_search"], key=lambda t: t["final_loss"])[
        "planted_ranks"].values())) for s in per)
    runs = [[name, f"{r['loss_ratio']['mean']:.4f} ± {r['loss_ratio']['std']:.4f}",
             f"{r['vs_uniform']['mean']:.3f}", f"{r['gap_closed']['mean']:.2f}",
             f"{r['closes_half_gap_seeds']} of {len(ratios)}", f"{r['share_planted']['mean']:.2f}",
             f"{r['calibration_seconds']['mean']:.2f}",
             ", ".join(f"{s['runs'][name]['loss_ratio']:.4f}" for s in per)]
            for name, r in study["summary"].items()]
    finds = [[s, *(f"{v['mean']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}], {v['wins']} of "
                   f"{v['n']}" for v in (f["structure"], f["shuffled"])),
              "yes" if f["finds_plants"] else "no"] for s, f in study["finds"].items()]
    found = [s for s, f in study["finds"].items() if f["finds_plants"]]
    return section(
        f"Planted task (`python -m study.planted --plants {study['args']['plants']}`, "
        f"{len(ratios)} seeds, {study['args']['steps']} steps)",
        f"Criterion, stated before measuring: {study['criterion']}.",
        f"Searched oracle / uniform per seed: {', '.join(f'{r:.3f}' for r in ratios)} "
        f"(criterion {'holds' if study['criterion_held'] else 'does NOT hold'}); best "
        f"planted ranks per seed: {best}.",
        table(["allocation", "final / B=0 loss, mean ± std", "vs uniform", "gap closed",
               "closes ≥ 50 % of the gap", "share of rank on planted", "calibration s",
               "per seed"], "lrrrrrrl", runs),
        table(["score", "(structure − score) / uniform [95 %], wins",
               "(shuffled − score) / uniform [95 %], wins", "finds the plants"], "lrrl", finds),
        f"Scores that find the plants by the criterion: {', '.join(found) or 'none'}.")


def smollm2_lines(root: Path) -> list[str]:
    """SmolLM2 on SST-2 prompts: the grid's table of root/sst2/<method>-s<seed> (paired Δ vs
    lora), after the untrained model's accuracy (root/zeroshot)."""
    cells = read_root(root) if (root / "sst2").is_dir() else []
    zero = root / "zeroshot" / "results.json"
    note = (f"The untrained model (zero-shot): dev accuracy "
            f"{100 * read_result(zero)['metrics']['accuracy']:.2f} %." if zero.is_file() else "")
    return section("SmolLM2-135M-Instruct on SST-2 prompts (`results/smollm2/`)", note, *(
        task_table(t, {m: v for m, _ in t["value"] if m != "lora"
                        and (v := table_verdict(t["value"], m))})
        for t in tables(cells).values())) if cells else []


def lr_lines(root: Path) -> list[str]:
    """The chosen lr per method and task, beside its held-out metric at each lr in LRS."""
    res = lr_results(root)
    chosen = chosen_lrs(res)
    rows = [[t, m, *(f"{v[lr]:.4f}" if lr in v else "" for lr in LRS),
             f"{chosen[t][m]:g}" if m in chosen[t] else "(unfinished)"]
            for t, ms in res.items() for m, v in ms.items()]
    return section(f"Chosen lr per method and task (`{root.as_posix()}/`)", "Seed 0, the task "
                   "metric on 10 % of train.tsv held out (`--eval-fraction 0.1`, never dev.tsv); "
                   "ties go to the smaller lr.", table(["task", "method", *(f"{lr:g}" for lr in
                                                                             LRS), "chosen"],
                                                       "llrrrr", rows)) if rows else []


def results_page(cells: list[dict], v: dict, svgs: dict[str, str], out: Path,
                 lrs: Path | None = None, own: bool = False) -> str:
    """results/README.md: the verdict, a table and rank map per task on each device, links to
    the speed tables, the planted studies, SmolLM2 and the chosen lrs (cells in lrs)."""
    models = sorted({str(c["model"]) for c in cells if c["model"]}) or [RECIPE[1]]  # as run
    lines = ["# Results", "", f"_Generated by `python -m study.report` from {len(cells)} cells "
             f"({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC) and the JSON beside this page; "
             "do not edit by hand._", "", v["line"], "", RULE, "", "Recipe: `train.py --model "
             f"{' | '.join(models)} {GROUPED}` (length-grouped batches), each method at its "
             "chosen lr (below) when `results/lr/` holds one; each table says what its cells "
             "ran."]
    lines += ["", RETIRED] if own else []
    for name, t in tables(cells).items():
        roots = "`, `".join(sorted({f"{c['root']}/{t['task']}/" for c in t["cells"]}))
        svg, grouped = svgs.get(name), {c["grouped"] for c in t["cells"]}
        lines += section(f"{name} (`{roots}`)", "Length-grouped batches: " + (
            "in some cells" if len(grouped) > 1 else "yes" if True in grouped else "no") + ".",
            task_table(t, v["tables"][name]["methods"]), *(
            [f"![FIM-LoRA's ranks on {name}, layer × module]({svg})"] if svg else []))
    if speed := [f"[{n}]({n})" for n in ("bench.md", "bench_cuda.md") if (out / n).exists()]:
        lines += section(f"Speed: make bench's own tables, {', '.join(speed)}")
    for name in ("planted_study.json", "planted_study_anywhere.json"):
        lines += planted_lines(read_json(out / name)) if (out / name).exists() else []
    lines += smollm2_lines(out / "smollm2") + lr_lines(lrs or out / "lr")
    return "\n".join(x if x.startswith("|") else textwrap.fill(x, 100, break_on_hyphens=False)
                     for x in lines) + "\n"


def run_block(run: dict) -> list[str]:
    """What `make run` printed, from its results.json: the rank map and --compare's verdict."""
    ranks, c = run["ranks"], run.get("compare")
    budget = (f"{run['args']['r'] * len(ranks)} ranks" if run["args"].get("budget", "ranks")
              == "ranks" else "the parameters of uniform rank r")
    out = ["```", f"ranks (total {sum(ranks.values())}, budget {budget}; "
           f"{run.get('adapter_parameters', 0):,} adapter parameters):", train.layer_table(ranks)]
    if c:
        out += [f"final loss / loss at B = 0: this run {c['run']:.4f}, uniform LoRA "
                f"{c['uniform']:.4f}, oracle {c['oracle']:.4f} (same budget, same batches)",
                f"{c['method']} {'beat' if c['run'] < c['uniform'] else 'did not beat'} uniform "
                f"LoRA and closed {c['gap_closed']:.0%} of the uniform→oracle gap on this "
                "planted task (one seed)"]
    return out + ["```"]


def replace_block(text: str, name: str, lines: list[str], path: Path) -> str:
    """text with the lines between BLOCKS[name]'s markers replaced; ValueError without them."""
    start, end = BLOCKS[name]
    if not (start in text and end in text and text.index(start) < text.index(end)):
        raise ValueError(f"{path} lacks the markers {start} ... {end}: put them where the "
                         f"generated {name} block goes")
    return "\n".join([text[:text.index(start) + len(start)], *lines, text[text.index(end):]])


# -----------------------------------------------------------------------------
# writing: every file computed first (a damaged input writes nothing), then each atomically


MARKS = (b"_Generated by `python -m study.report`", b">FIM-LoRA ranks, ")  # page, rank map


def check_ours(path: Path, marks: tuple[bytes, ...] = MARKS) -> None:
    """ValueError if `path` cannot be written (a folder; no writable folder above it) or exists
    without one of `marks` (what the tool writes) in its first 400 bytes: checked before any
    work, the study's tools replace their own files, never a user's README.md or .json."""
    folder = next(p for p in path.absolute().parents if os.path.lexists(p))
    if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot be written (a folder, or no writable folder above it);"
                         " pass a file in a folder you can write")
    head = path.read_bytes()[:400] if path.is_file() else b""
    if path.exists() and not any(m in head for m in marks):
        raise ValueError(f"{path} exists and this tool did not write it: move it, or pass "
                         "another path (for the report: --root a folder of cells only)")


def write_report(root: Path, out: Path | None = None, readme: Path | None = None) -> dict:
    """The page and rank maps into `out` (results/ for the project's cells, else root) and, for
    the project's cells, README.md's two blocks. Returns the verdicts."""
    own = root.resolve() == CELLS.resolve()
    out, readme = out or (RESULTS if own else root), readme or (README if own else None)
    cells = read_root(root)
    v, files, svgs = verdicts(cells), {}, {}
    for name, t in tables(cells).items():
        ranks, n = mean_ranks(t["cells"], t["task"])
        if ranks:
            device = name.split(" on ")[1]
            svgs[name] = f"ranks_{t['task']}{'_cuda' * (device == 'cuda')}.svg"
            files[out / svgs[name]] = rank_svg(ranks, f"FIM-LoRA ranks, {t['task']} ({device}), "
                                                      f"mean of {n} seed{'s' * (n != 1)}")
    files[out / "README.md"] = results_page(cells, v, svgs, out, root.parent / "lr", own)
    if readme is not None:
        link = (out / "README.md").as_posix()
        text = replace_block(readme.read_text(), "results", [
            textwrap.fill(v["line"], 100, break_on_hyphens=False), "", "Every table, the rank "
            f"maps, the speed figures and the planted study: [{link}]({link})."], readme)
        run = out / "make_run" / "results.json"
        files[readme] = replace_block(text, "run", run_block(read_json(run)), readme) \
            if run.exists() else text
    for path in files.keys() - {readme}:  # README.md's blocks: replace_block checks them
        check_ours(path)
    out.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        atomic_write(path, lambda f, text=text: f.write(text.encode()))
    print(f"wrote {', '.join(p.as_posix() for p in files)}")
    return v


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=CELLS,
                   help="the cells' folder; one outside results/ gets its report inside it")
    a = p.parse_args(argv)
    if a.root.resolve() != CELLS.resolve():  # CELLS may be empty yet
        what = ("" if a.root.is_dir() and read_root(a.root) else "holds no cells" if
                a.root.is_dir() else "is not a folder" if a.root.exists() else "no such folder")
        if what:  # a report of 0 cells would say nothing, over a folder that was not a grid
            raise ValueError(f"--root {a.root}: {what}, no cells to report (<task>/<method>-"
                             f"s<seed>/results.json); pass the cells' folder ({CELLS})")
    return write_report(a.root)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
