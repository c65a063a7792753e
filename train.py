"""Fine-tune a model with plain LoRA or a Fisher-guided variant, evaluate, save.

    python train.py --method fim                                  # embedded planted task, ~20 s
    python train.py --method lora --model minilm --task sst2 --data-dir ../shared/data/glue/SST-2
    python train.py --model smollm2 --task sst2 --data-dir ...     # a decoder on GLUE prompts
    python train.py --resume runs/sst2-lora-s0                     # continue from the checkpoint
    torchrun --standalone --nproc_per_node 2 train.py ...          # one process per device

Methods: lora (uniform rank r), fim (FIM-LoRA rank allocation at equal budget), fw (FW-LoRA
penalty after a Fisher warm-up), da (LoRA-DA initialisation), fim+da (both). main() reads as
args → seed → device → data → model → method → loop → eval → save; everything that defines a run
is an argument, and the results JSON stores all of them with the seed. Runs checkpoint as they
go, resume bitwise, and never replace a finished run unless asked (--overwrite).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import itertools
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import fimlora
from data import glue, planted
from data.tasks import Task, causal_task, data_task, glue_task, planted_task
from data.tasks import to_device  # noqa: F401  (bench.py's AdaLoRA loop uses train.to_device)
from lora import (_atomic_write, add_lora, lora_layers, open_regular, read_regular, resize_lora,
                  save_adapter)
from models import model_path
from models.checkpoint import is_decoder
import runfolder
from runfolder import CHECKPOINT, META, PUBLISHED, STATE, tidy_out  # noqa: F401 (bench, tests)

METHODS = ("lora", "fim", "fw", "da", "fim+da")
GLUE_TASKS = tuple(glue.TASKS)
DEFAULT_TARGETS = {"planted": "query,key,value,output.dense,intermediate.dense",
                   "glue": "query,key,value,dense",
                   "decoder": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"}


EXAMPLES = """examples:
  python train.py --method fim                       # the embedded planted task, ~20 s
  python train.py --method fim --compare             # ... and how it compares with uniform LoRA
  python train.py --model minilm --task sst2 --data-dir ../shared/data/glue/SST-2 --method fw
  python train.py --model smollm2 --task sst2 --data-dir DIR --method fim+da
  python train.py --resume runs/sst2-minilm-fim-s0   # continue a run from its checkpoint
"""
# the methods that read each method-specific flag: given explicitly to another method it would
# do nothing, so parse_args refuses it
METHOD_FLAGS = {("fim", "fim+da"): ("calib_batches", "score", "per_example", "budget", "r_min",
                                    "r_max", "power"),
                ("fw",): ("fw_warmup", "fw_track_every", "fw_lambda", "fw_norm"),
                ("da", "fim+da"): ("da_samples", "da_beta", "da_gamma")}
MAX_SCALE = 1e6  # alpha/r above this overflows the forward once B is nonzero
MAX_LR = 1e15  # two factors of an update this size in one product near float32's 3.4e38
MAX_BATCH = 2**16  # examples per batch: far above any recipe, far below what memory holds
PLANTED_EXAMPLES = 2**16  # the planted task's "training set" for calibration caps (it is endless)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default once: appended unless the help text already states it or
    there is none to show (None, a switch's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text \
                or action.default is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def command(*argv: str | os.PathLike) -> str:
    """A command line for a message, runnable as printed: the interpreter running now ("python"
    when that is the one on PATH, e.g. in an activated venv)."""
    on_path = shutil.which("python")
    python = "python" if on_path and os.path.abspath(on_path) == sys.executable else \
        sys.executable
    return shlex.join([python, *map(str, argv)])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n")[0],
                                epilog=EXAMPLES.replace("python train.py", command("train.py")),
                                formatter_class=HelpFormatter)
    p.add_argument("--method", default="lora", choices=METHODS,
                   help="lora: uniform rank r | fim: FIM-LoRA ranks at equal budget | fw: FW-LoRA "
                        "penalty after a Fisher warm-up | da: LoRA-DA init | fim+da: both")
    p.add_argument("--model", default="tiny",
                   help="encoders: tiny | minilm | path to an HF BERT folder; "
                        "decoders (GLUE as prompts): tiny-llama | smollm2 | path to an HF "
                        "llama / mistral / qwen2 folder")
    p.add_argument("--task", default="planted", choices=("planted",) + GLUE_TASKS,
                   help="planted: the embedded synthetic task with a known answer; else a GLUE "
                        "task (needs --data-dir)")
    p.add_argument("--data-dir", default=None, help="GLUE task folder with train.tsv and dev.tsv")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="your own .csv/.tsv/.jsonl file instead of --task/--data-dir: text + "
                        "label rows to classify, or prompt + completion rows (decoders)")
    p.add_argument("--eval-data", default=None, metavar="FILE",
                   help="evaluate on this file instead of holding out --eval-fraction of --data")
    p.add_argument("--eval-fraction", type=float, default=0.1,
                   help="share of --data held out for evaluation without --eval-data, drawn "
                        "from --seed")
    p.add_argument("--text-field", default=None,
                   help="--data's text column (unset: text, else sentence)")
    p.add_argument("--pair-field", default=None, help="--data's second text column, for pairs")
    p.add_argument("--label-field", default="label", help="--data's class column (str or int)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--r", type=int, default=8, help="base rank (FIM keeps the budget r x matrices)")
    g.add_argument("--alpha", type=float, default=16.0,
                   help="LoRA scale numerator: ΔW = (alpha/r)·B·A")
    g.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter input")
    g.add_argument("--targets", default=None,
                   help="comma-separated Linear name suffixes (default: query,key,value,dense "
                        "for GLUE encoders; q/k/v/o and MLP projections for decoders; the six "
                        "per-block matrices for planted)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default 1000 GLUE, 600 planted)")
    g.add_argument("--epochs", type=float, default=None,
                   help="passes over the training set, instead of --steps")
    g.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 5e-4 GLUE, 5e-3 planted)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay on matrices")
    g.add_argument("--warmup", type=float, default=0.06, help="linear warm-up, fraction of steps")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm (0 = off)")
    g.add_argument("--max-len", type=int, default=128, help="max tokens per example")
    g.add_argument("--max-train", type=int, default=None,
                   help="use the first N training rows (default: all)")
    g.add_argument("--max-eval", type=int, default=None,
                   help="use the first N dev rows (default: all)")
    g.add_argument("--eval-every", type=int, default=0, help="steps between evals (0 = at end)")
    g.add_argument("--log-every", type=int, default=50,
                   help="steps between log lines (printed and in <out>/log.jsonl)")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches of --batch-size per optimizer step: the update of one "
                        "batch of N x batch-size (each step consumes N batches)")
    g = p.add_argument_group("Fisher methods (fim: only with --method fim or fim+da; fw: fw; "
                             "da: da or fim+da)")
    g.add_argument("--calib-batches", type=int, default=8,
                   help="fim: calibration batches (at most one pass over the data)")
    g.add_argument("--score", default="efim", choices=("efim", "variance"),
                   help="fim: FIM-LoRA's scores efim | variance (the paper); the alternatives "
                        "run through study/scores.py's score_adapt")
    g.add_argument("--per-example", action="store_true",
                   help="fim: per-example (true) empirical Fisher")
    g.add_argument("--budget", default="ranks", choices=("ranks", "params"),
                   help="fim: r x matrices ranks, or as many parameters as uniform r "
                        "(a rank of a matrix costs d_in + d_out)")
    g.add_argument("--r-min", type=int, default=1, help="fim: smallest rank of a matrix")
    g.add_argument("--r-max", type=int, default=None,
                   help="fim: largest rank of a matrix (default 2r)")
    g.add_argument("--power", type=float, default=1.0,
                   help="fim: ranks proportional to score**power")
    g.add_argument("--fw-warmup", type=int, default=500,
                   help="fw: warm-up steps K (at most half of --steps)")
    g.add_argument("--fw-track-every", type=int, default=1,
                   help="fw: track ‖∂L/∂W‖² every k-th warm-up step (1 = exact; k > 1 costs "
                        "about 1/k of the extra weight-gradient GEMMs, EMA factor β^k)")
    g.add_argument("--fw-lambda", type=float, default=1e-4, help="fw: penalty weight λ")
    g.add_argument("--fw-norm", default="sum", choices=("sum", "max"),
                   help="fw: importances normalised by their sum or their max")
    g.add_argument("--da-samples", type=int, default=256,
                   help="da: calibration examples (at most the training set)")
    g.add_argument("--da-beta", type=float, default=0.03, help="da: the paper's β")
    g.add_argument("--da-gamma", type=float, default=1024.0, help="da: the paper's γ")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds everything: data order, init, calibration")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda when available (bf16 autocast), else cpu (fp32)")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads (0 = torch default; at most 4 x the CPUs)")
    g.add_argument("--out", default=None,
                   help="output folder (default runs/<task>-<model>-<method>-s<seed>)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a finished run in --out (kept until the new one is published)")
    g.add_argument("--save-every", type=int, default=0,
                   help="steps between checkpoints in <out>/checkpoint (0 = four per run)")
    g.add_argument("--resume", default=None, metavar="OUT",
                   help="continue the run in OUT from its checkpoint (its saved arguments)")
    g.add_argument("--compare", action="store_true",
                   help="planted task: also train uniform LoRA and the oracle allocation at the "
                        "same budget (one quiet run each) and print how this run compares")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    given = [k for k, v in vars(args).items() if v != p.get_default(k)]
    if args.resume is not None:
        given = [k for k in given if k not in ("resume", "threads")]
        if given:
            raise ValueError(f"--resume takes the run's saved arguments; drop "
                             f"{', '.join('--' + k.replace('_', '-') for k in given)}")
        args = resumed_args(args, p)
    else:
        check_method_flags(args.method, given)
    check_args(args)
    is_glue = args.task != "planted"
    kind = "decoder" if is_decoder(args.model) else "glue" if is_glue else "planted"
    args.targets = args.targets or DEFAULT_TARGETS[kind]
    if args.steps is None and args.epochs is None:
        args.steps = 1000 if is_glue else 600
    if args.lr is None:  # the planted task's lr and steps let the oracle converge (README)
        args.lr = 5e-4 if is_glue else 5e-3
    model = Path(args.model).name or args.model  # a folder path: its name
    args.out = args.out or f"runs/{args.task}-{model}-{args.method.replace('+', '_')}-s{args.seed}"
    check_out(args)
    return args


def check_method_flags(method: str, given: list[str]) -> None:
    """Refuse flags given explicitly that --method ignores, naming the methods that use them."""
    errors = []
    for methods, flags in METHOD_FLAGS.items():
        mine = [f"--{k.replace('_', '-')}" for k in flags if k in given]
        if mine and method not in methods:
            errors.append(f"{', '.join(mine)} (used by --method {' / '.join(methods)} only)")
    if errors:
        raise ValueError(f"--method {method} ignores {'; '.join(errors)}: drop them or pick "
                         "that method")


def check_args(a: argparse.Namespace) -> None:
    """Reject bad values before any work or write, naming the value and the fix."""
    errors = []
    for name in ("alpha", "dropout", "lr", "weight_decay", "warmup", "grad_clip", "power",
                 "fw_lambda", "da_beta", "da_gamma", "epochs"):
        v = getattr(a, name)
        if v is not None and not math.isfinite(v):
            errors.append(f"--{name.replace('_', '-')} {v}: use a finite number")
    if errors:
        raise ValueError("; ".join(errors))
    if a.r < 1:
        errors.append(f"--r {a.r}: use a rank >= 1")
    if a.steps is not None and a.steps < 1:
        errors.append(f"--steps {a.steps}: use >= 1")
    if a.epochs is not None and a.epochs <= 0:
        errors.append(f"--epochs {a.epochs}: use > 0")
    if a.steps is not None and a.epochs is not None:
        errors.append("--steps and --epochs both given: pick one")
    for name in ("batch_size", "max_len", "calib_batches", "da_samples", "log_every",
                 "fw_warmup", "fw_track_every", "max_train", "max_eval", "grad_accum"):
        v = getattr(a, name)
        if v is not None and v < 1:
            errors.append(f"--{name.replace('_', '-')} {v}: use >= 1")
    for name in ("seed", "threads", "save_every", "eval_every", "r_min"):
        if getattr(a, name) < 0:
            errors.append(f"--{name.replace('_', '-')} {getattr(a, name)}: use >= 0")
    if not 0 <= a.warmup < 1:
        errors.append(f"--warmup {a.warmup}: use a fraction in [0, 1)")
    if not 0 <= a.dropout < 1:
        errors.append(f"--dropout {a.dropout}: use a probability in [0, 1)")
    for name in ("lr", "da_gamma", "alpha"):
        if getattr(a, name) is not None and getattr(a, name) <= 0:
            errors.append(f"--{name.replace('_', '-')} {getattr(a, name)}: use > 0")
    scale = a.alpha / (math.sqrt(a.r) if a.rslora else a.r) if a.r >= 1 else 0.0
    if scale > MAX_SCALE:
        errors.append(f"--alpha {a.alpha:g}: the LoRA scale alpha/{'sqrt(r)' if a.rslora else 'r'}"
                      f" = {scale:.3g} overflows the forward; use a scale <= {MAX_SCALE:g}")
    if a.lr is not None and a.lr > MAX_LR:
        errors.append(f"--lr {a.lr:g}: updates this large overflow float32; use --lr <= "
                      f"{MAX_LR:g}")
    if a.batch_size > MAX_BATCH:
        errors.append(f"--batch-size {a.batch_size:,}: use <= {MAX_BATCH:,}")
    cpus = os.cpu_count() or 1
    if a.threads > 4 * cpus:
        errors.append(f"--threads {a.threads}: this machine has {cpus} CPUs; use --threads <= "
                      f"{4 * cpus} (0 = torch's default)")
    if a.compare and a.task != "planted":
        errors.append(f"--compare with --task {a.task}: it compares with the planted task's "
                      "oracle ranks; drop --compare or use --task planted")
    for name in ("weight_decay", "grad_clip", "fw_lambda", "da_beta", "power"):
        if getattr(a, name) < 0:
            errors.append(f"--{name.replace('_', '-')} {getattr(a, name)}: use >= 0 "
                          f"{'(0 = off)' if name == 'grad_clip' else ''}".rstrip())
    if a.r_max is not None and a.r_max < a.r_min:
        errors.append(f"--r-max {a.r_max} < --r-min {a.r_min}: raise --r-max")
    if not a.r_min <= a.r <= (a.r_max or 2 * a.r):
        errors.append(f"--r-min {a.r_min} / --r {a.r} / --r-max {a.r_max or 2 * a.r}: the base "
                      "rank must lie in [r_min, r_max] or the budget r x matrices is infeasible")
    if a.score == "variance" and a.method.startswith("fim") and a.calib_batches < 2:
        errors.append(f"--score variance with --calib-batches {a.calib_batches}: the variance "
                      "of one batch gradient is 0; use --calib-batches >= 2")
    if a.data is not None:  # --task is implied
        if a.task not in ("planted", "data") or a.data_dir is not None:
            errors.append("--data FILE replaces --task and --data-dir: drop them")
        if not 0 < a.eval_fraction < 1:
            errors.append(f"--eval-fraction {a.eval_fraction}: use a fraction in (0, 1)")
        a.task = "data"
    else:
        errors += [f"--{k.replace('_', '-')} needs --data FILE" for k in
                   ("eval_data", "text_field", "pair_field") if getattr(a, k) is not None]
    need = glue.TASKS[a.task].n_special if a.task in glue.TASKS else 0
    need = (3 if a.pair_field else 2) if a.data is not None else need
    if not is_decoder(a.model) and a.max_len < need:  # decoders cut the prompt instead
        errors.append(f"--max-len {a.max_len}: {a.task} examples need {need} special tokens; "
                      f"use --max-len >= {need}")
    if a.task not in ("planted", "data") and a.data_dir is None:
        errors.append(f"--task {a.task} needs --data-dir (the GLUE folder with train.tsv, dev.tsv)")
    if a.device == "cuda" and not torch.cuda.is_available():
        errors.append("--device cuda but CUDA is not available: use --device auto or cpu")
    if a.resume is not None and a.overwrite:
        errors.append("--resume and --overwrite both given: pick one")
    if errors:
        raise ValueError("; ".join(errors))


def check_model(model: nn.Module, args: argparse.Namespace) -> None:
    """Checks that need the model, still before any training or write: --max-len within its
    positions, --r within every target matrix, finite weights, no target with a tied weight."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions is not None and args.max_len > positions:
        raise ValueError(f"--max-len {args.max_len} exceeds the model's {positions} positions: "
                         f"use --max-len <= {positions}")
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise ValueError(f"the model's weights hold NaN or inf in {bad[:3]}: the checkpoint of "
                         f"--model {args.model} is corrupt; re-download or re-install it")
    names: dict[int, list[str]] = {}  # a tied weight is one Parameter under several names
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    tied = [(n, names[id(m.weight)]) for n, m in lora_layers(model).items()
            if len(names[id(m.weight)]) > 1]
    if tied:
        n, shared = tied[0]
        raise ValueError(f"--targets {args.targets}: {n} shares its weight with "
                         f"{[s for s in shared if not s.startswith(n + '.')][0]} (tied "
                         "embeddings), so merging its ΔW would change the embeddings too; drop "
                         f"{n.rsplit('.', 1)[-1]} from --targets")


# -----------------------------------------------------------------------------
# output folder and checkpoints: a finished run is never lost, an unfinished one resumes
# (the file-system side, lock and tidying, is runfolder.py)

LOG = "log.jsonl"


def check_out(args: argparse.Namespace) -> None:
    """--out must be (or be creatable as) a writable folder that holds no finished run, unless
    --overwrite; an unfinished run there needs --resume or --overwrite. Writes nothing."""
    runfolder.check_out(Path(args.out), args.resume is not None, args.overwrite,
                        command("train.py", "--resume", args.out))


def save_checkpoint(out: Path, step: int, model: nn.Module, opt, sched, rng: dict,
                    state: dict, args: argparse.Namespace) -> None:
    """<out>/checkpoint/: state.pt (adapter and head tensors, optimizer, scheduler, generator
    states, FW-LoRA EMA, losses; loads with weights_only=True) and meta.json (step, args, seed,
    method report, segments), written to checkpoint.tmp/, fsynced, then swapped in."""
    tmp = out / (CHECKPOINT + ".tmp")
    runfolder.remove(tmp)
    tmp.mkdir(parents=True)
    fw = state["fw"]
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    blob = {"step": step, "model": trainable,  # adapters and heads, or a peer's trainables
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": {k: g.get_state() for k, g in rng.items()} | {"torch": torch.get_rng_state()},
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "fw_ema": fw["ema"], "fw_importance": fw["importance"] or {},
            "losses": state["losses"], "seconds": state["seconds"]}
    meta = {"step": step, "seed": args.seed, "args": vars(args), "evals": state["evals"],
            "ranks": {n: m.r for n, m in lora_layers(model).items()},
            "alphas": {n: m.alpha for n, m in lora_layers(model).items()},
            "report": state["report"], "segments": state["segments"]}
    with open(tmp / STATE, "wb") as f:
        torch.save(blob, f)
        f.flush()
        os.fsync(f.fileno())
    write_json(tmp / META, meta)
    runfolder.fsync_dir(tmp)
    runfolder.replace_dir(tmp, out / CHECKPOINT)


def read_checkpoint(out: Path) -> tuple[dict, dict]:
    """(state.pt contents, meta.json) of <out>/checkpoint (or checkpoint.old, when a kill came
    between the two renames of a save), both checked for types and agreement; else ValueError
    or FileNotFoundError naming what is wrong and the command that gets out of it."""
    folders = [out / n for n in (CHECKPOINT, CHECKPOINT + ".old") if (out / n).is_dir()]
    done = " (the run finished: results.json is there)" if runfolder.finished(out) else ""
    if not folders:
        raise FileNotFoundError(f"--resume {out}: no {CHECKPOINT}/ folder{done}")
    folder = next((f for f in folders if (f / META).exists()), None)
    if folder is None and done:
        raise FileNotFoundError(f"--resume {out}: nothing to resume{done}; its partial "
                                f"{CHECKPOINT}/ is removed by the next run into {out}")
    if folder is None:
        raise ValueError(f"--resume {out}: the checkpoint lacks {META} (a partial checkpoint): "
                         "nothing can resume from it; run the original command again with "
                         "--overwrite")
    text = read_regular(folder / META, runfolder.JSON_BYTES)
    try:
        meta = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--resume {out}: {folder / META} is not a readable fimlora "
                         f"checkpoint ({type(e).__name__})") from None
    fields = {"step": int, "seed": int, "args": dict, "ranks": dict, "alphas": dict,
              "report": dict, "evals": list, "segments": list}
    if isinstance(meta, dict):
        meta.setdefault("segments", [])  # written since segments were recorded
    for field, kind in fields.items():
        if not isinstance(meta, dict) or not isinstance(meta.get(field), kind) or isinstance(
                meta.get(field), bool):
            raise ValueError(f"{folder / META}: field {field!r} is missing or not a "
                             f"{kind.__name__}; the checkpoint is damaged")
    if not os.path.lexists(folder / STATE):
        raise ValueError(f"--resume {out}: the checkpoint lacks {STATE}")
    with open_regular(folder / STATE, runfolder.STATE_BYTES) as f:
        try:
            blob = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, foreign or unsafe pickle: name it, never a traceback
            raise ValueError(f"--resume {out}: {folder / STATE} is not a readable fimlora "
                             f"checkpoint ({type(e).__name__})") from None
    if not isinstance(blob, dict) or blob.get("step") != meta["step"]:
        raise ValueError(f"{folder / STATE} does not match {META} (step): the checkpoint is "
                         "damaged")
    check_state(blob, meta, folder)
    return blob, meta


def check_state(blob: dict, meta: dict, folder: Path) -> None:
    """state.pt's fields have the types a run writes, and as many losses as steps."""
    def tensors(v, floats: bool = False) -> bool:
        return isinstance(v, dict) and all(isinstance(k, str) and torch.is_tensor(t) and (
            not floats or t.is_floating_point()) for k, t in v.items())
    checks = {"model": tensors(blob.get("model"), floats=True),
              "optimizer": isinstance(blob.get("optimizer"), dict),
              "scheduler": isinstance(blob.get("scheduler"), dict),
              "rng": tensors(blob.get("rng")) and {"data", "torch"} <= set(blob["rng"]),
              "cuda_rng": isinstance(blob.get("cuda_rng"), list),
              "fw_ema": tensors(blob.get("fw_ema"), floats=True),
              "fw_importance": tensors(blob.get("fw_importance"), floats=True),
              "seconds": type(blob.get("seconds")) in (int, float),
              "losses": isinstance(blob.get("losses"), list) and all(
                  type(v) is float and math.isfinite(v) for v in blob["losses"])}
    bad = [k for k, ok in checks.items() if not ok]
    if not all(isinstance(s, dict) for s in meta["segments"]):
        raise ValueError(f"{folder / META}: field 'segments' holds a non-object; the checkpoint "
                         "is damaged")
    if bad:
        raise ValueError(f"{folder / STATE}: field {bad[0]!r} is missing or of the wrong type "
                         "(float tensors, finite losses); the checkpoint is damaged")
    if len(blob["losses"]) != meta["step"] or meta["step"] < 1:
        raise ValueError(f"{folder / STATE} holds {len(blob['losses'])} losses for step "
                         f"{meta['step']}: the checkpoint is damaged")


def resumed_args(cli: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The saved arguments of the run in --resume OUT (--threads from the command line), each
    checked against the parser's type and choices; the checkpoint's step within --steps."""
    out = Path(cli.resume)
    if not out.is_dir():
        raise FileNotFoundError(f"--resume {out}: no such run folder")
    _, meta = read_checkpoint(out)
    known, saved, where = vars(cli), meta["args"], out / CHECKPOINT / META
    unknown = sorted(set(saved) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown arguments {unknown[:5]}; the "
                         "checkpoint comes from another version of train.py")
    missing = sorted(set(known) - set(saved))
    if missing:
        raise ValueError(f"{where}: arguments {missing[:5]} missing; the checkpoint comes from "
                         "another version of train.py or is damaged")
    bad = [a.dest for a in parser._actions if a.dest in saved and not saved_ok(a, saved[a.dest])]
    if bad:
        raise ValueError(f"{where}: argument {bad[0]!r} = {str(saved[bad[0]])[:40]!r} is not a "
                         "value train.py accepts; the checkpoint is damaged")
    args = argparse.Namespace(**{**known, **saved})
    args.resume, args.overwrite, args.out = str(out), False, str(out)
    args.threads = cli.threads or args.threads
    check_step(meta, args)
    return args


def saved_ok(action: argparse.Action, v) -> bool:
    """Whether a saved value is one the parser could have produced (resolved defaults set)."""
    if action.nargs == 0:  # store_true
        return isinstance(v, bool)
    if v is None:
        return action.default is None and action.dest not in ("steps", "lr", "targets", "out")
    if action.choices is not None:  # --data resolves --task to "data" (check_args)
        return v in action.choices or (action.dest == "task" and v == "data")
    if action.type is None:
        return isinstance(v, str)
    try:
        return not isinstance(v, bool) and action.type(str(v)) == v
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False


def check_step(meta: dict, args: argparse.Namespace) -> None:
    if not 1 <= meta["step"] <= args.steps:
        raise ValueError(f"{Path(args.out) / CHECKPOINT / META}: step {meta['step']} lies outside "
                         f"the run's 1..{args.steps} steps; the checkpoint is damaged")


def restore_adapters(model: nn.Module, blob: dict, meta: dict) -> None:
    """Give every LoRA layer the checkpoint's rank and alpha, then every trainable tensor (the
    adapters and heads, or a peer model's trainables) its saved value."""
    layers = lora_layers(model)
    if layers and not meta["ranks"]:
        raise ValueError("the checkpoint holds a peer's model (transformers + PEFT), not "
                         "fimlora's LoRA layers: resume it with '"
                         f"{command('bench.py', '--peer', 'NAME', '--', '--resume', 'OUT')}', "
                         "NAME the peer that started it")
    if set(meta["ranks"]) != set(layers):
        raise ValueError(f"the checkpoint adapts {sorted(meta['ranks'])[:3]}..., the model "
                         f"{sorted(layers)[:3]}...: was --model or --targets changed?")
    for name, layer in layers.items():
        resize_lora(layer, int(meta["ranks"][name]), alpha=float(meta["alphas"][name]))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = blob["model"]
    bad = sorted(set(params) ^ set(saved)) + [n for n in params if n in saved and (
        saved[n].shape != params[n].shape or saved[n].dtype != params[n].dtype
        or not bool(torch.isfinite(saved[n]).all()))]
    if bad:
        raise ValueError(f"the checkpoint's tensors do not fit the model ({bad[:3]}): was "
                         "--model or --targets changed, or is state.pt damaged?")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])


def restore_rng(blob: dict) -> None:
    """The global generators (dropout) as they were at the checkpoint: the last restore step."""
    torch.set_rng_state(blob["rng"]["torch"])
    if blob["cuda_rng"]:
        torch.cuda.set_rng_state_all(blob["cuda_rng"])


# -----------------------------------------------------------------------------
# torchrun: one process per device, each a disjoint shard of every global batch


DIST_TIMEOUT = "FIMLORA_DIST_TIMEOUT"  # env: seconds a rank waits for the others (default 600)


def dist_timeout() -> float:
    """Seconds a collective waits for a silent peer before the run ends with an error (gloo's
    own default is 30 minutes); from the environment variable DIST_TIMEOUT, default 600."""
    raw = os.environ.get(DIST_TIMEOUT, "600")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= 86400:
        raise ValueError(f"{DIST_TIMEOUT}={raw!r}: give the seconds a torchrun process waits for "
                         "the others, a number in (0, 86400]")
    return seconds


def init_distributed(device: torch.device, args: argparse.Namespace) -> tuple[int, int]:
    """(rank, world size); starts the process group (gloo on CPU, nccl on CUDA) under torchrun,
    with collectives that give up after dist_timeout() seconds."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {world} "
                         "processes: every rank takes an equal shard of each global batch")
    timeout = datetime.timedelta(seconds=dist_timeout())
    dist = torch.distributed
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


SHARD_WEIGHT = "shard_weight"  # a batch key: world·n_k/N, set by shards() on uneven splits


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    dist = torch.distributed
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def shards(batches: Iterator[dict], rank: int, world: int) -> Iterator[dict]:
    """Rank `rank`'s contiguous slice of dim 0 of every tensor in every batch. Where the slices
    differ in size (the last batch of an epoch), the slice of n_k of the N rows carries
    SHARD_WEIGHT = world·n_k/N, for shard_loss."""
    for batch in batches:
        if world == 1:
            yield batch
            continue
        first = next(v for v in batch.values() if torch.is_tensor(v))
        n, n_k = first.shape[0], first.tensor_split(world)[rank].shape[0]
        part = {k: v.tensor_split(world)[rank] if torch.is_tensor(v) and v.shape[:1] == (n,)
                else v for k, v in batch.items()}
        if n % world:
            part[SHARD_WEIGHT] = world * n_k / n
        yield part


def shard_loss(task: Task, args: argparse.Namespace, world: int) -> Task:
    """The task whose loss_fn weights an uneven shard's mean loss by SHARD_WEIGHT: DDP applies
    the ranks' mean gradient, which is then the whole batch's (losses are per-example means),
    as in one process. Refuses, before the first step, data whose last batch leaves a rank no
    row."""
    left = (task.n_train or 0) % args.batch_size
    if world > 1 and 0 < left < world:
        raise ValueError(f"the last batch of each epoch has {left} rows (--max-train / the "
                         f"training rows mod --batch-size {args.batch_size}), fewer than the "
                         f"{world} processes: change --max-train or --batch-size")

    def loss_fn(m: nn.Module, batch: dict) -> torch.Tensor:
        if SHARD_WEIGHT not in batch:
            return task.loss_fn(m, batch)
        rows = {k: v for k, v in batch.items() if k != SHARD_WEIGHT}
        return task.loss_fn(m, rows) * batch[SHARD_WEIGHT]
    return task._replace(loss_fn=loss_fn) if world > 1 else task


def agreed(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank if it is true on any (a stop request must stop all ranks together).
    `device`: the process group's (the rank's GPU under nccl, which refuses CPU tensors)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


# -----------------------------------------------------------------------------
# seed, random streams, device


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def random_streams(seed: int) -> dict[str, torch.Generator]:
    """Every random draw of a run, one CPU generator per stream: init (weights, plants, A),
    data (training batches), calib (calibration batches), eval (planted eval set). Separate
    streams keep calibration and re-initialisation from shifting the data order, so every
    method trains on the same batches."""
    return {name: torch.Generator().manual_seed(seed + k)
            for k, name in enumerate(("init", "data", "calib", "eval"))}


def resolve_device(name: str) -> torch.device:
    """cpu or cuda; under torchrun (WORLD_SIZE > 1) on CUDA, each process's own GPU,
    cuda:LOCAL_RANK, made current (nccl works on the current device)."""
    cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    if cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= count:
            raise ValueError(f"LOCAL_RANK {local} but {count} GPU(s) visible: start torchrun "
                             f"with --nproc-per-node <= {count} (or --device cpu)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    print(f"device: {device} ({'bf16 autocast' if device.type == 'cuda' else 'fp32'}"
          f"{', --device auto' if name == 'auto' else ''})")
    return device


# -----------------------------------------------------------------------------
# methods: each changes the freshly adapted model before training and reports what it did


def add_adapters(task: Task, args: argparse.Namespace, device: torch.device,
                 rng: dict[str, torch.Generator]) -> nn.Module:
    """Uniform LoRA of rank r on every target; returns the model to train."""
    small = [(n, min(m.in_features, m.out_features)) for n, m in task.model.named_modules()
             if isinstance(m, nn.Linear) and min(m.in_features, m.out_features) < args.r
             and any(n == t or n.endswith("." + t) for t in args.targets.split(","))]
    if small:
        raise ValueError(f"--r {args.r} exceeds min(d_in, d_out) = {small[0][1]} of {small[0][0]}"
                         f" ({len(small)} such target matrices): lower --r")
    add_lora(task.model, args.targets.split(","), r=args.r, alpha=args.alpha,
             dropout=args.dropout, rslora=args.rslora, heads=task.heads, generator=rng["init"])
    return task.model.to(device).train(task.train_mode)


def fim_method(model: nn.Module, task: Task, args: argparse.Namespace,
               rng: dict[str, torch.Generator], calib: Iterator[dict]) -> dict:
    """FIM-LoRA: calibrate on --calib-batches batches, reallocate the rank budget. Under
    torchrun rank k takes batches k, k + world, ... (maybe none); every score's sums are
    all-reduced, so every rank allocates the ranks of one process."""
    rank, world = rank_world()
    batches = list(itertools.islice(calib, rank, args.calib_batches, world))
    report = {}
    if task.planted:  # before the allocation resizes A: the model it scores
        report["planted_recovery"] = planted_scores(model, batches, task.loss_fn, task.planted)
    # the estimator holds one float32 (d_out, r) sum per lora_B (two for the variance score)
    held = 4 * sum(m.lora_B.numel() for m in lora_layers(model).values())
    held *= 2 if args.score == "variance" else 1
    ratio = held / (4 * n_params(model, trainable=False))
    t0 = time.perf_counter()
    res = fimlora.initialize_fim_ranks(
        model, progress(batches, "FIM-LoRA calibration", len(batches)), task.loss_fn,
        r_min=args.r_min, r_max=args.r_max, score=args.score,
        n_batches=args.calib_batches, per_example=args.per_example, power=args.power,
        generator=rng["init"], budget_unit=args.budget)
    seconds = time.perf_counter() - t0
    shown = {n: sum(v) if isinstance(v, list) else v for n, v in res["scores"].items()}
    what = " (per-rank gains, summed)" if shown != res["scores"] else ""
    print(f"FIM-LoRA {args.score} scores{what}:\n{layer_table(shown, '{:.3g}')}")
    print(f"FIM-LoRA calibration: {seconds:.1f}s, estimator {held:,} bytes "
          f"({ratio:.2%} of a full-model diagonal Fisher)")
    report["fim"] = {**res, "seconds": seconds, "bytes": held, "memory_ratio": ratio}
    return report


def da_method(model: nn.Module, task: Task, args: argparse.Namespace,
              rng: dict[str, torch.Generator], calib: Iterator[dict]) -> dict:
    """LoRA-DA: initialise A and B from --da-samples calibration examples (the last batch cut
    short). Under torchrun rank k takes batches k, k + world, ... and their share of the
    examples; lorada_statistics all-reduces the sums."""
    n = max(1, math.ceil(args.da_samples / args.batch_size))
    batches = list(itertools.islice(calib, n))
    sizes = [next(v.shape[0] for v in b.values() if torch.is_tensor(v)) for b in batches]
    take = [min(k, max(0, args.da_samples - at))
            for k, at in zip(sizes, itertools.accumulate(sizes, initial=0))]
    rank, world = rank_world()
    t0 = time.perf_counter()
    batches = progress(batches[rank::world], "LoRA-DA calibration", len(batches[rank::world]))
    res = fimlora.lorada_init(model, batches, task.loss_fn,
                              n_samples=max(1, sum(take[rank::world])), da_beta=args.da_beta,
                              da_gamma=args.da_gamma, population_size=task.n_train)
    return {"da": {**res, "seconds": time.perf_counter() - t0}}


METHOD_STEPS = {"lora": (), "fim": (fim_method,), "fw": (), "da": (da_method,),
                "fim+da": (fim_method, da_method)}  # fw acts in the training loop (fw_step)


def apply_method(model: nn.Module, task: Task, args: argparse.Namespace,
                 rng: dict[str, torch.Generator]) -> dict:
    calib = task.train_batches(rng["calib"])
    report: dict = {}
    if task.planted:  # every method starts from B = 0; da moves away from it before step 0
        report["loss_at_B0"] = task.evaluate(model)["loss"]
    for step in METHOD_STEPS[args.method]:
        report.update(step(model, task, args, rng, calib))
    report["calibration_seconds"] = sum(report[k]["seconds"] for k in ("fim", "da") if k in report)
    ranks = {n: m.r for n, m in lora_layers(model).items()}
    report["adapter_parameters"] = sum(m.lora_A.numel() + m.lora_B.numel()
                                       for m in lora_layers(model).values())
    print(rank_header(ranks, report["adapter_parameters"], args) + "\n" + layer_table(ranks))
    if "planted_recovery" in report:
        report["planted_recovery"]["ranks"] = planted_ranks(ranks, task.planted)
    return report


# -----------------------------------------------------------------------------
# training loop


def lr_schedule(steps: int, warmup: float) -> Callable[[int], float]:
    """Linear warm-up to 1 over warmup·steps steps, then linear decay to 0 at `steps`."""
    warm = int(warmup * steps)

    def factor(s: int) -> float:
        if s < warm:
            return s / warm
        return max(0.0, (steps - s) / max(1, steps - warm))
    return factor


def make_optimizer(model: nn.Module, args: argparse.Namespace):
    """AdamW with weight decay on matrices only, and the lr schedule."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]  # biases and LayerNorms, as HF Trainer
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(args.steps, args.warmup))


def micro_backward(train_model: nn.Module, loss_fn: Callable, micro: list[dict],
                   penalty: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Forward and backward of one optimizer step's micro-batches; returns the step's loss.
    Micro-batch c's loss is weighted n_c/Σn (n_c its examples): every loss_fn is the mean of
    per-example losses (data/tasks.py), so the gradients sum to those of the mean over all Σn
    examples, the update of one batch of them up to float rounding (a loss averaged over the
    tokens of a whole batch would need token weights instead). The penalty is added once. A DDP
    train_model syncs on the last micro-batch only (no_sync before it)."""
    # an uneven shard's n_k rows weigh as N/world of the global batch (shards: SHARD_WEIGHT)
    sizes = [next(v.shape[0] for v in b.values() if torch.is_tensor(v)) / b.get(SHARD_WEIGHT, 1)
             for b in micro]
    for c, batch in enumerate(micro):
        last = c == len(micro) - 1
        with (train_model.no_sync() if not last and hasattr(train_model, "no_sync")
              else contextlib.nullcontext()):
            loss = loss_fn(train_model, batch)
            if len(micro) > 1:  # --grad-accum 1 stays the plain step, bit for bit
                loss = loss * (sizes[c] / sum(sizes))
            (loss + penalty() if last and penalty else loss).backward()
        total = loss.detach() if c == 0 else total + loss.detach()
    return total


def fw_step(train_model: nn.Module, model: nn.Module, task: Task, args: argparse.Namespace,
            state: dict):
    """FW-LoRA: a plain step that tracks ‖∂L/∂W_m‖² during the warm-up, then freezes the
    importances and adds the penalty. `state` holds the EMA and the importances; train_model
    is model itself or its DistributedDataParallel wrapper. fw_track spans all micro-batches
    of a step, so it sees ‖Σ_c G_c‖², the norm of the step's accumulated gradient."""
    every = args.fw_track_every

    def step(k: int, micro: list[dict]) -> torch.Tensor:
        if k <= args.fw_warmup:
            tracked = (k - 1) % every == 0  # steps 1, 1 + k, 1 + 2k, ...; the rest plain LoRA
            with fimlora.fw_track(model) if tracked else contextlib.nullcontext() as sq:
                loss = micro_backward(train_model, task.loss_fn, micro)
            if tracked:
                state["ema"] = fimlora.fw_update(state["ema"], sq, (k - 1) // every + 1,
                                                 beta=fimlora.FW_BETA ** every)
            return loss
        if state["importance"] is None:
            state["importance"] = fimlora.importances(state["ema"], mode=args.fw_norm)
        return micro_backward(train_model, task.loss_fn, micro, lambda: fimlora.fw_penalty(
            model, state["importance"], fw_lambda=args.fw_lambda))
    return step


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during training: a checkpoint was saved at the end of `step`."""


class Diverged(FloatingPointError):
    """A non-finite loss or parameter: nothing after the last good checkpoint is kept."""


@contextlib.contextmanager
def stop_requests() -> Iterator[dict]:
    """While training, Ctrl-C and SIGTERM only set a flag that the loop reads at the end of a
    step (it then checkpoints and stops); a second Ctrl-C interrupts at once."""
    flag = {"set": False}

    def handler(signum, frame):
        if flag["set"]:
            raise KeyboardInterrupt
        flag["set"] = True
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def divergence(step: int, what: str, model: nn.Module, args: argparse.Namespace,
               last_good: int) -> Diverged:
    """The error for a non-finite loss or parameter, naming the likely cause."""
    frozen = [n for n, p in model.named_parameters()
              if not p.requires_grad and not bool(torch.isfinite(p).all())]
    if frozen:
        cause = f"the frozen weights hold NaN/inf ({frozen[:2]}): check the model checkpoint"
    elif step == 1:
        cause = "it is non-finite before any update: check the data and the loss for inf/NaN"
    elif not args.grad_clip:
        cause = f"no gradient clipping: set --grad-clip 1.0, or lower --lr {args.lr:g}"
    else:
        cause = f"the updates grew too large: lower --lr {args.lr:g}"
    kept = (f"the last good checkpoint (step {last_good}) is in {Path(args.out) / CHECKPOINT}"
            if last_good else "no checkpoint was written before it")
    return Diverged(f"{what} at step {step}; likely cause: {cause}; {kept}")


def train_loop(model: nn.Module, task: Task, args: argparse.Namespace,
               rng: dict[str, torch.Generator], report: dict, resume: tuple | None,
               dist_info: tuple[int, int]) -> dict:
    """--steps AdamW steps, each on --grad-accum batches from the data stream (micro_backward),
    checkpointing every --save-every steps (rank 0 writes); returns the losses (one per step),
    the evals (step 0 for planted) and the training seconds. With `resume` = (state.pt,
    meta.json) it continues where they stopped, replaying steps x --grad-accum batches."""
    rank, world = dist_info
    opt, sched = make_optimizer(model, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    accum = f" x {args.grad_accum} micro-batches" if args.grad_accum > 1 else ""
    print(f"training: {args.steps:,} steps, batch {args.batch_size}{accum}, lr {args.lr:g}, "
          f"{sum(p.numel() for p in trainable):,} trainable parameters")
    state = {"losses": [], "evals": [], "seconds": 0.0, "report": report, "heads": task.heads,
             "fw": {"ema": {}, "importance": None}, "segments": []}
    start = 0
    trim_log(Path(args.out), resume[0]["step"] if resume is not None else 0)
    if resume is not None:
        blob, meta = resume
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        start, state["losses"], state["seconds"] = blob["step"], blob["losses"], blob["seconds"]
        state["evals"], state["segments"] = meta["evals"], meta["segments"]
        state["fw"] = {"ema": blob["fw_ema"], "importance": blob["fw_importance"] or None}
        print(f"resumed from {Path(args.out) / CHECKPOINT} at step {start:,}")
    elif task.planted:
        state["evals"].append({"step": 0, **task.evaluate(model)})
        print(f"eval @ 0: {state['evals'][-1]}")
        log_json(args, {"step": 0, "eval": state["evals"][-1], "elapsed": 0.0})
    segment = {"from_step": start, "threads": torch.get_num_threads(), "world_size": world}
    last = state["segments"][-1] if state["segments"] else segment
    if any(last.get(k) != segment[k] for k in ("threads", "world_size")):
        print(f"note: this segment runs {segment['threads']} threads on {world} process(es), "
              f"the last ran {last.get('threads')} on {last.get('world_size')}: the result is "
              "not bitwise an uninterrupted run's (both are recorded in results.json segments)")
    state["segments"] = [*state["segments"], segment]
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model)
        task = shard_loss(task, args, world)
    if args.method == "fw":
        if args.fw_warmup > args.steps // 2:
            args.fw_warmup = args.steps // 2  # keep half the run for the penalised phase
            print(f"FW-LoRA warm-up capped at {args.fw_warmup} steps (half of --steps)")
        step_fn = fw_step(train_model, model, task, args, state["fw"])
    else:
        def step_fn(k: int, micro: list[dict]) -> torch.Tensor:
            return micro_backward(train_model, task.loss_fn, micro)
    batches = shards(task.train_batches(rng["data"]), rank, world)
    for _ in range(start * args.grad_accum):  # the data order is a function of the seed
        next(batches)
    if resume is not None:
        if not torch.equal(rng["data"].get_state(), blob["rng"]["data"]):
            raise ValueError(f"--resume {args.out}: the training data no longer gives the "
                             "batches the checkpoint saw (files or --max-train changed?)")
        restore_rng(blob)
    out, every = Path(args.out), args.save_every or max(1, math.ceil(args.steps / 4))
    last_good = start
    with stop_requests() as stop:
        for step in range(start + 1, args.steps + 1):
            t0 = time.perf_counter()
            loss = step_fn(step, [next(batches) for _ in range(args.grad_accum)])
            if world > 1:  # log the global batch's loss: the mean of the weighted shards' means
                torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG)
            value = loss.item()
            if not math.isfinite(value):
                raise divergence(step, f"the loss is {value}", model, args, last_good)
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            # one fused norm and one sync: finite iff every trainable entry is finite
            if not math.isfinite(torch.nn.utils.get_total_norm(trainable).item()):
                raise divergence(step, "a parameter became non-finite", model, args, last_good)
            state["losses"].append(value)
            state["seconds"] += time.perf_counter() - t0
            log_step(step, state, sched, args)
            if args.eval_every and step % args.eval_every == 0 and step != args.steps:
                state["evals"].append({"step": step, **task.evaluate(model)})
                print(f"eval @ {step}: {state['evals'][-1]}")
                log_json(args, {"step": step, "eval": state["evals"][-1],
                                "elapsed": state["seconds"]})
            stopping = agreed(stop["set"], world, loss.device)
            if (step % every == 0 and step != args.steps) or stopping:
                if rank == 0:
                    with runfolder.write_errors(out, command("train.py", "--resume", out)):
                        save_checkpoint(out, step, model, opt, sched, rng, state, args)
                last_good = step
            if stopping:
                raise Interrupted(f"interrupted at step {step:,}/{args.steps:,}, checkpoint "
                                  f"saved: resume with '{command('train.py', '--resume', out)}'")
    fw = state["fw"]["importance"]
    return {"losses": state["losses"], "evals": state["evals"], "seconds": state["seconds"],
            "fw": {"importances": {n: float(v) for n, v in fw.items()}} if fw else None,
            "trainable": sum(p.numel() for p in trainable), "segments": state["segments"]}


def log_step(step: int, state: dict, sched, args: argparse.Namespace) -> None:
    """Every --log-every steps: a line on stdout and one in <out>/log.jsonl."""
    if step % args.log_every == 0 or step == args.steps:
        recent, seconds = state["losses"][-args.log_every:], state["seconds"]
        done, loss, lr = len(state["losses"]), sum(recent) / len(recent), sched.get_last_lr()[0]
        print(f"step {step:>6,}/{args.steps:,} | loss {loss:.4g} "
              f"| lr {lr:.2e} | {done / seconds:.2f} steps/s "
              f"| {seconds / done:.3f} s/step | ETA {(args.steps - step) * seconds / done:.0f}s",
              flush=True)
        log_json(args, {"step": step, "loss": loss, "lr": lr,
                        "examples_per_s": done * args.batch_size / seconds, "elapsed": seconds})


def log_json(args: argparse.Namespace, record: dict) -> None:
    """Append one JSON line (a logged step or an eval) to <out>/log.jsonl; rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        with open(Path(args.out) / LOG, "a") as f:
            f.write(json.dumps(_finite(record)) + "\n")


def trim_log(out: Path, step: int) -> None:
    """A fresh run starts <out>/log.jsonl anew; a resumed one keeps its lines up to the
    checkpoint's step (a killed run may have logged past it, or half a line)."""
    path = out / LOG
    if not path.is_file() or int(os.environ.get("RANK", "0")) != 0:
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines() if step else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) \
                and record["step"] <= step:
            kept.append(line + "\n")
    _atomic_write(path, lambda f: f.write("".join(kept).encode()))


def progress(batches: Iterable, label: str, total: int, every: float = 10.0) -> Iterator:
    """The batches, with a line "label: batch k/total" at the first and then every `every`
    seconds, so a long calibration shows it is alive."""
    t0 = last = time.perf_counter()
    for k, batch in enumerate(batches, 1):
        now = time.perf_counter()
        if k == 1 or now - last >= every:
            print(f"{label}: batch {k:,}/{total:,} ({now - t0:.0f}s)", flush=True)
            last = now
        yield batch


# -----------------------------------------------------------------------------
# reporting


def rank_header(ranks: dict[str, int], params: int, args) -> str:
    budget = (f"{args.r * len(ranks)} ranks" if args.budget == "ranks" else
              "the parameters of uniform rank r")
    return (f"ranks (total {sum(ranks.values())}, budget {budget}; {params:,} adapter "
            "parameters):")


def layer_table(values: dict[str, float], fmt: str = "{}") -> str:
    """Per-matrix values (ranks, scores) as a layer x module table; matrices outside `layer.N.`
    are listed after it."""
    cells, rest = {}, {}
    for name, v in values.items():
        m = re.search(r"layers?\.(\d+)\.(.+)$", name)
        if m:
            cells.setdefault(int(m.group(1)), {})[m.group(2)] = fmt.format(v)
        else:
            rest[name] = fmt.format(v)
    cols = list(dict.fromkeys(c for row in cells.values() for c in row))
    short = [c.replace("attention.self.", "").replace("attention.output.dense", "attn.out")
             .replace("intermediate.dense", "inter").replace("output.dense", "out")
             .replace("self_attn.", "").replace("mlp.", "") for c in cols]
    lines = ["layer " + " ".join(f"{s:>9}" for s in short)]
    for layer in sorted(cells):
        lines.append(f"{layer:>5} " + " ".join(f"{cells[layer].get(c, '-'):>9}" for c in cols))
    lines += [f"{n}: {v}" for n, v in rest.items()]
    return "\n".join(lines)


def planted_scores(model, calib, loss_fn, truth: dict[str, int]) -> dict:
    """How many planted matrices each Fisher score puts in its top k (k = number planted), on the
    calibration batches and the model the allocation scores. A measurement: printed and saved,
    never used to choose anything."""
    out = {}
    for label, kw in (("efim", {}), ("variance", {"score": "variance"}),
                      ("per-example", {"per_example": True})):
        scores = fimlora.fisher_scores(model, calib, loss_fn, n_batches=None, **kw)["scores"]
        out[label] = planted.recovery(scores, truth)
    print(f"planted recovery, top-{out['efim']['k']} hits (chance "
          f"{out['efim']['chance_hits']:.2f}): "
          + ", ".join(f"{k} {v['hits']:g}" for k, v in out.items()))
    return out


def planted_ranks(ranks: dict[str, int], truth: dict[str, int]) -> dict:
    """How the allocated ranks sit on the planted matrices (printed and returned)."""
    r = planted.rank_recovery(ranks, truth)
    print(f"allocated ranks: mean {r['mean_rank_planted']:.2f} on planted vs "
          f"{r['mean_rank_other']:.2f} elsewhere; share on planted {r['share_planted']:.2f} "
          f"(chance {r['chance_share']:.2f})")
    return r


def n_params(model: nn.Module, trainable: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def _finite(obj):
    """obj with every NaN or ±inf float replaced by None (JSON null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def environment(device: torch.device | None = None) -> dict:
    """{"versions", "machine"} of this process for a results file: python and torch versions,
    platform, CPUs, torch threads and the GPU's name (of `device`; None: of the default CUDA
    device when there is one)."""
    on_cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    return {"versions": {"torch": torch.__version__, "python": platform.python_version()},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "threads": torch.get_num_threads(),
                        "cuda": torch.cuda.get_device_name(device) if on_cuda else None}}


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Strict JSON (a non-finite float becomes null), written atomically."""
    text = json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n"
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def final_eval(model: nn.Module, task: Task, args: argparse.Namespace, trained: dict,
               report: dict) -> dict:
    if not task.planted:  # a dev set can take a while
        print(f"evaluating at step {args.steps:,} ...", flush=True)
    metrics = task.evaluate(model)
    if task.planted:
        metrics["loss_ratio"] = metrics["loss"] / report["loss_at_B0"]  # final / start (B = 0)
    trained["evals"].append({"step": args.steps, **metrics})
    seconds = trained["seconds"]
    log_json(args, {"step": args.steps, "eval": metrics, "elapsed": seconds})
    print(f"eval: {', '.join(f'{k} {v:.4g}' for k, v in metrics.items())}")
    print(f"time: calibration {report['calibration_seconds']:.1f}s, training {seconds:.1f}s "
          f"({seconds / args.steps:.3f} s/step), "
          f"overhead {report['calibration_seconds'] / max(seconds, 1e-9):.1%}")
    return metrics


def save(model: nn.Module, task: Task, args: argparse.Namespace, results: dict) -> None:
    """results.json, the adapter, and for GLUE the same adapter in PEFT's layout, published
    together: written to <out>/.publish.tmp, renamed to .publish once complete, then moved in
    with results.json last, so a kill never leaves a folder mixing two runs. A model without
    LoRALinear layers (a peer's, bench.py) only gets results.json. The checkpoint goes once
    .publish is complete. A failed write (disk full) names the file and what survived."""
    out = Path(args.out)
    tmp = out / ".publish.tmp"
    with runfolder.write_errors(out, command("train.py", "--resume", out)):
        runfolder.remove(tmp)
        tmp.mkdir(parents=True)
        write_adapters(tmp, model, task, args)
        write_json(tmp / "results.json", results)
        runfolder.fsync_dir(tmp)
        os.replace(tmp, out / ".publish")
        written = [str(out / n) for n in PUBLISHED if (out / ".publish" / n).exists()]
        runfolder.publish_move(out)
    print(f"wrote {' and '.join(written)}")


def write_adapters(folder: Path, model: nn.Module, task: Task, args: argparse.Namespace) -> None:
    """The adapter, and for GLUE its PEFT copy, into folder (nothing for a peer's model)."""
    targets = args.targets.split(",")
    if lora_layers(model):
        save_adapter(folder / "adapter", model, targets, seed=args.seed, heads=task.heads)
        if task.planted is None:  # for PeftModel.from_pretrained (README)
            base = None if args.model in ("tiny", "tiny-llama") else str(model_path(args.model))
            save_adapter(folder / "adapter_peft", model, targets, heads=task.heads,
                         format="peft", base_model=base,
                         task_type="CAUSAL_LM" if is_decoder(args.model) else None)


def check_save(model: nn.Module, task: Task, args: argparse.Namespace) -> None:
    """Every check save() makes on the adapters (targets, heads, PEFT export), run before step
    1 by saving them once into a temporary folder: a run never trains and then cannot publish."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        write_adapters(Path(tmp), model, task, args)


def build_task(args: argparse.Namespace, device: torch.device, rng: dict) -> Task:
    make_task = (data_task if args.data is not None else
                 planted_task if args.task == "planted" else
                 causal_task if is_decoder(args.model) else glue_task)
    task = make_task(args, device, rng)
    if args.epochs is not None:
        if task.n_train is None:
            raise ValueError("--epochs needs a finite training set: use --steps for planted")
        args.steps = max(1, math.ceil(args.epochs * task.n_train
                                      / (args.batch_size * args.grad_accum)))
    fit_to_data(args, task.n_train)
    return task


def fit_to_data(args: argparse.Namespace, n_train: int | None) -> None:
    """Cap the calibration sizes at one pass over the training set (the planted task's endless
    data at PLANTED_EXAMPLES), printing the cap: a list of batches beyond it only repeats rows
    and can exhaust memory. Sizes the data can give are left alone: those runs are unchanged."""
    n = PLANTED_EXAMPLES if n_train is None else n_train
    per_pass = math.ceil(n / args.batch_size)
    if args.method.startswith("fim") and args.calib_batches > per_pass:
        print(f"--calib-batches {args.calib_batches:,} capped at {per_pass:,}: one pass over "
              f"{n:,} examples")
        args.calib_batches = per_pass
    if args.method.endswith("da") and args.da_samples > n:
        print(f"--da-samples {args.da_samples:,} capped at {n:,}: one pass over the examples")
        args.da_samples = n


def describe(model: nn.Module, task: Task, args: argparse.Namespace) -> None:
    print(f"model: {args.model}, {n_params(model, False):,} parameters; LoRA on "
          f"{len(lora_layers(model))} matrices ({args.targets}), r={args.r}, "
          f"alpha={args.alpha:g}{', rsLoRA' if args.rslora else ''}")
    if task.planted:
        print("planted matrices: " + ", ".join(f"{n} (rank {r})" for n, r in task.planted.items()))


def prepare_out(args: argparse.Namespace, rank: int) -> None:
    """Create --out, finish or drop what an interrupted run left; --overwrite drops the old
    run's checkpoint (its results stay until the new run publishes)."""
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        tidy_out(out)
        if args.overwrite:
            for name in (CHECKPOINT, CHECKPOINT + ".old"):
                runfolder.remove(out / name)


def oracle_adapt(task: Task, args: argparse.Namespace, device: torch.device,
                 rng: dict[str, torch.Generator]) -> nn.Module:
    """Uniform LoRA, then the ranks of the planted truth (planted.oracle_ranks) at the same
    budget, each matrix at the base scale (α_m = α·r_m/r)."""
    model = add_adapters(task, args, device, rng)
    layers = lora_layers(model)
    resize_to(model, planted.oracle_ranks(list(layers), task.planted, args.r * len(layers)),
              args, rng["init"])
    return model


def resize_to(model: nn.Module, ranks: dict[str, int], args: argparse.Namespace,
              generator: torch.Generator) -> None:
    """Every adapter at its rank in `ranks` with the base scale kept, as initialize_fim_ranks
    does: α_m = α·r_m/r (α·√(r_m/r) with rsLoRA). For allocations made outside fimlora."""
    for name, layer in lora_layers(model).items():
        ratio = ranks[name] / args.r
        resize_lora(layer, ranks[name], generator=generator,
                    alpha=args.alpha * (math.sqrt(ratio) if args.rslora else ratio))


def compare_planted(args: argparse.Namespace, results: dict) -> dict:
    """The same planted run with uniform ranks and with the oracle's (quiet, in a temp folder):
    did the allocation beat uniform LoRA, and how much of the uniform→oracle gap did it close?"""
    import tempfile
    losses = {}
    for name, adapt in (("uniform", add_adapters), ("oracle", oracle_adapt)):
        print(f"compare: training the {name} twin ({args.steps:,} steps, quiet) ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            twin = argparse.Namespace(**{**vars(args), "method": "lora", "out": tmp,
                                         "compare": False, "resume": None, "overwrite": True})
            try:
                losses[name] = run(twin, adapt)["metrics"]["loss_ratio"]
            except Interrupted:  # the twin's checkpoint is in a temp folder about to go
                raise Interrupted(f"interrupted in --compare's {name} twin run: this run's "
                                  f"results are already in {args.out} (without the "
                                  "comparison)") from None
    mine, uni, orc = results["metrics"]["loss_ratio"], losses["uniform"], losses["oracle"]
    gap = (uni - mine) / (uni - orc) if uni != orc else float("nan")
    out = {"method": args.method, "run": mine, "uniform": uni, "oracle": orc, "gap_closed": gap}
    print(compare_lines(out))
    return out


def compare_lines(c: dict) -> str:
    """The two lines --compare prints (bench.py puts them in the README too)."""
    return (f"final loss / loss at B = 0: this run {c['run']:.4f}, uniform LoRA "
            f"{c['uniform']:.4f}, oracle {c['oracle']:.4f} (same budget, same batches)\n"
            f"{c['method']} {'beat' if c['run'] < c['uniform'] else 'did not beat'} uniform LoRA "
            f"and closed {c['gap_closed']:.0%} of the uniform→oracle gap on this planted task "
            "(one seed)")


# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None, adapt: Callable = add_adapters) -> dict:
    """Train one run and return its results. `adapt(task, args, device, rng)` turns the task's
    base model into the model to train (default: uniform LoRA, add_adapters); bench.py passes
    one that builds the same run on transformers + PEFT."""
    return run(parse_args(argv), adapt)


def run(args: argparse.Namespace, adapt: Callable, finish: Callable | None = None) -> dict:
    """main() after argument parsing: one run, from seed to saved results (and planted
    --compare), holding --out's lock from before any work to its last write (rank 0).
    `finish(results)`, if given, adds fields to the results before they are saved."""
    out, rank0 = Path(args.out), int(os.environ.get("RANK", "0")) == 0
    with runfolder.lock(out) if rank0 else contextlib.nullcontext():
        if rank0:  # the folder as it is now that it is ours: finish what a kill left, recheck
            tidy_out(out)
            check_out(args)
        results = train_run(args, adapt, finish)
        if args.compare and args.task == "planted":
            results["compare"] = compare_planted(args, results)
            if rank0:
                try:
                    write_json(out / "results.json", results)  # the run's own, just published
                except OSError as e:
                    raise ValueError(f"cannot write {e.filename} ({e.strerror}): "
                                     f"{out / 'results.json'} holds the run without the "
                                     "comparison") from None
    return results


def train_run(args: argparse.Namespace, adapt: Callable, finish: Callable | None) -> dict:
    """run() inside the lock."""
    resume = read_checkpoint(Path(args.out)) if args.resume else None
    if resume is not None:
        check_step(resume[1], args)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet = int(os.environ.get("RANK", "0")) != 0  # under torchrun only rank 0 prints
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        print(f"seed: {args.seed}")
        set_seed(args.seed)
        rng = random_streams(args.seed)
        device = resolve_device(args.device)
        rank, world = init_distributed(device, args)
        task = build_task(args, device, rng)
        model = adapt(task, args, device, rng)
        check_model(model, args)
        check_save(model, task, args)
        describe(model, task, args)
        if resume is not None:
            restore_adapters(model, *resume)
            report = resume[1]["report"]
        else:
            report = apply_method(model, task, args, rng)
        prepare_out(args, rank)
        trained = train_loop(model, task, args, rng, report, resume, (rank, world))
        metrics = final_eval(model, task, args, trained, report)
        results = {
            "args": vars(args), "seed": args.seed, "device": device.type, "world_size": world,
            **environment(device), "metrics": metrics, "eval_history": trained["evals"],
            "train_loss": trained["losses"], "segments": trained["segments"],
            "trainable_parameters": trained["trainable"],
            "total_parameters": n_params(model, False),
            "seconds": {"calibration": report["calibration_seconds"],
                        "training": trained["seconds"],
                        "per_step": trained["seconds"] / args.steps},
            "ranks": {n: m.r for n, m in lora_layers(model).items()},
            "alphas": {n: m.alpha for n, m in lora_layers(model).items()},
            **{k: v for k, v in report.items() if k != "calibration_seconds"},
            **({"fw": trained["fw"]} if trained["fw"] else {}),
            **({"planted": task.planted} if task.planted else {}),
            **({"data": task.info} if task.info else {}),
        }
        if finish is not None:
            finish(results)
        if rank == 0:
            save(model, task, args, results)
    return results


if __name__ == "__main__":
    try:
        main()
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("\ninterrupted before training started: nothing to resume", file=sys.stderr)
        sys.exit(130)
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except RuntimeError as e:  # gloo's words for a peer that froze or died
        if int(os.environ.get("WORLD_SIZE", "1")) < 2 or not re.search(
                "Timed out|timed out|closed by peer", str(e)):
            raise
        sys.exit(f"error: another torchrun process stopped answering (frozen or dead: see its "
                 f"output); {DIST_TIMEOUT}={os.environ.get(DIST_TIMEOUT, '600')} seconds bounds "
                 f"the wait. gloo: {str(e).splitlines()[0][:300]}")
