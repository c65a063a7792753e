"""The tasks train.py trains on: a base model with its data, loss and evaluation, as a Task.

    task = glue_task(args, device, rng)      # GLUE with an encoder and a classifier head
    task = causal_task(args, device, rng)    # GLUE as prompts for a decoder (data/causal.py)
    task = planted_task(args, device, rng)   # the embedded planted task (data/planted.py)
    task = data_task(args, device, rng)      # --data FILE (data/files.py), encoder or decoder
    loss = task.loss_fn(model, next(task.train_batches(rng["data"])))

`args` is train.py's parsed arguments; `rng` its random streams (random_streams): the model and
plants draw from rng["init"], the planted eval set from rng["eval"]. Every loss_fn is the mean of
per-example losses over dim 0, the contract of the per-example Fisher.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import causal, files, glue, metrics, planted
from models import load_model
from models.checkpoint import is_decoder


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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


def glue_task(args: argparse.Namespace, device: torch.device,
              rng: dict[str, torch.Generator]) -> Task:
    spec = glue.task_spec(args.task)
    train = glue.load_glue(args.task, args.data_dir, "train")[: args.max_train]
    dev = glue.load_glue(args.task, args.data_dir, "dev")[: args.max_eval]
    return encoder_task(args, device, rng, train, dev, spec.num_labels,
                        lambda p, y: glue.compute_metrics(args.task, p, y))


def encoder_task(args: argparse.Namespace, device: torch.device,
                 rng: dict[str, torch.Generator], train: list[glue.Example],
                 dev: list[glue.Example], num_labels: int,
                 metrics: Callable[[list, list], dict], info: dict | None = None) -> Task:
    """Classification (num_labels = 1: regression) with an encoder and a classifier head."""
    model, tok = load_model(args.model, num_labels=num_labels, generator=rng["init"])
    regression = num_labels == 1

    def loss_fn(m: nn.Module, batch: dict) -> torch.Tensor:
        batch = to_device(batch, device)
        with autocast(device):
            logits = m(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        logits = logits.float()
        if regression:
            return F.mse_loss(logits.squeeze(-1), batch["labels"])
        return F.cross_entropy(logits, batch["labels"])

    def train_batches(g: torch.Generator) -> Iterator[dict]:
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
        return metrics(preds, labels)

    return Task(model, ["classifier"], train_batches, len(train), loss_fn, evaluate, True,
                info=info)


def causal_task(args: argparse.Namespace, device: torch.device,
                rng: dict[str, torch.Generator]) -> Task:
    """A GLUE task as prompts for a decoder (data/causal.py): the loss is the answer tokens'
    per-example mean NLL, predictions compare the label words' log-likelihoods."""
    train = glue.load_glue(args.task, args.data_dir, "train")[: args.max_train]
    dev = glue.load_glue(args.task, args.data_dir, "dev")[: args.max_eval]
    return decoder_task(args, device, rng, train, dev, lambda tok: args.task,
                        lambda p, y: glue.compute_metrics(args.task, p, y))


def decoder_loss(device: torch.device) -> Callable[[nn.Module, dict], torch.Tensor]:
    """A decoder's loss_fn: each example's mean NLL over its answer (or completion) tokens, then
    the mean over examples (data/causal.py)."""
    def loss_fn(m: nn.Module, batch: dict) -> torch.Tensor:
        batch = to_device(batch, device)
        with autocast(device):
            logits = m(batch["input_ids"], batch["attention_mask"])
        return causal.causal_loss(logits.float(), batch)
    return loss_fn


def decoder_task(args: argparse.Namespace, device: torch.device,
                 rng: dict[str, torch.Generator], train: list[glue.Example],
                 dev: list[glue.Example], prompt: Callable[..., str | causal.Prompt],
                 metrics: Callable[[list, list], dict], info: dict | None = None) -> Task:
    """Classification as prompts for a decoder; prompt(tokenizer) gives the task name or the
    Prompt (data/causal.py)."""
    model, tok = load_model(args.model, generator=rng["init"])
    task = prompt(tok)

    loss_fn = decoder_loss(device)

    def train_batches(g: torch.Generator) -> Iterator[dict]:
        while True:
            yield from causal.causal_batches(train, tok, task, args.batch_size, args.max_len, g)

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict:
        was_training = m.training
        m.eval()
        with autocast(device):
            preds = causal.predict(m, tok, task, dev, batch_size=args.batch_size,
                                   max_len=args.max_len)
        m.train(was_training)
        return metrics(preds, [e.label for e in dev])

    return Task(model, [], train_batches, len(train), loss_fn, evaluate, True, info=info)


LABEL_SET = 16  # prompt → completion data with at most this many distinct completions,
# each used twice on average, is scored as a label set too (exact-match accuracy)


def split_rows(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row indices, each in file order: round(fraction·n) rows (at least one)
    held out by a generator of its own, seeded from --seed, so the split never draws from
    the training streams.  split_rows(10, 0.2, 0) -> (8 indices, 2 indices)"""
    if n < 2:
        raise ValueError(f"--data has {n} row: --eval-fraction needs 2 rows or more; pass "
                         "--eval-data FILE")
    k = min(n - 1, max(1, round(fraction * n)))
    held = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed + 4))[:k].tolist())
    return [i for i in range(n) if i not in held], sorted(held)


def class_metrics(preds: list, labels: list, n_classes: int) -> dict[str, float]:
    """Accuracy; with two classes also F1 of class id 1 and Matthews correlation."""
    out = {"accuracy": sum(p == y for p, y in zip(preds, labels)) / len(labels)}
    if n_classes == 2:
        out |= {"f1": metrics.f1_score(preds, labels),
                "mcc": metrics.matthews_corrcoef(preds, labels)}
    return out


def data_task(args: argparse.Namespace, device: torch.device,
              rng: dict[str, torch.Generator]) -> Task:
    """--data FILE (data/files.py): classification on an encoder or a decoder, or prompt →
    completion on a decoder. Every row of both files is validated before the model loads."""
    decoder = is_decoder(args.model)
    rows = files.read_rows(args.data)
    eval_rows = files.read_rows(args.eval_data) if args.eval_data else None
    completion = args.text_field is None and files.is_completion_data(rows)
    if completion:
        if not decoder:
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
        text_field = args.text_field or files.default_text_field(rows)
        train, labels = files.to_examples(rows, text_field, args.pair_field, args.label_field)
        dev = (files.to_examples(eval_rows, text_field, args.pair_field, args.label_field,
                                 labels)[0] if eval_rows else None)
    if dev is None:
        keep, held = split_rows(len(train), args.eval_fraction, args.seed)
        train, dev = [train[i] for i in keep], [train[i] for i in held]
    train, dev = train[: args.max_train], dev[: args.max_eval]
    info = {"file": args.data, "eval": args.eval_data or f"--eval-fraction {args.eval_fraction}",
            "kind": "completion" if completion else "classification",
            "labels": list(labels), "n_train": len(train), "n_eval": len(dev)}
    if completion:
        return completion_task(args, device, rng, train, dev, labels, info)
    if not decoder:
        return encoder_task(args, device, rng, train, dev, len(labels),
                            lambda p, y: class_metrics(p, y, len(labels)), info)
    return decoder_task(args, device, rng, train, dev,
                        lambda tok: causal.data_prompt(tok, labels, args.pair_field is not None),
                        lambda p, y: class_metrics(p, y, len(labels)), info)


def completion_task(args: argparse.Namespace, device: torch.device,
                    rng: dict[str, torch.Generator], train: list[files.Completion],
                    dev: list[files.Completion], labels: list[str], info: dict) -> Task:
    """Prompt → completion on a decoder: the loss is each example's mean completion-token NLL
    (prompt tokens masked); eval is the mean completion NLL per token and its perplexity, and
    with a label set of completions the accuracy of the most likely one."""
    model, tok = load_model(args.model, generator=rng["init"])

    loss_fn = decoder_loss(device)

    def train_batches(g: torch.Generator) -> Iterator[dict]:
        while True:
            yield from causal.completion_batches(train, tok, args.batch_size, args.max_len, g)

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict:
        was_training = m.training
        m.eval()
        with autocast(device):
            total, count = causal.completion_nll(m, tok, dev, args.batch_size, args.max_len)
            out = {"nll": total / count, "perplexity": math.exp(min(total / count, 700))}
            if labels:
                prompt = causal.Prompt("{a}", tuple(labels), eos=True)
                preds = causal.predict(m, tok, prompt, [glue.Example(c.prompt, None, 0)
                                                        for c in dev], args.batch_size,
                                       args.max_len)
                gold = [labels.index(c.completion) for c in dev]
                out["accuracy"] = sum(p == y for p, y in zip(preds, gold)) / len(dev)
        m.train(was_training)
        return out

    return Task(model, [], train_batches, len(train), loss_fn, evaluate, True, info=info)


def planted_task(args: argparse.Namespace, device: torch.device,
                 rng: dict[str, torch.Generator]) -> Task:
    model, _ = load_model(args.model, num_labels=None, generator=rng["init"])
    targets = args.targets.split(",")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and any(n == t or n.endswith("." + t) for t in targets)]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ValueError(f"--targets {args.targets}: {', '.join(unmatched)} matches no nn.Linear "
                         f"of --model {args.model}; use suffixes of its module names")
    # bench.py --planted-study --plants anywhere sets args.plants: plants on any target matrix
    anywhere = getattr(args, "plants", "reach") == "anywhere"
    teacher, truth = planted.plant(model, names, generator=rng["init"],
                                   **({"reach": math.inf} if anywhere else {}))
    model.to(device), teacher.to(device)
    vocab = planted.vocab_size(model)
    seq = min(args.max_len, 32)

    def loss_fn(m: nn.Module, batch: dict) -> torch.Tensor:
        with autocast(device):
            return planted.planted_loss(m, teacher, to_device(batch, device)).float()

    def train_batches(g: torch.Generator) -> Iterator[dict]:
        while True:
            yield planted.random_batch(vocab, args.batch_size, seq, g)

    eval_set = [planted.random_batch(vocab, args.batch_size, seq, rng["eval"]) for _ in range(8)]

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict:
        was_training = m.training
        m.eval()
        loss = sum(loss_fn(m, b).item() for b in eval_set) / len(eval_set)
        m.train(was_training)
        return {"loss": loss}

    # the teacher is deterministic, so the student trains in eval mode: dropout (hidden,
    # attention, adapter) would only add noise to the regression target
    return Task(model, [], train_batches, None, loss_fn, evaluate, False, truth)
