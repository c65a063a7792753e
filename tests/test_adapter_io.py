"""Adapter files under bad input: a load is all or nothing, configs and safetensors headers only
ever raise ValueError, writes are durable with normal permissions, PEFT reads our task_type.

Oracles: a bitwise snapshot of the model (state_dict bytes, every layer's r / alpha / rslora /
requires_grad, the Parameter objects themselves and torch's RNG state) taken before a failed
load; hypothesis for random config fields and safetensors headers; tracemalloc for the reader's
allocations; peft (PeftModel.from_pretrained, PeftConfig) and a tiny random LlamaForCausalLM.

Run: .venv/bin/python -m pytest tests/test_adapter_io.py -q
"""

import copy
import json
import os
import shutil
import stat
import struct
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import lora
from lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, add_lora, load_adapter, lora_layers,
                  read_safetensors, save_adapter, write_safetensors)

LAYERS = ["block.0.query", "block.0.dense", "block.1.query", "block.1.dense"]


class Net(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.block = nn.ModuleList(nn.ModuleDict({"query": nn.Linear(d, d),
                                                  "dense": nn.Linear(d, 2 * d)}) for _ in range(2))
        self.classifier = nn.Linear(2 * d, 3)

    def forward(self, x):
        for b in self.block:
            x = b["dense"](torch.tanh(b["query"](x)))[..., : x.shape[-1]]
        return self.classifier(torch.cat([x, x], -1))


def trained(seed: int, **kw) -> Net:
    """A Net with LoRA on query and dense, non-zero B, a changed head: 'work' a load may lose."""
    torch.manual_seed(seed)
    model = Net()
    add_lora(model, ["query", "dense"], heads=["classifier"], **({"r": 2, "alpha": 4} | kw))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_()
        model.classifier.weight.add_(1.0)
    return model


def snapshot(model) -> tuple:
    sd = {k: v.reshape(-1).view(torch.uint8).clone() for k, v in model.state_dict().items()}
    layers = {n: (m.r, m.alpha, m.rslora, m.merged, m.lora_A.requires_grad, id(m.lora_A),
                  id(m.lora_B)) for n, m in lora_layers(model).items()}
    return sd, layers, torch.get_rng_state()


def assert_unchanged(model, snap) -> None:
    sd, layers, rng = snapshot(model)
    assert sd.keys() == snap[0].keys()
    assert all(torch.equal(sd[k], snap[0][k]) for k in sd), "a tensor changed"
    assert layers == snap[1], "a layer's r, alpha, flags or parameters changed"
    assert torch.equal(rng, snap[2]), "the global RNG was drawn from"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One adapter with per-matrix ranks and alphas, in both formats."""
    model = trained(1, r=3, alpha=6, rank_pattern={"block.1.dense": 4},
                    alpha_pattern={"block.0.dense": 1.5})
    root = tmp_path_factory.mktemp("saved")
    for fmt in ("fimlora", "peft"):
        save_adapter(root / fmt, model, ["query", "dense"], seed=0, heads=["classifier"],
                     format=fmt)
    return root, model


def edited(saved_root: Path, fmt: str, dest: Path, cfg_edit=None, sd_edit=None) -> Path:
    cfg = json.loads((saved_root / fmt / ADAPTER_CONFIG).read_text())
    sd = {k: v.clone() for k, v in read_safetensors(saved_root / fmt / ADAPTER_WEIGHTS)[0].items()}
    if cfg_edit:
        cfg_edit(cfg)
    if sd_edit:
        sd_edit(sd)
    dest.mkdir(parents=True, exist_ok=True)
    write_safetensors(dest / ADAPTER_WEIGHTS, sd)
    (dest / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    return dest


def test_good_adapter_loads_without_drawing_from_the_rng(saved, tmp_path):
    root, src = saved
    for fmt in ("fimlora", "peft"):
        model = trained(1)  # src's base weights, rank 2 everywhere
        rng = torch.get_rng_state()
        load_adapter(root / fmt, model)
        assert torch.equal(torch.get_rng_state(), rng)
        x = torch.randn(4, 6)
        assert torch.equal(model(x), src(x)), fmt


def _set(path, value):
    def edit(d):
        *parents, last = path
        for p in parents:
            d = d[p]
        if value is DELETE:
            del d[last]
        else:
            d[last] = value
    return edit


DELETE = object()
P = "base_model.model."
NAN, INF = float("nan"), float("inf")

# (format, config edit, tensor edit, message): each leaves the LAST layer or the head bad, so a
# load that resized or copied as it went would already have changed the model
BAD = {
    "head shape": ("fimlora", None, _set(["classifier.weight"], torch.zeros(4, 12)),
                   r"classifier.weight has shape \(4, 12\)"),
    "head dtype": ("fimlora", None, _set(["classifier.bias"], torch.ones(3, dtype=torch.int64)),
                   "classifier.bias has dtype torch.int64"),
    "head missing": ("fimlora", None, _set(["classifier.bias"], DELETE),
                     r"missing \['classifier.bias'\]"),
    "head NaN": ("fimlora", None, _set(["classifier.bias"], torch.tensor([0, NAN, 0])),
                 "classifier.bias has non-finite"),
    "head unknown": ("fimlora", _set(["heads"], ["classifier", "pooler"]), None,
                     "head 'pooler' is not a module"),
    "lora_B inf": ("fimlora", None, lambda sd: sd["block.1.dense.lora_B"].__setitem__((0, 0), INF),
                   "block.1.dense.lora_B has non-finite"),
    "lora_A bool": ("fimlora", None, lambda sd: sd.__setitem__(
        "block.1.dense.lora_A", sd["block.1.dense.lora_A"] > 0), "lora_A has dtype torch.bool"),
    "alpha str": ("fimlora", _set(["alphas", "block.1.dense"], "6"), None,
                  r"alphas\['block.1.dense'\]: alpha='6' is invalid: use a finite number"),
    "alpha NaN": ("fimlora", _set(["alphas", "block.1.dense"], NAN), None,
                  r"alphas\['block.1.dense'\]: alpha=nan"),
    "alpha missing": ("fimlora", _set(["alphas", "block.1.dense"], DELETE), None,
                      r"alphas \['block.1.dense'\] differ"),
    "alphas list": ("fimlora", _set(["alphas"], [6, 6, 6, 6]), None, r"alphas=\[6, 6, 6, 6\]"),
    "rank float": ("fimlora", _set(["ranks", "block.1.dense"], 4.0), None,
                   r"ranks\['block.1.dense'\]: r=4.0 is invalid: use an int >= 0"),
    "rank negative": ("fimlora", _set(["ranks", "block.1.dense"], -4), None,
                      r"ranks\['block.1.dense'\]: r=-4"),
    "rank vs tensors": ("fimlora", _set(["ranks", "block.1.dense"], 5), None,
                        r"dense.lora_A has shape \(4, 6\), the model needs \(5, 6\)"),
    "ranks missing": ("fimlora", _set(["ranks"], DELETE), None, "adapter modules .* differ"),
    "unknown module": ("fimlora", _set(["ranks", "block.2.dense"], 3), None, "block.2.dense"),
    "rslora str": ("fimlora", _set(["rslora"], "false"), None, "rslora='false' differs"),
    "rslora differs": ("fimlora", _set(["rslora"], True), None, "add_lora with the adapter's rslo"),
    "extra tensor": ("fimlora", None, _set(["block.0.query.bias2"], torch.zeros(6)),
                     r"unexpected \['block.0.query.bias2'\]"),
    "no format": ("fimlora", _set(["format"], DELETE), None, "neither"),
    "peft alpha str": ("peft", _set(["lora_alpha"], "6"), None, "lora_alpha='6'"),
    "peft rslora int": ("peft", _set(["use_rslora"], 1), None, "rslora=1 differs"),
    "peft alpha_pattern list": ("peft", _set(["alpha_pattern"], [["block.1.dense", 4]]), None,
                                "alpha_pattern="),
    "peft alpha_pattern regex": ("peft", _set(["alpha_pattern", "block.(1"], 4), None,
                                 r"alpha_pattern key 'block.\(1' is not a valid regular"),
    "peft alpha_pattern inf": ("peft", _set(["alpha_pattern", "^block\\.0\\.dense"], INF), None,
                               "alpha_pattern"),
    "peft modules_to_save dict": ("peft", _set(["modules_to_save"], {"a": 1}), None,
                                  "modules_to_save="),
    "peft head shape": ("peft", None, _set([P + "classifier.weight"], torch.zeros(3, 6)),
                        "classifier.weight has shape"),
    "peft head NaN": ("peft", None, _set([P + "classifier.bias"], torch.full((3,), NAN)),
                      "classifier.bias has non-finite"),
    "peft head missing": ("peft", None, _set([P + "classifier.weight"], DELETE),
                          "missing.*classifier.weight"),
    "peft lora_B missing": ("peft", None, _set([P + "block.1.dense.lora_B.weight"], DELETE),
                            r"missing \['block.1.dense.lora_B'\]"),
    "peft lora_A 1-d": ("peft", None, _set([P + "block.1.dense.lora_A.weight"], torch.zeros(4)),
                        r"block.1.dense.lora_A has shape \(4,\)"),
    "peft tensor of no LoRA layer": ("peft", None, _set([P + "block.1.x.lora_A.weight"],
                                                        torch.zeros(2, 6)),
                                     r"unexpected \['block.1.x.lora_A'\]"),
    "peft dora": ("peft", _set(["use_dora"], True), None, "use_dora=True"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_adapter_raises_and_leaves_the_model_bitwise_unchanged(saved, tmp_path, kind):
    fmt, cfg_edit, sd_edit, match = BAD[kind]
    folder = edited(saved[0], fmt, tmp_path / "bad", cfg_edit, sd_edit)
    model = trained(2)  # rank 2 everywhere: a load that starts resizing changes it
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match) as e:
        load_adapter(folder, model)
    assert str(folder) in str(e.value), "the message names the file"
    assert_unchanged(model, snap)


def test_load_into_a_merged_model_raises_unchanged(saved):
    model = trained(2)
    lora.merge_lora(model)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"merged: merge_lora\(model, False\)"):
        load_adapter(saved[0] / "fimlora", model)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("raw, match", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON in UTF-8"),
    (b"[1, 2]", "JSON list, not a JSON object"),
    (b'"adapter"', "JSON str, not a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    (b'{"peft_type": "LORA", "r": ' + b"9" * 5000 + b"}", "not valid JSON"),
])
def test_config_that_is_not_a_json_object_raises_naming_the_file(saved, tmp_path, raw, match):
    shutil.copytree(saved[0] / "fimlora", tmp_path / "a")
    (tmp_path / "a" / ADAPTER_CONFIG).write_bytes(raw)
    with pytest.raises(ValueError, match=match) as e:
        load_adapter(tmp_path / "a", trained(2))
    assert ADAPTER_CONFIG in str(e.value)


def test_peft_bin_adapter_is_refused_naming_the_file_and_the_fix(saved, tmp_path):
    """PEFT's pickled adapter_model.bin is not read (a pickle can run code): the message names
    the file and safe_serialization; with no weights at all, the missing file is named."""
    (tmp_path / "a").mkdir()
    shutil.copy(saved[0] / "peft" / ADAPTER_CONFIG, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match=f"{ADAPTER_WEIGHTS} not found"):
        load_adapter(tmp_path / "a", trained(2))
    torch.save({"x": torch.zeros(2)}, tmp_path / "a" / "adapter_model.bin")
    model = trained(2)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=f"{tmp_path / 'a' / 'adapter_model.bin'}: a pickle.*"
                                         "safe_serialization=True"):
        load_adapter(tmp_path / "a", model)
    assert_unchanged(model, snap)


# hypothesis: any JSON value in any config field -> ValueError or a successful load

REGEXY = ["(", "[a-", "*", "query", "dense", "block.1.dense", "^block\\.0\\.query", ".*", "",
          "classifier", "LORA", "SEQ_CLS", "fimlora-adapter-v1", "none"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6)
    | st.sampled_from(REGEXY) | st.integers(0, 5),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(REGEXY + LAYERS) | st.text(max_size=4), inner, max_size=4),
    max_leaves=8)
FIELDS = {
    "fimlora": [["format"], ["ranks"], ["alphas"], ["rslora"], ["heads"], ["targets"], ["seed"]]
    + [[f, n] for f in ("ranks", "alphas") for n in LAYERS],
    "peft": [[f] for f in ("peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern",
                           "alpha_pattern", "target_modules", "exclude_modules", "modules_to_save",
                           "task_type", "use_dora", "bias", "fan_in_fan_out", "lora_bias",
                           "layers_to_transform", "trainable_token_indices")]
    + [["rank_pattern", "^block\\.1\\.dense"], ["alpha_pattern", "^block\\.0\\.dense"]],
}


@settings(max_examples=40)
@given(data=st.data(), fmt=st.sampled_from(["fimlora", "peft"]))
def test_config_fuzz_raises_only_value_error_and_changes_nothing_on_error(saved, data, fmt):
    edits = data.draw(st.lists(st.tuples(st.sampled_from(FIELDS[fmt]),
                                         json_values | st.just(DELETE)), min_size=1, max_size=3))

    def cfg_edit(cfg):
        for path, value in edits:
            parent = cfg if len(path) == 1 else cfg.get(path[0])
            if isinstance(parent, dict):
                if value is DELETE:
                    parent.pop(path[-1], None)
                else:
                    parent[path[-1]] = value

    with tempfile.TemporaryDirectory() as tmp:
        folder = edited(saved[0], fmt, Path(tmp) / "a", cfg_edit)
        model = trained(2)
        snap = snapshot(model)
        try:
            load_adapter(folder, model)
        except ValueError as e:
            assert str(folder) in str(e)
            assert_unchanged(model, snap)


@settings(max_examples=50)
@given(raw=st.binary(max_size=64))
def test_config_bytes_fuzz_raises_value_error(saved, raw):
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(saved[0] / "fimlora", Path(tmp) / "a")
        (Path(tmp) / "a" / ADAPTER_CONFIG).write_bytes(raw)
        with pytest.raises(ValueError):
            load_adapter(Path(tmp) / "a", trained(2))


# safetensors reader: random and odd headers, lying offsets, truncation


def _st_file(path: Path, header, data: bytes = b"", n: int | None = None) -> Path:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if n is None else n) + h + data)
    return path


def _read_bounded(path: Path):
    """read_safetensors under tracemalloc: ValueError or a result, never a big allocation."""
    size = path.stat().st_size
    tracemalloc.start()
    try:
        return read_safetensors(path)
    except ValueError:
        return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= 16 * size + 256 * 1024, f"peak {peak:,} bytes for a {size:,}-byte file"


entries = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "X9"]) | json_values,
    "shape": st.lists(st.integers(-1, 3) | st.integers(0, 2**64) | st.booleans() | st.floats(),
                      max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(-2, 40) | st.booleans(), max_size=3) | json_values,
}) | json_values | st.sampled_from(["F32", "U8", "__metadata__"])


@settings(max_examples=120)
@given(header=st.dictionaries(st.text(max_size=3) | st.just("__metadata__"), entries,
                              max_size=4) | json_values,
       data=st.binary(max_size=48), n_delta=st.none() | st.integers(-12, 12) | st.just(2**62))
def test_safetensors_header_fuzz_raises_only_value_error(tmp_path_factory, header, data, n_delta):
    path = tmp_path_factory.mktemp("st") / "f.safetensors"
    h = json.dumps(header).encode()
    _st_file(path, h, data, None if n_delta is None else max(len(h) + n_delta, 0))
    out = _read_bounded(path)
    if out is not None:  # accepted: then the tensors tile the data section exactly
        assert sum(t.numel() * t.element_size() for t in out[0].values()) == len(data)


@settings(max_examples=60)
@given(shapes=st.lists(st.lists(st.integers(0, 3), max_size=3), min_size=1, max_size=3),
       field=st.sampled_from(["dtype", "shape", "data_offsets"]), value=json_values,
       cut=st.none() | st.integers(0, 400), flip=st.none() | st.integers(0, 400))
def test_safetensors_mutated_valid_file_raises_only_value_error(tmp_path_factory, shapes, field,
                                                                value, cut, flip):
    path = tmp_path_factory.mktemp("st") / "f.safetensors"
    write_safetensors(path, {f"t{i}": torch.randn(s) for i, s in enumerate(shapes)}, {"k": "v"})
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["t0"][field] = value
    h = json.dumps(header).encode()
    raw = bytearray(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    if flip is not None and flip < len(raw):
        raw[flip] ^= 0xFF
    path.write_bytes(raw[:cut])
    _read_bounded(path)


def test_safetensors_truncated_at_every_byte_raises_value_error(tmp_path):
    path = tmp_path / "f.safetensors"
    write_safetensors(path, {"a": torch.randn(2, 3), "b": torch.arange(4)}, {"k": "v"})
    raw = path.read_bytes()
    for cut in range(len(raw)):
        path.write_bytes(raw[:cut])
        with pytest.raises(ValueError):
            read_safetensors(path)


OK = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}


@pytest.mark.parametrize("header, match", [
    ({"a": OK | {"shape": [True]}}, r"has header .*'shape': \[True\]"),
    ({"a": OK | {"data_offsets": [False, 4]}}, "data_offsets"),
    ({"a": OK | {"shape": [1.0]}}, "has header"),
    ({"a": OK | {"shape": [2**62, 2**62]}}, r"has header .*\[4611686018427387904"),
    ({"a": OK | {"shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}, "has header"),
    ({"a": OK | {"shape": [1] * 65}}, "malformed shape"),
    ({"a": OK | {"dtype": ["F32"]}}, r"'dtype': \['F32'\]"),
    ({"a": [1, 2]}, r"tensor 'a' has header \[1, 2\]"),
    ({"a": "F32"}, "tensor 'a' has header 'F32'"),
    ({"a": OK, "__metadata__": {"k": 1}}, "__metadata__"),
    ({"a": OK, "__metadata__": ["k"]}, "__metadata__"),
    ({"a": OK, "__metadata__": "k"}, "__metadata__"),
    ([OK], "not a JSON object"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', "has header {}"),
])
def test_safetensors_odd_headers_raise(tmp_path, header, match):
    with pytest.raises(ValueError, match=match):
        read_safetensors(_st_file(tmp_path / "f.safetensors", header, b"\0" * 4))


def test_safetensors_null_metadata_and_huge_empty_dims_are_valid(tmp_path):
    header = {"__metadata__": None, "a": OK, "e": {"dtype": "F16", "shape": [2**62, 0],
                                                   "data_offsets": [4, 4]}}
    tensors, meta = read_safetensors(_st_file(tmp_path / "f.safetensors", header, b"\0" * 4))
    assert meta == {} and tensors["e"].shape == (2**62, 0) and tensors["a"].tolist() == [0.0]


def test_safetensors_header_over_100_mb_is_refused_before_reading(tmp_path):
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as f:  # a sparse 200 MB file: no disk used
        f.write(struct.pack("<Q", 150_000_000) + b"{")
        f.truncate(200_000_000)
    tracemalloc.start()
    with pytest.raises(ValueError, match="100 MB"):
        read_safetensors(path)
    assert tracemalloc.get_traced_memory()[1] < 1_000_000
    tracemalloc.stop()


# writes: fsync before rename, normal permissions, nothing half-written


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_get_open_mode_under_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_adapter(tmp_path / "a", trained(0), ["query", "dense"], format="peft")
    finally:
        os.umask(old)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        assert stat.S_IMODE((tmp_path / "a" / name).stat().st_mode) == mode, name
    assert os.umask(old) == old  # the umask read inside atomic_write was put back


def test_atomic_write_fsyncs_before_replace(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), replace(a, b))[1])
    lora.atomic_write(tmp_path / "f", lambda f: f.write(b"data"))
    assert events[:2] == ["fsync", "replace"] and (tmp_path / "f").read_bytes() == b"data"


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    (tmp_path / "f").write_bytes(b"old")

    def boom(f):
        f.write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        lora.atomic_write(tmp_path / "f", boom)
    assert (tmp_path / "f").read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(heads=["pooler"]), "head 'pooler'"), (dict(heads=[0]), "heads=\\[0\\]"),
    (dict(targets=[None]), "targets=\\[None\\]"), (dict(format="npz"), "format='npz'"),
])
def test_save_adapter_bad_arguments_raise_before_any_write(tmp_path, kwargs, match):
    kw = dict(targets=["query"], format="peft") | kwargs
    with pytest.raises(ValueError, match=match):
        save_adapter(tmp_path / "a", trained(0), **kw)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("heads, task_type, expected", [
    (["classifier"], None, "SEQ_CLS"), ([], None, None), ([], "CAUSAL_LM", "CAUSAL_LM"),
    (["classifier"], "TOKEN_CLS", "TOKEN_CLS")])
def test_peft_task_type_default_and_explicit(tmp_path, heads, task_type, expected):
    save_adapter(tmp_path, trained(0), ["query", "dense"], heads=heads, format="peft",
                 task_type=task_type)
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["task_type"] == expected


@pytest.mark.peer
def test_causal_lm_adapter_loads_in_peft_with_equal_logits(tmp_path):
    """A tiny random LlamaForCausalLM (no download), LoRA on q_proj / v_proj with two ranks,
    saved with task_type="CAUSAL_LM": PeftConfig reads that task type and PeftModel gives our
    logits."""
    transformers = pytest.importorskip("transformers", reason="pip install -r "
                                       "requirements-peers.txt")
    peft = pytest.importorskip("peft", reason="pip install -r requirements-peers.txt")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    base = transformers.LlamaForCausalLM(config).eval()
    ours = copy.deepcopy(base)
    add_lora(ours, ["q_proj", "v_proj"], r=4, alpha=8,
             rank_pattern={"model.layers.1.self_attn.q_proj": 2})
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            layer.lora_B.normal_(0, 0.1)
    save_adapter(tmp_path, ours, ["q_proj", "v_proj"], format="peft", task_type="CAUSAL_LM")
    assert peft.PeftConfig.from_pretrained(tmp_path).task_type == "CAUSAL_LM"
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        mine = ours(input_ids=ids).logits
        served = peft.PeftModel.from_pretrained(base, tmp_path).eval()
        theirs = served(input_ids=ids).logits
    assert isinstance(served, peft.PeftModelForCausalLM)
    assert (mine - plain).abs().max() > 1e-3, "the adapter must change the logits"
    torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-5)


def _served_by_one_scale(folder: Path, base: nn.Module) -> int:
    """Serve a PEFT adapter folder as vLLM's loader does (vllm/lora/peft_helper.py,
    lora_model.py, layers/base_linear.py): one scale s = lora_alpha / r (lora_alpha / √r with
    use_rslora) for every module, rank_pattern and alpha_pattern not read, each module's A and B
    zero-padded to max_lora_rank; W_m += s·B_m A_m is merged into `base`. Returns the
    max_lora_rank used: the largest saved r_m (the config's r is only the most common one)."""
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    sd, _ = read_safetensors(folder / ADAPTER_WEIGHTS)
    s = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg["use_rslora"] else cfg["r"])
    names = [k[len(lora.PEFT_PREFIX):-len(".lora_A.weight")] for k in sd if "lora_A" in k]
    max_lora_rank = max(sd[f"{lora.PEFT_PREFIX}{n}.lora_A.weight"].shape[0] for n in names)
    modules = dict(base.named_modules())
    with torch.no_grad():
        for n in names:
            A, B = (sd[f"{lora.PEFT_PREFIX}{n}.lora_{x}.weight"] for x in "AB")
            A_pad = A.new_zeros(max_lora_rank, A.shape[1])
            B_pad = B.new_zeros(B.shape[0], max_lora_rank)
            A_pad[: A.shape[0]], B_pad[:, : B.shape[1]] = A, B
            modules[n].weight.add_(s * B_pad @ A_pad)
    return max_lora_rank


@pytest.mark.parametrize("rslora", [False, True])
def test_fim_adapter_served_with_one_scale_for_every_module_gives_our_logits(tmp_path, rslora):
    """A FIM adapter with heterogeneous ranks on the tiny decoder, saved in PEFT's format, served
    by the single-scale rule (_served_by_one_scale): the logits equal the adapted model's. It
    holds because FIM keeps every matrix at the base scale (α_m/r_m = α/r, rsLoRA α_m/√r_m =
    α/√r), so lora_alpha/r of the most common rank is every module's scale. Oracle: our model."""
    from data.causal import causal_loss, collate
    from fimlora import initialize_fim_ranks
    from models import load_model
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model, _ = load_model("tiny-llama", generator=torch.Generator().manual_seed(0))
    base = copy.deepcopy(model).eval()
    add_lora(model, targets, r=4, alpha=8, rslora=rslora)
    g = torch.Generator().manual_seed(1)
    calib = [collate([torch.randint(3, 200, (9,), generator=g).tolist() for _ in range(4)],
                     [2] * 4, 0) for _ in range(2)]
    ranks = initialize_fim_ranks(model, calib, lambda m, b: causal_loss(
        m(b["input_ids"], b["attention_mask"]), b), n_batches=2, generator=g)["ranks"]
    with torch.no_grad():  # "trained": every B non-zero
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.05, generator=g)
    save_adapter(tmp_path, model.eval(), targets, format="peft", task_type="CAUSAL_LM")
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert cfg["alpha_pattern"] and max(ranks.values()) > cfg["r"]  # patterns a server ignores
    ids = torch.randint(3, 200, (2, 11), generator=g)
    with torch.no_grad():
        plain, ours = base(ids), model(ids)
        assert _served_by_one_scale(tmp_path, base) == max(ranks.values())
        served = base(ids)
    assert (ours - plain).abs().max() > 1e-2, "the adapter must change the logits"
    torch.testing.assert_close(served, ours, rtol=1e-5, atol=1e-5)
@pytest.mark.parametrize("key", [".*1.dense", "block.1.dense", "^block\\.1\\.dense$",
                                 "block.(1|7).(?:dense|x)", "(bl|x)ock\\.1\\.dense",
                                 "[b]lock.[1-1].dense", ".*1\\.de.*", "(a|b)" * 9 + "|.*1.de.*"])
def test_peft_alpha_pattern_regex_applies_peft_rule(saved, tmp_path, key):
    """Keys written as names, '.', escapes, classes, '.*' and groups (512 alternatives in the
    last) give the alphas PEFT's get_pattern_key gives (first match, else lora_alpha); ranks
    are the saved tensors' (block.1.dense has 4)."""
    def cfg_edit(cfg):
        cfg["alpha_pattern"] = {"^block\\.0\\.dense": 1.5, key: 9.0}
    folder = edited(saved[0], "peft", tmp_path / "a", cfg_edit)
    model = trained(2)
    load_adapter(folder, model)
    assert {n: (m.r, m.alpha) for n, m in lora_layers(model).items()} == {
        "block.0.query": (3, 6), "block.0.dense": (3, 1.5), "block.1.query": (3, 6),
        "block.1.dense": (4, 9)}


# hostile files: FIFOs, devices, unreadable files, huge headers


def _returns_within(fn, seconds: float = 30.0):
    """fn()'s exception or result, or a test failure if it blocks (a FIFO read never returns)."""
    import threading
    out = []

    def run():
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} blocked for {seconds} s"
    return out[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_or_device_as_safetensors_is_refused_without_blocking(saved, tmp_path):
    os.mkfifo(tmp_path / "fifo.safetensors")
    (tmp_path / "zero.safetensors").symlink_to("/dev/zero")
    for name in ("fifo.safetensors", "zero.safetensors"):
        e = _returns_within(lambda: read_safetensors(tmp_path / name))
        assert isinstance(e, ValueError) and "not a regular file" in str(e), e
    for f, weights in (("config", False), ("weights", True)):
        folder = tmp_path / f
        shutil.copytree(saved[0] / "peft", folder)
        target = folder / (ADAPTER_WEIGHTS if weights else ADAPTER_CONFIG)
        target.unlink()
        os.mkfifo(target)
        e = _returns_within(lambda: load_adapter(folder, trained(2)))
        assert isinstance(e, ValueError) and f"{target} is not a regular file" in str(e), e


def test_unreadable_adapter_file_names_the_file_and_the_fix(saved, tmp_path, monkeypatch):
    """chmod 000 does not stop root, so os.open is made to refuse the one file."""
    shutil.copytree(saved[0] / "fimlora", tmp_path / "a")
    real_open = os.open

    def denied(path, *a, **kw):
        if Path(path).name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)
    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(ValueError, match=f"cannot read {tmp_path / 'a' / ADAPTER_CONFIG}: "
                                         "Permission denied: make it readable"):
        load_adapter(tmp_path / "a", trained(2))
    with pytest.raises(ValueError, match="adapter_model.safetensors: Permission denied"):
        read_safetensors(tmp_path / "a" / ADAPTER_WEIGHTS)


def test_config_over_the_byte_bound_is_refused_before_reading(saved, tmp_path, monkeypatch):
    shutil.copytree(saved[0] / "fimlora", tmp_path / "a")
    monkeypatch.setattr(lora, "JSON_LIMIT", 64)
    with pytest.raises(ValueError, match="adapter_config.json is .* bytes, over the 64"):
        load_adapter(tmp_path / "a", trained(2))


def test_safetensors_header_with_too_many_entries_is_refused(tmp_path, monkeypatch):
    """1.3 M empty entries took 30 s and 2 GB; the count is bounded before the JSON is parsed
    (here the bound is lowered to 4 so the file stays small)."""
    assert 10**4 <= lora._ST_MAX_TENSORS <= 10**6
    monkeypatch.setattr(lora, "_ST_MAX_TENSORS", 4)
    empty = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    for n, ok in ((4, True), (5, False)):
        path = _st_file(tmp_path / f"{n}.safetensors", {f"t{i}": empty for i in range(n)})
        if ok:
            assert len(read_safetensors(path)[0]) == n
        else:
            with pytest.raises(ValueError, match="over 4 entries"):
                read_safetensors(path)
