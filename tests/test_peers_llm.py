"""Fisher-guided LoRA on any Hugging Face causal LM, through the vendored lora.py and fimlora.py.

Oracles: transformers' LlamaForCausalLM built from a tiny random LlamaConfig (GQA, tied lm_head,
no download) and peft (PeftModel.from_pretrained, LoraConfig + get_peft_model, its LoraLayer's r
and scaling); a per-example autograd loop for the Fisher; the FW penalty written out with ΔW.
Checked: add_lora -> initialize_fim_ranks -> lorada_init -> FW-LoRA warm-up and penalty -> AdamW
-> save_adapter(format="peft", task_type="CAUSAL_LM") loads in PEFT with every layer's rank and
scale and the same logits; fim_rank_pattern -> LoraConfig gives PEFT the allocated ranks and
scales; an adapter train.py wrote for our own decoder (--model tiny-llama --method fim) serves
from transformers + PEFT with our logits.

Run: .venv/bin/python -m pytest tests/test_peers_llm.py -q   (all of them: make crosscheck)
"""

from __future__ import annotations

import copy
import inspect
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import SST2
from fimlora import (fim_rank_pattern, fisher_scores, fw_penalty, fw_track, fw_update,
                     importances, initialize_fim_ranks, lorada_init)
from lora import add_lora, load_adapter, lora_layers, save_adapter

pytestmark = pytest.mark.peer

PEERS = "pip install -r requirements-peers.txt"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = 1e-4  # fp32 logits of the same function computed by two code paths


def _peers():
    transformers = pytest.importorskip("transformers", reason=f"transformers missing: {PEERS}")
    peft = pytest.importorskip("peft", reason=f"peft missing: {PEERS}")
    return transformers, peft


def _hf_llama(transformers, seed: int = 0):
    """A random transformers LlamaForCausalLM: 2 layers, width 32, 4 query heads on 2 key/value
    heads, lm_head tied to the embeddings (as SmolLM2)."""
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _batches(n: int, batch_size: int = 4, seed: int = 0) -> list[dict]:
    """Prompt + answer rows of random length, right-padded with 0: the answer is one token that
    depends on the prompt's first token (learnable), marked by loss_mask."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(4, 11, (batch_size,), generator=g).tolist()
        T = max(lengths) + 1
        ids = torch.zeros(batch_size, T, dtype=torch.long)
        attention = torch.zeros(batch_size, T, dtype=torch.long)
        answer = torch.zeros(batch_size, T, dtype=torch.long)
        for i, n_prompt in enumerate(lengths):
            prompt = torch.randint(3, 100, (n_prompt,), generator=g)
            ids[i, :n_prompt] = prompt
            ids[i, n_prompt] = 100 + prompt[0] % 2
            attention[i, :n_prompt + 1] = 1
            answer[i, n_prompt] = 1
        out.append({"input_ids": ids, "attention_mask": attention, "loss_mask": answer})
    assert any((b["attention_mask"] == 0).any() for b in out), "the rows must contain padding"
    return out


def causal_lm_loss(model, batch: dict) -> torch.Tensor:
    """Mean over examples of each example's mean answer-token NLL (logits at t predict t + 1);
    model is any HF causal LM (its output has .logits)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["loss_mask"][:, 1:].float()  # (B, T-1): the next token is an answer token
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), batch["input_ids"][:, 1:],
                          reduction="none")  # (B, T-1)
    return ((nll * mask).sum(1) / mask.sum(1)).mean()


def _peft_layers(peft, model) -> dict:
    """PEFT LoRA layers by base-model module name."""
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def _quiet(fn, *args, **kwargs):
    """fn(...) failing on any warning but deprecations (PEFT warns on missing adapter keys,
    unmatched rank_pattern keys and target inconsistencies)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    bad = [str(w.message) for w in caught
           if not issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert bad == []
    return out


def _save_kwargs() -> dict:
    """task_type="CAUSAL_LM" where lora.py's save_adapter accepts it (it is being added)."""
    params = inspect.signature(save_adapter).parameters
    return {"task_type": "CAUSAL_LM"} if "task_type" in params else {}


# -----------------------------------------------------------------------------
# any HF causal LM through the vendored files


def test_fisher_guided_lora_on_transformers_llama_serves_from_peft(tmp_path):
    """The whole pipeline on transformers' own Llama, not ours: the per-example Fisher equals
    an autograd loop over examples; FIM keeps the budget 4 x 14 with non-uniform ranks and
    α_m = 8·r_m/4; LoRA-DA initialises every layer; FW importances sum to 1 and the penalty
    equals λ Σ (1 − I_m)‖ΔW_m‖²; AdamW lowers the loss; PEFT loads the saved adapter without a
    warning, with every layer's rank, scaling and A, B equal to ours and logits within 1e-4."""
    transformers, peft = _peers()
    model = _hf_llama(transformers)
    base = copy.deepcopy(model)  # the serving side starts from the same weights
    g = torch.Generator().manual_seed(0)
    names = add_lora(model, TARGETS, r=4, alpha=8, generator=g)
    assert len(names) == 14 and set(lora_layers(model)) == set(names)
    calib, train = _batches(4, seed=1), _batches(6, seed=2)

    # per-example Fisher: the batch is on dim 0 of every adapted layer, each called once
    fisher = fisher_scores(model, calib[:1], causal_lm_loss, per_example=True)
    layers = lora_layers(model)
    Bs = [m.lora_B for m in layers.values()]
    for B in Bs:
        B.requires_grad_(True)
    batch, n = calib[0], calib[0]["input_ids"].shape[0]
    loop = [torch.zeros_like(B) for B in Bs]
    for i in range(n):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        for acc, gr in zip(loop, torch.autograd.grad(causal_lm_loss(model, row), Bs)):
            acc.add_(gr.square() / n)
    for B in Bs:
        B.requires_grad_(False)
    for name, ref in zip(layers, loop):
        torch.testing.assert_close(fisher["fisher"][name], ref, rtol=1e-4, atol=1e-12)
    assert fisher["count"] == n

    res = initialize_fim_ranks(model, calib, causal_lm_loss, generator=g)
    ranks = res["ranks"]
    assert sum(ranks.values()) == 4 * 14 and 1 <= min(ranks.values()) <= max(ranks.values()) <= 8
    assert len(set(ranks.values())) > 1, "FIM ranks should be non-uniform on this model"
    for name, layer in lora_layers(model).items():
        assert (layer.r, layer.alpha) == (ranks[name], pytest.approx(8 * ranks[name] / 4))
        assert layer.scaling == pytest.approx(2.0)  # every matrix keeps the base scale α/r

    da = lorada_init(model, calib, causal_lm_loss, n_samples=8)
    assert sorted(da["initialized"]) == sorted(names) and da["skipped"] == {}
    assert all(bool(m.lora_B.any()) for m in lora_layers(model).values())

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n, p in
                             model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    with torch.no_grad():
        before = sum(causal_lm_loss(model, b).item() for b in train)
    model.train()
    ema, importance = {}, None
    for step, b in enumerate(train * 2, start=1):
        if step <= 3:  # FW-LoRA warm-up: track ‖∂L/∂W_m‖², no penalty
            with fw_track(model) as sq_norms:
                causal_lm_loss(model, b).backward()
            ema = fw_update(ema, sq_norms, step)
        else:
            if importance is None:
                importance = importances(ema)
                total = sum(float(v) for v in importance.values())
                assert set(importance) == set(names) and total == pytest.approx(1.0)
            penalty = fw_penalty(model, importance, fw_lambda=1e-3)
            (causal_lm_loss(model, b) + penalty).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        after = sum(causal_lm_loss(model, b).item() for b in train)
        explicit = sum((1 - float(importance[n])) * m.delta_weight().square().sum()
                       for n, m in lora_layers(model).items())
        torch.testing.assert_close(fw_penalty(model, importance, fw_lambda=1e-3),
                                   1e-3 * explicit, rtol=1e-4, atol=0)
    assert after < before

    kwargs = _save_kwargs()
    save_adapter(tmp_path, model, TARGETS, format="peft", **kwargs)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    if kwargs:
        assert config["task_type"] == "CAUSAL_LM"
    served = _quiet(peft.PeftModel.from_pretrained, base, str(tmp_path)).eval()
    if kwargs:
        assert isinstance(served, peft.PeftModelForCausalLM)
    theirs, ours = _peft_layers(peft, served), lora_layers(model)
    assert set(theirs) == set(ours)
    for name, layer in ours.items():
        t = theirs[name]
        assert t.lora_A["default"].weight.shape[0] == layer.r == ranks[name], name
        assert t.scaling["default"] == pytest.approx(layer.scaling), name
        assert torch.equal(t.lora_A["default"].weight, layer.lora_A), name
        assert torch.equal(t.lora_B["default"].weight, layer.lora_B), name
    for b in train[:2]:
        with torch.no_grad():
            mine = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            peft_out = served(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        assert (mine - base(input_ids=b["input_ids"]).logits).abs().max() > 10 * TOL
        torch.testing.assert_close(peft_out.logits, mine, rtol=0, atol=TOL)


def test_fim_rank_pattern_gives_peft_the_allocated_ranks_and_scales():
    """The PEFT workflow: fim_rank_pattern on the model with adapters (left untouched) ->
    LoraConfig(r, lora_alpha, rank_pattern, alpha_pattern) -> get_peft_model on a copy of the
    base. Oracle: initialize_fim_ranks on an identical copy with the same batches (same scores,
    same exact allocation): every PEFT layer has that rank and keeps the scale α/r = 2."""
    transformers, peft = _peers()
    model = _hf_llama(transformers)
    base = copy.deepcopy(model)
    add_lora(model, TARGETS, r=4, alpha=8, generator=torch.Generator().manual_seed(0))
    oracle = copy.deepcopy(model)
    calib = _batches(4, seed=1)
    expected = initialize_fim_ranks(oracle, calib, causal_lm_loss)
    assert len(set(expected["ranks"].values())) > 1

    before = {n: p.clone() for n, p in model.named_parameters()}
    pattern = fim_rank_pattern(model, calib, causal_lm_loss, r=4, alpha=8)
    assert {"r", "lora_alpha", "rank_pattern", "alpha_pattern"} <= set(pattern)
    after = dict(model.named_parameters())  # the model is left as it was: rank 4, same A, B
    assert set(after) == set(before) and all(torch.equal(before[n], after[n]) for n in before)
    config = peft.LoraConfig(r=pattern["r"], lora_alpha=pattern["lora_alpha"],
                             rank_pattern=pattern["rank_pattern"],
                             alpha_pattern=pattern["alpha_pattern"], target_modules=TARGETS)
    pm = _quiet(peft.get_peft_model, base, config)
    theirs = _peft_layers(peft, pm)
    assert set(theirs) == set(expected["ranks"])
    for name, r_m in expected["ranks"].items():
        t = theirs[name]
        assert t.lora_A["default"].weight.shape[0] == r_m, name
        assert t.scaling["default"] == pytest.approx(expected["alphas"][name] / r_m), name
        assert t.scaling["default"] == pytest.approx(8 / 4), name


# -----------------------------------------------------------------------------
# our decoder: train.py's FIM adapter serves from transformers + PEFT


def test_train_py_fim_adapter_for_tiny_llama_serves_from_transformers(tmp_path):
    """train.py --model tiny-llama --method fim on SST-2 prompts writes adapter/ and
    adapter_peft/. The base is rebuilt from the seed (load_model with the init generator of
    seed 0, train.random_streams), copied into transformers' LlamaForCausalLM, and PEFT serves
    adapter_peft/ with the ranks train.py reports and the logits of our decoder with adapter/."""
    transformers, peft = _peers()
    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"{SST2 / 'train.tsv'} not found (GLUE SST-2 data)")
    import train
    from models import load_model
    from test_hf_llama import hf_config
    out = tmp_path / "run"
    results = train.main(["--model", "tiny-llama", "--task", "sst2", "--data-dir", str(SST2),
                          "--method", "fim", "--steps", "3", "--batch-size", "4",
                          "--max-len", "32", "--max-train", "64", "--max-eval", "8",
                          "--calib-batches", "2", "--lr", "1e-2", "--seed", "0",
                          "--out", str(out)])
    ranks = results["ranks"]
    assert len(set(ranks.values())) > 1, "FIM ranks should be non-uniform"

    def base():
        return load_model("tiny-llama", None, torch.Generator().manual_seed(0))[0].eval()

    ours = base()
    add_lora(ours, train.DEFAULT_TARGETS["decoder"].split(","), r=8, alpha=16)
    load_adapter(out / "adapter", ours)
    assert {n: m.r for n, m in lora_layers(ours).items()} == ranks
    plain = base()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(plain.config)))
    hf.load_state_dict(plain.state_dict())
    served = _quiet(peft.PeftModel.from_pretrained, hf.eval(), str(out / "adapter_peft")).eval()
    theirs = _peft_layers(peft, served)
    assert {n: t.lora_A["default"].weight.shape[0] for n, t in theirs.items()} == ranks
    for name, layer in lora_layers(ours).items():
        assert theirs[name].scaling["default"] == pytest.approx(layer.scaling), name
    ids = torch.randint(3, plain.config.vocab_size, (2, 12))
    with torch.no_grad():
        mine = ours(ids)
        assert (mine - plain(ids)).abs().max() > 10 * TOL  # the adapter changes the function
        torch.testing.assert_close(served(input_ids=ids).logits, mine, rtol=0, atol=TOL)


# -----------------------------------------------------------------------------
# an HF folder saved by transformers: train.py --model <folder> serves from transformers + PEFT


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_train_py_fim_adapter_for_an_hf_folder_serves_from_transformers(tmp_path, family):
    """A tiny random LlamaForCausalLM (untied) or Qwen2ForCausalLM (q/k/v bias, tied) saved with
    save_pretrained next to a byte-level tokenizer.json: train.py --model <folder> --method fim
    on SST-2 prompts, then AutoModelForCausalLM.from_pretrained(folder) + PeftModel on
    adapter_peft/ gives the logits of our decoder (llama_from_hf) with adapter/."""
    transformers, peft = _peers()
    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"{SST2 / 'train.tsv'} not found (GLUE SST-2 data)")
    import train
    from models import load_model
    from models.bpe import tiny_bpe
    from test_hf_llama import tokenizer_json
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, False),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, True)}[family]
    config = cls[0](vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    tie_word_embeddings=cls[2], pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    folder = tmp_path / family
    cls[1](config).save_pretrained(folder)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(tiny_bpe())))
    out = tmp_path / "run"
    results = train.main(["--model", str(folder), "--task", "sst2", "--data-dir", str(SST2),
                          "--method", "fim", "--steps", "3", "--batch-size", "4",
                          "--max-len", "32", "--max-train", "64", "--max-eval", "8",
                          "--calib-batches", "2", "--lr", "1e-2", "--seed", "0",
                          "--threads", "1", "--out", str(out)])
    ranks = results["ranks"]
    assert len(set(ranks.values())) > 1, "FIM ranks should be non-uniform"
    ours, _ = load_model(str(folder))
    plain, _ = load_model(str(folder))
    add_lora(ours, train.DEFAULT_TARGETS["decoder"].split(","), r=8, alpha=16)
    load_adapter(out / "adapter", ours)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    served = _quiet(peft.PeftModel.from_pretrained, hf, str(out / "adapter_peft")).eval()
    theirs = _peft_layers(peft, served)
    assert {n: t.lora_A["default"].weight.shape[0] for n, t in theirs.items()} == ranks
    ids = torch.randint(3, 400, (2, 12))
    with torch.no_grad():
        mine = ours.eval()(ids)
        assert (mine - plain(ids)).abs().max() > 10 * TOL  # the adapter changes the function
        torch.testing.assert_close(served(input_ids=ids).logits, mine, rtol=0, atol=TOL)


# -----------------------------------------------------------------------------
# issue 18's crosscheck: your own model folder and your own data, through the CLI

_WORDS = ["film", "movie", "story", "cast", "plot", "music", "scene", "ending"]
_GOOD = ["great", "fine", "warm", "bright"]
_BAD = ["dull", "weak", "cold", "flat"]


def _own_data(folder, kind: str):
    """(file, its first two texts): 40 rows of your own data, prompt → completion JSONL (40
    distinct completions: free text, not a label set) or a text,label CSV (quoted commas)."""
    rows = [(f"the {w} was {a}", int(a in _GOOD)) for w in _WORDS for a in _GOOD + _BAD][:40]
    if kind == "jsonl":
        path = folder / "chat.jsonl"
        pairs = [(f"Review: {t}\nVerdict:", f" a {t.split()[-1]} {t.split()[1]}") for t, _ in rows]
        path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                                for p, c in pairs), encoding="utf-8")
        return path, [p + c for p, c in pairs[:2]]
    path = folder / "reviews.csv"
    path.write_text("text,label\n" + "".join(f"\"{t}, really\",{('neg', 'pos')[y]}\n"
                                            for t, y in rows), encoding="utf-8")
    return path, [f"{t}, really" for t, _ in rows[:2]]


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_cli_own_data_on_a_saved_hf_llama_serves_from_transformers_and_peft(tmp_path, kind):
    """Issue 18's done-when, as a user runs it: a tiny random LlamaConfig saved with
    save_pretrained next to a byte-level tokenizer.json; `python train.py --model <folder>
    --data <own file> --method fim --steps 3 --threads 1 --out <run>` in a subprocess trains,
    evaluates (prompt → completion: nll and perplexity = exp(nll); CSV text,label: accuracy) and
    writes adapter/ and adapter_peft/. AutoModelForCausalLM.from_pretrained(folder) +
    PeftModel.from_pretrained(adapter_peft) has results.json's rank per module and the logits of
    our decoder (load_model(folder) + load_adapter(adapter)) within 1e-4 on the data's text."""
    import math
    import os
    import subprocess
    import sys
    from pathlib import Path

    # first: without it, importing peft / transformers' Auto classes fails with a TypeError
    pytest.importorskip("tokenizers", reason=f"tokenizers missing: {PEERS}")
    transformers, peft = _peers()
    import train
    from models import load_model
    from models.bpe import BPETokenizer, tiny_bpe
    from test_hf_llama import tokenizer_json
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    folder = tmp_path / "my-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(tiny_bpe())))
    (data, texts), out = _own_data(tmp_path, kind), tmp_path / "run"
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "train.py"), "--model", str(folder), "--data", str(data),
           "--method", "fim", "--steps", "3", "--threads", "1", "--batch-size", "8",
           "--calib-batches", "2", "--lr", "1e-2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "step      3/3" in proc.stdout and "\neval @ 3: " in proc.stdout, proc.stdout
    print(next(line for line in proc.stdout.splitlines() if line.startswith("eval @ 3: ")))
    results = json.loads((out / "results.json").read_text())
    metrics, ranks = results["metrics"], results["ranks"]
    if kind == "jsonl":
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["nll"]), rel=1e-9)
        assert 0 < metrics["nll"] < 50 and "accuracy" not in metrics
    else:
        assert 0 <= metrics["accuracy"] <= 1
    assert sum(ranks.values()) == 8 * 14 and len(set(ranks.values())) > 1, ranks

    ours, _ = load_model(str(folder))
    plain, _ = load_model(str(folder))
    add_lora(ours, train.DEFAULT_TARGETS["decoder"].split(","), r=8, alpha=16)
    load_adapter(out / "adapter", ours)
    assert {n: m.r for n, m in lora_layers(ours).items()} == ranks
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    served = _quiet(peft.PeftModel.from_pretrained, hf, str(out / "adapter_peft")).eval()
    theirs = _peft_layers(peft, served)
    assert {n: t.lora_A["default"].weight.shape[0] for n, t in theirs.items()} == ranks
    for name, layer in lora_layers(ours).items():
        assert theirs[name].scaling["default"] == pytest.approx(layer.scaling), name
    tok = BPETokenizer.from_hf_folder(folder)
    encoded = [tok.encode(t) for t in texts]
    T = max(map(len, encoded))
    ids = torch.tensor([e + [0] * (T - len(e)) for e in encoded])
    mask = torch.tensor([[1] * len(e) + [0] * (T - len(e)) for e in encoded])
    assert (mask == 0).any() and T > 8  # real text, one row right-padded
    with torch.no_grad():
        mine = ours.eval()(ids, mask)
        want = served(input_ids=ids, attention_mask=mask).logits
        keep = mask.bool()
        assert (mine - plain(ids, mask))[keep].abs().max() > 10 * TOL  # the adapter counts
        diff = (want[keep] - mine[keep]).abs().max().item()
    print(f"max |logit difference| transformers+PEFT vs ours: {diff:.3g}")
    torch.testing.assert_close(want[keep], mine[keep], rtol=0, atol=TOL)
