"""lora.py against a slow dense float64 reference: y = x @ (W0 + s·B@A).T + b.

Run: .venv/bin/python -m pytest tests/test_lora.py -q
"""

import json
import math
import struct

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lora import (LoRALinear, add_lora, load_adapter, load_lora_state_dict, lora_layers,
                  lora_state_dict, merge_lora, read_safetensors, resize_lora,
                  save_adapter, write_safetensors)

dims = st.integers(1, 12)
ranks = st.integers(0, 6)
alphas = st.floats(0.25, 32, allow_nan=False)


class Net(nn.Module):
    """Two blocks with the same leaf names, so suffix matching is exercised."""

    def __init__(self, d=6):
        super().__init__()
        self.block = nn.ModuleList(nn.ModuleDict({"query": nn.Linear(d, d),
                                                  "dense": nn.Linear(d, 2 * d)})
                                   for _ in range(2))
        self.classifier = nn.Linear(2 * d, 3)

    def forward(self, x):
        for b in self.block:
            x = b["dense"](torch.tanh(b["query"](x)))[..., : x.shape[-1]]
        return self.classifier(torch.cat([x, x], -1))


def randomize_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            B = layer.lora_B
            B.copy_(torch.randn(B.shape, generator=g, dtype=B.dtype))


@settings(max_examples=40)
@given(d_in=dims, d_out=dims, r=ranks, alpha=alphas, rslora=st.booleans(), bias=st.booleans())
def test_forward_equals_dense_reference(d_in, d_out, r, alpha, rslora, bias):
    base = nn.Linear(d_in, d_out, bias=bias, dtype=torch.float64)
    layer = LoRALinear(base, r, alpha, rslora=rslora)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 2, d_in, dtype=torch.float64)
    s = alpha / (math.sqrt(r) if rslora else r) if r else 0.0
    W = base.weight + s * layer.lora_B @ layer.lora_A
    ref = x @ W.T + (base.bias if bias else 0)
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)
    assert layer.scaling == pytest.approx(s)


def test_forward_and_backward_under_bf16_autocast_match_the_out_of_place_reference():
    """The adapter path is added in place (no autocast there): under autocast (bf16, as train.py
    runs on CUDA; CPU autocast here) the output is bf16 and output and gradients equal
    F.linear(x, W0, b) + s·(x Aᵀ) Bᵀ computed with the same casts."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 12), 4, alpha=8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 16, requires_grad=True)
    grads = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        u = F.linear(x, layer.lora_A)
        ref = F.linear(x, layer.weight, layer.bias) + layer.scaling * F.linear(u, layer.lora_B)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 12)
    for out in (y, ref):
        grads.append(torch.autograd.grad(out.float().square().sum(),
                                         [x, layer.lora_A, layer.lora_B]))
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    for g, w in zip(*grads):  # bf16 rounds at other points in each: compare in norm
        assert g.dtype == w.dtype and (g - w).norm() <= 2e-2 * w.norm()


@given(d_in=dims, d_out=dims, r=st.integers(1, 6))
def test_zero_B_gives_base_output(d_in, d_out, r):
    base = nn.Linear(d_in, d_out)
    x = torch.randn(4, d_in)
    expected = base(x)
    layer = LoRALinear(base, r, 2 * r)
    assert torch.equal(layer(x), expected)
    assert layer.lora_A.abs().sum() > 0  # A is Kaiming, not zero: only B starts at 0
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(d_in) + 1e-7  # kaiming_uniform(a=√5) bound


@given(r=st.integers(1, 6), alpha=alphas, rslora=st.booleans())
def test_merge_matches_unmerged_and_unmerge_restores_W0(r, alpha, rslora):
    base = nn.Linear(7, 5, dtype=torch.float64)
    W0 = base.weight.detach().clone()
    layer = LoRALinear(base, r, alpha, rslora=rslora)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 7, dtype=torch.float64)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.weight, W0 + layer.delta_weight(), rtol=0, atol=0)
    layer.merge()  # idempotent: merging twice must not add ΔW twice
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    layer.merge(False)  # unmerge
    torch.testing.assert_close(layer.weight, W0, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)


def test_adapters_follow_base_device_and_dtype():
    layer = LoRALinear(nn.Linear(4, 3, dtype=torch.float64), 2, 4)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64
    assert layer.weight is not None and layer.lora_A.device == layer.weight.device


def test_add_lora_freezes_all_but_adapters_and_heads():
    model = Net()
    names = add_lora(model, ["query", "dense"], r=2, alpha=4, heads=["classifier"])
    assert names == ["block.0.query", "block.0.dense", "block.1.query", "block.1.dense"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{m}.lora_{x}" for m in names for x in "AB"}
    expected |= {"classifier.weight", "classifier.bias"}
    assert trainable == expected


def test_add_lora_keeps_base_parameter_names():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, ["query"], r=2, alpha=4)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v)


def test_rank_and_alpha_patterns_apply_per_matrix():
    model = Net()
    add_lora(model, ["query", "dense"], r=2, alpha=4, rslora=True,
             rank_pattern={"block.1.dense": 5, "0.query": 1}, alpha_pattern={"block.1.dense": 10})
    layers = lora_layers(model)
    assert {n: m.r for n, m in layers.items()} == {
        "block.0.query": 1, "block.0.dense": 2, "block.1.query": 2, "block.1.dense": 5}
    assert layers["block.1.dense"].scaling == pytest.approx(10 / math.sqrt(5))
    assert layers["block.0.dense"].scaling == pytest.approx(4 / math.sqrt(2))
    assert layers["block.1.dense"].lora_A.shape == (5, 6)
    assert layers["block.1.dense"].lora_B.shape == (12, 5)


def test_pattern_key_matching_nothing_raises():
    with pytest.raises(ValueError, match="base_model.model.block.0.query"):
        add_lora(Net(), ["query"], r=2, alpha=4, rank_pattern={"base_model.model.block.0.query": 3})


def test_unknown_target_lists_existing_linears():
    with pytest.raises(ValueError, match="block.0.dense"):
        add_lora(Net(), ["q_proj"], r=2, alpha=4)


def test_unknown_head_raises():
    with pytest.raises(ValueError, match="score"):
        add_lora(Net(), ["query"], r=2, alpha=4, heads=["score"])


@pytest.mark.parametrize("bad", [dict(r=-1), dict(alpha=float("nan")), dict(dropout=1.0)])
def test_bad_hyperparameters_raise(bad):
    kwargs = dict(r=2, alpha=4) | bad
    with pytest.raises(ValueError):
        add_lora(Net(), ["query"], **kwargs)


def test_resize_keeps_function_and_sets_alpha():
    model = Net()
    add_lora(model, ["query", "dense"], r=4, alpha=8)
    x = torch.randn(3, 6)
    y = model(x)
    layer = lora_layers(model)["block.0.dense"]
    resize_lora(layer, 7, alpha=14)
    assert layer.lora_A.shape == (7, 6) and layer.lora_B.shape == (12, 7)
    assert layer.lora_A.requires_grad and layer.scaling == pytest.approx(2.0)
    assert torch.equal(model(x), y)
    resize_lora(layer, 0)
    assert layer.scaling == 0 and torch.equal(model(x), y)


@pytest.mark.parametrize("fmt", ["fimlora", "peft"])
def test_adapter_roundtrip_gives_identical_outputs(tmp_path, fmt):
    torch.manual_seed(0)
    model = Net()
    plain = Net()
    plain.load_state_dict(model.state_dict())
    add_lora(model, ["query", "dense"], r=3, alpha=6, rslora=True, heads=["classifier"],
             rank_pattern={"block.1.query": 5}, alpha_pattern={"block.0.dense": 1.5})
    randomize_B(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    x = torch.randn(4, 6)
    y = model(x)
    save_adapter(tmp_path / "a", model, ["query", "dense"], seed=123, heads=["classifier"],
                 format=fmt)
    assert not list((tmp_path / "a").glob("*.tmp")), "temp files must be renamed away"
    add_lora(plain, ["query", "dense"], r=3, alpha=6, rslora=True, heads=["classifier"])
    cfg = load_adapter(tmp_path / "a", plain)
    assert torch.equal(plain(x), y)
    ranks = {n: m.r for n, m in lora_layers(model).items()}
    assert {n: m.r for n, m in lora_layers(plain).items()} == ranks
    if fmt == "fimlora":
        assert cfg["seed"] == 123 and cfg["rslora"] is True


@pytest.mark.parametrize("field, value", [("use_dora", True), ("fan_in_fan_out", True),
                                          ("bias", "all"), ("lora_bias", True),
                                          ("layers_to_transform", [0]), ("peft_type", "LOHA")])
def test_unsupported_peft_config_raises_naming_the_field(tmp_path, field, value):
    model = Net()
    add_lora(model, ["query"], r=2, alpha=4)
    save_adapter(tmp_path, model, ["query"], format="peft")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg | {field: value}))
    with pytest.raises(ValueError, match=field):
        load_adapter(tmp_path, model)


def test_peft_format_leaves_rank_0_layers_out_and_loads_them_as_rank_0(tmp_path):
    """PEFT has no rank 0: the module is dropped from target_modules, and on load the untargeted
    LoRA layer gets r = 0 again, so outputs are identical."""
    model, plain = Net(), Net()
    plain.load_state_dict(model.state_dict())
    add_lora(model, ["query", "dense"], r=2, alpha=4, rank_pattern={"block.0.dense": 0})
    randomize_B(model)
    save_adapter(tmp_path, model, ["query", "dense"], format="peft")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["block.0.query", "block.1.query", "block.1.dense"]
    add_lora(plain, ["query", "dense"], r=2, alpha=4)
    load_adapter(tmp_path, plain)
    x = torch.randn(3, 6)
    assert plain.block[0]["dense"].r == 0 and torch.equal(plain(x), model(x))


def test_saving_a_model_without_lora_or_heads_is_refused_before_any_write(tmp_path):
    for fmt in ("fimlora", "peft"):
        with pytest.raises(ValueError, match="nothing to save: the model has no LoRA layer"):
            save_adapter(tmp_path / fmt, Net(), format=fmt)
        assert not (tmp_path / fmt).exists()


def test_load_state_dict_checks_shapes_before_writing():
    model = Net()
    add_lora(model, ["query"], r=2, alpha=4)
    sd = {k: v.clone() for k, v in lora_state_dict(model).items()}
    sd["block.1.query.lora_A"] = torch.zeros(3, 6)
    sd["block.0.query.lora_B"] = torch.ones(6, 2)
    with pytest.raises(ValueError, match="block.1.query.lora_A"):
        load_lora_state_dict(model, sd)
    assert lora_layers(model)["block.0.query"].lora_B.abs().sum() == 0  # nothing written
    del sd["block.1.query.lora_A"]
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(model, sd)


_dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16,
                           torch.int64, torch.int8, torch.uint8, torch.bool])


@settings(max_examples=50)
@given(shapes=st.lists(st.lists(st.integers(0, 4), max_size=3), min_size=0, max_size=4),
       dtype=_dtypes)
def test_safetensors_roundtrip(tmp_path_factory, shapes, dtype):
    path = tmp_path_factory.mktemp("st") / "t.safetensors"
    tensors = {f"t{i}": (torch.randn(s) * 10).to(dtype) for i, s in enumerate(shapes)}
    write_safetensors(path, tensors, {"k": "v"})
    back, meta = read_safetensors(path)
    assert meta == {"k": "v"} and back.keys() == tensors.keys()
    for k in tensors:
        assert back[k].dtype == dtype and torch.equal(back[k], tensors[k])


def _raw(path, header, data=b""):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


@pytest.mark.parametrize("header,data,match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 16, "offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "offsets"),
    ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "malformed shape"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "overlap"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "trailing"),
])
def test_safetensors_reader_rejects_bad_files(tmp_path, header, data, match):
    with pytest.raises(ValueError, match=match):
        read_safetensors(_raw(tmp_path / "bad.safetensors", header, data))


def test_safetensors_reader_rejects_huge_header_length(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ValueError, match="header length"):
        read_safetensors(p)


def test_scaling_rule():
    assert LoRALinear(nn.Linear(4, 3), 8, 16).scaling == 2.0
    assert LoRALinear(nn.Linear(4, 3), 16, 16, rslora=True).scaling == 4.0
    assert LoRALinear(nn.Linear(4, 3), 0, 16).scaling == 0.0


def test_merge_lora_whole_model():
    model = Net()
    add_lora(model, ["query", "dense"], r=2, alpha=4)
    randomize_B(model)
    x = torch.randn(2, 6)
    y = model(x)
    merge_lora(model)
    torch.testing.assert_close(model(x), y)
    merge_lora(model, False)
    torch.testing.assert_close(model(x), y)


def test_second_add_lora_keeps_earlier_adapters_requires_grad():
    """A second call adapts more modules; the first call's adapters keep their flag (trainable,
    or frozen on purpose), base weights stay frozen, heads are the second call's."""
    model = Net()
    add_lora(model, ["query"], r=2, alpha=4, heads=["classifier"])
    model.block[1]["query"].lora_A.requires_grad_(False)  # frozen on purpose
    model.block[1]["query"].lora_B.requires_grad_(False)
    names = add_lora(model, ["query", "dense"], r=3, alpha=6)  # query: already adapted, kept
    assert names == ["block.0.dense", "block.1.dense"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"block.0.query.lora_A", "block.0.query.lora_B",
                         *(f"block.{i}.dense.lora_{x}" for i in (0, 1) for x in "AB")}
    assert model.block[0]["query"].r == 2 and model.block[0]["dense"].r == 3


def _flags(model):
    return {n: (p.requires_grad, p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("bad, match", [
    (dict(targets=[1]), r"targets=\[1\]"), (dict(targets=None), "targets=None"),
    (dict(r=2.0), r"r=2.0 is invalid: use an int >= 0"),
    (dict(r="2"), "r='2'"), (dict(r=-1), "r=-1"),
    (dict(alpha="16"), "alpha='16' is invalid: use a finite number"),
    (dict(alpha=float("inf")), "alpha=inf"), (dict(alpha=10**400), "alpha=1000"),
    (dict(dropout=-0.1), r"dropout=-0.1 .*\[0, 1\)"), (dict(dropout=1.0), "dropout=1.0"),
    (dict(heads=[None]), r"heads=\[None\]"), (dict(heads=5), "heads=5"),
    (dict(rank_pattern=[("block.0.query", 2)]), "rank_pattern=.* use a dict"),
    (dict(rank_pattern={"block.0.query": 2.5}), r"rank_pattern\['block.0.query'\]: r=2.5"),
    (dict(alpha_pattern={"block.0.query": "x"}), r"alpha_pattern\['block.0.query'\]: alpha='x'"),
    (dict(targets=[""]), r"targets=\[''\] is invalid: use a list of module names"),
    (dict(targets=[]), "targets is empty: name the nn.Linear modules to adapt"),
])
def test_add_lora_bad_arguments_raise_value_error_before_any_change(bad, match):
    model = Net()
    before = _flags(model)
    with pytest.raises(ValueError, match=match):
        add_lora(model, **(dict(targets=["query"], r=2, alpha=4) | bad))
    assert _flags(model) == before and not lora_layers(model)


@pytest.mark.parametrize("args, match", [((-1,), "resize_lora: r=-1"), ((2.5,), "r=2.5"),
                                         ((2, "x"), "alpha='x'"), ((2, float("nan")), "alpha=nan")])
def test_resize_lora_bad_arguments_raise_and_keep_the_adapter(args, match):
    layer = LoRALinear(nn.Linear(4, 3), 2, 4)
    A = layer.lora_A
    with pytest.raises(ValueError, match=match):
        resize_lora(layer, *args)
    assert layer.lora_A is A and layer.r == 2 and layer.alpha == 4


def test_a_tied_or_shared_target_weight_is_refused_before_any_change():
    """Merging ΔW into a W0 that another module also uses would change that module: two Linears
    tied to one weight, or one Linear under two names, are refused, naming the other owner."""
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    twice = nn.Module()
    twice.enc = twice.dec = nn.Linear(4, 4)
    for model, target, other in ((tied, "1", "0.weight"), (tied, "0", "1.weight"),
                                 (twice, "dec", "enc.weight"), (twice, "enc", "dec.weight")):
        before = _flags(model)
        with pytest.raises(ValueError, match=f"{target} shares its weight with {other} "):
            add_lora(model, [target], r=2, alpha=4)
        assert _flags(model) == before and not lora_layers(model)


def test_resize_lora_on_a_merged_layer_raises_and_keeps_the_merged_weight():
    layer = LoRALinear(nn.Linear(4, 3), 2, 4)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.merge()
    W = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"merged layer loses ΔW: merge_lora\(model, False\)"):
        resize_lora(layer, 3)
    assert layer.r == 2 and torch.equal(layer.weight, W)


@pytest.mark.parametrize("base, kw, match", [
    (nn.Linear(4, 3), dict(r=1.5), "r=1.5"), (nn.Linear(4, 3), dict(alpha=None), "alpha=None")])
def test_lora_linear_bad_arguments_raise_value_error(base, kw, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(base, **(dict(r=2, alpha=4) | kw))


def test_lora_state_dict_unknown_head_raises():
    model = Net()
    add_lora(model, ["query"], r=2, alpha=4)
    with pytest.raises(ValueError, match="head 'pooler'"):
        lora_state_dict(model, ["pooler"])


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd["block.1.query.lora_B"].__setitem__((0, 0), float("nan")),
     "block.1.query.lora_B has non-finite"),
    (lambda sd: sd["classifier.bias"].__setitem__(0, float("-inf")),
     "classifier.bias has non-finite"),
    (lambda sd: sd.__setitem__("block.1.query.lora_A", torch.ones(2, 6, dtype=torch.int32)),
     "block.1.query.lora_A has dtype torch.int32"),
    (lambda sd: sd.__setitem__("block.1.query.lora_A", "weights"), "not a state dict"),
    (lambda sd: sd.__setitem__("block.0.query.weight", torch.zeros(6, 6, dtype=torch.float16)),
     r"unexpected \['block.0.query.weight'\]"),  # a frozen W0 is not an adapter's tensor
    (lambda sd: sd.__setitem__("block.1.query.lora_A", torch.ones(2, 6, dtype=torch.float64)
                               * 1e6), "lora_A has non-finite values .*float16"),
])
def test_load_state_dict_refuses_bad_values_before_writing(edit, match):
    model = Net().half()
    add_lora(model, ["query"], r=2, alpha=4, heads=["classifier"])
    sd = {k: v.clone() for k, v in lora_state_dict(model, ["classifier"]).items()}
    sd["block.0.query.lora_B"] = torch.ones(6, 2, dtype=torch.float16)
    edit(sd)
    with pytest.raises(ValueError, match=match):
        load_lora_state_dict(model, sd)
    assert lora_layers(model)["block.0.query"].lora_B.abs().sum() == 0  # nothing written
    with pytest.raises(ValueError, match="not a state dict"):
        load_lora_state_dict(model, [("block.0.query.lora_A", torch.zeros(2, 6))])


def test_load_state_dict_into_merged_layer_raises():
    model = Net()
    add_lora(model, ["query"], r=2, alpha=4)
    merge_lora(model)
    with pytest.raises(ValueError, match=r"merge_lora\(model, False\)"):
        load_lora_state_dict(model, lora_state_dict(model))


@pytest.mark.parametrize("tensors, metadata, match", [
    ({"__metadata__": torch.zeros(1)}, None, "another name"),
    ({"a": torch.zeros(1, dtype=torch.complex64)}, None, "complex64")])
def test_write_safetensors_bad_input_raises_before_writing(tmp_path, tensors, metadata, match):
    with pytest.raises(ValueError, match=match):
        write_safetensors(tmp_path / "t.safetensors", tensors, metadata)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("optimizer_first", [True, False])
def test_optimizer_built_before_or_after_the_allocation_trains_the_resized_adapters(
        optimizer_first):
    """initialize_fim_ranks (resize_lora) gives lora_A / lora_B new tensors but keeps the
    Parameter objects: an AdamW built before the allocation holds the model's adapters and
    trains every lora_B away from 0, as one built after it does (it used to hold orphaned
    parameters, and lora_B stayed 0). A frozen adapter stays frozen through a resize."""
    from fimlora import initialize_fim_ranks
    torch.manual_seed(0)
    model = Net()
    add_lora(model, ["query", "dense"], r=3, alpha=6)
    batches = [torch.randn(8, 6) for _ in range(3)]

    def loss_fn(m, x):
        return (m(x) - x[:, :3]).square().mean()

    def adamw():
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt = adamw() if optimizer_first else None
    ranks = initialize_fim_ranks(model, batches, loss_fn, n_batches=3, r_max=5)["ranks"]
    assert len(set(ranks.values())) > 1  # the allocation changed shapes
    opt = opt or adamw()
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    for x in batches:
        loss_fn(model, x).backward()
        opt.step()
        opt.zero_grad()
    assert all(bool(m.lora_B.any()) for m in lora_layers(model).values())
    layer = lora_layers(model)["block.0.query"]
    loss_fn(model, batches[0]).backward()  # a gradient of the old shape is left behind
    layer.lora_A.requires_grad_(False)
    resize_lora(layer, 2)
    assert not layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.lora_B.grad is None and layer.lora_B.shape == (6, 2)
    loss_fn(model, batches[0]).backward()  # accumulates into a fresh .grad of the new shape
