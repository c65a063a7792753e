"""Fisher-guided LoRA: FIM-LoRA rank allocation, FW-LoRA regularisation, LoRA-DA initialisation.

    from lora import add_lora
    from fimlora import initialize_fim_ranks
    add_lora(model, targets=["query", "key", "value"], r=8, alpha=16)
    result = initialize_fim_ranks(model, batches, loss_fn)   # loss_fn(model, batch) -> scalar

Imports only the standard library, torch and lora.py, whose symbols it uses: W0 (d_out, d_in),
A (r, d_in), B (d_out, r). References: FIM-LoRA arXiv:2605.16800; LoRA-DA arXiv:2510.24561;
FW-LoRA "Fisher-Weighted LoRA: one-line importance-aware regularisation" (no public paper).
"""

import contextlib
import itertools
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction

import torch
import torch.nn as nn

from lora import LoRALinear, _pattern, lora_layers, resize_lora

LossFn = Callable[[nn.Module, object], torch.Tensor]

# -----------------------------------------------------------------------------
# shared: the adapted layers, the calibration pass, the hooks, the all-reduce


def _adapted(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA layers with an adapter (r > 0) by name; merged ones are not in the graph."""
    layers = {n: m for n, m in lora_layers(model).items() if m.r > 0}
    if not layers:
        raise ValueError("the model has no LoRA layer with r > 0: call add_lora(model, ...) first")
    if merged := [n for n, m in layers.items() if m.merged]:
        raise ValueError(f"layers {merged[:5]} are merged, so their adapters are not in the "
                         "graph: call merge_lora(model, False) first")
    return layers


@contextlib.contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """Put back every requires_grad and train/eval flag on exit, also on error."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode  # not m.train(): that recurses and may have side effects


def _calibrate(model: nn.Module, layers: dict[str, LoRALinear], batches: Iterable,
               loss_fn: LossFn) -> Iterator[tuple]:
    """The calibration pass (inside _restored): per batch L = loss_fn(model, batch), every lora_B
    requiring grad; yields ∂L/∂B_m per layer (None if unreached). The caller's hooks see δ."""
    Bs = [m.lora_B for m in layers.values()]
    for B in Bs:
        B.requires_grad_(True)
    for batch in batches:
        with torch.enable_grad():
            loss = loss_fn(model, batch)
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
                raise ValueError("loss_fn must return the scalar batch-mean loss of the model run "
                                 "with gradients (not under torch.no_grad()), got "
                                 f"{type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}")
            grads = torch.autograd.grad(loss, Bs, allow_unused=True)
        yield grads


@contextlib.contextmanager
def _hooked(layers: dict[str, LoRALinear], on_grad: Callable,
            on_forward: Callable = lambda name, x, y: None) -> Iterator[None]:
    """While active, each call of layer m runs on_forward(m, x, y) if given and, once backward
    delivers δ = ∂L/∂y, on_grad(m, x, x̃, δ) under no_grad (x̃ = dropout(x); all detached).
    Example: with _hooked(_adapted(model), lambda m, x, xd, d: seen.append(m)): loss.backward()"""
    on_grad = torch.no_grad()(on_grad)
    held: dict[str, tuple] = {}

    def attach(name: str, layer: LoRALinear) -> list:
        def on_dropout(module, args, out):
            held[name] = (args[0].detach(), out.detach())

        def on_layer(module, args, y):
            if name not in held:  # r = 0 or merged: no adapter path ran
                return
            x, xd = held.pop(name)
            on_forward(name, x, y)
            if torch.is_grad_enabled() and y.requires_grad:
                y.register_hook(lambda delta: on_grad(name, x, xd, delta.detach()))

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


def _all_reduce(tensors: list[torch.Tensor], *counts: int) -> list[int]:
    """Sum the tensors (in place) and the counts (int64) over an initialised torch.distributed
    group, else a no-op; returns the counts. Every rank passes the same shapes in one order."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return list(counts)
    flat = torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))  # a tensor listed twice gets the same sum twice
    total = torch.tensor(counts, dtype=torch.int64, device=flat.device)  # nccl: on the GPU
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.tolist()

# -----------------------------------------------------------------------------
# 1. FIM-LoRA calibration: empirical-Fisher scores of every lora_B


def fisher_scores(model: nn.Module, batches: Iterable, loss_fn: LossFn, score: str = "efim",
                  n_batches: int | None = 8, per_example: bool = False) -> dict:
    """Empirical-Fisher score of every adapter's lora_B (FIM-LoRA, arXiv:2605.16800):
        efim       F_m = (1/K) Σ_k g_k⊙g_k,        g_k = ∂L_k/∂B_m over K batches (∂L/∂A = 0)
        variance   F_m = (1/K) Σ_k g_k⊙g_k − ḡ⊙ḡ,   ḡ = (1/K) Σ_k g_k;   score_m = mean of F_m
    per_example=True: g_n = N·s·Σ_t δ_{n,t} u_{n,t}ᵀ per example n (u = A·dropout(x), δ = ∂L/∂y)
    from one backward; loss_fn is then a mean over dim 0, each adapted layer run once per forward.
    Sums are all-reduced. Returns {"scores", "fisher": F_m (d_out, r), "count": K or N}.
    Example: fisher_scores(model, [batch], loss_fn)["scores"] -> {"layer.0.query": 3.1e-07, ...}"""
    if score not in ("efim", "variance"):
        raise ValueError(f"score={score!r}: use 'efim' or 'variance' (study/scores.py has more)")
    if n_batches is not None and n_batches < 1:
        raise ValueError(f"n_batches={n_batches}: use at least 1 (or None for all batches)")
    layers = _adapted(model)
    sum_sq = {n: torch.zeros_like(m.lora_B, dtype=torch.float32) for n, m in layers.items()}
    sum_g = {n: torch.zeros_like(s) for n, s in sum_sq.items()} if score == "variance" else {}
    sizes: dict[str, int] = {}

    def on_forward(name, x, y):
        if name in sizes:
            raise ValueError(f"layer {name!r} ran twice in one forward pass: per_example needs "
                             "each adapted layer called once (use per_example=False)")
        sizes[name] = x.shape[0]

    def add(name, g):  # g: (n, d_out, r), n examples (or one batch)
        sum_sq[name].add_(g.square().sum(0))
        if sum_g:
            sum_g[name].add_(g.sum(0))

    def on_grad(name, x, xd, delta):  # per example; (N, d_out, r) is smaller than x itself
        layer = layers[name]
        u = xd.float() @ layer.lora_A.detach().float().T  # (N, ..., r)
        n = u.shape[0]
        u, d = u.reshape(n, -1, layer.r), delta.float().reshape(n, -1, delta.shape[-1])
        add(name, n * layer.scaling * (d.transpose(1, 2) @ u))  # × N: δ of the batch mean

    count = 0
    hooks = _hooked(layers, on_grad, on_forward) if per_example else contextlib.nullcontext()
    with _restored(model), hooks, torch.no_grad():
        for grads in _calibrate(model, layers, itertools.islice(batches, n_batches), loss_fn):
            if per_example and len(set(sizes.values())) > 1:
                raise ValueError(f"layers saw different batch sizes {sizes}: per_example "
                                 "needs the batch on dim 0 of every adapted layer")
            count += next(iter(sizes.values()), 0) if per_example else 1
            sizes.clear()
            for name, g in zip(layers, grads):
                if g is not None and not per_example:  # None: the layer did not reach the loss
                    add(name, g.float()[None])
    count, = _all_reduce(list(sum_sq.values()) + list(sum_g.values()), count)
    if count == 0:
        raise ValueError("batches yielded nothing to calibrate on")
    if bad := [n for n, s in sum_sq.items() if not torch.isfinite(s).all()]:
        raise ValueError(f"{bad[0]}: gradient has inf/NaN; check loss_fn on the calibration data")
    fisher = {n: sum_sq[n] / count for n in layers}
    if sum_g:
        fisher = {n: (f - (sum_g[n] / count).square()).clamp_min(0.0) for n, f in fisher.items()}
    if not any(s.any() for s in sum_sq.values()):  # allocate_ranks: uniform ranks, no word
        raise ValueError(f"every {score} score is 0: loss_fn's loss does not reach a lora_B")
    if sum_g and all(f.sum() <= 1e-5 * sum_sq[n].sum() / count for n, f in fisher.items()):
        raise ValueError(f"every variance score is 0 up to rounding: the {count} gradient(s) are "
                         "one; pass 2 or more distinct batches")  # 1 batch, or one repeated
    scores = {n: f.mean().item() for n, f in fisher.items()}
    return {"scores": scores, "fisher": fisher, "count": count}

# -----------------------------------------------------------------------------
# 2. FIM-LoRA budgeted rank allocation (pure Python, exact)


def _targets(s: list[float], budget: int, r_min: int, hi: list[int], kappa: list[int],
             power: float) -> tuple[list[Fraction], list[Fraction]]:
    """Phase 1 of allocate_ranks in exact arithmetic: (r*, w).
    Example: _targets([1.0, 4.0], 10, 0, [10, 10], [1, 1], 1.0)[0] == [2, 8]"""
    s_max = max(s)
    w = [1.0 if s_max == 0 else (v / s_max) ** power for v in s]  # 2**k·s gives the same w
    budget = min(budget, sum(map(int.__mul__, kappa, hi)))
    lo = [r_min] * len(s)
    if budget > sum(k * (h if v > 0 else r_min) for k, v, h in zip(kappa, w, hi)):
        # every w_m > 0 matrix reaches h_m first: the w_m = 0 ones share the rest as equals
        lo, w = [h if v > 0 else r_min for v, h in zip(w, hi)], [1.0] * len(s)
    W = [Fraction(v) for v in w]
    # f(c) = Σ_m κ_m·clamp(c·w_m, lo_m, h_m) = K + c·S between kinks c = lo_m/w_m, h_m/w_m:
    # sweep them in order (a float key, exact on float ties), solve the piece crossing R
    kinks = sorted((b / v, b / W[m], leaves, m) for m, v in enumerate(w) if v > 0
                   for b, leaves in ((lo[m], 0), (hi[m], 1)))
    K, S, c = sum(map(int.__mul__, kappa, lo)), 0, Fraction(0)
    for _, t, leaves, m in kinks if K < budget else ():
        if K + t * S >= budget:  # S > 0 here: f rose from below the budget on this piece
            c = (budget - K) / S
            break
        K += kappa[m] * hi[m] if leaves else -kappa[m] * lo[m]
        S += -kappa[m] * W[m] if leaves else kappa[m] * W[m]
    return [min(max(c * v, a), h) for v, a, h in zip(W, lo, hi)], W


def allocate_ranks(scores: dict[str, float], budget: int, r_min: int,
                   r_max: int | dict[str, int], costs: dict[str, int] | None = None,
                   power: float = 1.0) -> dict[str, int]:
    """FIM-LoRA rank allocation (arXiv:2605.16800, two-phase water-filling), exact. With
    w_m = (s_m / max s)^p, h_m = r_max (or r_max[m]), κ_m = costs[m] (1: R counts ranks):
      phase 1  r*_m = clamp(c·w_m, r_min, h_m), the water level c solving Σ_m κ_m·r*_m = R;
      phase 2  r_m = ⌊r*_m⌋, then +1 in one global order (largest r*_m − r_m, higher score,
               lower name) while r_m < h_m and κ_m fits in what is left of R, repeated.
    A score-0 matrix stays at r_min until every other sits at h_m. ValueError on bad input.
    Example: allocate_ranks({"q": 1.0, "v": 4.0}, budget=6, r_min=0, r_max=10) == {"q": 1, "v": 5}
    """
    names, s = list(scores), list(scores.values())
    if not names:
        raise ValueError("scores is empty: pass at least one {module_name: score}")
    for name, v in scores.items():
        if type(v) not in (int, float):  # exact arithmetic: no numpy or tensor scalars
            raise ValueError(f"scores[{name!r}]={v!r} is a {type(v).__name__}: pass float(v)")
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"scores[{name!r}]={v!r}: scores must be finite and ≥ 0")
    for label, v in (("budget", budget), ("r_min", r_min)):
        if type(v) is not int:
            raise ValueError(f"{label}={v!r} is a {type(v).__name__}, not an int: pass int(v)")
    for label, d in (("r_max", r_max), ("costs", costs)):
        if isinstance(d, dict) and d.keys() != scores.keys():
            raise ValueError(f"{label} and scores name different modules: "
                             f"{sorted(d.keys() ^ scores.keys())[:5]}")
    hi = [r_max[n] for n in names] if isinstance(r_max, dict) else [r_max] * len(names)
    low = [n for n, h in zip(names, hi) if type(h) is not int or h < r_min]
    if r_min < 0 or low:
        where = f"r_max[m] for m in {low[:5]}" if isinstance(r_max, dict) else f"r_max={r_max!r}"
        raise ValueError(f"r_min={r_min} < 0: ranks cannot be negative" if r_min < 0 else
                         f"{where} is not an int ≥ r_min={r_min}: lower r_min or raise r_max")
    if not (isinstance(power, (int, float)) and math.isfinite(power) and power >= 0):
        raise ValueError(f"power={power!r}: pass a finite power ≥ 0 (1: proportional, 0: uniform)")
    kappa = [1] * len(names) if costs is None else [costs[n] for n in names]
    for name, k in zip(names, kappa):
        if type(k) is not int or k <= 0:
            raise ValueError(f"costs[{name!r}]={k!r}: pass a positive int (d_in + d_out)")
    if budget < sum(kappa) * r_min:
        raise ValueError(f"budget={budget} < {'M' if costs is None else 'Σ cost_m'}·r_min="
                         f"{sum(kappa) * r_min}: raise the budget or lower r_min")
    if costs is None and budget > sum(hi):  # with costs, the rest no matrix fits stays unspent
        what = "Σ_m r_max[m]" if isinstance(r_max, dict) else "M·r_max"
        raise ValueError(f"budget={budget} > {what}={sum(hi)}: lower the budget or raise r_max")
    r_star, w = _targets(s, budget, r_min, hi, kappa, power)
    r = [math.floor(t) for t in r_star]
    left = budget - sum(map(int.__mul__, kappa, r))
    order = sorted((m for m in range(len(names)) if w[m] > 0),  # w = 0: kept at r_min
                   key=lambda m: (r[m] - r_star[m], -s[m], names[m]))
    while order and left > 0:  # a matrix raised in this round may be raised again
        raised = []
        for m in order:
            if r[m] < hi[m] and kappa[m] <= left:
                r[m] += 1
                left -= kappa[m]
                raised.append(m)
        order = raised
    return dict(zip(names, r))

# -----------------------------------------------------------------------------
# 3. FIM-LoRA: calibrate, allocate, resize


def _alpha(alpha: float, r_m: int, r: int, rslora: bool) -> float:
    """α_m that keeps the base scale at rank r_m: α·r_m/r (s = α/r), α·√(r_m/r) (rsLoRA)."""
    return alpha * (math.sqrt(r_m / r) if rslora else r_m / r)


def resize_ranks(model: nn.Module, ranks: dict[str, int],
                 generator: torch.Generator | None = None) -> dict[str, float]:
    """Every adapter to its rank in `ranks`, with a fresh A (from `generator`), B = 0 and its
    base scale kept, α_m = α·r_m/r (α·√(r_m/r) with rsLoRA) from each layer's current r and α.
    Returns the α_m by name. Example: resize_ranks(model, {"0.query": 4})["0.query"] -> 8.0"""
    layers, _ = _adapted(model), _pattern(ranks, "ranks", True, "resize_ranks: ")  # all or none
    if differ := sorted(layers.keys() ^ ranks.keys()):
        raise ValueError(f"ranks and the adapted layers differ: {differ[:5]}")
    alphas = {n: _alpha(m.alpha, ranks[n], m.r, m.rslora) for n, m in layers.items()}
    for name, layer in layers.items():
        resize_lora(layer, ranks[name], alpha=alphas[name], generator=generator)
    return alphas


def _plan(model: nn.Module, budget: int | None, r_min: int, r_max: int | None, power: float,
          budget_unit: str) -> tuple[int, int | dict[str, int], dict[str, int] | None]:
    """(budget, caps, costs) over the adapted layers, checked before any calibration; a matrix
    is capped at min(r_max, d_in, d_out): a rank beyond adds parameters, not expressiveness."""
    layers = _adapted(model)
    if trained := [n for n, m in layers.items() if bool(m.lora_B.detach().any())]:
        raise ValueError(f"layers {trained[:5]} have B ≠ 0 and resizing would discard their ΔW: "
                         "run initialize_fim_ranks on freshly added adapters, before training")
    if budget_unit not in ("ranks", "params"):
        raise ValueError(f"budget_unit={budget_unit!r}: use 'ranks' or 'params'")
    # "params": a rank of matrix m costs d_in + d_out parameters, and the budget counts those
    kappa = {n: m.in_features + m.out_features if budget_unit == "params" else 1
             for n, m in layers.items()}
    costs = kappa if budget_unit == "params" else None
    budget = sum(m.r * kappa[n] for n, m in layers.items()) if budget is None else budget
    r_max = 2 * max(m.r for m in layers.values()) if r_max is None else r_max
    caps = {n: min(r_max, m.in_features, m.out_features) for n, m in layers.items()}
    thin = [f"{n} ({c})" for n, c in caps.items() if c < r_max]
    if not thin or type(r_max) is not int:
        caps = r_max  # allocate_ranks reports a bad r_max
    elif r_min > min(caps.values()):
        few = [f"{n} ({c})" for n, c in caps.items() if c < r_min][:5]
        raise ValueError(f"r_min={r_min} exceeds min(d_in, d_out) of {few}: lower r_min or "
                         "leave those matrices out of the targets")
    elif budget > (most := sum(c * kappa[n] for n, c in caps.items())):
        raise ValueError(f"budget={budget} > Σ_m {'cost_m·' if costs else ''}min(r_max, d_in, "
                         f"d_out)={most} (thin matrices: {thin[:5]}): lower the budget or leave "
                         "those matrices out of the targets")
    allocate_ranks(dict.fromkeys(layers, 1.0), budget, r_min, caps, costs, power)  # the checks
    return budget, caps, costs


def initialize_fim_ranks(model: nn.Module, batches: Iterable, loss_fn: LossFn,
                         budget: int | None = None, r_min: int = 1, r_max: int | None = None,
                         score: str = "efim", n_batches: int | None = 8, per_example: bool = False,
                         power: float = 1.0, generator: torch.Generator | None = None,
                         budget_unit: str = "ranks") -> dict:
    """FIM-LoRA in place on fresh adapters (B = 0), all checked before calibrating:
    fisher_scores, allocate_ranks (default budget Σ_m r_m, r_max = 2·max r, caps
    min(r_max, d_in, d_out); "params" counts d_in + d_out per rank), resize_ranks.
    Example: initialize_fim_ranks(model, batches, loss_fn)["ranks"] -> {"...query": 4, ...}"""
    budget, caps, costs = _plan(model, budget, r_min, r_max, power, budget_unit)
    scores = fisher_scores(model, batches, loss_fn, score, n_batches, per_example)["scores"]
    ranks = allocate_ranks(scores, budget, r_min, caps, costs, power)
    return {"ranks": ranks, "alphas": resize_ranks(model, ranks, generator), "scores": scores}


def fim_rank_pattern(model: nn.Module, batches: Iterable, loss_fn: LossFn, r: int,
                     alpha: float, budget: int | None = None, r_min: int = 1,
                     r_max: int | None = None, score: str = "efim", n_batches: int | None = 8,
                     rslora: bool = False, per_example: bool = False, power: float = 1.0,
                     budget_unit: str = "ranks") -> dict:
    """initialize_fim_ranks' allocation as peft.LoraConfig fields (r = the most common r_m;
    patterns keyed "^" + re.escape(name) for the others), the model left as it is.
    Example: peft.LoraConfig(target_modules=targets, **fim_rank_pattern(model, b, f, 8, 16))"""
    if off := [n for n, m in _adapted(model).items()
               if (m.r, m.alpha, m.rslora) != (r, alpha, rslora)]:
        raise ValueError(f"layers {off[:5]} are not rank-{r}, α={alpha}, rslora={rslora} "
                         "adapters: add_lora(model, targets, r, alpha) with the same values")
    if r_min < 1:
        raise ValueError(f"r_min={r_min}: PEFT has no rank 0, use r_min ≥ 1")
    budget, caps, costs = _plan(model, budget, r_min, r_max, power, budget_unit)
    scores = fisher_scores(model, batches, loss_fn, score, n_batches, per_example)["scores"]
    ranks = allocate_ranks(scores, budget, r_min, caps, costs, power)
    common = Counter(ranks.values()).most_common(1)[0][0]
    base = _alpha(alpha, common, r, rslora)
    return {"r": common, "lora_alpha": base, "use_rslora": rslora,  # PEFT: α_m/√r_m if True
            "rank_pattern": {"^" + re.escape(n): k for n, k in ranks.items() if k != common},
            "alpha_pattern": {"^" + re.escape(n): a for n, k in ranks.items()
                              if (a := _alpha(alpha, k, r, rslora)) != base}}

# -----------------------------------------------------------------------------
# 4. FW-LoRA: a Fisher-weighted penalty on ΔW

FW_BETA = 0.98  # EMA factor of the warm-up Fisher
FW_WARMUP_STEPS = 500  # K: warm-up steps before the importances are frozen
FW_LAMBDA = 1e-4  # λ of the penalty


@contextlib.contextmanager
def fw_track(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Yields {m: ‖G_m‖²_F}, filled on exit: G_m = ∂L/∂W_m = Σ δᵀX of every adapted layer's
    frozen weight over all calls and backwards inside (micro-batches); under DDP the ranks' mean.
    Example: with fw_track(model) as sq: loss.backward()   # then ema = fw_update(ema, sq, k)"""
    layers = _adapted(model)
    sq_norms = {n: m.weight.new_zeros((), dtype=torch.float32) for n, m in layers.items()}
    G: dict[str, torch.Tensor] = {}

    def on_grad(name, x, xd, delta):
        X = x.reshape(-1, x.shape[-1]).float()  # (T, d_in)
        D = delta.reshape(-1, delta.shape[-1]).float()  # (T, d_out)
        G[name] = D.T @ X if name not in G else G[name].addmm_(D.T, X)

    with _hooked(layers, on_grad):
        yield sq_norms
    with torch.no_grad():  # DistributedDataParallel: the step's gradient is the ranks' mean G
        G = {n: G.get(n, m.weight.new_zeros(m.out_features, m.in_features, dtype=torch.float32))
             for n, m in layers.items()}
        world, = _all_reduce(list(G.values()), 1)
        for name, g in G.items():
            sq_norms[name].add_((g / world).square().sum())


def fw_update(ema: dict[str, torch.Tensor], sq_norms: dict[str, torch.Tensor], step: int,
              beta: float = FW_BETA) -> dict[str, torch.Tensor]:
    """One FW-LoRA warm-up step, bias-corrected: F̂_k = F_k / (1 − β^k) with
    F_k = β·F_{k−1} + (1−β)·‖G_m‖²_F, F_0 = 0, k = step = 1, 2, … (ema = {} at k = 1; tracking
    every j-th step: step // j, β^j); a name missing from sq_norms counts as 0.
    Example: fw_update({}, {"q": torch.tensor(2.)}, 1)["q"] == 2"""
    if type(step) is not int or step < 1:
        raise ValueError(f"step={step!r}: count warm-up steps from 1")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta={beta}: the EMA factor must lie in [0, 1)")
    keep, new = beta * (1.0 - beta ** (step - 1)), 1.0 - beta  # F̂_{k−1} back to F_{k−1}
    out = {}
    for name in {**ema, **sq_norms}:
        g = sq_norms[name].detach().float() if name in sq_norms else torch.zeros_like(ema[name])
        out[name] = (keep * ema[name] + new * g if name in ema else new * g) / (1.0 - beta ** step)
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
    """FW-LoRA penalty λ Σ_m (1 − I_m)·‖ΔW_m‖²_F over the layers with r > 0, a float32 scalar,
    via ‖s·B A‖²_F = s²·tr((BᵀB)(AAᵀ)) (two r×r Grams), one batched product per shape.
    Example: fw_penalty(model, importances(ema), fw_lambda=1e-4) -> tensor(0.)"""
    layers = _adapted(model)
    if missing := [n for n in layers if n not in importance]:
        raise ValueError(f"no importance for layers {missing[:5]}: pass importances(ema) with "
                         "ema from fw_track over the same model")
    groups: dict[tuple, list[str]] = {}
    for name, m in layers.items():
        groups.setdefault((m.lora_B.shape, m.lora_A.shape), []).append(name)
    parts = []
    for names in groups.values():
        B = torch.stack([layers[n].lora_B for n in names]).float()  # (k, d_out, r)
        A = torch.stack([layers[n].lora_A for n in names]).float()  # (k, r, d_in)
        sq = ((B.mT @ B) * (A @ A.mT)).sum((1, 2))  # (k,): tr(PQ) = Σ P⊙Q, Q symmetric
        w = torch.tensor([layers[n].scaling ** 2 for n in names], device=B.device) * (
            1.0 - torch.stack([torch.as_tensor(importance[n], dtype=torch.float32,
                                               device=B.device) for n in names]))
        parts.append((w * sq).sum())
    return fw_lambda * sum(parts[1:], parts[0])

# -----------------------------------------------------------------------------
# 5. LoRA-DA: data-aware closed-form initialisation


def _da_omega(G: torch.Tensor, Z: torch.Tensor, y_diag: torch.Tensor, da_alpha: float,
              da_beta: float, damping: float, n_pop: int, y_damping: float | None = None) -> tuple:
    """(Δ̂, Ω, info) of lorada_factors in G's dtype (at least float32); y damped by y_damping
    where given (study/scores.py), else by damping."""
    dt = torch.promote_types(G.dtype, torch.float32)
    G, Z, y = G.to(dt), Z.to(dt), y_diag.to(dt)
    Z = (Z + Z.T) / 2
    eye = torch.eye(Z.shape[0], dtype=Z.dtype, device=Z.device)
    for retry in range(7):  # the authors' code: damping ×10 up to 6 times
        lam = damping * 10**retry
        L, bad = torch.linalg.cholesky_ex(Z + lam * eye)
        if bad.item() == 0 and bool(torch.isfinite(L).all()):
            break
    else:
        raise ValueError(f"Z is not positive definite even with damping {lam:g} after "
                         "6 retries: check the activations for inf/NaN")
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
    info = {"sigma": sigma.item(), "damping": lam, "cholesky_retries": retry, "c": c.item()}
    return Delta_hat, (Omega + Omega.T) / 2, info


def lorada_factors(G: torch.Tensor, Z: torch.Tensor, y_diag: torch.Tensor, r: int,
                   da_alpha: float = 1.0, da_beta: float = 0.03, da_gamma: float = 1024.0,
                   damping: float = 1e-6, n_pop: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """LoRA-DA closed form for one matrix (Zhang et al., arXiv:2510.24561). With the K-FAC
    Fisher F ≈ Z ⊗ Y (Y = diag(y)), the target is one natural-gradient step Δ* = −Y⁻¹ G Z⁻¹,
    and the input subspace V (d_in, r), VᵀV = I, minimises bias + variance:
        min_V tr(Vᵀ Ω V),   Ω = −α_DA Δ̂ᵀΔ̂ + β_DA c Z⁻¹,   c = tr(Y⁻¹) / N_pop / σ²,
        Δ̂ = Δ*/σ, σ = ‖Δ*‖₂;   A = Vᵀ/√γ_DA,   B = Δ̂ V/√γ_DA,   so B A = Δ̂ V Vᵀ / γ_DA,
    V the eigenvectors of Ω's r smallest eigenvalues (Ky Fan, largest-|·| entry positive);
    Z ← (Z+Zᵀ)/2 + λI (λ ×10 up to 6 times while Cholesky fails), Y⁻¹ = diag(1/(y + λ)), as
    the authors' code. Returns (A, B, info). Raises ValueError if r ∉ [1, d_in] or σ = 0.
    Example: A, B, _ = lorada_factors(G, Z, y, r=8)   # A (8, d_in), B (d_out, 8)"""
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
    V = evecs[:, :r]  # (d_in, r); eigh's signs are arbitrary: fix them
    V = V * V[V.abs().argmax(dim=0), torch.arange(r, device=V.device)].sign()  # never 0
    A, B = V.T / math.sqrt(da_gamma), (Delta_hat @ V) / math.sqrt(da_gamma)
    return A, B, {**info, "eigenvalues": evals[:r].tolist()}


def lorada_statistics(model: nn.Module, batches: Iterable[dict], loss_fn: LossFn,
                      n_samples: int = 256) -> tuple[dict[str, dict], int]:
    """LoRA-DA statistics (arXiv:2510.24561) of every adapted layer over the first n_samples
    examples, L_n the loss of example n (a token mean) and δ_{n,t} = ∂L_n/∂y_t:
        G = (1/n) Σ_n ∂L_n/∂W (d_out, d_in),   Z = E_t[x_t x_tᵀ],   y = E_t[δ_t ⊙ δ_t],
    Z and y over valid tokens (batch["attention_mask"] where present, else all tokens). One
    backward per batch of independent examples (loss_fn their mean, so δ_{n,t} = N·∂L/∂y_{n,t});
    the authors' code runs one example at a time, with the same sums. Inputs read by several
    matrices (q/k/v) give one shared Z. Eval mode; sums in at least float32, all-reduced.
    Returns ({name: {G, Z, y_diag, tokens, z_owner}}, examples used)."""
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples}: use at least one example")
    layers = _adapted(model)
    dt = {n: torch.promote_types(m.weight.dtype, torch.float32) for n, m in layers.items()}
    st = {n: {"G": m.weight.new_zeros(m.out_features, m.in_features, dtype=dt[n]),
              "y_diag": m.weight.new_zeros(m.out_features, dtype=dt[n]), "tokens": 0}
          for n, m in layers.items()}
    Zsum, owner = {}, {}  # owner[n]: the matrix whose Z tensor n uses
    cur, now = {}, {"N": 1, "mask": None, "used": 0}  # this forward's inputs, N, mask; examples

    def rows(t: torch.Tensor) -> torch.Tensor:  # (tokens, features), valid tokens only
        mask = now["mask"]  # applies where its shape is t's leading dims (not a pooled input)
        if mask is not None and t.shape[:-1] == mask.shape:
            return t[mask.to(device=t.device, dtype=torch.bool)]
        return t.reshape(-1, t.shape[-1])

    def on_grad(name, x, xd, delta):  # δ for this call of the module, (..., d_out)
        s = st[name]
        d = delta.to(s["G"].dtype) * now["N"]  # ∂L_n/∂y from the batch mean (1/N) Σ_n L_n
        s["G"].addmm_(d.reshape(-1, d.shape[-1]).T, x.reshape(-1, x.shape[-1]).to(d.dtype))
        dm = rows(d)
        s["y_diag"].add_((dm * dm).sum(dim=0))

    def chunks():  # whole batches, the last cut to n_samples; sets N and the mask for each
        for batch in batches:
            if not hasattr(batch, "items"):
                raise TypeError(f"LoRA-DA batches are dicts of tensors, got {type(batch).__name__}")
            sizes = [v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.ndim > 0]
            if not sizes:
                raise ValueError(f"batch with keys {sorted(batch)} has no tensor with a batch dim")
            if now["used"] == n_samples:
                return
            n, now["N"] = sizes[0], min(sizes[0], n_samples - now["used"])
            batch = {k: v[:now["N"]] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n
                     else v for k, v in batch.items()}
            now["mask"] = batch.get("attention_mask")
            cur.clear()
            yield batch
            now["used"] += now["N"]

    def accumulate_z():  # an input is kept alive by cur, so its storage identifies it
        keys = {n: tuple((x.data_ptr(), x.shape, x.stride(), x.dtype, x.device, x._version)
                         for x in xs) for n, xs in cur.items()}
        for n, o in list(owner.items()):  # sharing seen before no longer holds: own copy
            if o != n and keys.get(n) != keys.get(o):
                Zsum[n], owner[n] = Zsum[o].clone(), n
        new = [n for n in cur if n not in owner]
        for n in new:  # share only among matrices first seen in the same forward: exact sums
            owner[n] = next((p for p in new if owner.get(p) == p and keys[p] == keys[n]), n)
            if owner[n] == n:
                Zsum[n] = st[n]["G"].new_zeros(st[n]["G"].shape[1], st[n]["G"].shape[1])
        for n, xs in cur.items():
            for x in xs:
                X = rows(x).to(st[n]["G"].dtype)  # (T, d_in)
                st[n]["tokens"] += X.shape[0]
                if owner[n] == n:
                    Zsum[n].addmm_(X.T, X)

    hooks = _hooked(layers, on_grad, lambda name, x, y: cur.setdefault(name, []).append(x))
    with _restored(model), hooks, torch.no_grad():
        model.eval()
        for _ in _calibrate(model, layers, chunks(), loss_fn):
            accumulate_z()
    for n in [n for n in layers if n not in owner]:  # never called (on this rank): Z sum 0
        owner[n], Zsum[n] = n, st[n]["G"].new_zeros(st[n]["G"].shape[1], st[n]["G"].shape[1])
    # each layer lists its own Z sum (a shared one repeatedly): the same list on every rank
    *tokens, n_used = _all_reduce([st[n][k] for k in ("G", "y_diag") for n in layers]
                                  + [Zsum[owner[n]] for n in layers],
                                  *(st[n]["tokens"] for n in layers), now["used"])
    tokens = dict(zip(layers, tokens))
    Z = {o: Zsum[o] / max(tokens[o], 1) for o in Zsum}  # sharers get the same tensor
    return {n: {"G": s["G"] / max(n_used, 1), "y_diag": s["y_diag"] / max(tokens[n], 1),
                "Z": Z[owner[n]], "tokens": tokens[n], "z_owner": owner[n]}
            for n, s in st.items()}, n_used


def lorada_init(model: nn.Module, batches: Iterable[dict], loss_fn: LossFn,
                n_samples: int = 256, da_alpha: float = 1.0, da_beta: float = 0.03,
                da_gamma: float = 1024.0, damping: float = 1e-6,
                population_size: int | None = None) -> dict:
    """LoRA-DA in place: A, B of every adapted layer from lorada_factors on lorada_statistics,
    N_pop = population_size (the fine-tuning set size) or the examples used, W0 not offset. A
    matrix with G = 0 or no valid token keeps its init; nothing is written unless all solve.
    Example: lorada_init(model, batches, loss_fn, population_size=67349)["initialized"]"""
    layers = lora_layers(model)
    if too_big := [f"{n} (r={m.r} > d_in={m.in_features})" for n, m in layers.items()
                   if m.r > m.in_features]:
        raise ValueError(f"LoRA-DA needs r <= d_in: {', '.join(too_big[:4])}; lower the rank")
    if da_gamma <= 0 or damping <= 0 or (population_size is not None and population_size < 1):
        raise ValueError(f"da_gamma={da_gamma}, damping={damping} and population_size="
                         f"{population_size} must be positive")
    stats, n_used = lorada_statistics(model, batches, loss_fn, n_samples)
    if n_used == 0:
        raise ValueError("batches yielded no example: pass at least one non-empty batch")
    n_pop = population_size or n_used
    skipped = {n: "rank 0" for n, m in layers.items() if m.r == 0}
    factors = {}
    for n, s in stats.items():
        if not bool(torch.isfinite(s["G"]).all()):
            raise ValueError(f"{n}: gradient has inf/NaN; check loss_fn on the calibration data")
        if not s["G"].any() or s["tokens"] == 0:
            skipped[n] = "no valid tokens" if s["G"].any() else "zero gradient"
            continue
        factors[n] = lorada_factors(s["G"], s["Z"], s["y_diag"], layers[n].r, da_alpha, da_beta,
                                    da_gamma, damping, n_pop)  # (A, B, info)
    with torch.no_grad():
        for n, (A, B, _) in factors.items():
            layers[n].lora_A.copy_(A)
            layers[n].lora_B.copy_(B)
    return {"initialized": list(factors), "skipped": skipped, "n_samples": n_used,
            "population_size": n_pop, "matrices": {n: f[2] for n, f in factors.items()},
            "z_shared_with": {n: s["z_owner"] for n, s in stats.items() if s["z_owner"] != n}}
