"""Classification as prompts for a causal LM: an example becomes prompt + answer, e.g.
"Review: a gripping film\nSentiment:" + " positive", the loss is on the answer tokens, and the
prediction is the label word of highest log-likelihood. Prompt and answer are tokenised apart,
so training and scoring see the same answer tokens; a too-long prompt loses its first tokens.
Batches hold input_ids, attention_mask, loss_mask (1 on answer tokens) and labels.

    for batch in causal_batches(train, tok, "sst2", batch_size=8, max_len=128, generator=g):
        loss = causal_loss(model(batch["input_ids"], batch["attention_mask"]), batch)
"""

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.glue import Example, epoch, task_spec


class Prompt(NamedTuple):
    template: str  # str.format with a = text_a, b = text_b
    label_words: tuple[str, ...]  # in label-id order (data/glue.py's TaskSpec.labels)
    eos: bool = False  # end every label word with the tokenizer's EOS (when it has one)


PROMPTS: dict[str, Prompt] = {  # by GLUE folder name
    "SST-2": Prompt("Review: {a}\nSentiment:", (" negative", " positive")),
    "CoLA": Prompt("Sentence: {a}\nGrammar:", (" unacceptable", " acceptable")),
    "RTE": Prompt("Premise: {a}\nHypothesis: {b}\nDoes the premise entail the hypothesis?\n"
                  "Answer:", (" yes", " no")),
    "MRPC": Prompt("Sentence 1: {a}\nSentence 2: {b}\nDo both sentences mean the same thing?\n"
                   "Answer:", (" no", " yes")),
    "QNLI": Prompt("Question: {a}\nSentence: {b}\nDoes the sentence answer the question?\n"
                   "Answer:", (" yes", " no")),
    "QQP": Prompt("Question 1: {a}\nQuestion 2: {b}\nDo both questions ask the same thing?\n"
                  "Answer:", (" no", " yes")),
    "MNLI": Prompt("Premise: {a}\nHypothesis: {b}\nDoes the premise entail the hypothesis? "
                   "Yes, maybe or no?\nAnswer:", (" yes", " maybe", " no")),
}


def prompt_for(task: str | Prompt) -> Prompt:
    """A GLUE task's Prompt, or your own Prompt as it is.
    prompt_for("SST-2").label_words[1] == " positive" """
    if isinstance(task, Prompt):
        return task
    folder = task_spec(task).folder
    if folder not in PROMPTS:
        raise ValueError(f"task {task!r} ({folder}) has no prompt: it is a regression with no "
                         "label words; use one of " + ", ".join(PROMPTS))
    return PROMPTS[folder]


def label_token_ids(tokenizer, task: str | Prompt) -> list[list[int]]:
    """The token ids of each label word, in label-id order (no BOS; EOS last if prompt.eos)."""
    prompt = prompt_for(task)
    eos = getattr(tokenizer, "eos_id", None)
    eos = [eos] if prompt.eos and eos is not None else []
    return [tokenizer.encode(w, add_bos=False) + eos for w in prompt.label_words]


def _n_bos(tokenizer, ids: list[int]) -> int:
    return int(bool(ids) and ids[0] == getattr(tokenizer, "bos_id", None)
               and getattr(tokenizer, "add_bos", False))


def _cut_left(tokenizer, ids: list[int], budget: int, max_len: int) -> list[int]:
    """ids cut from the left to `budget` tokens; a leading BOS is kept."""
    n_bos = _n_bos(tokenizer, ids)
    if budget <= n_bos:
        raise ValueError(f"max_len={max_len} leaves no room for a prompt before the answer: "
                         "raise max_len")
    return ids if len(ids) <= budget else ids[:n_bos] + ids[len(ids) - budget + n_bos:]


def encode_prompt(tokenizer, task: str | Prompt, example: Example, max_len: int) -> list[int]:
    """The ids of the example's prompt without the answer ("Review: a fine film\\nSentiment:"),
    cut from the left so that the longest label word still fits."""
    text = prompt_for(task).template.format(a=example.text_a, b=example.text_b)
    budget = max_len - max(map(len, label_token_ids(tokenizer, task)))
    return _cut_left(tokenizer, tokenizer.encode(text), budget, max_len)


def collate(rows: Sequence[list[int]], answer_lens: Sequence[int], pad_id: int,
            padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad token rows to the longest; loss_mask marks the last answer_lens[i] tokens of row i.
    collate([[5, 6, 7]], [1], 0)["loss_mask"] == tensor([[0, 0, 1]])"""
    T = max(map(len, rows))
    ids, mask, loss_mask = (torch.full((len(rows), T), v, dtype=torch.long)
                            for v in (pad_id, 0, 0))
    for i, (row, n) in enumerate(zip(rows, answer_lens)):
        start = T - len(row) if padding_side == "left" else 0
        end = start + len(row)
        ids[i, start:end] = torch.tensor(row)
        mask[i, start:end] = 1
        loss_mask[i, end - n:end] = 1
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def causal_batches(examples: Sequence[Example], tokenizer, task: str | Prompt, batch_size: int,
                   max_len: int, generator: torch.Generator | None, shuffle: bool = True,
                   padding_side: str = "right") -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of prompt + gold-answer batches in the order of data.glue.epoch."""
    answers = label_token_ids(tokenizer, task)
    for cut in epoch(len(examples), batch_size, generator, shuffle):
        rows = [examples[i] for i in cut]
        ids = [encode_prompt(tokenizer, task, e, max_len) + answers[e.label] for e in rows]
        batch = collate(ids, [len(answers[e.label]) for e in rows], tokenizer.pad_id, padding_side)
        yield batch | {"labels": torch.tensor([e.label for e in rows], dtype=torch.long)}


def answer_nll(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
               mean: bool) -> torch.Tensor:
    """(B,): each row's NLL −Σ log p(token | earlier tokens) over its masked tokens (their mean if
    `mean`); logits (B, T, V) at position t predict input_ids[:, t + 1]."""
    target_mask = loss_mask[:, 1:].bool()  # (B, T-1): which next tokens are answer tokens
    rows = target_mask.nonzero()[:, 0]
    # only the answer positions go through log_softmax: the vocabulary is wide
    nll = F.cross_entropy(logits[:, :-1][target_mask].float(), input_ids[:, 1:][target_mask],
                          reduction="none")
    total = torch.zeros(logits.shape[0], device=logits.device).index_add(0, rows, nll)
    return total / target_mask.sum(1) if mean else total


def causal_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean over examples of each one's mean answer-token NLL (a mean of per-example losses,
    so a two-token answer weighs as much as a one-token one)."""
    return answer_nll(logits, batch["input_ids"], batch["loss_mask"], mean=True).mean()


def _row_nll(model: nn.Module, tokenizer, rows: Sequence[tuple[list[int], int]]) -> torch.Tensor:
    """(B,): the summed NLL of each (ids, n) row's last n tokens, on the model's device."""
    b = collate(*zip(*rows), tokenizer.pad_id)
    b = {k: v.to(next(model.parameters()).device) for k, v in b.items()}
    logits = model(b["input_ids"], b["attention_mask"])
    return answer_nll(logits.float(), b["input_ids"], b["loss_mask"], mean=False)


@torch.no_grad()
def label_scores(model: nn.Module, tokenizer, task: str | Prompt, examples: Sequence[Example],
                 batch_size: int = 32, max_len: int = 128) -> torch.Tensor:
    """(N, n_labels): log p(label word | prompt), summed over the word's tokens (call it in eval
    mode, as the Task's evaluate does)."""
    answers = label_token_ids(tokenizer, task)
    out = [torch.zeros(0, len(answers))]
    for start in range(0, len(examples), batch_size):
        prompts = [encode_prompt(tokenizer, task, e, max_len)
                   for e in examples[start:start + batch_size]]
        nll = [_row_nll(model, tokenizer, [(p + a, len(a)) for p in prompts]) for a in answers]
        out.append(-torch.stack(nll, 1).cpu())
    return torch.cat(out)


def predict(model: nn.Module, tokenizer, task: str | Prompt, examples: Sequence[Example],
            batch_size: int = 32, max_len: int = 128) -> list[int]:
    """Class ids for data.glue.compute_metrics: the label word with the highest log-likelihood."""
    return label_scores(model, tokenizer, task, examples, batch_size, max_len).argmax(1).tolist()


# -----------------------------------------------------------------------------
# your own data (train.py --data, data/files.py): class labels as words, prompt → completion


def data_prompt(tokenizer, labels: Sequence[str | int], pairs: bool) -> Prompt:
    """The prompt of a --data classification file: "Text: …\\nLabel:" + " <label>". When one
    label's tokens start another's (" 1" and " 10"), every label word ends with EOS, so the
    summed log-likelihood cannot favour the shorter one."""
    template = "Text 1: {a}\nText 2: {b}\nLabel:" if pairs else "Text: {a}\nLabel:"
    words = tuple(f" {v}" for v in labels)
    ids = [tokenizer.encode(w, add_bos=False) for w in words]
    clash = any(a != b and b[:len(a)] == a for a in ids for b in ids)
    if clash and getattr(tokenizer, "eos_id", None) is None:
        raise ValueError(f"the tokens of one label start another's ({list(labels)[:6]}) and the "
                         "tokenizer has no EOS to end them: rename the labels")
    return Prompt(template, words, eos=clash)


def encode_completion(tokenizer, prompt: str, completion: str,
                      max_len: int) -> tuple[list[int], int]:
    """(prompt ids + completion ids + EOS, the completion's token count incl. EOS), tokenised
    apart; the completion keeps its head and leaves a prompt token (and a BOS) before it."""
    ids = tokenizer.encode(prompt)
    eos = getattr(tokenizer, "eos_id", None)
    answer = tokenizer.encode(completion, add_bos=False) + ([] if eos is None else [eos])
    answer = answer[:max(0, max_len - 1 - _n_bos(tokenizer, ids))]
    if not answer:
        raise ValueError(f"max_len={max_len} leaves no room for a completion after the "
                         "prompt: raise max_len")
    return _cut_left(tokenizer, ids, max_len - len(answer), max_len) + answer, len(answer)


def completion_batches(examples: Sequence, tokenizer, batch_size: int, max_len: int,
                       generator: torch.Generator | None,
                       shuffle: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of (prompt, completion) batches, loss_mask on the completion tokens."""
    for cut in epoch(len(examples), batch_size, generator, shuffle):
        ids, lens = zip(*(encode_completion(tokenizer, *examples[i], max_len) for i in cut))
        yield collate(ids, lens, tokenizer.pad_id)


@torch.no_grad()
def completion_nll(model: nn.Module, tokenizer, examples: Sequence, batch_size: int = 32,
                   max_len: int = 128) -> tuple[float, int]:
    """(Σ NLL of every completion token, their count): the mean NLL is the ratio."""
    rows = [encode_completion(tokenizer, *e, max_len) for e in examples]
    total = 0.0
    for start in range(0, len(rows), batch_size):
        total += _row_nll(model, tokenizer, rows[start:start + batch_size]).sum().item()
    return total, sum(n for _, n in rows)
