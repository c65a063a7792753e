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

import contextlib
import heapq
import itertools
import math
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


def _all_reduce(tensors: list[torch.Tensor], count: int) -> int:
    """Sum the tensors (in place) and the count over the ranks of an initialised
    torch.distributed group, in one collective; a no-op otherwise. Returns the total count."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return count
    flat = torch.cat([t.reshape(-1) for t in tensors] + [tensors[0].new_tensor([float(count)])])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    i = 0
    for t in tensors:
        t.copy_(flat[i:i + t.numel()].view_as(t))
        i += t.numel()
    return int(round(flat[-1].item()))

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
        raise ValueError(f"score={score!r}: use 'efim' or 'variance'")
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
    count = _all_reduce(list(sum_sq.values()) + list(sum_g.values()), count)
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
# 2. FIM-LoRA budgeted rank allocation (pure Python, exact)


def _water_level(w: list, kappa: list[int], budget, lo: int, hi: int):
    """Smallest c ≥ 0 with Σ_m κ_m·clamp(c·w_m, lo, hi) ≥ budget, exact when w holds Fractions.

    f(c) = Σ κ_m·clamp(c·w_m, lo, hi) is continuous, piecewise linear and nondecreasing, with kinks
    where a module leaves r_min (c = lo/w_m) or reaches r_max (c = hi/w_m). Sweep the kinks in order
    and solve the one linear piece that crosses the budget. Returns None if f(∞) < budget.
    Example: _water_level([1, 3], [1, 1], 8, 0, 10) == 2 (ranks 2 and 6).
    """
    events = sorted(
        (r / wm, leaves, m)
        for m, wm in enumerate(w)
        if wm > 0
        for r, leaves in ((lo, 0), (hi, 1))
    )
    K, S = sum(k * lo for k in kappa), 0  # f(c) = K + c·S on the current piece; all at r_min
    if K >= budget:
        return 0
    for t, leaves, m in events:
        if K + t * S >= budget:  # S > 0 here: f rose from below the budget on this piece
            return (budget - K) / S
        if leaves:
            K, S = K + kappa[m] * hi, S - kappa[m] * w[m]
        else:
            K, S = K - kappa[m] * lo, S + kappa[m] * w[m]
    return None


def _continuous_ranks(scores: dict[str, float], budget: int, r_min: int, r_max: int,
                      costs: dict[str, int] | None = None, power: float = 1.0) -> dict:
    """Phase 1 of allocate_ranks (inputs already validated): the exact r*_m as Fractions.

    r*_m = clamp(c·w_m, r_min, r_max) with Σ κ_m·r*_m = min(budget, Σ κ_m·r_max). Modules with
    w_m = 0 stay at r_min until every other module sits at r_max; only then do they share what is
    left as if their scores were equal. All-zero scores count as equal scores.
    Example: _continuous_ranks({"q": 1.0, "v": 4.0}, 10, 0, 10) == {"q": 2, "v": 8}.
    """
    names = list(scores)
    kappa = [1 if costs is None else costs[n] for n in names]
    s_max = max(scores.values())
    if s_max == 0:
        return _continuous_ranks(dict.fromkeys(names, 1.0), budget, r_min, r_max, costs, power)
    # normalise first so that s^p stays finite; scaling all scores by 2**k then changes nothing
    w = [Fraction((scores[n] / s_max) ** power) for n in names]
    budget = min(budget, sum(k * r_max for k in kappa))
    c = _water_level(w, kappa, budget, r_min, r_max)
    if c is not None:
        return {n: min(max(c * wm, r_min), r_max) for n, wm in zip(names, w)}
    zero = {n: 1.0 for n, wm in zip(names, w) if wm == 0}
    rest = budget - sum(k * r_max for n, k in zip(names, kappa) if n not in zero)
    r0 = _continuous_ranks(zero, rest, r_min, r_max, costs, power)
    return {n: r0.get(n, Fraction(r_max)) for n in names}


def allocate_ranks(scores: dict[str, float], budget: int, r_min: int, r_max: int,
                   costs: dict[str, int] | None = None, power: float = 1.0) -> dict[str, int]:
    """FIM-LoRA rank allocation (arXiv:2605.16800, two-phase water-filling), done exactly.

    With w_m = (s_m / max s)^p and κ_m the cost of one rank of matrix m (1 when costs is None, so
    the budget R counts ranks; d_in + d_out to count parameters):
      phase 1  r*_m = clamp(c·w_m, r_min, r_max), the water level c solving Σ_m κ_m·r*_m = R;
      phase 2  r_m = ⌊r*_m⌋, then one rank at a time to the largest r*_m − r_m (ties: higher
               score, then lower name) while r_m < r_max and κ_m fits in what is left of R.
    Without costs that is largest-remainder rounding and Σ_m r_m = R; with costs Σ κ_m·r_m ≤ R
    and no rank can be added. Fractions make ties exact, so the result is deterministic.
    tests/test_allocation.py holds the properties (budget, bounds, monotone, equivariant, a
    brute-force optimum for M ≤ 4). Raises ValueError naming the bad value for non-finite or
    negative scores, bad bounds, costs or power, and a budget outside [M·r_min, M·r_max].
    Example: allocate_ranks({"q": 1.0, "v": 4.0}, budget=6, r_min=0, r_max=10) == {"q": 1, "v": 5}
    """
    names = list(scores)
    M = len(names)
    if M == 0:
        raise ValueError("scores is empty: pass at least one {module_name: score}")
    for name, s in scores.items():
        if not (isinstance(s, (int, float)) and math.isfinite(s) and s >= 0):
            raise ValueError(f"scores[{name!r}]={s!r}: scores must be finite and ≥ 0")
    for label, v in (("budget", budget), ("r_min", r_min), ("r_max", r_max)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{label}={v!r} is not an integer: pass an int")
    if r_min < 0:
        raise ValueError(f"r_min={r_min} < 0: ranks cannot be negative")
    if r_min > r_max:
        raise ValueError(f"r_min={r_min} > r_max={r_max}: lower r_min or raise r_max")
    if not (isinstance(power, (int, float)) and math.isfinite(power) and power >= 0):
        raise ValueError(f"power={power!r}: pass a finite power ≥ 0 (1: proportional, 0: uniform)")
    if costs is None:
        kappa = [1] * M
        if budget < M * r_min:
            raise ValueError(
                f"budget={budget} < M·r_min={M * r_min}: raise the budget or lower r_min"
            )
        if budget > M * r_max:
            raise ValueError(
                f"budget={budget} > M·r_max={M * r_max}: lower the budget or raise r_max"
            )
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

    r_star = list(_continuous_ranks(scores, budget, r_min, r_max, costs, power).values())

    r = [math.floor(x) for x in r_star]
    left = budget - sum(k * rm for k, rm in zip(kappa, r))
    heap = [(rm - x, -scores[n], n, m) for m, (n, x, rm) in enumerate(zip(names, r_star, r))]
    heapq.heapify(heap)  # smallest r_m − r*_m first, then higher score, then lower name
    while heap:
        gap, neg_s, n, m = heapq.heappop(heap)
        if r[m] >= r_max or kappa[m] > left:
            continue  # left only shrinks, so this module can never be raised again
        r[m] += 1
        left -= kappa[m]
        heapq.heappush(heap, (gap + 1, neg_s, n, m))
    return dict(zip(names, r))


# -----------------------------------------------------------------------------
# 3. FIM-LoRA: calibrate, allocate, resize


def initialize_fim_ranks(model: nn.Module, batches: Iterable,
                         loss_fn: Callable[[nn.Module, object], torch.Tensor],
                         budget: int | None = None, r_min: int = 1, r_max: int | None = None,
                         score: str = "efim", n_batches: int | None = 8,
                         per_example: bool = False, power: float = 1.0,
                         generator: torch.Generator | None = None) -> dict:
    """FIM-LoRA (arXiv:2605.16800) in place: score every lora_B (fisher_scores), allocate the
    budget (allocate_ranks, default Σ_m r_m of the current adapters, r_max = 2·max r), and
    resize each adapter to r_m with a fresh A (from `generator`) and B = 0, so the model function
    is unchanged. Each matrix keeps the base scale s whatever its rank:
        α_m = α·r_m/r   (s = α/r),      α_m = α·√(r_m/r)   (rsLoRA, s = α/√r).
    Adapters must be fresh (B = 0); budget and bounds are checked before the calibration pass.
    Returns {"ranks", "alphas", "scores"}, each {name: value}.
    Example: initialize_fim_ranks(model, batches, loss_fn)["ranks"] -> {"...query": 4, ...}
    """
    layers = _adapted(model)
    trained = [n for n, m in layers.items() if bool(m.lora_B.detach().any())]
    if trained:
        raise ValueError(f"layers {trained[:5]} have B ≠ 0 and resizing would discard their ΔW: "
                         "run initialize_fim_ranks on freshly added adapters, before training")
    budget = sum(m.r for m in layers.values()) if budget is None else budget
    r_max = 2 * max(m.r for m in layers.values()) if r_max is None else r_max
    allocate_ranks(dict.fromkeys(layers, 1.0), budget, r_min, r_max, power=power)  # validate now
    scores = fisher_scores(model, batches, loss_fn, score, n_batches, per_example)["scores"]
    ranks = allocate_ranks(scores, budget, r_min, r_max, power=power)
    alphas = {}
    for name, layer in layers.items():
        ratio = ranks[name] / layer.r
        alphas[name] = layer.alpha * (math.sqrt(ratio) if layer.rslora else ratio)
        resize_lora(layer, ranks[name], alpha=alphas[name], generator=generator)
    return {"ranks": ranks, "alphas": alphas, "scores": scores}

# -----------------------------------------------------------------------------
# 4. FW-LoRA: a Fisher-weighted penalty on ΔW

FW_BETA = 0.98  # EMA factor of the warm-up Fisher
FW_WARMUP_STEPS = 500  # K: warm-up steps before the importances are frozen
FW_LAMBDA = 1e-4  # λ of the penalty


def _grad_sq_norm(X: torch.Tensor, delta: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """‖δᵀX‖²_F for X (T, d_in), δ (T, d_out): directly, or by the Gram ("ghost norm") identity
    ‖δᵀX‖²_F = Σ (δδᵀ)⊙(XXᵀ). "auto" takes the cheaper: T²·(d_in + d_out) vs T·d_in·d_out."""
    T, d_in = X.shape
    d_out = delta.shape[1]
    if method == "gram" or (method == "auto" and T * (d_in + d_out) < d_in * d_out):
        return ((delta @ delta.T) * (X @ X.T)).sum()  # (T, T) Grams
    return (delta.T @ X).square().sum()  # (d_out, d_in)


@contextlib.contextmanager
def fw_track(model: nn.Module, method: str = "auto") -> Iterator[dict[str, torch.Tensor]]:
    """Yields {m: ‖G_m‖²_F}, filled on exit, for the frozen weight of every adapted layer m,
    with G_m = ∂L/∂W_m = δᵀX summed over everything that ran inside the context: X (T, d_in) and
    δ (T, d_out) stack the rows of every call and every backward pass, so a layer called twice
    or gradients accumulated over micro-batches give ‖Σ_c G_c‖², the norm of the real gradient.
    G_m is never formed when the Gram form is cheaper (method "auto", "direct" or "gram").

        with fw_track(model) as sq_norms:
            loss_fn(model, batch).backward()
        ema = fw_update(ema, sq_norms, step)
    """
    if method not in ("auto", "direct", "gram"):
        raise ValueError(f"method={method!r}: use 'auto', 'direct' or 'gram'")
    layers = _adapted(model)
    sq_norms = {n: m.weight.new_zeros((), dtype=torch.float32) for n, m in layers.items()}
    rows: dict[str, list] = {n: [] for n in layers}

    def on_grad(name, x, xd, delta):
        rows[name].append((x.reshape(-1, x.shape[-1]).float(),  # (T, d_in)
                           delta.reshape(-1, delta.shape[-1]).float()))  # (T, d_out)

    with _hooked(layers, on_grad):
        yield sq_norms
    with torch.no_grad():
        for name, pairs in rows.items():
            if pairs:
                X, D = (torch.cat(z) if len(pairs) > 1 else z[0] for z in zip(*pairs))
                sq_norms[name].add_(_grad_sq_norm(X, D, method))


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

    A float32 scalar, 0 at init (B = 0); add it to the loss after the warm-up.
    Example: fw_penalty(model, importances(ema), fw_lambda=1e-4) -> tensor(0.)"""
    layers = _adapted(model)
    missing = [n for n in layers if n not in importance]
    if missing:
        raise ValueError(f"no importance for layers {missing[:5]}: pass importances(ema) with "
                         "ema from fw_track over the same model")
    total = None
    for name, m in layers.items():
        B, A = m.lora_B.float(), m.lora_A.float()
        sq = m.scaling ** 2 * ((B.T @ B) * (A @ A.T)).sum()  # tr(PQ) = Σ P⊙Q for symmetric Q
        w = 1.0 - torch.as_tensor(importance[name], dtype=torch.float32, device=B.device)
        total = w * sq if total is None else total + w * sq
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
    dt = torch.promote_types(G.dtype, torch.float32)
    G, Z, y = G.to(dt), Z.to(dt), y_diag.to(dt)
    L, lam, retries = _da_cholesky(Z, damping)
    y_inv = 1.0 / (y + damping)  # (d_out,)
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
    Omega = (Omega + Omega.T) / 2
    evals, evecs = torch.linalg.eigh(Omega)  # ascending
    V = _da_canonical_signs(evecs[:, :r])  # (d_in, r)
    s = math.sqrt(da_gamma)
    A, B = V.T / s, (Delta_hat @ V) / s
    info = {"sigma": sigma.item(), "damping": lam, "cholesky_retries": retries,
            "c": c.item(), "eigenvalues": evals[:r].tolist()}
    return A, B, info


def _da_examples(batches: Iterable[dict], n_samples: int):
    """Yield single examples as dicts: every tensor value whose first dim equals the batch size
    (the first dim of the first tensor value) is sliced [i:i+1]; other values pass through.
    Any mapping works (dict, HF BatchEncoding)."""
    seen = 0
    for batch in batches:
        if not hasattr(batch, "items"):
            raise TypeError(f"LoRA-DA batches are dicts of tensors, got {type(batch).__name__}")
        sizes = [v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.ndim > 0]
        if not sizes:
            raise ValueError(f"batch with keys {sorted(batch)} has no tensor with a batch dim")
        n = sizes[0]
        for i in range(n):
            if seen == n_samples:
                return
            yield {k: v[i:i + 1] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n else v
                   for k, v in batch.items()}
            seen += 1


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
                      token_mask: Callable[[dict], torch.Tensor] | None = None
                      ) -> tuple[dict[str, dict], int]:
    """LoRA-DA statistics (arXiv:2510.24561) of every adapted layer, one example at a time as
    the authors' code, with L_n = loss_fn(model, example n) (a token mean, so Y has the paper's
    scale) and δ_t = ∂L_n/∂y_t:

        G = (1/n) Σ_n ∂L_n/∂W (d_out, d_in),   Z = E_t[x_t x_tᵀ],   y = E_t[δ_t ⊙ δ_t],

    Z and y over valid tokens: token_mask(example), else example["attention_mask"], else all.
    Batches are split along dim 0 (_da_examples), at most n_samples examples. Matrices reading
    the same input tensor (q/k/v) share one Z tensor. Runs in eval mode; no .grad is written and
    flags are restored. Sums are in the weight dtype promoted to at least float32.
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
    cur, mask_now = {}, [None]  # inputs seen in the current forward; its token mask

    def on_forward(name, x, y):
        if not y.requires_grad:
            raise ValueError(f"{name}: output does not require grad; loss_fn must not run "
                             "the model under torch.no_grad() or inference_mode()")
        cur.setdefault(name, []).append(x)

    def on_grad(name, x, xd, delta):  # δ for this call of the module, (..., d_out)
        s = st[name]
        d = delta.to(s["G"].dtype)
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
            for example in _da_examples(batches, n_samples):
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
                n_used += 1
        finally:
            cur.clear()
    Z = {o: Zsum[o] / max(st[o]["tokens"], 1) for o in Zsum}  # sharers get the same tensor
    stats = {}
    for n, s in st.items():
        o = owner.get(n, n)  # a module never called has no Z sum: Z = 0
        stats[n] = {"G": s["G"] / max(n_used, 1), "y_diag": s["y_diag"] / max(s["tokens"], 1),
                    "Z": Z[o] if o in Z else s["G"].new_zeros(s["G"].shape[1], s["G"].shape[1]),
                    "tokens": s["tokens"], "z_owner": o}
    return stats, n_used


def lorada_init(model: nn.Module, batches: Iterable[dict],
                loss_fn: Callable[[nn.Module, dict], torch.Tensor], n_samples: int = 256,
                da_alpha: float = 1.0, da_beta: float = 0.03, da_gamma: float = 1024.0,
                damping: float = 1e-6, population_size: int | None = None,
                token_mask: Callable[[dict], torch.Tensor] | None = None) -> dict:
    """LoRA-DA initialisation (arXiv:2510.24561) of every adapted layer, in place: statistics
    from lorada_statistics at the model as it is (W0 at the default B = 0), then A, B from
    lorada_factors, with N_pop = population_size (the fine-tuning set size, as the paper) or the
    number of examples used. W0 is not offset, so the model starts at W0 + s·B A. Defaults are
    the authors' released config (α_DA 1, β_DA 0.03, γ_DA 1024, λ 1e-6, 256 examples). A matrix
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
    stats, n_used = lorada_statistics(model, batches, loss_fn, n_samples, token_mask)
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
