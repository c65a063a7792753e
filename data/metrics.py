"""Classification and correlation metrics in pure Python (float64 sums), no sklearn or scipy.

    from data.metrics import matthews_corrcoef, f1_score, pearson, spearman
    spearman([1, 2, 2, 3], [1, 3, 2, 4])   # √0.9, ties get average ranks

Conventions follow sklearn / scipy, except that an undefined correlation (a constant side) is 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _confusion(preds: list, labels: list) -> tuple[int, int, int, int]:
    """(tp, tn, fp, fn) with class 1 as the positive class."""
    tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels))
    tn = sum(p != 1 and y != 1 for p, y in zip(preds, labels))
    fp = sum(p == 1 and y != 1 for p, y in zip(preds, labels))
    return tp, tn, fp, len(labels) - tp - tn - fp


def matthews_corrcoef(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Binary MCC = (tp·tn − fp·fn) / √((tp+fp)(tp+fn)(tn+fp)(tn+fn)); 0 when a margin is empty
    (sklearn's convention).  matthews_corrcoef([1, 0], [1, 0]) == 1.0"""
    tp, tn, fp, fn = _confusion(list(preds), list(labels))
    den = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return (tp * tn - fp * fn) / math.sqrt(den) if den else 0.0


def f1_score(preds: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of class 1 = 2tp / (2tp + fp + fn); 0 when there is no positive at all."""
    tp, _, fp, fn = _confusion(list(preds), list(labels))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r; 0 when either side is constant (r is undefined there).
    pearson([1, 2], [3, 5]) == 1.0"""
    if min(x) == max(x) or min(y) == max(y):
        return 0.0
    n = len(x)
    mx, my = math.fsum(x) / n, math.fsum(y) / n
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = math.fsum((a - mx) ** 2 for a in x)
    syy = math.fsum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def _ranks(x: Sequence[float]) -> list[float]:
    """1-based ranks; ties share the average of the ranks they span.
    _ranks([5, 1, 5]) == [2.5, 1.0, 2.5]"""
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ = Pearson's r of the average ranks."""
    return pearson(_ranks(x), _ranks(y))
