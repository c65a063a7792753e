"""Fine-tune an encoder with plain LoRA or a Fisher-guided variant, evaluate, save.

    python train.py --method fim                                  # embedded planted task, ~20 s
    python train.py --method lora --model minilm --task sst2 --data-dir ../shared/data/glue/SST-2

Methods: lora (uniform rank r), fim (FIM-LoRA rank allocation at equal budget), fw (FW-LoRA
penalty after a Fisher warm-up), da (LoRA-DA initialisation), fim+da (both). Everything that
defines a run is an argument; the results JSON stores all of them, with the seed.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import fimlora
from data import glue, planted
from lora import add_lora, lora_layers, save_adapter, write_json
from models import load_model, model_path

METHODS = ("lora", "fim", "fw", "da", "fim+da")
GLUE_TASKS = tuple(glue.TASKS)
DEFAULT_TARGETS = {"planted": "query,key,value,output.dense,intermediate.dense",
                   "glue": "query,key,value,dense"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="lora", choices=METHODS)
    p.add_argument("--model", default="tiny", help="tiny | minilm | path to an HF BERT folder")
    p.add_argument("--task", default="planted", choices=("planted",) + GLUE_TASKS)
    p.add_argument("--data-dir", default=None, help="GLUE task folder with train.tsv and dev.tsv")
    g = p.add_argument_group("LoRA")
    g.add_argument("--r", type=int, default=8, help="base rank (FIM keeps the budget r x matrices)")
    g.add_argument("--alpha", type=float, default=16.0)
    g.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter input")
    g.add_argument("--targets", default=None,
                   help="comma-separated Linear name suffixes (default: query,key,value,dense "
                        "for GLUE; the six per-block matrices for planted)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default 1000 GLUE, 300 planted)")
    g.add_argument("--epochs", type=float, default=None, help="alternative to --steps")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup", type=float, default=0.06, help="linear warm-up, fraction of steps")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm (0 = off)")
    g.add_argument("--max-len", type=int, default=128, help="max tokens per example")
    g.add_argument("--max-train", type=int, default=None, help="use the first N training rows")
    g.add_argument("--max-eval", type=int, default=None, help="use the first N dev rows")
    g.add_argument("--eval-every", type=int, default=0, help="steps between evals (0 = at end)")
    g.add_argument("--log-every", type=int, default=50)
    g = p.add_argument_group("Fisher methods")
    g.add_argument("--calib-batches", type=int, default=8, help="FIM calibration batches")
    g.add_argument("--score", default="efim", choices=("efim", "variance"))
    g.add_argument("--per-example", action="store_true", help="per-example (true) empirical Fisher")
    g.add_argument("--r-min", type=int, default=1)
    g.add_argument("--r-max", type=int, default=None, help="default 2r")
    g.add_argument("--power", type=float, default=1.0, help="ranks proportional to score**power")
    g.add_argument("--fw-warmup", type=int, default=500, help="FW-LoRA warm-up steps K")
    g.add_argument("--fw-lambda", type=float, default=1e-4)
    g.add_argument("--fw-norm", default="sum", choices=("sum", "max"))
    g.add_argument("--da-samples", type=int, default=256)
    g.add_argument("--da-beta", type=float, default=0.03)
    g.add_argument("--da-gamma", type=float, default=1024.0)
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    g.add_argument("--out", default=None,
                   help="output folder (default runs/<task>-<method>-s<seed>)")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(a: argparse.Namespace) -> None:
    """Reject bad values before any work or write, naming the value and the fix."""
    errors = []
    if a.r < 1:
        errors.append(f"--r {a.r}: use a rank >= 1")
    if a.steps is not None and a.steps < 1:
        errors.append(f"--steps {a.steps}: use >= 1")
    if a.epochs is not None and a.epochs <= 0:
        errors.append(f"--epochs {a.epochs}: use > 0")
    if a.steps is not None and a.epochs is not None:
        errors.append("--steps and --epochs both given: pick one")
    for name in ("batch_size", "max_len", "calib_batches", "da_samples"):
        if getattr(a, name) < 1:
            errors.append(f"--{name.replace('_', '-')} {getattr(a, name)}: use >= 1")
    if not 0 <= a.warmup < 1:
        errors.append(f"--warmup {a.warmup}: use a fraction in [0, 1)")
    if a.lr <= 0:
        errors.append(f"--lr {a.lr}: use > 0")
    if a.r_max is not None and a.r_max < a.r_min:
        errors.append(f"--r-max {a.r_max} < --r-min {a.r_min}: raise --r-max")
    if not a.r_min <= a.r <= (a.r_max or 2 * a.r):
        errors.append(f"--r-min {a.r_min} / --r {a.r} / --r-max {a.r_max or 2 * a.r}: the base "
                      "rank must lie in [r_min, r_max] or the budget r x matrices is infeasible")
    if a.task != "planted" and a.data_dir is None:
        errors.append(f"--task {a.task} needs --data-dir (the GLUE folder with train.tsv, dev.tsv)")
    if a.device == "cuda" and not torch.cuda.is_available():
        errors.append("--device cuda but CUDA is not available: use --device auto or cpu")
    if errors:
        raise ValueError("; ".join(errors))


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    device = torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available())
                          else "cpu")
    print(f"device: {device} ({'bf16 autocast' if device.type == 'cuda' else 'fp32'}"
          f"{', --device auto' if name == 'auto' else ''})")
    return device


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# -----------------------------------------------------------------------------
# tasks: each gives a model, training batches, a loss_fn(model, batch) and an evaluate(model)


def glue_task(args, device, gen):
    spec = glue.task_spec(args.task)
    train = glue.load_glue(args.task, args.data_dir, "train")[: args.max_train]
    dev = glue.load_glue(args.task, args.data_dir, "dev")[: args.max_eval]
    model, tok = load_model(args.model, num_labels=spec.num_labels, generator=gen)
    regression = spec.num_labels == 1

    def loss_fn(m: nn.Module, batch: dict) -> torch.Tensor:
        batch = to_device(batch, device)
        with autocast(device):
            logits = m(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        logits = logits.float()
        if regression:
            return F.mse_loss(logits.squeeze(-1), batch["labels"])
        return F.cross_entropy(logits, batch["labels"])

    def train_batches(g: torch.Generator):
        while True:
            yield from glue.batches(train, tok, args.batch_size, args.max_len, g)

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict:
        was_training = m.training
        m.eval()
        preds, labels = [], []
        for batch in glue.batches(dev, tok, 128, args.max_len, None, shuffle=False):
            b = to_device(batch, device)
            with autocast(device):
                logits = m(b["input_ids"], b["attention_mask"], b["token_type_ids"]).float()
            preds += (logits.squeeze(-1) if regression else logits.argmax(-1)).tolist()
            labels += batch["labels"].tolist()
        m.train(was_training)
        return glue.compute_metrics(args.task, preds, labels)

    return model, ["classifier"], train_batches, len(train), loss_fn, evaluate, {"train_mode": True}


def planted_task(args, device, gen):
    model, tok = load_model(args.model, num_labels=None, generator=gen)
    targets = args.targets.split(",")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and any(n == t or n.endswith("." + t) for t in targets)]
    teacher, truth = planted.plant(model, names, generator=gen)
    model.to(device), teacher.to(device)
    vocab = model.embeddings.word_embeddings.num_embeddings
    seq = min(args.max_len, 32)

    def make_batch(g):
        return planted.random_batch(vocab, args.batch_size, seq, g)

    def loss_fn(m: nn.Module, batch: dict) -> torch.Tensor:
        with autocast(device):
            return planted.planted_loss(m, teacher, to_device(batch, device)).float()

    def train_batches(g: torch.Generator):
        while True:
            yield make_batch(g)

    eval_gen = torch.Generator().manual_seed(args.seed + 3)
    eval_set = [make_batch(eval_gen) for _ in range(8)]

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict:
        was_training = m.training
        m.eval()
        loss = sum(loss_fn(m, b).item() for b in eval_set) / len(eval_set)
        m.train(was_training)
        return {"loss": loss}

    # the teacher is deterministic, so the student trains in eval mode: dropout (hidden,
    # attention, adapter) would only add noise to the regression target
    extra = {"planted": truth, "train_mode": False}
    return model, [], train_batches, None, loss_fn, evaluate, extra


# -----------------------------------------------------------------------------
# reporting


def layer_table(values: dict[str, float], fmt: str = "{}") -> str:
    """Per-matrix values (ranks, scores) as a layer x module table; matrices outside `layer.N.`
    are listed after it."""
    cells, rest = {}, {}
    for name, v in values.items():
        m = re.search(r"layer\.(\d+)\.(.+)$", name)
        if m:
            cells.setdefault(int(m.group(1)), {})[m.group(2)] = fmt.format(v)
        else:
            rest[name] = fmt.format(v)
    cols = list(dict.fromkeys(c for row in cells.values() for c in row))
    short = [c.replace("attention.self.", "").replace("attention.output.dense", "attn.out")
             .replace("intermediate.dense", "inter").replace("output.dense", "out") for c in cols]
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
        scores = fimlora.fisher_scores(model, calib, loss_fn, n_batches=len(calib), **kw)["scores"]
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


# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    is_glue = args.task != "planted"
    args.targets = args.targets or DEFAULT_TARGETS["glue" if is_glue else "planted"]
    if args.steps is None and args.epochs is None:
        args.steps = 1000 if is_glue else 300
    out = Path(args.out or f"runs/{args.task}-{args.method.replace('+', '_')}-s{args.seed}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"seed: {args.seed}")
    set_seed(args.seed)
    device = resolve_device(args.device)
    gen = torch.Generator().manual_seed(args.seed)

    task = glue_task if is_glue else planted_task
    model, heads, train_batches, n_train, loss_fn, evaluate, extra = task(args, device, gen)
    if args.epochs is not None:
        if n_train is None:
            raise ValueError("--epochs needs a finite training set: use --steps for planted")
        args.steps = max(1, math.ceil(args.epochs * n_train / args.batch_size))
    targets = args.targets.split(",")
    names = add_lora(model, targets, r=args.r, alpha=args.alpha, dropout=args.dropout,
                     rslora=args.rslora, heads=heads, generator=gen)
    model.to(device).train(extra["train_mode"])
    print(f"model: {args.model}, {n_params(model, False):,} parameters; LoRA on {len(names)} "
          f"matrices ({', '.join(targets)}), r={args.r}, alpha={args.alpha:g}"
          f"{', rsLoRA' if args.rslora else ''}")
    # one generator per stream (init: seed; training data: seed + 1; calibration data: seed + 2),
    # so calibration and re-initialisation never shift the data order: every method trains on
    # the same batches
    batches = train_batches(torch.Generator().manual_seed(args.seed + 1))
    calib_batches = train_batches(torch.Generator().manual_seed(args.seed + 2))
    report: dict = {}

    if "planted" in extra:
        planted_list = ", ".join(f"{n} (rank {r})" for n, r in extra["planted"].items())
        print(f"planted matrices: {planted_list}")
    if args.method in ("fim", "fim+da"):
        calib = list(itertools.islice(calib_batches, args.calib_batches))
        if "planted" in extra:  # before the allocation resizes A: the model it scores
            report["planted_recovery"] = planted_scores(model, calib, loss_fn, extra["planted"])
    t0 = time.perf_counter()
    if args.method in ("fim", "fim+da"):
        res = fimlora.initialize_fim_ranks(
            model, calib, loss_fn, r_min=args.r_min, r_max=args.r_max, score=args.score,
            n_batches=args.calib_batches, per_example=args.per_example, power=args.power,
            generator=gen)
        report["fim"] = {k: res[k] for k in ("scores", "ranks", "alphas", "seconds", "bytes",
                                             "memory_ratio")}
        print(f"FIM-LoRA {args.score} scores:\n{layer_table(res['scores'], '{:.3g}')}")
        print(f"FIM-LoRA calibration: {res['seconds']:.1f}s, estimator {res['bytes']:,} bytes "
              f"({res['memory_ratio']:.2%} of a full-model diagonal Fisher)")
    if args.method in ("da", "fim+da"):
        n = max(1, math.ceil(args.da_samples / args.batch_size))
        da_batches = list(itertools.islice(calib_batches, n))
        res = fimlora.lorada_init(model, da_batches, loss_fn, n_samples=args.da_samples,
                                  beta=args.da_beta, gamma=args.da_gamma,
                                  population_size=n_train)
        report["da"] = {k: v for k, v in res.items()
                        if isinstance(v, (int, float, str, list, dict))}
    calib_seconds = time.perf_counter() - t0

    ranks = {n: m.r for n, m in lora_layers(model).items()}
    print(f"ranks (total {sum(ranks.values())} = budget {args.r * len(ranks)}):\n"
          f"{layer_table(ranks)}")
    if "planted_recovery" in report:
        report["planted_recovery"]["ranks"] = planted_ranks(ranks, extra["planted"])

    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]  # biases and LayerNorms, as HF Trainer
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    warm = int(args.warmup * args.steps)

    def lr_factor(s: int) -> float:  # linear warm-up to lr, then linear decay to 0
        if s < warm:
            return s / warm
        return max(0.0, (args.steps - s) / max(1, args.steps - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    print(f"training: {args.steps:,} steps, batch {args.batch_size}, lr {args.lr:g}, "
          f"{sum(p.numel() for p in trainable):,} trainable parameters")

    history, metrics_log = [], []
    if not is_glue:  # the planted loss at B = 0 is the gap every method starts from
        metrics_log.append({"step": 0, **evaluate(model)})
        print(f"eval @ 0: {metrics_log[-1]}")
    fw = args.method == "fw"
    if fw and args.fw_warmup > args.steps // 2:
        args.fw_warmup = args.steps // 2  # keep half the run for the penalised phase
        print(f"FW-LoRA warm-up capped at {args.fw_warmup} steps (half of --steps)")
    fw_state: dict = {"ema": {}, "importance": None}
    train_seconds = 0.0
    for step in range(1, args.steps + 1):
        t_step = time.perf_counter()
        batch = next(batches)
        if fw and step <= args.fw_warmup:
            with fimlora.fw_track(model) as sq:
                loss = loss_fn(model, batch)
                loss.backward()
            fw_state["ema"] = fimlora.fw_update(fw_state["ema"], sq, step)
        else:
            if fw and fw_state["importance"] is None:
                fw_state["importance"] = fimlora.importances(fw_state["ema"], mode=args.fw_norm)
            loss = loss_fn(model, batch)
            total = loss
            if fw:
                total = loss + fimlora.fw_penalty(model, fw_state["importance"], lam=args.fw_lambda)
            total.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        history.append(loss.item())
        if not math.isfinite(history[-1]):
            raise FloatingPointError(f"loss is {history[-1]} at step {step}: lower --lr")
        train_seconds += time.perf_counter() - t_step
        if step % args.log_every == 0 or step == args.steps:
            rate = step / train_seconds
            recent = sum(history[-args.log_every:]) / len(history[-args.log_every:])
            print(f"step {step:>6,}/{args.steps:,} | loss {recent:.4g} "
                  f"| lr {sched.get_last_lr()[0]:.2e} "
                  f"| {rate:.2f} steps/s | {train_seconds / step:.3f} s/step "
                  f"| ETA {(args.steps - step) / rate:.0f}s", flush=True)
        if args.eval_every and step % args.eval_every == 0 and step != args.steps:
            metrics_log.append({"step": step, **evaluate(model)})
            print(f"eval @ {step}: {metrics_log[-1]}")
    if fw and fw_state["importance"] is not None:
        report["fw"] = {"importances": {n: float(v) for n, v in fw_state["importance"].items()}}

    metrics = evaluate(model)
    if not is_glue:
        metrics["loss_ratio"] = metrics["loss"] / metrics_log[0]["loss"]  # final / start (B = 0)
    metrics_log.append({"step": args.steps, **metrics})
    print(f"eval: {', '.join(f'{k} {v:.4g}' for k, v in metrics.items())}")
    print(f"time: calibration {calib_seconds:.1f}s, training {train_seconds:.1f}s "
          f"({train_seconds / args.steps:.3f} s/step), "
          f"overhead {calib_seconds / max(train_seconds, 1e-9):.1%}")

    results = {
        "args": vars(args), "seed": args.seed, "device": str(device), "metrics": metrics,
        "eval_history": metrics_log, "train_loss": history,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "total_parameters": n_params(model, False),
        "seconds": {"calibration": calib_seconds, "training": train_seconds,
                    "per_step": train_seconds / args.steps},
        "ranks": ranks, "alphas": {n: m.alpha for n, m in lora_layers(model).items()},
        **report, **({"planted": extra["planted"]} if "planted" in extra else {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_adapter(out / "adapter", model, targets, seed=args.seed, heads=heads)
    if is_glue:  # the same adapter in PEFT's layout, for PeftModel.from_pretrained (README)
        base = None if args.model == "tiny" else str(model_path(args.model))
        save_adapter(out / "adapter_peft", model, targets, heads=heads, format="peft",
                     base_model=base)
    write_json(out / "results.json", results)
    print(f"wrote {out / 'results.json'} and {out / 'adapter'}"
          f"{' and ' + str(out / 'adapter_peft') if is_glue else ''}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
