"""Speed and memory, side by side in one process: fimlora vs transformers + PEFT on MiniLM.

    python bench.py                 # writes runs/bench.json and prints a markdown table
    python bench.py --steps 5 --model tiny --no-peers     # quick, no peers needed
    python bench.py --planted-study   # uniform vs oracle vs every FIM score, planted task
    python bench.py --peft-sst2 ../shared/data/glue/SST-2      # PEFT on the same batches

Every row is timed in the same process on the same batch (interleaved, median of --steps
repeats after --warmup), so the ratios are meaningful even when absolute times drift.
Rows: training step (forward + backward + AdamW) with full fine-tuning, PEFT LoRA and our
LoRA; inference forward (HF, ours); FIM-LoRA calibration and LoRA-DA init per batch; and the
estimator's memory against a full-model diagonal Fisher.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fimlora
from lora import add_lora, lora_layers
from models import load_model
from train import write_json

TARGETS = ["query", "key", "value", "dense"]


def batch_of(tok, n: int, tokens: int, gen: torch.Generator) -> dict:
    """n sentences that tokenize to exactly `tokens` ids ([CLS] ... [SEP]), labels 0/1."""
    words = ["the", "movie", "was", "not", "very", "good", "and", "i", "liked", "it"]
    idx = torch.randint(len(words), (n, 4 * tokens), generator=gen).tolist()
    b = tok.batch([" ".join(words[i] for i in row) for row in idx], max_len=tokens)
    b["labels"] = torch.randint(2, (n,), generator=gen)
    return b


def train_step_fn(model: nn.Module, batch: dict, call):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        loss = F.cross_entropy(call(model, batch), batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def ours(m, b):
    return m(b["input_ids"], b["attention_mask"], b["token_type_ids"])


def hf(m, b):
    return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
             token_type_ids=b["token_type_ids"]).logits


# -----------------------------------------------------------------------------
# planted study: does an allocation earn its budget? (python bench.py --planted-study)

PLANTED_CRITERION = ("the oracle allocation (planted matrices at their planted rank, the rest "
                     "of the rank budget spread evenly) ends at <= 0.5 x uniform LoRA's final "
                     "loss in every seed; otherwise the task cannot judge allocation")
FIM_SCORES = ("efim", "variance", "per-example", "gradw", "kfac", "lorada", "random")


def _resize_to(model: nn.Module, ranks: dict[str, int], args, generator) -> None:
    """Every adapter at its rank in `ranks`, α_m = α·r_m/r (α·√(r_m/r) with rsLoRA): the base
    scale α/r is kept, as initialize_fim_ranks does."""
    from lora import resize_lora
    for name, layer in lora_layers(model).items():
        ratio = ranks[name] / args.r
        alpha = args.alpha * (ratio ** 0.5 if args.rslora else ratio)
        resize_lora(layer, ranks[name], alpha=alpha, generator=generator)


def _planted_adapt(allocation: str, record: dict, r_max: int):
    """train.main's `adapt` for one study run: uniform LoRA (add_adapters), then the oracle or a
    FIM allocation at the same budget, calibrated on train.py's calibration stream. What it
    allocated and how long that took go into `record`."""
    import itertools

    import train
    from data import planted

    def adapt(task, args, device, rng):
        model = train.add_adapters(task, args, device, rng)
        layers = lora_layers(model)
        budget = args.r * len(layers)
        t0 = time.perf_counter()
        if allocation == "oracle":
            ranks = planted.oracle_ranks(list(layers), task.planted, budget)
            _resize_to(model, ranks, args, rng["init"])
        elif allocation != "uniform":
            score, _, unit = allocation.partition(" ")
            calib = list(itertools.islice(task.train_batches(rng["calib"]), args.calib_batches))
            kw = {"per_example": True} if score == "per-example" else {"score": score}
            if unit == "params":  # budget in parameters: a rank of m costs d_in + d_out
                costs = {n: m.in_features + m.out_features for n, m in layers.items()}
                scores = fimlora.fisher_scores(model, calib, task.loss_fn, **kw)["scores"]
                ranks = fimlora.allocate_ranks(scores, sum(args.r * c for c in costs.values()),
                                               1, r_max, costs=costs)
                _resize_to(model, ranks, args, rng["init"])
            else:
                fimlora.initialize_fim_ranks(model, calib, task.loss_fn, r_max=r_max,
                                             generator=rng["init"], **kw)
        record["calibration_seconds"] = time.perf_counter() - t0
        record["ranks"] = {n: m.r for n, m in lora_layers(model).items()}
        return model
    return adapt


def _available(score: str) -> bool:
    """Whether fimlora.fisher_scores takes this score now (others add scores over time)."""
    if score == "per-example":
        return True
    model = nn.Sequential(nn.Linear(2, 2))
    add_lora(model, ["0"], r=1, alpha=1)
    loss_fn = lambda m, b: m(b).square().mean()  # noqa: E731
    try:
        fimlora.fisher_scores(model, [torch.ones(1, 2)], loss_fn, score=score)
    except (ValueError, TypeError) as e:
        return "score" not in str(e)
    return True


def planted_study(seeds: int, steps: int, threads: int, out: str) -> dict:
    """Per seed: uniform LoRA, the oracle and FIM-LoRA with every available score at the same
    rank budget (efim also at the same parameter budget), on train.py's planted task with
    data/planted.py's defaults. Checks PLANTED_CRITERION, then reports each score's final loss
    relative to uniform and oracle and the share of the uniform -> oracle gap it closes."""
    import subprocess

    import train
    from data import planted
    r_max = planted.PLANT_RANK  # so any allocation can give a matrix its planted rank
    scores = [s for s in FIM_SCORES if _available(s)]
    skipped = [s for s in FIM_SCORES if s not in scores]
    runs = ["uniform", "oracle", *scores, "efim params"]
    per_seed: list[dict] = []
    for seed in range(seeds):
        rows: dict[str, dict] = {}
        for name in runs:
            record: dict = {}
            with tempfile.TemporaryDirectory() as tmp:
                res = train.main(["--method", "lora", "--seed", str(seed), "--steps", str(steps),
                                  "--threads", str(threads), "--log-every", str(steps),
                                  "--out", tmp], adapt=_planted_adapt(name, record, r_max))
            rec = planted.rank_recovery(record["ranks"], res["planted"])
            rows[name] = {"final_loss": res["metrics"]["loss"],
                          "loss_ratio": res["metrics"]["loss_ratio"],
                          "share_planted": rec["share_planted"], "covered": rec["covered"],
                          "calibration_seconds": record["calibration_seconds"],
                          "training_seconds": res["seconds"]["training"],
                          "ranks": record["ranks"]}
        u, o = rows["uniform"]["final_loss"], rows["oracle"]["final_loss"]
        for row in rows.values():
            row["vs_uniform"] = row["final_loss"] / u
            row["vs_oracle"] = row["final_loss"] / o
            row["gap_closed"] = (u - row["final_loss"]) / (u - o) if u != o else float("nan")
        per_seed.append({"seed": seed, "planted": res["planted"], "runs": rows})
        print(f"seed {seed}: oracle / uniform = {o / u:.3f}", flush=True)
    ratios = [s["runs"]["oracle"]["vs_uniform"] for s in per_seed]
    summary = {}
    for name in runs:
        col = {k: [s["runs"][name][k] for s in per_seed]
               for k in ("loss_ratio", "vs_uniform", "vs_oracle", "gap_closed", "share_planted",
                         "calibration_seconds")}
        summary[name] = {k: {"mean": statistics.mean(v),
                             "std": statistics.stdev(v) if len(v) > 1 else 0.0}
                         for k, v in col.items()}
        summary[name]["closes_half_gap_seeds"] = sum(g >= 0.5 for g in col["gap_closed"])
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:
        commit = None
    result = {
        "what": "planted task (data/planted.py defaults) on train.py's tiny encoder: final eval "
                "loss of each allocation at the same budget (r x matrices ranks; 'efim params': "
                "the same budget in parameters, a rank costing d_in + d_out)",
        "criterion": PLANTED_CRITERION,
        "criterion_oracle_over_uniform": ratios,
        "criterion_held": all(r <= 0.5 for r in ratios),
        "fields": {"loss_ratio": "final eval loss / eval loss at B = 0",
                   "vs_uniform": "final loss / uniform LoRA's final loss, same seed",
                   "vs_oracle": "final loss / the oracle's final loss, same seed",
                   "gap_closed": "(uniform - run) / (uniform - oracle), same seed",
                   "share_planted": "share of the total rank on planted matrices "
                                    "(data/planted.rank_recovery)",
                   "covered": "planted matrices given at least their planted rank",
                   "calibration_seconds": "allocation time inside adapt (0 for uniform)",
                   "closes_half_gap_seeds": "seeds with gap_closed >= 0.5"},
        "design": {"plant_rank": planted.PLANT_RANK, "plant_effect": planted.PLANT_EFFECT,
                   "reach": planted.REACH, "n_planted": 3, "r": 8, "r_max": r_max},
        "args": {"seeds": seeds, "steps": steps, "threads": threads},
        "scores_run": scores, "scores_skipped": skipped,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "commit": commit},
        "summary": summary, "per_seed": per_seed,
    }
    print(f"\ncriterion: {PLANTED_CRITERION}\noracle / uniform per seed: "
          + ", ".join(f"{r:.3f}" for r in ratios)
          + f" -> {'holds' if result['criterion_held'] else 'does NOT hold'}")
    if skipped:
        print(f"scores not available in fimlora yet (skipped): {', '.join(skipped)}")
    print(f"\n| run ({seeds} seeds, {steps} steps) | final / B=0 loss, mean ± std | vs uniform "
          "| gap closed | closes >= 50 % of the gap | share of rank on planted | per seed "
          "(final / B=0) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, s in summary.items():
        per = ", ".join(f"{x['runs'][name]['loss_ratio']:.4f}" for x in per_seed)
        print(f"| {name} | {s['loss_ratio']['mean']:.4f} ± {s['loss_ratio']['std']:.4f} "
              f"| {s['vs_uniform']['mean']:.3f} | {s['gap_closed']['mean']:.2f} "
              f"| {s['closes_half_gap_seeds']} of {seeds} | {s['share_planted']['mean']:.2f} "
              f"| {per} |")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"wrote {out}")
    return result


def planted_study_main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(description="planted study: uniform vs oracle vs FIM scores")
    p.add_argument("--planted-study", action="store_true", required=True)
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    p.add_argument("--steps", type=int, default=300, help="training steps per run")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    p.add_argument("--out", default="results/planted_study.json")
    a = p.parse_args(argv)
    if a.seeds < 2 or a.steps < 1:
        raise ValueError(f"--seeds {a.seeds} / --steps {a.steps}: use >= 2 seeds (a spread "
                         "needs two) and >= 1 step")
    return planted_study(a.seeds, a.steps, a.threads, a.out)


class _HFCall(nn.Module):
    """train.py calls model(input_ids, attention_mask, token_type_ids) and reads logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).logits


def peft_adapt(task, args, device, rng) -> nn.Module:
    """train.main's `adapt` step on transformers + PEFT: our model is adapted first (so every
    random draw happens as in train.py), then the HF model gets its fresh classifier and every
    lora_A copied from ours, so the two runs differ only in the model and LoRA code."""
    import peft
    import transformers

    import train
    from models import model_path
    ours = train.add_adapters(task, args, device, rng)
    hf = transformers.BertForSequenceClassification.from_pretrained(
        model_path(args.model), num_labels=ours.classifier.out_features)
    hf.classifier.load_state_dict(ours.classifier.state_dict())
    model = peft.get_peft_model(hf, peft.LoraConfig(
        r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, use_rslora=args.rslora,
        target_modules=args.targets.split(","), modules_to_save=list(task.heads)))
    layers = dict(ours.named_modules())
    with torch.no_grad():
        for n, m in model.base_model.model.named_modules():
            if isinstance(m, peft.tuners.lora.LoraLayer):
                m.lora_A["default"].weight.copy_(layers[n].lora_A)
    return _HFCall(model).to(device).train(task.train_mode)


def peft_train(argv: list[str]) -> dict:
    """train.main with transformers + PEFT in place of our model and LoRA (peft_adapt): the same
    batches, loss, optimizer, schedule, evaluation and initial weights. For the plain-LoRA parity
    check on SST-2; writes results.json only (PEFT saves its own way)."""
    import train
    return train.main(argv, adapt=peft_adapt)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="fimlora speed/memory benchmark")
    p.add_argument("--model", default="minilm")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-peers", action="store_true", help="skip transformers / peft rows")
    p.add_argument("--out", default="runs/bench.json")
    p.add_argument("--planted-study", action="store_true",
                   help="instead: the planted study (its own flags: --seeds, --steps, --threads)")
    p.add_argument("--peft-sst2", metavar="DATA_DIR", default=None,
                   help="instead: train.py's SST-2 recipe with transformers + PEFT (same batches "
                        "and initial weights) for the plain-LoRA parity check; train.py "
                        "arguments may follow a '--'")
    argv = sys.argv[1:] if argv is None else argv
    if "--planted-study" in argv:
        return planted_study_main(argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:len(argv) - len(rest) - bool(rest)])
    if args.peft_sst2:
        return peft_train(["--method", "lora", "--model", "minilm", "--task", "sst2",
                           "--data-dir", args.peft_sst2, "--out", "runs/sst2-peft-s0", *rest])
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    base, tok = load_model(args.model, num_labels=2, generator=gen)
    batch = batch_of(tok, args.batch_size, args.tokens, gen)

    lora_model = copy.deepcopy(base)
    add_lora(lora_model, TARGETS, r=args.r, alpha=2 * args.r, heads=["classifier"])
    fns = {"train step, fimlora LoRA": train_step_fn(lora_model, batch, ours)}
    full = copy.deepcopy(base)
    fns["train step, fimlora full fine-tune"] = train_step_fn(full, batch, ours)
    infer = base.eval()
    fns["inference forward, fimlora"] = lambda: torch.no_grad()(ours)(infer, batch)

    if not args.no_peers:
        import peft
        import transformers
        from models import model_path
        path = model_path(args.model)
        hf_full = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=2)
        hf_lora = peft.get_peft_model(
            transformers.BertForSequenceClassification.from_pretrained(path, num_labels=2),
            peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS,
                            lora_dropout=0.0, modules_to_save=["classifier"]))
        hf_full.train(), hf_lora.train()
        fns["train step, HF full fine-tune"] = train_step_fn(hf_full, batch, hf)
        fns["train step, HF + PEFT LoRA"] = train_step_fn(hf_lora, batch, hf)
        hf_eval = transformers.BertForSequenceClassification.from_pretrained(
            path, num_labels=2).eval()
        fns["inference forward, HF"] = lambda: torch.no_grad()(hf)(hf_eval, batch)

    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(args.steps):  # interleaved, so drift hits every row alike
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t)
    rows = {name: statistics.median(v) for name, v in samples.items()}

    loss_fn = lambda m, b: F.cross_entropy(ours(m, b), b["labels"])  # noqa: E731
    fim_model = copy.deepcopy(base)
    add_lora(fim_model, TARGETS, r=args.r, alpha=2 * args.r, heads=["classifier"])
    held = 4 * sum(m.lora_B.numel() for m in lora_layers(fim_model).values())  # one (d_out, r)
    memory_ratio = held / (4 * sum(p.numel() for p in fim_model.parameters()))
    t = time.perf_counter()
    fimlora.initialize_fim_ranks(fim_model, [batch] * 8, loss_fn, n_batches=8)
    rows["FIM-LoRA calibration, 8 batches"] = time.perf_counter() - t
    t = time.perf_counter()
    fimlora.fisher_scores(fim_model, [batch] * 8, loss_fn, per_example=True)
    rows["FIM-LoRA per-example calibration, 8 batches"] = time.perf_counter() - t
    da_model = copy.deepcopy(base)
    add_lora(da_model, TARGETS, r=args.r, alpha=2 * args.r, heads=["classifier"])
    t = time.perf_counter()
    fimlora.lorada_init(da_model, [batch] * 8, loss_fn, n_samples=8 * args.batch_size)
    rows["LoRA-DA init, 256 samples"] = time.perf_counter() - t

    ref = rows.get("train step, HF + PEFT LoRA")
    result = {
        "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.machine(), "model": args.model, "batch": [args.batch_size, args.tokens],
        "seconds": rows,
        "ratio_to_peft_lora_step": {k: v / ref for k, v in rows.items()} if ref else None,
        "fim_estimator_bytes": held, "fim_bytes_ratio_to_full_diag_fisher": memory_ratio,
    }
    print(f"| benchmark ({args.model}, batch {args.batch_size}x{args.tokens}, "
          f"{result['threads']} threads) | seconds | x PEFT LoRA step |")
    print("|---|---:|---:|")
    for k, v in rows.items():
        print(f"| {k} | {v:.3f} | {v / ref:.2f} |" if ref else f"| {k} | {v:.3f} | - |")
    print(f"FIM estimator memory: {held:,} bytes ({memory_ratio:.2e} of a full diagonal Fisher)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
