"""Fine-tune a model with plain LoRA or a Fisher-guided variant, evaluate, save.

    python train.py --method fim                  # the embedded planted task (--help: examples)
    torchrun --standalone --nproc_per_node 2 train.py ...          # one process per device

main(): args -> seed -> device -> task -> adapt -> method -> loop -> eval -> save. runfolder.py
keeps --out (lock, checkpoint, log, publish); data/tasks.py builds the task and its shards.
"""

import argparse
import contextlib
import io
import itertools
import math
import os
import platform
import random
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

import fimlora
import runfolder
from data import glue, planted
from data.tasks import SHARD_WEIGHT, Task, agreed, build_task, init_distributed, n_rows, shards
from lora import add_lora, lora_layers, save_adapter
from models import model_path
from models.checkpoint import is_decoder
from runfolder import CHECKPOINT, command, write_json

METHODS = ("lora", "fim", "fw", "da", "fim+da")
DEFAULT_TARGETS = {"planted": "query,key,value,output.dense,intermediate.dense",
                   "glue": "query,key,value,dense",
                   "decoder": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"}
# the methods that read each method-specific flag: given to another method it would do nothing
METHOD_FLAGS = {("fim", "fim+da"): ("calib_batches", "score", "per_example", "budget", "r_min",
                                    "r_max", "power"),
                ("fw",): ("fw_warmup", "fw_track_every", "fw_lambda", "fw_norm"),
                ("da", "fim+da"): ("da_samples", "da_beta", "da_gamma")}
DIVERGE_FLAGS = ("alpha", "weight_decay", "fw_lambda", "da_beta", "da_gamma")  # scale a step
LR = {"planted": 5e-3, "rows": 5e-4}  # default lr: the planted one lets the oracle converge
MAX_SCALE = 1e6  # alpha/r above this overflows the forward once B is nonzero
PLANTED_EXAMPLES = 2**16  # the planted task's "training set" for calibration caps (it is endless)
EXAMPLES = """examples:
  python train.py --method fim                       # the embedded planted task, ~20 s
  python train.py --method fim --compare             # ... and how it compares with uniform LoRA
  python train.py --resume runs/planted-tiny-fim-s0  # continue a run from its checkpoint
"""


# -----------------------------------------------------------------------------
# arguments: ranges in argparse types, cross-flag checks in check_args


def number(kind: type, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
           hi_open: bool = False) -> Callable[[str], int | float]:
    """An argparse type: a finite `kind` in [lo, hi] (an end excluded if open):
    number(int, 1)("0") -> error "0: use >= 1"."""
    def parse(text: str) -> int | float:
        v = kind(text)
        above, below = (lo < v if lo_open else lo <= v), (v < hi if hi_open else v <= hi)
        if math.isfinite(v) and above and below:
            return v
        want = ("a finite number" if not math.isfinite(v) else
                f"{'>' if lo_open else '>='} {lo:.10g}" if hi == math.inf else
                f"a number in {'[('[lo_open]}{lo:.10g}, {hi:.10g}{'])'[hi_open]}")
        raise argparse.ArgumentTypeError(f"{text}: use {want}")
    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"
    return parse


COUNT, INDEX, RATE = number(int, 1), number(int, 0), number(float, 0, lo_open=True)
WEIGHT, FRACTION = number(float, 0), number(float, 0, 1, hi_open=True)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # a ValueError, printed by the CLI as "error: --r 0: ..."
        raise ValueError(re.sub(r"^argument (\S+): ", r"\1 ", message))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default once: appended unless the help states it or it is None/False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        skip = action.default in (None, False, argparse.SUPPRESS) or "default" in action.help
        return action.help + ("" if skip else " (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="train.py", description=__doc__.split("\n")[0], formatter_class=HelpFormatter,
               epilog=EXAMPLES.replace("python train.py", command("train.py")))
    p.add_argument("--method", default="lora", choices=METHODS,
                   help="lora: uniform r | fim: FIM-LoRA ranks | fw: FW-LoRA | da: LoRA-DA init")
    p.add_argument("--model", default="tiny", help="tiny | minilm | tiny-llama | smollm2 | folder")
    p.add_argument("--task", default="planted", choices=("planted", *glue.TASKS),
                   help="planted: the embedded task with a known answer; else GLUE (--data-dir)")
    p.add_argument("--plants", default="reach", choices=("reach", "anywhere"), help="planted")
    p.add_argument("--data-dir", help="GLUE task folder with train.tsv and dev.tsv")
    p.add_argument("--data", metavar="FILE", help="your .csv/.tsv/.jsonl instead of --task")
    p.add_argument("--eval-data", metavar="FILE", help="evaluate on FILE, not a share of --data")
    p.add_argument("--eval-fraction", type=number(float, 0, 1, True, True),
                   help="training rows held out for eval (default: --data 0.1; GLUE dev.tsv)")
    p.add_argument("--text-field", help="--data's text column (unset: text, else sentence)")
    p.add_argument("--pair-field", help="--data's second text column, for pairs")
    p.add_argument("--label-field", default="label", help="--data's class column")
    g = p.add_argument_group("LoRA")
    g.add_argument("--r", type=COUNT, default=8, help="base rank (fim keeps r x matrices)")
    g.add_argument("--alpha", type=RATE, default=16.0, help="ΔW = (alpha/r)·B·A")
    g.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    g.add_argument("--dropout", type=FRACTION, default=0.0, help="dropout on the adapter input")
    g.add_argument("--targets", help="comma-separated Linear name suffixes (default: per model)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=COUNT, help="optimizer steps (default 1000 GLUE, 600 planted)")
    g.add_argument("--epochs", type=RATE, help="passes over the training set, instead of --steps")
    g.add_argument("--batch-size", type=number(int, 1, 2**16), default=32, help="examples a step")
    g.add_argument("--lr", type=number(float, 0, 1e15, lo_open=True),  # 1e15²: near float32 max
                   help="peak learning rate (default 5e-4 GLUE, 5e-3 planted)")
    g.add_argument("--weight-decay", type=WEIGHT, default=0.01, help="AdamW decay on matrices")
    g.add_argument("--warmup", type=FRACTION, default=0.06, help="linear warm-up, share of steps")
    g.add_argument("--grad-clip", type=WEIGHT, default=1.0, help="max grad norm (0 = off)")
    g.add_argument("--max-len", type=COUNT, default=128, help="max tokens per example")
    g.add_argument("--max-train", type=COUNT, help="use the first N training rows (default: all)")
    g.add_argument("--max-eval", type=COUNT, help="use the first N dev rows (default: all)")
    g.add_argument("--eval-every", type=INDEX, default=0, help="steps between evals (0 = at end)")
    g.add_argument("--log-every", type=COUNT, default=50, help="steps between log lines")
    g.add_argument("--grad-accum", type=COUNT, default=1, help="batches per optimizer step")
    g.add_argument("--group-by-length", action="store_true", help="batches of similar lengths")
    g = p.add_argument_group("Fisher methods (fim: fim, fim+da; fw: fw; da: da, fim+da)")
    g.add_argument("--calib-batches", type=COUNT, default=8, help="fim: calibration batches")
    g.add_argument("--score", default="efim", choices=("efim", "variance"), help="fim: score")
    g.add_argument("--per-example", action="store_true", help="fim: per-example (true) Fisher")
    g.add_argument("--budget", default="ranks", choices=("ranks", "params"), help="fim: budget")
    g.add_argument("--r-min", type=INDEX, default=1, help="fim: smallest rank of a matrix")
    g.add_argument("--r-max", type=COUNT, help="fim: largest rank of a matrix (default 2r)")
    g.add_argument("--power", type=WEIGHT, default=1.0, help="fim: ranks ∝ score**power")
    g.add_argument("--fw-warmup", type=COUNT, default=500, help="fw: warm-up steps K")
    g.add_argument("--fw-track-every", type=COUNT, default=1, help="fw: track every k-th step")
    g.add_argument("--fw-lambda", type=WEIGHT, default=1e-4, help="fw: penalty weight λ")
    g.add_argument("--fw-norm", default="sum", choices=("sum", "max"), help="fw: normalise by")
    g.add_argument("--da-samples", type=COUNT, default=256, help="da: calibration examples")
    g.add_argument("--da-beta", type=WEIGHT, default=0.03, help="da: the paper's β")
    g.add_argument("--da-gamma", type=RATE, default=1024.0, help="da: the paper's γ")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0,  # the CPU generator
                   help="seeds data order, init, calibration")  # keeps 32 bits: 2**32 is 0
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda (bf16 autocast) when available, else cpu")
    g.add_argument("--threads", type=number(int, 0, 4 * (os.cpu_count() or 1)), default=0,
                   help="CPU threads (0 = torch default)")
    g.add_argument("--out", help="output folder (default runs/<task>-<model>-<method>-s<seed>)")
    g.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    g.add_argument("--save-every", type=INDEX, default=0, help="checkpoint period (0: 4 a run)")
    g.add_argument("--resume", metavar="OUT", help="continue the run in OUT from its checkpoint")
    g.add_argument("--compare", action="store_true", help="planted: vs uniform LoRA and oracle")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments given plus the defaults that need no data, or with --resume the run's saved
    ones (--threads may change); checked, with --out, before any work."""
    p = build_parser()
    a = p.parse_args(argv)
    given = [k for k, v in vars(a).items() if v != p.get_default(k)]
    if a.resume is not None:  # the flags that would change the run are refused
        drop = [flag(k) for k in given if k not in ("resume", "threads")]
        if drop:
            raise ValueError(f"--resume takes the run's saved arguments; drop {', '.join(drop)}")
        if not Path(a.resume).is_dir():
            raise FileNotFoundError(f"--resume {a.resume}: not a folder; pass the run's --out")
        saved, out = runfolder.read_checkpoint(Path(a.resume))["args"], str(Path(a.resume))
        args = argparse.Namespace(**{**saved, "resume": out, "out": out, "overwrite": False,
                                     "threads": a.threads or saved["threads"]})
    else:
        check_args(a, given)
        task = "data" if a.data is not None else a.task
        kind = "decoder" if is_decoder(a.model) else "planted" if task == "planted" else "glue"
        out = f"runs/{task}-{Path(a.model).name or a.model}-{a.method.replace('+', '_')}-s{a.seed}"
        args = argparse.Namespace(**{  # the planted lr and steps let the oracle converge
            **vars(a), "task": task, "targets": a.targets or DEFAULT_TARGETS[kind],
            "lr": a.lr or LR["planted" if task == "planted" else "rows"], "out": a.out or out,
            "eval_fraction": a.eval_fraction or (0.1 if task == "data" else None),
            "steps": a.steps or (None if a.epochs else 600 if task == "planted" else 1000)})
    runfolder.check_out(args)
    return args


def flag(name: str) -> str:
    """The command-line flag of an args field: flag("r_max") == "--r-max"."""
    return "--" + name.replace("_", "-")


def check_args(a: argparse.Namespace, given: list[str]) -> None:
    """The checks that involve two flags or the machine (a flag's own range is its type's)."""
    data, planted = a.data is not None, a.task == "planted" and a.data is None
    r_max, scale = a.r_max or 2 * a.r, a.alpha / (math.sqrt(a.r) if a.rslora else a.r)
    need = ((3 if a.pair_field else 2) if data else
            glue.TASKS[a.task].n_special if a.task in glue.TASKS else 0)
    errors = [f"--method {a.method} ignores {', '.join(mine)} (used by --method "
              f"{' / '.join(methods)} only): drop them or pick that method"
              for methods, flags in METHOD_FLAGS.items() if a.method not in methods
              for mine in [[flag(k) for k in flags if k in given]] if mine]
    errors += [f"{flag(k)} needs --data FILE" for k in ("eval_data", "text_field", "pair_field")
               if not data and getattr(a, k)]
    lr = a.lr or LR["planted" if planted else "rows"]
    rows = [flag(k) for k in ("eval_fraction", "group_by_length", "max_train", "max_eval",
                              "max_len") if k in given]
    errors += [msg for bad, msg in [
        (a.steps and a.epochs, "--steps and --epochs both given: pick one"),
        (a.eval_data and a.eval_fraction, "--eval-data and --eval-fraction both given: pick one"),
        (a.epochs and planted, "--epochs needs a finite training set: use --steps for planted"),
        (scale > MAX_SCALE, f"--alpha {a.alpha:g}: the LoRA scale alpha/"
                            f"{'sqrt(r)' if a.rslora else 'r'} = {scale:.3g} overflows the "
                            f"forward; use a scale <= {MAX_SCALE:g}"),
        (a.r_max is not None and a.r_max < a.r_min, f"--r-max {a.r_max} < --r-min {a.r_min}: "
                                                    "raise --r-max"),
        (not a.r_min <= a.r <= r_max, f"--r-min {a.r_min} / --r {a.r} / --r-max {r_max}: the "
                                      "base rank must lie in [r_min, r_max] or the budget r x "
                                      "matrices is infeasible"),
        (a.score == "variance" and a.method.startswith("fim") and a.calib_batches < 2,
         f"--score variance with --calib-batches {a.calib_batches}: the variance of one batch "
         "gradient is 0; use --calib-batches >= 2"),
        (a.compare and not planted, "--compare needs --task planted (its oracle): drop it"),
        (planted and rows, f"--task planted draws its own rows, so {', '.join(rows)} would do "
                           "nothing: drop them or use GLUE or --data"),
        (a.targets is not None and "" in a.targets.split(","), f"--targets {a.targets!r} has an "
         "empty name: give Linear name suffixes (query,value) or drop it for the default"),
        (a.weight_decay * lr >= 1, f"--weight-decay {a.weight_decay:g} x --lr {lr:g} >= 1 flips "
                                   "every weight's sign each AdamW step: use a product < 1"),
        (a.group_by_length and is_decoder(a.model), f"--group-by-length batches encoder "
         f"classification only: drop it for --model {a.model}"),
        (a.plants != "reach" and not planted, "--plants needs --task planted: drop it"),
        (data and (a.task != "planted" or a.data_dir), "--data FILE replaces --task and "
                                                       "--data-dir: drop them"),
        (not data and a.task != "planted" and not a.data_dir,
         f"--task {a.task} needs --data-dir (the GLUE folder with train.tsv, dev.tsv)"),
        (not is_decoder(a.model) and a.max_len < need,  # decoders cut the prompt instead
         f"--max-len {a.max_len}: {'data' if data else a.task} examples need {need} special "
         f"tokens; use --max-len >= {need}"),
        (a.device == "cuda" and not torch.cuda.is_available(),
         "--device cuda but CUDA is not available: use --device auto or cpu")] if bad]
    if errors:
        raise ValueError("; ".join(errors))


def resolve(args: argparse.Namespace, task: Task) -> argparse.Namespace:
    """A new args (the one saved) with --steps from --epochs, --calib-batches and --da-samples
    capped at one pass over the data (planted: PLANTED_EXAMPLES), --fw-warmup at half --steps."""
    n = task.n_train or PLANTED_EXAMPLES
    steps = args.steps or max(1, math.ceil(args.epochs * n / (args.batch_size * args.grad_accum)))
    caps = {"calib_batches": (args.method.startswith("fim"), math.ceil(n / args.batch_size)),
            "da_samples": (args.method.endswith("da"), n),
            "fw_warmup": (args.method == "fw", steps // 2)}
    new = {"steps": steps}
    for name, (used, cap) in caps.items():
        if used and getattr(args, name) > cap:
            new[name] = cap
            print(f"{flag(name)} {getattr(args, name):,} capped at {cap:,} "
                  f"({'half of --steps' if name == 'fw_warmup' else 'one pass over the data'})")
    return argparse.Namespace(**{**vars(args), **new})


def check_model(model: nn.Module, args: argparse.Namespace) -> None:
    """Before any training: --max-len within the positions (add_lora refuses tied targets)."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions is not None and args.max_len > positions:
        raise ValueError(f"--max-len {args.max_len} exceeds the model's {positions} positions: "
                         f"use --max-len <= {positions}")


# -----------------------------------------------------------------------------
# seed, device


def random_streams(seed: int) -> dict[str, torch.Generator]:
    """Seeds random and torch (dropout), then one CPU generator per stream (init, data, calib,
    eval): calibration and init never shift the data order; every method sees the same batches."""
    random.seed(seed)
    torch.manual_seed(seed)
    return {name: torch.Generator().manual_seed(seed + k)
            for k, name in enumerate(("init", "data", "calib", "eval"))}


def resolve_device(name: str) -> torch.device:
    """cpu or cuda; under torchrun on CUDA each process's own GPU, cuda:LOCAL_RANK, made current."""
    cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    if cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= count:
            raise ValueError(f"LOCAL_RANK {local} but {count} GPU(s) visible: start torchrun "
                             f"with --nproc-per-node <= {count} (or --device cpu)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    print(f"device: {device} ({'bf16 autocast' if cuda else 'fp32'}"
          f"{', --device auto' if name == 'auto' else ''})")
    return device


# -----------------------------------------------------------------------------
# adapt, then the method: each changes the freshly adapted model before training


def add_adapters(task: Task, args: argparse.Namespace, device: torch.device,
                 rng: dict[str, torch.Generator]) -> nn.Module:
    """Uniform LoRA of rank r on every target; returns the model to train."""
    add_lora(task.model, args.targets.split(","), r=args.r, alpha=args.alpha,
             dropout=args.dropout, rslora=args.rslora, heads=task.heads, generator=rng["init"])
    thin = [(min(m.in_features, m.out_features), n) for n, m in lora_layers(task.model).items()
            if min(m.in_features, m.out_features) < args.r]
    if thin:
        raise ValueError(f"--r {args.r} exceeds min(d_in, d_out) = {thin[0][0]} of {thin[0][1]} "
                         f"({len(thin)} such target matrices): lower --r")
    return task.model.to(device).train(task.train_mode)


def apply_method(model: nn.Module, task: Task, args: argparse.Namespace,
                 rng: dict[str, torch.Generator], rank: int, world: int) -> dict:
    """fim and da change the adapted model before step 1 (fw acts in the loop); returns what
    they did. Under torchrun rank k calibrates on batches k, k + world, ... (maybe none); the
    statistics are all-reduced, so every rank gets the same model."""
    calib = task.train_batches(rng["calib"])
    report = {"loss_at_B0": task.evaluate(model)["loss"]} if task.planted else {}  # loss_ratio's
    if args.method.startswith("fim"):
        t0 = time.perf_counter()
        mine = list(itertools.islice(calib, rank, args.calib_batches, world))
        res = fimlora.initialize_fim_ranks(
            model, mine, task.loss_fn, r_min=args.r_min, r_max=args.r_max, score=args.score,
            n_batches=args.calib_batches, per_example=args.per_example, power=args.power,
            generator=rng["init"], budget_unit=args.budget)
        report["fim"] = {**res, "seconds": time.perf_counter() - t0}
        print(f"FIM-LoRA {args.score} scores:\n" + layer_table(res["scores"], "{:.3g}"))
    if args.method.endswith("da"):  # --da-samples examples, the last batch cut short
        t0, n = time.perf_counter(), max(1, math.ceil(args.da_samples / args.batch_size))
        batches = list(itertools.islice(calib, n))
        sizes = [n_rows(b) for b in batches]
        take = [min(k, max(0, args.da_samples - at))
                for k, at in zip(sizes, itertools.accumulate(sizes, initial=0))]
        res = fimlora.lorada_init(model, batches[rank::world], task.loss_fn,
                                  n_samples=max(1, sum(take[rank::world])), da_beta=args.da_beta,
                                  da_gamma=args.da_gamma, population_size=task.n_train)
        report["da"] = {**res, "seconds": time.perf_counter() - t0}
    report["calibration_seconds"] = sum(report[k]["seconds"] for k in ("fim", "da") if k in report)
    layers = lora_layers(model)
    report["adapter_parameters"] = sum(m.lora_A.numel() + m.lora_B.numel() for m in layers.values())
    ranks = {n: m.r for n, m in layers.items()}
    print(f"ranks (total {sum(ranks.values())}; {report['adapter_parameters']:,} adapter "
          f"parameters):\n{layer_table(ranks)}")
    return report


def layer_table(values: dict[str, float], fmt: str = "{}") -> str:
    """Per-matrix values (ranks, scores) as a layer x module table; matrices outside `layer.N.`
    are listed after it."""
    cells, rest = {}, []
    for name, v in values.items():
        m = re.search(r"layers?\.(\d+)\.(.+)$", name)
        if m:
            cells.setdefault(int(m[1]), {})[m[2]] = fmt.format(v)
        else:
            rest.append(f"{name}: {fmt.format(v)}")
    cols = list(dict.fromkeys(c for row in cells.values() for c in row))
    short = [c.replace("attention.self.", "").replace("attention.output.dense", "attn.out")
             .replace("intermediate.dense", "inter").replace("output.dense", "out")
             .replace("self_attn.", "").replace("mlp.", "") for c in cols]
    rows = [f"{k:>5} " + " ".join(f"{cells[k].get(c, '-'):>9}" for c in cols)
            for k in sorted(cells)]
    return "\n".join(["layer " + " ".join(f"{s:>9}" for s in short), *rows, *rest])


# -----------------------------------------------------------------------------
# training loop and its checkpoint


def make_optimizer(model: nn.Module, args: argparse.Namespace):
    """AdamW with weight decay on matrices only (not biases and LayerNorms, as HF Trainer), and
    the lr schedule: linear warm-up to 1 over warmup·steps steps, then linear decay to 0."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}], lr=args.lr)
    warm = int(args.warmup * args.steps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / warm if s < warm else max(
        0.0, (args.steps - s) / max(1, args.steps - warm)))


def micro_backward(train_model: nn.Module, loss_fn: Callable, micro: list[dict],
                   penalty: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Forward and backward of one step's micro-batches, micro-batch c's mean loss weighted by
    n_c/Σn: the gradients of one batch of all Σn examples. Returns the step's loss."""
    sizes = [n_rows(b) / b.get(SHARD_WEIGHT, 1) for b in micro]
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
    """FW-LoRA's step: track ‖∂L/∂W_m‖² every k-th warm-up step (EMA factor β^k), then the
    frozen importances' penalty; `state` holds the EMA and the importances."""
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
    """Ctrl-C or SIGTERM during training: a checkpoint was saved."""


class Diverged(FloatingPointError):
    """A non-finite loss or parameter: nothing after the last good checkpoint is kept."""


@contextlib.contextmanager
def stop_requests() -> Iterator[dict]:
    """While training, Ctrl-C and SIGTERM set a flag the loop reads after each step (then it
    checkpoints and stops); a second Ctrl-C interrupts at once."""
    stop = {"set": False}

    def handler(signum, frame):
        if stop["set"]:
            raise KeyboardInterrupt
        stop["set"] = True
    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield stop
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def divergence(step: int, what: str, args: argparse.Namespace, last_good: int) -> Diverged:
    """The error for a non-finite loss or parameter, naming the likely cause."""
    moved = "".join(f" or {flag(k)} {getattr(args, k):g}" for k in DIVERGE_FLAGS
                    if getattr(args, k) != build_parser().get_default(k))
    cause = (f"lower --lr {args.lr:g}{moved}" if args.grad_clip else
             f"no gradient clipping: set --grad-clip 1.0, or lower --lr {args.lr:g}{moved}")
    kept = (f"the last good checkpoint (step {last_good}) is in {Path(args.out) / CHECKPOINT}"
            if last_good else "no checkpoint was written before it")
    return Diverged(f"{what} at step {step}; likely cause: {cause} (or NaN in the data or the "
                    f"model's weights); {kept}")


def train_loop(model: nn.Module, task: Task, args: argparse.Namespace,
               rng: dict[str, torch.Generator], report: dict, resume: dict | None,
               dist_info: tuple[int, int]) -> dict:
    """--steps AdamW steps on --grad-accum batches each, a checkpoint every --save-every steps
    (rank 0 writes); returns the losses, evals and seconds. `resume` (a checkpoint) continues
    where it stopped, after replaying the batches already seen."""
    (rank, world), out = dist_info, Path(args.out)
    opt, sched = make_optimizer(model, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = {"losses": [], "evals": [], "seconds": 0.0, "report": report,
             "fw": {"ema": {}, "importance": None}}
    if resume is not None:
        runfolder.restore(model, opt, sched, state, resume, args.out)
    start = len(state["losses"])
    print(f"training: {args.steps:,} steps, lr {args.lr:g}, {n_params(model):,} trainable "
          "parameters" + (f"; resumed at step {start:,}" if start else ""))
    runfolder.trim_log(out, start)
    if resume is None and task.planted:
        log_eval(args, state, 0, task.evaluate(model))
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    batches = shards(task.train_batches(rng["data"]), rank, world)
    step_fn = fw_step(train_model, model, task, args, state["fw"]) if args.method == "fw" else (
        lambda k, micro: micro_backward(train_model, task.loss_fn, micro))
    for _ in range(start * args.grad_accum):  # the data order is a function of the seed
        next(batches)
    if resume is not None:
        if not torch.equal(rng["data"].get_state(), resume["rng"]["data"]):
            raise ValueError(f"--resume {out}: the training data no longer gives the batches "
                             "the checkpoint saw (files or --max-train changed?)")
        torch.set_rng_state(resume["rng"]["torch"])  # dropout goes on where it stopped
        if resume["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
    every, last_good = args.save_every or max(1, math.ceil(args.steps / 4)), start
    with stop_requests() as stop:
        for step in range(start + 1, args.steps + 1):
            t0 = time.perf_counter()
            loss = step_fn(step, [next(batches) for _ in range(args.grad_accum)])
            if world > 1:  # log the global batch's loss: the mean of the weighted shards' means
                torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG)
            value = loss.item()
            if not math.isfinite(value):
                raise divergence(step, f"the loss is {value}", args, last_good)
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            # one fused norm and one sync: finite iff every trainable entry is finite
            if not math.isfinite(torch.nn.utils.get_total_norm(trainable).item()):
                raise divergence(step, "a parameter became non-finite", args, last_good)
            state["losses"].append(value)
            state["seconds"] += time.perf_counter() - t0
            log_step(step, state, sched, args)
            if args.eval_every and step % args.eval_every == 0 and step != args.steps:
                log_eval(args, state, step, task.evaluate(model))
            stopping = agreed(stop["set"], world, loss.device)
            if (step % every == 0 and step != args.steps) or stopping:
                if rank == 0:
                    ckpt = runfolder.checkpoint(model, opt, sched, rng, state, args)
                    runfolder.save_checkpoint(out, ckpt, last_good)
                last_good = step
            if stopping:
                raise Interrupted(f"interrupted at step {step:,}/{args.steps:,}, checkpoint "
                                  f"saved: resume with '{command('train.py', '--resume', out)}'")
    fw = state["fw"]["importance"]
    return {**state, "last_good": last_good,
            "fw": {"importances": {n: float(v) for n, v in fw.items()}} if fw else None}


def log_step(step: int, state: dict, sched, args: argparse.Namespace) -> None:
    """Every --log-every steps: a line on stdout and one in <out>/log.jsonl."""
    if step % args.log_every == 0 or step == args.steps:
        recent, seconds = state["losses"][-args.log_every:], state["seconds"]
        done, loss, lr = len(state["losses"]), sum(recent) / len(recent), sched.get_last_lr()[0]
        print(f"step {step:>6,}/{args.steps:,} | loss {loss:.4g} | lr {lr:.2e} | "
              f"{seconds / done:.3f} s/step | ETA {(args.steps - step) * seconds / done:.0f}s",
              flush=True)
        runfolder.log(Path(args.out), {"step": step, "loss": loss, "lr": lr, "elapsed": seconds,
                                       "examples_per_s": done * args.batch_size / seconds})


def log_eval(args: argparse.Namespace, state: dict, step: int, metrics: dict) -> None:
    state["evals"].append({"step": step, **metrics})
    print(f"eval @ {step}: {', '.join(f'{k} {v:.4g}' for k, v in metrics.items())}")
    runfolder.log(Path(args.out), {"step": step, "eval": metrics, "elapsed": state["seconds"]})


# -----------------------------------------------------------------------------
# results


def n_params(model: nn.Module, trainable: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def environment(device: torch.device | None = None) -> dict:
    """{"versions", "machine"} for a results file (device None: the default CUDA device if any)."""
    on_cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    return {"versions": {"torch": torch.__version__, "python": platform.python_version()},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "threads": torch.get_num_threads(),
                        "cuda": torch.cuda.get_device_name(device) if on_cuda else None}}


def write_adapters(folder: Path, model: nn.Module, task: Task, args: argparse.Namespace) -> None:
    """The adapter, and for GLUE its PEFT copy, into folder (nothing for a peer's model)."""
    targets = args.targets.split(",")
    if lora_layers(model):
        save_adapter(folder / "adapter", model, targets, seed=args.seed, heads=task.heads)
    if lora_layers(model) and task.planted is None:  # for PeftModel.from_pretrained
        base = None if args.model in ("tiny", "tiny-llama") else str(model_path(args.model))
        save_adapter(folder / "adapter_peft", model, targets, heads=task.heads, format="peft",
                     base_model=base, task_type="CAUSAL_LM" if is_decoder(args.model) else None)


def compare_planted(args: argparse.Namespace, results: dict) -> dict:
    """The same planted run with uniform ranks and with planted.oracle_ranks at the same budget
    (quiet, in temp folders): did this run beat uniform, and how much of the gap did it close?"""
    def oracle(task, args, device, rng):
        model = add_adapters(task, args, device, rng)
        names = list(lora_layers(model))
        fimlora.resize_ranks(model, planted.oracle_ranks(names, task.planted, args.r * len(names)),
                             generator=rng["init"])
        return model
    loss = {}
    for name, adapt in (("uniform", add_adapters), ("oracle", oracle)):
        print(f"compare: training the {name} twin ({args.steps:,} steps, quiet) ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            twin = argparse.Namespace(**{**vars(args), "method": "lora", "out": tmp,
                                         "compare": False, "resume": None, "overwrite": True})
            try:
                loss[name] = run(twin, adapt)["metrics"]["loss_ratio"]
            except Interrupted:  # the twin's checkpoint is in a temp folder about to go
                raise Interrupted(f"interrupted in --compare's {name} twin run: this run's "
                                  f"results are already in {args.out}") from None
    mine, uni, orc = results["metrics"]["loss_ratio"], loss["uniform"], loss["oracle"]
    gap = (uni - mine) / (uni - orc) if uni != orc else float("nan")
    print(f"final loss / loss at B = 0: this run {mine:.4f}, uniform LoRA {uni:.4f}, oracle "
          f"{orc:.4f} (same budget, same batches)\n{args.method} "
          f"{'beat' if mine < uni else 'did not beat'} uniform LoRA and closed {gap:.0%} of the "
          "uniform→oracle gap on this planted task (one seed)")
    return {"method": args.method, "run": mine, "uniform": uni, "oracle": orc, "gap_closed": gap}


# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None, adapt: Callable = add_adapters,
         finish: Callable | None = None) -> dict:
    """Train one run and return its results: `adapt(task, args, device, rng)` returns the model
    to train (default uniform LoRA), `finish(results)` adds fields before they are saved."""
    return run(parse_args(argv), adapt, finish)


def run(args: argparse.Namespace, adapt: Callable = add_adapters,
        finish: Callable | None = None) -> dict:
    """main() after parse_args: seed, device, task, adapt, method, loop, eval, publish (and
    --compare), holding --out's lock from before any work to its last write (rank 0)."""
    out, rank0 = Path(args.out), int(os.environ.get("RANK", "0")) == 0
    with runfolder.lock(out) if rank0 else contextlib.redirect_stdout(io.StringIO()):
        if rank0:  # the folder as it is now that it is ours: finish what a kill left, recheck
            runfolder.tidy_out(out)
            runfolder.check_out(args)
        results = train_run(args, adapt, finish)
        if args.compare:
            results["compare"] = compare_planted(argparse.Namespace(**results["args"]), results)
            try:  # the run's results.json, just published, now with the comparison
                if rank0:
                    write_json(out / "results.json", results)
            except OSError as e:
                raise ValueError(f"cannot write {e.filename} ({e.strerror}): {out} holds the "
                                 "run without the comparison") from None
    return results


def train_run(args: argparse.Namespace, adapt: Callable, finish: Callable | None) -> dict:
    """run() inside the lock."""
    resume = runfolder.read_checkpoint(Path(args.out)) if args.resume else None
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"seed: {args.seed}")
    rng = random_streams(args.seed)
    device = resolve_device(args.device)
    task, rank, world = init_distributed(build_task(args, device, rng), device, args.batch_size)
    if i := task.info:  # the user's file as read: a stray label or a tiny split shows here
        kinds = f"{len(i['labels'])} labels: {', '.join(map(repr, i['labels'][:8]))}"[:120]
        print(f"data: {i['n_train']:,} train / {i['n_eval']:,} eval rows ({i['eval']}); "
              f"{kinds if i['labels'] else 'free-form completions'}")
    args = resolve(args, task)
    model = adapt(task, args, device, rng)
    check_model(model, args)
    with tempfile.TemporaryDirectory() as tmp:  # save()'s checks, before any training
        write_adapters(Path(tmp), model, task, args)
    print(f"model: {args.model}, {n_params(model, False):,} parameters; LoRA on "
          f"{len(lora_layers(model))} matrices ({args.targets}), r={args.r}")
    report = resume["report"] if resume else apply_method(model, task, args, rng, rank, world)
    out = Path(args.out)
    if rank == 0:  # --overwrite: the old checkpoint goes, its results stay until ours
        for name in (CHECKPOINT, "checkpoint") if args.overwrite else ():  # (an older fimlora's)
            runfolder.remove(out / name)
    trained = train_loop(model, task, args, rng, report, resume, (rank, world))
    if not task.planted:  # a dev set can take a while
        print(f"evaluating at step {args.steps:,} ...", flush=True)
    metrics = task.evaluate(model)
    if task.planted:
        metrics["loss_ratio"] = metrics["loss"] / report["loss_at_B0"]  # final / B = 0
    log_eval(args, trained, args.steps, metrics)
    seconds, calib = trained["seconds"], report["calibration_seconds"]
    print(f"time: calibration {calib:.1f}s, training {seconds:.1f}s "
          f"({seconds / args.steps:.3f} s/step), overhead {calib / max(seconds, 1e-9):.1%}")
    layers = lora_layers(model)
    results = {
        "args": vars(args), "seed": args.seed, "device": device.type, "world_size": world,
        **environment(device), "metrics": metrics, "eval_history": trained["evals"],
        "train_loss": trained["losses"],
        "trainable_parameters": n_params(model), "total_parameters": n_params(model, False),
        "seconds": {"calibration": calib, "training": seconds, "per_step": seconds / args.steps},
        "ranks": {n: m.r for n, m in layers.items()},
        "alphas": {n: m.alpha for n, m in layers.items()},
        **{k: v for k, v in report.items() if k != "calibration_seconds"},
        **({"fw": trained["fw"]} if trained["fw"] else {}),
        **({"planted": task.planted} if task.planted else {}),
        **({"data": task.info} if task.info else {})}
    if finish is not None:
        finish(results)

    def write(folder: Path) -> None:  # what runfolder.publish puts in --out together
        write_adapters(folder, model, task, args)
        write_json(folder / "results.json", results)
    if rank == 0:
        runfolder.publish(out, write, trained["last_good"])
        print(f"wrote {out}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"\n{str(e) or 'interrupted before training: nothing to resume'}", file=sys.stderr)
        sys.exit(130)
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
