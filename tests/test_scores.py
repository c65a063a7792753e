"""fim_rank_pattern: FIM-LoRA's allocation as PEFT LoraConfig fields (rank_pattern,
alpha_pattern). Oracles: PEFT's own lookup rule and, where peft is installed, PEFT itself.

Run: .venv/bin/python -m pytest tests/test_scores.py -q
"""

import copy
import math
import re

import pytest
import torch

from fimlora import fim_rank_pattern, initialize_fim_ranks
from lora import add_lora, lora_layers


# -----------------------------------------------------------------------------
# fim_rank_pattern (PEFT LoraConfig fields; the check against PEFT itself is in test_peers)


def peft_lookup(pattern, name, default):
    """PEFT's rank_pattern / alpha_pattern rule: the first key k with
    re.match(rf"(.*\\.)?({k})$", name) wins (peft/utils/other.py, get_pattern_key)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


class Stack(torch.nn.Module):
    """Names that unanchored or unescaped keys would confuse: "layers.0.q", "layers.10.q",
    "layers.0xq"... and "extra.layers.0.q", "extra.layers.0.v" (same suffixes)."""

    def __init__(self, d=6):
        super().__init__()
        block = lambda: torch.nn.ModuleDict({"q": torch.nn.Linear(d, d),  # noqa: E731
                                             "v": torch.nn.Linear(d, d)})
        self.layers = torch.nn.ModuleDict({str(i): block() for i in (0, 1, 10)})
        self.extra = torch.nn.ModuleDict({"layers": torch.nn.ModuleDict({"0": block()})})

    def forward(self, x):
        for block in [*self.layers.values(), self.extra["layers"]["0"]]:
            x = torch.tanh(block["q"](x)) + block["v"](x).square()
        return x


@pytest.mark.parametrize("rslora", [False, True])
def test_fim_rank_pattern_gives_peft_fields_that_rebuild_ranks_and_scales(rslora):
    """Through PEFT's lookup rule every module gets exactly the rank and α of
    initialize_fim_ranks on a copy, so α_m/r_m (α_m/√r_m) stays the base scale; r is the most
    common rank, and the model is not modified."""
    torch.manual_seed(0)
    model = Stack().double()
    add_lora(model, ["q", "v"], r=4, alpha=8.0, rslora=rslora)
    x = torch.randn(5, 6, dtype=torch.float64)
    batches = [x[i:i + 1] for i in range(5)]

    def loss(m, xb):
        return m(xb).sum()
    before = copy.deepcopy(model.state_dict())
    fields = fim_rank_pattern(model, batches, loss, r=4, alpha=8.0, rslora=rslora)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    copy_ = copy.deepcopy(model)
    ref = initialize_fim_ranks(copy_, batches, loss)
    assert set(fields) == {"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern"}
    assert fields["use_rslora"] is rslora  # else PEFT scales α_m/r_m, not α_m/√r_m
    counts = {k: list(ref["ranks"].values()).count(k) for k in ref["ranks"].values()}
    assert counts[fields["r"]] == max(counts.values())
    assert len(set(ref["ranks"].values())) > 1  # a real pattern
    for name in lora_layers(model):
        r_m = peft_lookup(fields["rank_pattern"], name, fields["r"])
        a_m = peft_lookup(fields["alpha_pattern"], name, fields["lora_alpha"])
        assert r_m == ref["ranks"][name] and a_m == pytest.approx(ref["alphas"][name])
        scale = a_m / (math.sqrt(r_m) if fields["use_rslora"] else r_m)  # PEFT's rule
        assert scale == pytest.approx(8.0 / (2.0 if rslora else 4.0))
    differ = [n for n, k in ref["ranks"].items() if k != fields["r"]]
    assert list(fields["rank_pattern"]) == ["^" + re.escape(n) for n in differ]
    for key in [*fields["rank_pattern"], *fields["alpha_pattern"]]:  # one module per key
        assert sum(bool(re.match(rf"(.*\.)?({key})$", n)) for n in lora_layers(model)) == 1
    assert len(fields["rank_pattern"]) >= 3


@pytest.mark.parametrize("rslora", [False, True])
def test_fim_rank_pattern_fields_give_peft_the_base_scale_on_every_module(rslora):
    """Oracle: PEFT itself. LoraConfig(**fields) on a fresh Stack gives every module the rank
    of initialize_fim_ranks and the scaling α/r (α/√r with rsLoRA) of the base adapter."""
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    torch.manual_seed(0)
    model = Stack().double()
    add_lora(model, ["q", "v"], r=4, alpha=8.0, rslora=rslora)
    batches = [torch.randn(1, 6, dtype=torch.float64) for _ in range(5)]
    fields = fim_rank_pattern(model, batches, lambda m, x: m(x).sum(), r=4, alpha=8.0,
                              rslora=rslora)
    ref = initialize_fim_ranks(copy.deepcopy(model), batches, lambda m, x: m(x).sum())["ranks"]
    assert len(set(ref.values())) > 1
    wrapped = peft.get_peft_model(Stack(), peft.LoraConfig(target_modules=["q", "v"], **fields))
    seen = {}
    for name, module in wrapped.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            seen[name.removeprefix("base_model.model.")] = (module.r["default"],
                                                            module.scaling["default"])
    assert seen.keys() == ref.keys()
    for name, (r_m, scale) in seen.items():
        assert r_m == ref[name] and scale == pytest.approx(8.0 / (2.0 if rslora else 4.0)), name


def test_fim_rank_pattern_takes_the_parameter_budget():
    """budget_unit="params" reaches the allocation: the ranks equal initialize_fim_ranks' with
    the same parameter budget (a rank of a 6x6 matrix costs 12), which a rank budget of the
    same number would refuse."""
    torch.manual_seed(0)
    model = Stack().double()
    add_lora(model, ["q", "v"], r=4, alpha=8.0)
    batches = [torch.randn(1, 6, dtype=torch.float64) for _ in range(5)]
    loss = lambda m, x: m(x).sum()  # noqa: E731
    fields = fim_rank_pattern(model, batches, loss, r=4, alpha=8.0, budget=300,
                              budget_unit="params")
    ref = initialize_fim_ranks(copy.deepcopy(model), batches, loss, budget=300,
                               budget_unit="params")["ranks"]
    for name in lora_layers(model):
        assert peft_lookup(fields["rank_pattern"], name, fields["r"]) == ref[name]
    assert 12 * sum(ref.values()) <= 300 < 12 * (sum(ref.values()) + 1)
    with pytest.raises(ValueError, match="budget=300"):
        fim_rank_pattern(model, batches, loss, r=4, alpha=8.0, budget=300)


def test_fim_rank_pattern_rejects_mismatched_adapters_and_rank_zero():
    model = Stack()
    add_lora(model, ["q", "v"], r=4, alpha=8.0)
    batches = [torch.randn(1, 6)]
    with pytest.raises(ValueError, match="not rank-8"):
        fim_rank_pattern(model, batches, lambda m, x: m(x).sum(), r=8, alpha=8.0)
    with pytest.raises(ValueError, match="PEFT has no rank 0"):
        fim_rank_pattern(model, batches, lambda m, x: m(x).sum(), r=4, alpha=8.0, r_min=0)
