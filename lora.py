"""LoRA in one file: a low-rank adapter around a frozen nn.Linear, plus saving and loading.

    from lora import add_lora, lora_state_dict, merge_lora, save_adapter, load_adapter
    names = add_lora(model, targets=["query", "value"], r=8, alpha=16, heads=["classifier"])
    ...train...
    save_adapter("out/adapter", model, seed=0)

Convention used everywhere in fimlora: the frozen weight is W0: (d_out, d_in), the adapter is
A: (r, d_in) and B: (d_out, r), and the layer computes y = W0 x + b + s·B A x with s = α/r
(α/√r with rsLoRA). Per-matrix ranks and alphas (FIM-LoRA) are just different r_m and α_m per layer.

This file imports only the standard library and torch, so it can be copied into any project.
Bad arguments and bad files raise ValueError naming the argument or file, field and value, before
anything is changed: a failed load leaves the model exactly as it was.

References:
    LoRA: Hu et al. 2021, arXiv:2106.09685.   rsLoRA: Kalajdzievski 2023, arXiv:2312.03732.
    PEFT adapter format: https://github.com/huggingface/peft (adapter_config.json + safetensors).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import numbers
import os
import re
import stat
import struct
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
    if r == 0:
        return 0.0
    return alpha / math.sqrt(r) if rslora else alpha / r


# -----------------------------------------------------------------------------
# argument and config-field checks, one table for the layer, add_lora and the loaders


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)  # JSON true is an int


def _is_finite(v) -> bool:
    try:
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # an int beyond float range
        return False


_RULES = {  # name -> (test, what to pass instead)
    "r": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "alpha": (_is_finite, "a finite number"),
    "dropout": (lambda v: _is_finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "rslora": (lambda v: isinstance(v, bool), "True or False"),
    "generator": (lambda v: v is None or isinstance(v, torch.Generator), "a torch.Generator"),
    "seed": (lambda v: v is None or _is_int(v), "an int or None"),
    "base_model": (lambda v: v is None or isinstance(v, str), "a str or None"),
    "object": (lambda v: isinstance(v, dict), "a dict (JSON object)"),
}
_MISSING = object()


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _check(rule: str, v, name: str | None = None, where: str = "") -> None:
    """ValueError "<where><name>=<value> is invalid: use <fix>" unless v passes _RULES[rule]."""
    test, want = _RULES[rule]
    if not test(v):
        bad = " is missing" if v is _MISSING else f"={_show(v)} is invalid"
        raise ValueError(f"{where}{name or rule}{bad}: use {want}")


def _check_args(**args) -> None:
    for rule, v in args.items():
        _check(rule, v)


def _names(v, name: str, where: str = "") -> list[str]:
    """A str or an iterable of str as a list (targets, heads).  _names("query", "t") == ["query"]"""
    if isinstance(v, str):
        return [v]
    if isinstance(v, Iterable) and not isinstance(v, Mapping):
        v = list(v)
        if all(isinstance(s, str) for s in v):
            return v
    raise ValueError(f"{where}{name}={_show(v)} is invalid: use a str or a list of str")


def _pattern(p, name: str, rule: str, where: str = "") -> dict:
    """A {str: value} dict whose values pass _RULES[rule] (rank_pattern, alpha_pattern, ranks)."""
    _check("object", p, name, where)
    for k, v in p.items():
        if not isinstance(k, str):
            raise ValueError(f"{where}{name} key {_show(k)} is invalid: use str module names")
        _check(rule, v, f"{name}[{k!r}]", where)
    return p


def _regex(pattern: str, name: str, where: str = "", raw: str | None = None,
           saved: bool = False) -> None:
    """pattern compiles, and `raw` (the user's part of it) lies in the subset _rx evaluates;
    `saved`: a modules_to_save entry, where a top-level | would split PEFT's whole expression."""
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"{where}{name} is not a valid regular expression ({e}): fix it or "
                         "re.escape the module name") from None
    rx = _rx(pattern if raw is None else raw)
    if rx is None or saved and rx[3]:
        raise ValueError(f"{where}{name} uses regex syntax fimlora does not evaluate (+, ?, *, "
                         "{n} on anything but '.', anchors inside, over "
                         f"{_RX_MAX_ALTERNATIVES} alternatives): fimlora matches names, '.', "
                         "escapes, [classes], '.*' and (a|b) groups without backtracking, since a "
                         "hostile regex can run for minutes; list the module names instead")


# one token: an escape, a [class], ".*", a group's "(", "(?:", "|" or ")", or a plain character
_RX_TOKEN = re.compile(r"\\[dwsDWS]|\\[^0-9A-Za-z]|\[\^?\]?(?:\\.|[^\]\\])*\]|\.\*|\(\?:|[()|]"
                       r"|[^\\^$*+?{}()|[]")
_RX_MAX_ALTERNATIVES = 256


@functools.lru_cache(maxsize=4096)
def _rx(pattern: str) -> tuple[bool, list[list[tuple[re.Pattern, int]]], bool, bool] | None:
    """(starts with ^, alternatives, ends with $, has a top-level |), or None when the pattern
    needs more. Groups are expanded into alternatives ("x(a|b)" -> "xa", "xb"); an alternative is
    a list of segments split at ".*", each (regex, length): a run of one-character atoms without
    quantifiers, which matches exactly `length` characters as re does. So _rx_fullmatch agrees
    with re on this subset in time O(alternatives·len(name)·len(pattern)), never exponential.
    _rx("^a.*b$") == (True, [[(re.compile("a"), 1), (re.compile("b"), 1)]], True, False)"""
    start, body = pattern.startswith("^"), pattern.removeprefix("^")
    end = body.endswith("$") and (len(body) - 1 - len(body[:-1].rstrip("\\"))) % 2 == 0
    body, pos, stack = body[:-1] if end else body, 0, [([[]], [])]  # per group: (product, done)
    while pos < len(body):
        m = _RX_TOKEN.match(body, pos)
        if m is None:
            return None
        t, pos = m.group(), m.end()
        product, done = stack[-1]
        if t in ("(", "(?:"):
            stack.append(([[]], []))
        elif t == "|":
            stack[-1] = ([[]], done + product)
        elif t == ")":
            if len(stack) == 1:
                return None
            stack.pop()
            outer, outer_done = stack[-1]
            stack[-1] = ([o + a for o in outer for a in done + product], outer_done)
        else:
            stack[-1] = ([p + [t] for p in product], done)
        if len(stack[-1][0]) + len(stack[-1][1]) > _RX_MAX_ALTERNATIVES:
            return None
    if len(stack) != 1 or (stack[0][1] and (start or end)):  # ^a|b anchors one branch only
        return None
    alternatives = []
    for alt in stack[0][1] + stack[0][0]:
        segs = [[]]
        for t in alt:
            if t == ".*":
                segs.append([])
            else:
                segs[-1].append(t)
        alternatives.append([(re.compile("".join(seg)), len(seg)) for seg in segs])
    return start, alternatives, end, bool(stack[0][1])


def _rx_fullmatch(segs: list[tuple[re.Pattern, int]], s: str) -> bool:
    """s = S0 x S1 x ... Sk for wildcards x: S0 at the start, Sk at the end, each middle segment
    at its leftmost place in between (never worse than a later one), so nothing backtracks."""
    (first, n0), (last, nk) = segs[0], segs[-1]
    if len(segs) == 1:
        return len(s) == n0 and first.fullmatch(s) is not None
    pos, end = n0, len(s) - nk
    if end < pos or not (first.fullmatch(s, 0, pos) and last.fullmatch(s, end)):
        return False
    for seg, _ in segs[1:-1]:
        m = seg.search(s, pos, end)
        if m is None:
            return False
        pos = m.end()
    return True


def _rx_match(pattern: str, name: str, rule: str) -> bool:
    r"""PEFT's regex rules on module names, via _rx (the pattern was checked by _regex):
    "full" re.fullmatch(pattern, name) (target_modules); "key" re.match(rf"(.*\.)?({pattern})$",
    name) (rank_pattern); "saved" re.match(rf"(^|.*\.){pattern}($|\..*)", name)
    (modules_to_save). A match may start at 0 or after a "." and end at the end or before one."""
    start, alternatives, end, _ = _rx(pattern)
    dots = [i for i, c in enumerate(name) if c == "."]
    starts = [0] if start or rule == "full" else [0, *(i + 1 for i in dots)]
    stops = [len(name)] if end or rule != "saved" else [len(name), *dots]
    return any(_rx_fullmatch(segs, name[i:j]) for segs in alternatives for i in starts
               for j in stops if i <= j)


# -----------------------------------------------------------------------------
# the layer


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
            raise ValueError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        _check_args(r=r, alpha=alpha, dropout=dropout, rslora=rslora, generator=generator)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (d_out, d_in), frozen by add_lora
        self.bias = base.bias
        self.alpha, self.rslora = float(alpha), rslora
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._make_adapter(int(r), generator)

    def _make_adapter(self, r: int, generator: torch.Generator | None, init: bool = True) -> None:
        """New A (Kaiming, or left for a load to fill when init=False) and B = 0 at rank r. An
        existing adapter keeps its Parameter objects, requires_grad included (the new tensors
        are set into them and their stale .grad dropped), so an optimizer built before a
        resize trains the resized adapter."""
        self.r = r
        w = self.weight
        # A is drawn on the generator's device, then moved: a CPU generator cannot fill a CUDA
        # tensor, and the draws then do not depend on where the model lives
        A = torch.empty(r, self.in_features, dtype=w.dtype,
                        device=w.device if generator is None else generator.device)  # (r, d_in)
        if r > 0 and init:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        A, B = A.to(w.device), w.new_zeros(self.out_features, r)  # B: (d_out, r)
        if "lora_A" not in self._parameters:
            self.lora_A, self.lora_B = nn.Parameter(A), nn.Parameter(B)
            return
        for p, new in ((self.lora_A, A), (self.lora_B, B)):
            with torch.no_grad():
                p.set_(new)
            p.grad = None

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.rslora)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B A, (d_out, d_in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r == 0 or self.merged:
            return F.linear(x, self.weight, self.bias)
        # two thin matmuls (d_in -> r -> d_out) instead of forming ΔW; addmm_ adds the scaled
        # adapter path inside the GEMM, in place: y is fresh and linear's backward does not need
        # it, so unlike an out-of-place addmm no extra pass copies or adds over the (N, d_out)
        # output. In-place ops skip autocast, hence the explicit casts (no-ops in float32).
        u = F.linear(self.dropout(x), self.lora_A).reshape(-1, self.r)  # (N, r)
        y = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)  # (N, d_out)
        y.addmm_(u.to(y.dtype), self.lora_B.T.to(y.dtype), alpha=self.scaling)
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


def _lookup(pattern: dict[str, float], name: str, default: float) -> float:
    for key, value in pattern.items():
        if _matches(name, key):
            return value
    return default


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """All LoRALinear modules of a model by name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _heads(model: nn.Module, heads, where: str = "") -> list[str]:
    """Head names as a list, each a module of the model."""
    heads, modules = _names(heads, "heads", where), dict(model.named_modules())
    for h in heads:
        if h not in modules:
            raise ValueError(f"{where}head {h!r} is not a module of the model; top-level modules: "
                             f"{', '.join(n for n, _ in model.named_children())}")
    return heads


def add_lora(model: nn.Module, targets: Sequence[str], r: int, alpha: float,
             rank_pattern: dict[str, int] | None = None,
             alpha_pattern: dict[str, float] | None = None, dropout: float = 0.0,
             rslora: bool = False, heads: Sequence[str] = (),
             generator: torch.Generator | None = None) -> list[str]:
    """Replace every nn.Linear whose name ends with a target (PEFT's target_modules suffix
    match) by a LoRALinear, in place; freeze all other parameters except the LoRA adapters
    already there (a second call adds modules; earlier adapters keep their requires_grad) and
    those of the modules named in `heads` (e.g. "classifier"). Returns the adapted module names.

    rank_pattern / alpha_pattern map a module name or a dotted suffix of it to its own r / α;
    a key that matches no adapted module raises, since silently training another model is the
    classic rank_pattern bug (PEFT issue #3582).
    """
    _check_args(r=r, alpha=alpha, dropout=dropout, rslora=rslora, generator=generator)
    targets, heads = _names(targets, "targets"), _heads(model, heads)
    patterns = {"rank_pattern": _pattern({} if rank_pattern is None else rank_pattern,
                                         "rank_pattern", "r"),
                "alpha_pattern": _pattern({} if alpha_pattern is None else alpha_pattern,
                                          "alpha_pattern", "alpha")}
    lora = lora_layers(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for t in targets:  # an already adapted module counts as a match and is left as it is
        if not any(_matches(n, t) for n in [*linears, *lora]):
            raise ValueError(f"target {t!r} matches no nn.Linear; the model has: "
                             f"{', '.join(sorted(linears)) or '(none)'}")
    names = [n for n in linears if any(_matches(n, t) for t in targets)]
    for pattern_name, pattern in patterns.items():
        for key in pattern:
            if not any(_matches(n, key) for n in names):
                raise ValueError(f"{pattern_name} key {key!r} matches no adapted module; "
                                 f"adapted modules are: {', '.join(names)}")

    adapters = {id(p) for m in lora.values() for p in (m.lora_A, m.lora_B)}
    for p in model.parameters():
        if id(p) not in adapters:
            p.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        layer = LoRALinear(linears[name], int(_lookup(patterns["rank_pattern"], name, r)),
                           _lookup(patterns["alpha_pattern"], name, alpha), dropout, rslora,
                           generator)
        setattr(parent, child, layer)
    for h in heads:
        for p in modules[h].parameters():
            p.requires_grad_(True)
    return names


def resize_lora(layer: LoRALinear, new_r: int, alpha: float | None = None,
                generator: torch.Generator | None = None) -> None:
    """Re-create the adapter at rank new_r: fresh Kaiming A, B = 0, so ΔW = 0 and the model
    function is unchanged. `alpha` sets the new α (keeps the old one when None). lora_A and
    lora_B stay the same Parameter objects, so an optimizer built before the resize trains them;
    one that has already stepped holds moments of the old shapes: build it after the resize."""
    if not isinstance(layer, LoRALinear):
        raise ValueError(f"resize_lora takes a LoRALinear, got {type(layer).__name__}")
    _check("r", new_r, "new_r")
    _check_args(generator=generator, **({} if alpha is None else {"alpha": alpha}))
    if layer.merged:
        raise ValueError("resize_lora on a merged layer would lose ΔW: call unmerge() first")
    layer._make_adapter(int(new_r), generator)
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
    sd, modules = {}, dict(model.named_modules())
    for name, layer in lora_layers(model).items():
        sd[f"{name}.lora_A"] = layer.lora_A.detach()
        sd[f"{name}.lora_B"] = layer.lora_B.detach()
    for h in _heads(model, heads):
        for pname, p in modules[h].named_parameters():
            sd[f"{h}.{pname}"] = p.detach()
    return sd


def _check_entries(sd, where: str) -> None:
    """sd maps str names to dense tensors with data (not sparse, not meta)."""
    for k, v in sd.items() if isinstance(sd, Mapping) else [(_MISSING, sd)]:
        if not (isinstance(k, str) and isinstance(v, torch.Tensor)
                and v.layout == torch.strided and not v.is_meta):
            what = "the top level" if k is _MISSING else f"entry {_show(k)}"
            raise ValueError(f"{where}: {what} is a {type(v).__name__}: a state dict maps str "
                             "names to dense tensors")


def _check_state(model: nn.Module, sd, where: str, ranks: dict[str, int] | None = None,
                 heads: Sequence[str] = ()) -> None:
    """Everything a load checks before it writes: sd maps parameter names of the model to
    floating tensors of the right shape (LoRA tensors at `ranks` when given) whose values are
    finite in the model's dtype; every LoRA tensor and every parameter of `heads` is present;
    no LoRA layer is merged (copying into one would corrupt W0 at unmerge)."""
    _check_entries(sd, where)
    params, layers, modules = dict(model.named_parameters()), lora_layers(model), \
        dict(model.named_modules())
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"{where}: LoRA layers {merged[:5]} are merged: unmerge_lora(model) first")
    need = [f"{n}.lora_{x}" for n in layers for x in "AB"]
    need += [f"{h}.{p}" for h in heads for p, _ in modules[h].named_parameters()]
    missing, unexpected = [k for k in need if k not in sd], [k for k in sd if k not in params]
    if missing or unexpected:
        raise ValueError(f"{where}: adapter does not fit the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]} (check targets, heads and model)")
    shapes = {k: tuple(p.shape) for k, p in params.items()}
    for n, m in layers.items() if ranks is not None else ():
        shapes[f"{n}.lora_A"], shapes[f"{n}.lora_B"] = (ranks[n], m.in_features), \
            (m.out_features, ranks[n])
    bad, hint = [], ""
    for k, v in sd.items():
        p = params[k]
        if tuple(v.shape) != shapes[k]:
            at = k[:-len(".lora_A")] if k.endswith((".lora_A", ".lora_B")) else None
            bad.append(f"{k} has shape {tuple(v.shape)}, the model needs {shapes[k]}"
                       + (f" at r={ranks[at]}" if ranks and at in ranks else ""))
            hint = (" (were ranks resized before loading? does a rank_pattern key match the "
                    f"module? keys name base-model modules, without {PEFT_PREFIX!r})")
        elif not (v.is_floating_point() and torch.can_cast(v.dtype, p.dtype)):
            bad.append(f"{k} has dtype {v.dtype}, the model needs a float dtype for {p.dtype}")
        elif not torch.isfinite(v.to(p.dtype)).all():
            bad.append(f"{k} has non-finite values (NaN or inf in {p.dtype})")
    if bad:
        raise ValueError(f"{where}: " + "; ".join(bad[:8]) + hint)


def _copy(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in sd.items():
            params[k].copy_(v)


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy adapter (and head) tensors into the model. Every key must exist, every shape match,
    every value be finite (_check_state); all checks run before anything is written."""
    _check_state(model, sd, "state dict")
    _copy(model, sd)


# --- on disk ---------------------------------------------------------------------
# safetensors and adapter folders (ours and PEFT's), read and written with the standard
# library and torch only; every write goes to a temp file first, then os.replace.

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_BIN_WEIGHTS = "adapter_model.bin"
FIMLORA_FORMAT = "fimlora-adapter-v1"
PEFT_PREFIX = "base_model.model."
PEFT_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
                   "FEATURE_EXTRACTION")  # PEFT's TaskType (peft/utils/peft_types.py)

# safetensors format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
# data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the raw little-endian bytes.

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_ST_MAX_HEADER = 100_000_000  # bytes; real headers take ~100 bytes per tensor
_ST_MAX_DIMS, _ST_MAX_NUMEL = 64, 2**62  # beyond any real tensor; within torch's int64 sizes
_ST_MAX_TENSORS = 1 << 17  # real files hold ~10³ per shard; 1.3 M empty entries took 30 s, 2 GB
JSON_LIMIT = 1 << 24  # bytes of a config file (PEFT's for 10⁴ modules takes ~1 MB)


def open_regular(path: str | os.PathLike, limit: int | None = None) -> BinaryIO:
    """open(path, "rb") for a regular file (links followed) of at most `limit` bytes, else
    ValueError naming it: a FIFO would block the read forever and /dev/zero never ends. A
    missing file raises FileNotFoundError; any other OS error (permission denied, link loop)
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
        raise ValueError(f"{path} is {what}: pass the real file (a FIFO, device or "
                         "directory cannot be read as one)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (open_regular's checks)."""
    with open_regular(path, limit) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} grew past {limit:,} bytes while it was read")
    return data


def _unique_keys(pairs: list) -> dict:
    """json object_pairs_hook: a key given twice is an error, not "the last one wins"."""
    d, seen = dict(pairs), set()
    if len(d) != len(pairs):
        raise ValueError(f"duplicate key {next(k for k, _ in pairs if k in seen or seen.add(k))!r}")
    return d


def _parse_json(raw: bytes, where: str) -> dict:
    """A UTF-8 JSON object without duplicate keys, or ValueError naming `where`."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:  # JSON, UTF-8, duplicates, nesting, huge ints
        raise ValueError(f"{where} is not valid JSON in UTF-8 ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is a JSON {type(obj).__name__}, not a JSON object")
    return obj


def _st_numel(shape) -> int | None:
    """numel of a header shape, None unless it is a list of <= 64 ints >= 0 (bools refused)
    with <= 2**62 elements; the product is checked as it grows, so [2**62, 2**62] costs nothing."""
    if not isinstance(shape, list) or len(shape) > _ST_MAX_DIMS:
        return None
    numel = 1
    for d in shape:
        if type(d) is not int or d < 0:
            return None
        numel *= max(d, 1)
        if numel > _ST_MAX_NUMEL:
            return None
    return 0 if 0 in shape else numel


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a .safetensors file into CPU tensors, returning (tensors, metadata).

    Every header field is validated before any tensor byte is read, and only ValueError is
    raised: header length within the file and under 100 MB; UTF-8 JSON without duplicate keys;
    __metadata__ absent, null or {str: str}; known dtypes; shapes of <= 64 ints >= 0; int offsets
    that agree with dtype·shape (compared before anything is allocated), lie inside the data
    section and neither overlap nor leave gaps. Tensors are read one by one, so memory stays near
    the file size plus the parsed header, which holds at most 2**17 entries (counted before it
    is parsed). Only regular files are read (open_regular)."""
    path = Path(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        raw_n = f.read(8)
        if len(raw_n) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        n = struct.unpack("<Q", raw_n)[0]
        if n > min(size - 8, _ST_MAX_HEADER):
            raise ValueError(f"{path}: header length {n} exceeds the file size {size} or 100 MB: "
                             "the file is truncated or not safetensors")
        raw = f.read(n)
        if raw.count(b"{") > _ST_MAX_TENSORS + 1:  # an object per entry, and the header
            raise ValueError(f"{path}: the header holds over {_ST_MAX_TENSORS:,} entries; no "
                             "real checkpoint shard has as many: the file is not a model")
        header = _parse_json(raw, f"{path}: header")
        meta = header.pop("__metadata__", None)
        meta = {} if meta is None else meta
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError(f"{path}: __metadata__={_show(meta)} is not a {{str: str}} object")
        data_len = size - 8 - n
        spans = []
        for name, info in header.items():
            if not isinstance(info, dict):
                raise ValueError(f"{path}: tensor {_show(name)} is {_show(info)}, not an object "
                                 "with dtype, shape and data_offsets")
            dtype = info.get("dtype")
            if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
                raise ValueError(f"{path}: tensor {_show(name)} has unsupported dtype "
                                 f"{_show(dtype)}: use one of {', '.join(_ST_DTYPES)}")
            shape, offs, numel = info.get("shape"), info.get("data_offsets"), \
                _st_numel(info.get("shape"))
            if numel is None or not isinstance(offs, list) or len(offs) != 2 \
                    or not all(type(o) is int for o in offs):
                raise ValueError(f"{path}: tensor {_show(name)} has a malformed shape "
                                 f"{_show(shape)} or data_offsets {_show(offs)}: need a list of "
                                 "<= 64 ints >= 0 and [begin, end] ints")
            itemsize = _ST_DTYPES[dtype].itemsize
            begin, end = offs
            if not 0 <= begin <= end <= data_len or end - begin != numel * itemsize:
                raise ValueError(f"{path}: tensor {_show(name)} offsets {offs} do not fit shape "
                                 f"{shape} x {itemsize} bytes inside a {data_len}-byte data "
                                 "section")
            spans.append((begin, end, name))
        spans.sort()
        pos = 0
        for begin, end, name in spans:
            if begin != pos:
                raise ValueError(f"{path}: tensor {_show(name)} starts at {begin}, expected {pos} "
                                 "(overlapping or gapped data)")
            pos = end
        if pos != data_len:
            raise ValueError(f"{path}: {data_len - pos} trailing bytes after the last tensor")
        tensors = {}
        for begin, end, name in spans:  # in file order, each into its own (aligned) buffer
            buf, dtype = bytearray(end - begin), _ST_DTYPES[header[name]["dtype"]]
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{path}: the file shrank while it was read")
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            tensors[name] = t.reshape(header[name]["shape"])
    return tensors, meta


def _atomic_write(path: Path, write) -> None:
    """Write via a temp file in the same folder, then rename, so readers never see half a file:
    the data is fsync'd before the rename and the folder after it, so a crash keeps either the
    old file or the new one. The file gets open()'s mode, 0o666 & ~umask (mkstemp's is 0o600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)  # the only way to read it; restored at once
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # POSIX: make the rename durable; elsewhere a no-op
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


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
    _check_entries(tensors, "write_safetensors: tensors")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"metadata={_show(metadata)} is invalid: use a {{str: str}} dict")
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, pos = [], 0
    for name, t in tensors.items():
        if t.dtype not in _ST_NAMES or name == "__metadata__":
            raise ValueError(f"tensor {name!r} (dtype {t.dtype}) cannot be stored in safetensors: "
                             f"use a dtype among {', '.join(map(str, _ST_NAMES))} and another name")
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
    _check_args(seed=seed)
    targets, heads = _names(targets, "targets"), _heads(model, heads)
    layers = lora_layers(model)
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


def _peft_config(cfg: dict, linears: Sequence[str], base_model: str | None,
                 task_type: str | None) -> dict:
    """PEFT LoraConfig fields for per-matrix ranks: r = the most common rank,
    and rank_pattern / alpha_pattern keys anchored and escaped ("^bert\\.encoder\\.layer\\.0\\...")
    so each key matches exactly one module under PEFT's rule (_peft_pattern). α_m is written as
    saved, so PEFT's α_m/r_m (α_m/√r_m with rsLoRA) is the scale used in training. Layers at one
    scale (uniform add_lora, initialize_fim_ranks, train.py) make lora_alpha/r that scale, so a
    server applying lora_alpha/r to every module without reading the patterns (vLLM's loader)
    serves the same ΔW, each module zero-padded to its max_lora_rank >= max r_m; other
    per-module scales need a server that reads alpha_pattern. Rank-0 modules are left out of
    target_modules (PEFT has no rank 0), as are modules the `targets` suffixes would add or miss:
    then target_modules lists the adapted module names themselves."""
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
        "task_type": task_type or ("SEQ_CLS" if {"classifier", "score"} & set(heads) else None),
        "r": r, "lora_alpha": common_alpha, "target_modules": targets,
        "rank_pattern": {key(n): ranks[n] for n in kept if ranks[n] != r},
        "alpha_pattern": {key(n): alphas[n] for n in kept if alphas[n] != common_alpha},
        "use_rslora": cfg["rslora"], "lora_dropout": cfg["dropout"], "bias": "none",
        "fan_in_fan_out": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": list(heads) or None, "inference_mode": True,
    }


def _peft_pattern(pattern: dict, name: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key k with
    re.match(rf"(.*\\.)?({k})$", name) wins (peft/utils/other.py, get_pattern_key), evaluated by
    _rx_match so a hostile key cannot backtrack for minutes."""
    for key, value in pattern.items():
        if _rx_match(key, name, "key"):
            return value
    return default


def _peft_targets(cfg: dict, names: Iterable[str], saved: Sequence[str]) -> list[str]:
    """The names PEFT gives a LoRA layer (peft/tuners/tuners_utils.py, check_target_module_exists):
    target_modules as a string must re.fullmatch the name, as a list equal it or a dotted suffix of
    it; exclude_modules removes names by the same rule; modules_to_save are never adapted."""
    def hit(spec, name: str) -> bool:
        if isinstance(spec, str):
            return _rx_match(spec, name, "full")
        return any(_matches(name, k) for k in spec or ())

    saved = [*saved, *(["classifier", "score"] if cfg.get("task_type") == "SEQ_CLS" else [])]
    return [n for n in names if hit(cfg.get("target_modules"), n)
            and not hit(cfg.get("exclude_modules"), n)
            and not any(_rx_match(m, n, "saved") for m in saved)]


# PEFT LoraConfig fields LoRALinear cannot reproduce, each with the values that mean "off"
_PEFT_OFF = {"use_dora": (False, None), "fan_in_fan_out": (False, None), "bias": ("none", None),
             "lora_bias": (False, None), "layers_to_transform": (None, []),
             "layer_replication": (None, []), "target_parameters": (None, []),
             "trainable_token_indices": (None, {}, [])}


def _from_peft(cfg: dict, sd: dict[str, torch.Tensor], model: nn.Module, where: str):
    """PEFT config and tensors -> (ranks, alphas, rslora, state dict with our keys, heads) for
    model's LoRA layers, every field used checked first. A LoRA layer the adapter does not
    target gets r = 0, as in the PEFT model."""
    for field, off in _PEFT_OFF.items():
        if cfg.get(field) not in off:
            raise ValueError(f"{where}{field}={_show(cfg[field])}: fimlora's LoRALinear does not "
                             f"implement it (supported: {field}={off[0]!r})")
    _check("r", cfg.get("r", _MISSING), "r", where)
    _check("alpha", cfg.get("lora_alpha", _MISSING), "lora_alpha", where)
    _check("rslora", cfg.get("use_rslora", False), "use_rslora", where)
    patterns = {}
    for field, rule in (("rank_pattern", "r"), ("alpha_pattern", "alpha")):
        patterns[field] = _pattern(cfg.get(field) or {}, field, rule, where)
        for k in patterns[field]:
            _regex(rf"(.*\.)?({k})$", f"{field} key {k!r}", where, k)
    for field in ("target_modules", "exclude_modules"):
        if isinstance(cfg.get(field), str):
            _regex(cfg[field], f"{field}={cfg[field]!r}", where)
        elif cfg.get(field) is not None:
            _names(cfg[field], field, where)
    saved = _names(cfg.get("modules_to_save") or [], "modules_to_save", where)
    for m in saved:
        _regex(rf"(^|.*\.){m}($|\..*)", f"modules_to_save entry {m!r}", where, m, True)

    layers = lora_layers(model)
    modules = [n for n, _ in model.named_modules()]
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]
    targeted = _peft_targets(cfg, linears, saved)
    bare = [n for n in targeted if n not in layers]
    if not targeted or bare:
        raise ValueError(f"{where}target_modules={_show(cfg.get('target_modules'))} selects "
                         f"{len(targeted)} Linear modules, {bare[:5]} without a LoRA layer: "
                         "add_lora with the same target modules first")
    ranks = {n: int(_peft_pattern(patterns["rank_pattern"], n, cfg["r"])) if n in targeted else 0
             for n in layers}
    alphas = {n: float(_peft_pattern(patterns["alpha_pattern"], n, cfg["lora_alpha"]))
              for n in layers}
    ours = {}
    for k, v in sd.items():  # "base_model.model.<module>.lora_A[.<adapter>].weight"
        k2 = re.sub(r"\.lora_([AB])(\.[^.]+)?\.weight$", r".lora_\1", k.removeprefix(PEFT_PREFIX))
        k2 = re.sub(r"\.modules_to_save\.[^.]+\.", ".", k2)
        if k2 in ours:
            raise ValueError(f"{where}tensor {k!r} and another tensor both load into {k2!r}")
        ours[k2] = v
    for n in (n for n, r in ranks.items() if r == 0):
        ours.setdefault(f"{n}.lora_A", torch.empty(0, layers[n].in_features))
        ours.setdefault(f"{n}.lora_B", torch.empty(layers[n].out_features, 0))
    heads = [n for n in modules if any(_rx_match(m, n, "saved") for m in saved)]
    return ranks, alphas, cfg.get("use_rslora", False), ours, heads


def save_adapter(path: str | os.PathLike, model: nn.Module, targets: Iterable[str] = (),
                 seed: int | None = None, heads: Sequence[str] = (), format: str = "fimlora",
                 base_model: str | None = None, task_type: str | None = None) -> Path:
    """Save the adapter (and head) tensors plus ranks, alphas, rsLoRA flag, targets and seed to
    the folder `path`, atomically per file; every argument is checked before the first write.

    format="fimlora": adapter_model.safetensors with our keys + adapter_config.json listing every
    matrix's rank and alpha explicitly. format="peft": the layout PeftModel.from_pretrained
    loads (keys "base_model.model.<module>.lora_A.weight", heads as modules_to_save), with PEFT's
    task_type: "SEQ_CLS" when a "classifier" or "score" head is saved, else None, unless given
    (e.g. "CAUSAL_LM" for a decoder LLM; one of PEFT_TASK_TYPES)."""
    if format not in ("fimlora", "peft"):
        raise ValueError(f"format={format!r}: use 'fimlora' or 'peft'")
    _check_args(base_model=base_model)
    if task_type not in (None, *PEFT_TASK_TYPES):
        raise ValueError(f"task_type={_show(task_type)}: use None or one of "
                         f"{', '.join(PEFT_TASK_TYPES)}")
    if task_type is not None and format != "peft":
        raise ValueError(f"task_type={task_type!r} is a PEFT field: use format='peft'")
    cfg = adapter_config(model, targets, seed, heads)
    sd = lora_state_dict(model, cfg["heads"])
    if format == "peft":
        linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]
        config = _peft_config(cfg, linears, base_model, task_type)
        # PEFT's keys carry no adapter name: "<module>.lora_A.weight", and for a head
        # "classifier.weight", not "classifier.modules_to_save.default.weight"
        tensors = {}
        for k, v in sd.items():
            is_head = any(k.startswith(h + ".") for h in cfg["heads"])
            if is_head or v.numel():
                tensors[PEFT_PREFIX + k + ("" if is_head else ".weight")] = v
    else:
        config, tensors = cfg, sd
    text = json.dumps(config, indent=2) + "\n"
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
    _atomic_write(path / ADAPTER_CONFIG, lambda f: f.write(text.encode()))
    return path


def _read_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(config, tensors, weights file) of an adapter folder, both files parsed and checked."""
    try:
        raw = read_regular(path / ADAPTER_CONFIG, JSON_LIMIT)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path / ADAPTER_CONFIG} not found: is {path} an adapter "
                                "folder?") from None
    cfg = _parse_json(raw, str(path / ADAPTER_CONFIG))
    if os.path.lexists(path / ADAPTER_WEIGHTS):
        return cfg, read_safetensors(path / ADAPTER_WEIGHTS)[0], path / ADAPTER_WEIGHTS
    if not os.path.lexists(path / PEFT_BIN_WEIGHTS):
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} or {PEFT_BIN_WEIGHTS} in {path}")
    with open_regular(path / PEFT_BIN_WEIGHTS) as f:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and weights_only errors alike: a bad file
            raise ValueError(f"{path / PEFT_BIN_WEIGHTS}: torch.load(weights_only=True) failed "
                             f"({type(e).__name__}: {e})") from None
    _check_entries(sd, str(path / PEFT_BIN_WEIGHTS))
    return cfg, sd, path / PEFT_BIN_WEIGHTS


def load_adapter(path: str | os.PathLike, model: nn.Module) -> dict:
    """Load an adapter folder into a model that already has LoRA layers on the same modules
    (add_lora): ours (save_adapter, either format) or one PEFT wrote (adapter_config.json +
    adapter_model.safetensors or .bin; rank_pattern / alpha_pattern resolved by PEFT's rule).
    Layers are resized to the saved ranks and given the saved alphas, so every matrix has the
    scale it was trained with. All or nothing: every config field, key, shape, dtype and value
    is checked before any layer changes, so a bad adapter raises ValueError (naming the file,
    field or tensor) and leaves the model as it was. Returns the config."""
    path = Path(path)
    cfg, sd, weights = _read_adapter(path)
    where, layers = f"{path / ADAPTER_CONFIG}: ", lora_layers(model)
    if cfg.get("format") == FIMLORA_FORMAT:
        ranks = _pattern(cfg.get("ranks", _MISSING), "ranks", "r", where)
        alphas = _pattern(cfg.get("alphas", _MISSING), "alphas", "alpha", where)
        rslora = cfg.get("rslora", _MISSING)
        _check("rslora", rslora, "rslora", where)
        heads = _heads(model, cfg.get("heads", []), where)
    elif cfg.get("peft_type") == "LORA":
        ranks, alphas, rslora, sd, heads = _from_peft(cfg, sd, model, where)
        cfg["rslora"] = rslora
    else:
        raise ValueError(f"{where}neither a {FIMLORA_FORMAT} nor a PEFT LoRA adapter config "
                         f"(format={_show(cfg.get('format'))}, "
                         f"peft_type={_show(cfg.get('peft_type'))})")
    if not set(ranks) == set(alphas) == set(layers):
        raise ValueError(f"{where}adapter modules {sorted(set(ranks) ^ set(layers))[:5]} or "
                         f"alphas {sorted(set(alphas) ^ set(layers))[:5]} differ from the model's "
                         f"LoRA modules: add_lora with the adapter's targets "
                         f"{_show(cfg.get('targets'))} first")
    unlike = [n for n, m in layers.items() if m.rslora != rslora]
    if unlike:
        raise ValueError(f"{where}rslora={rslora} but the model's layers {unlike[:5]} have "
                         f"rslora={not rslora}: add_lora with rslora={rslora}")
    _check_state(model, sd, str(weights), ranks, heads)
    for name, layer in layers.items():  # every check has passed: now change the model
        if layer.r != ranks[name]:
            layer._make_adapter(int(ranks[name]), None, init=False)  # _copy fills A, no RNG draw
        layer.alpha = float(alphas[name])
    _copy(model, sd)
    return cfg
