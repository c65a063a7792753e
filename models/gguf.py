"""A GGUF reader in stdlib + torch: a validated header, metadata and float32 tensors.

    meta, tensors = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # dict, {name: float32 Tensor}

Layout: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian, versions 2
and 3). Every count, length and offset is checked against the file size before anything is
allocated or read: a malformed file raises ValueError and nothing else. Tensors come back as
float32 with torch shape = reversed dims; F32, F16, Q8_0 and Q4_1 are dequantised.
"""

from __future__ import annotations

import math
import os
import struct
import sys
from pathlib import Path
from typing import NamedTuple

import torch

from lora import open_regular

# value type id -> struct format; 8 (string) and 9 (array) are read by hand; 7 is BOOL
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q",
            12: "d"}
# ggml type id -> (name, elements per block, bytes per block)
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 8: ("Q8_0", 32, 34), 3: ("Q4_1", 32, 20),
              2: ("Q4_0", 32, 18), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 9: ("Q8_1", 32, 36),
              10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
              13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
              24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
              28: ("F64", 1, 8), 30: ("BF16", 1, 2)}
SUPPORTED = ("F32", "F16", "Q8_0", "Q4_1")


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


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Metadata and tensor infos of a GGUF file, all validated; no tensor data is read."""
    path = Path(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"GGUF file {path} not found")
    with open_regular(path) as f:  # a FIFO or device is refused, not read forever
        size, pos = os.fstat(f.fileno()).st_size, 0

        def fail(what: str) -> ValueError:
            return ValueError(f"{path}: {what} (at byte {pos} of {size}); the file is not a "
                              "valid GGUF file: re-download or re-convert it")

        def take(n: int, what: str) -> bytes:  # refuses n beyond the file before allocating
            nonlocal pos
            if n > size - pos:
                raise fail(f"{what} needs {n:,} bytes but only {size - pos:,} remain")
            b = f.read(n)
            if len(b) != n:
                raise fail(f"short read of {what} (did the file change?)")
            pos += n
            return b

        def unpack(fmt: str, what: str, count: int = 1) -> tuple:
            return struct.unpack(f"<{count}{fmt}", take(count * struct.calcsize(fmt), what))

        def string(what: str) -> str:
            raw = take(unpack("Q", f"{what} length")[0], what)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise fail(f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None

        def value(vtype: int, key: str, count: int = 1) -> list:  # `count` values of vtype
            if vtype == 8:
                return [string(f"string value of {key!r}") for _ in range(count)]
            if vtype not in _SCALARS:
                raise fail(f"metadata {key!r} has unknown value type {vtype}")
            if count * struct.calcsize(_SCALARS[vtype]) > size - pos:
                raise fail(f"array {key!r} claims {count:,} elements, more than the file holds")
            values = list(unpack(_SCALARS[vtype], f"value of {key!r}", count))
            if vtype == 7 and any(v > 1 for v in values):
                raise fail(f"{key!r} holds a BOOL byte other than 0 or 1")
            return [bool(v) for v in values] if vtype == 7 else values

        if take(min(4, size), "magic") != b"GGUF":
            raise fail("no GGUF magic at the start")
        version = unpack("I", "version")[0]
        if version not in (2, 3):
            hint = " (big-endian files are not supported)" if version > 0xFFFF else ""
            raise fail(f"GGUF version {version} is not supported{hint}: use version 2 or 3")
        n_tensors, n_kv = unpack("Q", "counts", 2)
        # a key/value takes at least 13 bytes and a tensor info at least 32: cap both counts
        if n_kv * 13 + n_tensors * 32 > size - pos:
            raise fail(f"{n_tensors:,} tensors and {n_kv:,} metadata entries cannot fit")
        metadata: dict = {}
        for _ in range(n_kv):
            key = string("metadata key")
            if key in metadata:
                raise fail(f"metadata key {key!r} appears twice")
            vtype = unpack("I", f"value type of {key!r}")[0]
            if vtype == 9:
                etype, count = unpack("I", f"array type of {key!r}")[0], unpack("Q", key)[0]
                if etype == 9:
                    raise fail(f"array {key!r}: nested arrays are not supported")
                if etype == 8 and count * 8 > size - pos:  # 8: the least a string takes
                    raise fail(f"array {key!r} claims {count:,} elements, more than the file "
                               "holds")
                metadata[key] = value(etype, key, count)
            else:
                metadata[key] = value(vtype, key)[0]
        alignment = metadata.get("general.alignment", 32)
        if type(alignment) is not int or not 0 < alignment <= 1 << 20 or alignment & alignment - 1:
            raise fail(f"general.alignment={alignment!r} is not a power of two up to 2**20")
        infos = []
        for i in range(n_tensors):
            name = string(f"name of tensor {i}")
            n_dims = unpack("I", f"n_dims of {name!r}")[0]
            if not 1 <= n_dims <= 4:
                raise fail(f"tensor {name!r} has n_dims={n_dims}; GGUF allows 1 to 4")
            dims = unpack("Q", f"dims of {name!r}", n_dims)
            type_id, offset = unpack("I", f"type of {name!r}")[0], unpack("Q", name)[0]
            if type_id not in GGML_TYPES:
                raise fail(f"tensor {name!r} has unknown ggml type id {type_id}")
            type_name, block, block_bytes = GGML_TYPES[type_id]
            if dims[0] % block:
                raise fail(f"tensor {name!r} ({type_name}) has row length {dims[0]}, not a "
                           f"multiple of its block size {block}")
            nbytes = math.prod(dims) // block * block_bytes
            infos.append((name, tuple(reversed(dims)), type_name, offset, nbytes))
    start = -(-pos // alignment) * alignment  # the data section begins at the next boundary
    tensors: dict[str, TensorInfo] = {}
    for name, shape, type_name, offset, nbytes in infos:
        if name in tensors:
            raise fail(f"tensor {name!r} appears twice")
        if offset % alignment:
            raise fail(f"tensor {name!r} offset {offset} is not a multiple of the alignment "
                       f"{alignment}")
        if start + offset + nbytes > size:
            raise fail(f"tensor {name!r} ({type_name}, shape {shape}) needs bytes "
                       f"[{start + offset:,}, {start + offset + nbytes:,}) past the end")
        tensors[name] = TensorInfo(name, shape, type_name, start + offset, nbytes)
    spans = sorted((t.offset, t.nbytes, t.name) for t in tensors.values())
    for (a, na, x), (b, _, y) in zip(spans, spans[1:]):
        if a + na > b:
            raise fail(f"tensors {x!r} and {y!r} overlap")
    return GGUFHeader(version, metadata, tensors, alignment)


def dequantize(raw: bytearray, ggml_type: str, shape: tuple[int, ...]) -> torch.Tensor:
    """One tensor's raw bytes -> float32 of `shape` (ggml-quants.c). Q8_0 block: f16 d, 32 int8
    q; x = d·q. Q4_1 block: f16 d, f16 m, 16 bytes of low nibbles 0..15, high 16..31; x = d·q + m.
    dequantize(bytearray(struct.pack("<2f", 1, 2)), "F32", (2,)) -> tensor([1., 2.])"""
    if sys.byteorder != "little":  # frombuffer reads native order; GGUF data is little-endian
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
    elif ggml_type == "Q4_1":
        blocks = u8.view(-1, 20)
        d = blocks[:, 0:2].contiguous().view(torch.float16).float()
        m = blocks[:, 2:4].contiguous().view(torch.float16).float()
        q = torch.cat([blocks[:, 4:] & 0x0F, blocks[:, 4:] >> 4], dim=1).float()  # (nb, 32)
        x = (d * q + m).reshape(-1)
    else:
        raise ValueError(f"{ggml_type} is not supported: this reader dequantises "
                         f"{', '.join(SUPPORTED)}; re-convert the model to one of them")
    return x.reshape(shape)


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, {name: float32 tensor}) of a GGUF file."""
    header = read_gguf_header(path)
    bad = [f"{t.name} is {t.ggml_type}" for t in header.tensors.values()
           if t.ggml_type not in SUPPORTED]
    if bad:  # fail before reading anything
        raise ValueError(f"{bad[0].split(' is ')[1]} is not supported: {'; '.join(bad[:5])}; "
                         f"this reader dequantises {', '.join(SUPPORTED)}")
    out = {}
    with open_regular(path) as f:
        for name, info in header.tensors.items():
            f.seek(info.offset)
            raw = bytearray(info.nbytes)
            if f.readinto(raw) != info.nbytes:
                raise ValueError(f"{path}: short read of tensor {name!r} (did the file change?)")
            out[name] = dequantize(raw, info.ggml_type, info.shape)
    return header.metadata, out
