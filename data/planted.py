"""The embedded `planted` task: a teacher with known low-rank updates, so rank allocation can be
scored against ground truth. Needs no files.

    from data.planted import plant, random_batch, planted_loss, recovery
    teacher, planted = plant(model, names, n_planted=3, rank=4, generator=g)  # {name: rank}
    add_lora(model, targets=names, r=8, alpha=16)                             # the student
    loss = planted_loss(model, teacher, random_batch(vocab, 32, 64, generator=g))
    recovery(scores, planted)   # how many planted matrices the scores put on top

The teacher is the base model with W ← W + ΔW* on a few of the matrices the student adapts; the
student (base + LoRA) learns to match the teacher's last hidden states on random token sequences.
An allocation method that reads the task well gives its rank to the planted matrices. This is a
measurement: its defaults are stated, not tuned to make any method look good.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from lora import LoRALinear


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weight of every nn.Linear (or LoRALinear base) by module name."""
    return {n: m.weight for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, LoRALinear))}


def plant(model: nn.Module, names: Sequence[str] | None = None, n_planted: int = 3,
          rank: int | Sequence[int] = 4, scale: float = 0.1, *,
          generator: torch.Generator) -> tuple[nn.Module, dict[str, int]]:
    """A frozen, eval-mode deep copy of `model` with W_m ← W_m + ΔW*_m on n_planted matrices
    drawn at random (torch.randperm with `generator`) from `names` (default: every nn.Linear).

    ΔW*_m = σ_m · U Vᵀ with U: (d_out, r), V: (d_in, r) having orthonormal columns (QR of a
    Gaussian), so ΔW*_m has rank exactly r and r equal singular values. σ_m is set so that
    ‖ΔW*_m‖_F = scale · ‖W_m‖_F: for isotropic layer inputs the planted update moves the layer's
    output by `scale` of its RMS. The default 0.1 is a clear signal that a rank-r LoRA can fit,
    yet small next to the base layer. On a randomly initialised encoder the residual stream and
    LayerNorms damp it: on models.TINY (std-0.02 init) scale 0.1 with three rank-4 plants gives
    a final-hidden MSE near 1e-5 against unit hidden variance, so read the loss relative to its
    value at init. `rank` is one int or one per planted matrix (in draw order).
    Returns (teacher, {name: planted rank}); `model` is not modified."""
    weights = _weights(model)
    names = list(weights) if names is None else list(names)
    unknown = [n for n in names if n not in weights]
    if unknown or len(set(names)) != len(names) or not names:
        raise ValueError(f"names must be distinct nn.Linear module names; bad: {unknown[:5]}, "
                         f"given {len(names)}; the model has {list(weights)[:8]}...")
    if not 1 <= n_planted <= len(names):
        raise ValueError(f"n_planted={n_planted}: use 1 <= n_planted <= {len(names)} (len(names))")
    ranks = [rank] * n_planted if isinstance(rank, int) else list(rank)
    if len(ranks) != n_planted:
        raise ValueError(f"rank has {len(ranks)} entries for n_planted={n_planted}: give one each")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale}: use a finite scale > 0 (default 0.1)")
    chosen = [names[i] for i in torch.randperm(len(names), generator=generator).tolist()]
    planted = dict(zip(chosen[:n_planted], ranks))
    for name, r in planted.items():
        d_out, d_in = weights[name].shape
        if not 1 <= r <= min(d_out, d_in):
            raise ValueError(f"rank {r} for {name} ({d_out}x{d_in}): use 1 <= rank <= "
                             f"{min(d_out, d_in)}")
    teacher = copy.deepcopy(model)
    t_weights = _weights(teacher)
    with torch.no_grad():
        for name, r in planted.items():
            W = t_weights[name]
            d_out, d_in = W.shape
            U = torch.linalg.qr(torch.randn(d_out, r, generator=generator))[0]  # (d_out, r)
            V = torch.linalg.qr(torch.randn(d_in, r, generator=generator))[0]  # (d_in, r)
            sigma = scale * W.float().norm().item() / math.sqrt(r)
            W.add_((sigma * U @ V.T).to(W))
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher, planted


def random_batch(vocab_size: int, batch_size: int, seq_len: int, generator: torch.Generator,
                 device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Random token ids uniform in [1, vocab_size) (0 is BERT's [PAD]; other special ids may
    appear), with per-row lengths uniform in [⌈seq_len/2⌉, seq_len], right-padded with id 0 and
    attention_mask 0, so padding is exercised; token_type_ids are 0. Drawn on the CPU, then
    moved, so the batch depends only on the generator."""
    if vocab_size < 2 or batch_size < 1 or seq_len < 1:
        raise ValueError(f"vocab_size={vocab_size}, batch_size={batch_size}, seq_len={seq_len}: "
                         "use vocab_size >= 2 and batch_size, seq_len >= 1")
    ids = torch.randint(1, vocab_size, (batch_size, seq_len), generator=generator)  # (B, T)
    lengths = torch.randint((seq_len + 1) // 2, seq_len + 1, (batch_size, 1), generator=generator)
    mask = (torch.arange(seq_len) < lengths).long()  # (B, T)
    batch = {"input_ids": ids * mask, "attention_mask": mask,
             "token_type_ids": torch.zeros_like(ids)}
    return {k: v.to(device) for k, v in batch.items()}


def _last_hidden(out) -> torch.Tensor:
    """(B, T, C) from a BertModel-style tuple, a HF ModelOutput, or a plain tensor."""
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0] if isinstance(out, (tuple, list)) else out


def planted_loss(student: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor]
                 ) -> torch.Tensor:
    """Mean squared error between student and teacher last hidden states, averaged over the
    valid tokens (attention_mask = 1) and channels. Both are called as model(**batch)."""
    with torch.no_grad():
        target = _last_hidden(teacher(**batch))  # (B, T, C)
    h = _last_hidden(student(**batch))  # (B, T, C)
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
    return ((h - target) ** 2 * m).sum() / (m.sum() * h.shape[-1])


# -----------------------------------------------------------------------------
# scoring an allocation against the ground truth


def recovery(scores: dict[str, float], planted: dict[str, int], k: int | None = None) -> dict:
    """How many planted matrices the k highest scores pick (k = len(planted) by default).

    A tie at the cut is shared: a tied group of g matrices with p planted that fills q slots
    counts q·p/g hits (the expected hits under random tie-breaking), so constant scores score
    exactly chance. chance_hits = k·|P|/M for M scored matrices.
    recovery({"a": 3, "b": 2, "c": 1}, {"a": 4, "c": 4})["hits"] == 1.0"""
    missing = sorted(set(planted) - set(scores))
    if missing:
        raise ValueError(f"scores miss planted matrices {missing[:5]}: score every adapted matrix")
    if not all(math.isfinite(s) for s in scores.values()):
        raise ValueError("scores must be finite; check the statistics that produced them")
    M = len(scores)
    k = len(planted) if k is None else k
    if not 1 <= k <= M:
        raise ValueError(f"k={k}: use 1 <= k <= {M} (the number of scored matrices)")
    cut = sorted(scores.values(), reverse=True)[k - 1]
    above = [n for n, s in scores.items() if s > cut]
    tied = [n for n, s in scores.items() if s == cut]
    hits = sum(n in planted for n in above)
    hits += (k - len(above)) * sum(n in planted for n in tied) / len(tied)
    return {"k": k, "hits": float(hits), "precision": hits / k,
            "recall": hits / len(planted) if planted else 0.0,
            "chance_hits": k * len(planted) / M}


def rank_recovery(ranks: dict[str, int], planted: dict[str, int]) -> dict:
    """Allocated ranks vs the planted ones: mean rank on planted and on other matrices (NaN when
    a group is empty), the share of the total rank on planted matrices (chance: |P|/M), and how
    many planted matrices got at least their planted rank."""
    missing = sorted(set(planted) - set(ranks))
    if missing:
        raise ValueError(f"ranks miss planted matrices {missing[:5]}: pass every adapted matrix")
    on = [ranks[n] for n in ranks if n in planted]
    off = [ranks[n] for n in ranks if n not in planted]
    total = sum(ranks.values())
    return {"mean_rank_planted": sum(on) / len(on) if on else math.nan,
            "mean_rank_other": sum(off) / len(off) if off else math.nan,
            "share_planted": sum(on) / total if total else 0.0,
            "chance_share": len(on) / len(ranks),
            "covered": sum(ranks[n] >= r for n, r in planted.items())}
