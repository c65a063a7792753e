"""The tasks train.py trains on, each a Task: the base model, endless training batches, a loss
that is the mean of per-example losses over dim 0 (the per-example Fisher's contract), and an
evaluation. The model and the plants draw from rng["init"], the planted eval set from rng["eval"].

    task = build_task(args, device, rng)   # planted_task, glue_task or data_task (--data FILE)
    loss = task.loss_fn(model, next(task.train_batches(rng["data"])))

Under torchrun, init_distributed() weighs each process's slice of every batch (shards()) in the
loss, and agreed() takes a vote.
"""

import argparse
import math
import os
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import causal, files, glue, planted
from lora import name_matches
from models import load_model
from models.checkpoint import is_decoder

Rng = dict[str, torch.Generator]
HELD_OUT = 19  # GLUE --eval-fraction's stream: one slice for every --seed, --lr and method
LABEL_SET = 16  # prompt → completion data with at most this many distinct completions,
# each used twice on average, is scored as a label set too (exact-match accuracy)
SHARD_WEIGHT = "shard_weight"  # a batch key: world·n_k/N, set by shards() on uneven splits


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def n_rows(batch: dict) -> int:
    return next(v.shape[0] for v in batch.values() if torch.is_tensor(v))


class Task(NamedTuple):
    model: nn.Module  # the base model, not yet adapted
    heads: list[str]  # modules trained in full next to the adapters (the classifier)
    train_batches: Callable[[torch.Generator], Iterator[dict]]  # endless, drawn from the generator
    n_train: int | None  # training rows (None: endless synthetic data)
    loss_fn: Callable[[nn.Module, dict], torch.Tensor]
    evaluate: Callable[[nn.Module], dict]
    train_mode: bool  # module mode while training (planted trains in eval mode: no dropout)
    planted: dict[str, int] | None = None  # planted task: {matrix: planted rank}
    info: dict | None = None  # --data: the files, the split and the label ids (results.json)


def _task(model: nn.Module, heads: list[str], epoch: Callable, n_train: int | None,
          loss_fn: Callable, evaluate: Callable, device: torch.device, train_mode: bool = True,
          planted: dict | None = None, info: dict | None = None) -> Task:
    """A Task training on epoch(g) after epoch(g) and evaluating in eval mode and autocast,
    without gradients (the model's mode is put back)."""
    def train_batches(g: torch.Generator) -> Iterator[dict]:
        while True:
            yield from epoch(g)

    @torch.no_grad()
    def run(m: nn.Module) -> dict:
        was_training = m.training
        m.eval()
        with autocast(device):
            out = evaluate(m)
        m.train(was_training)
        return out
    return Task(model, heads, train_batches, n_train, loss_fn, run, train_mode, planted, info)


def _decoder_loss(device: torch.device) -> Callable[[nn.Module, dict], torch.Tensor]:
    def loss_fn(m: nn.Module, batch: dict) -> torch.Tensor:  # data/causal.py's causal_loss
        batch = to_device(batch, device)
        with autocast(device):
            logits = m(batch["input_ids"], batch["attention_mask"])
        return causal.causal_loss(logits.float(), batch)
    return loss_fn


def classify_task(args: argparse.Namespace, device: torch.device, rng: Rng, train: list,
                  dev: list, labels: int, metrics: Callable, prompt: Callable,
                  info: dict | None = None) -> Task:
    """Classification into `labels` classes (1: regression) with an encoder and a classifier
    head, or on a decoder as prompts (prompt(tokenizer): a GLUE task name or a causal.Prompt)."""
    # the rows --max-train or a split left (a whole file of one class is refused when read)
    cut = (f"--max-train {args.max_train}" if args.max_train else
           f"--eval-fraction {args.eval_fraction}'s split" if args.eval_fraction else "")
    if cut and labels > 1 and len({e.label for e in train}) == 1:
        name = info["labels"][train[0].label] if info else train[0].label
        raise ValueError(f"the {len(train)} training rows left by {cut} are all of class {name!r}"
                         ": classification needs two; raise --max-train, shuffle or add rows")
    model, tok = load_model(args.model, num_labels=labels, generator=rng["init"])
    n, size = args.max_len, args.batch_size
    if is_decoder(args.model):
        task = prompt(tok)

        def evaluate(m: nn.Module) -> dict:
            preds = causal.predict(m, tok, task, dev, batch_size=size, max_len=n)
            return metrics(preds, [e.label for e in dev])
        return _task(model, [], lambda g: causal.causal_batches(train, tok, task, size, n, g),
                     len(train), _decoder_loss(device), evaluate, device, info=info)

    def logits(m: nn.Module, batch: dict) -> torch.Tensor:  # (B, labels)
        b = to_device(batch, device)
        with autocast(device):
            return m(b["input_ids"], b["attention_mask"], b["token_type_ids"]).float()

    def loss_fn(m: nn.Module, batch: dict) -> torch.Tensor:
        out, y = logits(m, batch), batch["labels"].to(device, non_blocking=True)
        return F.mse_loss(out.squeeze(-1), y) if labels == 1 else F.cross_entropy(out, y)

    def evaluate(m: nn.Module) -> dict:
        preds, gold = [], []
        for batch in glue.batches(dev, tok, 128, n, None, shuffle=False):
            out = logits(m, batch)
            preds += (out.squeeze(-1) if labels == 1 else out.argmax(-1)).tolist()
            gold += batch["labels"].tolist()
        return metrics(preds, gold)
    epoch = lambda g: glue.batches(train, tok, size, n, g,  # noqa: E731
                                   group_by_length=args.group_by_length)
    return _task(model, ["classifier"], epoch, len(train), loss_fn, evaluate, device, info=info)


def glue_task(args: argparse.Namespace, device: torch.device, rng: Rng) -> Task:
    """--task on an encoder, or as prompts on a decoder (data/causal.py)."""
    train = glue.load_glue(args.task, args.data_dir, "train")
    if args.eval_fraction is None:
        dev = glue.load_glue(args.task, args.data_dir, "dev")
    else:  # held out of train.tsv, the same rows for every --seed; dev.tsv is never read
        train, dev = split_rows(train, args.eval_fraction, HELD_OUT)
    train, dev = train[: args.max_train], dev[: args.max_eval]
    return classify_task(args, device, rng, train, dev, glue.task_spec(args.task).num_labels,
                         lambda p, y: glue.compute_metrics(args.task, p, y),
                         lambda tok: args.task)


def completion_task(args: argparse.Namespace, device: torch.device, rng: Rng, train: list,
                    dev: list, labels: list[str], info: dict) -> Task:
    """Prompt → completion on a decoder: the loss is each example's mean completion-token NLL;
    eval the mean NLL per token and its perplexity, and with a label set of completions the
    accuracy of the most likely one."""
    model, tok = load_model(args.model, generator=rng["init"])

    def evaluate(m: nn.Module) -> dict:
        total, count = causal.completion_nll(m, tok, dev, args.batch_size, args.max_len)
        out = {"nll": total / count, "perplexity": math.exp(min(total / count, 700))}
        if labels:
            prompt = causal.Prompt("{a}", tuple(labels), eos=True)
            preds = causal.predict(m, tok, prompt, [glue.Example(c.prompt, None, 0) for c in dev],
                                   args.batch_size, args.max_len)
            out["accuracy"] = glue.accuracy(preds, [labels.index(c.completion) for c in dev])
        return out
    epoch = lambda g: causal.completion_batches(  # noqa: E731
        train, tok, args.batch_size, args.max_len, g)
    return _task(model, [], epoch, len(train), _decoder_loss(device), evaluate, device, info=info)


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval) rows in file order: round(fraction·n) rows (at least one, and one left to
    train) held out by a generator seeded from `seed` alone.
    split_rows(list(range(10)), 0.2, 0) == ([1, 2, 3, 5, 6, 7, 8, 9], [0, 4])"""
    n = len(rows)
    if n < 2:
        raise ValueError(f"--data has {n} row: --eval-fraction needs 2 rows or more; pass "
                         "--eval-data FILE")
    k = min(n - 1, max(1, round(fraction * n)))
    held = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed + 4))[:k].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def data_task(args: argparse.Namespace, device: torch.device, rng: Rng) -> Task:
    """--data FILE (data/files.py): classification on an encoder or a decoder, or prompt →
    completion on a decoder. Every row of both files is validated before the model loads."""
    rows = files.read_rows(args.data)
    eval_rows = files.read_rows(args.eval_data) if args.eval_data else None
    completion = args.text_field is None and {"prompt", "completion"} <= set(rows[0].fields)
    if completion:
        if not is_decoder(args.model):
            raise ValueError(f"{args.data} holds prompt → completion rows: train them on a "
                             "decoder (--model tiny-llama or smollm2), or pass --text-field and "
                             "--label-field to classify")
        train = files.to_completions(rows)
        dev = files.to_completions(eval_rows) if eval_rows else None
        labels = sorted({c.completion for c in train})
        if not (len(labels) <= LABEL_SET and 2 <= len(labels) <= len(train) / 2):
            labels = []
        for r, c in zip(eval_rows or [], dev or []):
            if labels and c.completion not in labels:
                raise ValueError(f"{r.where}: completion {c.completion!r} is not one of the "
                                 f"{len(labels)} completions of {args.data} (a label set): fix "
                                 "the row or add the class to the training file")
    else:
        text = next((f for f in files.TEXT_FIELDS if f in rows[0].fields), "text")
        fields = (args.text_field or text, args.pair_field, args.label_field)
        named = [f"--{k}-field {v}" for k, v in zip(("text", "pair", "label"), fields) if v]
        if len({v for v in fields if v}) < len(named):
            raise ValueError(f"{', '.join(named)}: one column named twice; give each its own")
        train, labels = files.to_examples(rows, *fields)
        dev = files.to_examples(eval_rows, *fields, labels)[0] if eval_rows else None
    if dev is None:
        train, dev = split_rows(train, args.eval_fraction, args.seed)
    train, dev = train[: args.max_train], dev[: args.max_eval]
    info = {"file": args.data, "eval": args.eval_data or f"--eval-fraction {args.eval_fraction}",
            "kind": "completion" if completion else "classification",
            "labels": list(labels), "n_train": len(train), "n_eval": len(dev)}
    if completion:
        return completion_task(args, device, rng, train, dev, labels, info)
    extra = ("f1", "mcc") if len(labels) == 2 else ()
    return classify_task(args, device, rng, train, dev, len(labels),
                         lambda p, y: glue.class_metrics(p, y, extra),
                         lambda tok: causal.data_prompt(tok, labels, args.pair_field is not None),
                         info)


def planted_task(args: argparse.Namespace, device: torch.device, rng: Rng) -> Task:
    """The planted task (data/planted.py) on --targets, plants by the reach rule (--plants
    anywhere: any target); the student trains in eval mode, as the teacher is deterministic."""
    model, _ = load_model(args.model, num_labels=None, generator=rng["init"])
    targets = args.targets.split(",")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and any(name_matches(n, t) for t in targets)]
    unmatched = [t for t in targets if not any(name_matches(n, t) for n in names)]
    if unmatched:
        raise ValueError(f"--targets {args.targets}: {', '.join(unmatched)} matches no nn.Linear "
                         f"of --model {args.model}; use suffixes of its module names")
    reach = {"reach": math.inf} if args.plants == "anywhere" else {}  # else plant's REACH
    teacher, truth = planted.plant(model, names, generator=rng["init"], **reach)
    model.to(device), teacher.to(device)
    vocab, seq = planted.vocab_size(model), min(args.max_len, 32)

    def loss_fn(m: nn.Module, batch: dict) -> torch.Tensor:
        with autocast(device):
            return planted.planted_loss(m, teacher, to_device(batch, device)).float()

    eval_set = [planted.random_batch(vocab, args.batch_size, seq, rng["eval"]) for _ in range(8)]

    def evaluate(m: nn.Module) -> dict:
        return {"loss": sum(loss_fn(m, b).item() for b in eval_set) / len(eval_set)}
    epoch = lambda g: [planted.random_batch(vocab, args.batch_size, seq, g)]  # noqa: E731
    return _task(model, [], epoch, None, loss_fn, evaluate, device, False, truth)


def build_task(args: argparse.Namespace, device: torch.device, rng: Rng) -> Task:
    """--data, the planted task, or a GLUE task (the model decides: a decoder gets prompts)."""
    if args.data is not None:
        return data_task(args, device, rng)
    return (planted_task if args.task == "planted" else glue_task)(args, device, rng)


# -----------------------------------------------------------------------------
# torchrun: one process per device, each a disjoint shard of every global batch


def init_distributed(task: Task, device: torch.device, batch_size: int) -> tuple[Task, int, int]:
    """(task, rank, world size). Under torchrun: starts the process group (gloo on CPU, nccl on
    CUDA) and returns the task whose loss weights an uneven shard's mean by SHARD_WEIGHT, so the
    ranks' mean gradient (DDP's) is the whole batch's; refuses a --batch-size or data that leave
    the ranks unequal shards or a rank no row."""
    world, left = int(os.environ.get("WORLD_SIZE", "1")), (task.n_train or 0) % batch_size
    if world == 1:
        return task, 0, 1
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} is not divisible by the {world} "
                         "processes: every rank takes an equal shard")
    if 0 < left < world:
        raise ValueError(f"the last batch of each epoch has {left} rows (the training rows mod "
                         f"--batch-size {batch_size}), fewer than the {world} processes: "
                         "change --max-train or --batch-size")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def loss_fn(m: nn.Module, batch: dict) -> torch.Tensor:
        rows = {k: v for k, v in batch.items() if k != SHARD_WEIGHT}
        return task.loss_fn(m, rows) * batch.get(SHARD_WEIGHT, 1.0)
    return task._replace(loss_fn=loss_fn), torch.distributed.get_rank(), world


def agreed(vote: bool, world: int, device: torch.device) -> bool:
    """True on every rank if it is true on any (all ranks stop together); on the process
    group's device (nccl refuses CPU tensors)."""
    if world == 1:
        return vote
    t = torch.tensor([float(vote)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def shards(batches: Iterator[dict], rank: int, world: int) -> Iterator[dict]:
    """Rank `rank`'s contiguous slice of every batch (one process: the batches themselves); on an
    uneven split the slice of n_k of N rows carries SHARD_WEIGHT = world·n_k/N."""
    def cut(batch: dict) -> dict:
        n = n_rows(batch)
        part = {k: v.tensor_split(world)[rank] if torch.is_tensor(v) and v.shape[:1] == (n,)
                else v for k, v in batch.items()}
        return part | ({SHARD_WEIGHT: world * n_rows(part) / n} if n % world else {})
    return batches if world == 1 else map(cut, batches)
