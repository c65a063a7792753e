"""Evidence, side by side: `make results` (a method x task x seed grid, its summary and the README
section) and `make bench` (speed as ratios against transformers + PEFT, each against its goal).

    python bench.py --results                  # SST-2: lora fim fw da fim+da, seeds 0 1 2
    python bench.py --results --data-root ../shared/data/glue --peers peft-lora peft-eva
    python bench.py --results --dry-run        # the plan and its expected duration, no training
    python bench.py --readme                   # the README section from results/*.json alone
    python bench.py                            # make bench: results/bench.json and bench.md
    python bench.py --planted-study   # uniform vs oracle vs every FIM score, planted task
    python bench.py --planted-study --only-seed 0 --out p0.json   # ... one seed (parallel runs);
    python bench.py --planted-study --merge p0.json p1.json p2.json   # ... then one study
    python bench.py --peer peft-eva -- --model minilm --task sst2 --data-dir DIR --out OUT

Grid: every cell is one train.py run (a peer: `bench.py --peer`, the same recipe, batches and
initial weights on transformers + PEFT) in results/cells/<task>/<method>-s<seed>/ ("+" written
"_"): skipped once it holds results.json, resumed when it holds a checkpoint. The summary and the
README section are computed from whatever cells exist in --root (report_files says where they
go). Bench: every ratio is timed in one process on the same batches, as the median of
interleaved repeats, so load drift hits both sides alike.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple
from xml.sax.saxutils import escape

import torch
import torch.nn as nn
import torch.nn.functional as F

import fimlora
import runfolder
from data import glue
from lora import _atomic_write, add_lora, lora_layers, merge_lora
from models import load_model, model_path
from lora import read_regular
from models.checkpoint import is_decoder
import train
from train import write_json

TARGETS = ["query", "key", "value", "dense"]
RESULTS = Path("results")
CELLS = RESULTS / "cells"
README = Path("README.md")
MARKERS = ("<!-- results:start -->", "<!-- results:end -->")
METHODS = ("lora", "fim", "fw", "da", "fim+da")
PEERS = ("peft-lora", "peft-adalora", "peft-eva")
BUDGET_METHODS = ("fim-params", "fim+da-params")  # train.py --budget params
SEEDS = (0, 1, 2)
SST2 = Path("../shared/data/glue/SST-2")
RECIPE = ["--model", "minilm"]  # the rest is train.py's GLUE defaults (README: SST-2 with MiniLM)
OWN_ROOTS = ("cells", "cells_cuda")  # results/<these>: the project's grids, one report (README)
READ_LIMIT = 16 << 20  # bytes: a cell's results.json is kilobytes; a bigger file is not one
SEED_MAX = 2**32 - 1  # numpy's seed range (train.set_seed)
FIELDS = {"metrics": dict, "args": dict, "machine": dict, "versions": dict, "seconds": dict,
          "ranks": dict, "device": str, "commit": str}  # results.json / run.json field types
METRIC_RANGE = {"accuracy": (0, 1), "f1": (0, 1), "mcc": (-1, 1), "pearson": (-1, 1),
                "spearman": (-1, 1), "loss": (0, 1e12), "loss_ratio": (0, 1e12)}
BUSY_SECONDS = 900  # a cell claimed on another host and written this recently is busy
CLAIM = ".running"  # a cell's claim: {"host", "pid"} of the grid process training it
CHECKPOINTS = (train.CHECKPOINT, train.CHECKPOINT + ".old")  # a cell holding either resumes
STOP_GRACE = 30  # seconds a Ctrl-C'd cell gets to checkpoint before it is signalled itself
SECONDS_PER_STEP_GUESS = 1.1  # before any cell exists: SST-2 lora-s0 took 1.07 s/step, 1 thread
ADALORA_INIT = 1.5  # AdaLoRA starts at init_r = 1.5 r per matrix and prunes to r
EVA_RHO = 2.0  # EVA's rank redistribution bound: a matrix gets at most rho * r
EVA_BATCHES = 32  # calibration batches handed to PEFT's EVA, which cycles them to convergence


def batch_of(tok, n: int, tokens: int, gen: torch.Generator) -> dict:
    """n sentences that tokenize to exactly `tokens` ids ([CLS] ... [SEP]), labels 0/1."""
    words = ["the", "movie", "was", "not", "very", "good", "and", "i", "liked", "it"]
    idx = torch.randint(len(words), (n, 4 * tokens), generator=gen).tolist()
    b = tok.batch([" ".join(words[i] for i in row) for row in idx], max_len=tokens)
    b["labels"] = torch.randint(2, (n,), generator=gen)
    return b


def ours(m, b):
    return m(b["input_ids"], b["attention_mask"], b["token_type_ids"])


def hf(m, b):
    return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
             token_type_ids=b["token_type_ids"]).logits


# -----------------------------------------------------------------------------
# planted study: does an allocation earn its budget? (python bench.py --planted-study)

PLANTED_CRITERION = ("the task can judge allocation if the searched oracle (the best "
                     "allocation a small search over the planted matrices' ranks finds, the rest "
                     "of the rank budget spread evenly) ends at <= 0.5 x uniform LoRA's final "
                     "loss in every seed. A score finds the plants only if it beats both "
                     "data-free controls, the structure prior and its own shuffled ranks: over "
                     "the study's seeds (3 or more) the paired difference (control - score) / "
                     "uniform of final losses in the same seed has a 95 % t interval (n - 1 df) "
                     "entirely above 0")
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # t quantiles,
# df 1..10; beyond, 2.228 (conservative: the true quantile is smaller)
FIM_SCORES = ("efim", "variance", "per-example", "gradw", "kfac", "lorada", "random")


def score_method(score: str) -> str:
    """The grid method of an allocation score at the parameter budget (bench.py --scores):
    score_method("kfac") -> "fim-kfac-params"; efim, FIM-LoRA's default, is "fim-params"."""
    return "fim-params" if score == "efim" else f"fim-{score}-params"


def _planted_adapt(allocation: str | dict[str, int], record: dict, r_max: int):
    """train.main's `adapt` for one study run: uniform LoRA (add_adapters), then fixed ranks (a
    dict: an oracle candidate or a control) or a FIM allocation at the same budget, calibrated on
    train.py's calibration stream. What it allocated and how long that took go into `record`."""
    import itertools

    def adapt(task, args, device, rng):
        model = train.add_adapters(task, args, device, rng)
        layers = lora_layers(model)
        t0 = time.perf_counter()
        if isinstance(allocation, dict):
            train.resize_to(model, allocation, args, rng["init"])
        elif allocation != "uniform":
            score, _, unit = allocation.partition(" ")
            calib = list(itertools.islice(task.train_batches(rng["calib"]), args.calib_batches))
            kw = {"per_example": True} if score == "per-example" else {"score": score}
            if unit == "params":  # budget in parameters: a rank of m costs d_in + d_out
                costs = {n: m.in_features + m.out_features for n, m in layers.items()}
                scores = fimlora.fisher_scores(model, calib, task.loss_fn, **kw)["scores"]
                ranks = fimlora.allocate_ranks(scores, sum(args.r * c for c in costs.values()),
                                               1, r_max, costs=costs)
                train.resize_to(model, ranks, args, rng["init"])
            else:
                fimlora.initialize_fim_ranks(model, calib, task.loss_fn, r_max=r_max,
                                             generator=rng["init"], **kw)
        record["calibration_seconds"] = time.perf_counter() - t0
        record["ranks"] = {n: m.r for n, m in lora_layers(model).items()}
        return model
    return adapt


def beats(diffs: list[float]) -> dict:
    """Mean and 95 % t interval of paired differences (control - score) / uniform, and whether
    the interval lies above 0 (PLANTED_CRITERION). beats([0.2, 0.25, 0.3])["above_zero"] is True"""
    n, mean = len(diffs), statistics.mean(diffs)
    half = T975[min(n - 1, len(T975)) - 1] * statistics.stdev(diffs) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "above_zero": mean - half > 0,
            "wins": sum(d > 0 for d in diffs), "n": n}


def _available(score: str) -> bool:
    """Whether initialize_fim_ranks takes this score (fimlora.ALLOCATION_SCORES)."""
    return score == "per-example" or score in fimlora.ALLOCATION_SCORES


def planted_study(seeds: range | list[int], steps: int, threads: int, out: str,
                  plants: str = "reach", grid: tuple[int, ...] = (24, 20, 16),
                  step: int = 4) -> dict:
    """Per seed: uniform LoRA, the searched oracle (planted.search_oracle over `grid` and ± step),
    FIM-LoRA with every available score at the same rank budget (efim also at the same parameter
    budget), the structure prior and each score's shuffled ranks, on train.py's planted task
    (plants="anywhere": plants may land on any adapted matrix). Checks PLANTED_CRITERION:
    reports each run's final loss relative to uniform and the oracle, the share of the
    uniform -> oracle gap it closes, and whether each score beats both controls."""
    import subprocess

    from data import planted
    r_max = planted.PLANT_RANK  # the cap: any allocation can give a matrix its planted rank
    scores = [s for s in FIM_SCORES if _available(s)]
    skipped = [s for s in FIM_SCORES if s not in scores]
    per_seed: list[dict] = []
    seen: dict = {}
    for seed in seeds:
        rows: dict[str, dict] = {}

        def train_one(allocation: str | dict[str, int]) -> dict:
            record: dict = {}
            with tempfile.TemporaryDirectory() as tmp:
                args = train.parse_args(["--method", "lora", "--seed", str(seed), "--steps",
                                         str(steps), "--threads", str(threads), "--log-every",
                                         str(steps), "--out", tmp])
                args.plants = plants  # read by data/tasks.planted_task
                seen["lr"] = args.lr
                res = train.run(args, _planted_adapt(allocation, record, r_max))
            rec = planted.rank_recovery(record["ranks"], res["planted"])
            return {"final_loss": res["metrics"]["loss"],
                    "loss_ratio": res["metrics"]["loss_ratio"],
                    "share_planted": rec["share_planted"], "covered": rec["covered"],
                    "calibration_seconds": record["calibration_seconds"],
                    "training_seconds": res["seconds"]["training"], "ranks": record["ranks"],
                    "planted": res["planted"]}

        rows["uniform"] = train_one("uniform")
        truth, names = rows["uniform"].pop("planted"), list(rows["uniform"]["ranks"])
        budget = sum(rows["uniform"]["ranks"].values())
        trained: dict[tuple, dict] = {}

        def loss_of(ranks: dict[str, int]) -> float:
            trained[tuple(ranks.values())] = train_one(ranks)
            return trained[tuple(ranks.values())]["final_loss"]

        best, searched = planted.search_oracle(names, truth, budget, r_max, loss_of, grid, step)
        rows["oracle"] = trained[tuple(best.values())]
        for score in scores:
            rows[score] = train_one(score)
        rows["efim params"] = train_one("efim params")
        holders = [n for n in names if plants == "anywhere"
                   or not n.endswith(tuple("." + t for t in planted.UNREACHED))]
        rows["structure"] = train_one(planted.structure_ranks(names, holders, budget, 1, r_max))
        for i, score in enumerate(scores):  # the seed rule: planted.shuffle_generator
            g = planted.shuffle_generator(seed, FIM_SCORES.index(score))
            rows[f"shuffled {score}"] = train_one(planted.shuffled_ranks(rows[score]["ranks"], g))
        for row in rows.values():
            row.pop("planted", None)
        u, o = rows["uniform"]["final_loss"], rows["oracle"]["final_loss"]
        for row in rows.values():
            row["vs_uniform"] = row["final_loss"] / u
            row["vs_oracle"] = row["final_loss"] / o
            row["gap_closed"] = (u - row["final_loss"]) / (u - o) if u != o else float("nan")
        per_seed.append({"seed": seed, "planted": truth, "structure_holders": holders,
                         "oracle_search": searched, "runs": rows})
        print(f"seed {seed}: searched oracle / uniform = {o / u:.3f} ({len(searched)} "
              f"candidates; planted.oracle_ranks: {searched[0]['final_loss'] / u:.3f})",
              flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:
        commit = None
    result = {
        "what": f"planted task (data/planted.py defaults, plants: {plants}) on train.py's tiny "
                "encoder: final eval loss of each allocation at the same budget (r x matrices "
                "ranks; 'efim params': the same budget in parameters, a rank costing d_in + "
                "d_out)",
        "criterion": PLANTED_CRITERION,
        "fields": {"loss_ratio": "final eval loss / eval loss at B = 0",
                   "vs_uniform": "final loss / uniform LoRA's final loss, same seed",
                   "vs_oracle": "final loss / the searched oracle's final loss, same seed",
                   "gap_closed": "(uniform - run) / (uniform - oracle), same seed",
                   "share_planted": "share of the total rank on planted matrices "
                                    "(data/planted.rank_recovery)",
                   "covered": "planted matrices given at least their planted rank",
                   "calibration_seconds": "allocation time inside adapt (0 for uniform)",
                   "closes_half_gap_seeds": "seeds with gap_closed >= 0.5",
                   "oracle_search": "every candidate the oracle search trained: the planted "
                                    "matrices' ranks (the rest spread evenly) and its final "
                                    "loss; the first is planted.oracle_ranks; the oracle is the "
                                    "lowest, chosen on the eval set it is scored on",
                   "structure": "equal ranks on the matrices of types that can hold plants "
                                "(structure_holders), rank 1 elsewhere, the same rank budget",
                   "shuffled <score>": "the score's own ranks assigned to the matrices in a "
                                       "random order drawn from planted.shuffle_generator(seed, "
                                       "FIM_SCORES index): seeded 2**31 + 1000 seed + index, "
                                       "apart from every training stream (seed + k, k < 4)",
                   "finds": "per score, paired (control - score) / uniform over seeds: mean, "
                            "95 % t interval, wins; finds_plants when both intervals are > 0"},
        "design": {"plant_rank": planted.PLANT_RANK, "plant_effect": planted.PLANT_EFFECT,
                   "lr": seen["lr"],
                   "reach": planted.REACH if plants == "reach" else "inf (plants anywhere)",
                   "plants": plants, "n_planted": 3, "r": 8, "r_max": r_max,
                   "oracle_grid": list(grid), "oracle_step": step,
                   "oracle_search_size": f"at most {len(grid)} + 2 x 3 candidates per seed"},
        "args": {"seeds": len(per_seed), "steps": steps, "threads": threads, "plants": plants},
        "scores_run": scores, "scores_skipped": skipped,
        "versions": train.environment()["versions"] | {"commit": commit},
        "per_seed": per_seed,
    }
    if len(per_seed) >= 3:
        result = study_summary(result)
        print("\n".join(planted_markdown(result)))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"wrote {out}" + ("" if "summary" in result else " (a part: merge >= 3 seeds with "
                            "bench.py --planted-study --merge)"))
    return result


def study_summary(result: dict) -> dict:
    """The study with its summary over result["per_seed"] (>= 3 seeds): PLANTED_CRITERION's
    oracle / uniform ratios, each run's mean ± std, and per score `finds` (beats both controls).
    """
    per_seed = result["per_seed"]
    ratios = [s["runs"]["oracle"]["vs_uniform"] for s in per_seed]
    summary = {}
    for name in per_seed[0]["runs"]:
        col = {k: [s["runs"][name][k] for s in per_seed]
               for k in ("loss_ratio", "vs_uniform", "vs_oracle", "gap_closed", "share_planted",
                         "calibration_seconds")}
        summary[name] = {k: {"mean": statistics.mean(v),
                             "std": statistics.stdev(v) if len(v) > 1 else 0.0}
                         for k, v in col.items()}
        summary[name]["closes_half_gap_seeds"] = sum(g >= 0.5 for g in col["gap_closed"])

    def paired(control: str, score: str) -> dict:
        return beats([(s["runs"][control]["final_loss"] - s["runs"][score]["final_loss"])
                      / s["runs"]["uniform"]["final_loss"] for s in per_seed])

    finds = {}
    for score in result["scores_run"]:
        vs = {"structure": paired("structure", score),
              "shuffled": paired(f"shuffled {score}", score)}
        finds[score] = vs | {"finds_plants": all(v["above_zero"] for v in vs.values())}
    return result | {"criterion_oracle_over_uniform": ratios,
                     "criterion_held": all(r <= 0.5 for r in ratios), "finds": finds,
                     "summary": summary}


def merge_studies(parts: list[str], out: str) -> dict:
    """One study from parts run apart (--only-seed, e.g. in parallel processes): their seeds,
    in seed order, summarised as one study; the parts must share args and design."""
    studies = [read_json(p) for p in parts]
    keys = [(s["args"]["steps"], s["args"]["plants"], s["design"], s["scores_run"])
            for s in studies]
    if any(k != keys[0] for k in keys):
        raise ValueError(f"{parts}: the parts differ in steps, plants, design or scores; merge "
                         "parts of one study")
    per_seed = sorted((x for s in studies for x in s["per_seed"]), key=lambda x: x["seed"])
    seeds = [x["seed"] for x in per_seed]
    if len(set(seeds)) != len(seeds) or len(seeds) < 3:
        raise ValueError(f"{parts}: seeds {seeds}; merge >= 3 distinct seeds")
    result = study_summary(studies[0] | {"per_seed": per_seed,
                                         "args": studies[0]["args"] | {"seeds": len(seeds)}})
    print("\n".join(planted_markdown(result)))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"wrote {out}")
    return result


def planted_study_main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(description="planted study: uniform vs oracle vs FIM scores")
    p.add_argument("--planted-study", action="store_true", required=True)
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    p.add_argument("--steps", type=int, default=600, help="training steps per run")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    p.add_argument("--plants", choices=("reach", "anywhere"), default="reach",
                   help="reach: train.py's planted task (the reach rule keeps plants off query "
                        "and key); anywhere: plants may land on any adapted matrix")
    p.add_argument("--only-seed", type=int, default=None,
                   help="run this seed alone into a part file (--out), for --merge")
    p.add_argument("--merge", nargs="+", default=None, metavar="PART",
                   help="instead: merge part files (--only-seed runs) into --out")
    p.add_argument("--out", default="results/planted_study.json")
    a = p.parse_args(argv)
    if a.merge:
        return merge_studies(a.merge, a.out)
    if (a.seeds < 3 and a.only_seed is None) or a.steps < 1 or (a.only_seed or 0) < 0:
        raise ValueError(f"--seeds {a.seeds} / --steps {a.steps} / --only-seed {a.only_seed}: "
                         "use >= 3 seeds (a t interval over seeds needs them), >= 1 step and a "
                         "seed >= 0")
    seeds = range(a.seeds) if a.only_seed is None else [a.only_seed]
    return planted_study(seeds, a.steps, a.threads, a.out, a.plants)


class _HFCall(nn.Module):
    """train.py calls model(input_ids, attention_mask, token_type_ids) and reads logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).logits


def _hf_twin(task, args, device, rng) -> tuple[nn.Module, nn.Module]:
    """(our uniformly adapted model, transformers' model with our fresh classifier): adapting
    ours first makes every random draw happen as in train.py, so the data order, calibration
    batches and head are the ones our methods get."""
    import transformers

    ours_model = train.add_adapters(task, args, device, rng)
    hf_model = transformers.BertForSequenceClassification.from_pretrained(
        model_path(args.model), num_labels=ours_model.classifier.out_features)
    hf_model.classifier.load_state_dict(ours_model.classifier.state_dict())
    return ours_model, hf_model


def peft_adapt(task, args, device, rng) -> nn.Module:
    """train.main's `adapt` step on transformers + PEFT LoRA: the same head and every lora_A
    copied from ours, so the two runs differ only in the model and LoRA code."""
    import peft
    ours_model, hf_model = _hf_twin(task, args, device, rng)
    model = peft.get_peft_model(hf_model, peft.LoraConfig(
        r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, use_rslora=args.rslora,
        target_modules=args.targets.split(","), modules_to_save=list(task.heads)))
    layers = dict(ours_model.named_modules())
    with torch.no_grad():
        for n, m in model.base_model.model.named_modules():
            if isinstance(m, peft.tuners.lora.LoraLayer):
                m.lora_A["default"].weight.copy_(layers[n].lora_A)
    return _HFCall(model).to(device).train(task.train_mode)


def _eva_layer_inputs(layer_input, token_index, layer_name) -> torch.Tensor:
    """EVA's SVD rows of one layer: its non-padding tokens, or for the pooler, whose input is
    one (B, C) row per example, every row (PEFT's default assumes (B, T, C) inputs)."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    return x.contiguous() if x.ndim == 2 else x[token_index.T.unbind()]


def eva_adapt(task, args, device, rng, record: dict) -> nn.Module:
    """train.main's `adapt` step for PEFT's EVA (arXiv:2410.07170): A from the incremental SVD
    of the target layers' inputs on train.py's calibration stream (as many batches as EVA needs
    to converge), ranks redistributed within ρ = 2 at the budget r per matrix, B = 0. The head
    is ours; the time, batches used and ranks go into `record`."""
    import peft
    if args.batch_size < EVA_RHO * args.r:  # PEFT would cycle the batches forever
        raise ValueError(f"--batch-size {args.batch_size} < rho * r = {EVA_RHO * args.r:g}: "
                         "EVA's SVD of the pooler (one row per example) needs that many rows "
                         "per batch and never converges with fewer; raise --batch-size or "
                         "lower --r")
    _, hf_model = _hf_twin(task, args, device, rng)
    model = peft.get_peft_model(hf_model, peft.LoraConfig(
        r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
        target_modules=args.targets.split(","), modules_to_save=list(task.heads),
        init_lora_weights="eva",  # labels are one per row here, not per token: no label mask
        eva_config=peft.EvaConfig(rho=EVA_RHO, use_label_mask=False))).to(device)
    # PEFT cycles these until every layer's components converge (it needs a sized iterable)
    calib = [{k: v.to(device) for k, v in b.items()} for b in
             itertools.islice(task.train_batches(rng["calib"]), EVA_BATCHES)]
    t0 = time.perf_counter()
    peft.initialize_lora_eva_weights(model, calib, show_progress_bar=False,
                                     prepare_layer_inputs_fn=_eva_layer_inputs)
    record["calibration"] = time.perf_counter() - t0
    record["calibration_batches"] = len(calib)
    record["ranks"] = {re.sub(r"^base_model\.model\.", "", n): m.r["default"]
                       for n, m in model.named_modules()
                       if isinstance(m, peft.tuners.lora.LoraLayer)}
    return _HFCall(model).train(task.train_mode)


def adalora_train(argv: list[str]) -> dict:
    """train.py's recipe on transformers + PEFT AdaLoRA (arXiv:2303.10512) with the same final
    budget: init_r = 1.5 r pruned to target_r = r per matrix on average between tinit = 10 % and
    total_step − tfinal (tfinal = 20 %) of the steps, every deltaT = 10 steps.

    A small loop on train.py's pieces (parse_args, random streams, task, optimizer, schedule,
    batches, evaluate) rather than train.main: AdaLoRA needs update_and_allocate after
    optimizer.step and before zero_grad (it reads the gradients), and train.main's loop has no
    such point; a hook on the next forward would find the gradients already cleared. The loss is
    PEFT's own (cross-entropy + orth_reg_weight · orthogonality regulariser, added by AdaLoRA's
    forward when labels are passed); the logged loss is the cross-entropy alone, as train.py's.
    No checkpoints (AdaLoRA's allocator keeps its own importance EMAs): a stopped cell starts
    again."""
    if "--resume" in argv:
        raise ValueError("--resume: peft-adalora cells do not checkpoint; run the cell again "
                         "without --resume (and with --overwrite if its folder exists)")
    args = peer_args(argv, adalora=True)
    with runfolder.lock(Path(args.out)):  # one owner of --out, as train.run's cells
        train.check_out(args)  # recheck now that the folder is ours
        return _adalora_run(args)


def _adalora_run(args: argparse.Namespace) -> dict:
    """adalora_train with --out locked."""
    import peft

    if args.threads:
        torch.set_num_threads(args.threads)
    train.set_seed(args.seed)
    rng = train.random_streams(args.seed)
    device = train.resolve_device(args.device)
    task = train.build_task(args, device, rng)
    _, hf_model = _hf_twin(task, args, device, rng)
    config = peft.AdaLoraConfig(
        target_r=args.r, init_r=round(ADALORA_INIT * args.r), tinit=args.steps // 10,
        tfinal=args.steps // 5, deltaT=10, total_step=args.steps, lora_alpha=args.alpha,
        lora_dropout=args.dropout, target_modules=args.targets.split(","),
        modules_to_save=list(task.heads))
    model = peft.get_peft_model(hf_model, config).to(device).train(task.train_mode)
    opt, sched = train.make_optimizer(model, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)  # before AdaLoRA freezes pruned triplets
    batches, losses, seconds = task.train_batches(rng["data"]), [], 0.0
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        b = train.to_device(next(batches), device)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    token_type_ids=b["token_type_ids"], labels=b["labels"])
        out.loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        opt.step()
        model.base_model.update_and_allocate(step)
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(F.cross_entropy(out.logits.detach().float(), b["labels"]).item())
        seconds += time.perf_counter() - t0
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:,}/{args.steps:,} | loss {statistics.mean(losses[-50:]):.4g} "
                  f"| {seconds / step:.3f} s/step", flush=True)
    metrics = task.evaluate(_HFCall(model))
    print(f"eval: {metrics}")
    ranks = {re.sub(r"^base_model\.model\.|\.lora_E(\.default)?$", "", n): int(sum(mask))
             for n, mask in (config.rank_pattern or {}).items()}
    results = {"args": vars(args), "seed": args.seed, "device": str(device), "metrics": metrics,
               "train_loss": losses, "trainable_parameters": n_trainable,
               "seconds": {"calibration": 0.0, "training": seconds,
                           "per_step": seconds / args.steps},
               "ranks": ranks, "peer": "peft-adalora",
               "adalora": {k: getattr(config, k) for k in ("init_r", "target_r", "tinit",
                                                            "tfinal", "deltaT", "total_step",
                                                            "orth_reg_weight")}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out) / "results.json", results)
    return results


def peer_args(argv: list[str], adalora: bool = False) -> argparse.Namespace:
    """train.py's arguments of a peer cell, checked before any work: every train.py check, and
    a BERT encoder on a GLUE task (the peers build transformers' BertForSequenceClassification);
    with `adalora` (a peft-adalora cell), no --grad-accum."""
    args = train.parse_args(argv)
    if args.task == "planted" or args.model == "tiny" or is_decoder(args.model):
        raise ValueError(f"--model {args.model} --task {args.task}: the peers (transformers + "
                         "PEFT) train a BERT encoder on a GLUE task; use --model minilm (or an "
                         "HF BERT folder) with --task and --data-dir")
    if adalora and args.grad_accum > 1:  # its own loop: one batch per AdaLoRA step
        raise ValueError(f"--grad-accum {args.grad_accum}: peft-adalora trains one batch per "
                         "step; drop --grad-accum (or raise --batch-size instead)")
    return args


def peer_train(name: str, argv: list[str]) -> dict:
    """One peer cell: train.py's arguments `argv` run on transformers + PEFT (`name` in PEERS).
    peft-lora and peft-eva go through train.run (same loop, loss, optimizer, schedule and
    evaluation, checkpoints and --resume); what train.run cannot see (the peer, EVA's time and
    ranks) is added to its results before it writes them."""
    if name == "peft-adalora":
        return adalora_train(argv)
    args = peer_args(argv)
    record: dict = {}
    adapt = peft_adapt if name == "peft-lora" else (
        lambda task, args, device, rng: eva_adapt(task, args, device, rng, record))

    def finish(res: dict) -> None:  # train.run saves the results after this, under its lock
        res["peer"] = name
        if record:
            res["seconds"]["calibration"] = record["calibration"]
            res["ranks"], res["eva_batches"] = record["ranks"], record["calibration_batches"]
    try:  # train.main without its parse (done) and planted --compare
        return train.run(args, adapt, finish)
    except train.Interrupted as e:  # its resume command is this one, not train.py's
        raise train.Interrupted(str(e).replace(
            train.command("train.py", "--resume"),
            train.command("bench.py", "--peer", name, "--", "--resume")))


# -----------------------------------------------------------------------------
# make results: the grid, one train.py run per cell


class Cell(NamedTuple):
    task: str
    method: str  # a train.py method, a BUDGET_METHODS entry or a peer
    seed: int

    @property
    def folder(self) -> str:
        return f"{self.method.replace('+', '_')}-s{self.seed}"


def parse_folder(name: str) -> tuple[str, int] | None:
    """(method, seed) of a cell folder name.  parse_folder("fim_da-s2") -> ("fim+da", 2)"""
    m = re.fullmatch(r"(.+)-s([0-9]+)", name)  # ASCII digits: int() reads other scripts' too
    return (m.group(1).replace("_", "+"), int(m.group(2))) if m else None


def find_tasks(data_root: str | Path) -> dict[str, Path]:
    """{task: folder} for every standard GLUE folder under data_root that holds a train.tsv."""
    root = Path(data_root)
    return {task: root / spec.folder for task, spec in glue.TASKS.items()
            if (root / spec.folder / "train.tsv").is_file()}


def missing_peer(method: str) -> str | None:
    """Why a peer cannot run here (a package is not installed), or None."""
    if method not in PEERS:
        return None
    gone = [p for p in ("transformers", "peft") if importlib.util.find_spec(p) is None]
    return f"{' and '.join(gone)} not installed" if gone else None


def cell_command(cell: Cell, data_dir: Path, out: Path, threads: int, resume: bool,
                 extra: list[str] = ()) -> list[str]:
    """The command line of one cell: train.py (or bench.py --peer) with the recipe, or with
    `resume` its --resume from the checkpoint in `out` (peers checkpoint through train.run too,
    their trainable tensors by name)."""
    head = ([sys.executable, "bench.py", "--peer", cell.method, "--"] if cell.method in PEERS
            else [sys.executable, "train.py"])
    if resume:
        return [*head, "--resume", str(out), "--threads", str(threads)]
    run = [*RECIPE, "--task", cell.task, "--data-dir", str(data_dir), "--seed", str(cell.seed),
           "--threads", str(threads), "--log-every", "100", "--out", str(out), *extra]
    return [*head, *(["--method", "lora"] if cell.method in PEERS
                     else method_flags(cell.method)), *run]


def method_flags(method: str) -> list[str]:
    """train.py's flags for a grid method: "fim", "fim+da-params" (--budget params) or
    "fim-kfac-params" (an allocation score at the parameter budget, bench.py --results --scores).
    method_flags("fim-per-example-params") -> [--method fim --per-example --budget params]"""
    method, params = (method.removesuffix("-params"), True) if method.endswith("-params") else (
        method, False)
    method, _, score = method.partition("-")
    flags = ["--method", method]
    if score:
        flags += ["--per-example"] if score == "per-example" else ["--score", score]
    return flags + (["--budget", "params"] if params else [])


def busy(out: Path, now: float | None = None) -> bool:
    """Whether another live process trains this cell, by its claim (out/.running, written by
    claim): on this host, while the claiming grid or its cell's process lives; a claim from
    another host (a grid on a GPU machine sharing the folder) while something in the folder
    changed in the last BUSY_SECONDS (a checkpoint is saved four times a run). No claim: free,
    so a folder left by a killed run, or copied from another machine, is resumed rather than
    skipped."""
    if not (out / CLAIM).exists():
        return False
    try:
        owner = read_json(out / CLAIM, 4096)
    except ValueError:  # being written this instant (or not a claim)
        owner = {}
    owner = owner if isinstance(owner, dict) else {}
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        pids = [owner[k] for k in ("pid", "cell") if isinstance(owner.get(k), int)]
        return owner["pid"] != os.getpid() and any(map(pid_alive, pids))
    now = time.time() if now is None else now
    stamps = [p.stat().st_mtime for p in out.rglob("*")]
    return bool(stamps) and now - max(stamps) < BUSY_SECONDS


def pid_alive(pid: int) -> bool:
    if pid <= 0:  # kill(0 or -1, 0) would ask about a whole group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:  # a zombie (dead, not yet reaped by its new parent) answers kill too
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS)
        return True


def claim(out: Path) -> bool:
    """Take a cell for this process: create out/.running (exclusively) with host and pid. A stale
    claim (busy says no) is replaced. False when another live process holds it."""
    out.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(out / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if busy(out):
                return False
            (out / CLAIM).unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
        return True
    return False


def _dies_with_grid() -> Callable[[], None] | None:
    """A Popen preexec_fn by which the kernel sends the cell SIGTERM when the grid dies, even by
    kill -9 (Linux prctl PR_SET_PDEATHSIG): an orphan would train on while the next grid, seeing
    the dead grid's claim, starts a second trainer on the cell. train.py takes SIGTERM as a
    Ctrl-C: it checkpoints and exits. None off Linux (there only a grid that exits normally or
    by a signal Python sees stops its cell)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    prctl, grid = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != grid:  # the grid died before the prctl: no signal would come
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def run_subprocess(cmd: list[str], log: Path) -> int:
    """Run one cell, its output appended to log; returns the exit code. The cell's pid joins the
    grid's claim in log's folder (busy), and the cell never outlives the grid (_dies_with_grid;
    an error or signal here terminates it). On Ctrl-C the cell (which got the same signal from
    the terminal, being in the grid's process group) is given STOP_GRACE seconds to checkpoint
    and exit; one that did not get it (only this process was signalled) is sent SIGINT once."""
    print(" ".join(cmd), flush=True)
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=_dies_with_grid())
        try:
            if (log.parent / CLAIM).exists():
                write_json(log.parent / CLAIM, {"host": socket.gethostname(),
                                                "pid": os.getpid(), "cell": proc.pid})
            return proc.wait()
        except KeyboardInterrupt:
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
                proc.wait()
            raise
        finally:
            if proc.poll() is None:  # the grid is leaving on an error: its cell goes too
                proc.terminate()
                try:
                    proc.wait(timeout=STOP_GRACE)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def run_info(cell: Cell, threads: int, wall: float) -> dict:
    """Versions, machine and commit of a cell run (written next to its results.json)."""
    env = train.environment()
    versions = env["versions"]
    if cell.method in PEERS:  # read from the installed metadata: nothing to import
        from importlib.metadata import PackageNotFoundError, version
        for name in ("transformers", "peft"):
            try:
                versions[name] = version(name)
            except PackageNotFoundError:
                versions[name] = None
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip() or None
    return {"versions": versions, "commit": commit, "wall_seconds": wall,
            "machine": env["machine"] | ({"threads": threads} if threads else {})}


def run_grid(cells: list[Cell], data_dirs: dict[str, Path], root: Path, threads: int,
             run: Callable[[list[str], Path], int] = run_subprocess,
             extra: list[str] = ()) -> dict[str, list[Cell]]:
    """Run every cell that has no results.json, in order; a cell folder holding a checkpoint is
    resumed. A peer whose packages are missing is left blank. Returns the cells by outcome:
    done (skipped), ran, resumed, failed, missing, busy (claimed by another live process)."""
    outcome: dict[str, list[Cell]] = {k: [] for k in ("done", "ran", "resumed", "failed",
                                                       "missing", "busy")}
    for cell in cells:
        out = root / cell.task / cell.folder
        if (out / "results.json").exists():
            outcome["done"].append(cell)
            continue
        if missing_peer(cell.method):
            outcome["missing"].append(cell)
            continue
        if not claim(out):
            print(f"cell {cell.task} {cell.folder}: claimed by another live process "
                  f"({out / CLAIM}), left alone")
            outcome["busy"].append(cell)
            continue
        resume = any((out / name).is_dir() for name in CHECKPOINTS)
        t0 = time.perf_counter()
        log = out / "train.log"
        start = log.stat().st_size if log.is_file() else 0
        try:
            code = run(cell_command(cell, data_dirs[cell.task], out, threads, resume, extra), log)
        finally:
            (out / CLAIM).unlink(missing_ok=True)
        if code == 0 and (out / "results.json").exists():
            write_json(out / "run.json", run_info(cell, threads, time.perf_counter() - t0))
            outcome["resumed" if resume else "ran"].append(cell)
        elif code and in_use(log, start):  # train.py's own lock on its --out: a live trainer
            print(f"cell {cell.task} {cell.folder}: its folder is in use by another train.py "
                  f"(see {log}), left alone")
            outcome["busy"].append(cell)
        else:
            print(f"cell {cell.task} {cell.folder} failed (exit {code}): see {out / 'train.log'}")
            outcome["failed"].append(cell)
    return outcome


def in_use(log: Path, start: int) -> bool:
    """Whether the cell's output after byte `start` of log says its --out is in use (train.py
    refusing a folder that another live run holds: "--out X is in use by pid N")."""
    try:
        with open(log, "rb") as f:
            f.seek(max(start, os.fstat(f.fileno()).st_size - 65536))
            return re.search(rb"is in use by pid \d+", f.read(65536)) is not None
    except OSError:
        return False


def steps_left(out: Path, steps: int) -> int:
    """The steps a cell still has to train: fewer when its folder holds a checkpoint."""
    for name in CHECKPOINTS:  # meta.json only: read_checkpoint would load state.pt too
        try:
            return max(0, steps - int(read_json(out / name / train.META)["step"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return steps


def estimate_seconds(cell: Cell, known: list[dict], steps: int) -> tuple[float, bool]:
    """(expected seconds, measured?) of one cell: steps × the mean s/step of finished cells of
    the same task and method (else task, else any) plus their mean setup time."""
    for same in (lambda c: (c["task"], c["method"]) == (cell.task, cell.method),
                 lambda c: c["task"] == cell.task, lambda c: True):
        rows = [c for c in known if same(c) and c["seconds_per_step"]]
        if rows:
            setup = statistics.mean(c["setup_seconds"] or 0.0 for c in rows)
            return steps * statistics.mean(c["seconds_per_step"] for c in rows) + setup, True
    return steps * SECONDS_PER_STEP_GUESS, False


# -----------------------------------------------------------------------------
# make results: summary.json and the README section from whatever cells exist


def read_json(path: Path, limit: int = READ_LIMIT):
    """The JSON of a regular file of at most `limit` bytes: ValueError naming the file if it is
    a folder, FIFO or device (a link to /dev/zero), refused before a byte is read, or bigger;
    json.JSONDecodeError naming it if it is not JSON."""
    data = read_regular(path, limit)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # not JSON, not text, nested past the parser
        bad = e if isinstance(e, json.JSONDecodeError) else json.JSONDecodeError(str(e), "", 0)
        raise json.JSONDecodeError(f"{path} is not JSON ({bad.msg})", bad.doc, bad.pos) from None


def read_result(path: Path) -> dict:
    """A cell's results.json (or run.json) as a dict with a metrics dict and fields of the
    types train.py writes (FIELDS), or ValueError naming the file, the field and the fix."""
    fix = f"remove {path.parent} and run the grid again to redo that cell"
    try:
        res = read_json(path)
    except json.JSONDecodeError:  # not JSON, or not text
        res = None
    except ValueError as e:  # not a regular file, too big
        raise ValueError(f"{e}: {fix}") from None
    if not isinstance(res, dict) or (path.name == "results.json"
                                     and not isinstance(res.get("metrics"), dict)):
        raise ValueError(f"{path} is damaged (not a results object with metrics): {fix}")
    for key, kind in FIELDS.items():
        if res.get(key) is not None and not isinstance(res[key], kind):
            raise ValueError(f"{path} is damaged ({key} is a {type(res[key]).__name__}, not "
                             f"a {kind.__name__}): {fix}")
    return res


def checked(path: Path, field: str, value, low: float, high: float, integer: bool = False,
            optional: bool = True):
    """value if it is a number (not a bool) in [low, high] (or an optional None), else
    ValueError naming the cell file and the field: a report never shows what cannot be."""
    kinds = int if integer else (int, float)
    number = isinstance(value, kinds) and not isinstance(value, bool)
    if (value is None and optional) or (number and low <= value <= high):  # NaN fails too
        return value
    raise ValueError(f"{path} is damaged ({field} = {json.dumps(value)[:40]}, not a number in "
                     f"[{low:g}, {high:g}]): remove {path.parent} and run the grid again to "
                     "redo that cell")


def read_cell(path: Path, root_device: str, root: Path) -> dict:
    """The summary record of one cell's results.json (and run.json beside it), every field the
    report uses checked: ValueError naming the file and the field otherwise."""
    method, seed = parse_folder(path.parent.name)
    task = path.parent.parent.name
    if seed > SEED_MAX:
        raise ValueError(f"{path.parent}: seed {seed} is outside 0..{SEED_MAX} (numpy's seed "
                         "range, which train.py uses): rename or remove that folder")
    res = read_result(path)
    info = path.parent / "run.json"
    info = read_result(info) if info.exists() else {}
    metric = glue.task_spec(task).metrics[0] if task in glue.TASKS else "loss"
    if metric not in res["metrics"]:
        raise ValueError(f"{path} is damaged (its metrics have no {metric!r}, the {task} "
                         f"metric): remove {path.parent} and run the grid again to redo it")
    for name, v in res["metrics"].items():
        checked(path, f"metrics.{name}", v, *METRIC_RANGE.get(name, (-1e12, 1e12)),
                optional=False)
    seconds = res.get("seconds") or {}
    ranks = res.get("ranks") or {}
    for name, r in ranks.items():
        checked(path, f"ranks.{name}", r, 0, 1e6)
    machine = (info.get("machine") or {}) | (res.get("machine") or {})
    device = res.get("device") or root_device
    cuda = machine.get("cuda") or ""
    if not re.fullmatch(r"[a-z]+(:\d+)?", device) or not isinstance(cuda, str):
        raise ValueError(f"{path} is damaged (device {device!r} / machine.cuda): remove "
                         f"{path.parent} and run the grid again to redo that cell")
    return {
        "task": task, "method": method, "seed": seed, "device": device.split(":")[0],
        "root": root.as_posix(), "metrics": res["metrics"],
        "seconds_per_step": checked(path, "seconds.per_step", seconds.get("per_step"), 0, 1e9),
        "setup_seconds": checked(path, "seconds.calibration", seconds.get("calibration"), 0, 1e9),
        "trainable_parameters": checked(path, "trainable_parameters",
                                        res.get("trainable_parameters"), 0, 1e15, integer=True),
        "ranks": ranks, "versions": res.get("versions") or info.get("versions"),
        "machine": machine or {"platform": None, "cpus": None,
                               "threads": (res.get("args") or {}).get("threads")},
        "commit": res.get("commit") or info.get("commit")}


def read_cells(root: Path) -> list[dict]:
    """One record per <root>/<task>/<method>-s<seed>/results.json (read_cell)."""
    root_device = root.name.partition("_")[2] or "cpu"  # results/cells_cuda: cuda
    return [read_cell(path, root_device, root) for path in sorted(root.glob("*/*/results.json"))
            if parse_folder(path.parent.name) is not None]


def own_root(root: Path) -> bool:
    """Whether root is one of the project's own cells folders (OWN_ROOTS under results/)."""
    return root.resolve() in {(RESULTS / name).resolve() for name in OWN_ROOTS}


def cell_roots(root: Path) -> list[Path]:
    """The folders a report on root reads: exactly root, except for the project's own
    results/cells and results/cells_cuda (a grid run on a GPU), whose one report shows both
    devices, each in its own table. Any other sibling (a cells_backup copy) is never read."""
    if not own_root(root):
        return [root]
    return [RESULTS / n for n in OWN_ROOTS if (RESULTS / n).is_dir()
            or (RESULTS / n).resolve() == root.resolve()]


def summarize(root: Path, recipe: dict) -> dict:
    """Every cell of root's report (cell_roots) and the verdicts computed from them
    (verdicts); "root" is the folder a table without cells names (results/cells for the
    project's own)."""
    cells = [c for r in cell_roots(root) for c in read_cells(r)]
    return {"cells": cells, "recipe": recipe, "verdicts": verdicts(cells, method_order(
        recipe, cells)), "root": (CELLS if own_root(root) else root).as_posix(),
            "generated": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def method_order(recipe: dict, cells: list[dict]) -> list[str]:
    """The tables' method order: the recipe's, the peers, then any other cell's."""
    return list(dict.fromkeys([*recipe["methods"], *PEERS, *(c["method"] for c in cells)]))


def mean_std(xs: list[float], fmt: str = "{:.2f}") -> str:
    """"mean ± std" (sample std), or the one value.  mean_std([1, 2, 3]) -> "2.00 ± 1.00" """
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} ± {statistics.stdev(xs):.2f}"


def task_values(cells: list[dict], task: str) -> tuple[str, dict[tuple[str, int], float]]:
    """(metric, {(method, seed): metric in %}) of one task's cells; the metric is the task's
    first GLUE metric ("loss" elsewhere)."""
    metric = glue.task_spec(task).metrics[0] if task in glue.TASKS else "loss"
    return metric, {(c["method"], c["seed"]): 100 * c["metrics"][metric] for c in cells
                    if c["task"] == task and metric in c["metrics"]}


def paired(value: dict, method: str, ref: str, seeds=None) -> tuple[str, str]:
    """("mean ± std" of method − ref over the seeds holding both, "k of n" seeds won), or
    ("–", "–") when no seed holds both."""
    d = [v - value[ref, s] for (m, s), v in value.items() if m == method and (ref, s) in value
         and (seeds is None or s in seeds)]
    return (mean_std(d, "{:+.2f}"), f"{sum(x > 0 for x in d)} of {len(d)}") if d else ("–", "–")


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (0.5 <= p < 1) of Student's t with integer df >= 1, to 1e-12: bisection
    on P(|T| <= t) in closed form (Abramowitz & Stegun 26.7.3-4).  t_quantile(.975, 2) -> 4.3027"""
    def inside(t: float) -> float:
        th = math.atan(t / math.sqrt(df))
        c2, odd, total = math.cos(th) ** 2, df % 2, 0.0
        term = math.cos(th) if odd else 1.0
        for j in range((df - 1) // 2 if odd else df // 2):
            total += term
            term *= ((2 * j + 2) / (2 * j + 3) if odd else (2 * j + 1) / (2 * j + 2)) * c2
        return 2 / math.pi * (th + math.sin(th) * total) if odd else math.sin(th) * total
    lo, hi = 0.0, 1.0
    while inside(hi) < 2 * p - 1:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if inside(mid) < 2 * p - 1 else (lo, mid)
    return (lo + hi) / 2


def delta_stats(value: dict, method: str, ref: str, seeds=None) -> dict | None:
    """method − ref over the seeds holding both (same seed: same batches and initial A):
    {"n", "mean", "low", "high" (the 95 % Student t interval, None under 2 seeds), "wins"},
    or None when no seed holds both."""
    d = [v - value[ref, s] for (m, s), v in value.items() if m == method and (ref, s) in value
         and (seeds is None or s in seeds)]
    if not d:
        return None
    n, mean = len(d), statistics.mean(d)
    half = t_quantile(0.975, n - 1) * statistics.stdev(d) / math.sqrt(n) if n > 1 else None
    return {"n": n, "mean": mean, "low": None if half is None else mean - half,
            "high": None if half is None else mean + half, "wins": sum(x > 0 for x in d)}


def interval(st: dict | None) -> str:
    """"[low, high]" of delta_stats, "n/a" under 2 seeds, "–" without a pair."""
    return ("–" if st is None else "n/a" if st["low"] is None
            else f"[{st['low']:+.2f}, {st['high']:+.2f}]")


VERDICT_RULE = (
    "Rule (applied by bench.py, not by hand): per table, Δ = method − lora paired by seed (same "
    "batches and initial A), with a 95 % interval mean ± t(0.975, n − 1) · sd / √n over the n "
    "paired differences (Student t; no interval under 2 seeds). On a table a method is better "
    "when that interval lies above 0 and it also beats the random allocation control "
    "(fim-random-params; its paired Δ against that control has an interval above 0), worse when "
    "the interval lies below 0, level when the interval holds 0 or the gain does not beat the "
    "control, and undecided under 2 seeds or when the table has no control in 2 of its seeds to "
    "check a gain against. Across tables: better (worse) when better (worse) on one and worse "
    "(better) on none, mixed when both, else level when level on one, else undecided. Each "
    "device is its own table (bf16 on a GPU moves differences this small).")


def table_verdict(value: dict, method: str) -> dict | None:
    """delta_stats vs lora of one table, with "vs_random", "verdict" and "why" (VERDICT_RULE);
    None when no seed holds method and lora."""
    st = delta_stats(value, method, "lora")
    if st is None:
        return None
    rnd = delta_stats(value, method, score_method("random"))
    if st["low"] is None:
        v, why = "undecided", f"{st['n']} seed, no interval"
    elif st["high"] < 0:
        v, why = "worse", "interval below 0"
    elif st["low"] <= 0:
        v, why = "level", "interval holds 0"
    elif rnd is None or rnd["low"] is None:
        v, why = "undecided", "gain, but no random control in 2 seeds to check it against"
    elif rnd["low"] > 0:
        v, why = "better", f"beats the random control by {rnd['mean']:+.2f} {interval(rnd)}"
    else:
        v, why = "level", f"does not beat the random control ({rnd['mean']:+.2f} {interval(rnd)})"
    return st | {"vs_random": rnd, "verdict": v, "why": why}


def verdicts(cells: list[dict], methods: list[str]) -> dict:
    """Every method against uniform LoRA, per table (task on device) and across tables
    (VERDICT_RULE), and the README's one-line verdict, all from the cells."""
    tables, overall = {}, {}
    for task, device in dict.fromkeys((c["task"], c["device"]) for c in cells):
        _, value = task_values([c for c in cells if c["device"] == device], task)
        rows = {m: v for m in methods if m != "lora" and (v := table_verdict(value, m))}
        tables[f"{task} on {device}"] = {"seeds": sum(m == "lora" for m, _ in value),
                                         "methods": rows}
    for m in methods:
        got = {t: r["methods"][m] for t, r in tables.items() if m in r["methods"]}
        vs = {r["verdict"] for r in got.values()}
        v = ("mixed" if {"better", "worse"} <= vs else "better" if "better" in vs else "worse"
             if "worse" in vs else "level" if "level" in vs else "undecided")
        if got:
            overall[m] = {"verdict": v, "tables": got}
    named = {k: [m for m, o in overall.items() if o["verdict"] == k]
             for k in ("better", "mixed", "worse", "level", "undecided")}
    where = ", ".join(f"{t} ({r['seeds']} seeds)" for t, r in tables.items())
    line = "Verdict (generated from the intervals below): " + (
        f"better than uniform LoRA: {', '.join(named['better'])}" if named["better"] else
        "no method is better than uniform LoRA") + f" on {where or 'no cells'}" + "".join(
        f"; {k}: {', '.join(ms)}" for k, ms in named.items() if k != "better" and ms) + "."
    return {"tables": tables, "methods": overall, "line": line}


def verdict_markdown(v: dict) -> list[str]:
    """The verdict block: the rule, then one line per method with each table's Δ, interval,
    wins and verdict."""
    out = ["#### Verdict against uniform LoRA (generated)", "", VERDICT_RULE, ""]
    for m, o in v["methods"].items():
        out.append(f"- **{m}: {o['verdict']}** — " + "; ".join(
            f"{t}: Δ {r['mean']:+.2f} {interval(r)}, wins {r['wins']} of {r['n']}, "
            f"{r['verdict']} ({r['why']})" for t, r in o["tables"].items()))
    return out


def task_table(cells: list[dict], task: str, methods: list[str], seeds: list[int],
               notes: dict[str, str]) -> list[str]:
    """Markdown rows of one task (on one device: pass that device's cells): per method the
    mean ± std over seeds and each seed's value, the paired difference to uniform LoRA in the
    same seed with its 95 % interval (delta_stats) and the seeds it wins."""
    metric, value = task_values(cells, task)
    methods = [m for m in methods if m in notes or any(k[0] == m for k in value)
               or m in METHODS or m in PEERS]
    lines = [f"| method | {metric} (mean ± std) | per seed ({', '.join(map(str, seeds))}) "
             f"| paired Δ vs lora | 95 % interval | wins | trainable params | s/step |",
             "|---|---:|---|---:|---|---:|---:|---:|"]
    for method in methods:
        got = [value[method, s] for s in seeds if (method, s) in value]
        mine = [c for c in cells if (c["task"], c["method"]) == (task, method)
                and c["seed"] in seeds]
        per_seed = ", ".join(f"{value[method, s]:.2f}" if (method, s) in value else "–"
                             for s in seeds)
        head = mean_std(got) if got else "–"
        if len(got) < len(seeds):
            head += f" ({len(got)} of {len(seeds)} seeds)"
        if method in notes:
            head += f" ({notes[method]})"
        delta, wins = ("–", "–") if method == "lora" else paired(value, method, "lora", seeds)
        ci = "–" if method == "lora" else interval(delta_stats(value, method, "lora", seeds))
        params = sorted({c["trainable_parameters"] for c in mine
                         if c["trainable_parameters"] is not None})
        steps = [c["seconds_per_step"] for c in mine if c["seconds_per_step"]]
        lines.append(f"| {method} | {head} | {per_seed} | {delta} | {ci} | {wins} "
                     f"| {' / '.join(f'{p:,}' for p in params) or '–'} "
                     f"| {f'{statistics.mean(steps):.2f}' if steps else '–'} |")
    return lines


def mean_ranks(cells: list[dict], task: str, method: str = "fim") -> tuple[dict, int]:
    """({matrix: mean rank over seeds}, seeds) of one method's cells on one task."""
    maps = [c["ranks"] for c in cells if (c["task"], c["method"]) == (task, method)
            and c["ranks"]]
    names = list(dict.fromkeys(n for m in maps for n in m))
    return {n: statistics.mean(m[n] for m in maps if n in m) for n in names}, len(maps)


def rank_svg(ranks: dict[str, float], title: str) -> str:
    """A layer × module heatmap of per-matrix ranks as a self-contained SVG: one <rect> per
    matrix, darker = higher rank, the value written in it. Matrices outside `layer.N.` (the
    pooler) get a row of their own."""
    cells, rest = {}, []
    for name, v in ranks.items():
        m = re.search(r"layers?\.(\d+)\.(.+)$", name)
        if m:
            cells.setdefault(int(m.group(1)), {})[m.group(2)] = v
        else:
            rest.append((name, v))
    cols = list(dict.fromkeys(c for row in cells.values() for c in row)) or ["matrix"]
    rows = [(f"layer {k}", cells[k]) for k in sorted(cells)]
    rows += [(name.removesuffix(".dense"), {cols[0]: v}) for name, v in rest]
    short = [re.sub(r"attention\.self\.|\.dense$", "", c).replace("attention.output", "attn.out")
             for c in cols]
    W, H, X0, Y0 = 64, 24, 92, 44
    top = max(ranks.values(), default=1) or 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{X0 + W * len(cols) + 8}" '
             f'height="{Y0 + H * len(rows) + 8}" font-family="sans-serif" font-size="11">',
             f'<text x="4" y="14" font-size="12">{escape(title)}</text>']
    parts += [f'<text x="{X0 + W * j + W / 2}" y="{Y0 - 6}" text-anchor="middle">'
              f'{escape(s)}</text>' for j, s in enumerate(short)]
    for i, (label, row) in enumerate(rows):
        y = Y0 + H * i
        parts.append(f'<text x="{X0 - 6}" y="{y + 16}" text-anchor="end">{escape(label)}</text>')
        for j, col in enumerate(cols):
            if col not in row:
                continue
            v, t = row[col], row[col] / top
            fill = "#%02x%02x%02x" % tuple(round(255 + (c - 255) * t) for c in (33, 102, 172))
            ink = "white" if t > 0.55 else "black"
            parts += [f'<rect x="{X0 + W * j}" y="{y}" width="{W - 2}" height="{H - 2}" '
                      f'fill="{fill}"/>',
                      f'<text x="{X0 + W * j + W / 2 - 1}" y="{y + 15}" text-anchor="middle" '
                      f'fill="{ink}">{v:.3g}</text>']
    return "\n".join(parts + ["</svg>"]) + "\n"


def bench_table(bench: dict) -> list[str]:
    lines = ["| row | figure | goal | status | measured |", "|---|---:|---:|---|---|"]
    for r in bench["rows"]:
        status = "–" if r["met"] is None else "met" if r["met"] else "missed"
        goal = "–" if r["goal"] is None else f"≤ {r['goal']:g}{r['unit']}"
        lines.append(f"| {r['row']} | {r['figure']:.3g}{r['unit']} | {goal} | {status} "
                     f"| {r['detail']} |")
    same = [r["figure"] for r in bench["rows"] if r["row"].startswith("merged LoRA forward")]
    if same:  # merged weights: the same computation as the base forward, timed side by side
        lines += ["", "A merged LoRA forward is the base forward's computation (the weights "
                  f"differ, not the work), so its ratio, {', '.join(f'{x:.3f}×' for x in same)}, "
                  "shows this run's timing noise: read every ratio to about "
                  f"±{max(abs(x - 1) for x in same) * 100:.0f} %."]
    return lines


def results_markdown(summary: dict, bench: dict | None, svgs: dict[str, str],
                     bench_gpu: dict | None = None, source: str = "results/summary.json") -> str:
    """The README section: per task the grid table and the FIM rank map, then the bench table.
    Every number comes from summary (results/summary.json) or bench (results/bench.json)."""
    cells, recipe = summary["cells"], summary["recipe"]
    seeds = sorted(set(recipe["seeds"]) | {c["seed"] for c in cells})
    methods = method_order(recipe, cells)
    verdict = verdicts(cells, methods)  # from the cells, never a stale copy in summary
    out = [f"_Generated by `python bench.py --results` / `--readme` from {source} "
           f"({len(cells)} cells, {summary['generated']})"
           + (" and results/bench.json" if bench else "") + "; do not edit by hand._", "",
           f"Recipe: `python train.py --method M {' '.join(recipe['train_args'])} --task T "
           f"--data-dir D --seed S` (peers: `python bench.py --peer P -- ...`, the same batches, "
           "head and, for peft-lora, A). Values are dev-set percentages; a paired Δ is method − "
           "lora in the same seed; \"–\" is a cell not run yet. One seed decides nothing: read "
           "each Δ against its spread and its wins. s/step here is each cell's own training time "
           "on a shared machine (other jobs ran beside some cells): compare speed in the make "
           "bench table, where every row is timed side by side."
           + (f" peft-adalora's trainable parameters are counted at its start (init_r = "
              f"{ADALORA_INIT} × r per matrix); it prunes to r per matrix on average, the "
              "others' budget, by the end of its schedule."
              if any(c["method"] == "peft-adalora" for c in cells) else ""), "",
           verdict["line"] + " The rule and each method's intervals: the verdict block below "
           "the tables."]
    groups = list(dict.fromkeys([*((t, "cpu") for t in recipe["tasks"]),
                                 *((c["task"], c["device"]) for c in cells)]))
    for task, device in groups:
        mine = [c for c in cells if (c["task"], c["device"]) == (task, device)]
        roots = sorted({c["root"] for c in mine}) or [summary.get("root", "results/cells")]
        out += ["", f"#### {task} on {device} (`{'`, `'.join(f'{r}/{task}/' for r in roots)}`)",
                ""]
        if device == "cuda":
            out += [f"The same recipe on a GPU ({gpu_names(mine)}, bf16 autocast; `python "
                    "bench.py --results --root results/cells_cuda --budget params --scores ... "
                    "--peers ... -- --device cuda`), paired within this table only.", ""]
        out += task_table(mine, task, methods, seeds, recipe.get("notes", {}))
        lines = score_lines(mine, task)
        if lines:
            out += ["", *lines]
        key = svg_key(task, device)
        if key in svgs:
            _, n = mean_ranks(mine, task)
            out += ["", f"![FIM-LoRA ranks on {task}, {device}]({svgs[key]})", "",
                    f"FIM-LoRA's ranks on {task} ({device}), layer × module, mean over {n} seed"
                    f"{'s' * (n != 1)} ({svgs[key]})."]
    if verdict["methods"]:
        out += ["", *verdict_markdown(verdict)]
    if bench:
        out += ["", f"#### Speed, side by side in one process (`make bench`, "
                f"{bench['machine']['threads']} threads, median of {bench['repeats']} "
                "interleaved repeats)", ""]
        out += bench_table(bench)
        out += ["", *bench.get("notes", [])]
    if bench_gpu:
        out += ["", f"#### Speed on a GPU (`python bench.py --devices cuda --out "
                f"results/bench_cuda.json`, {bench_gpu['machine']['cuda']}, bf16 autocast, "
                f"torch {bench_gpu['versions']['torch']}, median of {bench_gpu['repeats']} "
                "interleaved repeats)", ""]
        out += bench_table(bench_gpu)
        out += ["", *bench_gpu.get("notes", [])]
    return "\n".join(line if line.startswith("|") else textwrap.fill(
        line, 100, break_on_hyphens=False) for line in out) + "\n"


def svg_key(task: str, device: str) -> str:
    """The rank map's name: ranks_sst2.svg on the CPU, ranks_sst2_cuda.svg on a GPU."""
    return task if device == "cpu" else f"{task}_{device}"


def gpu_names(cells: list[dict]) -> str:
    names = sorted({(c.get("machine") or {}).get("cuda") or "" for c in cells} - {""})
    return ", ".join(names) or "GPU"


def planted_markdown(study: dict) -> list[str]:
    """The planted-study table from results/planted_study.json (bench.py --planted-study)."""
    held = "holds" if study["criterion_held"] else "does NOT hold"
    ratios = ", ".join(f"{r:.3f}" for r in study["criterion_oracle_over_uniform"])
    seeds = len(study["criterion_oracle_over_uniform"])
    per = study["per_seed"]
    tried = [len(s["oracle_search"]) for s in per]
    first = ", ".join(f"{t[0]['final_loss'] / s['runs']['uniform']['final_loss']:.3f}"
                      for s in per for t in [s["oracle_search"]])
    best = "; ".join("/".join(str(r) for r in min(s["oracle_search"], key=lambda t: t[
        "final_loss"])["planted_ranks"].values()) for s in per)
    out = [f"#### Planted task: does an allocation put rank where the truth is? "
           f"(`python bench.py --planted-study --plants {study['args']['plants']}`, {seeds} "
           f"seeds, {study['args']['steps']} steps at lr {study['design']['lr']:g})",
           "", f"Criterion, stated before measuring: {study['criterion']}.", "",
           f"The oracle is searched: {min(tried)}"
           f"{f'–{max(tried)}' if max(tried) > min(tried) else ''} candidates per seed (planted "
           f"ranks on the grid {study['design']['oracle_grid']}, then ± "
           f"{study['design']['oracle_step']} per planted matrix, the rest spread evenly); best "
           f"planted ranks per seed: {best}; planted.oracle_ranks alone / uniform: {first}. "
           f"Searched oracle / uniform per seed: {ratios}, so the task criterion {held}.", "",
           "| allocation | final / B=0 loss, mean ± std | vs uniform | gap closed | closes "
           "≥ 50 % of the gap | share of rank on planted | calibration s | per seed |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, row in study["summary"].items():
        each = ", ".join(f"{s['runs'][name]['loss_ratio']:.4f}" for s in per)
        out.append(f"| {name} | {row['loss_ratio']['mean']:.4f} ± {row['loss_ratio']['std']:.4f}"
                   f" | {row['vs_uniform']['mean']:.3f} | {row['gap_closed']['mean']:.2f} | "
                   f"{row['closes_half_gap_seeds']} of {seeds} | "
                   f"{row['share_planted']['mean']:.2f} | "
                   f"{row['calibration_seconds']['mean']:.2f} | {each} |")
    out += ["", f"Does a score beat both data-free controls? (control − score) / uniform, mean "
            f"[95 % t interval] over {seeds} seeds, wins:", "",
            "| score | vs structure prior | vs its shuffled ranks | finds the plants |",
            "|---|---:|---:|---|"]
    for score, f in study["finds"].items():
        cells = [f"{v['mean']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}], {v['wins']} of {v['n']}"
                 for v in (f["structure"], f["shuffled"])]
        out.append(f"| {score} | {' | '.join(cells)} | {'yes' if f['finds_plants'] else 'no'} |")
    found = [s for s, f in study["finds"].items() if f["finds_plants"]]
    out += ["", f"Scores that find the plants by the criterion: {', '.join(found) or 'none'}."]
    return out


def score_lines(cells: list[dict], task: str) -> list[str]:
    """One device's allocation scores at the parameter budget against uniform LoRA and against
    the random allocation (the control every score must beat), paired by seed."""
    _, value = task_values(cells, task)
    rnd = score_method("random")
    scores = [s for s in FIM_SCORES if s != "random"
              and any(m == score_method(s) for m, _ in value)]
    if not scores:
        return []
    return [f"Allocation scores on {task} ({cells[0]['device']}) at the parameter budget, paired "
            "by seed with uniform LoRA and with the random allocation (the control a score must "
            "beat):", "", "| score | Δ vs lora | wins | Δ vs random | wins |",
            "|---|---:|---:|---:|---:|",
            f"| random | {' | '.join(paired(value, rnd, 'lora'))} | – | – |"] + [
        f"| {s} | {' | '.join(paired(value, score_method(s), 'lora'))} | "
        f"{' | '.join(paired(value, score_method(s), rnd))} |" for s in scores]


def smollm2_markdown(root: Path) -> list[str]:
    """SmolLM2 on SST-2 prompts from results/smollm2/<run>/results.json."""
    runs = [read_json(p) for p in sorted(root.glob("*/results.json"))]
    if not runs:
        return []
    out = ["#### SmolLM2-135M-Instruct on SST-2 prompts (`results/smollm2/`)", "",
           "| method | seed | steps × batch | dev accuracy | s/step | calibration s |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(runs, key=lambda r: (r["args"]["steps"] > 1, r["args"]["method"],
                                         r["args"]["seed"])):
        a = r["args"]
        name = "zero-shot (no training)" if a["steps"] == 1 and a["lr"] < 1e-9 else a["method"]
        out.append(f"| {name} | {a['seed']} | {a['steps']} × {a['batch_size']} | "
                   f"{100 * r['metrics']['accuracy']:.2f} | {r['seconds']['per_step']:.2f} | "
                   f"{r['seconds']['calibration']:.1f} |")
    return out


RUN_MARKERS = ("<!-- run:start -->", "<!-- run:end -->")


def replace_run_block(text: str, run: dict) -> str:
    """The README's opening block from make run's results.json: its rank map and verdict."""
    ranks = run["ranks"]
    args = argparse.Namespace(**{"budget": "ranks", **run["args"]})
    lines = [train.rank_header(ranks, run.get("adapter_parameters", 0), args),
             train.layer_table(ranks)]
    if "compare" in run:
        lines.append(train.compare_lines(run["compare"]))
    block = "\n".join(["```", *lines, "```"])
    i = text.index(RUN_MARKERS[0]) + len(RUN_MARKERS[0])
    return f"{text[:i]}\n{block}\n{text[text.index(RUN_MARKERS[1]):]}"


def replace_section(text: str, section: str) -> str:
    """text with everything between the two MARKERS replaced by section; without markers they
    are appended at the end (under a "## Results" heading unless that is the last section)."""
    start, end = MARKERS
    if start in text and end in text and text.index(start) < text.index(end):
        i, j = text.index(start) + len(start), text.index(end)
        return f"{text[:i]}\n{section.strip(chr(10))}\n{text[j:]}"
    headings = re.findall(r"^## .*$", text, re.M)
    head = "" if headings and headings[-1].strip() == "## Results" else "\n## Results\n"
    return f"{text.rstrip(chr(10))}\n{head}\n{start}\n{section.strip(chr(10))}\n{end}\n"


def write_text(path: Path, text: str) -> None:
    """Atomically (temp file, then rename): a kill mid-write never leaves half a README."""
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def write_files(files: dict[Path, str]) -> None:
    """Every file written whole to a temp file beside it first, then all renamed: a failure
    while writing (a full disk, a kill) leaves every old file as it was, so summary.json and the
    README never disagree."""
    tmps: dict[Path, str] = {}
    umask = os.umask(0)  # the only way to read it; restored at once
    os.umask(umask)
    try:
        for path, text in files.items():
            fd, tmps[path] = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                              suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmps[path], 0o666 & ~umask)
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def report_files(root: Path, recipe: dict | None, results: Path | None = None,
                 readme: Path | None = None) -> tuple[dict, dict[Path, str]]:
    """(summary, {path: text}) of the report on root, computed whole before anything is
    written. It belongs to root's folder: results/summary.json, the rank maps and README.md's
    section for the project's own cells (OWN_ROOTS), else root/summary.json, root/ranks_*.svg
    and root/README.md, so a grid elsewhere never rewrites the project's evidence. recipe None:
    the one in the summary already there, or the defaults."""
    own = own_root(root)
    results = results or (RESULTS if own else root)
    readme = readme or (README if own else root / "README.md")
    old = results / "summary.json"
    if recipe is None:
        prev = read_json(old) if old.exists() else {"recipe": default_recipe()}
        recipe = prev.get("recipe") if isinstance(prev, dict) else None
        if not isinstance(recipe, dict) or not all(
                isinstance(recipe.get(k), list) for k in ("train_args", "methods", "seeds",
                                                          "tasks")):
            raise ValueError(f"{old} has no valid recipe: run bench.py --results with the "
                             "grid's flags (and --dry-run) to write it again")
    summary = summarize(root, recipe)
    text = {old: json.dumps(train._finite(summary), indent=2, allow_nan=False) + "\n"}
    svgs = {}
    for task, device in dict.fromkeys((c["task"], c["device"]) for c in summary["cells"]):
        ranks, n = mean_ranks([c for c in summary["cells"] if c["device"] == device], task)
        if ranks:
            key = svg_key(task, device)
            path = results / f"ranks_{key}.svg"
            title = f"FIM-LoRA ranks, {task} ({device}), mean of {n} seed{'s' * (n != 1)}"
            text[path] = rank_svg(ranks, title)
            svgs[key] = path.as_posix()
    bench_path = results / "bench.json"
    bench = read_json(bench_path) if bench_path.exists() else None
    gpu_path = results / "bench_cuda.json"
    bench_gpu = read_json(gpu_path) if gpu_path.exists() else None
    section = results_markdown(summary, bench, svgs, bench_gpu, old.as_posix())
    extra: list[str] = []
    for study in ("planted_study.json", "planted_study_anywhere.json"):  # --plants reach, anywhere
        if (results / study).exists():
            extra += ([""] if extra else []) + planted_markdown(read_json(results / study))
    extra += [""] + smollm2_markdown(results / "smollm2")
    section += "\n" + "\n".join(line if line.startswith("|") else textwrap.fill(line, 100)
                                 for line in extra) + "\n"
    page = replace_section(readme.read_text() if readme.exists() else "", section)
    run = results / "make_run" / "results.json"
    if run.exists() and RUN_MARKERS[0] in page:  # the rank map and verdict make run prints
        page = replace_run_block(page, read_json(run))
    return summary, text | {readme: page}


def write_report(root: Path, recipe: dict | None, results: Path | None = None,
                 readme: Path | None = None) -> dict:
    """summary.json, the rank-map SVGs and the README section of root (report_files), all
    computed first, then written together."""
    summary, files = report_files(root, recipe, results, readme)
    next(iter(files)).parent.mkdir(parents=True, exist_ok=True)
    write_files(files)
    names = list(files)
    print(f"wrote {names[0]} ({len(summary['cells'])} cells), {len(names) - 2} rank map(s) "
          f"and the README section in {names[-1]}")
    return summary


def default_recipe(methods=METHODS, peers=(), seeds=SEEDS, tasks=("sst2",),
                   notes: dict | None = None, extra=()) -> dict:
    return {"train_args": [*RECIPE, *extra], "methods": list(methods), "peers": list(peers),
            "seeds": list(seeds), "tasks": list(tasks), "notes": notes or {}}


def train_has_flag(flag: str) -> bool:
    help_text = subprocess.run([sys.executable, "train.py", "--help"], capture_output=True,
                               text=True).stdout
    return flag in help_text


GRID_OWNED = ("--task", "--data-dir", "--seed", "--out", "--method", "--resume", "--overwrite",
              "--threads")  # train.py flags the grid sets per cell


def check_grid(a: argparse.Namespace,
               extra: list[str]) -> tuple[dict[str, Path], argparse.Namespace]:
    """The grid's {task: data folder} and the cells' train.py arguments (the recipe with `extra`),
    or ValueError naming the bad value and the fix, before any work or write. Repeated seeds
    count once."""
    bad = [s for s in a.seeds if not 0 <= s <= SEED_MAX]
    if bad:
        raise ValueError(f"--seeds {' '.join(map(str, bad))}: use seeds >= 0 and <= {SEED_MAX} "
                         "(numpy's seed range)")
    a.seeds = list(dict.fromkeys(a.seeds))
    if a.root.exists() and not a.root.is_dir():
        raise ValueError(f"--root {a.root} is a file: pass the cells' folder")
    if a.data_root:
        if not Path(a.data_root).is_dir():
            raise ValueError(f"--data-root {a.data_root}: no such folder; pass the folder that "
                             "holds the GLUE task folders (SST-2, CoLA, ...)")
        data_dirs = find_tasks(a.data_root)
        if not data_dirs:
            raise ValueError(f"--data-root {a.data_root} holds no standard GLUE folder with a "
                             f"train.tsv ({', '.join(s.folder for s in glue.TASKS.values())}); "
                             "pass the folder that holds them")
    else:
        data_dirs = {"sst2": SST2}
        if not a.dry_run and not (SST2 / "train.tsv").is_file():
            raise ValueError(f"{SST2 / 'train.tsv'} not found: pass --data-root with the GLUE "
                             "download (the folder holding SST-2/)")
    if a.tasks:
        unknown = sorted(set(a.tasks) - set(data_dirs))
        if unknown:
            raise ValueError(f"--tasks {' '.join(unknown)}: no such GLUE folder found "
                             f"(found: {', '.join(data_dirs) or 'none'}); check --data-root")
        data_dirs = {t: data_dirs[t] for t in a.tasks}
    owned = [f for f in extra if f.split("=")[0] in GRID_OWNED]
    if owned:
        raise ValueError(f"after '--': {' '.join(owned)} is set by the grid for each cell; use "
                         "--tasks, --data-root, --seeds, --methods, --root or --threads instead")
    task, folder = next(iter(data_dirs.items()))
    try:  # the cells' arguments, checked once here rather than failing in every cell
        argv = [*RECIPE, "--task", task, "--data-dir", str(folder),
                "--out", str(a.root / ".unwritten"), *extra]
        args = (peer_args(argv, "peft-adalora" in a.peers) if a.peers
                else train.parse_args(argv))
    except SystemExit:  # argparse printed the unknown or malformed flag
        raise ValueError(f"after '--': {' '.join(extra)} is not a valid train.py argument list "
                         f"(see {train.command('train.py', '--help')})") from None
    return data_dirs, args


RECIPE_KEYS = ("model", "r", "alpha", "rslora", "dropout", "targets", "steps", "epochs",
               "batch_size", "lr", "weight_decay", "warmup", "grad_clip", "max_len", "max_train",
               "max_eval", "grad_accum")  # what every method's cell shares: one recipe per
# cells folder. Not --data and its fields: the grid sets --task/--data-dir, which refuse --data.


def check_recipe(cells: list[Cell], root: Path, args: argparse.Namespace) -> None:
    """ValueError if a finished cell of the grid was trained with another recipe than `args`
    (the cells' train.py arguments): it would be skipped, and the table would mix recipes."""
    for c in cells:
        path = root / c.task / c.folder / "results.json"
        if not path.exists():
            continue
        saved = read_result(path).get("args") or {}
        keys = [k for k in RECIPE_KEYS if k in saved and not (k == "steps" and args.epochs)]
        diff = [f"--{k.replace('_', '-')} {saved[k]} there, {getattr(args, k)} here"
                for k in keys if saved[k] != getattr(args, k)]
        if diff:
            raise ValueError(f"{path.parent} was trained with another recipe ({'; '.join(diff)})"
                             f": give this recipe its own --root")


def results_main(a: argparse.Namespace, extra: list[str]) -> dict:
    """make results: plan the grid, print the expected duration, run it (unless --dry-run),
    then write summary.json, the rank maps and the README section."""
    data_dirs, cell_args = check_grid(a, extra)
    methods = list(a.methods)
    if a.budget == "params":
        if not train_has_flag("--budget"):
            raise ValueError("--budget params: train.py has no --budget flag yet (the "
                             "allocator's parameter-cost mode is not exposed); drop --budget")
        methods += [m for m in BUDGET_METHODS if m.removesuffix("-params") in methods]
    # each allocation score at the parameter budget (issue: scores side by side on SST-2)
    methods += [m for m in map(score_method, a.scores) if m not in methods]
    if not methods and not a.peers:
        raise ValueError("--methods given empty and no --scores or --peers: nothing to run; "
                         f"name methods ({' '.join(METHODS)}), scores or peers")
    notes = {p: why for p in a.peers if (why := missing_peer(p))}
    cells = [Cell(t, m, s) for t in data_dirs for m in [*methods, *a.peers] for s in a.seeds]
    check_recipe(cells, a.root, cell_args)
    known = read_cells(a.root)
    todo = [c for c in cells if not (a.root / c.task / c.folder / "results.json").exists()
            and c.method not in notes]
    taken = [c for c in todo if busy(a.root / c.task / c.folder)]
    steps = cell_args.steps or 1000  # under --epochs the steps are known once the data is read
    guesses = [estimate_seconds(c, known, steps_left(a.root / c.task / c.folder, steps))
               for c in todo]
    total = sum(s for s, _ in guesses)
    print(f"grid: {len(data_dirs)} task(s) ({', '.join(data_dirs)}) x {len(methods) + len(a.peers)}"
          f" methods x {len(a.seeds)} seeds = {len(cells)} cells; {len(cells) - len(todo)} "
          f"finished or blank, {len(todo)} to run")
    for p, why in notes.items():
        print(f"  {p}: {why}, left blank")
    for c in taken:
        print(f"  {c.task} {c.folder}: being written by another process, left alone")
    print(f"expected duration: {len(todo)} cells x ~{total / max(len(todo), 1) / 60:.0f} min = "
          f"{total / 3600:.1f} h at --threads {a.threads or 'default'} ("
          f"{sum(m for _, m in guesses)} of {len(todo)} estimates from measured cells, the rest "
          f"{SECONDS_PER_STEP_GUESS} s/step)", flush=True)
    if not a.dry_run and todo:
        outcome = run_grid(cells, data_dirs, a.root, a.threads, extra=extra)
        print(", ".join(f"{k} {len(v)}" for k, v in outcome.items()))
    recipe = default_recipe(methods, a.peers, a.seeds, list(data_dirs), notes, extra)
    return write_report(a.root, recipe)


# -----------------------------------------------------------------------------
# make bench: every figure a ratio measured side by side (or an absolute time with its goal)


def median_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
                 sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds of each fn over `repeats` interleaved rounds after `warmup` rounds, so
    drift and load hit every fn alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                samples[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in samples.items()}


def xent(call):
    return lambda m, b: F.cross_entropy(call(m, b), b["labels"])


def trainer(model: nn.Module, backward: Callable[[nn.Module, dict], None]):
    """step(batch): backward(model, batch), AdamW on the trainable parameters, zero_grad."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(batch: dict) -> None:
        backward(model, batch)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def plain(call=ours):
    return lambda m, b: xent(call)(m, b).backward()


def with_lora(base: nn.Module, r: int) -> nn.Module:
    model = copy.deepcopy(base)
    add_lora(model, TARGETS, r=r, alpha=2 * r, heads=["classifier"])
    return model.train()


def peft_lora(r: int, device) -> nn.Module:
    import peft
    import transformers
    model = transformers.BertForSequenceClassification.from_pretrained(
        model_path("minilm"), num_labels=2)
    return peft.get_peft_model(model, peft.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0,
        modules_to_save=["classifier"])).to(device).train()


def fw_backwards(model: nn.Module, batch: dict):
    """(warm-up backward, penalised backward) of FW-LoRA as train.fw_step runs them; the
    importances come from one tracked pass on `batch`."""
    state = {"ema": {}, "k": 0}

    def warm(m, b):
        state["k"] += 1
        with fimlora.fw_track(m) as sq:
            xent(ours)(m, b).backward()
        state["ema"] = fimlora.fw_update(state["ema"], sq, state["k"])

    probe = copy.deepcopy(model)
    warm(probe, batch)
    importance = fimlora.importances(state["ema"])

    def penalised(m, b):
        (xent(ours)(m, b) + fimlora.fw_penalty(m, importance, fw_lambda=1e-4)).backward()
    return warm, penalised


def needs_input_grad(model: nn.Module, batch: dict) -> bool:
    """Whether autograd will compute ∂L/∂(embedding output) in a train step of model."""
    seen = []
    hook = model.bert.embeddings.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    ours(model, batch)
    hook.remove()
    return seen[0]


def row(name: str, figure: float, goal: float | None, unit: str, detail: str) -> dict:
    return {"row": name, "figure": figure, "goal": goal, "unit": unit,
            "met": None if goal is None else figure <= goal, "detail": detail}


def step_rows(base, tok, a, device, gen) -> tuple[list[dict], dict]:
    """Train steps and forwards on MiniLM batches of a.batch_size x T (T = 64, 128)."""
    rows, info = [], {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    where = "" if device.type == "cpu" else f" ({device.type})"
    for T in (64, 128):
        b = {k: v.to(device) for k, v in batch_of(tok, a.batch_size, T, gen).items()}
        lora_m = with_lora(base, a.r).to(device)
        steps, forwards = {"lora": trainer(lora_m, plain())}, {}
        if not a.no_peers:
            steps["peft"] = trainer(peft_lora(a.r, device), plain(hf))
        if T == 64:
            full = copy.deepcopy(base).to(device).train()
            warm, penalised = fw_backwards(lora_m, b)
            steps |= {"full": trainer(full, plain()),
                      "fw warm-up": trainer(with_lora(base, a.r).to(device), warm),
                      "fw penalised": trainer(with_lora(base, a.r).to(device), penalised)}
            merged = with_lora(base, a.r).to(device).eval()
            with torch.no_grad():
                for layer in lora_layers(merged).values():
                    layer.lora_B.copy_(0.01 * torch.randn(layer.lora_B.shape, generator=gen))
            merge_lora(merged)
            plain_base = copy.deepcopy(base).to(device).eval()
            forwards = {"merged forward": lambda: torch.no_grad()(ours)(merged, b),
                             "base forward": lambda: torch.no_grad()(ours)(plain_base, b)}
            info["embedding_output_requires_grad"] = needs_input_grad(lora_m, b)
            if a.compile and device.type == "cpu":
                steps |= compiled_step(base, a.r, b, info)
        fns = {k: (lambda s=s: s(b)) for k, s in steps.items()} | forwards
        if T == 64:  # --fw-track-every 4: one tracked warm-up step, then three plain ones
            fns["fw warm-up every 4"] = lambda: [steps["fw warm-up"](b)] + [
                steps["lora"](b) for _ in range(3)]
        if device.type == "cuda":  # as train.py runs on CUDA: bf16 autocast, both sides alike
            fns = {k: torch.autocast("cuda", dtype=torch.bfloat16)(f) for k, f in fns.items()}
        t = median_times(fns, a.repeats, a.warmup, sync)
        if T == 64:
            info["aten_ops_per_step"] = {k: op_count(f) for k, f in fns.items()
                                         if k != "fw warm-up every 4"}
        size = f"{a.batch_size}×{T}"
        if "peft" in t:
            rows.append(row(f"LoRA train step, fimlora / transformers + PEFT, {size}{where}",
                            t["lora"] / t["peft"], 0.85, "×",
                            f"{t['lora']:.3f} s / {t['peft']:.3f} s"))
        if T == 64:
            rows += [
                row(f"LoRA train step / full fine-tune step (fimlora), {size}{where}",
                    t["lora"] / t["full"], 0.70, "×", f"{t['lora']:.3f} s / {t['full']:.3f} s"),
                row(f"merged LoRA forward / base forward (inference), {size}{where}",
                    t["merged forward"] / t["base forward"], 1.00, "×",
                    f"{t['merged forward']:.4f} s / {t['base forward']:.4f} s"),
                row(f"FW-LoRA warm-up step / LoRA step, {size}{where}",
                    t["fw warm-up"] / t["lora"], 1.05, "×",
                    f"{t['fw warm-up']:.3f} s / {t['lora']:.3f} s"),
                row(f"FW-LoRA warm-up step with --fw-track-every 4 (mean of 4) / LoRA step, "
                    f"{size}{where}", t["fw warm-up every 4"] / 4 / t["lora"], 1.05, "×",
                    f"{t['fw warm-up every 4'] / 4:.3f} s / {t['lora']:.3f} s"),
                row(f"FW-LoRA penalised step / LoRA step, {size}{where}",
                    t["fw penalised"] / t["lora"], 1.01, "×",
                    f"{t['fw penalised']:.3f} s / {t['lora']:.3f} s")]
            if "compiled" in t:
                rows.append(row(f"torch.compile LoRA train step / eager, {size}", t["compiled"]
                                / t["lora"], None, "×", f"{t['compiled']:.3f} s / {t['lora']:.3f}"
                                f" s (compiling took {info['compile_seconds']:.0f} s)"))
            info[f"seconds_{device.type}"] = t
    return rows, info


def op_count(fn: Callable[[], object]) -> int:
    """aten operators one call of fn dispatches (nested ones included): on a GPU each is about
    one kernel launch, which bounds a small model's step when the arithmetic is quick."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name.startswith("aten::") for e in prof.events())


def compiled_step(base, r: int, b: dict, info: dict) -> dict:
    """The LoRA train step through torch.compile (the model's forward and backward), compiled
    here so that its first-call cost is reported apart; {} with the error in info if it fails."""
    model = with_lora(base, r)
    compiled = torch.compile(model)
    step = trainer(model, lambda m, batch: xent(ours)(compiled, batch).backward())
    t0 = time.perf_counter()
    try:
        step(b)
    except Exception as e:  # no compiler, an unsupported op: report, do not fail the bench
        info["compile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        return {}
    info["compile_seconds"] = time.perf_counter() - t0
    return {"compiled": step}


def setup_rows(base, tok, a, train_rows) -> list[dict]:
    """FIM calibration (8 batches) and LoRA-DA init (256 samples) against the LoRA steps of the
    runs they precede, all on SST-2 batches from train.py's calibration stream."""
    calib = list(itertools.islice(glue.batches(train_rows, tok, 32, 128,
                                               torch.Generator().manual_seed(2)), 8))
    n = a.warmup + a.setup_repeats
    fim_models = [with_lora(base, a.r) for _ in range(n)]
    da_models = [with_lora(base, a.r) for _ in range(n)]
    step = trainer(with_lora(base, a.r), plain())
    fns = {"8 LoRA steps": lambda: [step(b) for b in calib],
           "fim": lambda: fimlora.initialize_fim_ranks(fim_models.pop(), calib, xent(ours),
                                                       n_batches=8),
           "da": lambda: fimlora.lorada_init(da_models.pop(), calib, xent(ours), n_samples=256,
                                             population_size=len(train_rows))}
    t = median_times(fns, a.setup_repeats, a.warmup)
    s = t["8 LoRA steps"] / 8
    epoch = -(-len(train_rows) // 32)
    return [row(f"FIM calibration (8 batches) / one SST-2 epoch ({epoch:,} LoRA steps)",
                100 * t["fim"] / (epoch * s), 1.0, " %",
                f"{t['fim']:.2f} s / ({epoch:,} × {s:.3f} s)"),
            row("LoRA-DA init (256 samples) / a 1,000-step run", 100 * t["da"] / (1000 * s),
                2.0, " %", f"{t['da']:.2f} s / (1,000 × {s:.3f} s)")]


def allocate_rows(repeats: int) -> list[dict]:
    rows = []
    for M, goal in ((10**4, 10.0), (10**5, 100.0)):
        g = torch.Generator().manual_seed(M)
        scores = {f"m{i}": s for i, s in enumerate(torch.rand(M, generator=g).tolist())}
        t = median_times({"a": lambda: fimlora.allocate_ranks(scores, 8 * M, 1, 16)}, repeats, 1)
        rows.append(row(f"allocate_ranks, {M:,} matrices (random scores, budget 8M, ranks 1–16)",
                        1000 * t["a"], goal, " ms", f"median of {repeats}"))
    return rows


def tokenize_rows(vocab: Path, sentences: list[str], repeats: int) -> list[dict]:
    """All SST-2 train rows: ours (a fresh tokenizer each repeat, so no memo carries over) vs
    transformers' BertTokenizerFast (Rust), the ids asserted identical."""
    import transformers

    from models.tokenizer import WordPieceTokenizer
    ids = {}

    def run_ours():
        tok = WordPieceTokenizer.from_file(vocab)
        ids["ours"] = [tok.encode(s)[0] for s in sentences]

    def run_hf():  # transformers 5 ignores vocab_file=: vocab= is the path
        ids["hf"] = transformers.BertTokenizerFast(vocab=str(vocab))(sentences)["input_ids"]
    t = median_times({"ours": run_ours, "hf": run_hf}, repeats, 0)
    if ids["ours"] != ids["hf"]:
        raise AssertionError("our WordPiece ids differ from BertTokenizerFast's on SST-2")
    return [row(f"tokenise all {len(sentences):,} SST-2 train rows, ours / BertTokenizerFast",
                t["ours"] / t["hf"], 0.5, "×", f"{t['ours']:.2f} s / {t['hf']:.2f} s, "
                "ids identical")]


def grouping_rows(base, tok, a, train_rows) -> list[dict]:
    """Padding and LoRA-step throughput with and without group_by_length on SST-2 batches."""
    rows, batches = [], {}
    for grouped in (False, True):
        epoch = glue.batches(train_rows, tok, 32, 128, torch.Generator().manual_seed(1),
                             group_by_length=grouped)
        batches[grouped] = list(itertools.islice(epoch, 100))
    pad = {g: 1 - sum(int(b["attention_mask"].sum()) for b in bs)
           / sum(b["attention_mask"].numel() for b in bs) for g, bs in batches.items()}
    step = trainer(with_lora(base, a.r), plain())
    few = {g: bs[:4] for g, bs in batches.items()}
    t = median_times({g: lambda g=g: [step(b) for b in few[g]] for g in few}, a.repeats, a.warmup)
    rate = {g: sum(int(b["attention_mask"].sum()) for b in few[g]) / t[g] for g in few}
    rows.append(row("padding fraction, group_by_length / plain batching (first 100 batches)",
                    pad[True] / pad[False], None, "×",
                    f"{100 * pad[True]:.1f} % / {100 * pad[False]:.1f} % padding"))
    rows.append(row("LoRA train-step tokens/s, group_by_length / plain (4 batches each)",
                    rate[True] / rate[False], None, "×",
                    f"{rate[True]:,.0f} / {rate[False]:,.0f} real tokens/s"))
    return rows


def bench_main(a: argparse.Namespace) -> dict:
    """make bench: every row, results/bench.json and bench.md, then the README section."""
    bad = [f"--{k.replace('_', '-')} {getattr(a, k)}: use >= {low}" for k, low in (
        ("repeats", 1), ("setup_repeats", 1), ("batch_size", 1), ("r", 1), ("warmup", 0))
        if getattr(a, k) < low]
    if bad:
        raise ValueError("; ".join(bad))
    devices = a.devices or ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    if "cuda" in devices and not torch.cuda.is_available():
        raise ValueError("--devices cuda but CUDA is not available: use --devices cpu")
    out = Path(a.out)
    folder = out.parent  # checked before minutes of timing, not when writing after them
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    why = None
    if out.is_dir():
        why = f"{out} is a folder"
    elif not folder.is_dir():
        why = f"{folder} is not a folder"
    elif not os.access(folder, os.W_OK | os.X_OK):
        why = f"{folder} is not writable for this user"
    if why:
        raise ValueError(f"--out {out}: cannot be written ({why}); pass a writable file path "
                         "such as results/bench.json")
    if out.parent.resolve() == RESULTS.resolve():  # its README section is written after
        report_files(CELLS, None)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    base, tok = load_model("minilm", num_labels=2, generator=gen)
    base.train()
    width = min((min(m.in_features, m.out_features) for n, m in base.named_modules()
                 if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS), default=a.r)
    if a.r > width:
        raise ValueError(f"--r {a.r} is above {width}, the smallest side of MiniLM's adapted "
                         f"matrices (its width): a rank cannot exceed it; use --r <= {width}")
    notes = []
    rows, info = step_rows(base, tok, a, torch.device("cpu"), gen) if "cpu" in devices else (
        [], {})
    if "cuda" in devices:
        cuda_rows, cuda_info = step_rows(base, tok, a, torch.device("cuda"), gen)
        rows += cuda_rows
        info |= {f"cuda_{k}": v for k, v in cuda_info.items()}
        info.setdefault("embedding_output_requires_grad",
                        cuda_info["embedding_output_requires_grad"])
    data = Path(a.sst2)
    if "cpu" not in devices:
        notes.append("GPU rows only (--devices cuda): the calibration, tokeniser, grouping and "
                     "allocation rows are CPU work, measured by the CPU bench.")
    elif (data / "train.tsv").is_file():
        train_rows = glue.load_glue("sst2", data, "train")
        rows += setup_rows(base, tok, a, train_rows)
        if not a.no_peers:
            rows += tokenize_rows(model_path("minilm") / "vocab.txt",
                                  [e.text_a for e in train_rows], a.setup_repeats)
        rows += grouping_rows(base, tok, a, train_rows)
    else:
        notes.append(f"{data} not found: no calibration-share, tokeniser or grouping rows.")
    if "cpu" in devices and not (Path(a.sst2).parent / "MRPC" / "train.tsv").is_file():
        notes.append("MRPC is not on disk, so grouping is measured on SST-2 only (short single "
                     "sentences: the smallest padding gain of the GLUE tasks).")
    if "cpu" in devices:
        rows += allocate_rows(a.setup_repeats)
    if info["embedding_output_requires_grad"]:
        notes.append("In a LoRA step the embedding output requires grad: autograd computes "
                     "∂L/∂x below the first adapted layer although nothing there trains.")
    else:
        notes.append("In a LoRA step the embedding output does not require grad, so autograd "
                     "already skips ∂L/∂x below the first adapted layer, and every frozen W0 "
                     "gets no weight-gradient GEMM.")
    for dev in devices:  # the CUDA rows' info keys carry a cuda_ prefix
        ops = info.get(f"{'cuda_' * (dev == 'cuda')}aten_ops_per_step")
        if ops:
            notes.append(f"aten operators dispatched per call on {dev} (32×64; on a GPU each is "
                         "about one kernel launch): " + ", ".join(f"{k} {v:,}"
                                                                   for k, v in ops.items()) + ".")
    if "compile_error" in info:
        notes.append(f"torch.compile failed: {info['compile_error']}")
    result = {"rows": rows, "info": info, "notes": notes, "repeats": a.repeats,
              "warmup": a.warmup, "setup_repeats": a.setup_repeats,
              **train.environment(),
              "generated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if not a.no_peers:
        import peft
        import transformers
        result["versions"] |= {"transformers": transformers.__version__,
                               "peft": peft.__version__}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    md = "\n".join(bench_table(result) + [""] + notes) + "\n"
    write_text(out.with_suffix(".md"), md)
    print(md)
    if out.parent.resolve() == RESULTS.resolve():  # the README reads results/bench*.json
        write_report(CELLS, None)
    else:
        print(f"README.md left alone: its tables read {RESULTS}/, not {out.parent}/")
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", action="store_true", help="make results: run the grid")
    p.add_argument("--readme", action="store_true",
                   help="only write summary.json and the README section from existing cells")
    p.add_argument("--planted-study", action="store_true",
                   help="instead: the planted study (its own flags: --seeds, --steps, --threads)")
    p.add_argument("--peer", choices=PEERS, default=None,
                   help="run one peer cell; train.py's arguments follow a '--'")
    p.add_argument("--peft-sst2", metavar="DATA_DIR", default=None,
                   help="instead: train.py's SST-2 recipe with transformers + PEFT (same batches "
                        "and initial weights) into runs/sst2-peft-s0; train.py arguments may "
                        "follow a '--'")
    g = p.add_argument_group("make results")
    g.add_argument("--data-root", default=None,
                   help="run every standard GLUE folder found here (default: SST-2 only, "
                        f"{SST2})")
    g.add_argument("--tasks", nargs="+", default=None, help="narrow the tasks, e.g. sst2 rte")
    g.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    g.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    g.add_argument("--peers", nargs="*", default=[], choices=PEERS)
    g.add_argument("--budget", choices=("ranks", "params"), default="ranks",
                   help="params: also FIM at an equal parameter budget (train.py --budget)")
    g.add_argument("--scores", nargs="+", default=[], choices=FIM_SCORES,
                   help="also FIM with each allocation score at the parameter budget "
                        "(cells fim-S-params; efim is fim-params)")
    g.add_argument("--root", type=Path, default=CELLS,
                   help="the cells' folder; its report goes beside the cells (root/summary."
                        "json, root/README.md), except for results/cells and results/cells_cuda "
                        "(a GPU grid), read together into results/ and README.md")
    g.add_argument("--dry-run", action="store_true", help="plan and summarise, train nothing")
    g = p.add_argument_group("make bench")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--r", type=int, default=8)
    g.add_argument("--repeats", type=int, default=5, help="interleaved repeats per step row")
    g.add_argument("--setup-repeats", type=int, default=3,
                   help="repeats of the slow rows (calibration, init, tokeniser, allocation)")
    g.add_argument("--warmup", type=int, default=1)
    g.add_argument("--compile", action="store_true", help="add the torch.compile row")
    g.add_argument("--no-peers", action="store_true", help="skip transformers / peft rows")
    g.add_argument("--sst2", default=str(SST2), help="SST-2 folder for the data rows")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    g.add_argument("--devices", nargs="+", choices=("cpu", "cuda"), default=None,
                   help="where to time the step rows (default: cpu, and cuda when present); "
                        "cuda alone skips the CPU-only rows: use --out results/bench_cuda.json")
    g.add_argument("--out", default=str(RESULTS / "bench.json"))
    argv = sys.argv[1:] if argv is None else argv
    if "--planted-study" in argv:
        return planted_study_main(argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    a = p.parse_args(argv[:len(argv) - len(rest) - bool(rest)])
    if a.threads < 0:  # every mode below hands it to torch or to the cells
        raise ValueError(f"--threads {a.threads}: use >= 0 (0 = torch's default)")
    if a.peer:
        return peer_train(a.peer, rest)
    if a.peft_sst2:
        return peer_train("peft-lora", ["--method", "lora", "--model", "minilm", "--task",
                                        "sst2", "--data-dir", a.peft_sst2, "--out",
                                        "runs/sst2-peft-s0", *rest])
    if a.results:
        return results_main(a, rest)
    if a.readme:
        if not a.root.is_dir():
            raise ValueError(f"--root {a.root}: no such folder, no cells to summarise; pass the "
                             "cells' folder (results/cells)")
        return write_report(a.root, None)
    return bench_main(a)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except (KeyboardInterrupt, train.Interrupted) as e:
        if "--peer" in sys.argv and isinstance(e, train.Interrupted):
            print(f"\n{e}", file=sys.stderr)  # a peer cell, stopped with its checkpoint
        elif "--results" in sys.argv:  # a grid cell's train.py checkpointed on the same Ctrl-C
            print("interrupted: finished cells are kept and an interrupted one resumes from its "
                  "checkpoint; run the same command again to go on", file=sys.stderr)
        else:  # the study's runs checkpoint into temp folders: nothing to resume
            print("interrupted: nothing was written (bench and study results are written at "
                  "the end)", file=sys.stderr)
        sys.exit(130)
