"""The embedded `planted` task: a teacher with known low-rank updates ΔW* on a few matrices, so
a rank allocation can be scored against the truth; the student (base + LoRA) learns the teacher's
output on random token sequences. Needs no files.

    teacher, planted = plant(model, names, generator=g)   # {name: planted rank}
    loss = planted_loss(student, teacher, random_batch(vocab, 32, 32, generator=g))
"""

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn as nn

PLANT_RANK = 24  # 3r for r = 8: three plants take 72 of the budget 8·12 = 96
PLANT_EFFECT = 0.01  # each ΔW* alone moves the output by this fraction of its RMS
REACH = 10.0  # the reach rule: no plant where ‖ΔW*‖ > REACH·‖W‖ would be needed; the output
# barely feels such a matrix (a random-init query or key needs ~45·‖W‖: attention stays uniform
# over tiny values), and no LoRA could learn it from B = 0
UNREACHED = ("query", "key")  # the module types the reach rule keeps plants off on models.TINY


def vocab_size(model: nn.Module) -> int:
    """Rows of the model's first nn.Embedding (the token embedding of BERT and LLaMA alike)."""
    return next(m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding))


def random_batch(vocab_size: int, batch_size: int, seq_len: int,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Token ids uniform in [1, vocab_size) (0 is BERT's [PAD]), row lengths uniform in
    [⌈seq_len/2⌉, seq_len], right-padded with id 0; drawn on the CPU from `generator` alone.
    random_batch(1000, 2, 8, torch.Generator())["input_ids"].shape == (2, 8)"""
    ids = torch.randint(1, vocab_size, (batch_size, seq_len), generator=generator)  # (B, T)
    lengths = torch.randint((seq_len + 1) // 2, seq_len + 1, (batch_size, 1), generator=generator)
    mask = (torch.arange(seq_len) < lengths).long()  # (B, T)
    return {"input_ids": ids * mask, "attention_mask": mask}


def _output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T, C): an encoder's last hidden states (its tuple's first item), a decoder's logits."""
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    return out[0] if isinstance(out, (tuple, list)) else out


def _mse(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared error over channels and valid tokens of each example, then mean over examples."""
    m = mask.to(h.dtype)  # (B, T)
    per_token = (h - target).square().mean(-1)  # (B, T)
    return ((per_token * m).sum(1) / m.sum(1)).mean()


def planted_loss(student: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor]
                 ) -> torch.Tensor:
    """_mse of the student's output against the teacher's: a mean of per-example losses."""
    with torch.no_grad():
        target = _output(teacher, batch)  # (B, T, C)
    return _mse(_output(student, batch), target, batch["attention_mask"])


def plant(model: nn.Module, names: Sequence[str], n_planted: int = 3, rank: int = PLANT_RANK,
          effect: float = PLANT_EFFECT, *, generator: torch.Generator,
          probe: dict[str, torch.Tensor] | None = None,
          reach: float = REACH) -> tuple[nn.Module, dict[str, int]]:
    """A frozen, eval-mode copy of `model` with W_m ← W_m + ΔW*_m on n_planted of the nn.Linear
    `names`, tried in torch.randperm order; returns (teacher, {name: rank}).
    ΔW*_m = σ_m·U Vᵀ, U: (d_out, r) and V: (d_in, r) orthonormal (QR of a Gaussian); σ_m makes
    ΔW*_m alone move the output by `effect` of its RMS on the probe (default: random_batch(vocab,
    16, 32) from `generator`). The reach rule skips a matrix that needs ‖ΔW*‖ > reach·‖W‖.
    plant(bert, ["encoder.layer.0.output.dense", ...], generator=g)[1] == {name: 24, ...}"""
    order = [names[i] for i in torch.randperm(len(names), generator=generator).tolist()]
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    device = next(teacher.parameters()).device
    probe = random_batch(vocab_size(model), 16, 32, generator) if probe is None else probe
    probe = {k: v.to(device) for k, v in probe.items()}
    mask, deltas, planted = probe["attention_mask"], {}, {}
    with torch.no_grad():
        base = _output(teacher, probe)  # (B, T, C)
        target = effect * _mse(base, torch.zeros_like(base), mask).sqrt().item()
        for name in order:
            if len(planted) == n_planted:
                break
            W = teacher.get_submodule(name).weight
            W0 = W.clone()
            U = torch.linalg.qr(torch.randn(W.shape[0], rank, generator=generator))[0]
            V = torch.linalg.qr(torch.randn(W.shape[1], rank, generator=generator))[0]
            D = (U @ V.T).to(W)  # ‖D‖_F = √r, unit singular values
            limit = reach * W0.float().norm().item() / math.sqrt(rank)
            sigma = (limit / reach if math.isfinite(reach)  # a first guess: ‖σD‖ = ‖W‖
                     else W0.float().norm().item() / math.sqrt(rank))
            for _ in range(12):  # RMS change ∝ σ while small: a few rescalings converge
                W.copy_(W0 + sigma * D)
                moved = _mse(_output(teacher, probe), base, mask).sqrt().item()
                if not moved > 0 or abs(moved / target - 1) < 1e-3 or sigma > limit:
                    break
                sigma *= target / moved
            W.copy_(W0)
            if moved > 0 and abs(moved / target - 1) < 1e-2 and sigma <= limit:
                deltas[name], planted[name] = sigma * D, rank
        if len(planted) < n_planted:
            raise ValueError(f"only {len(planted)} of {len(names)} matrices can move the output "
                             f"by effect={effect} with ‖ΔW*‖ <= {reach}·‖W‖ (found "
                             f"{list(planted)}): lower effect or n_planted, or pass more names")
        for name, delta in deltas.items():
            teacher.get_submodule(name).weight.add_(delta)
    return teacher, planted


# -----------------------------------------------------------------------------
# the allocation that knows the truth, and an allocation against it


def oracle_ranks(names: Sequence[str], planted: dict[str, int], budget: int) -> dict[str, int]:
    """Every planted matrix gets its planted rank, the others share the rest of the budget
    evenly (ranks ≥ 1 differing by at most one, the extra ones to the first names).
    oracle_ranks(["a", "b", "c", "d"], {"b": 5}, budget=12) == {"a": 3, "b": 5, "c": 2, "d": 2}"""
    others = [n for n in names if n not in planted]
    left = budget - sum(planted.values())
    if left < len(others) or (not others and left != 0):
        raise ValueError(f"budget={budget} with planted ranks summing to "
                         f"{sum(planted.values())} leaves {left} for {len(others)} other "
                         "matrices: raise the budget to give each at least rank 1")
    share, extra = divmod(left, len(others)) if others else (0, 0)
    rest = {n: share + (i < extra) for i, n in enumerate(others)}
    return {n: planted[n] if n in planted else rest[n] for n in names}


def rank_recovery(ranks: dict[str, int], planted: dict[str, int]) -> dict:
    """Allocated vs planted ranks: mean rank on planted and other matrices (NaN if none), the
    share of the total rank on planted ones (chance: |P|/M), and how many got their rank."""
    on = [ranks[n] for n in ranks if n in planted]
    off = [ranks[n] for n in ranks if n not in planted]
    total = sum(ranks.values())
    return {"mean_rank_planted": sum(on) / len(on) if on else math.nan,
            "mean_rank_other": sum(off) / len(off) if off else math.nan,
            "share_planted": sum(on) / total if total else 0.0,
            "chance_share": len(on) / len(ranks),
            "covered": sum(ranks[n] >= r for n, r in planted.items())}
