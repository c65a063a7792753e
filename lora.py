"""LoRA in one file: a low-rank adapter around a frozen nn.Linear, plus saving and loading.

    from lora import add_lora, lora_state_dict, merge_lora, save_adapter, load_adapter
    names = add_lora(model, targets=["query", "value"], r=8, alpha=16, heads=["classifier"])
    ...train...
    save_adapter("out/adapter", model, seed=0)

Convention used everywhere in fimlora: W0: (d_out, d_in) is frozen, A: (r, d_in), B: (d_out, r),
ΔW = s·B A with s = α/r (α/√r with rsLoRA); per-matrix ranks (FIM-LoRA) are per-layer r_m, α_m.
Standard library and torch only: copy it into any project. Bad arguments and files raise
ValueError naming the argument or file, field and value, before anything changes.
References: LoRA, Hu et al. 2021, arXiv:2106.09685; rsLoRA, Kalajdzievski 2023, arXiv:2312.03732;
PEFT's adapter format, https://github.com/huggingface/peft (adapter_config.json + safetensors).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import numbers
import os
import re
import reprlib
import stat
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import torch
import torch.nn as nn
import torch.nn.functional as F


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """s = α/r, or α/√r with rsLoRA (arXiv:2312.03732); 0 for r = 0.  lora_scaling(8, 16) == 2.0"""
    return 0.0 if r == 0 else alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(nn.Module):
    """h = W0 x + b + s·B A dropout(x)  (LoRA, eq. 3), W0 and b an nn.Linear's, frozen and kept
    under their names, so checkpoints of the adapted and plain model fit each other. A is
    Kaiming-uniform(a=√5), B = 0 (https://github.com/microsoft/LoRA/blob/main/loralib/layers.py):
    the layer starts as the base layer. r = 0 means "no adapter"."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, generator: torch.Generator | None = None):
        super().__init__()
        _check(base, "an nn.Linear", "base", ok=isinstance(base, nn.Linear))
        _check_args(r, alpha, dropout, rslora, generator)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # W0: (d_out, d_in)
        self.alpha, self.rslora, self.merged = float(alpha), rslora, False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._make_adapter(int(r), generator)

    def _make_adapter(self, r: int, generator: torch.Generator | None, init: bool = True) -> None:
        """New A (Kaiming; left for a load to fill if not init), B = 0 at rank r, set into the
        existing Parameters (stale .grad dropped): an optimizer built before a resize trains it."""
        self.r, w = r, self.weight
        # drawn on the generator's device, then moved: a CPU generator cannot fill a CUDA tensor,
        # and the draws then do not depend on where the model lives
        A = torch.empty(r, self.in_features, dtype=w.dtype,
                        device=w.device if generator is None else generator.device)  # (r, d_in)
        if r > 0 and init:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        A, B = A.to(w.device), w.new_zeros(self.out_features, r)  # B: (d_out, r)
        if "lora_A" not in self._parameters:
            self.lora_A, self.lora_B = nn.Parameter(A), nn.Parameter(B)
            return
        with torch.no_grad():
            self.lora_A.set_(A)
            self.lora_B.set_(B)
        self.lora_A.grad = self.lora_B.grad = None

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.rslora)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B A, (d_out, d_in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r == 0 or self.merged:
            return F.linear(x, self.weight, self.bias)
        # d_in -> r -> d_out; addmm_ adds s·u Bᵀ in the GEMM, in place (y is fresh; the backward of
        # linear does not need it); in-place ops skip autocast, hence the casts
        u = F.linear(self.dropout(x), self.lora_A).reshape(-1, self.r)  # (N, r)
        y = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)  # (N, d_out)
        y.addmm_(u.to(y.dtype), self.lora_B.T.to(y.dtype), alpha=self.scaling)
        # not an autograd view, as F.linear's output: callers may modify it in place, and tensor
        # hooks on it still see ∂L/∂y (fimlora relies on it)
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], self.out_features))

    @torch.no_grad()
    def merge(self, merged: bool = True) -> None:
        """W0 <- W0 + s·B A, so inference costs one matmul; unmerge() (merged=False) undoes it."""
        if self.merged != merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype), alpha=1 if merged else -1)
            self.merged = merged

    def unmerge(self) -> None:
        self.merge(False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, rslora={self.rslora}, merged={self.merged}")


# -----------------------------------------------------------------------------
# adding, resizing and merging adapters

_RANK, _ALPHA, _FLAG = "an int >= 0", "a finite number", "True or False"  # what _check knows
_PROB = "a number in [0, 1)"
_MISSING = object()


def _check(v, want: str, name: str, where: str = "", ok: bool | None = None) -> None:
    """ValueError "<where><name>=<v> is invalid: use <want>" unless ok, which defaults to v
    being what want says (_RANK, ...).  _check(8, _RANK, "r") passes; JSON's true is no int."""
    num = isinstance(v, numbers.Real) and not isinstance(v, bool)
    if ok is None:
        ok = {_RANK: num and isinstance(v, numbers.Integral) and v >= 0, _PROB: num and 0 <= v < 1,
              _ALPHA: num and v == v and abs(v) <= sys.float_info.max,
              _FLAG: isinstance(v, bool)}[want]
    if not ok:
        bad = " is missing" if v is _MISSING else f"={reprlib.repr(v)} is invalid"
        raise ValueError(f"{where}{name}{bad}: use {want}")


def _check_args(r, alpha, dropout=0.0, rslora=False, generator=None) -> None:
    for v, want, name in ((r, _RANK, "r"), (alpha, _ALPHA, "alpha"), (dropout, _PROB, "dropout"),
                          (rslora, _FLAG, "rslora")):
        _check(v, want, name)
    _check(generator, "a torch.Generator", "generator",
           ok=generator is None or isinstance(generator, torch.Generator))


def _names(v, name: str, where: str = "") -> list[str]:
    """A str or an iterable of str as a list (targets, heads).  _names("query", "t") == ["query"]"""
    ok = isinstance(v, Iterable) and not isinstance(v, Mapping)
    v = [v] if isinstance(v, str) else list(v) if ok else v
    _check(v, "a str or a list of str", name, where, ok and all(isinstance(s, str) for s in v))
    return v


def _pattern(p, name: str, want: str, where: str = "") -> dict:
    """p (None: {}), checked to be a {str: value} dict whose values are `want` (rank_pattern)."""
    p = {} if p is None else p
    _check(p, "a dict (JSON object)", name, where, isinstance(p, dict))
    for k, v in p.items():
        _check(k, "str module names", f"{name} key", where, isinstance(k, str))
        _check(v, want, f"{name}[{k!r}]", where)
    return p


def _heads(model: nn.Module, heads, where: str = "") -> list[str]:
    for h in (heads := _names(heads, "heads", where)):  # each a module of the model
        if h not in dict(model.named_modules()):
            raise ValueError(f"{where}head {h!r} is not a module of the model; top-level modules: "
                             f"{', '.join(n for n, _ in model.named_children())}")
    return heads


def name_matches(name: str, target: str) -> bool:
    """PEFT's target_modules rule: target is the module's name or a dotted suffix of it.
    name_matches("layer.0.query", "query") is True, name_matches("layer.0.xquery", "query") False"""
    return name == target or name.endswith("." + target)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """All LoRALinear modules of a model by name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, targets: Sequence[str], r: int, alpha: float,
             rank_pattern: dict[str, int] | None = None,
             alpha_pattern: dict[str, float] | None = None, dropout: float = 0.0,
             rslora: bool = False, heads: Sequence[str] = (),
             generator: torch.Generator | None = None) -> list[str]:
    """Replace every nn.Linear whose name ends with a target (name_matches) by a LoRALinear, in
    place, and freeze all but the adapters (earlier ones keep their requires_grad) and `heads`
    (e.g. "classifier"); returns the adapted names. rank_pattern / alpha_pattern map a name or
    dotted suffix to its own r / α; a key matching no adapted module raises (PEFT issue #3582)."""
    _check_args(r, alpha, dropout, rslora, generator)
    targets, heads = _names(targets, "targets"), _heads(model, heads)
    patterns = {"rank_pattern": (_pattern(rank_pattern, "rank_pattern", _RANK), r),
                "alpha_pattern": (_pattern(alpha_pattern, "alpha_pattern", _ALPHA), alpha)}
    lora, modules = lora_layers(model), dict(model.named_modules())
    linears = {n: m for n, m in modules.items() if isinstance(m, nn.Linear)}
    names = [n for n in linears if any(name_matches(n, t) for t in targets)]
    for t in targets:  # an already adapted module counts as a match and is left as it is
        if not any(name_matches(n, t) for n in [*linears, *lora]):
            raise ValueError(f"target {t!r} matches no nn.Linear; the model has: "
                             f"{', '.join(sorted(linears)) or '(none)'}")
    for field, (pattern, _) in patterns.items():
        for key in (k for k in pattern if not any(name_matches(n, k) for n in names)):
            raise ValueError(f"{field} key {key!r} matches no adapted module; adapted modules "
                             f"are: {', '.join(names)}")
    adapters = {id(p) for m in lora.values() for p in (m.lora_A, m.lora_B)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters and p.requires_grad)
    for name in names:
        r_m, alpha_m = (next((v for k, v in p.items() if name_matches(name, k)), default)
                        for p, default in patterns.values())
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child,
                LoRALinear(linears[name], int(r_m), alpha_m, dropout, rslora, generator))
    for h in heads:
        modules[h].requires_grad_(True)
    return names


def resize_lora(layer: LoRALinear, new_r: int, alpha: float | None = None,
                generator: torch.Generator | None = None) -> None:
    """Re-create the adapter at rank new_r (fresh Kaiming A, B = 0: ΔW = 0, the model function
    is unchanged) and α = alpha (None keeps it). lora_A and lora_B stay the same Parameter
    objects, but an optimizer that has stepped holds moments of the old shapes: build it after."""
    _check(layer, "a LoRALinear", "layer", ok=isinstance(layer, LoRALinear))
    _check(new_r, _RANK, "new_r")
    alpha = layer.alpha if alpha is None else alpha
    _check_args(0, alpha, generator=generator)
    if layer.merged:
        raise ValueError("resize_lora on a merged layer would lose ΔW: call unmerge() first")
    layer._make_adapter(int(new_r), generator)
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
    sd = {f"{n}.lora_{x}": getattr(m, f"lora_{x}").detach()
          for n, m in lora_layers(model).items() for x in "AB"}
    for h in _heads(model, heads):
        sd.update({f"{h}.{k}": p.detach() for k, p in model.get_submodule(h).named_parameters()})
    return sd


def _check_entries(sd, where: str) -> None:
    """sd maps str names to dense tensors with data (not sparse, not meta)."""
    for k, v in sd.items() if isinstance(sd, Mapping) else [(_MISSING, sd)]:
        if not (isinstance(k, str) and isinstance(v, torch.Tensor)
                and v.layout == torch.strided and not v.is_meta):
            what = "the top level" if k is _MISSING else f"entry {reprlib.repr(k)}"
            raise ValueError(f"{where}: {what} is a {type(v).__name__}: a state dict maps str "
                             "names to dense tensors")


def _load(model: nn.Module, sd, where: str, ranks: dict[str, int] | None = None,
          alphas: dict[str, float] | None = None, heads: Sequence[str] = ()) -> None:
    """Copy sd into the model (LoRA layers resized to `ranks`, given `alphas`) once it passed every
    check: the model's parameter names, float tensors of their shapes (at `ranks`), finite in the
    model's dtype, every LoRA and `heads` tensor there, no LoRA layer merged (W0 would break)."""
    _check_entries(sd, where)
    params, layers = dict(model.named_parameters()), lora_layers(model)
    if any(m.merged for m in layers.values()):
        raise ValueError(f"{where}: LoRA layers are merged: unmerge_lora(model) first")
    need = [f"{n}.lora_{x}" for n in layers for x in "AB"]
    need += [f"{h}.{k}" for h in heads for k, _ in model.get_submodule(h).named_parameters()]
    missing, unexpected = [k for k in need if k not in sd], [k for k in sd if k not in params]
    if missing or unexpected:
        raise ValueError(f"{where}: adapter does not fit the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]} (check targets, heads and model)")
    bad, hint = [], ""
    for k, v in sd.items():
        p, (n, _, x) = params[k], k.rpartition(".")
        shape, at = tuple(p.shape), ""
        if ranks is not None and n in layers and x in ("lora_A", "lora_B"):
            shape, at = (ranks[n], shape[1]) if x == "lora_A" else (shape[0], ranks[n]), \
                f" at r={ranks[n]}"
        if tuple(v.shape) != shape:
            bad.append(f"{k} has shape {tuple(v.shape)}, the model needs {shape}{at}")
            hint = (" (were ranks resized before loading? does a rank_pattern key match the "
                    f"module? keys name base-model modules, without {PEFT_PREFIX!r})")
        elif not (v.is_floating_point() and torch.can_cast(v.dtype, p.dtype)):
            bad.append(f"{k} has dtype {v.dtype}, the model needs a float dtype for {p.dtype}")
        elif not torch.isfinite(v.to(p.dtype)).all():
            bad.append(f"{k} has non-finite values (NaN or inf in {p.dtype})")
    if bad:
        raise ValueError(f"{where}: " + "; ".join(bad[:8]) + hint)
    with torch.no_grad():  # every check has passed: now change the model
        for n, layer in layers.items() if ranks is not None else ():
            if layer.r != ranks[n]:
                layer._make_adapter(int(ranks[n]), None, init=False)  # no RNG draw: filled next
            layer.alpha = float(alphas[n])
        for k, v in sd.items():
            params[k].copy_(v)


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy adapter (and head) tensors into the model, all checked before anything is written."""
    _load(model, sd, "state dict")


# --- on disk ---------------------------------------------------------------------
# regular files, atomic writes, safetensors, and adapter folders (ours and PEFT's)

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_BIN_WEIGHTS, PEFT_PREFIX = "adapter_model.bin", "base_model.model."
FIMLORA_FORMAT = "fimlora-adapter-v1"
PEFT_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
                   "FEATURE_EXTRACTION")  # PEFT's TaskType (peft/utils/peft_types.py)
JSON_LIMIT = 1 << 24  # bytes of a config file (PEFT's for 10⁴ modules takes ~1 MB)
# safetensors: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
# data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the raw little-endian bytes
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_ST_MAX_HEADER = 100_000_000  # bytes; real headers take ~100 bytes per tensor
_ST_MAX_TENSORS = 1 << 17  # real files hold ~10³ per shard; 1.3 M empty entries took 30 s, 2 GB


def open_regular(path: str | os.PathLike, limit: int | None = None) -> BinaryIO:
    """open(path, "rb") for a regular file (links followed) of at most `limit` bytes, else
    ValueError naming it: a FIFO would block the read forever and /dev/zero never ends. A
    missing file raises FileNotFoundError; another OS error (permission denied, link loop)
    ValueError with the reason.  with open_regular("adapter_config.json", 1 << 24) as f: ..."""
    try:  # O_NONBLOCK: opening a FIFO does not wait for a writer; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except OSError as e:
        fix = ": make it readable (chmod u+r) or run as its owner" if e.errno == 13 else ""
        raise ValueError(f"cannot read {path}: {e.strerror}{fix}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (limit is not None and st.st_size > limit):
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(st.st_mode) else \
            f"{st.st_size:,} bytes, over the {limit:,} this reader accepts"
        raise ValueError(f"{path} is {what}: pass the real file (a FIFO, device or directory "
                         "cannot be read as one)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (open_regular's checks)."""
    with open_regular(path, limit) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} grew past {limit:,} bytes while it was read")
    return data


def _json(raw: bytes, where: str) -> dict:
    """A UTF-8 JSON object in which no key repeats (rather than "the last one wins")."""
    def unique(pairs: list) -> dict:
        twice = [k for k, n in Counter(k for k, _ in pairs).items() if n > 1]
        if twice:
            raise ValueError(f"duplicate key {twice[0]!r}")
        return dict(pairs)
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=unique)
    except (ValueError, RecursionError) as e:  # JSON, UTF-8, duplicates, nesting, huge ints
        raise ValueError(f"{where} is not valid JSON in UTF-8 ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is a JSON {type(obj).__name__}, not a JSON object")
    return obj


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the renames and new files in folder `path` durable (a no-op where a folder cannot be
    opened or synced, as on Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write) -> None:
    """write(f) to a temp file beside path, fsync, rename onto path, fsync the folder: readers
    and crashes see the old file or the new one, never half. Mode 0o666 & ~umask, as open()'s."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)  # the only way to read it; restored at once
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's is 0o600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on the CPU, metadata) of a .safetensors file; every header field is checked before
    a tensor byte is read, only ValueError raised: length within the file and 100 MB, <= 2**17
    entries (counted before parsing), JSON without duplicate keys, __metadata__ {str: str}, known
    dtypes, shapes of <= 64 ints >= 0 (<= 2**62 elements), offsets that tile the data section."""
    with open_regular(path) as f:
        size, n = os.fstat(f.fileno()).st_size, int.from_bytes(f.read(8), "little")
        if size < 8 or n > min(size - 8, _ST_MAX_HEADER):
            raise ValueError(f"{path}: header length {n} exceeds the file size {size} or 100 MB: "
                             "the file is truncated or not safetensors")
        raw = f.read(n)
        if raw.count(b"{") > _ST_MAX_TENSORS + 1:  # an object per entry, and the header
            raise ValueError(f"{path}: the header holds over {_ST_MAX_TENSORS:,} entries; no "
                             "real checkpoint shard has as many: the file is not a model")
        header = _json(raw, f"{path}: header")
        meta = header.pop("__metadata__", None)
        meta = {} if meta is None else meta
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError(f"{path}: __metadata__={reprlib.repr(meta)} is not a {{str: str}}")
        spans = []
        for name, info in header.items():
            dtype, shape, offs = (info.get(k) if isinstance(info, dict) else None
                                  for k in ("dtype", "shape", "data_offsets"))
            ok = isinstance(dtype, str) and dtype in _ST_DTYPES and isinstance(shape, list) \
                and len(shape) <= 64 and all(type(d) is int and d >= 0 for d in shape) \
                and math.prod(max(d, 1) for d in shape) <= 2**62 and isinstance(offs, list) \
                and [type(o) for o in offs] == [int, int] and 0 <= offs[0] <= offs[1] \
                and offs[1] - offs[0] == math.prod(shape) * _ST_DTYPES[dtype].itemsize
            if not ok:
                raise ValueError(f"{path}: tensor {reprlib.repr(name)} has header "
                                 f"{reprlib.repr(info)}: an unsupported dtype or a malformed shape "
                                 f"or data_offsets (need dtype in {'/'.join(_ST_DTYPES)}, a shape "
                                 "of <= 64 ints >= 0, data_offsets [begin, end] of dtype x shape)")
            spans.append((*offs, name))
        spans.sort()
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
    _check_entries(tensors, "write_safetensors: tensors")
    metadata, names = {} if metadata is None else metadata, {v: k for k, v in _ST_DTYPES.items()}
    _check(metadata, "a {str: str} dict", "metadata", ok=isinstance(metadata, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()))
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


def adapter_config(model: nn.Module, targets: Iterable[str] = (), seed: int | None = None,
                   heads: Sequence[str] = ()) -> dict:
    """Per-matrix ranks, alphas and scalings, rsLoRA flag, targets and seed of an adapted model."""
    _check(seed, "an int or None", "seed", ok=seed is None or isinstance(seed, numbers.Integral)
           and not isinstance(seed, bool))
    targets, heads, layers = _names(targets, "targets"), _heads(model, heads), lora_layers(model)
    rslora = {layer.rslora for layer in layers.values()}
    if len(rslora) > 1:
        raise ValueError("layers disagree on rsLoRA; one adapter has one scaling rule")
    dropout = [m.dropout.p for m in layers.values() if isinstance(m.dropout, nn.Dropout)]
    return {"format": FIMLORA_FORMAT, "targets": targets, "heads": heads,
            "rslora": rslora.pop() if rslora else False, "dropout": max(dropout, default=0.0),
            "seed": None if seed is None else int(seed),
            "ranks": {n: m.r for n, m in layers.items()},
            "alphas": {n: m.alpha for n, m in layers.items()},
            "scalings": {n: m.scaling for n, m in layers.items()}}


def _to_peft(cfg: dict, sd: dict, linears: list[str], base_model: str | None,
             task_type: str | None) -> tuple[dict, dict]:
    """(PEFT's LoraConfig, tensors under PEFT's keys) for adapter_config's cfg: r the most common
    rank, patterns keyed by anchored escaped names; at one scale (uniform, initialize_fim_ranks)
    lora_alpha/r is every module's, so a server ignoring the patterns (vLLM) serves the same ΔW.
    Rank-0 modules are left out (PEFT has no rank 0), then target_modules lists adapted names."""
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
    if {n for n in linears if any(name_matches(n, t) for t in targets)} != set(kept):
        targets = kept
    config = {  # SEQ_CLS: PEFT adds "classifier" and "score" to modules_to_save itself
        "peft_type": "LORA", "base_model_name_or_path": base_model,
        "task_type": task_type or ("SEQ_CLS" if {"classifier", "score"} & set(heads) else None),
        "r": r, "lora_alpha": common_alpha, "target_modules": targets,
        "rank_pattern": {"^" + re.escape(n): ranks[n] for n in kept if ranks[n] != r},
        "alpha_pattern": {"^" + re.escape(n): alphas[n] for n in kept
                          if alphas[n] != common_alpha},
        "use_rslora": cfg["rslora"], "lora_dropout": cfg["dropout"], "bias": "none",
        "fan_in_fan_out": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": list(heads) or None, "inference_mode": True}
    # PEFT's keys hold no adapter name: "<module>.lora_A.weight", a head's "classifier.weight"
    is_head = {k: any(k.startswith(h + ".") for h in heads) for k in sd}
    return config, {PEFT_PREFIX + k + ("" if is_head[k] else ".weight"): v
                    for k, v in sd.items() if is_head[k] or v.numel()}


# PEFT matches its regexes with re, each in its rule's frame (below); a hostile pattern in a
# downloaded adapter_config.json can backtrack for hours. We refuse what only a backtracking
# engine gives meaning to (quantifiers but ".*", backreferences, lookarounds, flags) and run the
# rest, characters, escapes, [classes], ".", ".*", groups with |, ^, $, as a Thompson NFA: time
# O(len(pattern)·len(name)). Without ".*" or "|" in the pattern, re itself is that fast.
_PEFT_RX = {"full": ("(?:", ")$"),  # target_modules as a string: re.fullmatch(p, name)
            "key": (r"(.*\.|)(", ")$"),  # rank/alpha_pattern: re.match(rf"(.*\.)?({p})$", name)
            "saved": (r"(^|.*\.)", r"($|\..*)")}  # modules_to_save: re.match(frame, name)
_RX_TOKEN = re.compile(r"\\[dwsDWS]|\\[^0-9A-Za-z]|\[\^?\]?(?:\\.|[^\]\\])*\]|\.\*|\(\?:|[()|^$]"
                       r"|[^\\^$*+?{}()|[]")
_RX_MOVES = ("(", "(?:", "|", ")", "^", "$", ".*")  # the tokens that are not one-character atoms
_compiled = functools.lru_cache(maxsize=4096)(re.compile)  # re's own cache holds only 512


@functools.lru_cache(maxsize=4096)
def _nfa(pattern: str) -> tuple[list[str], dict[int, list[int]]] | None:
    """(tokens of "(?:pattern)", ε-moves of each "(" and "|"), None outside the subset (pattern
    compiles).  _nfa("a|b") == (["(?:", "a", "|", "b", ")"], {0: [1, 3], 2: [4]})"""
    tokens, pos, moves, groups = ["(?:"], 0, {}, []
    while pos < len(pattern):
        if not (m := _RX_TOKEN.match(pattern, pos)):
            return None
        tokens.append(m.group())
        pos = m.end()
    for i, t in enumerate(tokens := tokens + [")"]):
        if t in ("(", "(?:"):
            groups.append([i])
        elif t == "|":
            groups[-1].append(i)
        elif t == ")":
            start, *bars = groups.pop()
            moves[start] = [start + 1, *(b + 1 for b in bars)]  # into each alternative
            moves.update({b: [i] for b in bars})  # an alternative ends: to the group's end
    return tokens, moves


def _peft_match(pattern: str, name: str, rule: str) -> bool:
    """PEFT's answer under `rule` (re.match of the framed pattern, checked by _peft_regex)."""
    p = _PEFT_RX[rule][0] + pattern + _PEFT_RX[rule][1]
    if not {".*", "|"} & set(_nfa(pattern)[0]):
        return _compiled(p).match(name) is not None
    tokens, moves = _nfa(p)

    def close(states: Iterable[int], pos: int) -> set[int]:  # follow ε-moves at name[pos]
        seen, todo = set(), list(states)
        while todo:
            if (i := todo.pop()) not in seen:
                seen.add(i)
                t = tokens[i] if i < len(tokens) else ""
                todo += moves.get(i, [i + 1] if t in (")", ".*") or t == "^" and pos == 0
                                  or t == "$" and pos == len(name) else [])
        return seen
    states = close([0], 0)
    for pos, c in enumerate(name):
        if len(tokens) in states or not states:
            break
        moved = []
        for i in states:
            t = tokens[i] if i < len(tokens) else ")"
            if t == ".*" and c != "\n":
                moved.append(i)  # ".*" stays
            elif t not in _RX_MOVES and re.fullmatch(t, c):
                moved.append(i + 1)  # an atom that matches c moves on
        states = close(moved, pos + 1)
    return len(tokens) in states


def _peft_regex(pattern: str, rule: str, what: str, where: str) -> None:
    """pattern compiles, alone and in its rule's frame, and lies in the subset _peft_match runs."""
    try:
        re.compile(pattern)  # alone too: "a)|(b" would close the frame's group
        re.compile(_PEFT_RX[rule][0] + pattern + _PEFT_RX[rule][1])
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"{where}{what} is not a valid regular expression ({e}): fix it or "
                         "re.escape the module name") from None
    if _nfa(pattern) is None:
        raise ValueError(f"{where}{what} uses regex syntax fimlora does not evaluate (+, ?, *, "
                         "{n} but '.*', backreferences, lookarounds, flags): a hostile regex can "
                         "run for hours; list the module names instead")


# PEFT LoraConfig fields LoRALinear cannot reproduce, each with the values that mean "off"
_PEFT_OFF = {"use_dora": (False, None), "fan_in_fan_out": (False, None), "bias": ("none", None),
             "lora_bias": (False, None), "layers_to_transform": (None, []),
             "layer_replication": (None, []), "target_parameters": (None, []),
             "trainable_token_indices": (None, {}, [])}


def _from_peft(cfg: dict, sd: dict[str, torch.Tensor], model: nn.Module, where: str):
    """PEFT config and tensors -> (ranks, alphas, rslora, our state dict, heads), fields checked
    first. Targeted as PEFT does (check_target_module_exists: a str target_modules re.fullmatches,
    a list holds the name or a dotted suffix, exclude_modules alike, modules_to_save never), else
    r = 0; r_m, α_m: the first key k with re.match(rf"(.*\\.)?({k})$", name) (get_pattern_key)."""
    for field, off in _PEFT_OFF.items():
        if cfg.get(field) not in off:
            raise ValueError(f"{where}{field}={reprlib.repr(cfg[field])}: fimlora's LoRALinear "
                             f"does not implement it (supported: {field}={off[0]!r})")
    _check(cfg.get("r", _MISSING), _RANK, "r", where)
    _check(cfg.get("lora_alpha", _MISSING), _ALPHA, "lora_alpha", where)
    _check(cfg.get("use_rslora", False), _FLAG, "use_rslora", where)
    patterns = []
    for field, want, default in (("rank_pattern", _RANK, cfg["r"]),
                                 ("alpha_pattern", _ALPHA, cfg["lora_alpha"])):
        patterns.append((_pattern(cfg.get(field) or {}, field, want, where), default))
        for k in patterns[-1][0]:
            _peft_regex(k, "key", f"{field} key {k!r}", where)
    for field in ("target_modules", "exclude_modules"):
        if isinstance(cfg.get(field), str):
            _peft_regex(cfg[field], "full", f"{field}={cfg[field]!r}", where)
        elif cfg.get(field) is not None:
            _names(cfg[field], field, where)
    saved = _names(cfg.get("modules_to_save") or [], "modules_to_save", where)
    for m in saved:
        _peft_regex(m, "saved", f"modules_to_save entry {m!r}", where)

    def hit(spec, n: str) -> bool:
        return _peft_match(spec, n, "full") if isinstance(spec, str) else any(
            name_matches(n, k) for k in spec or ())
    layers, modules = lora_layers(model), dict(model.named_modules())
    heads = [n for n in modules if any(_peft_match(m, n, "saved") for m in saved)]
    never = saved + (["classifier", "score"] if cfg.get("task_type") == "SEQ_CLS" else [])
    targeted = [n for n, m in modules.items() if isinstance(m, (nn.Linear, LoRALinear))
                and hit(cfg.get("target_modules"), n) and not hit(cfg.get("exclude_modules"), n)
                and not any(_peft_match(k, n, "saved") for k in never)]
    if not targeted or any(n not in layers for n in targeted):
        raise ValueError(f"{where}target_modules={reprlib.repr(cfg.get('target_modules'))} "
                         f"selects {len(targeted)} Linear modules, "
                         f"{[n for n in targeted if n not in layers][:5]} without a LoRA layer: "
                         "add_lora with the same target modules first")
    ranks, alphas = ({n: next((v for k, v in p.items() if _peft_match(k, n, "key")), default)
                      for n in layers} for p, default in patterns)
    ranks = {n: int(r) if n in targeted else 0 for n, r in ranks.items()}
    ours = {}
    for k, v in sd.items():  # "base_model.model.<module>.lora_A[.<adapter>].weight"
        k2 = re.sub(r"\.lora_([AB])(\.[^.]+)?\.weight$", r".lora_\1", k.removeprefix(PEFT_PREFIX))
        k2 = re.sub(r"\.modules_to_save\.[^.]+\.", ".", k2)
        if k2 in ours:
            raise ValueError(f"{where}tensor {k!r} and another tensor both load into {k2!r}")
        ours[k2] = v
    for n, m in layers.items():  # PEFT saves nothing for them: empty tensors at rank 0
        if ranks[n] == 0:
            ours.setdefault(f"{n}.lora_A", torch.empty(0, m.in_features))
            ours.setdefault(f"{n}.lora_B", torch.empty(m.out_features, 0))
    alphas = {n: float(a) for n, a in alphas.items()}
    return ranks, alphas, cfg.get("use_rslora", False), ours, heads


def save_adapter(path: str | os.PathLike, model: nn.Module, targets: Iterable[str] = (),
                 seed: int | None = None, heads: Sequence[str] = (), format: str = "fimlora",
                 base_model: str | None = None, task_type: str | None = None) -> Path:
    """Save the adapter (and head) tensors, ranks, alphas, rsLoRA flag, targets and seed to the
    folder `path`, each file atomically; every argument is checked before the first write.
    format="fimlora": our keys, and every matrix's rank and alpha in adapter_config.json.
    format="peft": what PeftModel.from_pretrained loads (keys "base_model.model.<module>.lora_A
    .weight", heads as modules_to_save; task_type "SEQ_CLS" when a "classifier" or "score"
    head is saved, else None, unless given, e.g. "CAUSAL_LM" for a decoder; PEFT_TASK_TYPES)."""
    _check(format, "'fimlora' or 'peft'", "format", ok=format in ("fimlora", "peft"))
    _check(base_model, "a str or None", "base_model",
           ok=base_model is None or isinstance(base_model, str))
    _check(task_type, f"None or one of {', '.join(PEFT_TASK_TYPES)}", "task_type",
           ok=task_type in (None, *PEFT_TASK_TYPES))
    if task_type is not None and format != "peft":
        raise ValueError(f"task_type={task_type!r} is a PEFT field: use format='peft'")
    config = adapter_config(model, targets, seed, heads)
    tensors = lora_state_dict(model, config["heads"])
    if format == "peft":
        linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]
        config, tensors = _to_peft(config, tensors, linears, base_model, task_type)
    text, path = json.dumps(config, indent=2) + "\n", Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
    atomic_write(path / ADAPTER_CONFIG, lambda f: f.write(text.encode()))
    return path


def load_adapter(path: str | os.PathLike, model: nn.Module) -> dict:
    """Load an adapter folder, ours (either format) or PEFT's (adapter_model.safetensors or .bin;
    rank_pattern / alpha_pattern by PEFT's rule), into a model whose LoRA layers (add_lora) sit
    on the same modules, and return its config. Layers get the saved ranks and alphas, so every
    matrix has its trained scale. All or nothing: every field, key, shape, dtype and value is
    checked before any layer changes; a bad adapter raises ValueError naming file and field."""
    path, layers = Path(path), lora_layers(model)
    where, weights = f"{path / ADAPTER_CONFIG}: ", path / ADAPTER_WEIGHTS
    try:
        cfg = _json(read_regular(path / ADAPTER_CONFIG, JSON_LIMIT), str(path / ADAPTER_CONFIG))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path / ADAPTER_CONFIG} not found: is {path} an adapter "
                                "folder?") from None
    if os.path.lexists(weights):
        sd = read_safetensors(weights)[0]
    elif os.path.lexists(weights := path / PEFT_BIN_WEIGHTS):
        with open_regular(weights) as f:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # pickle, zip and weights_only errors alike: a bad file
                raise ValueError(f"{weights}: torch.load(weights_only=True) failed "
                                 f"({type(e).__name__}: {e})") from None
        _check_entries(sd, str(weights))
    else:
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} or {PEFT_BIN_WEIGHTS} in {path}")
    if cfg.get("format") == FIMLORA_FORMAT:
        ranks = _pattern(cfg.get("ranks", _MISSING), "ranks", _RANK, where)
        alphas = _pattern(cfg.get("alphas", _MISSING), "alphas", _ALPHA, where)
        _check(rslora := cfg.get("rslora", _MISSING), _FLAG, "rslora", where)
        heads = _heads(model, cfg.get("heads", []), where)
    elif cfg.get("peft_type") == "LORA":
        ranks, alphas, rslora, sd, heads = _from_peft(cfg, sd, model, where)
        cfg["rslora"] = rslora
    else:
        raise ValueError(f"{where}neither a {FIMLORA_FORMAT} nor a PEFT LoRA adapter config "
                         f"(format={reprlib.repr(cfg.get('format'))}, "
                         f"peft_type={reprlib.repr(cfg.get('peft_type'))})")
    if not set(ranks) == set(alphas) == set(layers):
        raise ValueError(f"{where}adapter modules {sorted(set(ranks) ^ set(layers))[:5]} or "
                         f"alphas {sorted(set(alphas) ^ set(layers))[:5]} differ from the model's "
                         "LoRA modules: add_lora with the adapter's targets "
                         f"{reprlib.repr(cfg.get('targets'))} first")
    if any(m.rslora != rslora for m in layers.values()):
        raise ValueError(f"{where}rslora={rslora} but the model's layers have rslora="
                         f"{not rslora}: add_lora with rslora={rslora}")
    _load(model, sd, str(weights), ranks, alphas, heads)
    return cfg
