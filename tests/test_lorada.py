"""LoRA-DA (arXiv:2510.24561) against explicit float64 oracles.

Closed form (lorada_factors): Ky Fan optimality of V checked against eigvalsh and random
orthonormal V; B A = N̂VVᵀ/γ; β = 0 gives the truncated SVD of N̂ (Eckart–Young); N from the
Cholesky solve equals −diag(y⁻¹) G inv(Z) with an explicit inverse; damping retry on a non-PD Z.
Statistics (lorada_statistics / lorada_init) on a tiny model with q/k/v reading one tensor:
G equals the mean of per-example W.grad, Z the masked token mean of x xᵀ captured by plain
hooks, y the masked token mean of δ² from an additive zero probe; model state is restored.

Run: .venv/bin/python -m pytest tests/test_lorada.py -q
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import probe_outputs
from fimlora import lorada_factors, lorada_init, lorada_statistics
from lora import add_lora, lora_layers, merge_lora

D_IN, D_OUT, R = 12, 9, 3
DAMP = 1e-6


def explicit(G, Z, y, lam=DAMP, alpha=1.0, beta=0.0, n_pop=1, lam_y=DAMP):
    """Slow reference in float64 with an explicit inverse: N, σ, N̂ = N/σ and Ω (methods.md A.3)."""
    Zi = torch.linalg.inv((Z + Z.T) / 2 + lam * torch.eye(Z.shape[0], dtype=Z.dtype))
    y_inv = 1 / (y + lam_y)
    N = -torch.diag(y_inv) @ G @ Zi
    sigma = torch.linalg.svdvals(N)[0]
    N_hat = N / sigma
    c = y_inv.sum() / n_pop / sigma**2
    Omega = -alpha * N_hat.T @ N_hat + beta * c * Zi
    return N, sigma, N_hat, (Omega + Omega.T) / 2


@pytest.fixture
def problem():
    """Random G, SPD Z (condition ~100) and positive y, float64."""
    g = torch.Generator().manual_seed(1)
    G = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    M = torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64)
    Z = M @ M.T / D_IN + 0.05 * torch.eye(D_IN, dtype=torch.float64)
    y = torch.rand(D_OUT, generator=g, dtype=torch.float64) + 0.1
    return G, Z, y


def test_lorada_subspace_minimises_ky_fan_objective(problem):
    """V = √γ·Aᵀ has orthonormal columns and tr(VᵀΩV) equals the sum of the r smallest
    eigenvalues of Ω, below 1000 random orthonormal V. β is chosen so that the bias and the
    variance terms of Ω have comparable norms (both shape V)."""
    G, Z, y = problem
    gamma, n_pop = 16.0, 10
    _, _, _, Om_bias = explicit(G, Z, y, n_pop=n_pop)
    _, _, _, Om_var = explicit(G, Z, y, alpha=0.0, beta=1.0, n_pop=n_pop)
    beta = (Om_bias.norm() / Om_var.norm()).item()
    _, _, _, Omega = explicit(G, Z, y, beta=beta, n_pop=n_pop)
    A, B, info = lorada_factors(G, Z, y, R, da_alpha=1.0, da_beta=beta, da_gamma=gamma,
                                n_pop=n_pop)
    V = A.T * math.sqrt(gamma)
    torch.testing.assert_close(V.T @ V, torch.eye(R, dtype=V.dtype))
    best = torch.linalg.eigvalsh(Omega)[:R]
    got = torch.trace(V.T @ Omega @ V)
    torch.testing.assert_close(got, best.sum())
    torch.testing.assert_close(torch.tensor(info["eigenvalues"], dtype=best.dtype), best)
    Q, _ = torch.linalg.qr(torch.randn(1000, D_IN, R, dtype=torch.float64))
    random_traces = torch.einsum("bir,ij,bjr->b", Q, Omega, Q)
    assert (random_traces >= got - 1e-10).all()
    # the optimum must differ from both pure terms, or β would not be exercised
    for Om in (Om_bias, Om_var):
        V0 = torch.linalg.eigh(Om).eigenvectors[:, :R]
        assert torch.trace(V0.T @ Omega @ V0) > got + 1e-6


def test_lorada_product_is_projected_natural_step(problem):
    """B A = N̂ V Vᵀ / γ with V = √γ·Aᵀ, and each column of V has a positive largest entry."""
    G, Z, y = problem
    gamma = 1024.0
    A, B, _ = lorada_factors(G, Z, y, R, da_beta=0.03, da_gamma=gamma, n_pop=100)
    _, _, N_hat, _ = explicit(G, Z, y, beta=0.03, n_pop=100)
    V = A.T * math.sqrt(gamma)
    torch.testing.assert_close(B @ A, N_hat @ V @ V.T / gamma)
    torch.testing.assert_close(B, N_hat @ V / math.sqrt(gamma))
    pivots = V.abs().argmax(dim=0)
    assert (V[pivots, torch.arange(R)] > 0).all()


def test_lorada_beta_zero_is_truncated_svd(problem):
    """β = 0: Ω = −N̂ᵀN̂, so V spans the top-r right singular vectors and γ·B A is the best
    rank-r approximation of N̂ (Eckart–Young), i.e. U_r S_r V_rᵀ."""
    G, Z, y = problem
    gamma = 4.0
    A, B, _ = lorada_factors(G, Z, y, R, da_beta=0.0, da_gamma=gamma)
    _, _, N_hat, _ = explicit(G, Z, y)
    U, S, Vh = torch.linalg.svd(N_hat, full_matrices=False)
    torch.testing.assert_close(gamma * B @ A, U[:, :R] @ torch.diag(S[:R]) @ Vh[:R])
    assert S[0].item() == pytest.approx(1.0)  # N̂ is normalised to spectral norm 1


def test_lorada_natural_step_matches_explicit_inverse(problem):
    """With r = d_in, V Vᵀ = I, so σ·γ·B A = N = −diag(1/(y+λ)) G inv((Z+Zᵀ)/2 + λI)."""
    G, Z, y = problem
    gamma = 9.0
    A, B, info = lorada_factors(G, Z, y, D_IN, da_beta=0.03, da_gamma=gamma, n_pop=7)
    N, sigma, _, _ = explicit(G, Z, y, n_pop=7)
    assert info["sigma"] == pytest.approx(sigma.item(), rel=1e-10)
    torch.testing.assert_close(info["sigma"] * gamma * B @ A, N)
    assert info["cholesky_retries"] == 0 and info["damping"] == DAMP


def test_lorada_non_pd_z_retries_damping(problem):
    """Z with eigenvalue −3e-4: λ = 1e-6 … 1e-4 fail, λ = 1e-3 (3 retries) succeeds;
    the result equals the explicit oracle at the λ used on Z (y keeps λ = 1e-6)."""
    G, _, y = problem
    Q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, dtype=torch.float64))
    Z = Q @ torch.diag(torch.linspace(-3e-4, 1.0, D_IN, dtype=torch.float64)) @ Q.T
    A, B, info = lorada_factors(G, Z, y, R, da_beta=0.0, da_gamma=1.0)
    assert info["cholesky_retries"] == 3 and info["damping"] == pytest.approx(1e-3)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    _, _, N_hat, _ = explicit(G, Z, y, lam=info["damping"])
    U, S, Vh = torch.linalg.svd(N_hat, full_matrices=False)
    torch.testing.assert_close(B @ A, U[:, :R] @ torch.diag(S[:R]) @ Vh[:R])


def test_lorada_factors_use_symmetric_part_of_z(problem):
    """Only (Z+Zᵀ)/2 enters: adding a skew-symmetric part changes nothing (a bare Cholesky
    would read the lower triangle only)."""
    G, Z, y = problem
    S = torch.randn(D_IN, D_IN, dtype=torch.float64)
    A, B, _ = lorada_factors(G, Z, y, R, n_pop=10)
    A2, B2, _ = lorada_factors(G, Z + (S - S.T), y, R, n_pop=10)
    torch.testing.assert_close(B2 @ A2, B @ A)


def test_lorada_factors_reject_bad_input(problem):
    G, Z, y = problem
    with pytest.raises(ValueError, match="d_in"):
        lorada_factors(G, Z, y, D_IN + 1)
    with pytest.raises(ValueError, match="G is zero"):
        lorada_factors(torch.zeros_like(G), Z, y, R)
    with pytest.raises(ValueError, match="positive definite"):
        lorada_factors(G, torch.full_like(Z, float("nan")), y, R)


def test_lorada_factors_float32_close_to_float64(problem):
    """The float32 path (what lorada_init uses for fp32/bf16 weights) agrees with float64."""
    G, Z, y = problem
    A64, B64, _ = lorada_factors(G, Z, y, R, da_gamma=1.0, n_pop=100)
    A32, B32, _ = lorada_factors(G.float(), Z.float(), y.float(), R, da_gamma=1.0, n_pop=100)
    assert A32.dtype == torch.float32
    torch.testing.assert_close(B32 @ A32, (B64 @ A64).float(), atol=1e-4, rtol=1e-3)


# -----------------------------------------------------------------------------
# statistics on a tiny model


class Tiny(nn.Module):
    """Embedding -> query/key/value (one input tensor) -> masked attention -> out (same shape,
    other tensor) -> fc with an in-place ReLU -> dead (output × 0) -> masked mean pool ->
    pool (a (B, h) input, where the (B, T) mask does not apply) -> cls head. Dropout is active
    in train mode, so statistics taken in train mode would differ."""

    def __init__(self, vocab=13, d=6, h=8, n_cls=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.fc, self.dead, self.pool = nn.Linear(d, h), nn.Linear(d, 4), nn.Linear(h, h)
        self.cls = nn.Linear(h, n_cls)
        self.drop = nn.Dropout(0.3)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.bool()  # (B, T)
        x = self.emb(input_ids)  # (B, T, d)
        q, k, v = self.query(x), self.key(x), self.value(x)
        att = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])  # (B, T, T)
        att = att.masked_fill(~m[:, None, :], float("-inf")).softmax(-1)
        x = x + self.out(self.drop(att @ v))
        f = self.fc(x).relu_()  # (B, T, h); δ must be taken before the in-place ReLU
        f = f + 0.0 * self.dead(x).sum(-1, keepdim=True)
        pooled = (f * m[..., None]).sum(1) / m.sum(1, keepdim=True)  # (B, h)
        return self.cls(torch.tanh(self.pool(self.drop(pooled))))


TARGETS = ["query", "key", "value", "out", "fc", "dead", "pool"]


def loss_fn(model, batch):
    return F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])


def make_model():
    model = Tiny().double()
    add_lora(model, targets=TARGETS, r=3, alpha=6.0, dropout=0.1, heads=["cls"])
    return model


def make_batches(sizes=(3, 2, 4), T=5):
    g = torch.Generator().manual_seed(2)
    batches = []
    for B in sizes:
        lengths = torch.randint(2, T + 1, (B,), generator=g)
        batches.append({"input_ids": torch.randint(13, (B, T), generator=g),
                        "attention_mask": (torch.arange(T)[None] < lengths[:, None]).long(),
                        "labels": torch.randint(3, (B,), generator=g)})
    return batches


def examples(batches, n):
    out = [{k: v[i:i + 1] for k, v in b.items()} for b in batches for i in range(len(b["labels"]))]
    return out[:n]


def oracle_statistics(model, batches, n):
    """Per example, in eval mode: W.grad of the example loss (G), the module inputs captured by
    a plain forward hook (Z), and δ = grad of an additive zero probe on the output (y)."""
    model = copy.deepcopy(model).eval()
    layers = lora_layers(model)
    G = {k: 0 for k in layers}
    xx, dd, tok = ({k: 0 for k in layers} for _ in range(3))
    for ex in examples(batches, n):
        seen = {}
        handles = probe_outputs(layers, seen)
        for m in layers.values():
            m.weight.requires_grad_(True)
            m.weight.grad = None
        loss = loss_fn(model, ex)
        probes = [seen[k][1] for k in layers]
        deltas = torch.autograd.grad(loss, probes, retain_graph=True)
        loss.backward()
        for h in handles:
            h.remove()
        mask = ex["attention_mask"].bool()
        for (k, m), d in zip(layers.items(), deltas):
            G[k] = G[k] + m.weight.grad
            x = seen[k][0]
            if x.shape[:-1] == mask.shape:
                x, d = x[mask], d[mask]
            xx[k] = xx[k] + x.T @ x
            dd[k] = dd[k] + (d * d).sum(0)
            tok[k] += x.shape[0]
    n_ex = len(examples(batches, n))
    return {k: {"G": G[k] / n_ex, "Z": xx[k] / tok[k], "y_diag": dd[k] / tok[k]} for k in layers}


def test_lorada_statistics_match_per_example_oracle():
    """G, Z, y from hooks equal the per-example oracle, over 7 of 9 examples from three
    batches of sizes 3, 2, 4 (padding masked; the last batch cut to 2 examples).
    query/key/value share one Z tensor, fc/dead another; out reads a different tensor of the
    same shape and must not share it."""
    model, batches = make_model(), make_batches()
    stats, n = lorada_statistics(model, batches, loss_fn, n_samples=7)
    ref = oracle_statistics(model, batches, 7)
    assert n == 7
    for k in TARGETS:
        for s in ("G", "Z", "y_diag"):
            torch.testing.assert_close(stats[k][s], ref[k][s], msg=f"{k}.{s}")
    assert stats["key"]["Z"] is stats["query"]["Z"] and stats["value"]["Z"] is stats["query"]["Z"]
    assert {k: s["z_owner"] for k, s in stats.items()} == {**{k: k for k in TARGETS},
                                                          "key": "query", "value": "query",
                                                          "dead": "fc"}
    assert stats["fc"]["y_diag"].gt(0).all()  # the in-place ReLU did not hide δ
    assert not stats["dead"]["G"].any()
    # padding is excluded from Z: T counts valid tokens only
    valid = sum(int(e["attention_mask"].sum()) for e in examples(batches, 7))
    assert stats["query"]["tokens"] == valid and stats["pool"]["tokens"] == 7


class Twin(nn.Module):
    """a and b read the same tensor when batch["share"] is True, a copy of it otherwise."""

    def __init__(self, d=5):
        super().__init__()
        self.a, self.b = nn.Linear(d, 3), nn.Linear(d, 4)

    def forward(self, x, share):
        return self.a(x).sum() + self.b(x if share else x * 1.0).square().sum()


def test_lorada_z_sharing_splits_when_inputs_diverge():
    """Sharing found in the first example is dropped once b reads another tensor, and the split
    Z still equals the explicit mean of x xᵀ, for a and b alike."""
    model = Twin().double()
    add_lora(model, targets=["a", "b"], r=2, alpha=2.0)
    xs = [torch.randn(1, 4, 5, dtype=torch.float64) for _ in range(3)]
    batches = [{"x": x, "share": s} for x, s in zip(xs, (True, False, True))]
    stats, _ = lorada_statistics(model, batches, lambda m, b: m(b["x"], b["share"]))
    X = torch.cat(xs).reshape(-1, 5)
    for k in "ab":
        torch.testing.assert_close(stats[k]["Z"], X.T @ X / X.shape[0])
    assert stats["b"]["z_owner"] == "b" and stats["b"]["Z"] is not stats["a"]["Z"]
    stats, _ = lorada_statistics(model, batches[:1], lambda m, b: m(b["x"], b["share"]))
    assert stats["b"]["Z"] is stats["a"]["Z"]


def model_state(model):
    return ([(n, p.requires_grad, p.grad, None if p.grad is None else p.grad.clone())
             for n, p in model.named_parameters()],
            [(n, m.training) for n, m in model.named_modules()])


def assert_state(model, before):
    params, modes = model_state(model)
    for (n, req, g, gv), (_, req2, g2, _) in zip(before[0], params):
        assert req == req2, n
        assert g is g2, n
        if g is not None:
            torch.testing.assert_close(g2, gv)
    assert modes == before[1]
    assert all(not m._forward_hooks and not m._forward_hooks_with_kwargs
               for m in model.modules())


def prepare_state(model):
    """Train mode with one submodule in eval, a frozen lora_B and pre-existing grads."""
    model.train()
    model.pool.eval()
    model.key.lora_B.requires_grad_(False)
    model.cls.weight.grad = torch.randn_like(model.cls.weight)
    model.query.lora_A.grad = torch.randn_like(model.query.lora_A)


def test_lorada_init_writes_factors_and_restores_state():
    """lorada_init writes lorada_factors(oracle statistics) into every used matrix, skips dead
    (G = 0) with its init kept, leaves W0, requires_grad, .grad and train/eval modes alone."""
    model, batches = make_model(), make_batches()
    prepare_state(model)
    before = model_state(model)
    W0 = {k: m.weight.clone() for k, m in lora_layers(model).items()}
    dead_A = model.dead.lora_A.clone()
    ref = oracle_statistics(model, batches, 9)
    out = lorada_init(model, batches, loss_fn, n_samples=256, da_beta=0.03, da_gamma=64.0,
                      population_size=1000)
    assert_state(model, before)
    assert out["n_samples"] == 9 and out["population_size"] == 1000
    assert out["skipped"] == {"dead": "zero gradient"}
    assert out["initialized"] == [k for k in TARGETS if k != "dead"]
    assert out["z_shared_with"] == {"key": "query", "value": "query", "dead": "fc"}
    for k, m in lora_layers(model).items():
        assert torch.equal(m.weight, W0[k]), k
        if k == "dead":
            assert torch.equal(m.lora_A, dead_A) and not m.lora_B.any()
            continue
        A, B, _ = lorada_factors(ref[k]["G"], ref[k]["Z"], ref[k]["y_diag"], 3, da_beta=0.03,
                                 da_gamma=64.0, n_pop=1000)
        torch.testing.assert_close(m.lora_A, A, msg=k)
        torch.testing.assert_close(m.lora_B, B, msg=k)


def test_lorada_init_restores_state_when_loss_fn_raises():
    """An error in the 3rd call of loss_fn propagates; hooks are gone, the adapter is untouched
    and requires_grad, .grad and modes are as before."""
    model, batches = make_model(), make_batches()
    prepare_state(model)
    before = model_state(model)
    adapter = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    calls = []

    def failing(model, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return loss_fn(model, batch)
    with pytest.raises(RuntimeError, match="boom"):
        lorada_init(model, batches, failing)
    assert_state(model, before)
    for k, v in adapter.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_lorada_init_rejects_bad_setups_before_any_work():
    """r > d_in, merged layers and a no_grad loss_fn raise ValueError; the first two before
    loss_fn is ever called."""
    def never(model, batch):
        raise AssertionError("loss_fn must not run")
    model = Tiny().double()
    add_lora(model, targets=["dead"], r=7, alpha=1.0)
    with pytest.raises(ValueError, match="r <= d_in"):
        lorada_init(model, make_batches(), never)
    model = make_model()
    merge_lora(model)
    with pytest.raises(ValueError, match=r"merge_lora\(model, False\)"):
        lorada_init(model, make_batches(), never)

    def no_grad_loss(model, batch):
        with torch.no_grad():
            return loss_fn(model, batch)
    model = make_model()
    before = model_state(model)
    with pytest.raises(ValueError, match="no_grad"):
        lorada_init(model, make_batches(), no_grad_loss)
    assert_state(model, before)


def test_lorada_init_bf16_model_gets_float32_statistics():
    """A bf16 model: statistics and the solve run in float32, the factors land in bf16 and are
    close to those of the same model in float64."""
    model64, batches = make_model(), make_batches()
    model16 = copy.deepcopy(model64).to(torch.bfloat16)
    stats, _ = lorada_statistics(model16, batches, loss_fn, n_samples=3)
    assert stats["query"]["G"].dtype == torch.float32
    lorada_init(model16, batches, loss_fn, da_gamma=1.0)
    lorada_init(model64, batches, loss_fn, da_gamma=1.0)
    assert model16.query.lora_A.dtype == torch.bfloat16
    for k in ("query", "fc"):
        m16, m64 = getattr(model16, k), getattr(model64, k)
        assert torch.isfinite(m16.lora_B).all()
        cos = F.cosine_similarity((m16.lora_B @ m16.lora_A).double().flatten(),
                                  (m64.lora_B @ m64.lora_A).flatten(), dim=0)
        assert cos > 0.98, k
