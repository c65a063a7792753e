"""LoRA in one file: a low-rank adapter around a frozen nn.Linear, plus saving and loading.

    from lora import add_lora, lora_state_dict, merge_lora, save_adapter, load_adapter
    names = add_lora(model, targets=["query", "value"], r=8, alpha=16, heads=["classifier"])
    ...train...
    save_adapter("out/adapter", model, seed=0)

Convention used everywhere in fimlora: the frozen weight is W0: (d_out, d_in), the adapter is
A: (r, d_in) and B: (d_out, r), and the layer computes y = W0 x + b + s·B A x with s = α/r
(α/√r with rsLoRA). Per-matrix ranks and alphas (FIM-LoRA) are just different r_m and α_m per layer.

This file imports only the standard library and torch, so it can be copied into any project.

References:
    LoRA: Hu et al. 2021, arXiv:2106.09685.   rsLoRA: Kalajdzievski 2023, arXiv:2312.03732.
    PEFT adapter format: https://github.com/huggingface/peft (adapter_config.json + safetensors).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """s = α/r, or α/√r with rsLoRA (arXiv:2312.03732); 0 for r = 0.  lora_scaling(8, 16) == 2.0"""
    if r == 0:
        return 0.0
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(nn.Module):
    """y = W0 x + b + s·B A x, with W0 and b frozen and taken over from an existing nn.Linear.

    The base weight and bias keep their names (`weight`, `bias`), so a checkpoint of the adapted
    model still loads into the plain model and vice versa. A is Kaiming-uniform(a=√5) and B is
    zero, as in the LoRA reference code, so the layer starts as the base layer
    (https://github.com/microsoft/LoRA/blob/main/loralib/layers.py). Dropout acts on the adapter
    input only. r = 0 is allowed and means "no adapter".
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (d_out, d_in), frozen by add_lora
        self.bias = base.bias
        self.alpha, self.rslora = float(alpha), rslora
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._make_adapter(r, generator)

    def _make_adapter(self, r: int, generator: torch.Generator | None) -> None:
        if r < 0:
            raise ValueError(f"LoRA rank r={r} is negative: use r >= 0")
        self.r = r
        w = self.weight
        self.lora_A = nn.Parameter(w.new_empty(r, self.in_features))  # (r, d_in)
        self.lora_B = nn.Parameter(w.new_zeros(self.out_features, r))  # (d_out, r)
        if r > 0:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.rslora)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B A, (d_out, d_in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r == 0 or self.merged:
            return F.linear(x, self.weight, self.bias)
        # two thin matmuls (d_in -> r -> d_out) instead of forming ΔW; addmm adds the scaled
        # adapter path inside the GEMM, saving two elementwise passes over the (N, d_out) output
        u = F.linear(self.dropout(x), self.lora_A).reshape(-1, self.r)  # (N, r)
        y = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)  # (N, d_out)
        y = torch.addmm(y, u, self.lora_B.T, alpha=self.scaling)
        # back to x's leading dims as F.linear itself does: not an autograd view, so callers may
        # modify the output in place and tensor hooks on it still see ∂L/∂y (fimlora relies on it)
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], self.out_features))

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + s·B A, so inference costs one matmul. Undo with unmerge()."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, rslora={self.rslora}, merged={self.merged}")


# -----------------------------------------------------------------------------
# injecting adapters into a model


def _matches(name: str, key: str) -> bool:
    """PEFT's rule: key matches a module if it equals its name or a dotted suffix of it."""
    return name == key or name.endswith("." + key)


def _lookup(pattern: dict[str, float] | None, name: str, default: float) -> float:
    for key, value in (pattern or {}).items():
        if _matches(name, key):
            return value
    return default


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """All LoRALinear modules of a model by name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, targets: Sequence[str], r: int, alpha: float,
             rank_pattern: dict[str, int] | None = None,
             alpha_pattern: dict[str, float] | None = None, dropout: float = 0.0,
             rslora: bool = False, heads: Sequence[str] = (),
             generator: torch.Generator | None = None) -> list[str]:
    """Replace every nn.Linear whose name ends with a target (PEFT's target_modules suffix
    match) by a LoRALinear, in place; freeze all other parameters except those of the modules
    named in `heads` (e.g. "classifier"). Returns the adapted module names.

    rank_pattern / alpha_pattern map a module name or a dotted suffix of it to its own r / α;
    a key that matches no adapted module raises, since silently training another model is the
    classic rank_pattern bug (PEFT issue #3582).
    """
    if r < 0 or not math.isfinite(alpha):
        raise ValueError(f"bad LoRA hyper-parameters r={r}, alpha={alpha}: "
                         "use r >= 0 and a finite alpha")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout} is outside [0, 1)")
    if isinstance(targets, str):
        targets = [targets]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for t in targets:
        if not any(_matches(n, t) for n in linears):
            raise ValueError(f"target {t!r} matches no nn.Linear; the model has: "
                             f"{', '.join(sorted(linears)) or '(none)'}")
    names = [n for n in linears if any(_matches(n, t) for t in targets)
             and not isinstance(linears[n], LoRALinear)]
    for pattern_name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for key in pattern or {}:
            if not any(_matches(n, key) for n in names):
                raise ValueError(f"{pattern_name} key {key!r} matches no adapted module; "
                                 f"adapted modules are: {', '.join(names)}")
    modules = dict(model.named_modules())
    for h in heads:
        if h not in modules:
            raise ValueError(f"head {h!r} is not a module of the model; top-level modules: "
                             f"{', '.join(n for n, _ in model.named_children())}")

    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        layer = LoRALinear(linears[name], int(_lookup(rank_pattern, name, r)),
                           _lookup(alpha_pattern, name, alpha), dropout, rslora, generator)
        setattr(parent, child, layer)
    for h in heads:
        for p in modules[h].parameters():
            p.requires_grad_(True)
    return names


def resize_lora(layer: LoRALinear, new_r: int, alpha: float | None = None,
                generator: torch.Generator | None = None) -> None:
    """Re-create the adapter at rank new_r: fresh Kaiming A, B = 0, so ΔW = 0 and the model
    function is unchanged. `alpha` sets the new α (keeps the old one when None)."""
    if layer.merged:
        raise ValueError("resize_lora on a merged layer would lose ΔW: call unmerge() first")
    trainable = layer.lora_A.requires_grad
    del layer.lora_A, layer.lora_B
    layer._make_adapter(new_r, generator)
    layer.lora_A.requires_grad_(trainable)
    layer.lora_B.requires_grad_(trainable)
    if alpha is not None:
        layer.alpha = float(alpha)


def merge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


# -----------------------------------------------------------------------------
# state dicts


def lora_state_dict(model: nn.Module, heads: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The adapter tensors ("<module>.lora_A", "<module>.lora_B") plus the parameters of the
    named head modules ("<head>.<param>"), detached."""
    sd = {}
    for name, layer in lora_layers(model).items():
        sd[f"{name}.lora_A"] = layer.lora_A.detach()
        sd[f"{name}.lora_B"] = layer.lora_B.detach()
    modules = dict(model.named_modules())
    for h in heads:
        for pname, p in modules[h].named_parameters():
            sd[f"{h}.{pname}"] = p.detach()
    return sd


def _check_keys(sd: dict, params: dict, layers: dict) -> None:
    """Every adapter tensor of every LoRA layer present, and nothing the model lacks."""
    missing = [f"{n}.lora_{x}" for n in layers for x in "AB" if f"{n}.lora_{x}" not in sd]
    unexpected = [k for k in sd if k not in params]
    if missing or unexpected:
        raise ValueError(f"adapter does not fit the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]} (check targets, heads and model)")


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy adapter (and head) tensors into the model. Every key must exist and every shape
    must match; all checks run before anything is written."""
    params = dict(model.named_parameters())
    layers = lora_layers(model)
    _check_keys(sd, params, layers)
    bad = [f"{k}: adapter {tuple(v.shape)} vs model {tuple(params[k].shape)}"
           for k, v in sd.items() if v.shape != params[k].shape]
    if bad:
        raise ValueError("shape mismatch (were ranks resized before loading?): "
                         + "; ".join(bad[:8]))
    with torch.no_grad():
        for k, v in sd.items():
            params[k].copy_(v)


# --- on disk ---------------------------------------------------------------------
# safetensors and adapter folders (ours and PEFT's), read and written with the standard
# library and torch only; every write goes to a temp file first, then os.replace.

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_BIN_WEIGHTS = "adapter_model.bin"
FIMLORA_FORMAT = "fimlora-adapter-v1"
PEFT_PREFIX = "base_model.model."

# safetensors format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
# data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the raw little-endian bytes.

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a .safetensors file into CPU tensors, returning (tensors, metadata).

    Every header field is validated before any tensor byte is touched: header length within the
    file, known dtypes, shapes of non-negative ints, offsets that agree with dtype·shape, lie
    inside the data section and neither overlap nor leave gaps."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_n = f.read(8)
        if len(raw_n) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        n = struct.unpack("<Q", raw_n)[0]
        if n > size - 8 or n > 100_000_000:
            raise ValueError(f"{path}: header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        data_len = size - 8 - n
        spans = []
        for name, info in header.items():
            if not isinstance(info, dict) or info.get("dtype") not in _ST_DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype "
                                 f"{info.get('dtype') if isinstance(info, dict) else info!r}")
            shape, offs = info.get("shape"), info.get("data_offsets")
            if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                    or not isinstance(offs, list) or len(offs) != 2
                    or not all(isinstance(o, int) for o in offs)):
                raise ValueError(f"{path}: tensor {name!r} has a malformed shape or offsets")
            itemsize = torch.empty((), dtype=_ST_DTYPES[info["dtype"]]).element_size()
            begin, end = offs
            if not 0 <= begin <= end <= data_len or end - begin != math.prod(shape) * itemsize:
                raise ValueError(f"{path}: tensor {name!r} offsets {offs} do not fit shape {shape} "
                                 f"x {itemsize} bytes inside a {data_len}-byte data section")
            spans.append((begin, end, name))
        spans.sort()
        pos = 0
        for begin, end, name in spans:
            if begin != pos:
                raise ValueError(f"{path}: tensor {name!r} starts at {begin}, expected {pos} "
                                 "(overlapping or gapped data)")
            pos = end
        if pos != data_len:
            raise ValueError(f"{path}: {data_len - pos} trailing bytes after the last tensor")
        data = f.read(data_len)
    tensors = {}
    for begin, end, name in spans:
        info = header[name]
        buf = bytearray(data[begin:end])  # writable copy, so torch owns its memory
        t = torch.frombuffer(buf, dtype=_ST_DTYPES[info["dtype"]]) if buf else \
            torch.empty(0, dtype=_ST_DTYPES[info["dtype"]])
        tensors[name] = t.reshape(info["shape"])
    return tensors, {str(k): str(v) for k, v in meta.items()}


def _atomic_write(path: Path, write) -> None:
    """Write via a temp file in the same folder, then rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of t on the CPU, without numpy (so lora.py stands alone)."""
    flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # (nbytes,)
    if not flat.numel():
        return b""
    buf = bytearray(flat.numel())
    torch.frombuffer(buf, dtype=torch.uint8).copy_(flat)
    return bytes(buf)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors (moved to CPU, made contiguous) as .safetensors, atomically."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, pos = [], 0
    for name, t in tensors.items():
        if t.dtype not in _ST_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        b = _tensor_bytes(t)
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [pos, pos + len(b)]}
        blobs.append(b)
        pos += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # the format pads the header to 8-byte alignment

    def write(f):
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    _atomic_write(Path(path), write)


# adapter folders: our format, or PEFT's (adapter_config.json + adapter_model.safetensors)


def adapter_config(model: nn.Module, targets: Iterable[str] = (), seed: int | None = None,
                   heads: Sequence[str] = ()) -> dict:
    """Per-matrix ranks, alphas and scalings, rsLoRA flag, targets and seed of an adapted model."""
    layers = lora_layers(model)
    rslora = {layer.rslora for layer in layers.values()}
    if len(rslora) > 1:
        raise ValueError("layers disagree on rsLoRA; one adapter has one scaling rule")
    dropout = [m.dropout.p for m in layers.values() if isinstance(m.dropout, nn.Dropout)]
    return {"format": FIMLORA_FORMAT, "targets": list(targets), "heads": list(heads),
            "rslora": rslora.pop() if rslora else False, "dropout": max(dropout, default=0.0),
            "seed": seed, "ranks": {n: m.r for n, m in layers.items()},
            "alphas": {n: m.alpha for n, m in layers.items()},
            "scalings": {n: m.scaling for n, m in layers.items()}}


def _write_json(path: Path, obj: dict) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def _peft_config(cfg: dict, linears: Sequence[str], base_model: str | None) -> dict:
    """PEFT LoraConfig fields for per-matrix ranks: r = the most common rank,
    and rank_pattern / alpha_pattern keys anchored and escaped ("^bert\\.encoder\\.layer\\.0\\...")
    so each key matches exactly one module under PEFT's rule (_peft_pattern). α_m is written as
    saved, so PEFT's α_m/r_m (α_m/√r_m with rsLoRA) is the scale used in training. Rank-0 modules
    are left out of target_modules (PEFT has no rank 0), as are modules the `targets` suffixes
    would add or miss: then target_modules lists the adapted module names themselves."""
    ranks, alphas, heads = cfg["ranks"], cfg["alphas"], cfg["heads"]
    kept = [n for n, r in ranks.items() if r > 0]
    if not kept:
        raise ValueError("every LoRA layer has r = 0: there is no adapter to save for PEFT")
    inside = [n for n in ranks if any(n == h or n.startswith(h + ".") for h in heads)]
    if inside:
        raise ValueError(f"LoRA layers {inside[:5]} lie inside heads {list(heads)}: PEFT never "
                         "adapts modules_to_save; save those heads without LoRA")
    r = Counter(ranks[n] for n in kept).most_common(1)[0][0]
    common_alpha = Counter(alphas[n] for n in kept if ranks[n] == r).most_common(1)[0][0]
    targets = sorted(set(cfg["targets"]))
    if {n for n in linears if any(_matches(n, t) for t in targets)} != set(kept):
        targets = kept
    key = lambda n: "^" + re.escape(n)  # noqa: E731
    return {
        "peft_type": "LORA", "base_model_name_or_path": base_model,
        # SEQ_CLS gives PeftModelForSequenceClassification, which adds "classifier" and "score"
        # to modules_to_save itself
        "task_type": "SEQ_CLS" if {"classifier", "score"} & set(heads) else None,
        "r": r, "lora_alpha": common_alpha, "target_modules": targets,
        "rank_pattern": {key(n): ranks[n] for n in kept if ranks[n] != r},
        "alpha_pattern": {key(n): alphas[n] for n in kept if alphas[n] != common_alpha},
        "use_rslora": cfg["rslora"], "lora_dropout": cfg["dropout"], "bias": "none",
        "fan_in_fan_out": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": list(heads) or None, "inference_mode": True,
    }


def _peft_pattern(pattern: dict | None, name: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key k with
    re.match(rf"(.*\\.)?({k})$", name) wins (peft/utils/other.py, get_pattern_key)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _peft_targets(cfg: dict, names: Iterable[str]) -> list[str]:
    """The names PEFT gives a LoRA layer (peft/tuners/tuners_utils.py, check_target_module_exists):
    target_modules as a string must re.fullmatch the name, as a list equal it or a dotted suffix of
    it; exclude_modules removes names by the same rule; modules_to_save are never adapted."""
    def hit(spec, name: str) -> bool:
        if isinstance(spec, str):
            return re.fullmatch(spec, name) is not None
        return any(_matches(name, k) for k in spec or ())

    saved = list(cfg.get("modules_to_save") or [])
    saved += ["classifier", "score"] if cfg.get("task_type") == "SEQ_CLS" else []
    return [n for n in names if hit(cfg.get("target_modules"), n)
            and not hit(cfg.get("exclude_modules"), n)
            and not any(re.match(rf"(^|.*\.){m}($|\..*)", n) for m in saved)]


# PEFT LoraConfig fields LoRALinear cannot reproduce, each with the values that mean "off"
_PEFT_OFF = {"use_dora": (False, None), "fan_in_fan_out": (False, None), "bias": ("none", None),
             "lora_bias": (False, None), "layers_to_transform": (None, []),
             "layer_replication": (None, []), "target_parameters": (None, []),
             "trainable_token_indices": (None, {}, [])}


def _from_peft(cfg: dict, sd: dict[str, torch.Tensor], model: nn.Module):
    """PEFT config and tensors -> (ranks, alphas, state dict with our keys) for model's LoRA
    layers. A LoRA layer the adapter does not target gets r = 0, as in the PEFT model."""
    for field, off in _PEFT_OFF.items():
        if cfg.get(field) not in off:
            raise ValueError(f"PEFT adapter has {field}={cfg[field]!r}, which fimlora's LoRALinear "
                             f"does not implement (supported: {field}={off[0]!r})")
    layers = lora_layers(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]
    targeted = _peft_targets(cfg, linears)
    bare = [n for n in targeted if n not in layers]
    if not targeted or bare:
        raise ValueError(f"PEFT target_modules={cfg.get('target_modules')!r} selects "
                         f"{len(targeted)} Linear modules, {bare[:5]} without a LoRA layer: "
                         "add_lora with the same target modules first")
    ranks = {n: int(_peft_pattern(cfg.get("rank_pattern"), n, cfg["r"])) if n in targeted else 0
             for n in layers}
    alphas = {n: float(_peft_pattern(cfg.get("alpha_pattern"), n, cfg["lora_alpha"]))
              for n in layers}
    ours = {}
    for k, v in sd.items():  # "base_model.model.<module>.lora_A[.<adapter>].weight"
        k = re.sub(r"\.lora_([AB])(\.[^.]+)?\.weight$", r".lora_\1", k.removeprefix(PEFT_PREFIX))
        ours[re.sub(r"\.modules_to_save\.[^.]+\.", ".", k)] = v
    for n in (n for n, r in ranks.items() if r == 0):
        ours.setdefault(f"{n}.lora_A", torch.empty(0, layers[n].in_features))
        ours.setdefault(f"{n}.lora_B", torch.empty(layers[n].out_features, 0))
    return ranks, alphas, ours


def save_adapter(path: str | os.PathLike, model: nn.Module, targets: Iterable[str] = (),
                 seed: int | None = None, heads: Sequence[str] = (), format: str = "fimlora",
                 base_model: str | None = None) -> Path:
    """Save the adapter (and head) tensors plus ranks, alphas, rsLoRA flag, targets and seed to
    the folder `path`, atomically per file.

    format="fimlora": adapter_model.safetensors with our keys + adapter_config.json listing every
    matrix's rank and alpha explicitly. format="peft": the layout PeftModel.from_pretrained
    loads (keys "base_model.model.<module>.lora_A.weight", heads as modules_to_save)."""
    if format not in ("fimlora", "peft"):
        raise ValueError(f"format={format!r}: use 'fimlora' or 'peft'")
    targets = [targets] if isinstance(targets, str) else list(targets)
    cfg = adapter_config(model, targets, seed, heads)
    sd = lora_state_dict(model, heads)
    if format == "peft":
        linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]
        config = _peft_config(cfg, linears, base_model)
        # PEFT's keys carry no adapter name: "<module>.lora_A.weight", and for a head
        # "classifier.weight", not "classifier.modules_to_save.default.weight"
        tensors = {}
        for k, v in sd.items():
            is_head = any(k.startswith(h + ".") for h in heads)
            if is_head or v.numel():
                tensors[PEFT_PREFIX + k + ("" if is_head else ".weight")] = v
    else:
        config, tensors = cfg, sd
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
    _write_json(path / ADAPTER_CONFIG, config)
    return path


def load_adapter(path: str | os.PathLike, model: nn.Module) -> dict:
    """Load an adapter folder into a model that already has LoRA layers on the same modules
    (add_lora): ours (save_adapter, either format) or one PEFT wrote (adapter_config.json +
    adapter_model.safetensors or .bin; rank_pattern / alpha_pattern resolved by PEFT's rule).
    Layers are resized to the saved ranks and given the saved alphas, so every matrix has the
    scale it was trained with. Keys and shapes are checked before any layer changes.
    Returns the config."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{path / ADAPTER_CONFIG} not found: is {path} an adapter folder?")
    cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    if (path / ADAPTER_WEIGHTS).is_file():
        sd, _ = read_safetensors(path / ADAPTER_WEIGHTS)
    elif (path / PEFT_BIN_WEIGHTS).is_file():
        sd = torch.load(path / PEFT_BIN_WEIGHTS, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} or {PEFT_BIN_WEIGHTS} in {path}")
    layers = lora_layers(model)
    if cfg.get("format") == FIMLORA_FORMAT:
        ranks, alphas = cfg["ranks"], cfg["alphas"]
    elif cfg.get("peft_type") == "LORA":
        ranks, alphas, sd = _from_peft(cfg, sd, model)
        cfg["rslora"] = bool(cfg.get("use_rslora", False))
    else:
        raise ValueError(f"{path / ADAPTER_CONFIG} is neither a {FIMLORA_FORMAT} nor a PEFT "
                         f"LoRA adapter config (peft_type={cfg.get('peft_type')!r})")
    unknown = sorted(set(ranks) - set(layers))
    if unknown or set(layers) - set(ranks):
        raise ValueError(f"adapter modules {unknown[:5]} / model LoRA modules "
                         f"{sorted(set(layers) - set(ranks))[:5]} differ: add_lora with the "
                         f"adapter's targets {cfg.get('targets')} first")
    params = dict(model.named_parameters())  # every check runs before any layer is resized
    _check_keys(sd, params, layers)
    for name, layer in layers.items():
        if layer.rslora != cfg["rslora"]:
            raise ValueError(f"{name}: model rslora={layer.rslora}, adapter {cfg['rslora']}")
        for k, shape in ((f"{name}.lora_A", (ranks[name], layer.in_features)),
                         (f"{name}.lora_B", (layer.out_features, ranks[name]))):
            if tuple(sd[k].shape) != shape:
                raise ValueError(f"{k} has shape {tuple(sd[k].shape)} but the config gives "
                                 f"r={ranks[name]}: does a rank_pattern key match {name}? "
                                 f"(keys name base-model modules, without {PEFT_PREFIX!r})")
    for name, layer in layers.items():
        if layer.r != ranks[name]:
            resize_lora(layer, ranks[name])
        layer.alpha = float(alphas[name])
    load_lora_state_dict(model, sd)
    return cfg
