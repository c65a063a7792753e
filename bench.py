"""Speed and memory, side by side in one process: fimlora vs transformers + PEFT on MiniLM.

    python bench.py                 # writes runs/bench.json and prints a markdown table
    python bench.py --steps 5 --model tiny --no-peers     # quick, no peers needed
    python bench.py --planted 5     # planted-task measurement: score recovery, fim vs lora loss
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


def planted_study(seeds: int, steps: int, out: str) -> dict:
    """The planted-task measurement over seeds: top-k recovery of each Fisher score and the final
    loss (relative to B = 0) of lora vs fim (each score) at the same rank budget."""
    import train
    configs = {"lora": ["--method", "lora"], "fim efim": ["--method", "fim"],
               "fim variance": ["--method", "fim", "--score", "variance"],
               "fim per-example": ["--method", "fim", "--per-example"]}
    rows: dict[str, list] = {k: [] for k in configs}
    recovery: dict[str, list] = {}
    for seed in range(seeds):
        for name, extra in configs.items():
            out_dir = f"runs/planted/{name.replace(' ', '_')}-s{seed}"
            res = train.main([*extra, "--seed", str(seed), "--steps", str(steps),
                              "--log-every", str(steps), "--out", out_dir])
            rows[name].append(res["metrics"]["loss_ratio"])
            if name == "fim efim":
                for score, rec in res["planted_recovery"].items():
                    if score != "ranks":
                        recovery.setdefault(score, []).append(rec["hits"])
                chance = res["planted_recovery"]["efim"]["chance_hits"]
                recovery.setdefault("chance", []).append(chance)
    print(f"\n| planted task, {seeds} seeds | final loss / loss at B=0 (mean) | per seed |")
    print("|---|---:|---|")
    for k, v in rows.items():
        print(f"| {k} | {statistics.mean(v):.4f} | {', '.join(f'{x:.4f}' for x in v)} |")
    print(f"\n| score | planted matrices in top-k (mean over seeds) | per seed |")
    print("|---|---:|---|")
    for k, v in recovery.items():
        print(f"| {k} | {statistics.mean(v):.2f} | {', '.join(f'{x:g}' for x in v)} |")
    result = {"seeds": seeds, "steps": steps, "loss_ratio": rows, "top_k_hits": recovery}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    return result


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
    p.add_argument("--planted", type=int, default=0, metavar="SEEDS",
                   help="instead: the planted-task measurement over this many seeds")
    p.add_argument("--planted-steps", type=int, default=300)
    p.add_argument("--peft-sst2", metavar="DATA_DIR", default=None,
                   help="instead: train.py's SST-2 recipe with transformers + PEFT (same batches "
                        "and initial weights) for the plain-LoRA parity check; train.py "
                        "arguments may follow a '--'")
    argv = sys.argv[1:] if argv is None else argv
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:len(argv) - len(rest) - bool(rest)])
    if args.peft_sst2:
        return peft_train(["--method", "lora", "--model", "minilm", "--task", "sst2",
                           "--data-dir", args.peft_sst2, "--out", "runs/sst2-peft-s0", *rest])
    if args.planted:
        return planted_study(args.planted, args.planted_steps, "runs/planted.json")
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
