"""Fisher-guided LoRA: FIM-LoRA rank allocation, FW-LoRA regularisation, LoRA-DA initialisation.

    from lora import add_lora
    from fimlora import initialize_fim_ranks
    add_lora(model, targets=["query", "key", "value"], r=8, alpha=16)
    result = initialize_fim_ranks(model, batches, loss_fn)   # loss_fn(model, batch) -> scalar

Imports only the standard library, torch and lora.py, so the two files can be copied together.

References:
    FIM-LoRA: arXiv:2605.16800.   LoRA-DA: arXiv:2510.24561.
    FW-LoRA: "Fisher-Weighted LoRA: one-line importance-aware regularisation" (no public paper).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction

import torch
import torch.nn as nn

from lora import LoRALinear, lora_layers, resize_lora

# -----------------------------------------------------------------------------
# 1. calibration statistics (hooks)

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


def _per_example_hooks(layers: dict[str, LoRALinear], sum_sq: dict, sum_g: dict,
                       sizes: dict[str, int]) -> list:
    """Hooks that capture u = A·dropout(x) in the forward pass and, when the output gradient δ
    arrives in the backward pass, add the per-example B-gradient statistics (fisher_scores).
    `sizes` collects each layer's batch size N and must be cleared before every batch."""
    handles = []
    for name, layer in layers.items():
        inputs: dict[str, torch.Tensor] = {}

        def on_dropout(module, args, out, name=name, layer=layer, inputs=inputs):
            if name in sizes:
                raise ValueError(f"layer {name!r} ran twice in one forward pass: per_example "
                                 "needs each adapted layer called once (use per_example=False)")
            with torch.no_grad():
                u = out.detach().float() @ layer.lora_A.detach().float().T  # (N, ..., r)
            sizes[name] = u.shape[0]
            inputs["u"] = u.reshape(u.shape[0], -1, layer.r)  # (N, T, r)

        def on_layer(module, args, y, name=name, layer=layer, inputs=inputs):
            u, s = inputs.pop("u"), layer.scaling

            def on_grad(delta):
                with torch.no_grad():
                    d = delta.detach().float().reshape(u.shape[0], -1, delta.shape[-1])
                    # × N: δ is the gradient of the batch mean (1/N)Σ_n ℓ_n
                    _add_per_example(u, d, u.shape[0] * s, sum_sq[name], sum_g.get(name))

            if y.requires_grad:
                y.register_hook(on_grad)

        handles.append(layer.dropout.register_forward_hook(on_dropout))
        handles.append(layer.register_forward_hook(on_layer))
    return handles


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


def fisher_scores(model: nn.Module, batches: Iterable,
                  loss_fn: Callable[[nn.Module, object], torch.Tensor], score: str = "efim",
                  n_batches: int | None = 8, per_example: bool = False) -> dict:
    """Empirical-Fisher statistics of every adapter's lora_B (FIM-LoRA, arXiv:2605.16800, B.2).

    For each of the first `n_batches` batches (all when None), the batch-mean loss
    L = loss_fn(model, batch) is differentiated with torch.autograd.grad with respect to the
    lora_B's only (switched to requires_grad for the call), so no `.grad` is ever written.
    requires_grad and every module's train/eval flag are restored afterwards, even on error. The
    model runs in the mode the caller left it in (dropout is active in train mode); the caller's
    loss_fn owns devices and data. Accumulation is float32 under no_grad.

        score="efim"      F_m = (1/K) Σ_k g_k⊙g_k,  g_k = ∂L_k/∂B_m ∈ R^{d_out×r}, K batches
        score="variance"  F_m = (1/K) Σ_k g_k⊙g_k − ḡ⊙ḡ,  ḡ = (1/K) Σ_k g_k  (centred)
        score_m = mean over the d_out·r entries of F_m

    B is scored, not A: at init B = 0, so ∂L/∂A = s·Bᵀ(…) = 0 (the PEFT PR's no-op, methods.md
    B.2), while ∂L/∂B = s·G Aᵀ is not.

    per_example=True averages over examples instead, with g_n the gradient of example n's own
    loss ℓ_n. loss_fn must then be the mean over the N examples of the batch, L = (1/N) Σ_n ℓ_n
    (each ℓ_n may be a masked token mean: padded positions must not reach the loss). One backward
    pass gives, from the hooked u = A·dropout(x) (N, T, r) and δ = ∂L/∂y (N, T, d_out),
    g_n = N·s·Σ_t δ_{n,t} u_{n,t}ᵀ; the factor N undoes the 1/N of the batch mean. This needs
    each adapted layer called once per forward, with the batch on dim 0, and examples that do
    not interact (no batch norm). Per-example gradients are formed a few examples at a time.

    Under an initialised torch.distributed group, sums and counts are all-reduced (SUM) before
    dividing, so every rank gets the statistics of one process run over all ranks' batches.

    Returns {"scores": {name: score_m}, "fisher": {name: F_m (d_out, r) float32}, "count": the
    batches (examples if per_example) averaged over, "bytes": bytes of the accumulators,
    "memory_ratio": bytes / (4·number of model parameters), i.e. relative to a float32
    full-model diagonal Fisher, "seconds": wall time}.
    """
    if score not in ("efim", "variance"):
        raise ValueError(f"score={score!r}: use 'efim' or 'variance'")
    if n_batches is not None and n_batches < 1:
        raise ValueError(f"n_batches={n_batches}: use at least 1 (or None for all batches)")
    t0 = time.perf_counter()
    layers = _adapted(model)
    Bs = [m.lora_B for m in layers.values()]
    sum_sq = {n: torch.zeros_like(m.lora_B, dtype=torch.float32) for n, m in layers.items()}
    sum_g = {n: torch.zeros_like(s) for n, s in sum_sq.items()} if score == "variance" else {}
    count, sizes, handles = 0, {}, []
    with _restored(model):
        try:
            for B in Bs:
                B.requires_grad_(True)
            if per_example:
                handles = _per_example_hooks(layers, sum_sq, sum_g, sizes)
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
        finally:
            for h in handles:
                h.remove()
    count = _all_reduce(list(sum_sq.values()) + list(sum_g.values()), count)
    if count == 0:
        raise ValueError("batches yielded nothing to calibrate on")
    fisher = {}
    for name in layers:
        fisher[name] = sum_sq[name] / count
        if sum_g:
            fisher[name] = (fisher[name] - (sum_g[name] / count).square()).clamp_min(0.0)
    held = 4 * sum(t.numel() for t in (*sum_sq.values(), *sum_g.values()))
    return {"scores": {n: f.mean().item() for n, f in fisher.items()}, "fisher": fisher,
            "count": count, "bytes": held,
            "memory_ratio": held / (4 * sum(p.numel() for p in model.parameters())),
            "seconds": time.perf_counter() - t0}

# -----------------------------------------------------------------------------
# 2. budgeted rank allocation (pure Python)


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
    """FIM-LoRA rank allocation (arXiv:2605.16800, "two-phase water-filling"), done exactly.

    s_m ≥ 0 is the score of matrix m (mean empirical Fisher of lora_B), w_m = (s_m / max s)^p, and
    κ_m is the parameter cost of one rank unit (d_in + d_out; κ_m = 1 when costs is None, so the
    budget R counts ranks). With r_min ≤ r_max:
      phase 1 (water-filling): r*_m = clamp(c·w_m, r_min, r_max), c chosen so Σ_m κ_m·r*_m = R
        (both clamps are handled; if all w_m = 0, all w_m are taken equal; w_m = 0 modules get more
        than r_min only once all others are at r_max);
      phase 2 (rounding): start at r_m = ⌊r*_m⌋ and repeatedly give one rank to the module with the
        largest r*_m − r_m among those with r_m < r_max and κ_m ≤ R − Σ κ·r (ties: higher score,
        then lower name), until no module qualifies.
    Without costs phase 2 is largest-remainder rounding: Σ r_m = R, |r_m − r*_m| < 1, it minimises
    Σ (r_m − r*_m)² over integer vectors in [r_min, r_max]^M summing to R, s_i > s_j ⇒ r_i ≥ r_j,
    and equal scores get ranks at most 1 apart. With costs, Σ κ_m·r_m ≤ R, r_m ≥ ⌊r*_m⌋ and the
    result is maximal (no rank can be raised without exceeding R or r_max); leftover budget goes
    to the cheap matrices, so monotonicity holds among matrices of equal cost only, and a budget
    above Σ κ_m·r_max gives every matrix r_max. Exact rational arithmetic (fractions.Fraction)
    makes ties real ties, so the result is deterministic and permutation-equivariant.
    Raises ValueError naming the bad value for non-finite or negative scores, r_min > r_max,
    r_min < 0, a non-integer budget, no scores, costs that are not positive integers or do not
    match the scores, power < 0, and a budget outside [M·r_min, M·r_max] (with costs: below
    Σ κ_m·r_min).
    Example: allocate_ranks({"q": 1.0, "v": 4.0}, budget=6, r_min=0, r_max=10) == {"q": 1, "v": 5}.
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
    """FIM-LoRA (arXiv:2605.16800, methods.md B): calibrate, allocate, resize, in place.

    1. score_m = fisher_scores(model, batches, loss_fn, score, n_batches, per_example)
    2. r_m = allocate_ranks(score, budget, r_min, r_max, power=power), Σ_m r_m = budget
    3. resize_lora(layer_m, r_m): fresh Kaiming A (from `generator`), B = 0, so ΔW = 0 and the
       model function is unchanged.
    Each matrix keeps the scale s it had before (the base scale):
        s_m = α_m/r_m = α/r       ⇒ α_m = α·r_m/r
        s_m = α_m/√r_m = α/√r     ⇒ α_m = α·√(r_m/r)    (rsLoRA)
    so every matrix learns at the base scale whatever its rank. The harness's adjust_scaling
    (methods.md B.4) instead sets s_m = α/r_m, which shrinks the update of a grown matrix and
    inflates that of a shrunk one (and is wrong under rsLoRA).

    Defaults follow the harness: budget = Σ_m r_m of the current adapters (r·M for a uniform
    rank r), r_max = 2·max_m r_m (2r). Layers with r = 0 are left alone. The adapters must be
    freshly initialised (B = 0), since resizing discards ΔW. Budget, r_min and r_max are checked
    before the calibration pass.
    Returns {"ranks", "alphas", "scores": {name: value}, "seconds", "bytes", "memory_ratio"}.
    """
    t0 = time.perf_counter()
    layers = _adapted(model)
    trained = [n for n, m in layers.items() if bool(m.lora_B.detach().any())]
    if trained:
        raise ValueError(f"layers {trained[:5]} have B ≠ 0 and resizing would discard their ΔW: "
                         "run initialize_fim_ranks on freshly added adapters, before training")
    budget = sum(m.r for m in layers.values()) if budget is None else budget
    r_max = 2 * max(m.r for m in layers.values()) if r_max is None else r_max
    allocate_ranks(dict.fromkeys(layers, 1.0), budget, r_min, r_max, power=power)  # validate now
    cal = fisher_scores(model, batches, loss_fn, score, n_batches, per_example)
    ranks = allocate_ranks(cal["scores"], budget, r_min, r_max, power=power)
    alphas = {}
    for name, layer in layers.items():
        ratio = ranks[name] / layer.r
        alphas[name] = layer.alpha * (math.sqrt(ratio) if layer.rslora else ratio)
        resize_lora(layer, ranks[name], alpha=alphas[name], generator=generator)
    return {"ranks": ranks, "alphas": alphas, "scores": cal["scores"],
            "seconds": time.perf_counter() - t0, "bytes": cal["bytes"],
            "memory_ratio": cal["memory_ratio"]}

# -----------------------------------------------------------------------------
# 4. FW-LoRA: Fisher-weighted penalty on ΔW

FW_BETA = 0.98  # EMA factor of the warm-up Fisher (methods.md F.1)
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
    """While active, every backward pass through a LoRA layer m adds ‖∂L/∂W_m‖²_F of its frozen
    W_m to the yielded dict {name: float32 scalar}, without forming or storing ∂L/∂W_m.

    G_m = ∂L/∂W_m = δᵀX, with X (T, d_in) the layer inputs and δ (T, d_out) the output gradients
    of all T tokens of the batch (methods.md F.4), caught by a forward hook and a tensor hook.
    method: "direct" ‖δᵀX‖²_F, "gram" Σ (δδᵀ)⊙(XXᵀ), or "auto" (the cheaper). Wrap one step:

        F = {}
        for k, batch in enumerate(loader, 1):          # warm-up, k = 1 … FW_WARMUP_STEPS
            with fw_track(model) as sq_norms:
                loss = loss_fn(model, batch)
                loss.backward()
            F = fw_update(F, sq_norms, k)
            ...optimizer step...
        I = importances(F)                             # frozen from here on
        loss = loss_fn(model, batch) + fw_penalty(model, I)

    The hooks are removed on exit. Forwards without grad are ignored. Several backward passes
    inside one context add up their squared norms (with gradient accumulation that is the sum of
    the micro-batch norms, not the norm of the summed gradient); a layer called twice in one
    forward likewise counts each call on its own.
    """
    if method not in ("auto", "direct", "gram"):
        raise ValueError(f"method={method!r}: use 'auto', 'direct' or 'gram'")
    layers = lora_layers(model)
    sq_norms = {n: m.weight.new_zeros((), dtype=torch.float32) for n, m in layers.items()}

    def on_forward(module, args, kwargs, y, name):
        if not (torch.is_grad_enabled() and y.requires_grad):
            return
        x = (args[0] if args else kwargs["x"]).detach()

        def on_grad(delta):
            with torch.no_grad():
                X = x.reshape(-1, x.shape[-1]).float()  # (T, d_in)
                d = delta.detach().reshape(-1, delta.shape[-1]).float()  # (T, d_out)
                sq_norms[name].add_(_grad_sq_norm(X, d, method))

        y.register_hook(on_grad)

    handles = [m.register_forward_hook(
        lambda mod, a, kw, y, name=n: on_forward(mod, a, kw, y, name), with_kwargs=True)
        for n, m in layers.items()]
    try:
        yield sq_norms
    finally:
        for h in handles:
            h.remove()


def fw_update(F: dict[str, torch.Tensor], sq_norms: dict[str, torch.Tensor], step: int,
              beta: float = FW_BETA) -> dict[str, torch.Tensor]:
    """One FW-LoRA warm-up step (methods.md F.1), bias-corrected: returns F̂_k with

        F_k = β·F_{k−1} + (1−β)·‖G_m‖²_F,  F_0 = 0,     F̂_k = F_k / (1 − β^k),
        i.e. F̂_k = (β·(1 − β^{k−1})·F̂_{k−1} + (1−β)·‖G_m‖²_F) / (1 − β^k),

    for step k = 1, 2, … (F̂_1 = ‖G_m‖²_F; pass F = {} at k = 1). The raw EMA is (1 − β^k)·F̂_k;
    the correction only matters for small K (0.98^500 ≈ 4e-5) and cancels in importances().
    A name missing from sq_norms counts as 0 this step, one missing from F as F̂ = 0.
    Example: fw_update({}, {"q": torch.tensor(2.)}, 1) == {"q": tensor(2.)}.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step={step!r}: count warm-up steps from 1")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta={beta}: the EMA factor must lie in [0, 1)")
    keep, new = beta * (1.0 - beta ** (step - 1)), 1.0 - beta
    out = {}
    for name in {**F, **sq_norms}:
        g = sq_norms.get(name)
        g = torch.zeros_like(F[name]) if g is None else g.detach().float()
        prev = F.get(name)
        out[name] = (new * g if prev is None else keep * prev + new * g) / (1.0 - beta ** step)
    return out


def importances(F: dict[str, torch.Tensor], mode: str = "sum") -> dict[str, torch.Tensor]:
    """FW-LoRA importances (methods.md F.2): I_m = F_m / Σ_j F_j ("sum", the default) or
    I_m = F_m / max_j F_j ("max"). With "sum" over M matrices every I_m is about 1/M, so the
    penalty weights 1 − I_m are all close to 1 and the penalty is nearly a uniform L2 on ΔW.
    Example: importances({"q": torch.tensor(1.), "v": torch.tensor(3.)})["v"] == 0.75."""
    if mode not in ("sum", "max"):
        raise ValueError(f"mode={mode!r}: use 'sum' or 'max'")
    if not F:
        raise ValueError("F is empty: run the warm-up (fw_track + fw_update) first")
    values = torch.stack([f.detach().float().reshape(()) for f in F.values()])
    if not torch.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"Fisher EMAs must be finite and ≥ 0, got {values.tolist()}")
    total = values.sum() if mode == "sum" else values.max()
    if total <= 0:
        raise ValueError("all Fisher EMAs are 0: did the warm-up backward passes run inside "
                         "fw_track with trainable adapters?")
    return {name: v / total for name, v in zip(F, values)}


def fw_penalty(model: nn.Module, I: dict[str, torch.Tensor | float],
               lam: float = FW_LAMBDA) -> torch.Tensor:
    """FW-LoRA penalty (methods.md F.3), differentiable in A and B:

        λ Σ_m (1 − I_m)·‖ΔW_m‖²_F,  ΔW_m = s_m·B_m A_m  (the scale s_m IS included),
        ‖s B A‖²_F = s²·tr((BᵀB)(AAᵀ)), from two r×r Grams, never the d_out×d_in ΔW.

    Layers with r = 0 add nothing; every other LoRA layer needs an I_m. Returns a float32 scalar,
    0 at init (B = 0). Add it to the loss after the warm-up."""
    layers = {n: m for n, m in lora_layers(model).items() if m.r > 0}
    missing = [n for n in layers if n not in I]
    if missing:
        raise ValueError(f"no importance for layers {missing[:5]}: pass importances(F) with F "
                         "from fw_track over the same model")
    if not layers:
        raise ValueError("the model has no LoRA layer with r > 0: call add_lora(model, ...) first")
    total = None
    for name, m in layers.items():
        B, A = m.lora_B.float(), m.lora_A.float()
        sq = m.scaling ** 2 * ((B.T @ B) * (A @ A.T)).sum()  # tr(PQ) = Σ P⊙Q for symmetric Q
        w = 1.0 - torch.as_tensor(I[name], dtype=torch.float32, device=B.device)
        total = w * sq if total is None else total + w * sq
    return lam * total

# -----------------------------------------------------------------------------
# 5. LoRA-DA: data-aware closed-form initialisation

_DA_CHOLESKY_RETRIES = 6  # each retry multiplies the damping on Z by 10 (methods.md A.5)


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
                   alpha: float = 1.0, beta: float = 0.03, gamma: float = 1024.0,
                   damping: float = 1e-6, n_pop: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """LoRA-DA closed form for one matrix (arXiv:2510.24561; methods.md A.2-A.3).

    With the K-FAC Fisher F ≈ Z ⊗ Y (Y diagonal), the target is one natural-gradient step
    Δ* = −Y⁻¹ G Z⁻¹ and the adapter subspace V ∈ R^{d_in×r}, VᵀV = I, minimises
    bias + variance:
        min_V tr(Vᵀ Ω V),   Ω = −α Δ*ᵀΔ* + β (tr(Y⁻¹)/N) Z⁻¹,
    solved by the eigenvectors of the r smallest eigenvalues of Ω (Ky Fan). As in the official
    code, Z ← (Z+Zᵀ)/2 + λI and Y⁻¹ = diag(1/(y + λ)); N = −Y⁻¹GZ⁻¹ by a Cholesky solve is
    divided by σ = ‖N‖₂, so N̂ = N/σ and both terms of Ω are divided by σ² (same subspace):
        Ω = −α N̂ᵀN̂ + β c Z⁻¹,   c = Σ_j y⁻¹_j / N_pop / σ²,
        A = Vᵀ/√γ  (r, d_in),   B = N̂ V/√γ  (d_out, r),   so  B A = N̂ V Vᵀ / γ.
    β = 0 gives B A = the best rank-r approximation of N̂/γ (LoRA-One with K-FAC).
    If the Cholesky factorisation of Z fails, λ is raised 10× (up to 6 times) for Z only.
    Works in the dtype of G promoted to at least float32. Returns (A, B, info) with info =
    {sigma, damping (λ used on Z), cholesky_retries, c, eigenvalues (the r smallest)}.
    Raises ValueError if r ∉ [1, d_in], shapes disagree, or G is zero (σ = 0)."""
    d_out, d_in = G.shape
    if not 1 <= r <= d_in:
        raise ValueError(f"r={r} must lie in [1, d_in={d_in}]: LoRA-DA picks r input directions")
    if Z.shape != (d_in, d_in) or y_diag.shape != (d_out,):
        raise ValueError(f"G {tuple(G.shape)} needs Z ({d_in}, {d_in}) and y_diag ({d_out},), "
                         f"got {tuple(Z.shape)} and {tuple(y_diag.shape)}")
    if gamma <= 0 or n_pop < 1:
        raise ValueError(f"gamma={gamma} and n_pop={n_pop} must be positive")
    dt = torch.promote_types(G.dtype, torch.float32)
    G, Z, y = G.to(dt), Z.to(dt), y_diag.to(dt)
    L, lam, retries = _da_cholesky(Z, damping)
    y_inv = 1.0 / (y + damping)  # (d_out,)
    N = -y_inv[:, None] * torch.cholesky_solve(G.T, L).T  # (d_out, d_in)
    sigma = torch.linalg.matrix_norm(N, 2)
    if not bool(torch.isfinite(sigma)) or sigma.item() == 0:
        raise ValueError(f"σ = ‖N‖₂ = {sigma.item()}: G is zero or not finite, so LoRA-DA has "
                         "no direction; keep the default init for this matrix")
    N_hat = N / sigma
    c = y_inv.sum() / n_pop / sigma**2
    Omega = -alpha * (N_hat.T @ N_hat)  # (d_in, d_in)
    if beta != 0:
        Omega = Omega + beta * c * torch.cholesky_inverse(L)
    Omega = (Omega + Omega.T) / 2
    evals, evecs = torch.linalg.eigh(Omega)  # ascending
    V = _da_canonical_signs(evecs[:, :r])  # (d_in, r)
    s = math.sqrt(gamma)
    A, B = V.T / s, (N_hat @ V) / s
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
    """LoRA-DA statistics of every LoRALinear with r > 0, from single examples (bs = 1, as the
    official code; methods.md A.3 steps 2-3):
        G = (1/n) Σ_n ∂L_n/∂W        (d_out, d_in), all tokens (the exact gradient),
        Z = E_t[x_t x_tᵀ]            (d_in, d_in),  valid tokens pooled over all examples,
        y = E_t[δ_t ⊙ δ_t]           (d_out,),      δ_t = ∂L_n/∂y_t at the module output,
    where L_n = loss_fn(model, example n) (per-sample loss = token mean, so that Y has the
    paper's scale). Each batch is split along dim 0 (see _da_examples); at most n_samples
    examples are used. Valid tokens: token_mask(example) if given, else
    example["attention_mask"] if present, else all. Matrices reading the same input tensor
    (q/k/v) share one Z tensor. The model runs in eval mode (no dropout) with lora_B
    temporarily trainable so backward reaches every layer through torch.autograd.grad; no
    .grad is written, and requires_grad and train/eval modes are restored, also on error.
    Sums are taken in the weight dtype promoted to at least float32.
    Returns ({name: {G, Z, y_diag, tokens, z_owner}}, number of examples used)."""
    layers = {n: m for n, m in lora_layers(model).items() if m.r > 0}
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples}: use at least one example")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"{merged[:4]} are merged: call unmerge_lora(model) before LoRA-DA")
    st = {n: {"G": m.weight.new_zeros(m.out_features, m.in_features,
                                      dtype=torch.promote_types(m.weight.dtype, torch.float32)),
              "tokens": 0} for n, m in layers.items()}
    for s in st.values():
        s["y_diag"] = s["G"].new_zeros(s["G"].shape[0])
    Zsum, owner = {}, {}  # owner[n]: the matrix whose Z tensor n uses
    cur, mask_now = {}, [None]  # inputs seen in the current forward; its token mask

    def backward_hook(name, x, mask):
        def hook(grad):  # grad: δ for this call of the module, (..., d_out)
            with torch.no_grad():
                s = st[name]
                d = grad.detach().to(s["G"].dtype)
                s["G"].addmm_(d.reshape(-1, d.shape[-1]).T, x.reshape(-1, x.shape[-1]).to(d.dtype))
                dm = _da_rows(d, mask)
                s["y_diag"].add_((dm * dm).sum(dim=0))
        return hook

    def forward_hook(name):
        def hook(module, args, kwargs, out):
            x = (args[0] if args else kwargs["x"]).detach()
            if not out.requires_grad:
                raise ValueError(f"{name}: output does not require grad; loss_fn must not run "
                                 "the model under torch.no_grad() or inference_mode()")
            cur.setdefault(name, []).append(x)
            out.register_hook(backward_hook(name, x, mask_now[0]))
        return hook

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

    handles, n_used = [], 0
    with _restored(model):
        try:
            model.eval()
            for n, m in layers.items():
                m.lora_B.requires_grad_(True)
                handles.append(m.register_forward_hook(forward_hook(n), with_kwargs=True))
            inputs = [m.lora_B for m in layers.values()]
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
            for h in handles:
                h.remove()
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
                alpha: float = 1.0, beta: float = 0.03, gamma: float = 1024.0,
                damping: float = 1e-6, population_size: int | None = None,
                token_mask: Callable[[dict], torch.Tensor] | None = None) -> dict:
    """LoRA-DA data-aware initialisation (arXiv:2510.24561) of every LoRALinear in the model:
    statistics G, Z, y from lorada_statistics, then A, B from lorada_factors per matrix, copied
    into lora_A / lora_B. W0 is not offset (methods.md A.3 step 5), so the model starts at
    W0 + s·B A; N = N_pop = population_size (the fine-tuning set size, as the paper) or, when
    None, the number of examples used. Defaults are the released config (α=1, β=0.03, γ=1024,
    λ=1e-6, 256 examples). Statistics are taken at the model as it is (B = 0 at the default
    init, i.e. at W0). A matrix whose G is zero (unused output) or that saw no valid token keeps
    its init and is listed in "skipped", as are r = 0 layers. Nothing is written unless every
    matrix solves. Raises ValueError if some r > d_in, or for merged layers or bad arguments.

    Returns {"initialized": [names], "skipped": {name: reason}, "n_samples": n,
    "population_size": N, "z_shared_with": {name: owner}, "matrices": {name: lorada_factors
    info + seconds}, "seconds": {"statistics": t, "solve": t}}."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRALinear layers: call add_lora(model, ...) first")
    too_big = [f"{n} (r={m.r} > d_in={m.in_features})" for n, m in layers.items()
               if m.r > m.in_features]
    if too_big:
        raise ValueError(f"LoRA-DA needs r <= d_in: {', '.join(too_big[:4])}; lower the rank")
    if gamma <= 0 or damping <= 0 or (population_size is not None and population_size < 1):
        raise ValueError(f"gamma={gamma}, damping={damping} and population_size="
                         f"{population_size} must be positive")
    t0 = time.perf_counter()
    stats, n_used = lorada_statistics(model, batches, loss_fn, n_samples, token_mask)
    if n_used == 0:
        raise ValueError("batches yielded no example: pass at least one non-empty batch")
    t1 = time.perf_counter()
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
        ts = time.perf_counter()
        A, B, info = lorada_factors(s["G"], s["Z"], s["y_diag"], layers[n].r, alpha, beta,
                                    gamma, damping, n_pop)
        factors[n] = (A, B)
        matrices[n] = {**info, "seconds": time.perf_counter() - ts}
    with torch.no_grad():
        for n, (A, B) in factors.items():
            layers[n].lora_A.copy_(A)
            layers[n].lora_B.copy_(B)
    return {"initialized": list(factors), "skipped": skipped, "n_samples": n_used,
            "population_size": n_pop,
            "z_shared_with": {n: s["z_owner"] for n, s in stats.items() if s["z_owner"] != n},
            "matrices": matrices,
            "seconds": {"statistics": t1 - t0, "solve": time.perf_counter() - t1}}
