"""make bench: fimlora's speed, side by side with transformers + PEFT in one process.

    python bench.py --threads 2 --compile          # make bench: results/bench.json and bench.md
    python bench.py --device cuda --out results/bench_cuda.json   # the step rows on a GPU

Every figure is a ratio of two things timed in this process on the same MiniLM batches, as the
median of interleaved repeats (so load drift hits both sides alike), or an absolute time; each
row states its goal. The results grid and the planted study are study/ (`make results`).
"""

import argparse
import copy
import itertools
import os
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fimlora
from data import glue
from lora import add_lora, lora_layers, merge_lora
from models import WordPieceTokenizer, load_model, model_path
from train import environment, write_json

TARGETS = ["query", "key", "value", "dense"]
RATIOS = [  # (row, timed numerator, timed denominator, goal), at batch × 64 tokens
    ("LoRA train step, fimlora / transformers + PEFT", "lora", "peft", 0.85),
    ("LoRA train step / full fine-tune step (fimlora)", "lora", "full", 0.70),
    ("merged LoRA forward / base forward (inference)", "merged forward", "base forward", 1.00),
    ("FW-LoRA warm-up step / LoRA step", "fw warm-up", "lora", 1.05),
    ("FW-LoRA warm-up step with --fw-track-every 4 (mean of 4) / LoRA step", "fw every 4",
     "lora", 1.05),
    ("FW-LoRA penalised step / LoRA step", "fw penalised", "lora", 1.01),
    ("torch.compile LoRA train step / eager", "compiled", "lora", None)]


def median_times(fns: dict[str, Callable[[], object]], repeats: int, untimed: int,
                 sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds of each fn over `repeats` interleaved rounds after `untimed` rounds."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(untimed + repeats):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if i >= untimed:
                samples[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in samples.items()}


def row(name: str, figure: float, goal: float | None, unit: str, detail: str) -> dict:
    return {"row": name, "figure": figure, "goal": goal, "unit": unit,
            "met": None if goal is None else figure <= goal, "detail": detail}


def op_count(fn: Callable[[], object]) -> int:
    """aten operators one call of fn dispatches: on a GPU each is about one kernel launch."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name.startswith("aten::") for e in prof.events())


def loss(m: nn.Module, b: dict) -> torch.Tensor:
    if hasattr(m, "peft_config"):  # transformers + PEFT: keyword inputs, logits in an output
        logits = m(**{k: v for k, v in b.items() if k != "labels"}).logits
    else:
        logits = m(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    return F.cross_entropy(logits, b["labels"])


def trainer(model: nn.Module, backward: Callable = lambda m, b: loss(m, b).backward()):
    """step(batch): backward(model, batch), AdamW on the trainable parameters, zero_grad."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(batch: dict) -> None:
        backward(model, batch)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def with_lora(base: nn.Module, r: int, device: torch.device) -> nn.Module:
    model = copy.deepcopy(base)
    add_lora(model, TARGETS, r=r, alpha=2 * r, heads=["classifier"])
    return model.to(device).train()


def peft_lora(r: int, device: torch.device) -> nn.Module:
    import peft
    import transformers
    model = transformers.BertForSequenceClassification.from_pretrained(model_path("minilm"),
                                                                       num_labels=2)
    return peft.get_peft_model(model, peft.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0,
        modules_to_save=["classifier"])).to(device).train()


def fw_steps(base: nn.Module, r: int, device: torch.device, b: dict) -> dict:
    """FW-LoRA's warm-up step (tracked, EMA updated) and its penalised step, as train.py runs
    them; the penalty's importances come from one tracked pass on b."""
    ema, k = {}, [0]  # k: the warm-up step count, kept across calls

    def warm(m, batch):
        k[0] += 1
        with fimlora.fw_track(m) as sq:
            loss(m, batch).backward()
        ema.update(fimlora.fw_update(ema, sq, k[0]))
    warm(with_lora(base, r, device), b)
    imp = fimlora.importances(ema)

    def penalised(m, batch):
        (loss(m, batch) + fimlora.fw_penalty(m, imp, fw_lambda=1e-4)).backward()
    return {"fw warm-up": trainer(with_lora(base, r, device), warm),
            "fw penalised": trainer(with_lora(base, r, device), penalised)}


def step_fns(base, a, device: torch.device, b: dict, gen, notes: list) -> dict:
    """What RATIOS times on one batch b: train steps and forwards, each a call."""
    full = copy.deepcopy(base).to(device).train()
    steps = {"lora": trainer(with_lora(base, a.r, device)), "full": trainer(full),
             **fw_steps(base, a.r, device, b)}
    if not a.no_peers:
        steps["peft"] = trainer(peft_lora(a.r, device))
    if a.compile and device.type == "cpu":
        model = with_lora(base, a.r, device)
        compiled = torch.compile(model)
        steps["compiled"] = trainer(model, lambda m, x: loss(compiled, x).backward())
        t0 = time.perf_counter()
        try:  # the first call compiles: its cost is reported apart, in a note
            steps["compiled"](b)
            notes.append(f"torch.compile took {time.perf_counter() - t0:.0f} s to compile.")
        except Exception as e:  # no compiler, an unsupported op: note it, time the rest
            notes.append(f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
            del steps["compiled"]
    merged, plain = with_lora(base, a.r, device).eval(), copy.deepcopy(base).to(device).eval()
    with torch.no_grad():
        for layer in lora_layers(merged).values():
            layer.lora_B.copy_(0.01 * torch.randn(layer.lora_B.shape, generator=gen))
    merge_lora(merged)
    return {k: (lambda s=s: s(b)) for k, s in steps.items()} | {
        "merged forward": lambda: torch.no_grad()(loss)(merged, b),
        "base forward": lambda: torch.no_grad()(loss)(plain, b),
        "fw every 4": lambda: [steps["fw warm-up"](b)] + [steps["lora"](b) for _ in range(3)]}


def step_rows(base, tok, a, device: torch.device, gen) -> tuple[list[dict], list[str]]:
    """The RATIOS rows at a.batch_size × 64 tokens, and LoRA / PEFT again at × 128."""
    rows, notes = [], []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    where = "" if device.type == "cpu" else f" ({device.type})"
    words = "the movie was not very good and i liked it".split()
    for T in (64, 128):
        idx = torch.randint(len(words), (a.batch_size, 4 * T), generator=gen).tolist()
        b = tok.batch([" ".join(words[i] for i in r) for r in idx], max_len=T)  # T ids each
        b["labels"] = torch.randint(2, (a.batch_size,), generator=gen)
        b = {k: v.to(device) for k, v in b.items()}
        if T == 64:
            fns = step_fns(base, a, device, b, gen, notes)
        else:
            steps = {"lora": trainer(with_lora(base, a.r, device))}
            steps |= {} if a.no_peers else {"peft": trainer(peft_lora(a.r, device))}
            fns = {k: (lambda s=s: s(b)) for k, s in steps.items()}
        if device.type == "cuda":  # as train.py runs on CUDA: bf16 autocast, both sides alike
            fns = {k: torch.autocast("cuda", dtype=torch.bfloat16)(f) for k, f in fns.items()}
        t = median_times(fns, a.repeats, a.untimed, sync)
        if T == 64:
            t["fw every 4"] /= 4
            ops = ", ".join(f"{k} {op_count(f):,}" for k, f in fns.items() if k != "fw every 4")
            notes.append(f"aten operators dispatched per call on {device.type} ({a.batch_size}"
                         f"×64; on a GPU each is about one kernel launch): {ops}.")
        for name, num, den, goal in RATIOS if T == 64 else RATIOS[:1]:
            if num in t and den in t:
                rows.append(row(f"{name}, {a.batch_size}×{T}{where}", t[num] / t[den], goal,
                                "×", f"{t[num]:.4g} s / {t[den]:.4g} s"))
    return rows, notes


def data_rows(base, tok, a, train: list) -> list[dict]:
    """On SST-2's train rows: FIM calibration and LoRA-DA init against the LoRA steps of the
    runs they precede, our tokeniser against BertTokenizerFast, and group_by_length."""
    calib = list(itertools.islice(glue.batches(train, tok, 32, 128,
                                               torch.Generator().manual_seed(2)), 8))
    cpu, n = torch.device("cpu"), a.untimed + a.setup_repeats
    fim_models = [with_lora(base, a.r, cpu) for _ in range(n)]
    da_models = [with_lora(base, a.r, cpu) for _ in range(n)]
    step = trainer(with_lora(base, a.r, cpu))
    t = median_times({
        "8 steps": lambda: [step(b) for b in calib],
        "fim": lambda: fimlora.initialize_fim_ranks(fim_models.pop(), calib, loss, n_batches=8),
        "da": lambda: fimlora.lorada_init(da_models.pop(), calib, loss, n_samples=256,
                                          population_size=len(train))},
        a.setup_repeats, a.untimed)
    s, epoch = t["8 steps"] / 8, -(-len(train) // 32)
    rows = [row(f"FIM calibration (8 batches) / one SST-2 epoch ({epoch:,} LoRA steps)",
                100 * t["fim"] / (epoch * s), 1.0, " %",
                f"{t['fim']:.2f} s / ({epoch:,} × {s:.3f} s)"),
            row("LoRA-DA init (256 samples) / a 1,000-step run", 100 * t["da"] / (1000 * s),
                2.0, " %", f"{t['da']:.2f} s / (1,000 × {s:.3f} s)")]
    if not a.no_peers:
        import transformers
        vocab, texts, ids = model_path("minilm") / "vocab.txt", [e.text_a for e in train], {}
        t = median_times({  # a fresh tokenizer each round: no memo carries over
            "ours": lambda: ids.update(ours=[WordPieceTokenizer.from_file(vocab).encode(x)[0]
                                             for x in texts]),  # transformers 5: vocab= a path
            "hf": lambda: ids.update(hf=transformers.BertTokenizerFast(vocab=str(vocab))(
                texts)["input_ids"])}, a.setup_repeats, 0)
        if ids["ours"] != ids["hf"]:
            raise AssertionError("our WordPiece ids differ from BertTokenizerFast's on SST-2")
        rows.append(row(f"tokenise all {len(texts):,} SST-2 train rows, ours / "
                        "BertTokenizerFast", t["ours"] / t["hf"], 0.5, "×",
                        f"{t['ours']:.2f} s / {t['hf']:.2f} s, ids identical"))
    first = {g: list(itertools.islice(glue.batches(train, tok, 32, 128, torch.Generator()
                                                   .manual_seed(1), group_by_length=g), 100))
             for g in (False, True)}
    real = {g: [int(b["attention_mask"].sum()) for b in bs] for g, bs in first.items()}
    pad = {g: 1 - sum(real[g]) / sum(b["attention_mask"].numel() for b in bs)
           for g, bs in first.items()}
    t = median_times({g: lambda g=g: [step(b) for b in first[g][:4]] for g in first},
                     a.repeats, a.untimed)
    rate = {g: sum(real[g][:4]) / t[g] for g in first}
    return rows + [
        row("padding fraction, group_by_length / plain batching (first 100 batches)",
            pad[True] / pad[False], None, "×",
            f"{100 * pad[True]:.1f} % / {100 * pad[False]:.1f} % padding"),
        row("LoRA train-step tokens/s, group_by_length / plain (4 batches each)",
            rate[True] / rate[False], None, "×",
            f"{rate[True]:,.0f} / {rate[False]:,.0f} real tokens/s")]


def allocate_row(repeats: int, m: int = 1000) -> dict:
    scores = torch.rand(m, generator=torch.Generator().manual_seed(m)).tolist()
    scores = {f"m{i}": s for i, s in enumerate(scores)}
    t = median_times({"a": lambda: fimlora.allocate_ranks(scores, 8 * m, 1, 16)}, repeats, 1)
    return row(f"allocate_ranks, {m:,} matrices (random scores, budget 8M, ranks 1–16)",
               1000 * t["a"], 50.0, " ms", f"median of {repeats}")


def bench_table(bench: dict) -> list[str]:
    """bench.json's rows as a markdown table, then the noise floor the merged forward shows."""
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


def at_least(low: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        if int(text) < low:
            raise argparse.ArgumentTypeError(f"{text}: use >= {low}")
        return int(text)
    return check


def writable(text: str) -> Path:
    """--out: a file path whose nearest existing folder is writable, checked before timing."""
    out, folder = Path(text), Path(text).parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if out.is_dir():
        why = f"{out} is a folder"
    elif not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        why = f"{folder} is not a writable folder"
    else:
        return out
    raise argparse.ArgumentTypeError(f"{text}: cannot be written ({why}); pass a writable file "
                                     "path such as results/bench.json")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=at_least(1), default=32, help="rows per timed batch")
    p.add_argument("--r", type=at_least(1), default=8, help="LoRA rank of every adapted matrix")
    p.add_argument("--repeats", type=at_least(1), default=5, help="timed rounds per step row")
    p.add_argument("--setup-repeats", type=at_least(1), default=3,
                   help="timed rounds of the slow rows (calibration, init, tokeniser, allocation)")
    p.add_argument("--untimed", type=at_least(0), default=1, help="rounds run before timing")
    p.add_argument("--compile", action="store_true", help="add the torch.compile row (CPU)")
    p.add_argument("--no-peers", action="store_true", help="skip the transformers / PEFT rows")
    p.add_argument("--sst2", type=Path, default=Path("../shared/data/glue/SST-2"),
                   help="SST-2 folder for the calibration, tokeniser and grouping rows")
    p.add_argument("--threads", type=at_least(0), default=0, help="CPU threads (0: torch's)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the step rows run (cuda: only they, under bf16 autocast)")
    p.add_argument("--out", type=writable, default=Path("results/bench.json"),
                   help="the JSON file; the markdown table goes beside it (.md)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available: use --device cpu")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    base, tok = load_model("minilm", num_labels=2, generator=gen)
    width = min((min(m.in_features, m.out_features) for n, m in base.named_modules()
                 if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS), default=a.r)
    if a.r > width:
        raise ValueError(f"--r {a.r} is above {width}, the smallest side of MiniLM's adapted "
                         f"matrices (its width): a rank cannot exceed it; use --r <= {width}")
    rows, notes = step_rows(base.train(), tok, a, torch.device(a.device), gen)
    if a.device == "cuda":
        notes.append("GPU rows only (--device cuda): the calibration, tokeniser, grouping and "
                     "allocation rows are CPU work, measured by the CPU bench.")
    elif (a.sst2 / "train.tsv").is_file():
        rows += data_rows(base, tok, a, glue.load_glue("sst2", a.sst2, "train"))
    else:
        notes.append(f"{a.sst2} not found: no calibration-share, tokeniser or grouping rows.")
    if a.device == "cpu":
        rows.append(allocate_row(a.setup_repeats))
    result = {"rows": rows, "notes": notes, "repeats": a.repeats,
              "untimed": a.untimed, "setup_repeats": a.setup_repeats, **environment(),
              "generated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if not a.no_peers:
        import peft
        import transformers
        result["versions"] |= {"transformers": transformers.__version__,
                               "peft": peft.__version__}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, result)
    md = "\n".join(bench_table(result) + [""] + notes) + "\n"
    a.out.with_suffix(".md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}")
