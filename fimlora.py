"""Fisher-guided LoRA: FIM-LoRA rank allocation, FW-LoRA regularisation, LoRA-DA initialisation.

    from lora import add_lora
    from fimlora import initialize_fim_ranks
    add_lora(model, targets=["query", "key", "value"], r=8, alpha=16)
    result = initialize_fim_ranks(model, batches, loss_fn)   # loss_fn(model, batch) -> scalar

Every statistic here is read through one hook mechanism (_hooked) or torch.autograd.grad, from a
caller-owned loss_fn(model, batch), and leaves requires_grad, .grad and train/eval as it found
them. Imports only the standard library, torch and lora.py, so the two files can be copied
together. Symbols follow lora.py: W0 (d_out, d_in), A (r, d_in), B (d_out, r), s = α/r.

References:
    FIM-LoRA: arXiv:2605.16800.   LoRA-DA: Zhang et al., arXiv:2510.24561.
    FW-LoRA: "Fisher-Weighted LoRA: one-line importance-aware regularisation" (no public paper).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import operator
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction

import torch
import torch.nn as nn

from lora import LoRALinear, lora_layers, resize_lora

# -----------------------------------------------------------------------------
# shared: the adapted layers, state restore, the one hook mechanism, all-reduce

_CHUNK = 1 << 22  # per-example gradient entries materialised at once (16 MiB of float32)


def _adapted(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA layers with an adapter (r > 0) by name; merged ones are not in the graph."""
    layers = {n: m for n, m in lora_layers(model).items() if m.r > 0}
    if not layers:
        raise ValueError("the model has no LoRA layer with r > 0: call add_lora(model, ...) first")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"layers {merged[:5]} are merged, so their adapters are not in the "
                         "graph: call unmerge_lora(model) first")
    return layers


@contextlib.contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """Put back every parameter's requires_grad and every module's train/eval flag on exit, also
    on error. (.grad needs no saving: the statistics use torch.autograd.grad, which never
    writes it.)"""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode  # not m.train(): that recurses and may have side effects


@contextlib.contextmanager
def _hooked(layers: dict[str, LoRALinear],
            on_grad: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None],
            on_forward: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None
            ) -> Iterator[None]:
    """While active, each call of layer m keeps its input x and adapter input x̃ = dropout(x),
    runs on_forward(m, x, y) if given, and, when y needs grad, registers a tensor hook on y that
    runs on_grad(m, x, x̃, δ) under no_grad once backward delivers δ = ∂L/∂y. Tensors are
    detached. Hooks are removed on exit, also on error.
    Example: with _hooked(_adapted(model), lambda m, x, xd, d: seen.append(m)): loss.backward()
    """
    def attach(name: str, layer: LoRALinear) -> list:
        held: dict[str, torch.Tensor] = {}

        def on_dropout(module, args, out):
            held["x"], held["xd"] = args[0].detach(), out.detach()

        def on_layer(module, args, y):
            if "x" not in held:  # r = 0 or merged: no adapter path ran
                return
            x, xd = held.pop("x"), held.pop("xd")
            if on_forward is not None:
                on_forward(name, x, y)
            if torch.is_grad_enabled() and y.requires_grad:
                y.register_hook(lambda delta: _call_no_grad(on_grad, name, x, xd, delta))

        return [layer.dropout.register_forward_hook(on_dropout),
                layer.register_forward_hook(on_layer)]

    handles: list = []
    try:
        for name, layer in layers.items():
            handles += attach(name, layer)
        yield
    finally:
        for h in handles:
            h.remove()


def _call_no_grad(fn: Callable, name: str, x: torch.Tensor, xd: torch.Tensor,
                  delta: torch.Tensor) -> None:
    with torch.no_grad():
        fn(name, x, xd, delta.detach())


def _all_reduce(tensors: list[torch.Tensor], *counts: int) -> list[int]:
    """Sum the tensors (in place, one collective) and the counts (exact, int64) over the ranks
    of an initialised torch.distributed group; a no-op otherwise. Returns the total counts.
    Every rank must pass the same shapes in the same order (the `layers` order, never the
    order a rank's own data happened to fill a dict in), also a rank with no data (zeros)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return list(counts)
    flat = torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    i = 0
    for t in tensors:  # a tensor listed twice gets the same sum twice
        t.copy_(flat[i:i + t.numel()].view_as(t))
        i += t.numel()
    if not counts:
        return []
    total = torch.tensor(counts, dtype=torch.int64, device=flat.device)  # nccl: on the GPU
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.tolist()

# -----------------------------------------------------------------------------
# 1. FIM-LoRA calibration: empirical-Fisher scores of every lora_B


def _add_per_example(u: torch.Tensor, delta: torch.Tensor, scale: float, sum_sq: torch.Tensor,
                     sum_g: torch.Tensor | None) -> None:
    """sum_sq += Σ_n g_n⊙g_n and sum_g += Σ_n g_n for g_n = scale·δ_nᵀ u_n, a few n at a time.
    u: (N, T, r), delta: (N, T, d_out)."""
    n, _, r = u.shape
    step = max(1, _CHUNK // (delta.shape[-1] * r))
    for i in range(0, n, step):
        g = scale * (delta[i:i + step].transpose(1, 2) @ u[i:i + step])  # (n, d_out, r)
        sum_sq.add_(g.square().sum(0))
        if sum_g is not None:
            sum_g.add_(g.sum(0))


def fisher_scores(model: nn.Module, batches: Iterable,
                  loss_fn: Callable[[nn.Module, object], torch.Tensor], score: str = "efim",
                  n_batches: int | None = 8, per_example: bool = False) -> dict:
    """Empirical-Fisher score of every adapter's lora_B (FIM-LoRA, arXiv:2605.16800):

        efim       F_m = (1/K) Σ_k g_k⊙g_k,          g_k = ∂L_k/∂B_m over K batches
        variance   F_m = (1/K) Σ_k g_k⊙g_k − ḡ⊙ḡ,     ḡ = (1/K) Σ_k g_k
        score_m    = mean of the d_out·r entries of F_m

    B is scored because A's gradient s·Bᵀ(…) is zero at B = 0. per_example=True takes g over the
    examples n of each batch instead, g_n = N·s·Σ_t δ_{n,t} u_{n,t}ᵀ from one backward pass
    (u = A·dropout(x), δ = ∂L/∂y): loss_fn must then be the mean of per-example losses over dim 0
    and each adapted layer run once per forward. The model runs in the caller's mode; no .grad
    is written; flags are restored. Under torch.distributed, sums and counts are all-reduced
    first, so every rank gets the statistics of all ranks' batches.
    Returns {"scores": {m: score_m}, "fisher": {m: F_m (d_out, r) float32}, "count": K or the
    number of examples}.
    Example: fisher_scores(model, [batch], loss_fn)["scores"] -> {"layer.0.query": 3.1e-07, ...}
    """
    if score not in ("efim", "variance"):
        raise ValueError(f"score={score!r}: use 'efim' or 'variance' (allocation_scores has more)")
    if n_batches is not None and n_batches < 1:
        raise ValueError(f"n_batches={n_batches}: use at least 1 (or None for all batches)")
    layers = _adapted(model)
    Bs = [m.lora_B for m in layers.values()]
    sum_sq = {n: torch.zeros_like(m.lora_B, dtype=torch.float32) for n, m in layers.items()}
    sum_g = {n: torch.zeros_like(s) for n, s in sum_sq.items()} if score == "variance" else {}
    sizes: dict[str, int] = {}

    def on_forward(name, x, y):
        if name in sizes:
            raise ValueError(f"layer {name!r} ran twice in one forward pass: per_example needs "
                             "each adapted layer called once (use per_example=False)")
        sizes[name] = x.shape[0]

    def on_grad(name, x, xd, delta):
        layer = layers[name]
        u = xd.float() @ layer.lora_A.detach().float().T  # (N, ..., r)
        n = u.shape[0]
        d = delta.float().reshape(n, -1, delta.shape[-1])  # (N, T, d_out)
        # × N: δ is the gradient of the batch mean (1/N)Σ_n ℓ_n
        _add_per_example(u.reshape(n, -1, layer.r), d, n * layer.scaling, sum_sq[name],
                         sum_g.get(name))

    count = 0
    hooks = _hooked(layers, on_grad, on_forward) if per_example else contextlib.nullcontext()
    with _restored(model), hooks:
        for B in Bs:
            B.requires_grad_(True)
        for batch in itertools.islice(batches, n_batches):
            sizes.clear()
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError("loss_fn must return the scalar batch-mean loss, got "
                                     f"{type(loss).__name__} {getattr(loss, 'shape', '')}")
                if not loss.requires_grad:
                    raise ValueError("the loss does not depend on any lora_B: does loss_fn "
                                     "run the model outside torch.no_grad()?")
                grads = torch.autograd.grad(loss, Bs, allow_unused=True)
            if per_example:
                if len(set(sizes.values())) > 1:
                    raise ValueError(f"layers saw different batch sizes {sizes}: per_example "
                                     "needs the batch on dim 0 of every adapted layer")
                count += next(iter(sizes.values()), 0)
                continue
            count += 1
            with torch.no_grad():
                for name, g in zip(layers, grads):
                    if g is not None:  # None: the layer did not reach the loss
                        sum_sq[name].add_(g.float().square())
                        if sum_g:
                            sum_g[name].add_(g.float())
    count, = _all_reduce([sum_sq[n] for n in layers] + [sum_g[n] for n in layers if sum_g],
                         count)
    if count == 0:
        raise ValueError("batches yielded nothing to calibrate on")
    fisher = {}
    for name in layers:
        fisher[name] = sum_sq[name] / count
        if sum_g:
            fisher[name] = (fisher[name] - (sum_g[name] / count).square()).clamp_min(0.0)
    return {"scores": {n: f.mean().item() for n, f in fisher.items()}, "fisher": fisher,
            "count": count}

# -----------------------------------------------------------------------------
# 2. FIM-LoRA budgeted rank allocation (pure Python: a float search, exact decisions)

_TAU = 2.0**-30  # relative half-width of the window around the float water level swept exactly


def _exact_sum(xs: list[float]) -> Fraction:
    """Σ xs without rounding: math.fsum rounds the true sum once, so add the rounded residuals
    until one is zero (each pass takes ~53 more bits). Example: _exact_sum([0.1, -0.1]) == 0"""
    total, parts = Fraction(0), list(xs)
    while (s := math.fsum(parts)) != 0:
        total += Fraction(s)
        parts.append(-s)
    return total


def _exact_dot(ks: list[int] | None, ws: list[float]) -> Fraction:
    """Σ_m κ_m·w_m without rounding (κ = 1 when ks is None), one exact sum per distinct κ."""
    if ks is None:
        return _exact_sum(ws)
    by: dict[int, list[float]] = {}
    for k, v in zip(ks, ws):
        by.setdefault(k, []).append(v)
    return sum((k * _exact_sum(vs) for k, vs in by.items()), Fraction(0))


def _dot(kappa: list[int] | None, r: list[int]) -> int:
    """Σ_m κ_m·r_m, with κ = 1 when kappa is None."""
    return sum(r) if kappa is None else sum(map(operator.mul, kappa, r))


def _water_level(w: list, kappa: list[int], lo: list[int], hi: list[int], budget: int,
                 K: int = 0, S: Fraction | int = 0) -> Fraction | None:
    """Smallest c ≥ 0 with f(c) = K + c·S + Σ_m κ_m·clamp(c·w_m, lo_m, hi_m) ≥ budget, exact
    when w holds Fractions; None if f(∞) < budget.

    f is continuous, piecewise linear and nondecreasing, with kinks where a module leaves lo_m
    (c = lo_m/w_m) or reaches hi_m (c = hi_m/w_m): sweep the kinks in order and solve the one
    linear piece that crosses the budget. K + c·S stands for modules held fixed by the caller.
    Example: _water_level([1, 3], [1, 1], [0, 0], [10, 10], 8) == 2 (ranks 2 and 6).
    """
    events = sorted((r / wm, leaves, m) for m, wm in enumerate(w) if wm > 0
                    for r, leaves in ((lo[m], 0), (hi[m], 1)))
    K += sum(k * a for k, a in zip(kappa, lo))  # f(c) = K + c·S on the current piece
    if K >= budget:
        return Fraction(0)
    for t, leaves, m in events:
        if K + t * S >= budget:  # S > 0 here: f rose from below the budget on this piece
            return Fraction(budget - K) / S
        if leaves:
            K, S = K + kappa[m] * hi[m], S - kappa[m] * w[m]
        else:
            K, S = K - kappa[m] * lo[m], S + kappa[m] * w[m]
    return Fraction(budget - K) / S if S > 0 else None


def _level(w: list[float], kappa: list[int] | None, lo: list[int], hi: list[int],
           budget: int) -> Fraction:
    """_water_level of every module (given f(∞) ≥ budget), fast. Modules are grouped by
    (lo_m, hi_m) and sorted by w, so f(c) costs a few bisections; Newton steps inside a bracket
    find c in float64; the exact sweep then runs over the modules with a kink within ±3τ of c,
    the others held fixed, and its level is accepted only within ±τ of c (else every module is
    swept exactly, which no test input has needed)."""
    M = len(w)
    if _dot(kappa, lo) >= budget:
        return Fraction(0)
    groups, K_fixed = {}, 0
    if lo.count(lo[0]) == M and hi.count(hi[0]) == M and kappa is None:
        groups[lo[0], hi[0]] = [w, None]
    else:
        for v, k, a, h in zip(w, kappa or itertools.repeat(1), lo, hi):
            g = groups.setdefault((a, h), [[], []])
            g[0].append(v)
            g[1].append(k)
    table = []  # (lo, hi, sorted w, their κ or None, prefix Σ κw, prefix Σ κ)
    for (a, h), (ws, ks) in groups.items():
        if a == h:
            K_fixed += a * (len(ws) if ks is None else sum(ks))
            continue
        if ks is None or ks.count(1) == len(ks):
            ws, ks, Pk = sorted(ws), None, range(len(ws) + 1)
        else:
            pairs = sorted(zip(ws, ks))
            ws, ks = [p[0] for p in pairs], [p[1] for p in pairs]
            Pk = list(itertools.accumulate(ks, initial=0))
        kw = ws if ks is None else [k * v for k, v in zip(ks, ws)]
        table.append((a, h, ws, ks, list(itertools.accumulate(kw, initial=0.0)), Pk))

    def piece(c: float) -> tuple[float, float, list]:  # f(c) = K + c·S near c, and where
        K, S, where = K_fixed, 0.0, []
        for a, h, ws, ks, Pw, Pk in table:
            i, j = bisect.bisect_right(ws, a / c), bisect.bisect_left(ws, h / c)
            K, S = K + a * Pk[i] + h * (Pk[-1] - Pk[j]), S + Pw[j] - Pw[i]
            where.append((i, j))
        return K, S, where

    lo_c = 0.0
    c = hi_c = max(h / ws[bisect.bisect_right(ws, 0.0)] for a, h, ws, *_ in table
                   if ws[-1] > 0)
    for _ in range(300):
        K, S, where = piece(c)
        t = (budget - K) / S if S > 0 else -1.0  # the root of c's own linear piece
        if lo_c < t <= hi_c and piece(t)[2] == where:
            c = t
            break
        lo_c, hi_c = (c, hi_c) if K + c * S < budget else (lo_c, c)
        c = t if lo_c < t <= hi_c else math.sqrt(lo_c) * math.sqrt(hi_c) if lo_c else hi_c / 2
    if not 0 < c < math.inf:  # w_m = 5e-324 can put the level beyond float64
        return _water_level([Fraction(v) for v in w], kappa or [1] * M, lo, hi, budget)
    K, S, U = K_fixed, Fraction(0), []
    for a, h, ws, ks, Pw, Pk in table:  # low [0, p0), near lo [p0, p1), free, near hi [q0, q1)
        z = bisect.bisect_right(ws, 0.0)
        p0 = max(z, bisect.bisect_left(ws, a / (c * (1 + 3 * _TAU))))
        p1 = max(p0, bisect.bisect_right(ws, a / (c * (1 - 3 * _TAU))))
        q0 = max(p1, bisect.bisect_left(ws, h / (c * (1 + 3 * _TAU))))
        q1 = max(q0, bisect.bisect_right(ws, h / (c * (1 - 3 * _TAU))))
        K += a * Pk[p0] + h * (Pk[-1] - Pk[q1])
        S += _exact_dot(ks and ks[p1:q0], ws[p1:q0])
        U += [(ws[m], 1 if ks is None else ks[m], a, h) for m in (*range(p0, p1),
                                                                 *range(q0, q1))]
    level = _water_level([Fraction(u[0]) for u in U], [u[1] for u in U], [u[2] for u in U],
                         [u[3] for u in U], budget, K, S)
    c, tau = Fraction(c), Fraction(_TAU)
    if level is not None and c * (1 - tau) < level <= c * (1 + tau):
        return level
    return _water_level([Fraction(v) for v in w], kappa or [1] * M, lo, hi, budget)


def _weights(s: list[float], power: float) -> list[float]:
    """w_m = (s_m / max s)^p, normalised first so that s^p stays finite and scaling all scores
    by 2**k changes nothing; all-zero scores count as equal scores."""
    s_max = max(s)
    if s_max == 0:
        return [1.0] * len(s)
    w = list(map(operator.truediv, s, itertools.repeat(s_max)))
    return w if power == 1 else [v**power for v in w]  # v**1 == v


def _targets(w: list[float], kappa: list[int] | None, r_min: int, hi: list[int],
             budget: int) -> tuple[Fraction, list[float], list[int]]:
    """Phase 1 of allocate_ranks: (c, w̃, lo) with r*_m = clamp(c·w̃_m, lo_m, hi_m) exactly and
    Σ κ_m·r*_m = min(budget, Σ κ_m·hi_m). Modules with w_m = 0 stay at r_min until every other
    module sits at hi_m; only then do they share what is left as if their scores were equal."""
    lo = [r_min] * len(w)
    budget = min(budget, _dot(kappa, hi))
    if 0.0 in w and budget > _dot(kappa, [h if v > 0 else r_min for v, h in zip(w, hi)]):
        lo = [h if v > 0 else r_min for v, h in zip(w, hi)]  # the w > 0 modules sit at hi
        w = [1.0] * len(w)
    return _level(w, kappa, lo, hi, budget), w, lo


def _continuous_ranks(scores: dict[str, float], budget: int, r_min: int,
                      r_max: int | dict[str, int], costs: dict[str, int] | None = None,
                      power: float = 1.0) -> dict[str, Fraction]:
    """The exact targets r*_m of allocate_ranks as Fractions, by name (for the tests).
    Example: _continuous_ranks({"q": 1.0, "v": 4.0}, 10, 0, 10) == {"q": 2, "v": 8}."""
    names = list(scores)
    kappa = None if costs is None else [costs[n] for n in names]
    hi = [r_max[n] if isinstance(r_max, dict) else r_max for n in names]
    c, w, lo = _targets(_weights(list(scores.values()), power), kappa, r_min, hi, budget)
    return {n: min(max(c * Fraction(v), a), h) for n, v, a, h in zip(names, w, lo, hi)}


def _round(c: Fraction, w: list[float], lo: list[int], hi: list[int], kappa: list[int] | None,
           budget: int, s: list[float], names: list[str]) -> list[int]:
    """Phase 2 of allocate_ranks: r_m = ⌊r*_m⌋, then one rank at a time in the order of
    r*_m − r_m (descending), −s_m, names[m]. r*_m = clamp(c·w_m, lo_m, hi_m) is taken in float64
    (error < δ/16) and exactly wherever δ could change a floor or the order."""
    M, exact = len(w), {}

    def target(m: int) -> tuple[int, Fraction]:  # exact (⌊r*⌋, r* − ⌊r*⌋); equal w share it
        key = (w[m], lo[m], hi[m])
        if key not in exact:
            t = min(max(c * Fraction(w[m]), lo[m]), hi[m])
            exact[key] = (math.floor(t), t - math.floor(t))
        return exact[key]

    def exactly(ms: list[int]) -> list[int]:  # ms sorted by the exact order
        keys = {(w[m], lo[m], hi[m]): m for m in ms}  # one exact remainder per distinct key
        top = sorted(keys, key=lambda k: target(keys[k])[1], reverse=True)
        rank, i = {}, 0
        for k, prev in zip(top, [None, *top]):  # equal remainders share a rank
            i += prev is not None and target(keys[k])[1] != target(keys[prev])[1]
            rank[k] = i
        return sorted(ms, key=lambda m: (rank[w[m], lo[m], hi[m]], -s[m], names[m]))

    huge = c >= 2**1000  # then every module goes the exact way
    cf = float(min(c, 2**1000))
    y = [cf * v for v in w]  # c·w_m, error < δ/16 where it is ≤ h_m + 1
    fl = list(map(int, y))
    fy = list(map(operator.sub, y, fl))  # exact in float
    delta = 2.0**-48 * (max(hi) + 1)
    if lo.count(lo[0]) == M and hi.count(hi[0]) == M:
        a, h = lo[0], hi[0]  # floor(clamp(y)) = clamp(floor(y)) for integer bounds
        r = [a if v < a else h if v >= h else v for v in fl]
        fr = [q if a <= v < h else 0.0 for v, q in zip(fl, fy)]
    else:
        r = [a if v < a else h if v >= h else v for v, a, h in zip(fl, lo, hi)]
        fr = [q if a <= v < h else 0.0 for v, q, a, h in zip(fl, fy, lo, hi)]
    near = range(M) if huge else [m for m, q in enumerate(fy) if q < delta or q > 1 - delta]
    for m in near:
        if lo[m] - delta < y[m] < hi[m] + delta or huge:
            r[m], q = target(m)
            fr[m] = float(q)
    left = budget - _dot(kappa, r)
    if left <= 0:
        return r
    if kappa is None:  # the `left` largest remainders get one more rank: the cut exactly
        sfr = sorted(fr)
        i = j = M - left
        while i > 0 and sfr[i] - sfr[i - 1] <= 2 * delta:
            i -= 1
        while j < M - 1 and sfr[j + 1] - sfr[j] <= 2 * delta:
            j += 1
        bottom, top = sfr[i], sfr[j]  # gaps > 2δ around [bottom, top]: the float order holds
        band = exactly([m for m, q in enumerate(fr) if bottom <= q <= top])
        r = [v + (q > top) for v, q in zip(r, fr)]
        for m in band[:left - (M - 1 - j)]:
            r[m] += 1
        return r
    order = sorted(range(M), key=fr.__getitem__, reverse=True)
    i = 0
    while i < M:  # runs of remainders within 2δ of each other: sorted exactly
        j = i
        while j + 1 < M and fr[order[j]] - fr[order[j + 1]] <= 2 * delta:
            j += 1
        order[i:j + 1] = exactly(order[i:j + 1]) if j > i else order[i:j + 1]
        i = j + 1
    order = [m for m in order if w[m] > 0]  # w = 0 (never reached by the loss): r_min
    while order and left > 0:  # rounds: a module raised in this round may be raised again
        raised = []
        for m in order:
            if r[m] < hi[m] and kappa[m] <= left:
                r[m] += 1
                left -= kappa[m]
                raised.append(m)
        order = raised
    return r


def allocate_ranks(scores: dict[str, float], budget: int, r_min: int,
                   r_max: int | dict[str, int], costs: dict[str, int] | None = None,
                   power: float = 1.0) -> dict[str, int]:
    """FIM-LoRA rank allocation (arXiv:2605.16800, two-phase water-filling), done exactly.

    With w_m = (s_m / max s)^p, h_m = r_max (or r_max[m]: a per-matrix cap) and κ_m the cost of
    one rank of matrix m (1 when costs is None, so the budget R counts ranks; d_in + d_out to
    count parameters):
      phase 1  r*_m = clamp(c·w_m, r_min, h_m), the water level c solving Σ_m κ_m·r*_m = R;
      phase 2  r_m = ⌊r*_m⌋, then one rank at a time to the largest r*_m − r_m (ties: higher
               score, then lower name) while r_m < h_m and κ_m fits in what is left of R.
    Without costs that is largest-remainder rounding and Σ_m r_m = R. With costs the order is
    gone through again while a rank fits: Σ κ_m·r_m ≤ R, r_m ≥ ⌊r*_m⌋, and every matrix below
    h_m costs more than what is left, so the spend is short of the best reachable by less than
    one rank of the cheapest such matrix, not always the best (κ 3, 3, 4, s 1.5, 1.5, 1.75,
    R = 16: ranks 1, 1, 2 spend 14, where 2, 2, 1 would spend 16). A score-0 matrix (the loss
    never reaches it) stays at r_min until every other sits at h_m; what only it could take is
    left unspent. c is searched in float64,
    then made exact (Fractions) over the few modules near it; floors and remainders are exact
    wherever float error could change them, so the result is that of exact arithmetic (10^5
    matrices in ~0.1 s).
    tests/test_allocation.py holds the properties. Raises ValueError naming the bad value for
    non-finite or negative scores, bad bounds, caps, costs or power, and a budget outside
    [M·r_min, Σ_m h_m].
    Example: allocate_ranks({"q": 1.0, "v": 4.0}, budget=6, r_min=0, r_max=10) == {"q": 1, "v": 5}
    """
    names, s = list(scores), list(scores.values())
    M = len(names)
    if M == 0:
        raise ValueError("scores is empty: pass at least one {module_name: score}")
    try:
        fine = (set(map(type, s)) <= {float, int} and math.isfinite(math.fsum(s))
                and min(s) >= 0)
    except (ValueError, OverflowError):
        fine = False
    if not fine:  # look for the culprit only now: one Python check per score is slow
        for name, v in scores.items():
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"scores[{name!r}]={v!r}: scores must be finite and ≥ 0")
    caps = r_max if isinstance(r_max, dict) else None
    for label, v in (("budget", budget), ("r_min", r_min), ("r_max", 0 if caps else r_max)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{label}={v!r} is not an integer: pass an int")
    if r_min < 0:
        raise ValueError(f"r_min={r_min} < 0: ranks cannot be negative")
    if caps is not None:
        if caps.keys() != scores.keys():
            bad = sorted(set(caps) ^ set(scores))
            raise ValueError(f"r_max and scores name different modules: {bad[:5]}")
        hi = [caps[n] for n in names]
        low = [n for n, h in zip(names, hi) if isinstance(h, bool) or not isinstance(h, int)
               or h < r_min]
        if low:
            raise ValueError(f"r_max[m] for m in {low[:5]} is not an int ≥ r_min={r_min}: "
                             "lower r_min or raise those caps")
    else:
        if r_min > r_max:
            raise ValueError(f"r_min={r_min} > r_max={r_max}: lower r_min or raise r_max")
        hi = [r_max] * M
    if not (isinstance(power, (int, float)) and math.isfinite(power) and power >= 0):
        raise ValueError(f"power={power!r}: pass a finite power ≥ 0 (1: proportional, 0: uniform)")
    if costs is None:
        kappa = None
        if budget < M * r_min:
            raise ValueError(
                f"budget={budget} < M·r_min={M * r_min}: raise the budget or lower r_min"
            )
        if budget > sum(hi) and caps is None:
            raise ValueError(
                f"budget={budget} > M·r_max={M * r_max}: lower the budget or raise r_max"
            )
        if budget > sum(hi):
            tight = sorted(names, key=caps.__getitem__)[:5]
            raise ValueError(f"budget={budget} > Σ_m r_max[m]={sum(hi)}: lower the budget or "
                             f"raise the caps, the lowest being {[(n, caps[n]) for n in tight]}")
    else:
        if set(costs) != set(scores):
            bad = sorted(set(costs) ^ set(scores))
            raise ValueError(f"costs and scores name different modules: {bad}")
        kappa = [costs[n] for n in names]
        for name, k in zip(names, kappa):
            if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
                raise ValueError(f"costs[{name!r}]={k!r}: pass a positive int (d_in + d_out)")
        floor_cost = sum(k * r_min for k in kappa)
        if budget < floor_cost:
            raise ValueError(
                f"budget={budget} < Σ cost_m·r_min={floor_cost}: raise the budget or lower r_min"
            )
    c, w, lo = _targets(_weights(s, power), kappa, r_min, hi, budget)
    return dict(zip(names, _round(c, w, lo, hi, kappa, budget, s, names)))


def _best_extra(values: list[list[float]], kappa: list[int], left: int) -> list[int]:
    """k_m ∈ [0, len(values[m]) − 1] maximising Σ_m values[m][k_m] with Σ κ_m·k_m ≤ left and
    no k_m below its top whose κ_m fits in what is left: a dynamic programme over left/gcd(κ),
    once per threshold t ∈ {κ_m} ∪ {∞} (matrices with κ_m < t at their top, what is left < t).
    Ties go to fewer ranks on later matrices."""
    if not values:
        return []
    g = math.gcd(*kappa)
    L, u, best = left // g, [k // g for k in kappa], None
    for t in sorted(set(u)) + [math.inf]:
        dp = torch.full((L + 1,), -math.inf, dtype=torch.float64)
        dp[0], picks = 0.0, []
        for v, um in zip(values, u):
            K = len(v) - 1
            cand = torch.full((K + 1, L + 1), -math.inf, dtype=torch.float64)
            for k in range(K if um < t else 0, min(K, L // um) + 1):
                cand[k, k * um:] = dp[:L + 1 - k * um] + v[k]
            dp, pick = cand.max(0).values, cand.argmax(0)  # argmax: the first (fewest ranks)
            picks.append(pick)
        dp[L - torch.arange(L + 1) >= t] = -math.inf  # a matrix below its top would still fit
        if best is None or dp.max() > best[0]:
            best = (dp.max(), int(dp.argmax()), picks)
    _, b, picks = best
    out = []
    for um, pick in zip(reversed(u), reversed(picks)):
        out.append(int(pick[b]))
        b -= out[-1] * um
    return out[::-1]


def allocate_by_gains(gains: dict[str, list[float]], budget: int, r_min: int,
                      r_max: int | dict[str, int], costs: dict[str, int] | None = None
                      ) -> dict[str, int]:
    """Ranks r_m ∈ [r_min, h_m = min(r_max or r_max[m], len(gains[m]))] with the largest total
    gain Σ_m Σ_{i≤r_m} g_{m,i}, gains[m] = [g_1, g_2, …] the value of matrix m's i-th rank, among
    those that spend the budget as allocate_ranks does: Σ κ_m·r_m ≤ R and no matrix below h_m
    fits in what is left (κ_m = 1 without costs, so Σ r_m = R; d_in + d_out with costs, R in
    parameters). So a negative gain is taken only where that contract forces it, and then the
    least harmful one. A matrix whose gains are all 0 (the loss never reaches it) stays at r_min
    until every other matrix sits at h_m, as a score-0 matrix in allocate_ranks. Exact, for any
    gains (_best_extra's dynamic programme), where the greedy order by g/κ is not: gains a [3]
    at κ 3, b [2] and c [2] at κ 2, R = 4 give b + c (gain 4), not a (3). Raises ValueError for
    non-finite gains and a budget outside [Σ κ·r_min, Σ_m h_m].
    Example: allocate_by_gains({"q": [3.0, 1.0], "v": [2.0, 0.5]}, 3, 0, 2) == {"q": 2, "v": 1}
    """
    names = list(gains)
    if not names:
        raise ValueError("gains is empty: pass at least one {module_name: [g_1, g_2, ...]}")
    hi = {n: min(r_max[n] if isinstance(r_max, dict) else r_max, len(gains[n])) for n in names}
    kappa = dict.fromkeys(names, 1) if costs is None else costs
    for n in names:
        if not all(math.isfinite(v) for v in gains[n]):
            raise ValueError(f"gains[{n!r}] has inf/NaN: pass finite gains")
        if hi[n] < r_min:
            raise ValueError(f"{n}: {len(gains[n])} gains and r_max={hi[n]} < r_min={r_min}: "
                             "pass at least r_min gains per matrix or lower r_min")
    left = budget - sum(kappa[n] * r_min for n in names)
    if left < 0 or (costs is None and budget > sum(hi.values())):
        raise ValueError(f"budget={budget} outside [Σ κ·r_min, Σ_m min(r_max, len(gains[m]))] "
                         f"= [{budget - left}, {sum(hi.values())}]: change the budget or r_min")
    r = dict.fromkeys(names, r_min)
    reached = [n for n in names if any(gains[n])]
    for group in (reached, [n for n in names if n not in reached]):
        if any(r[n] < hi[n] for n in reached) and group is not reached:
            break
        values = [[0.0, *itertools.accumulate(gains[n][r_min:hi[n]])] for n in group]
        for n, k in zip(group, _best_extra(values, [kappa[n] for n in group], left)):
            r[n] += k
            left -= kappa[n] * k
    return r


# -----------------------------------------------------------------------------
# 3. FIM-LoRA: calibrate, allocate, resize


ALLOCATION_SCORES = ("efim", "variance", "gradw", "kfac", "lorada", "random")
GAIN_SCORES = ("kfac", "lorada")  # per-rank gains, for allocate_by_gains (power does not apply)


def _weight_gradients(model: nn.Module, batches: Iterable,
                      loss_fn: Callable[[nn.Module, object], torch.Tensor],
                      n_batches: int | None) -> tuple[dict[str, dict], int]:
    """Per adapted layer, summed over the first n_batches batches through the hooks (the frozen
    weight never gets requires_grad): G = Σ_b δ_bᵀX_b (each term ∂L_b/∂W0), z = Σ_t x_t⊙x_t,
    y = Σ_t δ_t⊙δ_t, rows = the number of rows t; and the number of batches K, all summed over
    the ranks under torch.distributed."""
    layers = _adapted(model)
    st = {n: {"G": m.weight.new_zeros(m.out_features, m.in_features, dtype=torch.float32),
              "z": m.weight.new_zeros(m.in_features, dtype=torch.float32),
              "y": m.weight.new_zeros(m.out_features, dtype=torch.float32), "rows": 0}
          for n, m in layers.items()}

    def on_grad(name, x, xd, delta):
        X, D = x.reshape(-1, x.shape[-1]).float(), delta.reshape(-1, delta.shape[-1]).float()
        s = st[name]
        s["G"].addmm_(D.T, X)
        s["z"].add_(X.square().sum(0))
        s["y"].add_(D.square().sum(0))
        s["rows"] += X.shape[0]

    K, Bs = 0, [m.lora_B for m in layers.values()]
    with _restored(model), _hooked(layers, on_grad):
        for B in Bs:
            B.requires_grad_(True)
        for batch in itertools.islice(batches, n_batches):
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                if not (isinstance(loss, torch.Tensor) and loss.numel() == 1
                        and loss.requires_grad):
                    raise ValueError("loss_fn must return the scalar batch-mean loss of the model "
                                     "run with gradients (not under torch.no_grad())")
                torch.autograd.grad(loss, Bs, allow_unused=True)
            K += 1
    *rows, K = _all_reduce([st[n][k] for n in layers for k in ("G", "z", "y")],
                           *(st[n]["rows"] for n in layers), K)
    for n, count in zip(layers, rows):
        st[n]["rows"] = count
    if K == 0:
        raise ValueError("batches yielded nothing to calibrate on")
    return st, K


def allocation_scores(model: nn.Module, batches: Iterable,
                      loss_fn: Callable[[nn.Module, object], torch.Tensor], score: str = "efim",
                      n_batches: int | None = 8, generator: torch.Generator | None = None,
                      population_size: int | None = None
                      ) -> dict[str, float] | dict[str, list[float]]:
    """What each adapted matrix earns per rank, from the first n_batches batches, by name:

        efim, variance  fisher_scores(...)["scores"]
        gradw   ‖W0 ⊙ Ḡ‖_F,  Ḡ = (1/K) Σ_b ∂L_b/∂W0            (GoRA-style, arXiv:2502.12171)
        kfac    [½σ_1², ½σ_2², …],  σ_i the singular values of Y^-½ Ḡ Z^-½,
                Z = diag E_t[x_t x_tᵀ],  Y = diag (1/K) Σ_b Σ_t δ_t δ_tᵀ  (Z ⊗ Y ≈ E[g gᵀ]):
                under L(W0 + ΔW) ≈ L + ⟨Ḡ, ΔW⟩ + ½‖Y^½ ΔW Z^½‖²_F the best rank-k ΔW lowers
                the loss by ½ Σ_{i≤k} σ_i²  (K-FAC: Martens & Grosse, arXiv:1503.05671)
        lorada  [−σ²λ_1, −σ²λ_2, …],  λ_1 ≤ λ_2 ≤ … the eigenvalues of lorada_factors' Ω on
                lorada_statistics of these batches (N_pop = population_size, as lorada_init, or
                their examples): σ² undoes Ω's per-matrix normalisation, so gains add up to
                LoRA-DA's objective across matrices
        random  U(0, 1) from a stream of its own, seeded by a mix of generator's seed (the
                global one's without), so it shares no draw with streams seeded seed + k

    Diagonals (Z, Y, lorada's too) are damped by 1e-6 of their mean, so scaling the loss
    changes no ranks. kfac and lorada give each matrix its gains in descending order, for
    allocate_by_gains; the others a float, for allocate_ranks. A matrix the loss never reaches
    scores 0 (all its gains 0), which both allocators keep at r_min. No .grad is written;
    flags are restored.
    Example: allocation_scores(model, batches, loss_fn, "kfac")["layer.0.query"][:2] -> [2e-3, …]
    """
    if score not in ALLOCATION_SCORES:
        raise ValueError(f"score={score!r}: use one of {', '.join(ALLOCATION_SCORES)}")
    layers = _adapted(model)
    if score in ("efim", "variance"):
        return fisher_scores(model, batches, loss_fn, score, n_batches)["scores"]
    if score == "random":  # SplitMix64's constants: far from every seed + k
        seed = (generator or torch.default_generator).initial_seed()
        own = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + 0xBF58476D1CE4E5B9)
                                            % 2**64)
        u = torch.rand(len(layers), generator=own, dtype=torch.float64)
        return dict(zip(layers, u.tolist()))
    if score == "lorada":
        stats, n = lorada_statistics(model, itertools.islice(batches, n_batches), loss_fn,
                                     n_samples=2**62)
        out = {}
        for name, s in stats.items():
            if not s["G"].any() or s["tokens"] == 0:  # nothing to gain from this matrix
                out[name] = [0.0] * s["G"].shape[1]
                continue
            G, Z, y = s["G"].double(), s["Z"].double(), s["y_diag"].double()
            damp = [1e-6 * v.mean().item() + torch.finfo(v.dtype).tiny for v in (Z.diag(), y)]
            _, Omega, info = _da_omega(G, Z, y, 1.0, 0.03, damp[0], population_size or n,
                                       y_damping=damp[1])
            out[name] = (-info["sigma"] ** 2 * torch.linalg.eigvalsh(Omega)).tolist()
        return out
    st, K = _weight_gradients(model, batches, loss_fn, n_batches)
    out = {}
    for name, s in st.items():
        G = s["G"].double() / K
        if score == "gradw":
            out[name] = (layers[name].weight.double() * G).norm().item()
            continue
        z = s["z"].double() / max(s["rows"], 1)
        y = s["y"].double() / K
        z, y = (v + 1e-6 * v.mean() + torch.finfo(v.dtype).tiny for v in (z, y))
        sigma = torch.linalg.svdvals(G / y.sqrt()[:, None] / z.sqrt()[None, :])
        out[name] = (0.5 * sigma.square()).tolist()
    return out


def _rank_caps(layers: dict[str, LoRALinear], budget: int, r_min: int,
               r_max: int, costs: dict[str, int] | None = None) -> int | dict[str, int]:
    """r_max, or {m: min(r_max, d_in, d_out)} where a matrix is thinner than r_max (a rank
    above min(d_in, d_out) adds parameters but no expressiveness), checked against the budget."""
    caps = {n: min(r_max, m.in_features, m.out_features) for n, m in layers.items()}
    thin = {n: c for n, c in caps.items() if c < r_max}
    if not thin or not isinstance(r_max, int) or isinstance(r_max, bool):
        return r_max  # allocate_ranks reports a bad r_max
    few = [f"{n} ({c})" for n, c in thin.items()][:5]
    if r_min > min(thin.values()):
        few = [f"{n} ({c})" for n, c in thin.items() if c < r_min][:5]
        raise ValueError(f"r_min={r_min} exceeds min(d_in, d_out) of {few}: lower r_min or "
                         "leave those matrices out of the targets")
    most = sum(c * (costs[n] if costs else 1) for n, c in caps.items())
    if budget > most:
        what = "cost_m·" if costs else ""
        raise ValueError(f"budget={budget} > Σ_m {what}min(r_max, d_in, d_out)={most} "
                         f"(thin matrices: {few}): lower the budget or leave those matrices "
                         "out of the targets")
    return caps


def _fim_ranks(model: nn.Module, batches: Iterable,
               loss_fn: Callable[[nn.Module, object], torch.Tensor], budget: int | None,
               r_min: int, r_max: int | None, score: str, n_batches: int | None,
               per_example: bool, power: float, generator: torch.Generator | None,
               budget_unit: str = "ranks", population_size: int | None = None
               ) -> tuple[dict[str, int], dict]:
    """(ranks, scores) of initialize_fim_ranks, with every check before the calibration pass;
    the model is left as it is."""
    layers = _adapted(model)
    trained = [n for n, m in layers.items() if bool(m.lora_B.detach().any())]
    if trained:
        raise ValueError(f"layers {trained[:5]} have B ≠ 0 and resizing would discard their ΔW: "
                         "run initialize_fim_ranks on freshly added adapters, before training")
    if score not in ALLOCATION_SCORES or (per_example and score not in ("efim", "variance")):
        raise ValueError(f"score={score!r}, per_example={per_example}: use one of "
                         f"{', '.join(ALLOCATION_SCORES)}, per_example with efim or variance only")
    if budget_unit not in ("ranks", "params"):
        raise ValueError(f"budget_unit={budget_unit!r}: use 'ranks' or 'params'")
    if score in GAIN_SCORES and power != 1:
        raise ValueError(f"power={power!r} with score={score!r}: its per-rank gains go to "
                         "allocate_by_gains, which has no power; drop power (or use efim, "
                         "variance, gradw)")
    # "params": a rank of matrix m costs d_in + d_out parameters, and the budget counts those
    costs = ({n: m.in_features + m.out_features for n, m in layers.items()}
             if budget_unit == "params" else None)
    if budget is None:
        budget = sum(m.r * (costs[n] if costs else 1) for n, m in layers.items())
    r_max = 2 * max(m.r for m in layers.values()) if r_max is None else r_max
    caps = _rank_caps(layers, budget, r_min, r_max, costs)
    allocate_ranks(dict.fromkeys(layers, 1.0), budget, r_min, caps, costs=costs,
                   power=power)  # validate now
    if score in ("efim", "variance"):
        scores = fisher_scores(model, batches, loss_fn, score, n_batches, per_example)["scores"]
    else:
        scores = allocation_scores(model, batches, loss_fn, score, n_batches, generator,
                                   population_size)
    if score in GAIN_SCORES:
        return allocate_by_gains(scores, budget, r_min, caps, costs=costs), scores
    return allocate_ranks(scores, budget, r_min, caps, costs=costs, power=power), scores


def initialize_fim_ranks(model: nn.Module, batches: Iterable,
                         loss_fn: Callable[[nn.Module, object], torch.Tensor],
                         budget: int | None = None, r_min: int = 1, r_max: int | None = None,
                         score: str = "efim", n_batches: int | None = 8,
                         per_example: bool = False, power: float = 1.0,
                         generator: torch.Generator | None = None,
                         budget_unit: str = "ranks", population_size: int | None = None) -> dict:
    """FIM-LoRA (arXiv:2605.16800) in place: score every lora_B (fisher_scores; other scores
    from allocation_scores), allocate the budget (allocate_ranks, or allocate_by_gains for kfac
    and lorada; default Σ_m r_m of the current adapters, r_max = 2·max r, each matrix capped at
    min(r_max, d_in, d_out) so the surplus goes to the others), and resize each adapter to r_m
    with a fresh A (from `generator`) and B = 0, so the model function is unchanged. Each
    matrix keeps the base scale s whatever its rank:
        α_m = α·r_m/r   (s = α/r),      α_m = α·√(r_m/r)   (rsLoRA, s = α/√r).
    budget_unit="params" counts the budget in parameters (a rank of m costs d_in + d_out;
    default Σ_m r_m·(d_in + d_out)), so equal budgets are equal trainable parameters.
    population_size: lorada's N_pop (pass lorada_init's); power must be 1 for kfac and lorada.
    Adapters must be fresh (B = 0); budget and bounds are checked before the calibration pass.
    Returns {"ranks", "alphas", "scores"}, each {name: value}.
    Example: initialize_fim_ranks(model, batches, loss_fn)["ranks"] -> {"...query": 4, ...}
    """
    ranks, scores = _fim_ranks(model, batches, loss_fn, budget, r_min, r_max, score, n_batches,
                               per_example, power, generator, budget_unit, population_size)
    alphas = {}
    for name, layer in _adapted(model).items():
        ratio = ranks[name] / layer.r
        alphas[name] = layer.alpha * (math.sqrt(ratio) if layer.rslora else ratio)
        resize_lora(layer, ranks[name], alpha=alphas[name], generator=generator)
    return {"ranks": ranks, "alphas": alphas, "scores": scores}


def fim_rank_pattern(model: nn.Module, batches: Iterable,
                     loss_fn: Callable[[nn.Module, object], torch.Tensor], r: int, alpha: float,
                     budget: int | None = None, r_min: int = 1, r_max: int | None = None,
                     score: str = "efim", n_batches: int | None = 8, rslora: bool = False,
                     **kw) -> dict:
    """initialize_fim_ranks' allocation as peft.LoraConfig fields, leaving the model as it is.
    The model carries fresh adapters of rank r (add_lora(model, targets, r, alpha)); kw goes
    to initialize_fim_ranks (per_example, power, generator, budget_unit, population_size).
    Returns {"r": the most common r_m, "lora_alpha", "use_rslora", "rank_pattern",
    "alpha_pattern"}: patterns keyed "^" + re.escape(name), which PEFT matches to exactly that
    module, listing the matrices that differ from r and lora_alpha, and α_m = α·r_m/r
    (α·√(r_m/r) with rsLoRA), so every matrix keeps the scale α/r (α/√r).
    Example: peft.LoraConfig(target_modules=targets, **fim_rank_pattern(model, b, f, 8, 16))
    """
    off = [n for n, m in _adapted(model).items() if m.r != r or m.alpha != alpha
           or m.rslora != rslora]
    if off:
        raise ValueError(f"layers {off[:5]} are not rank-{r}, α={alpha}, rslora={rslora} "
                         "adapters: add_lora(model, targets, r, alpha) with the same values")
    if r_min < 1:
        raise ValueError(f"r_min={r_min}: PEFT has no rank 0, use r_min ≥ 1")
    known = {"per_example": False, "power": 1.0, "generator": None, "budget_unit": "ranks",
             "population_size": None}
    if kw.keys() - known:
        raise ValueError(f"unknown arguments {sorted(kw.keys() - known)}: pass "
                         f"{', '.join(known)}")
    ranks, _ = _fim_ranks(model, batches, loss_fn, budget, r_min, r_max, score, n_batches,
                          *{**known, **kw}.values())
    alphas = {n: alpha * (math.sqrt(k / r) if rslora else k / r) for n, k in ranks.items()}
    common = Counter(ranks.values()).most_common(1)[0][0]
    base = alpha * (math.sqrt(common / r) if rslora else common / r)
    return {"r": common, "lora_alpha": base, "use_rslora": rslora,  # PEFT: α_m/√r_m if True
            "rank_pattern": {"^" + re.escape(n): k for n, k in ranks.items() if k != common},
            "alpha_pattern": {"^" + re.escape(n): a for n, a in alphas.items() if a != base}}

# -----------------------------------------------------------------------------
# 4. FW-LoRA: a Fisher-weighted penalty on ΔW

FW_BETA = 0.98  # EMA factor of the warm-up Fisher
FW_WARMUP_STEPS = 500  # K: warm-up steps before the importances are frozen
FW_LAMBDA = 1e-4  # λ of the penalty


def _gram_sq_norm(X: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """‖δᵀX‖²_F for X (T, d_in), δ (T, d_out) without forming δᵀX, by the Gram ("ghost norm")
    identity ‖δᵀX‖²_F = Σ (δδᵀ)⊙(XXᵀ): T²·(d_in + d_out) work instead of T·d_in·d_out."""
    return ((delta @ delta.T) * (X @ X.T)).sum()  # (T, T) Grams


def _direct(X: torch.Tensor, delta: torch.Tensor, method: str) -> bool:
    """Whether fw_track forms δᵀX: "direct", or "auto" where T·d_in·d_out is the cheaper."""
    (T, d_in), d_out = X.shape, delta.shape[1]
    return method == "direct" or (method == "auto" and T * (d_in + d_out) >= d_in * d_out)


@contextlib.contextmanager
def fw_track(model: nn.Module, method: str = "auto") -> Iterator[dict[str, torch.Tensor]]:
    """Yields {m: ‖G_m‖²_F}, filled on exit, for the frozen weight of every adapted layer m,
    with G_m = ∂L/∂W_m = δᵀX summed over everything that ran inside the context: X (T, d_in) and
    δ (T, d_out) stack the rows of every call and every backward pass, so a layer called twice
    or gradients accumulated over micro-batches give ‖Σ_c G_c‖², the norm of the real gradient.
    G_m is never formed when the Gram form is cheaper (method "auto", "direct" or "gram");
    otherwise it is summed in the tensor hook, so X and δ are freed during backward ("auto"
    decides at a layer's first call). Under torch.distributed (DDP) each G_m is all-reduced and
    averaged first, so every rank gets the norm of the gradient DDP applies. The exact norm
    costs one weight-gradient GEMM per matrix, what full fine-tuning adds to a LoRA step; an
    opt-in approximation tracks only every k-th warm-up step (the EMA then sees K/k samples;
    β^k keeps its horizon in steps), for about 1/k of that cost:

        with fw_track(model) as sq_norms:                # or: every k-th step only, then
            loss_fn(model, batch).backward()             # fw_update(ema, sq_norms, step // k,
        ema = fw_update(ema, sq_norms, step)             #           beta=FW_BETA ** k)
    """
    if method not in ("auto", "direct", "gram"):
        raise ValueError(f"method={method!r}: use 'auto', 'direct' or 'gram'")
    layers = _adapted(model)
    sq_norms = {n: m.weight.new_zeros((), dtype=torch.float32) for n, m in layers.items()}
    rows: dict[str, list] = {n: [] for n in layers}  # Gram form: every call's (X, δ)
    G: dict[str, torch.Tensor] = {}  # direct form: Σ_c δ_cᵀX_c

    def on_grad(name, x, xd, delta):
        X = x.reshape(-1, x.shape[-1]).float()  # (T, d_in)
        D = delta.reshape(-1, delta.shape[-1]).float()  # (T, d_out)
        if name in G or (not rows[name] and _direct(X, D, method)):
            G[name] = D.T @ X if name not in G else G[name].addmm_(D.T, X)
        else:
            rows[name].append((X, D))

    with _hooked(layers, on_grad):
        yield sq_norms
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    with torch.no_grad():
        if world > 1:  # DistributedDataParallel: the step's gradient is the ranks' mean G
            for name, m in layers.items():  # "auto" chose per rank: every rank forms every G
                g = G.get(name, m.weight.new_zeros(m.out_features, m.in_features,
                                                   dtype=torch.float32))
                for X, D in rows.pop(name, []):
                    g = g.addmm(D.T, X)
                G[name] = g
            _all_reduce([G[n] for n in layers])  # in layers order: G's own order is per rank
            G = {n: G[n] / world for n in layers}
        for name, g in G.items():
            sq_norms[name].add_(g.square().sum())
        for name, pairs in rows.items():
            if pairs:
                X, D = (torch.cat(z) if len(pairs) > 1 else z[0] for z in zip(*pairs))
                sq_norms[name].add_(_gram_sq_norm(X, D))


def fw_update(ema: dict[str, torch.Tensor], sq_norms: dict[str, torch.Tensor], step: int,
              beta: float = FW_BETA) -> dict[str, torch.Tensor]:
    """One FW-LoRA warm-up step, bias-corrected: returns F̂_k with

        F_k = β·F_{k−1} + (1−β)·‖G_m‖²_F,  F_0 = 0,     F̂_k = F_k / (1 − β^k)

    for k = step = 1, 2, … (pass ema = {} at k = 1). A name missing from sq_norms counts as 0
    this step, one missing from ema as F̂ = 0.
    Example: fw_update({}, {"q": torch.tensor(2.)}, 1) == {"q": tensor(2.)}
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step={step!r}: count warm-up steps from 1")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta={beta}: the EMA factor must lie in [0, 1)")
    keep, new = beta * (1.0 - beta ** (step - 1)), 1.0 - beta  # F̂_{k−1} back to F_{k−1}
    out = {}
    for name in {**ema, **sq_norms}:
        g = sq_norms.get(name)
        g = torch.zeros_like(ema[name]) if g is None else g.detach().float()
        prev = ema.get(name)
        out[name] = (new * g if prev is None else keep * prev + new * g) / (1.0 - beta ** step)
    return out


def importances(ema: dict[str, torch.Tensor], mode: str = "sum") -> dict[str, torch.Tensor]:
    """FW-LoRA importances I_m = F_m / Σ_j F_j ("sum") or F_m / max_j F_j ("max").
    Example: importances({"q": torch.tensor(1.), "v": torch.tensor(3.)})["v"] == 0.75"""
    if mode not in ("sum", "max"):
        raise ValueError(f"mode={mode!r}: use 'sum' or 'max'")
    if not ema:
        raise ValueError("the Fisher EMA is empty: run the warm-up (fw_track + fw_update) first")
    values = torch.stack([f.detach().float().reshape(()) for f in ema.values()])
    if not torch.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"Fisher EMAs must be finite and ≥ 0, got {values.tolist()}")
    total = values.sum() if mode == "sum" else values.max()
    if total <= 0:
        raise ValueError("all Fisher EMAs are 0: did the warm-up backward passes run inside "
                         "fw_track with trainable adapters?")
    return {name: v / total for name, v in zip(ema, values)}


def fw_penalty(model: nn.Module, importance: dict[str, torch.Tensor | float],
               fw_lambda: float = FW_LAMBDA) -> torch.Tensor:
    """FW-LoRA penalty, differentiable in A and B, over the layers with r > 0:

        λ Σ_m (1 − I_m)·‖ΔW_m‖²_F,   ‖s·B A‖²_F = s²·tr((BᵀB)(AAᵀ))   (two r×r Grams)

    Layers whose A and B have the same shapes are stacked and done in one batched product, so
    a step adds a few operations per shape, not per layer (on a GPU each is a kernel launch).
    A float32 scalar, 0 at init (B = 0); add it to the loss after the warm-up.
    Example: fw_penalty(model, importances(ema), fw_lambda=1e-4) -> tensor(0.)"""
    layers = _adapted(model)
    missing = [n for n in layers if n not in importance]
    if missing:
        raise ValueError(f"no importance for layers {missing[:5]}: pass importances(ema) with "
                         "ema from fw_track over the same model")
    groups: dict[tuple, list[str]] = {}
    for name, m in layers.items():
        groups.setdefault((m.lora_B.shape, m.lora_A.shape), []).append(name)
    total = None
    for names in groups.values():
        B = torch.stack([layers[n].lora_B for n in names]).float()  # (k, d_out, r)
        A = torch.stack([layers[n].lora_A for n in names]).float()  # (k, r, d_in)
        sq = ((B.mT @ B) * (A @ A.mT)).sum((1, 2))  # (k,): tr(PQ) = Σ P⊙Q, Q symmetric
        w = torch.tensor([layers[n].scaling ** 2 for n in names], device=B.device) * (
            1.0 - torch.stack([torch.as_tensor(importance[n], dtype=torch.float32,
                                               device=B.device) for n in names]))
        part = (w * sq).sum()
        total = part if total is None else total + part
    return fw_lambda * total

# -----------------------------------------------------------------------------
# 5. LoRA-DA: data-aware closed-form initialisation

_DA_CHOLESKY_RETRIES = 6  # each retry multiplies the damping on Z by 10


def _da_cholesky(Z: torch.Tensor, lam: float) -> tuple[torch.Tensor, float, int]:
    """Cholesky factor L of (Z+Zᵀ)/2 + λI, retrying with 10λ while the factorisation fails.
    Returns (L, λ used, number of retries)."""
    Z = (Z + Z.T) / 2
    eye = torch.eye(Z.shape[0], dtype=Z.dtype, device=Z.device)
    for retry in range(_DA_CHOLESKY_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(Z + lam * 10**retry * eye)
        if info.item() == 0 and bool(torch.isfinite(L).all()):
            return L, lam * 10**retry, retry
    raise ValueError(f"Z is not positive definite even with damping {lam * 10**retry:g} after "
                     f"{_DA_CHOLESKY_RETRIES} retries: check the activations for inf/NaN")


def _da_canonical_signs(V: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-|·| entry is positive (eigh's signs are arbitrary)."""
    pivot = V.abs().argmax(dim=0)
    signs = V[pivot, torch.arange(V.shape[1], device=V.device)].sign()
    return V * torch.where(signs == 0, torch.ones_like(signs), signs)


def lorada_factors(G: torch.Tensor, Z: torch.Tensor, y_diag: torch.Tensor, r: int,
                   da_alpha: float = 1.0, da_beta: float = 0.03, da_gamma: float = 1024.0,
                   damping: float = 1e-6, n_pop: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """LoRA-DA closed form for one matrix (Zhang et al., arXiv:2510.24561).

    With the K-FAC Fisher F ≈ Z ⊗ Y (Y = diag(y)), the target is one natural-gradient step
    Δ* = −Y⁻¹ G Z⁻¹, and the input subspace V (d_in, r), VᵀV = I, minimises bias + variance:

        min_V tr(Vᵀ Ω V),   Ω = −α_DA Δ̂ᵀΔ̂ + β_DA c Z⁻¹,   c = tr(Y⁻¹) / N_pop / σ²,
        Δ̂ = Δ*/σ, σ = ‖Δ*‖₂;   A = Vᵀ/√γ_DA,   B = Δ̂ V/√γ_DA,   so B A = Δ̂ V Vᵀ / γ_DA,

    V being the eigenvectors of Ω's r smallest eigenvalues (Ky Fan). Z ← (Z+Zᵀ)/2 + λI (λ raised
    10× up to 6 times while the Cholesky factorisation fails) and Y⁻¹ = diag(1/(y + λ)), as in
    the authors' code. β_DA = 0 gives the best rank-r approximation of Δ̂/γ_DA. Works in G's
    dtype promoted to at least float32. Returns (A, B, info) with info = {sigma, damping,
    cholesky_retries, c, eigenvalues (the r smallest)}. Raises ValueError if r ∉ [1, d_in],
    shapes disagree, or G is zero (σ = 0).
    Example: A, B, _ = lorada_factors(G, Z, y, r=8)   # A (8, d_in), B (d_out, 8)
    """
    d_out, d_in = G.shape
    if not 1 <= r <= d_in:
        raise ValueError(f"r={r} must lie in [1, d_in={d_in}]: LoRA-DA picks r input directions")
    if Z.shape != (d_in, d_in) or y_diag.shape != (d_out,):
        raise ValueError(f"G {tuple(G.shape)} needs Z ({d_in}, {d_in}) and y_diag ({d_out},), "
                         f"got {tuple(Z.shape)} and {tuple(y_diag.shape)}")
    if da_gamma <= 0 or n_pop < 1:
        raise ValueError(f"da_gamma={da_gamma} and n_pop={n_pop} must be positive")
    Delta_hat, Omega, info = _da_omega(G, Z, y_diag, da_alpha, da_beta, damping, n_pop)
    evals, evecs = torch.linalg.eigh(Omega)  # ascending
    V = _da_canonical_signs(evecs[:, :r])  # (d_in, r)
    s = math.sqrt(da_gamma)
    A, B = V.T / s, (Delta_hat @ V) / s
    return A, B, {**info, "eigenvalues": evals[:r].tolist()}


def _da_omega(G: torch.Tensor, Z: torch.Tensor, y_diag: torch.Tensor, da_alpha: float,
              da_beta: float, damping: float, n_pop: int, y_damping: float | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(Δ̂, Ω, info) of lorada_factors, in G's dtype promoted to at least float32; y is damped
    by y_damping where given (allocation_scores: relative to y), else by damping."""
    dt = torch.promote_types(G.dtype, torch.float32)
    G, Z, y = G.to(dt), Z.to(dt), y_diag.to(dt)
    L, lam, retries = _da_cholesky(Z, damping)
    y_inv = 1.0 / (y + (damping if y_damping is None else y_damping))  # (d_out,)
    Delta = -y_inv[:, None] * torch.cholesky_solve(G.T, L).T  # Δ* (d_out, d_in)
    sigma = torch.linalg.matrix_norm(Delta, 2)
    if not bool(torch.isfinite(sigma)) or sigma.item() == 0:
        raise ValueError(f"σ = ‖Δ*‖₂ = {sigma.item()}: G is zero or not finite, so LoRA-DA has "
                         "no direction; keep the default init for this matrix")
    Delta_hat = Delta / sigma
    c = y_inv.sum() / n_pop / sigma**2
    Omega = -da_alpha * (Delta_hat.T @ Delta_hat)  # (d_in, d_in)
    if da_beta != 0:
        Omega = Omega + da_beta * c * torch.cholesky_inverse(L)
    info = {"sigma": sigma.item(), "damping": lam, "cholesky_retries": retries, "c": c.item()}
    return Delta_hat, (Omega + Omega.T) / 2, info


def _da_examples(batches: Iterable[dict], n_samples: int, one_at_a_time: bool = True):
    """Yield (chunk, N): single examples (N = 1) or whole batches, at most n_samples examples
    in all (the last batch cut short), as dicts: every tensor value whose first dim equals the
    batch size (the first dim of the first tensor value) is sliced along it; other values pass
    through. Any mapping works (dict, HF BatchEncoding)."""
    seen = 0
    for batch in batches:
        if not hasattr(batch, "items"):
            raise TypeError(f"LoRA-DA batches are dicts of tensors, got {type(batch).__name__}")
        sizes = [v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.ndim > 0]
        if not sizes:
            raise ValueError(f"batch with keys {sorted(batch)} has no tensor with a batch dim")
        n = sizes[0]
        for i in range(0, n, 1 if one_at_a_time else n):
            if seen == n_samples:
                return
            j = min(i + 1 if one_at_a_time else n, i + n_samples - seen)
            yield {k: v[i:j] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n else v
                   for k, v in batch.items()}, j - i
            seen += j - i


def _da_rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(rows, features) view of t keeping valid tokens; the mask applies when its shape equals
    t's leading dims, otherwise (e.g. a pooled (1, d) head input) every row counts."""
    if mask is not None and t.shape[:-1] == mask.shape:
        return t[mask.to(device=t.device, dtype=torch.bool)]
    return t.reshape(-1, t.shape[-1])


def _da_key(x: torch.Tensor) -> tuple:
    """Identity of an input tensor within one forward (inputs are kept alive until the end of
    the forward, so memory cannot be reused; _version catches in-place edits)."""
    return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, x._version)


def lorada_statistics(model: nn.Module, batches: Iterable[dict],
                      loss_fn: Callable[[nn.Module, dict], torch.Tensor], n_samples: int = 256,
                      token_mask: Callable[[dict], torch.Tensor] | None = None,
                      batched: bool = True) -> tuple[dict[str, dict], int]:
    """LoRA-DA statistics (arXiv:2510.24561) of every adapted layer over the first n_samples
    examples, with L_n the loss of example n (a token mean, so Y has the paper's scale) and
    δ_{n,t} = ∂L_n/∂y_t:

        G = (1/n) Σ_n ∂L_n/∂W (d_out, d_in),   Z = E_t[x_t x_tᵀ],   y = E_t[δ_t ⊙ δ_t],

    Z and y over valid tokens: token_mask(chunk), else chunk["attention_mask"], else all.
    batched=False runs loss_fn on one example at a time, as the authors' code, and assumes
    nothing about the loss. batched=True runs one backward per batch of N examples: loss_fn
    must then return the mean of per-example losses over dim 0, L = (1/N) Σ_n L_n (as
    fisher_scores(per_example=True)) with examples that do not interact, so δ_{n,t} =
    N·∂L/∂y_{n,t} and G, Z, y equal the per-example ones up to float rounding. Matrices reading
    the same input tensor (q/k/v) share one Z tensor. Runs in eval mode; no .grad is written and
    flags are restored. Sums are in the weight dtype promoted to at least float32, and summed
    over the ranks under torch.distributed (each rank passing its own examples).
    Returns ({name: {G, Z, y_diag, tokens, z_owner}}, number of examples used).
    Example: stats, n = lorada_statistics(model, batches, loss_fn, n_samples=64)
    """
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples}: use at least one example")
    layers = _adapted(model)
    st = {n: {"G": m.weight.new_zeros(m.out_features, m.in_features,
                                      dtype=torch.promote_types(m.weight.dtype, torch.float32)),
              "tokens": 0} for n, m in layers.items()}
    for s in st.values():
        s["y_diag"] = s["G"].new_zeros(s["G"].shape[0])
    Zsum, owner = {}, {}  # owner[n]: the matrix whose Z tensor n uses
    cur, mask_now, N = {}, [None], [1]  # inputs of the current forward, its token mask, size

    def on_forward(name, x, y):
        if not y.requires_grad:
            raise ValueError(f"{name}: output does not require grad; loss_fn must not run "
                             "the model under torch.no_grad() or inference_mode()")
        cur.setdefault(name, []).append(x)

    def on_grad(name, x, xd, delta):  # δ for this call of the module, (..., d_out)
        s = st[name]
        d = delta.to(s["G"].dtype) * N[0]  # ∂L_n/∂y from the batch mean (1/N) Σ_n L_n
        s["G"].addmm_(d.reshape(-1, d.shape[-1]).T, x.reshape(-1, x.shape[-1]).to(d.dtype))
        dm = _da_rows(d, mask_now[0])
        s["y_diag"].add_((dm * dm).sum(dim=0))

    def accumulate_z():
        keys = {n: tuple(_da_key(x) for x in xs) for n, xs in cur.items()}
        for n, o in list(owner.items()):  # sharing seen before no longer holds: n gets its own copy
            if o != n and keys.get(n) != keys.get(o):
                Zsum[n], owner[n] = Zsum[o].clone(), n
        new = [n for n in cur if n not in owner]
        for n in new:  # share only among matrices first seen in the same forward: exact sums
            owner[n] = next((p for p in new if owner.get(p) == p and keys[p] == keys[n]), n)
            if owner[n] == n:
                Zsum[n] = st[n]["G"].new_zeros(st[n]["G"].shape[1], st[n]["G"].shape[1])
        with torch.no_grad():
            for n, xs in cur.items():
                for x in xs:
                    X = _da_rows(x, mask_now[0]).to(st[n]["G"].dtype)  # (T, d_in)
                    st[n]["tokens"] += X.shape[0]
                    if owner[n] == n:
                        Zsum[n].addmm_(X.T, X)

    n_used = 0
    with _restored(model), _hooked(layers, on_grad, on_forward):
        model.eval()
        inputs = [m.lora_B for m in layers.values()]
        for B in inputs:
            B.requires_grad_(True)
        try:
            for example, N[0] in _da_examples(batches, n_samples, not batched):
                mask = (token_mask(example) if token_mask is not None
                        else example.get("attention_mask"))
                mask_now[0] = None if mask is None else mask.bool()
                cur.clear()
                with torch.enable_grad():
                    loss = loss_fn(model, example)
                    if loss.ndim != 0:
                        raise ValueError(f"loss_fn returned shape {tuple(loss.shape)}: return "
                                         "the batch-mean loss, a scalar")
                    accumulate_z()
                    if loss.requires_grad:  # hooks on the outputs see δ; .grad stays untouched
                        torch.autograd.grad(loss, inputs, allow_unused=True)
                cur.clear()
                n_used += N[0]
        finally:
            cur.clear()
    for n in layers:  # a module never called (on this rank) has Z sum 0
        if n not in owner:
            owner[n], Zsum[n] = n, st[n]["G"].new_zeros(st[n]["G"].shape[1], st[n]["G"].shape[1])
    # each layer lists its own Z sum (a shared one repeatedly), so the list is the same on
    # every rank whatever sharing its forwards showed
    *tokens, n_used = _all_reduce([st[n][k] for k in ("G", "y_diag") for n in layers]
                                  + [Zsum[owner[n]] for n in layers],
                                  *(st[n]["tokens"] for n in layers), n_used)
    for n, t in zip(layers, tokens):
        st[n]["tokens"] = t
    Z = {o: Zsum[o] / max(st[o]["tokens"], 1) for o in Zsum}  # sharers get the same tensor
    stats = {}
    for n, s in st.items():
        o = owner[n]
        stats[n] = {"G": s["G"] / max(n_used, 1), "y_diag": s["y_diag"] / max(s["tokens"], 1),
                    "Z": Z[o], "tokens": s["tokens"], "z_owner": o}
    return stats, n_used


def lorada_init(model: nn.Module, batches: Iterable[dict],
                loss_fn: Callable[[nn.Module, dict], torch.Tensor], n_samples: int = 256,
                da_alpha: float = 1.0, da_beta: float = 0.03, da_gamma: float = 1024.0,
                damping: float = 1e-6, population_size: int | None = None,
                token_mask: Callable[[dict], torch.Tensor] | None = None,
                batched: bool = True) -> dict:
    """LoRA-DA initialisation (arXiv:2510.24561) of every adapted layer, in place: statistics
    from lorada_statistics at the model as it is (W0 at the default B = 0), then A, B from
    lorada_factors, with N_pop = population_size (the fine-tuning set size, as the paper) or the
    number of examples used. W0 is not offset, so the model starts at W0 + s·B A. Defaults are
    the authors' released config (α_DA 1, β_DA 0.03, γ_DA 1024, λ 1e-6, 256 examples);
    batched=True (one backward per batch) needs loss_fn to be a mean of per-example losses,
    batched=False is the authors' one-example-at-a-time procedure. A matrix
    with G = 0 or no valid token keeps its init and is listed in "skipped". Nothing is written
    unless every matrix solves.
    Returns {"initialized", "skipped": {name: reason}, "n_samples", "population_size",
    "z_shared_with": {name: owner}, "matrices": {name: lorada_factors info}}.
    Example: lorada_init(model, batches, loss_fn, population_size=67349)["initialized"]
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRALinear layers: call add_lora(model, ...) first")
    too_big = [f"{n} (r={m.r} > d_in={m.in_features})" for n, m in layers.items()
               if m.r > m.in_features]
    if too_big:
        raise ValueError(f"LoRA-DA needs r <= d_in: {', '.join(too_big[:4])}; lower the rank")
    if da_gamma <= 0 or damping <= 0 or (population_size is not None and population_size < 1):
        raise ValueError(f"da_gamma={da_gamma}, damping={damping} and population_size="
                         f"{population_size} must be positive")
    stats, n_used = lorada_statistics(model, batches, loss_fn, n_samples, token_mask, batched)
    if n_used == 0:
        raise ValueError("batches yielded no example: pass at least one non-empty batch")
    n_pop = population_size or n_used
    skipped = {n: "rank 0" for n, m in layers.items() if m.r == 0}
    factors, matrices = {}, {}
    for n, s in stats.items():
        if not bool(torch.isfinite(s["G"]).all()):
            raise ValueError(f"{n}: gradient has inf/NaN; check loss_fn on the calibration data")
        if not s["G"].any():
            skipped[n] = "zero gradient"
            continue
        if s["tokens"] == 0:
            skipped[n] = "no valid tokens"
            continue
        A, B, matrices[n] = lorada_factors(s["G"], s["Z"], s["y_diag"], layers[n].r, da_alpha,
                                           da_beta, da_gamma, damping, n_pop)
        factors[n] = (A, B)
    with torch.no_grad():
        for n, (A, B) in factors.items():
            layers[n].lora_A.copy_(A)
            layers[n].lora_B.copy_(B)
    return {"initialized": list(factors), "skipped": skipped, "n_samples": n_used,
            "population_size": n_pop,
            "z_shared_with": {n: s["z_owner"] for n, s in stats.items() if s["z_owner"] != n},
            "matrices": matrices}
