"""The alternative allocation scores of study/scores.py (allocation_scores), allocate_by_gains,
initialize_ranks and score_adapt.

Oracles: the frozen weight's gradient read from W.grad of a plain .backward() on a copy (gradw,
kfac), inputs and output gradients captured by forward hooks and an additive zero probe (kfac's
Z and Y), the explicit-inverse LoRA-DA Ω of tests/test_lorada.py (lorada), all in float64; an
exhaustive search over rank vectors for allocate_by_gains (M ≤ 4).

Run: .venv/bin/python -m pytest tests/test_study_scores.py -q
"""

import copy
import itertools
import math

import pytest
import torch
from torch import nn
from hypothesis import given, settings
from hypothesis import strategies as st

import test_fisher as tf
from conftest import probe_outputs
import test_lorada as tl
from fimlora import allocate_ranks, initialize_fim_ranks, lorada_statistics
from study.scores import (GAINS, SCORES, allocate_by_gains, allocation_scores, initialize_ranks,
                          score_adapt)
from lora import add_lora, lora_layers


def dense_batch_stats(model, batches):
    """Per batch on a copy: W.grad of the batch loss, and the layer inputs and output
    gradients (x, δ) of every adapted layer. Returns ({name: [grad_b]}, {name: [(X, D)]})."""
    grads, rows = {}, {}
    for batch in batches:
        m = copy.deepcopy(model)
        layers = lora_layers(m)
        seen = {}
        handles = probe_outputs(layers, seen)
        for layer in layers.values():
            layer.weight.requires_grad_(True)
        loss = tf.loss_fn(m, batch)
        deltas = torch.autograd.grad(loss, [seen[n][1] for n in layers], retain_graph=True)
        loss.backward()
        for h in handles:
            h.remove()
        for (n, layer), d in zip(layers.items(), deltas):
            grads.setdefault(n, []).append(layer.weight.grad.clone())
            x = seen[n][0]
            rows.setdefault(n, []).append((x.reshape(-1, x.shape[-1]), d.reshape(-1, d.shape[-1])))
    return grads, rows


def test_gradw_is_norm_of_weight_times_mean_gradient():
    model, batches = tf.make_model(random_B=True), tf.make_batches(3)
    grads, _ = dense_batch_stats(model, batches)
    got = allocation_scores(model, batches, tf.loss_fn, "gradw")
    for name, layer in lora_layers(model).items():
        G = torch.stack(grads[name]).mean(0)
        assert got[name] == pytest.approx((layer.weight * G).norm().item(), rel=1e-5)
    assert not any(layer.weight.requires_grad for layer in lora_layers(model).values())


def test_kfac_gains_are_half_squared_singular_values_of_whitened_gradient():
    """Z = diag of the row mean of x xᵀ, Y = diag of (1/K) Σ_b Σ_t δ δᵀ, both damped by 1e-6
    of their mean; gains ½σ_i² of Y^-½ Ḡ Z^-½, in descending order."""
    model, batches = tf.make_model(random_B=True), tf.make_batches(3)
    grads, rows = dense_batch_stats(model, batches)
    got = allocation_scores(model, batches, tf.loss_fn, "kfac")
    for name in lora_layers(model):
        G = torch.stack(grads[name]).mean(0)
        X = torch.cat([x for x, _ in rows[name]])
        z = X.square().mean(0)
        y = sum(d.square().sum(0) for _, d in rows[name]) / len(batches)
        z, y = z + 1e-6 * z.mean(), y + 1e-6 * y.mean()
        sigma = torch.linalg.svdvals(torch.diag(y.rsqrt()) @ G @ torch.diag(z.rsqrt()))
        torch.testing.assert_close(torch.tensor(got[name], dtype=torch.float64),
                                   0.5 * sigma.square(), rtol=1e-4, atol=1e-12)
        assert got[name] == sorted(got[name], reverse=True)


def test_kfac_gain_is_the_loss_decrease_of_the_best_rank_k_step():
    """The K-FAC quadratic model q(ΔW) = ⟨Ḡ, ΔW⟩ + ½‖Y^½ ΔW Z^½‖²_F, minimised over rank-k ΔW
    by ΔW = −Y^-½ [H]_k Z^-½ (H = Y^-½ Ḡ Z^-½, [·]_k its truncated SVD), drops by ½ Σ_{i≤k} σ_i²,
    and a random rank-k step never does better."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(5, 7, generator=g, dtype=torch.float64)
    y, z = torch.rand(5, generator=g, dtype=torch.float64) + 0.1, torch.rand(7, generator=g,
                                                                             dtype=torch.float64)
    H = G / y.sqrt()[:, None] / z.sqrt()[None, :]
    U, S, Vh = torch.linalg.svd(H, full_matrices=False)

    def q(dW):
        return (G * dW).sum() + 0.5 * (y.sqrt()[:, None] * dW * z.sqrt()[None, :]).square().sum()
    for k in (1, 2, 4):
        dW = -(U[:, :k] * S[:k]) @ Vh[:k] / y.sqrt()[:, None] / z.sqrt()[None, :]
        assert q(dW).item() == pytest.approx(-0.5 * S[:k].square().sum().item(), rel=1e-10)
        for _ in range(20):
            P = torch.randn(5, k, generator=g, dtype=torch.float64)
            Q = torch.randn(k, 7, generator=g, dtype=torch.float64)
            t = torch.linspace(-2, 2, 41, dtype=torch.float64)
            assert min(q(s * P @ Q).item() for s in t) >= q(dW).item() - 1e-12


def test_lorada_gains_are_unnormalised_omega_eigenvalues():
    """−σ²·eig(Ω) with Ω from the explicit-inverse oracle of tests/test_lorada.py, on the
    statistics lorada_statistics gives for the same batches (N_pop = their examples), Z and y
    each damped by 1e-6 of their own mean."""
    model, batches = tl.make_model(), tl.make_batches()
    got = allocation_scores(model, batches, tl.loss_fn, "lorada", n_batches=2)
    stats, n = lorada_statistics(model, batches[:2], tl.loss_fn)
    assert n == 5
    for name, s in stats.items():
        if not s["G"].any():
            assert got[name] == [0.0] * s["G"].shape[1]  # "dead": nothing to gain
            continue
        lam, lam_y = (1e-6 * v.mean().item() for v in (s["Z"].diag(), s["y_diag"]))
        _, sigma, _, Omega = tl.explicit(s["G"], s["Z"], s["y_diag"], lam, beta=0.03, n_pop=n,
                                         lam_y=lam_y)
        want = -sigma**2 * torch.linalg.eigvalsh(Omega)
        torch.testing.assert_close(torch.tensor(got[name], dtype=torch.float64), want,
                                   rtol=1e-6, atol=1e-9)


def test_random_scores_are_seeded():
    model, batches = tf.make_model(), tf.make_batches(1)

    def draw(seed):
        return allocation_scores(model, batches, tf.loss_fn, "random",
                                 generator=torch.Generator().manual_seed(seed))
    assert draw(3) == draw(3) and draw(3) != draw(4)
    assert all(0 <= v < 1 for v in draw(3).values())


def fisher_setup():
    model, batches = tf.make_model(r=2), tf.make_batches(3)
    ids, mask, _ = batches[0]
    return model, batches, tf.loss_fn, lambda m: m(ids, mask), 6, {"query": 4, "value": 4,
                                                                   "classifier": 3}


def lorada_setup():
    """LoRA-DA's statistics need dict batches: the model of tests/test_lorada.py, in eval mode
    (its dropout would make the forward random)."""
    torch.manual_seed(0)
    model, batches = tl.make_model(), tl.make_batches()
    model.eval()
    b = batches[0]
    caps = {n: min(6, m.in_features, m.out_features) for n, m in lora_layers(model).items()}
    return (model, batches, tl.loss_fn, lambda m: m(b["input_ids"], b["attention_mask"]),
            3 * len(caps), caps)


@pytest.mark.parametrize("score", ["efim", "variance", "per-example", "shuffled", *SCORES])
def test_initialize_ranks_with_each_score_spends_the_budget(score):
    """Every score gives ranks in [r_min, min(r_max, d_in, d_out)] summing to the budget,
    the same for the same seed, and leaves the model function unchanged (B = 0)."""
    runs = []
    for _ in range(2):
        model, batches, loss, forward, budget, caps = (lorada_setup if score == "lorada"
                                                       else fisher_setup)()
        with torch.no_grad():
            y0 = forward(model)
        out = initialize_ranks(model, batches, loss, score,
                               generator=torch.Generator().manual_seed(0))
        assert sum(out["ranks"].values()) == budget
        assert all(1 <= out["ranks"][n] <= caps[n] for n in caps)
        with torch.no_grad():
            torch.testing.assert_close(forward(model), y0, rtol=0, atol=0)
        runs.append(out["ranks"])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("unit", ["ranks", "params"])
def test_shuffled_control_places_efims_ranks_at_random_among_equal_costs(unit):
    """The shuffled control keeps FIM-LoRA's (efim's) rank multiset among the matrices of
    equal cost and moves ranks across them for some seed (here every params cost is its own:
    nothing can move)."""
    model, batches, loss, _, _, _ = fisher_setup()
    fim = initialize_fim_ranks(copy.deepcopy(model), batches, loss, budget_unit=unit)["ranks"]
    costs = {n: m.in_features + m.out_features if unit == "params" else 1
             for n, m in lora_layers(model).items()}
    seen = set()
    for seed in range(8):
        out = initialize_ranks(copy.deepcopy(model), batches, loss, "shuffled", budget_unit=unit,
                               generator=torch.Generator().manual_seed(seed))["ranks"]
        for c in set(costs.values()):
            assert (sorted(out[n] for n in out if costs[n] == c)
                    == sorted(fim[n] for n in fim if costs[n] == c))
        seen.add(tuple(out.values()))
    # ranks: query and value share cost 1 and cap 4 (the classifier's cap is 3): two orders
    assert len(seen) == (1 if unit == "params" else 2)


def test_initialize_ranks_kfac_follows_the_gains():
    """With kfac the ranks are allocate_by_gains of allocation_scores on the same batches."""
    model, batches = tf.make_model(r=2), tf.make_batches(3)
    gains = allocation_scores(model, batches, tf.loss_fn, "kfac")
    out = initialize_ranks(model, batches, tf.loss_fn, "kfac")
    assert out["ranks"] == allocate_by_gains(gains, 6, 1, {"query": 4, "value": 4,
                                                           "classifier": 3})


def unreached_setup():
    """lorada_setup's model (its `dead` matrix: output × 0, so ∂L/∂W = 0) plus `unused`, a
    target Linear the forward never calls; eval mode."""
    torch.manual_seed(0)
    model = tl.Tiny().double()
    model.unused = nn.Linear(6, 4).double()
    add_lora(model, targets=[*tl.TARGETS, "unused"], r=3, alpha=6.0, dropout=0.1, heads=["cls"])
    return model.eval(), tl.make_batches()


DATA_SCORES = ["efim", "variance", "gradw", "kfac", "lorada"]


@pytest.mark.parametrize("unit", ["ranks", "params"])
@pytest.mark.parametrize("score", DATA_SCORES)
def test_a_matrix_the_loss_never_reaches_gets_r_min(score, unit):
    """Issue 19: lorada gave `dead` 0 gains, above the negative gains of useful matrices, so its
    full cap. Now both unreached matrices sit at r_min, and the budget is still spent."""
    model, batches = unreached_setup()
    layers = lora_layers(model)
    cost = {n: (m.in_features + m.out_features if unit == "params" else 1)
            for n, m in layers.items()}
    out = initialize_ranks(model, batches, tl.loss_fn, score, budget_unit=unit,
                           population_size=1000)
    r = out["ranks"]
    assert r["dead"] == r["unused"] == 1 and min(r.values()) == 1
    budget = sum(3 * c for c in cost.values())
    left = budget - sum(cost[n] * r[n] for n in r)
    caps = {n: min(6, m.in_features, m.out_features) for n, m in layers.items()}
    assert left >= 0 and all(r[n] == caps[n] or cost[n] > left for n in r
                             if n not in ("dead", "unused"))


@pytest.mark.parametrize("scale", [10.0, 1e-3])
@pytest.mark.parametrize("score", DATA_SCORES)
def test_ranks_do_not_depend_on_the_scale_of_the_loss(score, scale):
    """Issue 19: lorada's damping 1e-6 on y was absolute, so scaling the loss moved its ranks
    (y scales by scale²: at 1e-3 Y was mostly damping). Every score's ranks, at both budget
    units, are those of the unscaled loss."""
    model, batches = unreached_setup()
    layers = lora_layers(model)
    caps = {n: min(6, m.in_features, m.out_features) for n, m in layers.items()}
    costs = {n: m.in_features + m.out_features for n, m in layers.items()}

    def ranks(loss_fn):
        m = copy.deepcopy(model)
        s = initialize_ranks(m, batches, loss_fn, score, n_batches=None,
                             population_size=1000)["scores"]
        alloc = allocate_by_gains if score in GAINS else allocate_ranks
        return (alloc(s, 3 * len(caps), 1, caps),
                alloc(s, sum(3 * c for c in costs.values()), 1, caps, costs=costs))
    assert ranks(lambda m, b: scale * tl.loss_fn(m, b)) == ranks(tl.loss_fn)


def test_lorada_gains_use_the_population_size():
    """population_size is lorada's N_pop (train.py passes lorada_init's, the training set size):
    the gains are those of the oracle Ω with that N_pop, and initialize_ranks passes it on."""
    model, batches = tl.make_model(), tl.make_batches()
    got = allocation_scores(model, batches, tl.loss_fn, "lorada", population_size=67349)
    stats, _ = lorada_statistics(model, batches, tl.loss_fn)
    s = stats["fc"]
    lam, lam_y = (1e-6 * v.mean().item() for v in (s["Z"].diag(), s["y_diag"]))
    _, sigma, _, Omega = tl.explicit(s["G"], s["Z"], s["y_diag"], lam, beta=0.03,
                                     n_pop=67349, lam_y=lam_y)
    torch.testing.assert_close(torch.tensor(got["fc"], dtype=torch.float64),
                               -sigma**2 * torch.linalg.eigvalsh(Omega), rtol=1e-6, atol=1e-9)
    model, batches, loss, _, budget, caps = lorada_setup()
    want = allocation_scores(model, batches, loss, "lorada", population_size=7)
    assert want != allocation_scores(model, batches, loss, "lorada")
    out = initialize_ranks(model, batches, loss, "lorada", population_size=7)
    assert out["scores"] == want
    assert out["ranks"] == allocate_by_gains(want, budget, 1, caps)


def test_gain_scores_refuse_power():
    """power acts on allocate_ranks' scores only; kfac and lorada go to allocate_by_gains."""
    model, batches = tf.make_model(r=2), tf.make_batches(3)
    with pytest.raises(ValueError, match="power=2 with score='kfac': .* drop power"):
        initialize_ranks(model, batches, tf.loss_fn, "kfac", power=2)
    with pytest.raises(ValueError, match="power=0.5 with score='lorada'"):
        initialize_ranks(model, batches, tf.loss_fn, "lorada", power=0.5)
    initialize_ranks(model, batches, tf.loss_fn, "gradw", power=2)


def test_random_scores_come_from_a_stream_of_their_own():
    """Issue 19: random drew from the caller's generator, train.py's init stream, and streams
    are seeded seed + k, so seed s + 1's init stream was seed s's data stream. Now the draw
    leaves the generator alone and differs from the first draws of every stream seed + k."""
    model, batches = tf.make_model(), tf.make_batches(1)
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        got = list(allocation_scores(model, batches, tf.loss_fn, "random", generator=g).values())
        assert torch.equal(g.get_state(), torch.Generator().manual_seed(seed).get_state())
        for other in range(12):
            u = torch.rand(len(got), generator=torch.Generator().manual_seed(other),
                           dtype=torch.float64).tolist()
            assert got != u


def test_scores_reject_unknown_names():
    model, batches = tf.make_model(), tf.make_batches(1)
    with pytest.raises(ValueError, match="score='efim': use one of gradw, kfac, lorada"):
        allocation_scores(model, batches, tf.loss_fn, "efim")  # that one is fimlora's
    with pytest.raises(ValueError, match="score='fisher': use efim, variance, per-example, gradw"):
        initialize_ranks(model, batches, tf.loss_fn, "fisher")
    with pytest.raises(ValueError, match="score='kfac': use 'efim' or 'variance' .study/scores"):
        initialize_fim_ranks(model, batches, tf.loss_fn, score="kfac")


# -----------------------------------------------------------------------------
# allocate_by_gains

gain_lists = st.lists(st.floats(-10, 10), min_size=0, max_size=8).map(
    lambda g: sorted(g, reverse=True))


@st.composite
def gain_problems(draw, max_m=6, costs=False):
    names = draw(st.lists(st.text("abq.0", min_size=1, max_size=3), min_size=1, max_size=max_m,
                          unique=True))
    r_min = draw(st.integers(0, 2))
    gains = {n: draw(gain_lists.filter(lambda g: len(g) >= r_min)) for n in names}
    r_max = draw(st.one_of(st.integers(r_min, 8),
                           st.fixed_dictionaries({n: st.integers(r_min, 8) for n in names})))
    hi = {n: min(r_max[n] if isinstance(r_max, dict) else r_max, len(gains[n])) for n in names}
    kappa = {n: draw(st.integers(1, 9)) for n in names} if costs else None
    k = kappa or dict.fromkeys(names, 1)
    lo_b, hi_b = sum(k[n] * r_min for n in names), sum(k[n] * hi[n] for n in names)
    return gains, draw(st.integers(lo_b, hi_b)), r_min, r_max, hi, kappa


@given(gain_problems())
def test_allocate_by_gains_spends_budget_within_bounds(problem):
    gains, budget, r_min, r_max, hi, _ = problem
    r = allocate_by_gains(gains, budget, r_min, r_max)
    assert sum(r.values()) == budget and list(r) == list(gains)
    assert all(r_min <= r[n] <= hi[n] for n in gains)


@settings(max_examples=100)
@given(gain_problems(max_m=4))
def test_allocate_by_gains_is_optimal_for_nonincreasing_gains(problem):
    """Exhaustive: no rank vector with the same bounds and sum has a larger total gain."""
    gains, budget, r_min, r_max, hi, _ = problem
    names = list(gains)
    r = allocate_by_gains(gains, budget, r_min, r_max)

    def total(v):
        return sum(sum(gains[n][:k]) for n, k in zip(names, v))
    best = max(total(v) for v in itertools.product(*(range(r_min, hi[n] + 1) for n in names))
               if sum(v) == budget)
    assert total([r[n] for n in names]) == pytest.approx(best, abs=1e-9)


@given(gain_problems(costs=True))
def test_allocate_by_gains_with_costs_is_within_budget_and_maximal(problem):
    gains, budget, r_min, r_max, hi, kappa = problem
    r = allocate_by_gains(gains, budget, r_min, r_max, costs=kappa)
    spent = sum(kappa[n] * r[n] for n in gains)
    assert spent <= budget and all(r_min <= r[n] <= hi[n] for n in gains)
    assert all(r[n] == hi[n] or kappa[n] > budget - spent for n in gains)


def test_allocate_by_gains_textbook_example():
    """Gains q (3, 1), v (2, 0.5), budget 3, r ∈ [0, 2]: the global order is q1 3, v1 2, q2 1,
    v2 0.5, so q gets 2 and v 1. Per parameter, q (3, 2.9) at κ = 4 and v (2, 1.9) at κ = 1 with
    a budget of 8: by value per cost v1 2, v2 1.9, q1 0.75 (spending 6; q2 does not fit), so
    (1, 2) with gain 6.9, where the raw gains would buy q1, q2 for 5.9."""
    g = {"q": [3.0, 1.0], "v": [2.0, 0.5]}
    assert allocate_by_gains(g, 3, 0, 2) == {"q": 2, "v": 1}
    g = {"q": [3.0, 2.9], "v": [2.0, 1.9]}
    assert allocate_by_gains(g, 8, 0, 2, costs={"q": 4, "v": 1}) == {"q": 1, "v": 2}
    with pytest.raises(ValueError, match="has inf/NaN"):
        allocate_by_gains({"q": [1.0, math.nan]}, 1, 0, 2)
    with pytest.raises(ValueError, match=r"budget=5 outside .* = \[0, 4\]"):
        allocate_by_gains(g, 5, 0, 2)


def test_allocate_by_gains_with_costs_beats_the_greedy_order():
    """Issue 19's case: a [3] at κ 3, b [2] and c [2] at κ 2, budget 4. By gain per cost a
    (1.0) comes first and then nothing fits (gain 3); b + c spend 4 for gain 4."""
    g = {"a": [3.0], "b": [2.0], "c": [2.0]}
    assert allocate_by_gains(g, 4, 0, 1, costs={"a": 3, "b": 2, "c": 2}) == {"a": 0, "b": 1,
                                                                             "c": 1}


def test_allocate_by_gains_keeps_an_unreached_matrix_at_r_min():
    """An all-zero gain list (the loss never reaches the matrix) is not preferred to negative
    gains: a takes all 3 ranks (gain 1 − 1 − 2) and `dead` none; only where a is full does
    `dead` take what is left (the budget is spent)."""
    assert allocate_by_gains({"dead": [0.0] * 3, "a": [1.0, -1.0, -2.0]}, 3, 0, 3) == {
        "dead": 0, "a": 3}
    assert allocate_by_gains({"dead": [0.0] * 3, "a": [1.0]}, 3, 0, 3) == {"dead": 2, "a": 1}
    assert allocate_by_gains({"dead": [0.0] * 3, "a": [-1.0] * 3}, 4, 0, 3,
                             costs={"dead": 1, "a": 3}) == {"dead": 0, "a": 1}


@st.composite
def any_gain_problems(draw):
    """Unsorted gains, some matrices all-zero ("unreached"), costs 1..5 or none."""
    names = draw(st.lists(st.sampled_from("abcd"), min_size=1, max_size=4, unique=True))
    r_min = draw(st.integers(0, 1))
    gains = {n: draw(st.one_of(st.lists(st.integers(-4, 4).map(float), min_size=r_min,
                                        max_size=3),
                               st.integers(r_min, 3).map(lambda k: [0.0] * k)))
             for n in names}
    r_max = draw(st.integers(r_min, 3))
    hi = {n: min(r_max, len(gains[n])) for n in names}
    kappa = draw(st.one_of(st.none(), st.fixed_dictionaries({n: st.integers(1, 5)
                                                             for n in names})))
    k = kappa or dict.fromkeys(names, 1)
    lo_b = sum(k[n] * r_min for n in names)
    hi_b = sum(k[n] * hi[n] for n in names) + (3 if kappa else 0)
    return gains, draw(st.integers(lo_b, hi_b)), r_min, r_max, hi, kappa


@settings(max_examples=100)
@given(any_gain_problems())
def test_allocate_by_gains_matches_brute_force(problem):
    """Exhaustive reference over rank vectors: within budget, no reached matrix below its cap
    fitting in what is left, unreached matrices at r_min unless every reached one is at its
    cap (then also none of them below its cap fitting), and the largest total gain."""
    gains, budget, r_min, r_max, hi, kappa = problem
    names, k = list(gains), kappa or dict.fromkeys(gains, 1)
    reached = [n for n in names if any(gains[n])]

    def ok(v):
        left = budget - sum(k[n] * v[n] for n in names)
        full = all(v[n] == hi[n] for n in reached)
        return left >= 0 and all(v[n] == hi[n] or k[n] > left for n in names
                                 if n in reached or full) and (
            full or all(v[n] == r_min for n in names if n not in reached))

    def total(v):
        return sum(sum(gains[n][:v[n]]) for n in names)
    every = [dict(zip(names, v))
             for v in itertools.product(*(range(r_min, hi[n] + 1) for n in names))]
    r = allocate_by_gains(gains, budget, r_min, r_max, costs=kappa)
    assert ok(r)
    assert total(r) == max(total(v) for v in every if ok(v))




def test_score_adapt_allocates_on_train_add_adapters_model_and_records_it():
    """score_adapt(score) on a stand-in task: the model train.add_adapters adapts, scored on the
    first args.calib_batches batches of task.train_batches(rng["calib"]), gets the ranks and
    alphas of initialize_ranks on the same uniform model (A drawn from the init stream, which
    then draws the resized A), and `record` holds them (efim goes through fimlora)."""
    from types import SimpleNamespace
    args = SimpleNamespace(targets="query,value,classifier", r=3, alpha=4.0, dropout=0.0,
                           rslora=False, calib_batches=2, r_min=1, r_max=None, power=1.0)
    for score in ("efim", "kfac"):
        base = tf.Tiny().double()
        task = SimpleNamespace(model=base, heads=[], train_mode=True, loss_fn=tf.loss_fn,
                               n_train=None, train_batches=lambda g: iter(tf.make_batches(4)))
        uniform, g = copy.deepcopy(base), torch.Generator().manual_seed(1)
        add_lora(uniform, args.targets.split(","), r=3, alpha=4.0, generator=g)
        ref = initialize_ranks(uniform, tf.make_batches(2), tf.loss_fn, score, generator=g)
        record = {}
        rng = {"calib": torch.Generator().manual_seed(0),
               "init": torch.Generator().manual_seed(1)}
        model = score_adapt(score, record=record)(task, args, torch.device("cpu"), rng)
        assert record["ranks"] == ref["ranks"] and record["alphas"] == ref["alphas"]
        assert record["seconds"] >= 0 and len(set(ref["ranks"].values())) > 1
        assert {n: m.r for n, m in lora_layers(model).items()} == ref["ranks"]
        for name, layer in lora_layers(model).items():
            assert torch.equal(layer.lora_A, lora_layers(uniform)[name].lora_A)
