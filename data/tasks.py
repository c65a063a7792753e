"""The tasks train.py trains on, each a Task: the base model, endless training batches, a loss
that is the mean of per-example losses over dim 0 (the per-example Fisher's contract), and an
evaluation. `args` are train.py's arguments, `rng` its random streams: the model and the plants
draw from rng["init"], the planted eval set from rng["eval"].

    task = glue_task(args, device, rng)   # or causal_task, planted_task, data_task (--data)
    loss = task.loss_fn(model, next(task.train_batches(rng["data"])))
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

from data import causal, files, glue, planted
from data.metrics import accuracy, class_metrics
from models import load_model
from models.checkpoint import is_decoder

Rng = dict[str, torch.Generator]
LABEL_SET = 16  # prompt → completion data with at most this many distinct completions,
# each used twice on average, is scored as a label set too (exact-match accuracy)


def name_matches(name: str, target: str) -> bool:  # TODO merge: lora.name_matches
    return name == target or name.endswith("." + target)


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


def _endless(epoch: Callable[[torch.Generator], Iterator[dict]]):  # epoch after epoch
    def train_batches(g: torch.Generator) -> Iterator[dict]:
        while True:
            yield from epoch(g)
    return train_batches


def _evaluation(device: torch.device):
    """A decorator: evaluate(m) in eval mode, no_grad and autocast; m's mode is put back."""
    def wrap(evaluate: Callable[[nn.Module], dict]) -> Callable[[nn.Module], dict]:
        @torch.no_grad()
        def run(m: nn.Module) -> dict:
            was_training = m.training
            m.eval()
            with autocast(device):
                out = evaluate(m)
            m.train(was_training)
            return out
        return run
    return wrap


def _glue_splits(args: argparse.Namespace) -> tuple[list, list]:
    return (glue.load_glue(args.task, args.data_dir, "train")[: args.max_train],
            glue.load_glue(args.task, args.data_dir, "dev")[: args.max_eval])


def glue_task(args: argparse.Namespace, device: torch.device, rng: Rng) -> Task:
    train, dev = _glue_splits(args)
    return encoder_task(args, device, rng, train, dev, glue.task_spec(args.task).num_labels,
                        lambda p, y: glue.compute_metrics(args.task, p, y))


def encoder_task(args: argparse.Namespace, device: torch.device, rng: Rng, train: list, dev: list,
                 num_labels: int, metrics: Callable, info: dict | None = None) -> Task:
    """Classification (num_labels = 1: regression) with an encoder and a classifier head."""
    model, tok = load_model(args.model, num_labels=num_labels, generator=rng["init"])
    regression = num_labels == 1

    def logits(m: nn.Module, batch: dict) -> torch.Tensor:  # (B, num_labels)
        b = to_device(batch, device)
        with autocast(device):
            return m(b["input_ids"], b["attention_mask"], b["token_type_ids"]).float()

    def loss_fn(m: nn.Module, batch: dict) -> torch.Tensor:
        out, y = logits(m, batch), batch["labels"].to(device, non_blocking=True)
        return F.mse_loss(out.squeeze(-1), y) if regression else F.cross_entropy(out, y)

    @_evaluation(device)
    def evaluate(m: nn.Module) -> dict:
        preds, labels = [], []
        for batch in glue.batches(dev, tok, 128, args.max_len, None, shuffle=False):
            out = logits(m, batch)
            preds += (out.squeeze(-1) if regression else out.argmax(-1)).tolist()
            labels += batch["labels"].tolist()
        return metrics(preds, labels)

    epoch = lambda g: glue.batches(train, tok, args.batch_size, args.max_len, g)  # noqa: E731
    return Task(model, ["classifier"], _endless(epoch), len(train), loss_fn, evaluate, True,
                info=info)


def causal_task(args: argparse.Namespace, device: torch.device, rng: Rng) -> Task:
    """A GLUE task as prompts for a decoder (data/causal.py)."""
    train, dev = _glue_splits(args)
    return decoder_task(args, device, rng, train, dev, lambda tok: args.task,
                        lambda p, y: glue.compute_metrics(args.task, p, y))


def decoder_loss(device: torch.device) -> Callable[[nn.Module, dict], torch.Tensor]:
    """A decoder's loss_fn: data/causal.py's causal_loss on the answer (completion) tokens."""
    def loss_fn(m: nn.Module, batch: dict) -> torch.Tensor:
        batch = to_device(batch, device)
        with autocast(device):
            logits = m(batch["input_ids"], batch["attention_mask"])
        return causal.causal_loss(logits.float(), batch)
    return loss_fn


def decoder_task(args: argparse.Namespace, device: torch.device, rng: Rng, train: list, dev: list,
                 prompt: Callable, metrics: Callable, info: dict | None = None) -> Task:
    """Classification as prompts for a decoder: prompt(tokenizer) gives the GLUE task name or
    the causal.Prompt; predictions compare the label words' log-likelihoods."""
    model, tok = load_model(args.model, generator=rng["init"])
    task = prompt(tok)

    @_evaluation(device)
    def evaluate(m: nn.Module) -> dict:
        preds = causal.predict(m, tok, task, dev, batch_size=args.batch_size, max_len=args.max_len)
        return metrics(preds, [e.label for e in dev])

    epoch = lambda g: causal.causal_batches(  # noqa: E731
        train, tok, task, args.batch_size, args.max_len, g)
    return Task(model, [], _endless(epoch), len(train), decoder_loss(device), evaluate, True,
                info=info)


def completion_task(args: argparse.Namespace, device: torch.device, rng: Rng, train: list,
                    dev: list, labels: list[str], info: dict) -> Task:
    """Prompt → completion on a decoder: the loss is each example's mean completion-token NLL;
    eval is the mean NLL per completion token and its perplexity, and with a label set of
    completions the accuracy of the most likely one."""
    model, tok = load_model(args.model, generator=rng["init"])

    @_evaluation(device)
    def evaluate(m: nn.Module) -> dict:
        total, count = causal.completion_nll(m, tok, dev, args.batch_size, args.max_len)
        out = {"nll": total / count, "perplexity": math.exp(min(total / count, 700))}
        if labels:
            prompt = causal.Prompt("{a}", tuple(labels), eos=True)
            preds = causal.predict(m, tok, prompt, [glue.Example(c.prompt, None, 0) for c in dev],
                                   args.batch_size, args.max_len)
            out["accuracy"] = accuracy(preds, [labels.index(c.completion) for c in dev])
        return out

    epoch = lambda g: causal.completion_batches(  # noqa: E731
        train, tok, args.batch_size, args.max_len, g)
    return Task(model, [], _endless(epoch), len(train), decoder_loss(device), evaluate, True,
                info=info)


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


def data_task(args: argparse.Namespace, device: torch.device, rng: Rng) -> Task:
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
        fields = (args.text_field or files.default_text_field(rows), args.pair_field,
                  args.label_field)
        train, labels = files.to_examples(rows, *fields)
        dev = files.to_examples(eval_rows, *fields, labels)[0] if eval_rows else None
    if dev is None:
        keep, held = split_rows(len(train), args.eval_fraction, args.seed)
        train, dev = [train[i] for i in keep], [train[i] for i in held]
    train, dev = train[: args.max_train], dev[: args.max_eval]
    info = {"file": args.data, "eval": args.eval_data or f"--eval-fraction {args.eval_fraction}",
            "kind": "completion" if completion else "classification",
            "labels": list(labels), "n_train": len(train), "n_eval": len(dev)}
    if completion:
        return completion_task(args, device, rng, train, dev, labels, info)
    extra = ("f1", "mcc") if len(labels) == 2 else ()
    metrics = lambda p, y: class_metrics(p, y, extra)  # noqa: E731
    if not decoder:
        return encoder_task(args, device, rng, train, dev, len(labels), metrics, info)
    return decoder_task(args, device, rng, train, dev,
                        lambda tok: causal.data_prompt(tok, labels, args.pair_field is not None),
                        metrics, info)


def planted_task(args: argparse.Namespace, device: torch.device, rng: Rng) -> Task:
    """The planted task (data/planted.py) on --targets: plants drawn from rng["init"] (any
    target matrix with args.plants == "anywhere", else by the reach rule), 8 eval batches from
    rng["eval"]; the student trains in eval mode (the teacher is deterministic: dropout would
    only add noise to the regression target)."""
    model, _ = load_model(args.model, num_labels=None, generator=rng["init"])
    targets = args.targets.split(",")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and any(name_matches(n, t) for t in targets)]
    unmatched = [t for t in targets if not any(name_matches(n, t) for n in names)]
    if unmatched:
        raise ValueError(f"--targets {args.targets}: {', '.join(unmatched)} matches no nn.Linear "
                         f"of --model {args.model}; use suffixes of its module names")
    anywhere = getattr(args, "plants", "reach") == "anywhere"
    teacher, truth = planted.plant(model, names, generator=rng["init"],
                                   **({"reach": math.inf} if anywhere else {}))
    model.to(device), teacher.to(device)
    vocab, seq = planted.vocab_size(model), min(args.max_len, 32)

    def loss_fn(m: nn.Module, batch: dict) -> torch.Tensor:
        with autocast(device):
            return planted.planted_loss(m, teacher, to_device(batch, device)).float()

    def train_batches(g: torch.Generator) -> Iterator[dict]:
        while True:
            yield planted.random_batch(vocab, args.batch_size, seq, g)

    eval_set = [planted.random_batch(vocab, args.batch_size, seq, rng["eval"]) for _ in range(8)]

    @_evaluation(device)
    def evaluate(m: nn.Module) -> dict:
        return {"loss": sum(loss_fn(m, b).item() for b in eval_set) / len(eval_set)}

    return Task(model, [], train_batches, None, loss_fn, evaluate, False, truth)
