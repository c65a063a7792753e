"""Classification and correlation metrics in pure Python (float64 sums), as sklearn / scipy
define them, except that an undefined correlation (a constant side) is 0.

    class_metrics([1, 0, 1], [1, 0, 0], ("f1", "mcc"))   # {"accuracy": 2/3, "f1": 2/3, "mcc": 0.5}
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence


def _confusion(preds: Sequence[int], labels: Sequence[int]) -> tuple[int, int, int, int]:
    """(tp, tn, fp, fn) with class 1 as the positive class."""
    tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels))
    tn = sum(p != 1 and y != 1 for p, y in zip(preds, labels))
    fp = sum(p == 1 and y != 1 for p, y in zip(preds, labels))
    return tp, tn, fp, len(labels) - tp - tn - fp


def accuracy(preds: Sequence, labels: Sequence) -> float:
    return sum(p == y for p, y in zip(preds, labels)) / len(labels)


def matthews_corrcoef(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Binary MCC = (tp·tn − fp·fn) / √((tp+fp)(tp+fn)(tn+fp)(tn+fn)); 0 when a margin is empty.
    matthews_corrcoef([1, 0], [1, 0]) == 1.0"""
    tp, tn, fp, fn = _confusion(preds, labels)
    den = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return (tp * tn - fp * fn) / math.sqrt(den) if den else 0.0


def f1_score(preds: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of class 1 = 2tp / (2tp + fp + fn); 0 when there is no positive at all."""
    tp, _, fp, fn = _confusion(preds, labels)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def class_metrics(preds: Sequence[int], labels: Sequence[int], extra: Sequence[str] = ()) -> dict:
    """{"accuracy": ..., then each of `extra` ("f1", "mcc")}."""
    more = {"f1": f1_score, "mcc": matthews_corrcoef}
    return {"accuracy": accuracy(preds, labels)} | {m: more[m](preds, labels) for m in extra}


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r = Σ(x−x̄)(y−ȳ) / √(Σ(x−x̄)²·Σ(y−ȳ)²); 0 when a side is constant.
    pearson([1, 2], [3, 5]) == 1.0"""
    if min(x) == max(x) or min(y) == max(y):
        return 0.0
    mx, my = math.fsum(x) / len(x), math.fsum(y) / len(y)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = math.fsum((a - mx) ** 2 for a in x), math.fsum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ = Pearson's r of the ranks, ties sharing their average rank.
    spearman([1, 2, 2, 3], [1, 3, 2, 4]) == math.sqrt(0.9)"""
    def ranks(v: Sequence[float]) -> list[float]:
        r, start = [0.0] * len(v), 0
        for _, tied in itertools.groupby(sorted(range(len(v)), key=v.__getitem__), v.__getitem__):
            tied = list(tied)
            for i in tied:
                r[i] = start + (len(tied) + 1) / 2
            start += len(tied)
        return r
    return pearson(ranks(x), ranks(y))
