"""LoRA in one file (stdlib and torch only): a low-rank adapter around a frozen nn.Linear, and
its files (ours and PEFT's). W0: (d_out, d_in), A: (r, d_in), B: (d_out, r), ΔW = s·B A.

    from lora import add_lora, merge_lora, save_adapter, load_adapter
    add_lora(model, targets=["query", "value"], r=8, alpha=16, heads=["classifier"])
    ...train...
    save_adapter("out/adapter", model, format="peft")

References: LoRA, Hu et al. 2021, arXiv:2106.09685; rsLoRA, Kalajdzievski 2023, arXiv:2312.03732;
PEFT's adapter format, https://github.com/huggingface/peft (adapter_config.json + safetensors).
"""

import contextlib
import json
import math
import numbers
import os
import re
import stat
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """h = W0 x + b + s·B A dropout(x)  (LoRA, eq. 3), W0 and b the nn.Linear's, frozen, under
    their names. A ~ Kaiming-uniform(a=√5), B = 0, so the layer starts as the base layer
    (https://github.com/microsoft/LoRA/blob/main/loralib/layers.py). r = 0: no adapter."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, generator: torch.Generator | None = None):
        super().__init__()
        _check(r, alpha, dropout)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # W0: (d_out, d_in)
        self.alpha, self.rslora, self.merged = float(alpha), rslora, False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(base.weight.new_empty(0))  # filled by _make_adapter
        self.lora_B = nn.Parameter(base.weight.new_empty(0))
        self._make_adapter(int(r), generator)

    def _make_adapter(self, r: int, generator: torch.Generator | None, init: bool = True) -> None:
        # drawn on the generator's device, then moved: a CPU generator cannot fill a CUDA tensor,
        # and the draws do not depend on where the model lives; set into the same Parameters,
        # so an optimizer built before a resize trains the new ones
        self.r, w = r, self.weight
        A = torch.empty(r, self.in_features, dtype=w.dtype,
                        device=w.device if generator is None else generator.device)  # (r, d_in)
        if r > 0 and init:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            self.lora_A.set_(A.to(w.device))
            self.lora_B.set_(w.new_zeros(self.out_features, r))  # B: (d_out, r)
        self.lora_A.grad = self.lora_B.grad = None

    @property
    def scaling(self) -> float:
        """s = α/r, or α/√r with rsLoRA; 0 for r = 0."""
        root_r = math.sqrt(self.r) if self.rslora else self.r
        return 0.0 if self.r == 0 else self.alpha / root_r

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r == 0 or self.merged:
            return F.linear(x, self.weight, self.bias)
        # d_in -> r -> d_out; addmm_ adds s·u Bᵀ in the GEMM, in place (y is fresh; linear's
        # backward does not need it); in-place ops skip autocast, hence the casts
        u = F.linear(self.dropout(x), self.lora_A).reshape(-1, self.r)  # (N, r)
        y = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)  # (N, d_out)
        y.addmm_(u.to(y.dtype), self.lora_B.T.to(y.dtype), alpha=self.scaling)
        # not an autograd view, as F.linear's output: callers may modify it in place, and tensor
        # hooks on it still see ∂L/∂y (fimlora relies on it)
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], self.out_features))

    @torch.no_grad()
    def merge(self, merged: bool = True) -> None:
        """W0 <- W0 + s·B A, so inference costs one matmul; merged=False undoes it."""
        if self.merged != merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype), alpha=1 if merged else -1)
            self.merged = merged


# -----------------------------------------------------------------------------
# adding, resizing and merging adapters; their state dicts


def _check(r, alpha, dropout: float = 0.0, where: str = "") -> None:
    if not (isinstance(r, numbers.Integral) and r >= 0):
        raise ValueError(f"{where}r={r!r:.60} is invalid: use an int >= 0")
    if not (isinstance(alpha, numbers.Real) and abs(alpha) <= sys.float_info.max):
        raise ValueError(f"{where}alpha={alpha!r:.60} is invalid: use a finite number")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout!r} is invalid: use a number in [0, 1)")


def _pattern(p, field: str, is_rank: bool, where: str = "") -> dict:
    """{module name: r (is_rank) or α}, every value checked; None is {}."""
    if not isinstance(p := {} if p is None else p, dict):
        raise ValueError(f"{where}{field}={p!r:.60} is invalid: use a dict (JSON object)")
    for k, v in p.items():
        _check(v if is_rank else 0, 0 if is_rank else v, where=f"{where}{field}[{k!r}]: ")
    return p


def _names(v, field: str, where: str = "", model: nn.Module | None = None) -> list[str]:
    """A str or a list, tuple or set of str as a list; with `model`, each one of its modules."""
    v = [v] if isinstance(v, str) else list(v) if isinstance(v, list | tuple | set) else v
    if not (isinstance(v, list) and all(isinstance(s, str) and s for s in v)):
        raise ValueError(f"{where}{field}={v!r:.60} is invalid: use a list of module names")
    for h in v if model is not None else ():
        if h not in dict(model.named_modules()):
            raise ValueError(f"{where}head {h!r} is not a module of the model; top-level modules: "
                             f"{', '.join(n for n, _ in model.named_children())}")
    return v


def name_matches(name: str, target: str) -> bool:
    """PEFT's target_modules rule: target is the module's name or a dotted suffix of it.
    name_matches("layer.0.query", "query") is True, name_matches("layer.0.xquery", "query") False"""
    return name == target or name.endswith("." + target)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, targets: Sequence[str], r: int, alpha: float,
             rank_pattern: dict[str, int] | None = None,
             alpha_pattern: dict[str, float] | None = None, dropout: float = 0.0,
             rslora: bool = False, heads: Sequence[str] = (),
             generator: torch.Generator | None = None) -> list[str]:
    """Wrap every nn.Linear matching a target (name_matches) in a LoRALinear, in place; freeze all
    but adapters and `heads`; return the adapted names. rank_pattern / alpha_pattern: r / α by
    name or suffix.  add_lora(model, ["query"], r=8, alpha=16, rank_pattern={"0.query": 4})"""
    _check(r, alpha, dropout)
    targets, heads = _names(targets, "targets"), _names(heads, "heads", model=model)
    if not targets:  # it would only freeze the model
        raise ValueError("targets is empty: name the nn.Linear modules to adapt (or suffixes)")
    patterns = (_pattern(rank_pattern, "rank_pattern", True),
                _pattern(alpha_pattern, "alpha_pattern", False))
    lora, modules = lora_layers(model), dict(model.named_modules(remove_duplicate=False))
    linears = {n: m for n, m in modules.items() if isinstance(m, nn.Linear)}
    names = [n for n in linears if any(name_matches(n, t) for t in targets)]
    for n in names:  # merging ΔW into a tied W0 would change the other owner too
        if tied := [s for s, p in model.named_parameters(remove_duplicate=False)
                    if p is linears[n].weight and s != f"{n}.weight"]:
            raise ValueError(f"{n} shares its weight with {tied[0]} (tied): merging its ΔW would "
                             f"change it too; drop {n.rsplit('.', 1)[-1]} from the targets")
    for t in targets:  # an already adapted module counts as a match and is left as it is
        if not any(name_matches(n, t) for n in [*linears, *lora]):
            raise ValueError(f"target {t!r} matches no nn.Linear; the model has: "
                             f"{', '.join(sorted(linears)) or '(none)'}")
    for key in (k for p in patterns for k in p if not any(name_matches(n, k) for n in names)):
        raise ValueError(f"pattern key {key!r} matches no adapted module (PEFT ignores it: issue "
                         f"#3582); adapted modules are: {', '.join(names)}")
    adapters = {id(p) for m in lora.values() for p in (m.lora_A, m.lora_B)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters and p.requires_grad)
    for name in names:
        r_m, alpha_m = (next((v for k, v in p.items() if name_matches(name, k)), default)
                        for p, default in zip(patterns, (r, alpha)))
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child,
                LoRALinear(linears[name], int(r_m), alpha_m, dropout, rslora, generator))
    for h in heads:
        modules[h].requires_grad_(True)
    return names


def resize_lora(layer: LoRALinear, new_r: int, alpha: float | None = None,
                generator: torch.Generator | None = None) -> None:
    """A fresh adapter (ΔW = 0) at rank new_r and α = alpha (None keeps it); an optimizer that
    has stepped holds moments of the old shapes: build it after.  resize_lora(layer, 4, 8.0)"""
    alpha = layer.alpha if alpha is None else alpha
    _check(new_r, alpha, where="resize_lora: ")
    if layer.merged:
        raise ValueError("resize_lora on a merged layer loses ΔW: merge_lora(model, False) first")
    layer._make_adapter(int(new_r), generator)
    layer.alpha = float(alpha)


def merge_lora(model: nn.Module, merged: bool = True) -> None:
    """W0 <- W0 + s·B A in every LoRA layer; merged=False undoes it (unmerge)."""
    for layer in lora_layers(model).values():
        layer.merge(merged)


def lora_state_dict(model: nn.Module, heads: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """"<module>.lora_A" / "<module>.lora_B" and the heads' "<head>.<param>" tensors, detached."""
    sd = {f"{n}.lora_{x}": getattr(m, f"lora_{x}").detach()
          for n, m in lora_layers(model).items() for x in "AB"}
    for h in _names(heads, "heads", model=model):
        sd.update({f"{h}.{k}": p.detach() for k, p in model.get_submodule(h).named_parameters()})
    return sd


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], *,
                         ranks: dict[str, int] | None = None, alphas: dict | None = None,
                         heads: Sequence[str] = (), where: str = "state dict") -> None:
    """Copy sd into the model (LoRA layers resized to `ranks`, given `alphas`), all or nothing:
    every LoRA (but of rank 0) and `heads` tensor, of its shape, a float dtype, finite, none
    unexpected.  load_lora_state_dict(model, lora_state_dict(other))"""
    if not (isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())):
        raise ValueError(f"{where}: not a state dict (a dict of names to tensors)")
    params, layers = dict(model.named_parameters()), lora_layers(model)
    if any(m.merged for m in layers.values()):
        raise ValueError(f"{where}: LoRA layers are merged: merge_lora(model, False) first")
    need = [f"{n}.lora_{x}" for n in layers for x in "AB" if (ranks or {}).get(n) != 0]
    need += [f"{h}.{k}" for h in heads for k, _ in model.get_submodule(h).named_parameters()]
    known = {k for k, p in params.items() if p.requires_grad} | set(need)  # never a frozen W0
    missing, unexpected = [k for k in need if k not in sd], [k for k in sd if k not in known]
    if missing or unexpected:
        raise ValueError(f"{where}: missing {missing[:8]}, unexpected {unexpected[:8]}: check "
                         "targets, heads and model")
    for k, v in sd.items():  # the first bad tensor is reported
        p, (n, _, x), shape = params[k], k.rpartition("."), tuple(params[k].shape)
        if ranks is not None and n in layers and x in ("lora_A", "lora_B"):
            shape = (ranks[n], shape[1]) if x == "lora_A" else (shape[0], ranks[n])
        if tuple(v.shape) != shape:
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)}, the model needs {shape} "
                             "(were ranks resized? does a rank_pattern key match the module?)")
        if not (v.is_floating_point() and torch.can_cast(v.dtype, p.dtype)):
            raise ValueError(f"{where}: {k} has dtype {v.dtype}, needs a float dtype for {p.dtype}")
        if not torch.isfinite(v.to(p.dtype)).all():
            raise ValueError(f"{where}: {k} has non-finite values (NaN or inf in {p.dtype})")
    with torch.no_grad():  # every check has passed: now change the model
        for n, layer in layers.items() if ranks is not None else ():
            if layer.r != ranks[n]:
                layer._make_adapter(int(ranks[n]), None, init=False)  # no RNG draw: filled next
            layer.alpha = float(alphas[n])
        for k, v in sd.items():
            params[k].copy_(v)


# --- on disk ---------------------------------------------------------------------
# regular files, atomic writes, safetensors, and adapter folders (ours and PEFT's)

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX, PEFT_BIN = "base_model.model.", "adapter_model.bin"  # PEFT's pickle: not read
FIMLORA_FORMAT = "fimlora-adapter-v1"
JSON_LIMIT = 1 << 24  # bytes of a config file (PEFT's for 10⁴ modules takes ~1 MB)
# safetensors: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
# data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the raw little-endian bytes
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_ST_MAX_HEADER = 100_000_000  # bytes; real headers take ~100 bytes per tensor
_ST_MAX_TENSORS = 1 << 17  # real files hold ~10³ per shard; 1.3 M empty entries took 30 s, 2 GB


def open_regular(path: str | os.PathLike, limit: int | None = None) -> BinaryIO:
    """open(path, "rb") for a regular file of at most `limit` bytes, else ValueError naming it
    (a FIFO would block forever, /dev/zero never ends).  with open_regular(p, 1 << 24) as f: ..."""
    try:  # O_NONBLOCK: opening a FIFO does not wait for a writer; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except OSError as e:
        fix = ": make it readable (chmod u+r) or run as its owner" if e.errno == 13 else ""
        raise ValueError(f"cannot read {path}: {e.strerror}{fix}") from None
    size, regular = os.fstat(fd).st_size, stat.S_ISREG(os.fstat(fd).st_mode)
    if not regular or (limit is not None and size > limit):
        os.close(fd)
        what = f"{size:,} bytes, over the {limit:,} accepted" if regular else "not a regular file"
        raise ValueError(f"{path} is {what}: pass the real file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (open_regular's checks)."""
    with open_regular(path, limit) as f:
        return f.read()


def _json(raw: bytes, where: str) -> dict:
    """A UTF-8 JSON object, else ValueError naming `where`."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSON, UTF-8, nesting, huge ints
        raise ValueError(f"{where} is not valid JSON in UTF-8 ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is a JSON {type(obj).__name__}, not a JSON object")
    return obj


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and new files in folder `path` durable (no-op where unsupported: Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write) -> None:
    """write(f) to a temp file beside path, fsync, rename onto path, fsync the folder: readers
    and crashes see the old file or the new one, never half.  atomic_write(p, lambda f: ...)"""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # open()'s mode: 0o666 & ~umask
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on the CPU, metadata) of a .safetensors file, else ValueError naming it. The
    header is checked before a tensor byte is read: <= 100 MB, <= 2**17 entries, known dtypes,
    shapes of <= 64 ints >= 0, data_offsets that tile the data section exactly."""
    with open_regular(path) as f:
        size, n = os.fstat(f.fileno()).st_size, int.from_bytes(f.read(8), "little")
        if size < 8 or n > min(size - 8, _ST_MAX_HEADER):
            raise ValueError(f"{path}: header length {n} exceeds the file size {size} or 100 MB: "
                             "the file is truncated or not safetensors")
        if (raw := f.read(n)).count(b"{") > _ST_MAX_TENSORS + 1:  # an object per entry
            raise ValueError(f"{path}: the header holds over {_ST_MAX_TENSORS:,} entries")
        header = _json(raw, f"{path}: header")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError(f"{path}: __metadata__={meta!r:.80} is not a {{str: str}}")
        spans = []
        for name, info in header.items():
            dtype, shape, offs = (info.get(k) if isinstance(info, dict) else None
                                  for k in ("dtype", "shape", "data_offsets"))
            if not (isinstance(dtype, str) and dtype in _ST_DTYPES and isinstance(shape, list)
                    and len(shape) <= 64 and all(type(d) is int and d >= 0 for d in shape)
                    and math.prod(max(d, 1) for d in shape) <= 2**62
                    and isinstance(offs, list) and [type(o) for o in offs] == [int, int]
                    and offs[1] - offs[0] == math.prod(shape) * _ST_DTYPES[dtype].itemsize):
                raise ValueError(f"{path}: tensor {name!r:.80} has header {info!r:.200}: an "
                                 "unsupported dtype or a malformed shape or data_offsets")
            spans.append((*offs, name))
        spans.sort()  # the offsets must tile [0, data size) exactly, begin <= end included
        if [0, *(end for _, end, _ in spans)] != [*(begin for begin, _, _ in spans), size - 8 - n]:
            raise ValueError(f"{path}: the tensors' data_offsets overlap, leave gaps or leave "
                             f"trailing bytes in the {size - 8 - n}-byte data section")
        tensors = {}
        for begin, end, name in spans:  # in file order, each into its own (aligned) buffer
            buf, dtype = bytearray(end - begin), _ST_DTYPES[header[name]["dtype"]]
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{path}: the file shrank while it was read")
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            tensors[name] = t.reshape(header[name]["shape"])
    return tensors, meta


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write tensors (moved to CPU, made contiguous) as .safetensors, atomically."""
    names = {v: k for k, v in _ST_DTYPES.items()}
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, pos = [], 0
    for name, t in tensors.items():
        if t.dtype not in names or name == "__metadata__":
            raise ValueError(f"tensor {name!r} (dtype {t.dtype}) cannot be stored in safetensors: "
                             f"use a dtype among {', '.join(map(str, names))} and another name")
        # the raw bytes through a bytearray, not numpy, so this file stands alone
        flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # (nbytes,)
        blobs.append(bytearray(flat.numel()))
        if flat.numel():
            torch.frombuffer(blobs[-1], dtype=torch.uint8).copy_(flat)
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [pos, pos + len(blobs[-1])]}
        pos += len(blobs[-1])
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # the format pads the header to 8-byte alignment
    atomic_write(path, lambda f: f.writelines([len(h).to_bytes(8, "little"), h, *blobs]))


def save_adapter(path: str | os.PathLike, model: nn.Module, targets: Sequence[str] = (),
                 seed: int | None = None, heads: Sequence[str] = (), format: str = "fimlora",
                 base_model: str | None = None, task_type: str | None = None) -> Path:
    """Save adapter and head tensors with every matrix's rank and alpha to folder `path`, ours
    or what PeftModel.from_pretrained loads (format="peft"; PEFT's task_type defaults to SEQ_CLS
    with a classifier/score head).  save_adapter("out/a", model, ["query"], format="peft")"""
    if format not in ("fimlora", "peft"):
        raise ValueError(f"format={format!r} is invalid: use 'fimlora' or 'peft'")
    targets, heads = _names(targets, "targets"), _names(heads, "heads", model=model)
    layers, tensors = lora_layers(model), lora_state_dict(model, heads)
    if not layers and not heads:
        raise ValueError("nothing to save: the model has no LoRA layer (add_lora first) and no "
                         "heads were named")
    if len(rslora := {m.rslora for m in layers.values()}) > 1:
        raise ValueError("layers disagree on rsLoRA; one adapter has one scaling rule")
    rslora, dropout = rslora == {True}, max((m.dropout.p for m in layers.values()
                                             if isinstance(m.dropout, nn.Dropout)), default=0.0)
    ranks, alphas = {n: m.r for n, m in layers.items()}, {n: m.alpha for n, m in layers.items()}
    config = {"format": FIMLORA_FORMAT, "targets": targets, "heads": heads, "rslora": rslora,
              "dropout": dropout, "seed": None if seed is None else int(seed), "ranks": ranks,
              "alphas": alphas, "scalings": {n: m.scaling for n, m in layers.items()}}
    if format == "peft":  # r: the most common rank; α: the most common at r (one scale if uniform)
        if not (kept := [n for n, r in ranks.items() if r > 0]):
            raise ValueError("every LoRA layer has r = 0: there is no adapter to save for PEFT")
        if inside := [n for n in ranks if any(n == h or n.startswith(h + ".") for h in heads)]:
            raise ValueError(f"LoRA layers {inside[:5]} lie inside heads {heads}: PEFT never "
                             "adapts modules_to_save; save those heads without LoRA")
        r = Counter(ranks[n] for n in kept).most_common(1)[0][0]
        alpha = Counter(alphas[n] for n in kept if ranks[n] == r).most_common(1)[0][0]
        matched = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))
                   and any(name_matches(n, t) for t in targets)}
        targets = sorted(set(targets)) if matched == set(kept) else kept  # PEFT has no rank 0
        config = {  # SEQ_CLS: PEFT adds "classifier" and "score" to modules_to_save itself
            "peft_type": "LORA", "base_model_name_or_path": base_model,
            "task_type": task_type or ("SEQ_CLS" if {"classifier", "score"} & set(heads) else None),
            "r": r, "lora_alpha": alpha, "target_modules": targets,
            "rank_pattern": {"^" + re.escape(n): ranks[n] for n in kept if ranks[n] != r},
            "alpha_pattern": {"^" + re.escape(n): alphas[n] for n in kept if alphas[n] != alpha},
            "use_rslora": rslora, "lora_dropout": dropout, "bias": "none", "fan_in_fan_out": False,
            "use_dora": False, "init_lora_weights": True, "modules_to_save": heads or None,
            "inference_mode": True}
        tensors = {PEFT_PREFIX + k + ".weight" * k.endswith((".lora_A", ".lora_B")): v
                   for k, v in tensors.items() if v.numel()}  # PEFT's names; rank 0 left out
    text, path = json.dumps(config, indent=2) + "\n", Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
    atomic_write(path / ADAPTER_CONFIG, lambda f: f.write(text.encode()))
    return path


def load_adapter(path: str | os.PathLike, model: nn.Module) -> dict:
    """Load an adapter folder, ours or PEFT's (safetensors), with its ranks and alphas into a
    model with LoRA layers on the same modules (add_lora); return its config. All or nothing:
    everything is checked before any layer changes.  load_adapter("out/a", model)"""
    path, layers = Path(path), lora_layers(model)
    config, weights, pickled = (path / f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_BIN))
    cfg, where = _json(read_regular(config, JSON_LIMIT), str(config)), f"{config}: "
    if not weights.exists() and pickled.exists():  # PEFT's safe_serialization=False
        raise ValueError(f"{pickled}: a pickle, which fimlora does not load: save it with "
                         f"save_pretrained(..., safe_serialization=True) as {ADAPTER_WEIGHTS}")
    sd = read_safetensors(weights)[0]
    if cfg.get("format") == FIMLORA_FORMAT:
        ranks, alphas = (_pattern(cfg.get(f), f, f == "ranks", where) for f in ("ranks", "alphas"))
        rslora, heads = cfg.get("rslora"), _names(cfg.get("heads", []), "heads", where, model)
    elif cfg.get("peft_type") == "LORA":  # r_m: the rows of its saved lora_A (none saved: r = 0)
        for field in ("use_dora", "fan_in_fan_out", "bias", "lora_bias", "layers_to_transform",
                      "layer_replication", "target_parameters", "trainable_token_indices"):
            if cfg.get(field) not in (None, False, [], {}, "none"):  # what LoRALinear cannot do
                raise ValueError(f"{where}{field}={cfg[field]!r:.60}: fimlora's LoRALinear does "
                                 "not implement it: only adapters with it off load")
        _check(0, cfg.get("lora_alpha"), where=f"{where}PEFT's lora_")
        keys = []
        for k, a in _pattern(cfg.get("alpha_pattern"), "alpha_pattern", False, where).items():
            try:  # PEFT's get_pattern_key: the first key whose regex matches the module's name
                keys.append((re.compile(rf"(.*\.)?({k})$"), a))
            except (re.error, RecursionError, OverflowError) as e:
                raise ValueError(f"{where}alpha_pattern key {k!r:.80} is not a valid regular "
                                 f"expression ({e}): fix it or re.escape the module name") from None
        # to our names: "<m>.lora_A[.<adapter>].weight", "<head>.modules_to_save.<adapter>.<p>"
        ours = re.compile(r"\.modules_to_save\.[^.]+(?=\.)|(?<=\.lora_[AB])(\.[^.]+)?\.weight$")
        sd = {ours.sub("", k.removeprefix(PEFT_PREFIX)): v for k, v in sd.items()}
        ranks = {n: A.shape[0] if (A := sd.get(f"{n}.lora_A")) is not None and A.dim() else 0
                 for n in layers}
        alphas = {n: next((a for rx, a in keys if rx.match(n)), cfg["lora_alpha"]) for n in layers}
        saved = _names(cfg.get("modules_to_save") or [], "modules_to_save", where)
        heads = [n for n, _ in model.named_modules() if any(name_matches(n, s) for s in saved)]
        rslora = cfg["rslora"] = cfg.get("use_rslora", False)
    else:
        raise ValueError(f"{where}neither a {FIMLORA_FORMAT} nor a PEFT LoRA config (format="
                         f"{cfg.get('format')!r:.40}, peft_type={cfg.get('peft_type')!r:.40})")
    if not set(ranks) == set(alphas) == set(layers):
        raise ValueError(f"{where}adapter modules {sorted(set(ranks) ^ set(layers))[:5]} or "
                         f"alphas {sorted(set(alphas) ^ set(layers))[:5]} differ from the model's "
                         f"LoRA modules: add_lora with the adapter's targets first")
    if not isinstance(rslora, bool) or any(m.rslora != rslora for m in layers.values()):
        raise ValueError(f"{where}rslora={rslora!r:.20} differs from the model's layers: "
                         "add_lora with the adapter's rslora (true or false)")
    load_lora_state_dict(model, sd, ranks=ranks, alphas=alphas, heads=heads, where=str(weights))
    return cfg
