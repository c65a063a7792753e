"""The planted study: does an allocation earn its budget on a task with a known answer?

    python -m study.planted                           # 3 seeds, plants within reach
    python -m study.planted --plants anywhere --out results/planted_study_anywhere.json
"""

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fimlora
import runfolder
import train
from data import planted
from data.planted import oracle_ranks
from lora import lora_layers, name_matches
from study.report import SCORES, bounded, check_ours, paired_stats, planted_lines
from study.scores import shuffled

CRITERION = ("the task can judge allocation if the searched oracle (the best allocation a small "
             "search over the planted matrices' ranks finds, the rest of the rank budget spread "
             "evenly) ends at <= 0.5 x uniform LoRA's final loss in every seed. A score finds the "
             "plants only if it beats both data-free controls, the structure prior and its own "
             "shuffled ranks: over the study's seeds (3 or more) the paired difference (control "
             "- score) / uniform of final losses in the same seed has a 95 % t interval (n - 1 "
             "df) entirely above 0")
# Shuffled controls draw from 2**31 + 1000·seed + i: under 2**32, since the CPU generator keeps a
# seed's low 32 bits, and apart from the training streams seed + k, k < 4 (train.random_streams)
SHUFFLE_SEED = 2**31
STUDIED = SCORES[:7]  # all but "shuffled", the real-task control: here each score gets its own
GRID, STEP = (24, 20, 16), 4  # the oracle search: planted ranks on GRID, then ± STEP each


def structure_ranks(names: list[str], holders: list[str], budget: int, r_min: int = 1,
                    r_max: int | None = None) -> dict[str, int]:
    """The structure prior, a data-free control: r_min outside `holders` (the matrices that can
    hold plants), the rest of the budget evenly on the holders (the extra ranks to the first).
    structure_ranks(["q", "v", "o"], ["v", "o"], budget=9) == {"q": 1, "v": 4, "o": 4}"""
    holders = [n for n in names if n in set(holders)]
    left = budget - r_min * (len(names) - len(holders))
    if not holders or not r_min * len(holders) <= left <= (r_max or left) * len(holders):
        raise ValueError(f"budget={budget} cannot give {len(holders)} holders of {len(names)} "
                         f"matrices equal ranks in [{r_min}, {r_max}] with r_min={r_min} "
                         "elsewhere: pass holders among names and a budget within the bounds")
    share, extra = divmod(left, len(holders))
    return {n: share + (holders.index(n) < extra) if n in holders else r_min for n in names}


def shuffle_generator(seed: int, index: int) -> torch.Generator:
    """The stream of score `index`'s shuffled control in study seed `seed`."""
    if not 0 <= index < 1000 or not 0 <= seed < 2**20:
        raise ValueError(f"seed={seed}, index={index}: use 0 <= seed < 2**20, 0 <= index < 1000")
    return torch.Generator().manual_seed(SHUFFLE_SEED + 1000 * seed + index)


def search_oracle(names: list[str], truth: dict[str, int], budget: int, cap: int, loss_of,
                  grid=GRID, step: int = STEP) -> tuple[dict[str, int], list[dict]]:
    """(best ranks, every candidate tried) of a small search knowing the truth: the planted
    matrices at each k in `grid` (within [1, cap], the rest of the budget spread evenly by
    oracle_ranks), then ± step per planted matrix from the best; `loss_of` trains one."""
    tried: list[dict] = []

    def attempt(fixed: dict[str, int]) -> float:
        if old := [t["final_loss"] for t in tried if t["planted_ranks"] == fixed]:
            return old[0]
        try:
            if not all(1 <= r <= cap for r in fixed.values()):
                return math.inf
            ranks = oracle_ranks(names, fixed, budget)
        except ValueError:  # not enough budget left for the others
            return math.inf
        tried.append({"planted_ranks": dict(fixed), "final_loss": loss_of(ranks)})
        return tried[-1]["final_loss"]

    best = min(({n: k for n in truth} for k in grid), key=attempt)
    if not tried:
        raise ValueError(f"grid {list(grid)}: no candidate fits cap={cap} and budget={budget}")
    for n in truth:
        for d in (-step, step):
            if attempt(fixed := best | {n: best[n] + d}) < attempt(best):
                best = fixed
                break
    return oracle_ranks(names, best, budget), tried


def train_one(seed: int, steps: int, threads: int, plants: str, allocation) -> dict:
    """One planted run: `allocation` None (uniform), fixed ranks, or (score, budget unit)."""
    from study.scores import score_adapt
    record: dict = {}

    def fixed(task, args, device, rng):  # uniform LoRA, then the ranks at the base scale
        model, t0 = train.add_adapters(task, args, device, rng), time.perf_counter()
        if allocation is not None:
            fimlora.resize_ranks(model, allocation, generator=rng["init"])
        record.update(seconds=time.perf_counter() - t0,
                      ranks={n: m.r for n, m in lora_layers(model).items()})
        return model
    adapt = (score_adapt(*allocation, planted.PLANT_RANK, record)
             if isinstance(allocation, tuple) else fixed)
    with tempfile.TemporaryDirectory() as tmp:
        res = train.run(train.parse_args([
            "--method", "lora", "--seed", str(seed), "--steps", str(steps), "--threads",
            str(threads), "--log-every", str(steps), "--plants", plants, "--out", tmp]), adapt)
    rec = planted.rank_recovery(record["ranks"], res["planted"])
    return {"final_loss": res["metrics"]["loss"], "loss_ratio": res["metrics"]["loss_ratio"],
            "share_planted": rec["share_planted"], "covered": rec["covered"],
            "calibration_seconds": record["seconds"],
            "training_seconds": res["seconds"]["training"], "ranks": record["ranks"],
            "planted": res["planted"]}


def study_seed(seed: int, steps: int, threads: int, plants: str) -> dict:
    """Every run of one seed, each with vs_uniform, vs_oracle and gap_closed."""
    def run(allocation) -> dict:
        return train_one(seed, steps, threads, plants, allocation)
    rows = {"uniform": run(None)}
    truth, names = rows["uniform"]["planted"], list(rows["uniform"]["ranks"])
    budget, trained = sum(rows["uniform"]["ranks"].values()), {}

    def loss_of(ranks: dict[str, int]) -> float:
        trained[tuple(ranks.values())] = run(ranks)
        return trained[tuple(ranks.values())]["final_loss"]
    best, searched = search_oracle(names, truth, budget, planted.PLANT_RANK, loss_of)
    rows["oracle"] = trained[tuple(best.values())]
    rows |= {s: run((s, "ranks")) for s in STUDIED}
    rows["efim params"] = run(("efim", "params"))
    holders = [n for n in names if plants == "anywhere"
               or not any(name_matches(n, t) for t in planted.UNREACHED)]
    rows["structure"] = run(structure_ranks(names, holders, budget, 1, planted.PLANT_RANK))
    for i, s in enumerate(STUDIED):
        rows[f"shuffled {s}"] = run(shuffled(rows[s]["ranks"], None, planted.PLANT_RANK,
                                             shuffle_generator(seed, i)))
    u, o = rows["uniform"]["final_loss"], rows["oracle"]["final_loss"]
    for row in rows.values():
        row.pop("planted", None)
        row |= {"vs_uniform": row["final_loss"] / u, "vs_oracle": row["final_loss"] / o,
                "gap_closed": (u - row["final_loss"]) / (u - o) if u != o else float("nan")}
    print(f"seed {seed}: searched oracle / uniform = {o / u:.3f} ({len(searched)} candidates; "
          f"planted.oracle_ranks: {searched[0]['final_loss'] / u:.3f})", flush=True)
    return {"seed": seed, "planted": truth, "structure_holders": holders,
            "oracle_search": searched, "runs": rows}


def summary(study: dict) -> dict:
    """The study with CRITERION's ratios, each run's mean ± std and per score `finds`."""
    per = study["per_seed"]
    ratios = [s["runs"]["oracle"]["vs_uniform"] for s in per]
    table = {}
    for name in per[0]["runs"]:
        cols = {k: [s["runs"][name][k] for s in per] for k in (
            "loss_ratio", "vs_uniform", "vs_oracle", "gap_closed", "share_planted",
            "calibration_seconds")}
        table[name] = {k: {"mean": st["mean"], "std": st["std"] or 0.0}
                       for k, v in cols.items() for st in [paired_stats(v)]}
        table[name]["closes_half_gap_seeds"] = sum(g >= 0.5 for g in cols["gap_closed"])

    def beats(control: str, score: str) -> dict:  # (control − score) / uniform, paired
        st = paired_stats([(s["runs"][control]["final_loss"] - s["runs"][score]["final_loss"])
                           / s["runs"]["uniform"]["final_loss"] for s in per])
        return st | {"above_zero": st["low"] is not None and st["low"] > 0}
    finds = {}
    for s in study["scores_run"]:
        vs = {"structure": beats("structure", s), "shuffled": beats(f"shuffled {s}", s)}
        finds[s] = vs | {"finds_plants": all(v["above_zero"] for v in vs.values())}
    return study | {"criterion_oracle_over_uniform": ratios, "finds": finds, "summary": table,
                    "criterion_held": all(r <= 0.5 for r in ratios)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", nargs="+", type=bounded(0, 2**20 - 1), default=[0, 1, 2],
                   help="3 or more for the criterion's t interval")
    p.add_argument("--steps", type=bounded(1, 10**9), default=600, help="steps per run")
    p.add_argument("--threads", type=bounded(0, 1024), default=1, help="CPU threads per run")
    p.add_argument("--plants", choices=("reach", "anywhere"), default="reach",
                   help="train.py --plants: reach keeps plants off query and key")
    p.add_argument("--out", default="results/planted_study.json")
    a = p.parse_args(argv)
    check_ours(Path(a.out), (b'{\n  "what": "',))  # a study's JSON, never a user's file
    print(f"criterion, stated before running: {CRITERION}", flush=True)
    per = [study_seed(s, a.steps, a.threads, a.plants) for s in dict.fromkeys(a.seeds)]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
    design = {"plant_rank": planted.PLANT_RANK, "plant_effect": planted.PLANT_EFFECT,
              "lr": train.parse_args(["--out", "unused"]).lr, "plants": a.plants,
              "reach": planted.REACH if a.plants == "reach" else "inf (plants anywhere)",
              "r": 8, "r_max": planted.PLANT_RANK, "oracle_grid": list(GRID), "oracle_step": STEP}
    study = {
        "what": f"final eval loss of each allocation at the same budget on train.py's planted "
                f"task (plants: {a.plants}); 'efim params': the budget in parameters",
        "criterion": CRITERION, "design": design, "scores_run": list(STUDIED),
        "args": {"seeds": len(per), "steps": a.steps, "threads": a.threads, "plants": a.plants},
        "versions": train.environment()["versions"] | {"commit": commit}, "per_seed": per}
    if len(per) >= 3:
        study = summary(study)
        print("\n".join(planted_lines(study)))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    runfolder.write_json(a.out, study)
    print(f"wrote {a.out}" + ("" if "summary" in study else " (no summary under 3 seeds)"))
    return study


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")
    except (KeyboardInterrupt, train.Interrupted):  # runs checkpoint in temp folders: no resume
        print("interrupted: nothing was written (the study writes its JSON at the end)",
              file=sys.stderr, flush=True)
        sys.stdout.flush()  # os._exit: with sys.exit(130), 1 Ctrl-C in 4 during setup still
        os._exit(130)  # ended in death by SIGINT (-2) under `python -m` (CPython's exit path)
