"""The tasks train.py trains on: a base model with its data, loss and evaluation, as a Task.

    task = glue_task(args, device, rng)      # GLUE with an encoder and a classifier head
    task = causal_task(args, device, rng)    # GLUE as prompts for a decoder (data/causal.py)
    task = planted_task(args, device, rng)   # the embedded planted task (data/planted.py)
    loss = task.loss_fn(model, next(task.train_batches(rng["data"])))

`args` is train.py's parsed arguments; `rng` its random streams (random_streams): the model and
plants draw from rng["init"], the planted eval set from rng["eval"]. Every loss_fn is the mean of
per-example losses over dim 0, the contract of the per-example Fisher.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import causal, glue, planted
from models import load_model


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


def glue_task(args: argparse.Namespace, device: torch.device,
              rng: dict[str, torch.Generator]) -> Task:
    spec = glue.task_spec(args.task)
    train = glue.load_glue(args.task, args.data_dir, "train")[: args.max_train]
    dev = glue.load_glue(args.task, args.data_dir, "dev")[: args.max_eval]
    model, tok = load_model(args.model, num_labels=spec.num_labels, generator=rng["init"])
    regression = spec.num_labels == 1

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
        return glue.compute_metrics(args.task, preds, labels)

    return Task(model, ["classifier"], train_batches, len(train), loss_fn, evaluate, True)


def causal_task(args: argparse.Namespace, device: torch.device,
                rng: dict[str, torch.Generator]) -> Task:
    """A GLUE task as prompts for a decoder (data/causal.py): the loss is the answer tokens'
    per-example mean NLL, predictions compare the label words' log-likelihoods."""
    train = glue.load_glue(args.task, args.data_dir, "train")[: args.max_train]
    dev = glue.load_glue(args.task, args.data_dir, "dev")[: args.max_eval]
    model, tok = load_model(args.model, generator=rng["init"])

    def loss_fn(m: nn.Module, batch: dict) -> torch.Tensor:
        batch = to_device(batch, device)
        with autocast(device):
            logits = m(batch["input_ids"], batch["attention_mask"])
        return causal.causal_loss(logits.float(), batch)

    def train_batches(g: torch.Generator) -> Iterator[dict]:
        while True:
            yield from causal.causal_batches(train, tok, args.task, args.batch_size,
                                             args.max_len, g)

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict:
        was_training = m.training
        m.eval()
        with autocast(device):
            preds = causal.predict(m, tok, args.task, dev, batch_size=args.batch_size,
                                   max_len=args.max_len)
        m.train(was_training)
        return glue.compute_metrics(args.task, preds, [e.label for e in dev])

    return Task(model, [], train_batches, len(train), loss_fn, evaluate, True)


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
    teacher, truth = planted.plant(model, names, generator=rng["init"])
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
