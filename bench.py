"""make bench: fimlora's speed as ratios to transformers + PEFT, timed in one process.

    python bench.py --threads 2 --compile          # make bench: results/bench.json and bench.md
    python bench.py --device cuda --out results/bench_cuda.json   # the step rows on a GPU
    python bench.py --device cuda --decoder --out results/bench_cuda.json   # + SmolLM2-135M rows
"""

import argparse
import copy
import itertools
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fimlora
from data import glue
from lora import add_lora, lora_layers, merge_lora
from models import WordPieceTokenizer, load_model, model_path
from models.checkpoint import smollm2_path
from runfolder import write_json
from study.peers import peer_versions
from study.report import bounded, check_ours, table
from train import environment

TARGETS = ["query", "key", "value", "dense"]
DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SST2 = Path("../shared/data/glue/SST-2")  # the data rows are left out when it is absent
DECODER_SHAPE = (8, 256)  # rows × tokens: enough work per step not to be launch-bound on a GPU
RATIOS = [  # (row, timed numerator, timed denominator, goal)
    ("LoRA train step, fimlora / transformers + PEFT", "lora", "peft", 0.85),
    ("LoRA train step / full fine-tune step (fimlora)", "lora", "full", 0.70),
    ("merged LoRA forward / base forward (inference)", "merged forward", "base forward", 1.00),
    ("FW-LoRA warm-up step / LoRA step", "fw warm-up", "lora", 1.05),
    ("FW-LoRA penalised step / LoRA step", "fw penalised", "lora", 1.01),
    ("torch.compile LoRA train step / eager", "compiled", "lora", None)]


def median_times(fns: dict[str, Callable[[], object]], repeats: int, untimed: int) -> dict:
    """Median seconds of each fn over `repeats` interleaved rounds after `untimed` rounds."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
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


def with_lora(base: nn.Module, r: int, device: torch.device, peers: bool = False) -> nn.Module:
    if peers:  # MiniLM in transformers + PEFT
        import peft
        import transformers
        model = peft.get_peft_model(transformers.BertForSequenceClassification.from_pretrained(
            model_path("minilm"), num_labels=2), peft.LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=TARGETS, modules_to_save=["classifier"]))
    else:
        model = copy.deepcopy(base)
        add_lora(model, TARGETS, r=r, alpha=2 * r, heads=["classifier"])
    return model.to(device).train()


def step_rows(base: nn.Module, tok, a, device: torch.device, gen) -> tuple[list, list[str]]:
    """RATIOS on a.batch_size × 64 tokens: train steps (FW-LoRA's as in train.py), forwards."""
    notes, words = [], "the movie was not very good and i liked it".split()
    idx = torch.randint(len(words), (a.batch_size, 256), generator=gen).tolist()
    b = tok.batch([" ".join(words[i] for i in r) for r in idx], max_len=64)  # 64 ids each
    b = {k: v.to(device) for k, v in b.items()} | {
        "labels": torch.randint(2, (a.batch_size,), generator=gen).to(device)}
    ema, k = {}, [0]  # k: FW-LoRA's warm-up step count, kept across calls

    def warm(m, batch):
        k[0] += 1
        with fimlora.fw_track(m) as sq:
            loss(m, batch).backward()
        ema.update(fimlora.fw_update(ema, sq, k[0]))
    warm(with_lora(base, a.r, device), b)  # the penalty's importances: one tracked pass
    imp = fimlora.importances(ema)

    def penalised(m, batch):
        (loss(m, batch) + fimlora.fw_penalty(m, imp, fw_lambda=1e-4)).backward()
    steps = {"lora": trainer(with_lora(base, a.r, device)),
             "full": trainer(copy.deepcopy(base).to(device).train()),
             "fw warm-up": trainer(with_lora(base, a.r, device), warm),
             "fw penalised": trainer(with_lora(base, a.r, device), penalised)}
    if not a.no_peers:
        steps["peft"] = trainer(with_lora(base, a.r, device, peers=True))
    if a.compile and device.type == "cpu":
        model = with_lora(base, a.r, device)
        compiled = torch.compile(model)
        steps["compiled"] = trainer(model, lambda m, x: loss(compiled, x).backward())
        t0 = time.perf_counter()
        steps["compiled"](b)  # the first call compiles: its time is a note, not the row's
        notes.append(f"torch.compile took {time.perf_counter() - t0:.0f} s to compile.")
    merged, plain = with_lora(base, a.r, device).eval(), copy.deepcopy(base).to(device).eval()
    for layer in lora_layers(merged).values():  # B = 0 would merge to W0 itself
        layer.lora_B.data.copy_(0.01 * torch.randn(layer.lora_B.shape, generator=gen))
    merge_lora(merged)
    fns = {k: (lambda s=s: s(b)) for k, s in steps.items()} | {
        "merged forward": lambda: torch.no_grad()(loss)(merged, b),
        "base forward": lambda: torch.no_grad()(loss)(plain, b)}
    if device.type == "cuda":  # as train.py runs on CUDA: bf16 autocast, both sides alike
        fns = {k: torch.autocast("cuda", dtype=torch.bfloat16)(f) for k, f in fns.items()}
    t = median_times(fns, a.repeats, a.untimed)
    return [row(f"{name}, {a.batch_size}×64 ({device.type})", t[num] / t[den], goal, "×",
                f"{t[num]:.4g} s / {t[den]:.4g} s")
            for name, num, den, goal in RATIOS if num in t and den in t], notes


def decoder_rows(a, device: torch.device, gen: torch.Generator) -> list[dict]:
    """The first two RATIOS on SmolLM2-135M (train.py's decoder targets, causal-LM loss on
    DECODER_SHAPE random tokens); PEFT's side is transformers' own GGUF reader of the same file,
    checked to give our loss before anything is timed."""
    base, _ = load_model("smollm2")
    ids = torch.randint(base.config.vocab_size, DECODER_SHAPE, generator=gen).to(device)

    def lm_loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        logits = m(input_ids=x).logits if hasattr(m, "peft_config") else m(x)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
    ours = copy.deepcopy(base)
    add_lora(ours, DECODER_TARGETS, r=a.r, alpha=2 * a.r)
    models = {"lora": ours, "full": copy.deepcopy(base)}
    if not a.no_peers:
        import peft
        import transformers
        path = smollm2_path()
        hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                 dtype=torch.float32)
        models["peft"] = peft.get_peft_model(hf, peft.LoraConfig(
            r=a.r, lora_alpha=2 * a.r, target_modules=DECODER_TARGETS))
    models = {k: m.to(device).train() for k, m in models.items()}
    with torch.no_grad():  # B = 0: every model is SmolLM2 itself
        got = {k: lm_loss(m, ids).item() for k, m in models.items()}
    if max(got.values()) - min(got.values()) > 1e-3 * got["full"]:
        raise AssertionError(f"SmolLM2's loss differs between the models timed: {got}")
    steps = {k: trainer(m, lambda m, x: lm_loss(m, x).backward()) for k, m in models.items()}
    fns = {k: (lambda s=s: s(ids)) for k, s in steps.items()}
    if device.type == "cuda":
        fns = {k: torch.autocast("cuda", dtype=torch.bfloat16)(f) for k, f in fns.items()}
    t = median_times(fns, a.repeats, a.untimed)
    shape = "×".join(map(str, DECODER_SHAPE))
    return [row(f"{name}, SmolLM2-135M {shape} ({device.type})", t[num] / t[den], goal, "×",
                f"{t[num]:.4g} s / {t[den]:.4g} s")
            for name, num, den, goal in RATIOS[:2] if num in t and den in t]


def data_rows(base: nn.Module, tok, a, train: list) -> list[dict]:
    """On SST-2: FIM calibration and LoRA-DA init shares, tokenisers, group_by_length."""
    cpu, g = torch.device("cpu"), torch.Generator()
    calib = list(itertools.islice(glue.batches(train, tok, 32, 128, g.manual_seed(2)), 8))
    step = trainer(with_lora(base, a.r, cpu))
    t = median_times({
        "8 steps": lambda: [step(b) for b in calib],
        "fim": lambda: fimlora.initialize_fim_ranks(with_lora(base, a.r, cpu), calib, loss),
        "da": lambda: fimlora.lorada_init(with_lora(base, a.r, cpu), calib, loss, n_samples=256,
                                          population_size=len(train))},
        a.setup_repeats, a.untimed)
    s, epoch = t["8 steps"] / 8, -(-len(train) // 32)
    rows = [row(f"FIM calibration (8 batches) / one SST-2 epoch ({epoch:,} LoRA steps)",
                100 * t["fim"] / (epoch * s), 1.0, " %",
                f"{t['fim']:.2f} s / ({epoch:,} × {s:.3f} s)"),
            row("LoRA-DA init (256 samples) / a 1,000-step run", 100 * t["da"] / (1000 * s),
                2.0, " %", f"{t['da']:.2f} s / (1,000 × {s:.3f} s)")]
    if not a.no_peers:  # a fresh tokenizer per round (not per text): no memo carries over
        import transformers
        vocab, texts = model_path("minilm") / "vocab.txt", [e.text_a for e in train]

        def ours() -> list[list[int]]:
            fresh = WordPieceTokenizer.from_file(vocab)
            return [fresh.encode(x)[0] for x in texts]
        fns = {"ours": ours,
               "hf": lambda: transformers.BertTokenizerFast(vocab=str(vocab))(texts)["input_ids"]}
        if fns["ours"]() != fns["hf"]():
            raise AssertionError("our WordPiece ids differ from BertTokenizerFast's on SST-2")
        t = median_times(fns, a.setup_repeats, 0)
        rows.append(row(f"tokenise all {len(texts):,} SST-2 train rows, ours / "
                        "BertTokenizerFast", t["ours"] / t["hf"], 0.5, "×",
                        f"{t['ours']:.2f} s / {t['hf']:.2f} s, ids identical"))
    first = {k: list(itertools.islice(glue.batches(train, tok, 32, 128, g.manual_seed(1),
                                                   group_by_length=k), 4)) for k in (False, True)}
    t = median_times({k: lambda k=k: [step(b) for b in first[k]] for k in first},
                     a.repeats, a.untimed)
    real = {k: sum(int(b["attention_mask"].sum()) for b in bs) for k, bs in first.items()}
    pad = {k: 100 - 100 * real[k] / sum(b["attention_mask"].numel() for b in bs)
           for k, bs in first.items()}
    rate = {k: real[k] / t[k] for k in first}
    return rows + [row("LoRA train-step tokens/s, group_by_length / plain (4 batches each)",
                       rate[True] / rate[False], None, "×", f"{rate[True]:,.0f} / "
                       f"{rate[False]:,.0f} real tokens/s; {pad[True]:.1f} % / {pad[False]:.1f} %"
                       " padding")]


def bench_table(bench: dict) -> list[str]:
    """bench.json's rows as a markdown table, then the noise the merged forward shows."""
    lines = table(["row", "figure", "goal", "status", "measured"], "lrrll", [[
        r["row"], f"{r['figure']:.3g}{r['unit']}",
        "–" if r["goal"] is None else f"≤ {r['goal']:g}{r['unit']}",
        "–" if r["met"] is None else "met" if r["met"] else "missed", r["detail"]]
        for r in bench["rows"]])
    same = [r["figure"] for r in bench["rows"] if r["row"].startswith("merged LoRA forward")]
    if same:  # the base forward's work: its distance from 1 is this run's noise
        lines += ["", f"Noise: merged / base forward (the same work) is {same[0]:.3f}×: read "
                  f"every ratio to ±{abs(same[0] - 1) * 100:.0f} %."]
    return lines


def writable(text: str) -> Path:
    """--out: a file path whose nearest existing folder is writable, checked before timing."""
    try:  # replace a bench's JSON and table, never a user's file
        check_ours(Path(text), (b'{\n  "rows": [',))
        check_ours(Path(text).with_suffix(".md"), (b"| row | figure | goal |",))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if Path(text).suffix != ".json":  # the table goes to the .md beside it
        raise argparse.ArgumentTypeError(f"{text}: the bench writes JSON there and its table "
                                         "beside it as .md; pass a .json name such as b.json")
    return Path(text)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=bounded(1), default=32, help="rows per timed batch")
    p.add_argument("--r", type=bounded(1), default=8, help="LoRA rank of every adapted matrix")
    p.add_argument("--repeats", type=bounded(1), default=5, help="timed rounds per step row")
    p.add_argument("--setup-repeats", type=bounded(1), default=3, help="rounds of the slow rows")
    p.add_argument("--untimed", type=bounded(0), default=1, help="rounds run before timing")
    p.add_argument("--compile", action="store_true", help="add the torch.compile row (CPU)")
    p.add_argument("--no-peers", action="store_true", help="skip the transformers / PEFT rows")
    p.add_argument("--sst2", type=Path, help=f"SST-2 folder (default: {SST2}, if there)")
    p.add_argument("--threads", type=bounded(0, 4 * (os.cpu_count() or 1)), default=0,
                   help="CPU threads (0: torch's)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: step rows only")
    p.add_argument("--decoder", action="store_true", help="add SmolLM2-135M's step rows (8×256)")
    p.add_argument("--out", type=writable, default="results/bench.json", help="and .md beside it")
    a = p.parse_args(argv)
    if a.sst2 is not None and not (a.sst2 / "train.tsv").is_file():
        raise ValueError(f"--sst2 {a.sst2}: no train.tsv there; pass the GLUE SST-2 folder")
    a.sst2 = a.sst2 or SST2
    if a.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available: use --device cpu")
    torch.set_num_threads(a.threads or torch.get_num_threads())
    gen = torch.manual_seed(0)  # the global generator: PEFT's init draws from it too
    base, tok = load_model("minilm", num_labels=2, generator=gen)
    width = min((min(m.weight.shape) for n, m in base.named_modules()
                 if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS), default=a.r)
    if a.r > width:
        raise ValueError(f"--r {a.r} is above {width}, the smallest side of MiniLM's adapted "
                         f"matrices: use --r <= {width}")
    rows, notes = step_rows(base.train(), tok, a, torch.device(a.device), gen)
    if a.decoder:
        rows += decoder_rows(a, torch.device(a.device), gen)
    if a.device == "cpu" and (a.sst2 / "train.tsv").is_file():
        rows += data_rows(base, tok, a, glue.load_glue("sst2", a.sst2, "train"))
    elif a.device == "cpu":
        notes.append(f"{a.sst2} not found: no calibration-share, tokeniser or grouping rows.")
    if a.device == "cpu":
        scores = {f"m{i}": s for i, s in enumerate(torch.rand(1000, generator=gen).tolist())}
        t = median_times({"a": lambda: fimlora.allocate_ranks(scores, 8000, 1, 16)},
                         a.setup_repeats, 1)["a"]
        rows.append(row("allocate_ranks, 1,000 matrices (random scores, budget 8,000, ranks "
                        "1–16)", 1000 * t, 50.0, " ms", f"median of {a.setup_repeats}"))
    result = {"rows": rows, "notes": notes, "repeats": a.repeats, **environment()}
    if not a.no_peers:
        result["versions"] |= peer_versions()
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
