"""Tests for data/planted.py: the planted teacher, its per-example loss, the oracle allocation.

Oracles: teacher-minus-base weights checked with torch.linalg.matrix_rank / svdvals; each plant's
effect re-measured on its own; the loss against an explicit loop over examples and tokens; the
oracle allocation against a hand-made example.
Run: .venv/bin/python -m pytest tests/test_planted.py -q
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from data.planted import (REACH, _mse, _output, oracle_ranks, plant, planted_loss, random_batch,
                          rank_recovery, vocab_size)
from lora import add_lora


class Tiny(nn.Module):
    """Embedding + residual Linears with BERT-like names and forward signature; `unused` never
    runs and `faint` reaches the output 1e-6 as strongly as the others."""

    def __init__(self, vocab: int = 50, d: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.query = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.faint = nn.Linear(d, d)
        self.unused = nn.Linear(d, d)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        h = self.embed(input_ids)  # (B, T, C)
        h = h + torch.tanh(self.query(h)) * torch.sigmoid(self.value(h))
        h = h + self.down(torch.relu(self.up(h))) + 1e-6 * self.faint(h)
        return h, h[:, 0]


NAMES = ["query", "value", "up", "down"]


def probe(seed: int = 0) -> dict:
    return random_batch(50, 8, 12, generator=torch.Generator().manual_seed(seed))


def test_plant_changes_exactly_the_planted_matrices_with_stated_ranks():
    """ΔW* = teacher − base: rank r with r equal singular values, and every other tensor
    (other Linears, biases, embedding) is untouched, as is the base."""
    base = Tiny()
    before = copy.deepcopy(base.state_dict())
    teacher, planted = plant(base, NAMES, n_planted=2, rank=3, effect=0.3,
                             generator=torch.Generator().manual_seed(0))
    assert len(planted) == 2 and sorted(planted.values()) == [3, 3] and set(planted) <= set(NAMES)
    t_sd, b_sd = teacher.state_dict(), base.state_dict()
    for key, w in b_sd.items():
        torch.testing.assert_close(w, before[key], rtol=0, atol=0)
        name = key.rsplit(".", 1)[0]
        delta = t_sd[key] - w
        if name in planted and key.endswith("weight"):
            assert torch.linalg.matrix_rank(delta).item() == planted[name]
            s = torch.linalg.svdvals(delta)[: planted[name]]
            torch.testing.assert_close(s, s[:1].expand_as(s), rtol=1e-4, atol=0)
        else:
            assert torch.equal(delta, torch.zeros_like(delta)), key
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("effect", [0.02, 0.1])
def test_plant_sizes_each_plant_by_its_effect_on_the_output(effect):
    """Each ΔW*_m alone moves the output by `effect` of its RMS on the probe, whatever the
    matrix: re-measured here by adding one ΔW* at a time to a copy of the base."""
    base, batch = Tiny().eval(), probe()
    teacher, planted = plant(base, NAMES, n_planted=4, effect=effect, rank=2,
                             generator=torch.Generator().manual_seed(0), probe=batch)
    with torch.no_grad():
        out = _output(base, batch)
        rms = _mse(out, torch.zeros_like(out), batch["attention_mask"]).sqrt()
        norms = []
        for name in planted:
            one = copy.deepcopy(base)
            delta = teacher.get_submodule(name).weight - base.get_submodule(name).weight
            one.get_submodule(name).weight.add_(delta)
            moved = _mse(_output(one, batch), out, batch["attention_mask"]).sqrt()
            assert (moved / rms).item() == pytest.approx(effect, rel=0.02), name
            norms.append(delta.norm().item() / base.get_submodule(name).weight.norm().item())
    assert max(norms) > 1.5 * min(norms)  # sized by effect, not by a common ‖ΔW*‖/‖W‖


def test_plant_skips_matrices_that_cannot_move_the_output():
    """`unused` moves nothing and `faint` would need ‖ΔW*‖ ≫ REACH·‖W‖: neither is planted,
    and asking for more plants than the reachable matrices raises."""
    names = NAMES + ["faint", "unused"]
    for seed in range(5):
        _, planted = plant(Tiny(), names, n_planted=4, rank=1, effect=0.1,
                           generator=torch.Generator().manual_seed(seed), probe=probe())
        assert set(planted) == set(NAMES)
    with pytest.raises(ValueError, match="only 0 of 2 matrices can move the output"):
        plant(Tiny(), ["faint", "unused"], n_planted=1, rank=1, generator=torch.Generator(),
              probe=probe())
    assert REACH < 1e6  # faint's 1e-6 path is out of reach by construction


def test_plant_draws_names_from_the_generator():
    """Same seed -> same teacher; over seeds every name gets planted (not just the first)."""
    base = Tiny()

    def run(seed):
        return plant(base, NAMES, n_planted=1, rank=2,
                     generator=torch.Generator().manual_seed(seed))
    (t1, p1), (t2, p2) = run(3), run(3)
    assert p1 == p2 and all(torch.equal(a, b) for a, b in
                            zip(t1.state_dict().values(), t2.state_dict().values()))
    seen = set()
    for seed in range(30):
        seen |= set(run(seed)[1])
    assert seen == set(NAMES)


def test_random_batch_is_valid_and_reproducible():
    g = torch.Generator().manual_seed(0)
    b = random_batch(50, 64, 10, generator=g)
    ids, mask = b["input_ids"], b["attention_mask"]
    lengths = mask.sum(1)
    assert set(b) == {"input_ids", "attention_mask"} and ids.shape == mask.shape == (64, 10)
    assert lengths.min() >= 5 and lengths.max() == 10 and lengths.unique().numel() > 1
    assert torch.equal(mask, (torch.arange(10) < lengths[:, None]).long())  # right padding
    assert ids[mask == 1].min() >= 1 and ids[mask == 1].max() < 50
    assert (ids[mask == 0] == 0).all()
    again = random_batch(50, 64, 10, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(b[k], again[k]) for k in b)


# -----------------------------------------------------------------------------
# the loss


def test_planted_loss_zero_on_teacher_positive_for_student_at_init():
    """The student is base + LoRA with B = 0, i.e. the base function: it misses ΔW*."""
    g = torch.Generator().manual_seed(0)
    base = Tiny()
    teacher, _ = plant(base, NAMES, n_planted=2, rank=2, generator=g)
    batch = random_batch(50, 4, 12, generator=g)
    assert planted_loss(teacher, teacher, batch).item() == 0.0
    add_lora(base, NAMES, r=4, alpha=8)
    loss = planted_loss(base, teacher, batch)
    assert loss.item() > 1e-9 and loss.requires_grad


def test_planted_loss_is_the_mean_of_per_example_means():
    """Mean over channels and valid tokens of each example, then over examples (an explicit
    loop), so it equals the mean of the one-example losses (the per-example Fisher contract);
    with unequal lengths that differs from weighting every token alike."""
    g = torch.Generator().manual_seed(1)
    student, (teacher, _) = Tiny(), plant(Tiny(), NAMES, rank=2, generator=g)
    batch = random_batch(50, 5, 9, generator=g)
    hs, ht = student(**batch)[0].detach(), teacher(**batch)[0]
    per_example = [torch.stack([((hs[i, t] - ht[i, t]) ** 2).mean() for t in range(9)
                                if batch["attention_mask"][i, t]]).mean() for i in range(5)]
    loss = planted_loss(student, teacher, batch)
    torch.testing.assert_close(loss, torch.stack(per_example).mean())
    singles = [planted_loss(student, teacher, {k: v[i:i + 1] for k, v in batch.items()})
               for i in range(5)]
    torch.testing.assert_close(loss, torch.stack(singles).mean())
    m = batch["attention_mask"]
    token_weighted = (((hs - ht) ** 2).mean(-1) * m).sum() / m.sum()
    assert abs(loss.item() - token_weighted.item()) > 1e-3 * loss.item()


def test_planted_task_is_learnable_by_lora():
    """A rank-r student trained briefly on random batches closes most of the gap."""
    g = torch.Generator().manual_seed(0)
    student = Tiny()
    teacher, planted = plant(student, NAMES, n_planted=2, rank=2, effect=0.3, generator=g)
    add_lora(student, NAMES, r=2, alpha=2, generator=g)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    test = random_batch(50, 64, 12, generator=g)
    start = planted_loss(student, teacher, test).item()
    for _ in range(150):
        loss = planted_loss(student, teacher, random_batch(50, 16, 12, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert planted_loss(student, teacher, test).item() < 0.2 * start


def test_planted_on_the_tiny_encoder_skips_random_init_query_and_key():
    """models.TINY (std-0.02 init): attention stays uniform, so query and key cannot move the
    last hidden states within REACH·‖W‖ and every plant lands elsewhere."""
    import models

    base = models.BertModel(models.TINY, torch.Generator().manual_seed(0))
    names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)
             and n.startswith("encoder.")]
    g = torch.Generator().manual_seed(0)
    teacher, planted = plant(base, names, n_planted=8, generator=g)
    assert set(planted) == {n for n in names if not n.endswith(("query", "key"))}
    base.eval()
    batch = random_batch(vocab_size(base), 2, 8, generator=g)
    assert planted_loss(teacher, teacher, batch).item() == 0.0
    assert planted_loss(base, teacher, batch).item() > 0.0


def test_plants_anywhere_can_land_on_query_and_key():
    """reach=math.inf lifts the reach rule: the draw alone decides, so query and key of the
    same encoder as above get plants (and the default still never gives them one)."""
    import models

    base = models.BertModel(models.TINY, torch.Generator().manual_seed(0))
    names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)
             and n.startswith("encoder.")]
    anywhere = set(plant(base, names, n_planted=8, generator=torch.Generator().manual_seed(0),
                         reach=math.inf)[1])
    assert any(n.endswith(("query", "key")) for n in anywhere)
    assert len(anywhere) == 8
    for seed in range(3):  # 3 of 12 drawn: in the default, query/key never
        _, default = plant(base, names, generator=torch.Generator().manual_seed(seed))
        assert not any(n.endswith(("query", "key")) for n in default)


def test_planted_on_a_causal_lm_compares_logits():
    """tiny-llama (LlamaForCausalLM): the loss compares (B, T, vocab) logits over the valid
    tokens of right-padded rows, and a LoRA student gets gradients."""
    import models

    base, _ = models.load_model("tiny-llama", generator=torch.Generator().manual_seed(0))
    names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)
             and n.startswith("model.")]
    g = torch.Generator().manual_seed(0)
    teacher, planted = plant(base, names, n_planted=2, rank=4, generator=g)
    batch = random_batch(vocab_size(base), 3, 10, generator=g)
    assert _output(base, batch).shape == (3, 10, models.TINY_LLAMA.vocab_size)
    assert planted_loss(teacher, teacher, batch).item() == 0.0
    add_lora(base, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                    "down_proj"], r=2, alpha=4)
    with torch.no_grad():  # a nonzero B, so every lora_A gets a gradient
        base.get_submodule(next(iter(planted))).lora_B.normal_()
    loss = planted_loss(base, teacher, batch)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in base.named_parameters()
               if "lora_A" in n)


def test_vocab_size_reads_the_token_embedding():
    import models

    assert vocab_size(Tiny(vocab=37)) == 37
    assert vocab_size(models.BertModel(models.TINY)) == models.TINY.vocab_size


# -----------------------------------------------------------------------------
# the oracle allocation and recovery


def test_oracle_ranks_hand_made():
    """Budget 12, b planted at 5: 7 left for a, c, d -> 3, 2, 2 (the extra rank to the first)."""
    assert oracle_ranks(["a", "b", "c", "d"], {"b": 5}, 12) == {"a": 3, "b": 5, "c": 2, "d": 2}
    assert oracle_ranks(["a", "b"], {"a": 4, "b": 4}, 8) == {"a": 4, "b": 4}
    with pytest.raises(ValueError, match="leaves 1 for 2 other"):  # --compare with a low --r
        oracle_ranks(["a", "b", "c"], {"a": 8}, 9)


@given(st.integers(1, 12), st.data())
def test_oracle_ranks_sum_to_the_budget_and_spread_evenly(m, data):
    names = [f"m{i}" for i in range(m)]
    planted = {n: data.draw(st.integers(1, 32)) for n in
               data.draw(st.sets(st.sampled_from(names), max_size=m - 1))}
    budget = sum(planted.values()) + data.draw(st.integers(m - len(planted), 200))
    r = oracle_ranks(names, planted, budget)
    assert sum(r.values()) == budget and all(r[n] == k for n, k in planted.items())
    rest = [r[n] for n in names if n not in planted]
    assert min(rest) >= 1 and max(rest) - min(rest) <= 1


def test_rank_recovery_hand_made():
    """ranks a=8, b=4, c=2, d=2 with planted {a: 4, c: 4}: planted mean (8+2)/2 = 5, other
    mean (4+2)/2 = 3, share 10/16, chance 2/4, covered 1 (a: 8 >= 4; c: 2 < 4)."""
    r = rank_recovery({"a": 8, "b": 4, "c": 2, "d": 2}, {"a": 4, "c": 4})
    assert r == {"mean_rank_planted": 5.0, "mean_rank_other": 3.0, "share_planted": 0.625,
                 "chance_share": 0.5, "covered": 1}
    assert rank_recovery({"a": 4, "b": 1}, {"a": 4})["covered"] == 1  # exactly its rank counts
