"""fimlora sections 1, 3 and 4 (Fisher statistics, FIM-LoRA init, FW-LoRA) against explicit loops.

Oracles: per-batch and per-example `.backward()` loops on a copy of the model (efim, variance,
per-example Fisher), the dense ‖∂L/∂W‖²_F read from W.grad, the dense Σ(1 − I)‖s·B@A‖²_F, and one
process over the union of the batches of two gloo ranks. Tiny float64 models, CPU only.

Run: .venv/bin/python -m pytest tests/test_fisher.py -q
"""

import copy
import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fimlora import (allocate_ranks, fim_rank_pattern, fisher_scores, fw_penalty, fw_track,
                     fw_update, importances, initialize_fim_ranks, lorada_init, resize_ranks)
from lora import add_lora, lora_layers, resize_lora

TARGETS = ["query", "value", "classifier"]


class Tiny(nn.Module):
    """Embedding -> masked single-head attention (query) -> value -> masked mean -> classifier.

    Padded keys are masked out and padded positions are left out of the pooled mean, so a
    padded example's logits equal those of the same example without padding."""

    def __init__(self, vocab=13, d=6, h=5, n_cls=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.query = nn.Linear(d, d)
        self.value = nn.Linear(d, h)
        self.classifier = nn.Linear(h, n_cls)

    def forward(self, ids, mask):
        x = self.emb(ids)  # (N, T, d)
        att = self.query(x) @ x.transpose(1, 2) / math.sqrt(x.shape[-1])  # (N, T, T)
        att = att.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)
        v = torch.tanh(self.value(att @ x))  # (N, T, h)
        m = mask[..., None].to(v.dtype)
        return self.classifier((v * m).sum(1) / m.sum(1))  # (N, n_cls)


def loss_fn(model, batch):
    """Mean over examples of each example's own cross-entropy: L = (1/N) Σ_n ℓ_n."""
    ids, mask, y = batch
    return F.cross_entropy(model(ids, mask), y)


def make_model(r=2, alpha=4.0, rslora=False, seed=0, random_B=False):
    torch.manual_seed(seed)
    model = Tiny().double()
    add_lora(model, TARGETS, r=r, alpha=alpha, rslora=rslora)
    if random_B:
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.copy_(torch.randn_like(layer.lora_B))
    return model


def make_batches(n, N=4, T=5, seed=1):
    """n batches of N padded sequences with lengths in 1..T (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(1, T + 1, (N,), generator=g)
        mask = torch.arange(T)[None, :] < lengths[:, None]  # (N, T)
        ids = torch.randint(1, 13, (N, T), generator=g).masked_fill(~mask, 0)
        out.append((ids, mask, torch.randint(0, 3, (N,), generator=g)))
    return out


def b_grads(model, batch):
    """Gradients of loss_fn w.r.t. every lora_B, by an ordinary backward on a copy."""
    m = copy.deepcopy(model)
    for layer in lora_layers(m).values():
        layer.lora_B.requires_grad_(True)
    loss_fn(m, batch).backward()
    return {n: layer.lora_B.grad.clone() for n, layer in lora_layers(m).items()}


def stacked(grad_dicts):
    return {n: torch.stack([g[n] for g in grad_dicts]) for n in grad_dicts[0]}


def assert_stats(result, F_ref):
    for n, ref in F_ref.items():
        torch.testing.assert_close(result["fisher"][n], ref.float(), rtol=1e-5, atol=1e-9)
        assert result["scores"][n] == pytest.approx(ref.mean().item(), rel=1e-5)


@pytest.mark.parametrize("random_B", [False, True])
def test_efim_equals_mean_of_squared_batch_gradients(random_B):
    model, batches = make_model(random_B=random_B), make_batches(3)
    G = stacked([b_grads(model, b) for b in batches])  # (K, d_out, r) per layer
    result = fisher_scores(model, batches, loss_fn)
    assert_stats(result, {n: g.square().mean(0) for n, g in G.items()})
    assert result["count"] == 3
    assert all(s > 0 for s in result["scores"].values())  # B is scored: nonzero even at B = 0


def test_n_batches_takes_the_first_batches_of_an_iterator():
    model, batches = make_model(), make_batches(4)
    G = stacked([b_grads(model, b) for b in batches[:2]])
    result = fisher_scores(model, iter(batches), loss_fn, n_batches=2)
    assert result["count"] == 2
    assert_stats(result, {n: g.square().mean(0) for n, g in G.items()})


def test_variance_is_centred_second_moment_of_batch_gradients():
    model, batches = make_model(random_B=True), make_batches(4)
    G = stacked([b_grads(model, b) for b in batches])
    result = fisher_scores(model, batches, loss_fn, score="variance")
    assert_stats(result, {n: g.var(0, unbiased=False) for n, g in G.items()})


def test_scores_that_are_all_zero_are_an_error_not_uniform_ranks():
    """A loss that never reaches a lora_B scores every matrix 0, and allocate_ranks would hand
    back the uniform ranks without a word."""
    model, batches = make_model(), make_batches(2)
    detached = lambda m, b: loss_fn(m, b).detach().requires_grad_()  # noqa: E731
    for score in ("efim", "variance"):
        with pytest.raises(ValueError, match=f"every {score} score is 0: loss_fn's loss does "):
            fisher_scores(model, batches, detached, score=score)
    one = "every variance score is 0 up to rounding: the 1 gradient"
    with pytest.raises(ValueError, match=one):
        fisher_scores(model, batches, loss_fn, score="variance", n_batches=1)
    with pytest.raises(ValueError, match=one.replace("1", "3") + r"\(s\) are one; pass 2 or more"):
        fisher_scores(model, [batches[0]] * 3, loss_fn, score="variance")  # float noise, not 0
    assert fisher_scores(model, [batches[0]] * 3, loss_fn)["count"] == 3  # efim: a fine score


@pytest.mark.parametrize("score", ["efim", "variance"])
def test_per_example_equals_loop_over_unpadded_examples(score):
    """Oracle: each example alone, without its padding, as a batch of one."""
    model, batches = make_model(random_B=True), make_batches(3)
    per_example = []
    for ids, mask, y in batches:
        for n in range(len(y)):
            t = int(mask[n].sum())
            per_example.append(b_grads(model, (ids[n:n + 1, :t], mask[n:n + 1, :t], y[n:n + 1])))
    G = stacked(per_example)
    result = fisher_scores(model, batches, loss_fn, score=score, per_example=True)
    assert result["count"] == 12
    ref = {n: g.square().mean(0) if score == "efim" else g.var(0, unbiased=False)
           for n, g in G.items()}
    assert_stats(result, ref)


def test_per_example_rejects_a_layer_called_twice():
    model = nn.Sequential(nn.Linear(3, 3))
    add_lora(model, ["0"], r=1, alpha=1)
    layer = model[0]
    with pytest.raises(ValueError, match="twice"):
        fisher_scores(model, [torch.randn(2, 3)], lambda m, x: layer(layer(x)).sum(),
                      per_example=True)
    assert not layer._forward_hooks and not layer.dropout._forward_hooks


def model_state(model):
    return ([(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
            [(n, m.training) for n, m in model.named_modules()],
            [(n, len(m._forward_hooks)) for n, m in model.named_modules()])


@pytest.mark.parametrize("per_example", [False, True])
@pytest.mark.parametrize("fails", [False, True])
def test_calibration_leaves_model_grads_and_modes_as_found(per_example, fails):
    model, batches = make_model(random_B=True), make_batches(3)
    layers = lora_layers(model)
    layers["query"].lora_A.requires_grad_(False)  # B trainable, A frozen
    layers["value"].lora_B.requires_grad_(False)  # the caller froze this B
    for p in model.classifier.parameters():  # a trainable head with a pre-existing .grad
        p.requires_grad_(True)
        p.grad = torch.full_like(p, 0.5)
    layers["query"].lora_B.grad = torch.full_like(layers["query"].lora_B, 2.0)
    model.eval()
    model.query.train()
    before = model_state(model)
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    calls = []

    def flaky_loss(m, batch):
        calls.append(1)
        m.train()  # even a loss_fn that flips the mode gets undone
        if fails and len(calls) == 2:
            raise RuntimeError("data error")
        return loss_fn(m, batch)

    if fails:
        with pytest.raises(RuntimeError, match="data error"):
            fisher_scores(model, batches, flaky_loss, per_example=per_example)
    else:
        fisher_scores(model, batches, flaky_loss, per_example=per_example)
    after = model_state(model)
    assert [x[:2] for x in after[0]] == [x[:2] for x in before[0]]
    assert all(a[2] is b[2] for a, b in zip(after[0], before[0]))  # the same .grad tensors
    for n, p in model.named_parameters():
        if grads[n] is not None:
            torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0)
    assert after[1:] == before[1:]  # modes, and every hook removed


# -----------------------------------------------------------------------------
# FIM-LoRA initialisation


@pytest.mark.parametrize("rslora", [False, True])
def test_initialize_fim_ranks_keeps_function_budget_and_base_scale(rslora):
    r, alpha = 4, 8.0
    model, batches = make_model(r=r, alpha=alpha, rslora=rslora), make_batches(3)
    base_scale = alpha / (math.sqrt(r) if rslora else r)
    ids, mask, _ = batches[0]
    with torch.no_grad():
        y0 = model(ids, mask)
    result = initialize_fim_ranks(model, batches, loss_fn, r_min=1,
                                  generator=torch.Generator().manual_seed(0))
    ranks, alphas = result["ranks"], result["alphas"]
    assert sum(ranks.values()) == r * len(TARGETS)  # default budget r·M
    assert len(set(ranks.values())) > 1  # a real reallocation, so the alpha rule is exercised
    caps = {n: min(2 * r, m.in_features, m.out_features) for n, m in lora_layers(model).items()}
    assert caps == {"query": 6, "value": 5, "classifier": 3}  # 2r = 8 binds nowhere
    assert ranks == allocate_ranks(result["scores"], r * len(TARGETS), 1, caps)
    for name, layer in lora_layers(model).items():
        ratio = ranks[name] / r
        expected = alpha * (math.sqrt(ratio) if rslora else ratio)
        assert layer.r == ranks[name] and layer.lora_A.shape == (ranks[name], layer.in_features)
        assert layer.alpha == pytest.approx(expected) and alphas[name] == pytest.approx(expected)
        assert layer.scaling == pytest.approx(base_scale)
        assert not layer.lora_B.any()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), y0, rtol=0, atol=0)
    assert set(result) == {"ranks", "alphas", "scores"}  # telemetry lives in train.py


def test_initialize_fim_ranks_caps_each_matrix_at_its_dimension():
    """Tiny's classifier is 5 → 3, so no rank above 3 can help it: with r_max = 8 the budget
    r·M = 12 is allocated with caps (6, 5, 3), never above them. Where no matrix is thinner
    than r_max (r_max = 3), the ranks are those of the plain int r_max. A budget above Σ caps
    names the thin matrices."""
    for r_max in (8, 3):
        model, batches = make_model(r=3), make_batches(3)
        scores = fisher_scores(model, batches, loss_fn)["scores"]
        ranks = initialize_fim_ranks(model, batches, loss_fn, r_max=r_max)["ranks"]
        caps = {"query": min(6, r_max), "value": min(5, r_max), "classifier": 3}
        assert sum(ranks.values()) == 9 and all(ranks[n] <= caps[n] for n in caps)
        assert ranks == allocate_ranks(scores, 9, 1, caps if r_max == 8 else r_max)
    with pytest.raises(ValueError, match=r"budget=15 > Σ_m min\(r_max, d_in, d_out\)=14 .*"
                                         r"classifier \(3\).*out of the targets"):
        initialize_fim_ranks(make_model(r=5), make_batches(1), loss_fn)
    with pytest.raises(ValueError, match=r"r_min=4 exceeds min\(d_in, d_out\) of "
                                         r"\['classifier \(3\)'\]: lower r_min"):
        initialize_fim_ranks(make_model(r=4), make_batches(1), loss_fn, r_min=4)


@pytest.mark.parametrize("per_example", [False, True])
def test_a_nan_loss_in_calibration_is_named_not_passed_on_as_nan_scores(per_example):
    with pytest.raises(ValueError, match="gradient has inf/NaN; check loss_fn"):
        fisher_scores(make_model(), make_batches(2), lambda m, b: loss_fn(m, b) * math.nan,
                      per_example=per_example)


def test_resize_ranks_keeps_each_layers_base_scale_and_pattern_uses_the_same_alphas():
    """α_m = α·r_m/r (α·√(r_m/r) with rsLoRA) from each layer's own r and α, B = 0 and a
    fresh A; fim_rank_pattern's alpha_pattern gives the same α_m. Unknown names are refused."""
    for rslora in (False, True):
        model = make_model(r=4, alpha=8.0, rslora=rslora)
        ranks = {"query": 6, "value": 2, "classifier": 3}
        alphas = resize_ranks(model, ranks, torch.Generator().manual_seed(0))
        for name, layer in lora_layers(model).items():
            assert layer.r == ranks[name] and alphas[name] == layer.alpha
            assert layer.scaling == pytest.approx(8.0 / (2.0 if rslora else 4))
            assert not layer.lora_B.any()
        model, batches = make_model(r=4, alpha=8.0, rslora=rslora), make_batches(3)
        fields = fim_rank_pattern(model, batches, loss_fn, 4, 8.0, rslora=rslora)
        ref = initialize_fim_ranks(model, batches, loss_fn)
        for name, a in ref["alphas"].items():
            assert fields["alpha_pattern"].get("^" + name, fields["lora_alpha"]) == a
    with pytest.raises(ValueError, match=r"ranks and the adapted layers differ: \['key'"):
        resize_ranks(make_model(), {"query": 2, "value": 2, "classifier": 2, "key": 1})
    model = make_model(r=4, alpha=8.0)  # all or nothing: a bad rank anywhere changes no layer
    with pytest.raises(ValueError, match=r"resize_ranks: ranks\['value'\]: r=-1 is invalid"):
        resize_ranks(model, {"query": 3, "value": -1, "classifier": 2})
    assert {(m.r, m.alpha) for m in lora_layers(model).values()} == {(4, 8.0)}


def test_initialize_fim_ranks_checks_inputs_before_calibrating():
    calls = []

    def counting_loss(m, batch):
        calls.append(1)
        return loss_fn(m, batch)

    with pytest.raises(ValueError, match="budget"):
        initialize_fim_ranks(make_model(), make_batches(2), counting_loss, budget=100)
    with pytest.raises(ValueError, match="B ≠ 0"):
        initialize_fim_ranks(make_model(random_B=True), make_batches(2), counting_loss)
    assert not calls


# -----------------------------------------------------------------------------
# FW-LoRA


def test_fw_track_equals_norm_of_real_weight_gradient():
    model, (batch,) = make_model(random_B=True), make_batches(1, N=3, T=4)
    layers = lora_layers(model)
    for layer in layers.values():
        layer.weight.requires_grad_(True)  # only so the oracle W.grad exists
    with fw_track(model) as sq_norms:
        loss_fn(model, batch).backward()
    for name, layer in layers.items():
        expected = layer.weight.grad.square().sum()
        torch.testing.assert_close(sq_norms[name], expected.float(), rtol=1e-5, atol=0)
        assert not layer._forward_hooks
    model.zero_grad()
    with fw_track(model) as sq_norms:  # accumulated: the norm of the sum
        loss_fn(model, batch).backward()
        loss_fn(model, batch).backward()
    for name, layer in layers.items():  # W.grad = 2G now, so ‖2G‖² = 4‖G‖², not 2‖G‖²
        expected = layer.weight.grad.square().sum()
        torch.testing.assert_close(sq_norms[name], expected.float(), rtol=1e-5, atol=0)


def test_fw_track_layer_called_twice_gives_norm_of_summed_gradient():
    """A layer applied twice per forward has ∂L/∂W = G_1 + G_2: fw_track reports ‖G_1 + G_2‖²,
    read from the real W.grad, not ‖G_1‖² + ‖G_2‖²."""
    model = nn.Sequential(nn.Linear(4, 4)).double()
    add_lora(model, ["0"], r=2, alpha=2)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn_like(layer.lora_B))
    layer.weight.requires_grad_(True)
    x = torch.randn(3, 4, dtype=torch.float64)
    with fw_track(model) as sq_norms:
        torch.tanh(layer(torch.tanh(layer(x)))).sum().backward()
    torch.testing.assert_close(sq_norms["0"], layer.weight.grad.square().sum().float(),
                               rtol=1e-5, atol=0)


def test_fw_track_and_penalty_skip_rank_zero_layers():
    """A rank-0 layer has no ΔW to penalise, so it gets no Fisher EMA and no importance share."""
    model = make_model(r=2)
    resize_lora(lora_layers(model)["value"], 0)
    with fw_track(model) as sq_norms:
        loss_fn(model, make_batches(1)[0]).backward()
    assert set(sq_norms) == {"query", "classifier"}
    I = importances(fw_update({}, sq_norms, 1))
    assert set(I) == {"query", "classifier"} and float(sum(I.values())) == pytest.approx(1.0)
    assert fw_penalty(model, I).item() == 0.0


def dense_penalty(model, I, lam):
    total = 0.0
    for name, layer in lora_layers(model).items():
        dW = layer.scaling * layer.lora_B @ layer.lora_A  # (d_out, d_in)
        total = total + (1 - I[name]) * dW.square().sum()
    return lam * total


def test_fw_penalty_equals_dense_sum_and_is_zero_at_init():
    model = make_model(r=3, alpha=5.0)
    I = {"query": 0.5, "value": 0.3, "classifier": 0.2}
    assert fw_penalty(model, I).item() == 0.0
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn_like(layer.lora_B))
    params = [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
    for p in params:
        p.requires_grad_(True)
    got, want = fw_penalty(model, I, fw_lambda=0.1), dense_penalty(model, I, 0.1)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=0)
    grads_got = torch.autograd.grad(got, params)
    for g, w in zip(grads_got, torch.autograd.grad(want, params)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="no importance"):
        fw_penalty(model, {"query": 0.5})



def test_fw_penalty_groups_same_shapes_but_keeps_each_layers_scaling_and_importance():
    """Layers stacked into one batched product keep their own α (hence scaling) and I_m: the
    penalty equals the dense sum when same-shape layers differ in α and another in rank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 4))
    add_lora(model, ["0", "1", "2"], r=3, alpha=5.0)
    layers = lora_layers(model)
    layers["1"].alpha = 11.0  # same shapes as "0", another scaling
    resize_lora(layers["2"], 2, alpha=3.0)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.copy_(torch.randn_like(layer.lora_B))
    I = {"0": 0.1, "1": 0.7, "2": 0.2}
    torch.testing.assert_close(fw_penalty(model, I, fw_lambda=0.3),
                               dense_penalty(model, I, 0.3).float(), rtol=1e-5, atol=0)

positive = st.floats(1e-6, 1e6, allow_nan=False)


@given(st.lists(positive, min_size=1, max_size=16))
def test_importances_sum_to_one_or_peak_at_one(values):
    F_ = {f"m{i}": torch.tensor(v) for i, v in enumerate(values)}
    I_sum, I_max = importances(F_), importances(F_, mode="max")
    assert sum(v.item() for v in I_sum.values()) == pytest.approx(1.0, rel=1e-5)
    assert max(v.item() for v in I_max.values()) == pytest.approx(1.0, rel=1e-6)
    top = max(values)
    for i, v in enumerate(values):
        assert I_max[f"m{i}"].item() == pytest.approx(v / top, rel=1e-5)


@given(st.floats(1e-3, 1e3), st.floats(0.0, 0.999), st.integers(1, 40))
def test_fw_update_bias_correction_makes_constant_input_exact(c, beta, k):
    F_ = {}
    for step in range(1, k + 1):
        F_ = fw_update(F_, {"q": torch.tensor(c)}, step, beta=beta)
    assert F_["q"].item() == pytest.approx(c, rel=1e-4)


def test_fw_update_equals_raw_ema_divided_by_one_minus_beta_k():
    beta, g = 0.9, torch.rand(7, dtype=torch.float64) * 10
    raw, F_ = 0.0, {}
    for k in range(1, 8):
        raw = beta * raw + (1 - beta) * g[k - 1]
        F_ = fw_update(F_, {"q": g[k - 1]}, k, beta=beta)
        torch.testing.assert_close(F_["q"].double(), raw / (1 - beta ** k), rtol=1e-5, atol=0)


# -----------------------------------------------------------------------------
# torch.distributed: two gloo ranks, each with its share of the batches (as train.py splits
# them): uneven shares, odd batch sizes, a rank with no batch at all


def dict_loss(model, batch):
    return loss_fn(model, (batch["input_ids"], batch["attention_mask"], batch["labels"]))


def uneven_batches():
    """Batches of 4, 3 and 5 examples as dicts (LoRA-DA and the lorada score need dicts)."""
    sizes = [(4, 1), (3, 2), (5, 3)]
    return [dict(zip(("input_ids", "attention_mask", "labels"), make_batches(1, N=n, seed=s)[0]))
            for n, s in sizes]


class MLP(nn.Module):
    """Two 8x8 layers, so a 4/3 split gives the ranks shards of different sizes."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def dist_case(rank: int, world: int) -> dict:
    """Everything a rank computes from its share: every allocation score (FIM-LoRA's and
    study/scores.py's: ranks and scores), the per-example Fisher, scores from one batch over
    all ranks (rank 1 gets none), and
    fw_track of a 7-row batch cut 4/3 as data.tasks.shards cuts it, each shard's mean loss weighted
    by world·n_k/N (as train.py does) so the ranks' mean gradient is the whole batch's."""
    from study.scores import SCORES, initialize_ranks
    batches = uneven_batches()
    out = {}
    cases = [(s, batches) for s in ("efim", "variance", "per-example", *SCORES)] + [
        (s, batches[:1]) for s in ("efim", "gradw", "kfac", "lorada")]
    for score, data in cases:
        res = initialize_ranks(make_model(r=2), data[rank::world], dict_loss, score,
                               n_batches=None, generator=torch.Generator().manual_seed(0))
        out[score, len(data)] = {"ranks": res["ranks"], "scores": res["scores"]}
    torch.manual_seed(0)
    model = MLP()
    add_lora(model, ["up", "down"], r=2, alpha=2.0)
    x, t = torch.randn(7, 8), torch.randn(7, 8)
    xs, ts = x.tensor_split(world)[rank], t.tensor_split(world)[rank]
    with fw_track(model) as sq:
        (F.mse_loss(model(xs), ts) * (world * xs.shape[0] / 7)).backward()
    out["fw"] = {n: v.item() for n, v in sq.items()}
    model = make_model(r=2)
    lorada_init(model, batches[rank::world], dict_loss)  # LoRA-DA from all ranks' statistics
    out["da"] = {n: (m.lora_A.detach(), m.lora_B.detach()) for n, m in lora_layers(model).items()}
    return out


def _dist_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.save(dist_case(rank, world), f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_scores_ranks_and_fw_agree_with_one_process(tmp_path):
    """Oracle: dist_case in one process over all the batches. Both ranks get bit-identical
    results, every score and rank of every --score equals one process's (float32 sums in
    another order: rel 1e-5), and so do FW-LoRA's ‖G_m‖² on the uneven 4/3 split."""
    mp.spawn(_dist_worker, args=(2, tmp_path / "init", tmp_path), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{k}.pt", weights_only=False) for k in (0, 1))
    assert {k: v for k, v in r0.items() if k != "da"} == {k: v for k, v in r1.items() if k != "da"}
    assert all(torch.equal(a, b) for k in r0["da"] for a, b in zip(r0["da"][k], r1["da"][k]))
    one = dist_case(0, 1)
    assert r0.keys() == one.keys()
    for key, res in one.items():
        if key in ("fw", "da"):
            continue
        assert r0[key]["ranks"] == res["ranks"], key
        for name, s in res["scores"].items():
            got, s = torch.tensor(r0[key]["scores"][name]), torch.tensor(s)
            scale = s.abs().max().item()
            torch.testing.assert_close(got, s, rtol=1e-5, atol=1e-6 * scale, msg=str(key))
    for name, v in one["fw"].items():
        assert r0["fw"][name] == pytest.approx(v, rel=1e-5), name
    for name, (A, B) in one["da"].items():
        torch.testing.assert_close(r0["da"][name][0], A, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(r0["da"][name][1], B, rtol=1e-5, atol=1e-7, msg=name)


def test_initialize_fim_ranks_parameter_budget_spends_uniform_parameters():
    """budget_unit="params": Σ_m r_m·(d_in + d_out) stays within the uniform adapter's
    parameter count and no rank could be added; the rank count may differ from r·M."""
    model, batches = make_model(r=4), make_batches(3)
    layers = lora_layers(model)
    cost = {n: m.in_features + m.out_features for n, m in layers.items()}
    uniform = sum(4 * c for c in cost.values())
    res = initialize_fim_ranks(model, batches, loss_fn, budget_unit="params")
    ranks = res["ranks"]
    caps = {n: min(8, m.in_features, m.out_features) for n, m in layers.items()}
    assert ranks == allocate_ranks(res["scores"], uniform, 1, caps, costs=cost)
    spent = sum(ranks[n] * cost[n] for n in ranks)
    assert spent <= uniform  # and no rank can be added without exceeding a cap or the budget:
    assert all(ranks[n] == caps[n] or cost[n] > uniform - spent for n in ranks)
    assert spent == sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_layers(model).values())
    with pytest.raises(ValueError, match="budget_unit"):
        initialize_fim_ranks(make_model(r=4), batches, loss_fn, budget_unit="bytes")


def test_fim_ranks_are_a_function_of_the_a_draw_and_the_batches(tmp_path):
    """FIM-LoRA scores B's Fisher, and B's gradient δ·(A x)ᵀ goes through A: the ranks are a
    deterministic function of (A's draw, the calibration batches), and another draw of A moves
    some of them (README, FIM-LoRA on your own model). tiny-llama, its default 14 targets, r 8,
    the same 8 SST-2 batches of 32, A from seeds 0 (twice), 1, 2, 3: q/k stay at r_min and v/o at
    the cap on every draw, the MLP projections move, on 5, 3 and 6 of the 14 matrices."""
    import itertools

    import train
    from conftest import SST2
    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"SST-2 not found at {SST2}")
    args = train.parse_args(["--model", "tiny-llama", "--task", "sst2", "--data-dir", str(SST2),
                             "--method", "fim", "--max-train", "256", "--out", str(tmp_path)])
    task = train.build_task(args, torch.device("cpu"), train.random_streams(0))
    calib = list(itertools.islice(task.train_batches(torch.Generator().manual_seed(2)), 8))

    def ranks(a_seed: int) -> dict:
        model = copy.deepcopy(task.model).train(task.train_mode)
        add_lora(model, args.targets.split(","), r=8, alpha=16, heads=task.heads,
                 generator=torch.Generator().manual_seed(a_seed))
        return initialize_fim_ranks(model, calib, task.loss_fn,
                                    generator=torch.Generator().manual_seed(9))["ranks"]
    first = ranks(0)
    assert ranks(0) == first and len(first) == 14 and sum(first.values()) == 8 * 14
    moved = [sum(first[n] != other[n] for n in first) for other in map(ranks, (1, 2, 3))]
    assert moved == [5, 3, 6]
