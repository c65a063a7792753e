"""Alternative allocation scores (not FIM-LoRA's) for the study, reached through train.run's
adapt hook: train.run(args, adapt=score_adapt("kfac")). They share fimlora's calibration pass."""

import itertools
import math
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

import fimlora
from fimlora import _adapted, _all_reduce, _calibrate, _hooked, _restored

SCORES = ("gradw", "kfac", "lorada", "random")
GAINS = ("kfac", "lorada")  # per-rank gains, for allocate_by_gains (power does not apply)


def _own_stream(generator: torch.Generator | None, salt: int) -> torch.Generator:
    """A control's stream of its own, seeded by a mix of generator's seed (SplitMix64's
    constants: far from every training stream seed + k)."""
    seed = (generator or torch.default_generator).initial_seed()
    return torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + salt) % 2**64)


def shuffled(ranks: dict[str, int], costs: dict[str, int] | None, caps: int | dict[str, int],
             generator: torch.Generator) -> dict[str, int]:
    """The shuffled control: the same ranks, permuted (torch.randperm) among the matrices of
    equal cost and cap, so the budget and every cap still hold.
    shuffled({"q": 1, "v": 3}, None, 4, g) in ({"q": 1, "v": 3}, {"q": 3, "v": 1})"""
    groups: dict = {}
    for n in ranks:
        groups.setdefault(((costs or {}).get(n), caps if isinstance(caps, int) else caps[n]),
                          []).append(n)
    out = {}
    for names in groups.values():
        order = torch.randperm(len(names), generator=generator).tolist()
        out |= {names[j]: ranks[names[i]] for i, j in enumerate(order)}
    return {n: out[n] for n in ranks}


def allocation_scores(model: nn.Module, batches: Iterable, loss_fn: Callable, score: str,
                      n_batches: int | None = 8, generator: torch.Generator | None = None,
                      population_size: int | None = None
                      ) -> dict[str, float] | dict[str, list[float]]:
    """What each adapted matrix earns per rank, from the first n_batches batches, by name:

        gradw   ‖W0 ⊙ Ḡ‖_F,  Ḡ = (1/K) Σ_b ∂L_b/∂W0            (GoRA-style, arXiv:2502.12171)
        kfac    [½σ_1², ½σ_2², …],  σ_i the singular values of Y^-½ Ḡ Z^-½, Z = diag E_t[x xᵀ],
                Y = diag (1/K) Σ_b Σ_t δ δᵀ: the loss drop of the best rank-k step under the
                K-FAC quadratic model (Martens & Grosse, arXiv:1503.05671)
        lorada  [−σ²λ_1, −σ²λ_2, …],  λ_i ascending eigenvalues of LoRA-DA's Ω (fimlora's
                lorada_factors) on lorada_statistics of these batches, N_pop = population_size
                or their examples; σ² undoes Ω's normalisation, so gains add across matrices
        random  U(0, 1) from a stream of its own, seeded by a mix of generator's seed

    Diagonals are damped by 1e-6 of their mean (the loss scale changes no ranks); kfac and
    lorada give per-rank gains (allocate_by_gains); an unreached matrix scores 0."""
    if score not in SCORES:
        raise ValueError(f"score={score!r}: use one of {', '.join(SCORES)}")
    layers = _adapted(model)
    if score == "random":
        own = _own_stream(generator, 0xBF58476D1CE4E5B9)
        return dict(zip(layers, torch.rand(len(layers), generator=own,
                                           dtype=torch.float64).tolist()))
    if score == "lorada":
        stats, n = fimlora.lorada_statistics(model, itertools.islice(batches, n_batches),
                                             loss_fn, n_samples=2**62)
        out = {}
        for name, s in stats.items():
            if not s["G"].any() or s["tokens"] == 0:  # nothing to gain from this matrix
                out[name] = [0.0] * s["G"].shape[1]
                continue
            G, Z, y = s["G"].double(), s["Z"].double(), s["y_diag"].double()
            damp = [1e-6 * v.mean().item() + torch.finfo(v.dtype).tiny for v in (Z.diag(), y)]
            _, Omega, info = fimlora._da_omega(G, Z, y, 1.0, 0.03, damp[0],
                                               population_size or n, y_damping=damp[1])
            out[name] = (-info["sigma"] ** 2 * torch.linalg.eigvalsh(Omega)).tolist()
        return out
    st = {n: {"G": m.weight.new_zeros(m.out_features, m.in_features, dtype=torch.float32),
              "z": m.weight.new_zeros(m.in_features, dtype=torch.float32),
              "y": m.weight.new_zeros(m.out_features, dtype=torch.float32), "rows": 0}
          for n, m in layers.items()}

    def on_grad(name, x, xd, delta):  # G = Σ_b δ_bᵀX_b = Σ_b ∂L_b/∂W0, z = Σ x⊙x, y = Σ δ⊙δ
        X, D = x.reshape(-1, x.shape[-1]).float(), delta.reshape(-1, delta.shape[-1]).float()
        s = st[name]
        s["G"].addmm_(D.T, X)
        s["z"].add_(X.square().sum(0))
        s["y"].add_(D.square().sum(0))
        s["rows"] += X.shape[0]

    K = 0
    with _restored(model), _hooked(layers, on_grad):  # W0 never requires grad
        for _ in _calibrate(model, layers, itertools.islice(batches, n_batches), loss_fn):
            K += 1
    *rows, K = _all_reduce([st[n][k] for n in layers for k in ("G", "z", "y")],
                           *(st[n]["rows"] for n in layers), K)
    if K == 0:
        raise ValueError("batches yielded nothing to calibrate on")
    out = {}
    for (name, s), n_rows in zip(st.items(), rows):
        G = s["G"].double() / K
        if score == "gradw":
            out[name] = (layers[name].weight.double() * G).norm().item()
            continue
        z = s["z"].double() / max(n_rows, 1)
        y = s["y"].double() / K
        z, y = (v + 1e-6 * v.mean() + torch.finfo(v.dtype).tiny for v in (z, y))
        sigma = torch.linalg.svdvals(G / y.sqrt()[:, None] / z.sqrt()[None, :])
        out[name] = (0.5 * sigma.square()).tolist()
    return out


def _best_extra(values: list[list[float]], kappa: list[int], left: int) -> list[int]:
    """k_m maximising Σ_m values[m][k_m], Σ κ_m·k_m ≤ left, no k_m below its top whose κ_m
    fits in what is left: a dynamic programme per threshold t ∈ {κ_m} ∪ {∞}."""
    g = math.gcd(*kappa) or 1  # 0: no matrices
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
    for um, pick in zip(reversed(u), reversed(picks)):  # back from the last matrix's pick
        out.insert(0, int(pick[b]))
        b -= out[0] * um
    return out


def allocate_by_gains(gains: dict[str, list[float]], budget: int, r_min: int,
                      r_max: int | dict[str, int], costs: dict[str, int] | None = None
                      ) -> dict[str, int]:
    """Ranks r_m ∈ [r_min, min(r_max or r_max[m], len(gains[m]))] with the largest total gain
    Σ_m Σ_{i≤r_m} g_{m,i} among those spending the budget as fimlora.allocate_ranks does; an
    all-zero-gain matrix stays at r_min until every other is full. Exact, unlike greedy g/κ.
    Example: allocate_by_gains({"q": [3.0, 1.0], "v": [2.0, 0.5]}, 3, 0, 2) == {"q": 2, "v": 1}
    """
    names = list(gains)
    if not names:
        raise ValueError("gains is empty: pass at least one {module_name: [g_1, g_2, ...]}")
    hi = {n: min(r_max[n] if isinstance(r_max, dict) else r_max, len(gains[n])) for n in names}
    kappa = costs or dict.fromkeys(names, 1)
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


def initialize_ranks(model: nn.Module, batches: Iterable, loss_fn: Callable, score: str,
                     budget: int | None = None, r_min: int = 1, r_max: int | None = None,
                     n_batches: int | None = 8, power: float = 1.0,
                     generator: torch.Generator | None = None, budget_unit: str = "ranks",
                     population_size: int | None = None) -> dict:
    """fimlora.initialize_fim_ranks with any score: efim, variance, per-example, SCORES (kfac and
    lorada through allocate_by_gains, without power) or "shuffled" (efim's ranks, shuffled).
    {"ranks", "alphas", "scores"}."""
    if score in ("efim", "variance", "per-example"):
        return fimlora.initialize_fim_ranks(
            model, batches, loss_fn, budget, r_min, r_max, score.replace("per-example", "efim"),
            n_batches, score == "per-example", power, generator, budget_unit)
    if score in GAINS and power != 1:
        raise ValueError(f"power={power!r} with score={score!r}: per-rank gains take no power "
                         "(allocate_by_gains); drop power")
    if score not in (*SCORES, "shuffled"):
        raise ValueError(f"score={score!r}: use efim, variance, per-example, "
                         f"{', '.join(SCORES)}, shuffled")
    budget, caps, costs = fimlora._plan(model, budget, r_min, r_max, power, budget_unit)
    if score == "shuffled":  # FIM-LoRA's ranks placed at random: does the placement matter?
        scores = fimlora.fisher_scores(model, batches, loss_fn, "efim", n_batches)["scores"]
        ranks = shuffled(fimlora.allocate_ranks(scores, budget, r_min, caps, costs, power),
                         costs, caps, _own_stream(generator, 0x94D049BB133111EB))
    else:
        scores = allocation_scores(model, batches, loss_fn, score, n_batches, generator,
                                   population_size)
        ranks = (allocate_by_gains(scores, budget, r_min, caps, costs) if score in GAINS
                 else fimlora.allocate_ranks(scores, budget, r_min, caps, costs, power))
    return {"ranks": ranks, "alphas": fimlora.resize_ranks(model, ranks, generator),
            "scores": scores}


def score_adapt(score: str, budget_unit: str = "ranks", r_max: int | None = None,
                record: dict | None = None) -> Callable:
    """An adapt(task, args, device, rng) hook for train.run: train.add_adapters, `score` on
    the first args.calib_batches batches of task.train_batches(rng["calib"]), the allocation
    at the same budget, fimlora.resize_ranks from rng["init"]; `record` gets {"ranks",
    "alphas", "scores", "seconds"}."""
    def adapt(task, args, device, rng):
        import train
        model = train.add_adapters(task, args, device, rng)
        batches = list(itertools.islice(task.train_batches(rng["calib"]), args.calib_batches))
        t0 = time.perf_counter()
        res = initialize_ranks(model, batches, task.loss_fn, score, r_min=args.r_min,
                               r_max=r_max if r_max is not None else args.r_max,
                               n_batches=None, power=args.power, generator=rng["init"],
                               budget_unit=budget_unit, population_size=task.n_train)
        if record is not None:
            record.update(res, seconds=time.perf_counter() - t0)
        return model
    return adapt
