"""Properties of fimlora.allocate_ranks (FIM-LoRA budgeted rank allocation).

Oracles: an independent float bisection on the water level c for the continuous targets r*, and
exhaustive enumerations of integer rank vectors (M ≤ 4: the rounding; M ≤ 3 with costs: the
spend). Pure Python, runs in seconds:
    .venv/bin/python -m pytest tests/test_allocation.py -q
"""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fimlora
from fimlora import allocate_ranks


def _continuous_ranks(s, budget, r_min, r_max, costs=None, power=1.0) -> dict[str, Fraction]:
    """allocate_ranks' exact phase-1 targets r*_m by name."""
    hi = [r_max[n] if isinstance(r_max, dict) else r_max for n in s]
    kappa = [1 if costs is None else costs[n] for n in s]
    r_star, _ = fimlora._targets(list(s.values()), budget, r_min, hi, kappa, power)
    return dict(zip(s, r_star))

# --- named strategies ---------------------------------------------------------------------------
names = st.text("abcdefq.0", min_size=1, max_size=5)
# a few repeated values so that ties (and exact zeros) are common; calibrated scores are floored
# at 1e-10, and keeping s^p normal lets the float reference find its water level
scores = st.one_of(st.floats(1e-30, 1e6), st.sampled_from([0.0, 1.0, 2.0, 3.0, 0.5]))
score_dicts = st.dictionaries(names, scores, min_size=1, max_size=24)
powers = st.sampled_from([1.0, 1.0, 0.5, 2.0, 0.25, 0.0])
costs = st.integers(1, 40)


@st.composite
def problems(draw, max_size: int = 24, power: st.SearchStrategy = powers):
    """(scores, budget, r_min, r_max, power) with M·r_min ≤ budget ≤ M·r_max."""
    s = draw(st.dictionaries(names, scores, min_size=1, max_size=max_size))
    r_min = draw(st.integers(0, 8))
    r_max = draw(st.integers(r_min, r_min + 16))
    budget = draw(st.integers(len(s) * r_min, len(s) * r_max))
    return s, budget, r_min, r_max, draw(power)


@st.composite
def cost_problems(draw):
    """(scores, budget, r_min, r_max, costs, power), Σ κ·r_min ≤ budget (may exceed Σ κ·r_max)."""
    s, _, r_min, r_max, p = draw(problems(max_size=12))
    kappa = {n: draw(costs) for n in s}
    lo = sum(k * r_min for k in kappa.values())
    hi = sum(k * r_max for k in kappa.values())
    return s, draw(st.integers(lo, hi + 50)), r_min, r_max, kappa, p


# --- independent references ---------------------------------------------------------------------
def bisection_targets(s, budget, r_min, r_max, kappa=None, p=1.0) -> dict[str, float]:
    """Slow float reference for r*_m = clamp(c·s_m^p, r_min, r_max) with Σ κ_m·r*_m = budget.

    Bisection on c (f(c) = Σ κ·clamp(c·w) is nondecreasing). If all w are 0 they count as equal;
    if the w > 0 modules saturate at r_max before the budget is spent, the w = 0 modules share the
    rest equally. A budget above Σ κ·r_max puts everything at r_max.
    """
    kappa = kappa or dict.fromkeys(s, 1)
    w = {n: v**p for n, v in s.items()}
    if all(v == 0 for v in w.values()):
        w = dict.fromkeys(s, 1.0)
    pos = [n for n in s if w[n] > 0]
    full = sum(kappa[n] * r_max for n in pos) + sum(kappa[n] * r_min for n in s if w[n] == 0)
    if budget > full:
        zero = {n: 1.0 for n in s if w[n] == 0}
        rest = budget - sum(kappa[n] * r_max for n in pos)
        if not zero:
            return {n: float(r_max) for n in s}
        r0 = bisection_targets(zero, rest, r_min, r_max, kappa, 1.0)
        return {n: r0.get(n, float(r_max)) for n in s}

    def f(c):
        return sum(kappa[n] * min(max(c * w[n], r_min), r_max) for n in s)

    lo, hi = 0.0, 1.0
    while f(hi) < budget:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < budget else (lo, mid)
    return {n: min(max(hi * w[n], r_min), r_max) for n in s}


def kept_at_r_min(scores, budget, r_min, hi, kappa, power) -> set[str]:
    """The matrices of weight 0 (score 0: the loss never reaches them), which stay at r_min
    unless every other matrix sits at its cap hi (issue 19: with costs they used to take the
    leftover no other matrix fitted in)."""
    s_max = max(scores.values())
    zero = {n for n, v in scores.items() if s_max > 0 and (v / s_max) ** power == 0}
    rest = sum(kappa[n] * (r_min if n in zero else hi[n]) for n in scores)
    return zero if budget <= rest else set()


def brute_force(s, budget, r_min, r_max, r_star) -> dict[str, int]:
    """Exhaustive oracle (M ≤ 4): the integer vector in [r_min, r_max]^M with Σ r = budget that
    minimises Σ (r_m − r*_m)², ties broken lexicographically (largest first) in the order
    (higher score, then lower name).

    Why largest remainder is optimal here once r* is fixed: write r*_m = ⌊r*_m⌋ + f_m. If some
    r_m ≥ ⌊r*_m⌋ + 2 (or ≤ ⌊r*_m⌋ − 1) then, as Σ r = Σ r*, some r_j < r*_j (or > r*_j) and moving
    one unit between m and j lowers the sum of squares, so every optimum has r_m ∈ {⌊r*_m⌋,
    ⌊r*_m⌋ + 1} (both inside [r_min, r_max] since r_min ≤ r*_m ≤ r_max). Then
    Σ (r_m − r*_m)² = Σ f_m² + Σ_{m raised} (1 − 2 f_m), which is smallest when the k = R − Σ ⌊r*⌋
    raised modules have the k largest f_m. The same choice also minimises max |r_m − r*_m|:
    swapping a raised f_i for an unraised f_j ≤ f_i gives deviations 1 − f_j ≥ 1 − f_i, f_i ≥ f_j.
    """
    order = sorted(s, key=lambda n: (-s[n], n))
    best_key, best = None, None
    for r in itertools.product(range(r_min, r_max + 1), repeat=len(order)):
        if sum(r) != budget:
            continue
        key = (sum((ri - r_star[n]) ** 2 for ri, n in zip(r, order)), tuple(-ri for ri in r))
        if best_key is None or key < best_key:
            best_key, best = key, dict(zip(order, r))
    return best


def assert_monotone(s, r, among=None):
    for i, j in itertools.permutations(s, 2):
        if s[i] > s[j] and (among is None or among[i] == among[j]):
            assert r[i] >= r[j], (i, j, s[i], s[j], r[i], r[j])


# --- invariants without costs -------------------------------------------------------------------
@given(problems())
def test_allocate_ranks_sums_to_budget_within_bounds(problem):
    s, budget, r_min, r_max, p = problem
    r = allocate_ranks(s, budget, r_min, r_max, power=p)
    assert list(r) == list(s)
    assert all(isinstance(v, int) for v in r.values())
    assert sum(r.values()) == budget
    assert all(r_min <= v <= r_max for v in r.values())


@given(problems())
def test_allocate_ranks_is_monotone_in_score(problem):
    s, budget, r_min, r_max, p = problem
    assert_monotone(s, allocate_ranks(s, budget, r_min, r_max, power=p))


@given(problems(), st.randoms(use_true_random=False))
def test_allocate_ranks_is_permutation_equivariant(problem, rng):
    s, budget, r_min, r_max, p = problem
    assume(len(set(s.values())) == len(s))  # with ties the name decides, so names matter
    items = list(s.items())
    rng.shuffle(items)
    relabel = {n: f"m{i}" for i, n in enumerate(rng.sample(list(s), len(s)))}
    r = allocate_ranks(s, budget, r_min, r_max, power=p)
    r2 = allocate_ranks({relabel[n]: v for n, v in items}, budget, r_min, r_max, power=p)
    assert {relabel[n]: v for n, v in r.items()} == r2


@given(problems(), st.integers(-30, 30))
def test_allocate_ranks_is_invariant_to_scaling_scores(problem, k):
    s, budget, r_min, r_max, p = problem
    scaled = {n: v * 2.0**k for n, v in s.items()}
    assert allocate_ranks(scaled, budget, r_min, r_max, power=p) == allocate_ranks(
        s, budget, r_min, r_max, power=p
    )


@given(st.integers(1, 24), scores, st.integers(0, 8), st.integers(0, 16), st.data())
def test_allocate_ranks_gives_equal_scores_ranks_at_most_one_apart(m, v, r_min, extra, data):
    r_max = r_min + extra
    budget = data.draw(st.integers(m * r_min, m * r_max))
    r = allocate_ranks({f"m{i}": v for i in range(m)}, budget, r_min, r_max)
    assert max(r.values()) - min(r.values()) <= 1


@given(problems())
def test_allocate_ranks_is_within_one_of_bisection_reference(problem):
    s, budget, r_min, r_max, p = problem
    r = allocate_ranks(s, budget, r_min, r_max, power=p)
    ref = bisection_targets(s, budget, r_min, r_max, p=p)
    assert all(abs(r[n] - ref[n]) < 1 + 1e-6 for n in s), (r, ref)


@given(problems())
def test_continuous_ranks_match_bisection_reference(problem):
    s, budget, r_min, r_max, p = problem
    r_star = _continuous_ranks(s, budget, r_min, r_max, power=p)
    assert sum(r_star.values()) == budget  # exact rational arithmetic
    ref = bisection_targets(s, budget, r_min, r_max, p=p)
    assert all(abs(float(r_star[n]) - ref[n]) < 1e-6 for n in s), (r_star, ref)


@settings(max_examples=150)
@given(problems(max_size=4, power=st.just(1.0)))
def test_allocate_ranks_matches_brute_force_for_small_m(problem):
    s, budget, r_min, r_max, _ = problem
    assume((r_max - r_min + 1) ** len(s) <= 20_000)
    r_star = _continuous_ranks(s, budget, r_min, r_max)
    r = allocate_ranks(s, budget, r_min, r_max)
    assert r == brute_force(s, budget, r_min, r_max, r_star)
    # and it also minimises the largest deviation among all feasible integer vectors
    best = min(
        max(abs(ri - r_star[n]) for ri, n in zip(v, s))
        for v in itertools.product(range(r_min, r_max + 1), repeat=len(s))
        if sum(v) == budget
    )
    assert max(abs(r[n] - r_star[n]) for n in s) == best


def test_allocate_ranks_textbook_example():
    """s = (1, 4), R = 6, r ∈ [0, 10]: r* = 6·(1, 4)/5 = (1.2, 4.8) → (1, 5) by largest remainder.
    With p = ½ the weights are (1, 2), r* = (2, 4) exactly. With r_max = 4 the clamp binds:
    v is fixed at 4 and q gets the remaining 2. Both tie at s = 0: r* = (3, 3) → (3, 3)."""
    s = {"q": 1.0, "v": 4.0}
    assert allocate_ranks(s, 6, 0, 10) == {"q": 1, "v": 5}
    assert allocate_ranks(s, 6, 0, 10, power=0.5) == {"q": 2, "v": 4}
    assert allocate_ranks(s, 6, 0, 4) == {"q": 2, "v": 4}
    assert allocate_ranks({"q": 0.0, "v": 0.0}, 6, 0, 10) == {"q": 3, "v": 3}


def test_allocate_ranks_breaks_ties_by_score_then_name():
    """Equal scores: r* = (1.5, 1.5, 1.5, 1.5), two units left, the lower names "a", "b" win.
    s = (1, 3), R = 2, r ∈ [0, 10]: r* = (0.5, 1.5), the remainders tie at ½ and the unit goes
    to the higher score "b" although "a" < "b". s = (0, 0, 1), R = 7, r ∈ [1, 3]: "c" saturates
    at 3, the zero scores share the rest, r* = (2, 2, 3) exactly."""
    assert allocate_ranks(dict.fromkeys("dcba", 1.0), 6, 1, 2) == {"d": 1, "c": 1, "b": 2, "a": 2}
    assert allocate_ranks({"a": 1.0, "b": 3.0}, 2, 0, 10) == {"a": 0, "b": 2}
    assert allocate_ranks({"a": 0.0, "b": 0.0, "c": 1.0}, 7, 1, 3) == {"a": 2, "b": 2, "c": 3}


@given(st.dictionaries(names, scores, min_size=2, max_size=24), st.data())
def test_allocate_ranks_power_zero_is_uniform(s, data):
    budget = data.draw(st.integers(0, 16 * len(s)))
    r = allocate_ranks(s, budget, 0, 16, power=0.0)
    assert max(r.values()) - min(r.values()) <= 1


@given(st.dictionaries(names, st.integers(0, 1000), min_size=1, max_size=24), st.data())
def test_allocate_ranks_power_acts_on_scores(s, data):
    """ranks ∝ s^p: squaring the scores at p = ½ is proportional allocation, up to rounding."""
    budget = data.draw(st.integers(0, 32 * len(s)))
    r = allocate_ranks({n: float(v * v) for n, v in s.items()}, budget, 0, 32, power=0.5)
    ref = bisection_targets({n: float(v) for n, v in s.items()}, budget, 0, 32)
    assert all(abs(r[n] - ref[n]) < 1 + 1e-6 for n in s)


# --- with parameter costs -----------------------------------------------------------------------
@given(cost_problems())
def test_allocate_ranks_with_costs_is_within_budget_and_maximal(problem):
    s, budget, r_min, r_max, kappa, p = problem
    r = allocate_ranks(s, budget, r_min, r_max, costs=kappa, power=p)
    spent = sum(kappa[n] * r[n] for n in s)
    assert spent <= budget
    assert all(r_min <= r[n] <= r_max for n in s)
    idle = kept_at_r_min(s, budget, r_min, dict.fromkeys(s, r_max), kappa, p)
    assert all(r[n] == r_min for n in idle)
    assert all(r[n] == r_max or kappa[n] > budget - spent for n in s if n not in idle)
    ref = bisection_targets(s, budget, r_min, r_max, kappa, p)
    assert all(r[n] > ref[n] - 1 - 1e-6 for n in s)  # never below ⌊r*⌋
    assert_monotone(s, r, among=kappa)  # the leftover goes to cheap matrices, so per cost only


@given(problems(), st.integers(1, 5000))
def test_allocate_ranks_with_equal_costs_matches_rank_budget(problem, k):
    s, budget, r_min, r_max, p = problem
    r = allocate_ranks(s, k * budget, r_min, r_max, costs=dict.fromkeys(s, k), power=p)
    assert r == allocate_ranks(s, budget, r_min, r_max, power=p)


def test_allocate_ranks_with_costs_textbook_example():
    """s = (1, 2), κ = (3, 7), budget 20, r ∈ [0, 10]: 3c + 14c = 20 → r* = (20/17, 40/17) ≈
    (1.18, 2.35); floors (1, 2) cost 17, 3 left. v is furthest below its target but costs 7 > 3,
    so q gets the unit: (2, 2), spending 20. With budget 1000 both saturate at r_max = 10."""
    s, kappa = {"q": 1.0, "v": 2.0}, {"q": 3, "v": 7}
    assert allocate_ranks(s, 20, 0, 10, costs=kappa) == {"q": 2, "v": 2}
    assert allocate_ranks(s, 1000, 0, 10, costs=kappa) == {"q": 10, "v": 10}


@st.composite
def small_cost_problems(draw):
    """cost_problems small enough to enumerate every rank vector: M ≤ 3, r_max − r_min ≤ 4."""
    s = draw(st.dictionaries(names, scores, min_size=2, max_size=3))
    r_min = draw(st.integers(0, 2))
    r_max = draw(st.integers(r_min, r_min + 4))
    kappa = {n: draw(st.sampled_from([1, 2, 3, 4, 7, 12])) for n in s}  # cheap next to dear
    lo, hi = (sum(k * r for k in kappa.values()) for r in (r_min, r_max))
    return s, draw(st.integers(lo, hi + 12)), r_min, r_max, kappa, draw(powers)


@given(small_cost_problems())
def test_allocate_ranks_with_costs_falls_short_of_the_best_spend_by_under_one_rank(problem):
    """What allocate_ranks guarantees with costs, against brute force over every rank vector in
    [r_min, r_max]^M within the budget: its spend is at most the best one, and short of it by
    less than the cost of one rank of the cheapest matrix still below r_max (nothing if none);
    score-0 matrices kept at r_min (kept_at_r_min) are left out of both."""
    s, budget, r_min, r_max, kappa, p = problem
    r = allocate_ranks(s, budget, r_min, r_max, costs=kappa, power=p)
    spent = sum(kappa[n] * r[n] for n in s)
    idle = kept_at_r_min(s, budget, r_min, dict.fromkeys(s, r_max), kappa, p)  # score 0
    best = max(sum(kappa[n] * v for n, v in zip(s, vec))
               for vec in itertools.product(*([r_min] if n in idle else range(r_min, r_max + 1)
                                              for n in s))
               if sum(kappa[n] * v for n, v in zip(s, vec)) <= budget)
    open_costs = [kappa[n] for n in s if r[n] < r_max and n not in idle]
    assert spent <= best and best - spent < min(open_costs, default=1)


def test_allocate_ranks_with_costs_keeps_a_score_0_matrix_at_r_min():
    """Issue 19: s = (1, 1, 0) at κ = (3, 3, 1), r ∈ [1, 10], budget 15. r* = (7/3, 7/3, 1);
    floors (2, 2, 1) cost 13 and the 2 left fit no rank of a or b. z (the loss never reaches
    it) used to take both (r_z = 3 above r_a = 2); it stays at r_min and 2 are left unspent.
    With a budget beyond what a and b can hold (budget 65: both at 10 cost 60), z takes the
    rest."""
    s, k = {"a": 1.0, "b": 1.0, "z": 0.0}, {"a": 3, "b": 3, "z": 1}
    assert allocate_ranks(s, 15, 1, 10, costs=k) == {"a": 2, "b": 2, "z": 1}
    assert allocate_ranks(s, 65, 1, 10, costs=k) == {"a": 10, "b": 10, "z": 5}


def test_allocate_ranks_with_costs_need_not_spend_the_most():
    """The issue's case: κ = (3, 3, 4), s = (1.5, 1.5, 1.75), budget 16, r ∈ [0, 10]. r* = (1.5,
    1.5, 1.75); floors (1, 1, 1) cost 10; c has the largest remainder and takes 4, leaving 2 < 3.
    14 is spent although (2, 2, 1) spends 16: the rounding follows the targets, not the spend."""
    s, kappa = {"a": 1.5, "b": 1.5, "c": 1.75}, {"a": 3, "b": 3, "c": 4}
    assert allocate_ranks(s, 16, 0, 10, costs=kappa) == {"a": 1, "b": 1, "c": 2}


# --- per-matrix caps and exact ties -----------------------------------------------------------
# nice fractions of one another, so exact ties between different scores (r*_m − ⌊r*_m⌋ equal) and
# r* landing on integers are common; tiny and huge scores push s^p to the edges of float64
tie_scores = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 6.0, 0.1, 0.3, 0.7]),
                       st.floats(1e-300, 1e300), st.integers(0, 12).map(float))
any_powers = st.one_of(powers, st.floats(0.0, 4.0))


@st.composite
def capped_problems(draw, max_size: int = 24, with_costs: bool = False):
    """(scores, budget, r_min, r_max int or per-matrix dict, costs or None, power), feasible."""
    s = draw(st.dictionaries(names, st.one_of(scores, tie_scores), min_size=1,
                             max_size=max_size))
    r_min = draw(st.integers(0, 4))
    if draw(st.booleans()):
        r_max = draw(st.integers(r_min, r_min + 16))
        hi = dict.fromkeys(s, r_max)
    else:
        r_max = hi = {n: draw(st.integers(r_min, r_min + 16)) for n in s}
    kappa = {n: draw(costs) for n in s} if with_costs else dict.fromkeys(s, 1)
    lo_cost = sum(kappa[n] * r_min for n in s)
    hi_cost = sum(kappa[n] * hi[n] for n in s)
    budget = draw(st.integers(lo_cost, hi_cost + (50 if with_costs else 0)))
    return s, budget, r_min, r_max, kappa if with_costs else None, draw(any_powers)


def test_allocate_ranks_float_rounding_case():
    """A case float arithmetic gets wrong: s = (0.7, 0.1, 1, 0.1, 7, 0.2), R = 11, r ∈ [0, 4].
    r* = (2.33…, 0.33…, 3.33…, 0.33…, 4, 0.66…): the remainders of "m1" and "m2" are both ⅓ up
    to float rounding of s/7, and exactly "m1"'s is larger (by 2e-17), which float products of
    c·w invert. The unit goes to "m1"."""
    s = {"m0": 0.7, "m1": 0.1, "m2": 1.0, "m3": 0.1, "m4": 7.0, "m5": 0.2}
    r_star = _continuous_ranks(s, 11, 0, 4)
    assert r_star["m1"] - 0 > r_star["m2"] - 3 > r_star["m3"] - 1 + Fraction(1, 2)
    assert allocate_ranks(s, 11, 0, 4) == {"m0": 2, "m1": 1, "m2": 3, "m3": 0, "m4": 4, "m5": 1}

@given(capped_problems())
def test_allocate_ranks_respects_per_matrix_caps_and_budget(problem):
    s, budget, r_min, r_max, _, p = problem
    r = allocate_ranks(s, budget, r_min, r_max, power=p)
    hi = r_max if isinstance(r_max, dict) else dict.fromkeys(s, r_max)
    assert sum(r.values()) == budget
    assert all(r_min <= r[n] <= hi[n] for n in s)
    # the surplus of a capped matrix goes elsewhere: a matrix below its cap never has a lower
    # score than one that got more ranks
    assert all(r[i] >= r[j] or r[i] == hi[i] for i, j in itertools.permutations(s, 2)
               if s[i] > s[j])


@given(capped_problems(), st.integers(1, 30))
def test_allocate_ranks_rejects_budget_above_sum_of_caps(problem, extra):
    s, _, r_min, r_max, _, _ = problem
    hi = r_max if isinstance(r_max, dict) else dict.fromkeys(s, r_max)
    with pytest.raises(ValueError, match=f"budget={sum(hi.values()) + extra} > .*raise r_max"):
        allocate_ranks(s, sum(hi.values()) + extra, r_min, r_max)


def test_allocate_ranks_caps_textbook_example():
    """s = (1, 4, 4), R = 12, r ∈ [0, 10] but v capped at 3: v = 3, and the 9 left split 1:4
    between q and o as if v were absent, r* = (1.8, 3, 7.2) → (2, 3, 7). An int r_max equals the
    dict with that value everywhere. Caps below r_min or a budget above Σ caps name the fix."""
    s = {"q": 1.0, "v": 4.0, "o": 4.0}
    assert allocate_ranks(s, 12, 0, {"q": 10, "v": 3, "o": 10}) == {"q": 2, "v": 3, "o": 7}
    assert allocate_ranks(s, 12, 0, dict.fromkeys(s, 10)) == allocate_ranks(s, 12, 0, 10)
    with pytest.raises(ValueError, match=r"budget=14 > Σ_m r_max\[m\]=13: lower the budget or "):
        allocate_ranks(s, 14, 0, {"q": 1, "v": 2, "o": 10})
    with pytest.raises(ValueError, match=r"\['v'\] is not an int ≥ r_min=2: lower r_min"):
        allocate_ranks(s, 12, 2, {"q": 4, "v": 1, "o": 10})
    with pytest.raises(ValueError, match="different modules"):
        allocate_ranks(s, 12, 0, {"q": 4})


# --- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scores={"q": math.nan}), r"scores\['q'\]=nan"),
        (dict(scores={"q": math.inf}), r"scores\['q'\]=inf"),
        (dict(scores={"q": -1.0}), r"scores\['q'\]=-1.0"),
        (dict(scores={}), "empty"),
        (dict(r_min=5, r_max=4), "r_max=4 is not an int ≥ r_min=5"),
        (dict(r_min=-1), "r_min=-1 < 0"),
        (dict(budget=8.0), "budget=8.0"),
        (dict(budget=True), "budget=True is a bool, not an int: pass int"),
        (dict(budget=torch.tensor(16)), r"budget=tensor\(16\) is a Tensor, not an int"),
        (dict(scores={"q": torch.tensor(1.0)}), r"scores\['q'\]=tensor\(1.\) is a Tensor: "
                                                 r"pass float\(v\)"),
        (dict(scores={"q": True}), r"scores\['q'\]=True is a bool"),
        (dict(budget=7), r"budget=7 < M·r_min=8: raise the budget or lower r_min"),
        (dict(budget=33), r"budget=33 > M·r_max=32"),
        (dict(costs={"q": 0, "v": 1}), r"costs\['q'\]=0"),
        (dict(costs={"q": 1.5, "v": 1}), r"costs\['q'\]=1.5"),
        (dict(costs={"q": 1}), "different modules"),
        (dict(costs={"q": 3, "v": 2}, budget=19), r"budget=19 < Σ cost_m·r_min=20"),
        (dict(power=-1.0), "power=-1.0"),
        (dict(power=math.nan), "power=nan"),
    ],
)
def test_allocate_ranks_rejects_bad_input(kwargs, match):
    args = dict(scores={"q": 1.0, "v": 2.0}, budget=16, r_min=4, r_max=16) | kwargs
    with pytest.raises(ValueError, match=match):
        allocate_ranks(**args)


@given(problems())
def test_allocate_ranks_rejects_infeasible_budget(problem):
    s, _, r_min, r_max, _ = problem
    M = len(s)
    if r_min > 0:
        with pytest.raises(ValueError, match="raise the budget or lower r_min"):
            allocate_ranks(s, M * r_min - 1, r_min, r_max)
    with pytest.raises(ValueError, match="lower the budget or raise r_max"):
        allocate_ranks(s, M * r_max + 1, r_min, r_max)


# --- regression: the public harness's allocation bugs (methods.md B.3) --------------------------
def lognormal_scores(seed: int = 0, M: int = 24, sigma: float = 1.5) -> dict[str, float]:
    rng = random.Random(seed)
    return {f"layer{i // 3}.{'qkv'[i % 3]}": rng.lognormvariate(0.0, sigma) for i in range(M)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allocate_ranks_fixes_harness_budget_and_inversion_bugs(seed):
    """The harness (B.3) overshoots with r_min = 8 (256 for a budget of 192 at r = 8, every module
    at 8 = twice the budget at r = 4) and inverts ranks when r_min > r_max (r = 2)."""
    s = lognormal_scores(seed)
    for r, r_min in [(8, 1), (8, 8), (16, 8)]:
        ranks = allocate_ranks(s, r * len(s), r_min, 2 * r)
        assert sum(ranks.values()) == r * len(s)
        assert all(r_min <= v <= 2 * r for v in ranks.values())
        assert_monotone(s, ranks)
    assert allocate_ranks(s, 192, 8, 16) == dict.fromkeys(s, 8)  # exactly 192, not 256
    with pytest.raises(ValueError, match="budget=96 < M·r_min=192"):
        allocate_ranks(s, 4 * len(s), 8, 8)  # r = 4, r_min = 8 (r_max = 2r = 8)
    with pytest.raises(ValueError, match="r_max=4 is not an int ≥ r_min=8"):
        allocate_ranks(s, 2 * len(s), 8, 4)  # r = 2: reject instead of inverting the ranks
