"""A GGUF reader in stdlib + torch (+ lora.open_regular): a validated header, metadata and
float32 tensors.

    from models.gguf import read_gguf, read_gguf_header
    meta, tensors = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # dict, {name: float32 Tensor}
    header = read_gguf_header(path)          # metadata + tensor infos, no tensor data read

Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian: magic "GGUF",
u32 version (2 or 3), u64 tensor count, u64 key/value count; each key/value is a string key, a u32
value type and the value (arrays: u32 element type, u64 count, elements); each tensor info is a
string name, u32 n_dims, u64 dims (innermost first: dims[0] is the row length), u32 ggml type and
a u64 offset into the data section, which starts at the next multiple of `general.alignment`
(default 32). Strings are a u64 byte length and UTF-8 bytes.

Every count, length, offset and byte size is checked against the file size before anything is
allocated or read, so a malformed file raises ValueError and nothing else. Tensors come back as
float32 with torch shape = reversed dims: a matrix with dims [d_in, d_out] is (d_out, d_in).
Supported ggml types: F32, F16, Q8_0, Q4_1; the others raise ValueError naming the type.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch

from lora import open_regular

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# value type id -> (name, struct format); STRING (8) and ARRAY (9) are read by hand
_SCALARS = {0: ("UINT8", "B"), 1: ("INT8", "b"), 2: ("UINT16", "H"), 3: ("INT16", "h"),
            4: ("UINT32", "I"), 5: ("INT32", "i"), 6: ("FLOAT32", "f"), 7: ("BOOL", "B"),
            10: ("UINT64", "Q"), 11: ("INT64", "q"), 12: ("FLOAT64", "d")}
_STRING, _ARRAY = 8, 9

# ggml type id -> (name, elements per block, bytes per block); only the first four are read
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 8: ("Q8_0", 32, 34), 3: ("Q4_1", 32, 20),
              2: ("Q4_0", 32, 18), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 9: ("Q8_1", 32, 36),
              10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
              13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
              24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
              28: ("F64", 1, 8), 30: ("BF16", 1, 2)}
SUPPORTED = ("F32", "F16", "Q8_0", "Q4_1")
_BLOCKS = {name: (block, nbytes) for name, block, nbytes in GGML_TYPES.values()}


class TensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # torch order: reversed GGUF dims
    ggml_type: str  # "F32", "Q4_1", ...
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFHeader(NamedTuple):
    version: int
    metadata: dict  # key -> int | float | bool | str | list
    tensors: dict[str, TensorInfo]  # in file order
    alignment: int


class _Cursor:
    """Reads from a file of known size; every read is bounds-checked first."""

    def __init__(self, f: BinaryIO, size: int, path: Path):
        self.f, self.size, self.path, self.pos = f, size, path, 0

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: {what} (at byte {self.pos} of {self.size}); "
                          "the file is not a valid GGUF file: re-download or re-convert it")

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise self.fail(f"{what} needs {n:,} bytes but only {self.left():,} remain")
        b = self.f.read(n)
        if len(b) != n:  # the file shrank while we read it
            raise self.fail(f"short read of {what}")
        self.pos += n
        return b

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("Q", f"{what} length")
        raw = self.take(n, what)  # take() refuses n beyond the file, before allocating
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None


def _value(c: _Cursor, vtype: int, key: str):
    if vtype in _SCALARS:
        value = c.unpack(_SCALARS[vtype][1], f"value of {key!r}")
        if vtype == 7:
            if value > 1:
                raise c.fail(f"{key!r} is a BOOL with a byte other than 0 or 1")
            return bool(value)
        return value
    if vtype == _STRING:
        return c.string(f"string value of {key!r}")
    if vtype == _ARRAY:
        etype = c.unpack("I", f"array type of {key!r}")
        count = c.unpack("Q", f"array length of {key!r}")
        if etype not in _SCALARS and etype != _STRING:
            kind = "nested arrays are" if etype == _ARRAY else f"element type {etype} is"
            raise c.fail(f"array {key!r}: {kind} not supported")
        esize = struct.calcsize(_SCALARS[etype][1]) if etype in _SCALARS else 8  # 8: str length
        if count * esize > c.left():
            raise c.fail(f"array {key!r} claims {count:,} elements, more than the file holds")
        if etype == _STRING:
            return [c.string(f"element of {key!r}") for _ in range(count)]
        values = list(struct.unpack(f"<{count}{_SCALARS[etype][1]}",
                                    c.take(count * esize, f"array {key!r}")))
        if etype == 7:
            if any(v > 1 for v in values):
                raise c.fail(f"array {key!r} holds a BOOL byte other than 0 or 1")
            return [bool(v) for v in values]
        return values
    raise c.fail(f"metadata {key!r} has unknown value type {vtype}")


def _tensor_info(c: _Cursor, index: int) -> tuple[str, tuple[int, ...], str, int, int]:
    name = c.string(f"name of tensor {index}")
    n_dims = c.unpack("I", f"n_dims of {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise c.fail(f"tensor {name!r} has n_dims={n_dims}; GGUF allows 1 to {MAX_DIMS}")
    dims = struct.unpack(f"<{n_dims}Q", c.take(8 * n_dims, f"dims of {name!r}"))
    type_id = c.unpack("I", f"type of {name!r}")
    offset = c.unpack("Q", f"offset of {name!r}")
    if type_id not in GGML_TYPES:
        raise c.fail(f"tensor {name!r} has unknown ggml type id {type_id}")
    type_name, block, block_bytes = GGML_TYPES[type_id]
    if dims[0] % block:
        raise c.fail(f"tensor {name!r} ({type_name}) has row length {dims[0]}, not a multiple "
                     f"of its block size {block}")
    n = 1
    for d in dims:
        n *= d
    return name, tuple(reversed(dims)), type_name, offset, n // block * block_bytes


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Metadata and tensor infos of a GGUF file, all validated; no tensor data is read.
    read_gguf_header(p).metadata["general.architecture"] -> "llama" """
    path = Path(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"GGUF file {path} not found")
    with open_regular(path) as f:  # a FIFO or device is refused, not read forever
        size = os.fstat(f.fileno()).st_size
        c = _Cursor(f, size, path)
        if c.take(min(4, size), "magic") != MAGIC:
            raise c.fail("no GGUF magic at the start")
        version = c.unpack("I", "version")
        if version not in VERSIONS:
            hint = " (big-endian files are not supported)" if version > 0xFFFF else ""
            raise c.fail(f"GGUF version {version} is not supported{hint}: use version 2 or 3")
        n_tensors, n_kv = c.unpack("Q", "tensor count"), c.unpack("Q", "metadata count")
        # a key/value takes at least 13 bytes and a tensor info at least 32: cap both counts
        if n_kv * 13 + n_tensors * 32 > c.left():
            raise c.fail(f"{n_tensors:,} tensors and {n_kv:,} metadata entries cannot fit")
        metadata: dict = {}
        for _ in range(n_kv):
            key = c.string("metadata key")
            if key in metadata:
                raise c.fail(f"metadata key {key!r} appears twice")
            metadata[key] = _value(c, c.unpack("I", f"value type of {key!r}"), key)
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (type(alignment) is not int or alignment < 1 or alignment & (alignment - 1)
                or alignment > 1 << 20):
            raise c.fail(f"general.alignment={alignment!r} is not a power of two up to 2**20")
        infos = [_tensor_info(c, i) for i in range(n_tensors)]
    start = -(-c.pos // alignment) * alignment  # the data section begins at the next boundary
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, shape, type_name, offset, nbytes in infos:
        if name in tensors:
            raise c.fail(f"tensor {name!r} appears twice")
        if offset % alignment:
            raise c.fail(f"tensor {name!r} offset {offset} is not a multiple of the alignment "
                         f"{alignment}")
        if start + offset + nbytes > size:
            raise c.fail(f"tensor {name!r} ({type_name}, shape {shape}) needs bytes "
                         f"[{start + offset:,}, {start + offset + nbytes:,}) past the end")
        tensors[name] = TensorInfo(name, shape, type_name, start + offset, nbytes)
        spans.append((start + offset, nbytes, name))
    spans.sort()
    for (a, na, x), (b, _, y) in zip(spans, spans[1:]):
        if a + na > b:
            raise c.fail(f"tensors {x!r} and {y!r} overlap")
    return GGUFHeader(version, metadata, tensors, alignment)


# -----------------------------------------------------------------------------
# dequantisation (ggml's reference: ggml-quants.c, dequantize_row_q8_0 / _q4_1)


def dequantize(raw: bytearray, ggml_type: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw little-endian bytes of one tensor -> float32 of `shape`.
    Q8_0 block (34 B): f16 d, 32 int8 q; x = d·q. Q4_1 block (20 B): f16 d, f16 m, 16 bytes whose
    low nibbles are elements 0..15 and high nibbles 16..31; x = d·q + m.
    dequantize(bytearray(struct.pack("<2f", 1, 2)), "F32", (2,)) -> tensor([1., 2.])"""
    if ggml_type not in SUPPORTED:
        raise ValueError(f"{ggml_type} is not supported: this reader dequantises "
                         f"{', '.join(SUPPORTED)}; re-convert the model to one of them")
    n = 1
    for d in shape:
        n *= d
    block, block_bytes = _BLOCKS[ggml_type]
    if n % block or len(raw) != n // block * block_bytes:
        raise ValueError(f"{len(raw)} bytes of {ggml_type} do not hold shape {shape}: need "
                         f"{n // block * block_bytes} bytes and a multiple of {block} elements")
    if sys.byteorder != "little":  # frombuffer reads native order; GGUF v3 data is little-endian
        raise ValueError("reading GGUF tensors needs a little-endian machine")
    u8 = torch.frombuffer(raw, dtype=torch.uint8) if len(raw) else torch.zeros(0, dtype=torch.uint8)
    if ggml_type == "F32":
        x = u8.view(torch.float32)
    elif ggml_type == "F16":
        x = u8.view(torch.float16).float()
    elif ggml_type == "Q8_0":
        blocks = u8.view(-1, 34)
        d = blocks[:, :2].contiguous().view(torch.float16).float()  # (nb, 1)
        x = (d * blocks[:, 2:].contiguous().view(torch.int8).float()).reshape(-1)
    else:  # Q4_1
        blocks = u8.view(-1, 20)
        d = blocks[:, 0:2].contiguous().view(torch.float16).float()
        m = blocks[:, 2:4].contiguous().view(torch.float16).float()
        qs = blocks[:, 4:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()  # (nb, 32)
        x = (d * q + m).reshape(-1)
    return x.reshape(shape)


def read_gguf(path: str | os.PathLike, names: list[str] | None = None,
              ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, {name: float32 tensor}) of a GGUF file; `names` picks a subset.
    meta, w = read_gguf(p); w["token_embd.weight"].shape -> (49152, 576)"""
    header = read_gguf_header(path)
    wanted = list(header.tensors) if names is None else names
    unknown = [n for n in wanted if n not in header.tensors]
    if unknown:
        raise ValueError(f"{path} has no tensors {unknown}; it has {list(header.tensors)[:10]}...")
    bad = [f"{n} is {header.tensors[n].ggml_type}" for n in wanted
           if header.tensors[n].ggml_type not in SUPPORTED]
    if bad:  # fail before reading anything
        raise ValueError(f"{bad[0].split(' is ')[1]} is not supported: {'; '.join(bad[:5])}; "
                         f"this reader dequantises {', '.join(SUPPORTED)}")
    out = {}
    with open_regular(path) as f:
        for n in wanted:
            info = header.tensors[n]
            f.seek(info.offset)
            raw = bytearray(info.nbytes)
            if f.readinto(raw) != info.nbytes:
                raise ValueError(f"{path}: short read of tensor {n!r} (did the file change?)")
            out[n] = dequantize(raw, info.ggml_type, info.shape)
    return header.metadata, out
