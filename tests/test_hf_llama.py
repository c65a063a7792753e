"""HF folders of the LLaMA family (models.llama.llama_from_hf, BPETokenizer.from_hf_folder).

Oracles: our own decoder written out as an HF folder (config.json, safetensors single or
sharded, tokenizer.json) and read back bit for bit; config fields and tokenizer options that
are refused by name, before any module is built. Peers (`-m peer`): transformers'
Llama/Qwen2/Mistral ForCausalLM saved with save_pretrained (tied and untied, q/k/v bias, a
sliding window, sharded) give our logits to 1e-4; transformers' PreTrainedTokenizerFast on a
tokenizer.json built with the `tokenizers` package from SmolLM2's GGUF
vocabulary and merges give our ids on SST-2 dev.
Run: .venv/bin/python -m pytest -q tests/test_hf_llama.py
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from conftest import SST2
from lora import write_safetensors
from models import is_decoder, load_model
from models.bpe import BPETokenizer, tiny_bpe
from models.llama import TINY_LLAMA, LlamaConfig, LlamaForCausalLM, llama_from_hf

PEERS = "pip install -r requirements-peers.txt"
TOL = 1e-4
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
              "use_regex": True}
SMOLLM_PRE = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                     BYTE_LEVEL]}


def tokenizer_json(tok: BPETokenizer, pre: dict = SMOLLM_PRE) -> dict:
    """tokenizer.json of a BPETokenizer: vocab, merges by rank, its special tokens added."""
    merges = sorted(tok.ranks, key=tok.ranks.__getitem__)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t, i in sorted(tok.special.items())]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": pre, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {t: i for i, t in enumerate(tok.tokens)},
                      "merges": [list(m) for m in merges]}}


def hf_config(config: LlamaConfig, family: str = "llama") -> dict:
    """The config.json of `config` as transformers 5 writes it for `family`."""
    raw = {"model_type": family, "hidden_act": "silu", "attention_dropout": 0.0,
           "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
           "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
           **{k: getattr(config, k) for k in (
               "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
               "rms_norm_eps", "tie_word_embeddings", "head_dim")}}
    if family == "llama":
        raw["attention_bias"] = config.qkv_bias
    if family == "mistral":
        raw["sliding_window"] = config.sliding_window
    return raw


def write_folder(folder: Path, model: LlamaForCausalLM, family: str = "llama",
                 tok: BPETokenizer | None = None, shards: int = 1) -> Path:
    """Our model as an HF folder: config.json, tokenizer.json, model.safetensors, or with
    shards > 1 the tensors round robin in that many files and their index (save_pretrained's)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(model.config, family)))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(tok or tiny_bpe())))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del sd["lm_head.weight"]
    if shards == 1:
        write_safetensors(folder / "model.safetensors", sd)
        return folder
    names = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    weight_map = {key: names[n % shards] for n, key in enumerate(sd)}
    for name in names:
        write_safetensors(folder / name, {k: v for k, v in sd.items() if weight_map[k] == name})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    return folder


def ours(seed: int = 0, **kw) -> LlamaForCausalLM:
    config = LlamaConfig(**{**TINY_LLAMA.__dict__, **kw})
    model = LlamaForCausalLM(config, torch.Generator().manual_seed(seed)).eval()
    with torch.no_grad():  # biases and norms off their init, so a lost one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.5)
    return model


def _ids(n: int = 2, T: int = 12, vocab: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (n, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    return ids, mask


# -----------------------------------------------------------------------------
# round trips of our own decoder


@pytest.mark.parametrize("family,kw,shards", [
    ("llama", {}, 1),
    ("llama", {"tie_word_embeddings": False, "qkv_bias": True, "o_bias": True}, 1),
    ("qwen2", {"qkv_bias": True, "tie_word_embeddings": False}, 3),
    ("mistral", {"sliding_window": 4, "head_dim": 8}, 2),
])
def test_our_decoder_round_trips_through_an_hf_folder(tmp_path, family, kw, shards):
    """Every parameter, the tie, the biases and the window come back, from one safetensors
    file or from shards and their index: logits bit-equal."""
    model = ours(**kw)
    folder = write_folder(tmp_path / "m", model, family, shards=shards)
    assert is_decoder(str(folder))
    again, tok = load_model(str(folder))
    assert again.config == model.config and not again.training
    assert (again.lm_head.weight is again.model.embed_tokens.weight) == \
        model.config.tie_word_embeddings
    ids, mask = _ids()
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask), model(ids, mask), rtol=0, atol=0)
    text = "<|im_start|>Review: a good movie 123 ok<|im_end|>"
    assert tok.encode(text) == tiny_bpe().encode(text)
    assert tok.pad_id == 0 and tok.eos_id == 0


def test_sliding_window_hides_keys_beyond_the_window():
    """With window w each layer reads w positions, so over 2 layers the logits at t depend on
    tokens t-2(w-1)..t: changing token 0 leaves positions >= 7 unchanged for w = 4, not 6
    (and without a window, not 9)."""
    model = ours(sliding_window=4)
    ids = _ids(2, 10)[0][:1]
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % 512
    with torch.no_grad():
        a, b = model(ids), model(other)
        assert torch.equal(a[0, 7:], b[0, 7:]) and not torch.equal(a[0, 6], b[0, 6])
        full = ours()
        assert not torch.equal(full(ids)[0, 9], full(other)[0, 9])


def test_is_decoder_tells_folders_apart(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    assert is_decoder("tiny-llama") and is_decoder("smollm2")
    assert not is_decoder("tiny") and not is_decoder(str(tmp_path / "bert"))
    assert not is_decoder(str(tmp_path / "nowhere"))


# -----------------------------------------------------------------------------
# refusals, before any module is built


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_folder(tmp_path / "m", ours())


def _edit_config(folder: Path, **changes) -> None:
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))


def test_huge_layer_count_or_vocab_fails_before_any_layer_is_built(folder, monkeypatch):
    """num_hidden_layers 100000 or vocab_size 10**9 against a 2-layer file: a ValueError naming
    the field, and no decoder layer (or real tensor) was ever made."""
    import models.llama as llama
    built = []
    monkeypatch.setattr(llama.LlamaDecoderLayer, "__init__",
                        lambda self, config: built.append(1) or 1 / 0)
    _edit_config(folder, num_hidden_layers=100000)
    with pytest.raises(ValueError, match="num_hidden_layers=100000 but the weights hold 2"):
        llama_from_hf(folder)
    assert not built
    monkeypatch.undo()
    _edit_config(folder, num_hidden_layers=2, vocab_size=10**9)
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight \(512, 64\) \(config: "
                                         r"\(1000000000, 64\)\)"):
        llama_from_hf(folder)


@pytest.mark.parametrize("changes,match", [
    ({"num_hidden_layers": "2"}, "num_hidden_layers='2' is invalid: use an int in"),
    ({"num_hidden_layers": True}, "num_hidden_layers=True is invalid: use an int in"),
    ({"hidden_size": -64}, "hidden_size=-64 is invalid: use an int in"),
    ({"num_attention_heads": 2.5}, "num_attention_heads=2.5 is invalid: use an int"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps='1e-6' is invalid: use a finite number > 0"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, "rope_theta=0 is invalid"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings='yes' is invalid: use true or false"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    ({"vocab_size": None}, "vocab_size=None is invalid: use an int"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"mlp_bias": True}, "mlp_bias=True is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}},
     "rope_type='llama3' is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear' is not supported"),
    ({"model_type": "gpt2"}, "model_type='gpt2' is not a decoder"),
    ({"model_type": "qwen2", "layer_types": ["full_attention", "sliding_attention"]},
     r"layer_types=\['full_attention', 'sliding_attention'\] is not supported"),
])
def test_bad_config_fields_are_named(folder, changes, match):
    _edit_config(folder, **changes)
    with pytest.raises(ValueError, match=match):
        llama_from_hf(folder)


def test_config_without_a_field_names_it(folder):
    raw = json.loads((folder / "config.json").read_text())
    del raw["intermediate_size"]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="lacks 'intermediate_size'"):
        llama_from_hf(folder)


def test_tied_config_with_another_lm_head_or_untied_without_one_is_refused(tmp_path):
    model = ours(tie_word_embeddings=False)
    folder = write_folder(tmp_path / "m", model)
    _edit_config(folder, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="hold a different lm_head.weight"):
        llama_from_hf(folder)
    folder = write_folder(tmp_path / "t", ours())
    _edit_config(folder, tie_word_embeddings=False)
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        llama_from_hf(folder)


def test_qwen2_needs_its_biases_and_llama_refuses_them(tmp_path):
    folder = write_folder(tmp_path / "q", ours(), "qwen2")
    with pytest.raises(ValueError, match=r"missing \['model.layers.0.self_attn.q_proj.bias'"):
        llama_from_hf(folder)


def test_shard_index_problems_are_named_before_any_shard_is_read(tmp_path):
    """A shard named outside the folder, a missing shard, an index leaving a shard out, no
    weights at all: each refused naming the file."""
    folder = write_folder(tmp_path / "m", ours(), shards=2)
    index = folder / "model.safetensors.index.json"
    good = json.loads(index.read_text())["weight_map"]
    for outside in ("../x.safetensors", "/abs/x.safetensors", ".."):
        index.write_text(json.dumps({"weight_map": dict(good, **{"model.norm.weight": outside})}))
        with pytest.raises(ValueError, match=f"shard '{outside}' is not a file name in"):
            llama_from_hf(folder)
    index.write_text(json.dumps({"weight_map": dict(good, **{"model.norm.weight": "m3"})}))
    with pytest.raises(FileNotFoundError, match="m3 not found: model.safetensors.index.json "
                                                "lists it as a shard"):
        llama_from_hf(folder)
    index.write_text(json.dumps({"weight_map": {k: f for k, f in good.items()
                                                if f != good["model.norm.weight"]}}))
    with pytest.raises(ValueError, match=r"the weights do not fit the config: missing \['model"):
        llama_from_hf(folder)  # a shard the index leaves out is not read
    index.write_text('{"weight_map": ["a"]}')
    with pytest.raises(ValueError, match=r"weight_map must be a \{tensor: file\} object"):
        llama_from_hf(folder)
    index.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        llama_from_hf(folder)


def _edit_tokenizer(folder: Path, edit) -> None:
    tj = json.loads((folder / "tokenizer.json").read_text())
    edit(tj)
    (folder / "tokenizer.json").write_text(json.dumps(tj))


@pytest.mark.parametrize("edit,match", [
    (lambda tj: tj.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁"}),
     "pre-tokenizer .*Metaspace.* is not supported"),
    (lambda tj: tj.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Removed"},
        {**BYTE_LEVEL, "use_regex": False}]}), "pre-tokenizer .*Split.* is not supported"),
    (lambda tj: tj.update(pre_tokenizer={**BYTE_LEVEL, "add_prefix_space": True}),
     "add_prefix_space.* is not supported"),
    (lambda tj: tj.update(normalizer={"type": "Lowercase"}),
     "normalizer .*Lowercase.* is not supported"),
    (lambda tj: tj["model"].update(type="WordPiece"), "model type 'WordPiece' is not supported"),
    (lambda tj: tj.update(model="BPE"), "model type 'BPE' is not supported"),
    (lambda tj: tj.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [{}, BYTE_LEVEL]}),
     "pre-tokenizer .* is not supported"),
    (lambda tj: tj["model"].update(byte_fallback=True), "byte_fallback=True is not supported"),
    (lambda tj: tj["added_tokens"][0].update(lstrip=True), "lstrip=true"),
    (lambda tj: tj["model"]["vocab"].pop("a"), "token ids must run 0..408 without gaps"),
    (lambda tj: tj.update(post_processor={"type": "RobertaProcessing"}),
     "post_processor .*RobertaProcessing.* is not supported"),
])
def test_tokenizer_json_features_we_do_not_implement_are_refused_by_name(folder, edit, match):
    _edit_tokenizer(folder, edit)
    with pytest.raises(ValueError, match=match):
        llama_from_hf(folder)


def test_template_bos_and_nfc_are_honoured(folder):
    """A `<bos> $A` template prepends BOS; NFC composes e + U+0301 into é before BPE."""
    def edit(tj):
        tj["normalizer"] = {"type": "NFC"}
        tj["post_processor"] = {"type": "TemplateProcessing", "single": [
            {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}}],
            "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1],
                                                "tokens": ["<|im_start|>"]}}}
    _edit_tokenizer(folder, edit)
    tok = BPETokenizer.from_hf_folder(folder)
    assert tok.add_bos and tok.bos_id == 1
    assert tok.encode("cafe\u0301 good") == [1, *tiny_bpe().encode("caf\u00e9 good")]


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_ignore_merges_takes_a_whole_word_token_the_merges_cannot_reach(folder, ignore_merges):
    """Without the merge (Ġgoo, d), " good" is Ġgoo + d, unless ignore_merges (Llama 3) takes
    the vocabulary's Ġgood whole."""
    def edit(tj):
        tj["model"]["merges"].remove(["Ġgoo", "d"])
        tj["model"]["ignore_merges"] = ignore_merges
    _edit_tokenizer(folder, edit)
    tok = BPETokenizer.from_hf_folder(folder)
    want = [["Ġgoo", "d"], ["Ġgood"]][ignore_merges]
    assert [tok.tokens[i] for i in tok.encode(" good")] == want


def test_split_regex_escapes_we_cannot_translate_are_refused():
    from models.bpe import split_regex
    with pytest.raises(ValueError, match=r"Split regex escape '.*d' is not supported"):
        split_regex(r"\d+")
    with pytest.raises(ValueError, match="does not compile"):
        split_regex(r"(\p{L}")
    assert split_regex(r"[^\s\p{N}]+|\S").findall("ab 12\u3000x") == ["ab", "1", "2", "x"]


def test_special_token_names_from_tokenizer_config_must_exist(folder):
    (folder / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    with pytest.raises(ValueError, match="eos_token '<eos>' is not a token"):
        llama_from_hf(folder)
    (folder / "tokenizer_config.json").write_text('{"eos_token": {"content": "<|im_end|>"}}')
    tok = BPETokenizer.from_hf_folder(folder)
    assert tok.eos_id == 2 and tok.pad_id == 0  # pad_token_id 0 from config.json


def test_without_pad_or_eos_tokens_padding_uses_id_0(folder):
    """Qwen2's saved config names no bos/eos/pad: padding (masked) still has an id."""
    _edit_config(folder, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    tok = BPETokenizer.from_hf_folder(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, None, 0)
    _edit_config(folder, eos_token_id=2)
    assert BPETokenizer.from_hf_folder(folder).pad_id == 2


# -----------------------------------------------------------------------------
# train.py on a folder


def test_train_py_treats_a_llama_folder_as_a_decoder(folder, tmp_path):
    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"{SST2 / 'train.tsv'} not found (GLUE SST-2 data)")
    import train
    out = tmp_path / "run"
    results = train.main(["--model", str(folder), "--task", "sst2", "--data-dir", str(SST2),
                          "--method", "fim", "--steps", "3", "--batch-size", "4",
                          "--max-len", "32", "--max-train", "32", "--max-eval", "8",
                          "--calib-batches", "2", "--threads", "1", "--out", str(out)])
    assert "q_proj" in ",".join(results["ranks"])  # the decoder targets
    cfg = json.loads((out / "adapter_peft" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == str(folder)


# -----------------------------------------------------------------------------
# peers: transformers


def _transformers():
    return pytest.importorskip("transformers", reason=f"transformers missing: {PEERS}")


HF_CASES = {  # name -> config class, model class, config fields, save_pretrained's shard size
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}, None),
    "llama-untied-bias": ("LlamaConfig", "LlamaForCausalLM",
                          {"tie_word_embeddings": False, "attention_bias": True}, None),
    "llama-sharded": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}, "20KB"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}, None),
    "qwen2-tied-sharded": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True},
                           "20KB"),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5}, None),
}


@pytest.mark.peer
@pytest.mark.parametrize("case", HF_CASES)
def test_transformers_save_pretrained_folders_give_transformers_logits(tmp_path, case):
    """A random tiny model saved by save_pretrained (one file or sharded) loads here with
    the logits transformers computes, padded rows included (the padded positions aside)."""
    transformers = _transformers()
    config_cls, model_cls, kw, shard = HF_CASES[case]
    config = getattr(transformers, config_cls)(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, **kw)
    torch.manual_seed(0)
    theirs = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # biases and norms off their init (zeros / ones)
        for name, p in theirs.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.5)
    folder = tmp_path / case
    theirs.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    assert (folder / "model.safetensors.index.json").is_file() == bool(shard)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(tiny_bpe())))
    model, _ = llama_from_hf(folder)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == \
        config.tie_word_embeddings
    ids, mask = _ids(2, 12)
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits
        got = model(ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=0, atol=TOL)


SPLITS = {  # the Split regexes of Llama 3's and Qwen2's tokenizer.json
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
             r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


@functools.cache
def _gguf_tokenizer(path: Path) -> BPETokenizer:
    from models.gguf import read_gguf_header
    return BPETokenizer.from_gguf(read_gguf_header(path).metadata)


def _smollm2_tokenizer_json(tmp_path: Path, pre: str) -> tuple[Path, BPETokenizer]:
    """tokenizer.json built with the `tokenizers` package from SmolLM2's GGUF vocabulary and
    merges, with SmolLM2's own pre-tokenizer (Digits + ByteLevel), plain ByteLevel, or Llama
    3's / Qwen2's Split regex + ByteLevel(use_regex=false) (Llama 3's with ignore_merges and
    NFC as Qwen2's)."""
    tokenizers = pytest.importorskip("tokenizers", reason=f"tokenizers missing: {PEERS}")
    from models.checkpoint import smollm2_path
    try:
        gguf = _gguf_tokenizer(smollm2_path())
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(str(e))
    vocab = {t: i for i, t in enumerate(gguf.tokens)}
    assert len(vocab) == len(gguf.tokens)
    merges = sorted(gguf.ranks, key=gguf.ranks.__getitem__)
    t = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges,
                                                  ignore_merges=pre == "llama3"))
    pt = tokenizers.pre_tokenizers
    byte_level = pt.ByteLevel(add_prefix_space=False)
    t.pre_tokenizer = {
        "gpt2": byte_level,
        "smollm": pt.Sequence([pt.Digits(individual_digits=True), byte_level]),
        "llama3": pt.Sequence([pt.Split(tokenizers.Regex(SPLITS["llama3"]), "isolated"),
                               pt.ByteLevel(add_prefix_space=False, use_regex=False)]),
        "qwen2": pt.Sequence([pt.Split(tokenizers.Regex(SPLITS["qwen2"]), "isolated"),
                              pt.ByteLevel(add_prefix_space=False, use_regex=False)]),
    }[pre]
    if pre == "qwen2":
        t.normalizer = tokenizers.normalizers.NFC()
    t.decoder = tokenizers.decoders.ByteLevel()
    t.add_special_tokens([gguf.tokens[i] for i in sorted(gguf.special.values())])
    folder = tmp_path / f"tok-{pre}"
    folder.mkdir()
    t.save(str(folder / "tokenizer.json"))
    return folder, gguf


@pytest.mark.peer
@pytest.mark.parametrize("pre", ["smollm", "gpt2", "llama3", "qwen2"])
def test_tokenizer_json_ids_equal_transformers_on_sst2(tmp_path, pre):
    """transformers' PreTrainedTokenizerFast on SmolLM2's vocabulary and merges with four
    pre-tokenizers gives our ids; with SmolLM2's own (Digits + ByteLevel), so does the
    tokenizer read from its GGUF file (BPETokenizer.from_gguf)."""
    transformers = _transformers()
    if not (SST2 / "dev.tsv").is_file():
        pytest.skip(f"{SST2 / 'dev.tsv'} not found (GLUE SST-2 data)")
    folder, gguf = _smollm2_tokenizer_json(tmp_path, pre)
    ours_tok = BPETokenizer.from_hf_folder(folder)
    assert (ours_tok.pre, ours_tok.split) == (pre if pre == "smollm" else "gpt2",
                                              SPLITS.get(pre)) and len(ours_tok) == len(gguf)
    assert (ours_tok.ignore_merges, ours_tok.nfc) == (pre == "llama3", pre == "qwen2")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    rows = (SST2 / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    texts = [r.split("\t")[0] for r in rows]
    texts += ["Prices rose 12345.67% in 2024!", "naïve café — 日本語 🤖", "a\u3000b\t\n\n  c",
              "<|im_start|>user\nHi 42<|im_end|>", "x" * 3000, "I'M  fine\r\n\n 12345!!\n",
              "cafe\u0301 \u1e9b\u0323 Ⅻ ½ ٣ 'S 'Ll", "<|im_start|>user\nI'm  here\n\n<|im_end|>"]
    assert gguf.pre == "smollm"  # SmolLM2's own tokenizer, read from its GGUF file
    for text in texts:
        want = fast(text, add_special_tokens=True)["input_ids"]
        assert ours_tok.encode(text) == want, text
        assert pre != "smollm" or gguf.encode(text) == want, text


def test_gguf_claiming_a_billion_blocks_fails_before_any_layer_is_built(tmp_path, monkeypatch):
    """The same check on GGUF: llama.block_count 10**9 (patched into a 2-block file) is named
    before the loader loops over or builds the claimed blocks."""
    import struct

    import models.llama as llama
    from models.llama import llama_from_gguf
    from test_decoder import _tiny_gguf
    _tiny_gguf(tmp_path / "t.gguf", ours(), tiny_bpe())
    blob = (tmp_path / "t.gguf").read_bytes()
    at = blob.index(b"llama.block_count") + len(b"llama.block_count")
    assert struct.unpack("<Ii", blob[at:at + 8]) == (5, 2)  # GGUF int32, value 2
    (tmp_path / "t.gguf").write_bytes(blob[:at + 4] + struct.pack("<i", 10**9) + blob[at + 8:])
    monkeypatch.setattr(llama.LlamaDecoderLayer, "__init__", lambda self, config: 1 / 0)
    with pytest.raises(ValueError, match="llama.block_count=1000000000 but the weights hold 2"):
        llama_from_gguf(tmp_path / "t.gguf")
