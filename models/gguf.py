"""A GGUF reader in stdlib + torch: metadata and float32 tensors.

    meta, tensors = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # dict, {name: float32 Tensor}

Layout: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian, versions 2
and 3). A plain struct reader: no read goes past the end of the file, every tensor's bytes must
lie inside it, and a truncated or corrupt file raises one ValueError naming the file. Tensors
come back as float32 with torch shape = reversed dims; F32, F16, Q8_0 and Q4_1 are dequantised.
"""

import math
import os
import struct
import sys
from typing import BinaryIO, NamedTuple

import torch

from lora import open_regular

# value type id -> struct format; 8 (string) and 9 (array) are read by hand; 7 is BOOL
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
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
    shape: tuple[int, ...]  # torch order: reversed GGUF dims
    ggml_type: str  # "F32", "Q4_1", ...
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFHeader(NamedTuple):
    metadata: dict  # key -> int | float | bool | str | list
    tensors: dict[str, TensorInfo]  # in file order


def _parse(f: BinaryIO, size: int) -> GGUFHeader:
    """The header of an open GGUF file of `size` bytes; any malformed field raises."""
    def take(n: int) -> bytes:  # refuses a length past the end before reading (or allocating)
        if n > size - f.tell():
            raise ValueError(f"{n:,} bytes needed at byte {f.tell():,}, past the end")
        return f.read(n)

    def unpack(fmt: str, count: int = 1) -> tuple:
        return struct.unpack(f"<{count}{fmt}", take(count * struct.calcsize(fmt)))

    def value(vtype: int):
        if vtype == 8:
            return take(unpack("Q")[0]).decode("utf-8")
        if vtype != 9:
            return unpack(_SCALARS[vtype])[0]
        etype, count = unpack("I")[0], unpack("Q")[0]
        if etype == 8:  # each string takes 8 bytes at least, so this loop ends with the file
            return [value(8) for _ in range(count)]
        return list(unpack(_SCALARS[etype], count))

    magic, version = take(4), unpack("I")[0]
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError(f"magic {magic!r} version {version}: expected b'GGUF' version 2 or 3 "
                         "(little-endian)")
    n_tensors, n_kv = unpack("Q", 2)
    metadata = {value(8): value(unpack("I")[0]) for _ in range(n_kv)}
    infos = []
    for _ in range(n_tensors):
        name, dims = value(8), unpack("Q", unpack("I")[0])
        infos.append((name, dims, GGML_TYPES[unpack("I")[0]], unpack("Q")[0]))
    alignment = metadata.get("general.alignment", 32)
    if type(alignment) is not int or alignment < 1:
        raise ValueError(f"general.alignment={alignment!r} is not a positive int")
    start = -(-f.tell() // alignment) * alignment  # the data section begins at the next boundary
    tensors = {}
    for name, dims, (type_name, block, block_bytes), offset in infos:
        nbytes = math.prod(dims) // block * block_bytes
        if not dims or dims[0] % block or start + offset + nbytes > size:
            raise ValueError(f"tensor {name!r} ({type_name}, dims {dims}) does not lie inside "
                             "the file")
        tensors[name] = TensorInfo(tuple(reversed(dims)), type_name, start + offset, nbytes)
    return GGUFHeader(metadata, tensors)


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Metadata and tensor infos of a GGUF file; no tensor data is read.
    read_gguf_header("m.gguf").tensors["token_embd.weight"].shape -> (49152, 576)"""
    with open_regular(path) as f:  # a FIFO or device is refused, not read forever
        try:
            return _parse(f, os.fstat(f.fileno()).st_size)
        except (struct.error, LookupError, TypeError, ArithmeticError, ValueError) as e:
            what = e if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            raise ValueError(f"{path} is not a valid GGUF file ({what}): re-download or "
                             "re-convert it") from None


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
    bad = {n: t.ggml_type for n, t in header.tensors.items() if t.ggml_type not in SUPPORTED}
    if bad:  # fail before reading anything
        raise ValueError(f"{path}: {next(iter(bad.values()))} is not supported ({len(bad)} "
                         f"tensors, e.g. {next(iter(bad))}): this reader dequantises "
                         f"{', '.join(SUPPORTED)}; re-convert the model to one of them")
    out = {}
    with open_regular(path) as f:
        for name, info in header.tensors.items():
            f.seek(info.offset)
            raw = bytearray(info.nbytes)
            if f.readinto(raw) != info.nbytes:
                raise ValueError(f"{path}: short read of tensor {name!r} (did the file change?)")
            out[name] = dequantize(raw, info.ggml_type, info.shape)
    return header.metadata, out
