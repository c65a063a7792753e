"""models/gguf.py: files written here round-trip, a malformed file raises one ValueError naming it.

Oracle: a small GGUF writer below (the layout of https://github.com/ggml-org/ggml/blob/master/
docs/gguf.md) with a float64 reference quantiser; dequantised tensors must equal d·q (+ m)
computed from the stored integers. (The `gguf` package on the SmolLM2 file: tests/test_decoder.py.)
Run: .venv/bin/python -m pytest -q tests/test_gguf.py
"""

import os
import struct
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.gguf import GGML_TYPES, dequantize, read_gguf, read_gguf_header

TYPE_IDS = {name: i for i, (name, _, _) in GGML_TYPES.items()}


# -----------------------------------------------------------------------------
# a minimal writer and reference quantisers


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, value) -> bytes:
    if isinstance(value, bool):
        return _str(key) + struct.pack("<IB", 7, value)
    if isinstance(value, int):
        return _str(key) + struct.pack("<Ii", 5, value)
    if isinstance(value, float):
        return _str(key) + struct.pack("<If", 6, value)
    if isinstance(value, str):
        return _str(key) + struct.pack("<I", 8) + _str(value)
    if all(isinstance(v, str) for v in value):
        return _str(key) + struct.pack("<IIQ", 9, 8, len(value)) + b"".join(map(_str, value))
    return _str(key) + struct.pack("<IIQ", 9, 5, len(value)) + struct.pack(f"<{len(value)}i",
                                                                          *value)


def quantize(x: torch.Tensor, ggml_type: str) -> tuple[bytes, torch.Tensor]:
    """x (rows, cols) -> (raw bytes, float64 dequantised reference from the stored numbers)."""
    if ggml_type == "F32":
        return x.float().numpy().tobytes(), x.float().double()
    if ggml_type == "F16":
        return x.half().numpy().tobytes(), x.half().double()
    blocks = x.double().reshape(-1, 32)
    raw, ref = [], []
    for b in blocks:
        if ggml_type == "Q8_0":
            d = torch.tensor(b.abs().max().item() / 127).half()
            q = torch.round(b / d.double()).clamp(-128, 127).to(torch.int8) if d else \
                torch.zeros(32, dtype=torch.int8)
            raw.append(d.numpy().tobytes() + q.numpy().tobytes())
            ref.append(d.double() * q.double())
        else:  # Q4_1: q in 0..15, low nibbles hold elements 0..15, high nibbles 16..31
            lo, hi = b.min().item(), b.max().item()
            d, m = torch.tensor((hi - lo) / 15).half(), torch.tensor(lo).half()
            q = torch.round((b - m.double()) / d.double()).clamp(0, 15).to(torch.uint8) if d else \
                torch.zeros(32, dtype=torch.uint8)
            packed = q[:16] | (q[16:] << 4)
            raw.append(d.numpy().tobytes() + m.numpy().tobytes() + packed.numpy().tobytes())
            ref.append(d.double() * q.double() + m.double())
    return b"".join(raw), torch.cat(ref).reshape(x.shape)


def write_gguf(path, metadata: dict, tensors: dict[str, tuple[str, torch.Tensor]],
               version: int = 3, alignment: int = 32) -> dict[str, torch.Tensor]:
    """Write a GGUF file; returns the float64 reference of each tensor."""
    kvs = dict(metadata)
    if alignment != 32:
        kvs["general.alignment"] = alignment
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    head += b"".join(_kv(k, v) for k, v in kvs.items())
    data, refs, offset = b"", {}, 0
    for name, (ggml_type, x) in tensors.items():
        raw, refs[name] = quantize(x, ggml_type)
        dims = list(reversed(x.shape))  # GGUF lists the innermost dimension first
        head += _str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims,
                                         TYPE_IDS[ggml_type], offset)
        pad = -len(raw) % alignment
        data += raw + b"\0" * pad
        offset += len(raw) + pad
    head += b"\0" * (-len(head) % alignment)
    path.write_bytes(head + data)
    return refs


# -----------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("ggml_type", ["F32", "F16", "Q8_0", "Q4_1"])
@pytest.mark.parametrize("version,alignment", [(3, 32), (2, 32), (3, 64), (3, 8)])
def test_roundtrip_against_reference_dequantisation(tmp_path, ggml_type, version, alignment):
    tensors = {"w": (ggml_type, torch.randn(3, 64) * 3), "v": (ggml_type, torch.randn(96)),
               "norm": ("F32", torch.randn(5))}
    meta = {"general.architecture": "llama", "n": -3, "eps": 0.5, "flag": True,
            "names": ["a", "é", ""], "ids": [1, -2, 3]}
    refs = write_gguf(tmp_path / "m.gguf", meta, tensors, version, alignment)
    back_meta, back = read_gguf(tmp_path / "m.gguf")
    assert {k: v for k, v in back_meta.items() if k != "general.alignment"} == meta
    for name, ref in refs.items():
        assert back[name].dtype == torch.float32 and back[name].shape == ref.shape
        torch.testing.assert_close(back[name].double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ggml_type,tol", [("Q8_0", 1 / 254), ("Q4_1", 1 / 30)])
def test_quantised_values_are_close_to_the_originals(tmp_path, ggml_type, tol):
    """Sanity of the oracle itself: round to nearest is off by at most half a step (+ f16)."""
    x = torch.randn(4, 64)
    write_gguf(tmp_path / "m.gguf", {}, {"w": (ggml_type, x)})
    span = x.reshape(-1, 32).abs().amax(1, keepdim=True) * 2
    err = (read_gguf(tmp_path / "m.gguf")[1]["w"] - x).reshape(-1, 32).abs()
    assert (err <= span * tol * 1.01 + 1e-3).all()


def test_q4_1_nibble_order_low_first():
    """One Q4_1 block, d=1, m=0, byte j = (j+1)<<4 | j: element j is j, element 16+j is j+1."""
    raw = bytearray(struct.pack("<ee", 1.0, 0.0) + bytes(((j + 1) % 16) << 4 | j
                                                          for j in range(16)))
    x = dequantize(raw, "Q4_1", (32,))
    assert x[:16].tolist() == list(range(16))
    assert x[16:].tolist() == [(j + 1) % 16 for j in range(16)]


def test_matrix_dims_are_reversed_to_d_out_d_in(tmp_path):
    w = torch.arange(6.0).reshape(2, 3)  # (d_out, d_in): GGUF dims [3, 2]
    write_gguf(tmp_path / "m.gguf", {}, {"w": ("F32", w)})
    assert read_gguf_header(tmp_path / "m.gguf").tensors["w"].shape == (2, 3)
    assert torch.equal(read_gguf(tmp_path / "m.gguf")[1]["w"], w)


def test_metadata_only_read_skips_tensor_data(tmp_path):
    write_gguf(tmp_path / "m.gguf", {"k": "v"}, {"w": ("Q8_0", torch.randn(2, 32))})
    h = read_gguf_header(tmp_path / "m.gguf")
    assert h.metadata == {"k": "v"} and h.tensors["w"].ggml_type == "Q8_0"
    assert h.tensors["w"].nbytes == 2 * 34


# -----------------------------------------------------------------------------
# malformed files


def _good(tmp_path) -> bytes:
    write_gguf(tmp_path / "good.gguf", {"a": "b", "l": [1, 2]},
               {"w": ("Q4_1", torch.randn(2, 32)), "n": ("F32", torch.randn(3))})
    return (tmp_path / "good.gguf").read_bytes()


def _check_only_value_error(path):
    """read_gguf(path) succeeds or raises one ValueError that names the file."""
    try:
        read_gguf(path)
    except ValueError as e:
        assert str(path) in str(e), e


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_random_bytes_raise_value_error_only(tmp_path, data):
    p = tmp_path / "r.gguf"
    p.write_bytes(b"GGUF" + data)
    _check_only_value_error(p)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10**6))
def test_truncated_files_raise_value_error(tmp_path, cut):
    good = _good(tmp_path)
    info = read_gguf_header(tmp_path / "good.gguf").tensors
    cut %= max(t.offset + t.nbytes for t in info.values())  # the padding after may go
    p = tmp_path / "t.gguf"
    p.write_bytes(good[:cut])
    with pytest.raises(ValueError, match=f"{p} is not a valid GGUF file"):
        read_gguf(p)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=100)
@given(pos=st.integers(0, 10**6), value=st.integers(0, 255), n=st.integers(1, 8))
def test_corrupted_bytes_raise_value_error_only(tmp_path, pos, value, n):
    """Overwrite up to 8 bytes anywhere in the header (counts, lengths, types, dims, offsets)."""
    good = bytearray(_good(tmp_path))
    pos %= 200  # the header: the tensor data itself can hold any bytes
    good[pos:pos + n] = bytes([value]) * len(good[pos:pos + n])
    p = tmp_path / "c.gguf"
    p.write_bytes(bytes(good))
    _check_only_value_error(p)


def _header(n_tensors=0, n_kv=1, version=3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _info(name="w", dims=(32,), type_id=0, offset=0) -> bytes:
    return _str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, offset)


@pytest.mark.parametrize("blob", [
    b"GGML" + b"\0" * 40,  # no magic
    b"GG",
    _header(version=1) + b"\0" * 40,
    _header(version=3 << 24) + b"\0" * 40,  # big-endian
    _header(n_kv=10**15) + b"\0" * 40,
    _header() + struct.pack("<Q", 2**62) + b"k" * 40,  # a key longer than the file
    _header() + _str(b"\xff\xfe") + struct.pack("<IB", 0, 1),  # not UTF-8
    _header() + _str("k") + struct.pack("<I", 99) + b"\0" * 20,  # unknown value type
    _header() + _str("k") + struct.pack("<IIQ", 9, 4, 10**12) + b"\0" * 20,  # array too long
    _header() + _str("k") + struct.pack("<IIQ", 9, 9, 1) + b"\0" * 20,  # nested arrays
    _header() + _kv("general.alignment", 0) + b"\0" * 40,
    _header() + _kv("general.alignment", "32") + b"\0" * 40,
    _header(1, 0) + _info(dims=()) + b"\0" * 64,
    _header(1, 0) + _info(type_id=77) + b"\0" * 64,  # unknown ggml type
    _header(1, 0) + _info(type_id=8, dims=(31,)) + b"\0" * 64,  # not whole Q8_0 blocks
    _header(1, 0) + _info(offset=2**60) + b"\0" * 256,  # tensor bytes past the end
    _header(1, 0) + _info(dims=(2**40, 2**40)) + b"\0" * 256,
])
def test_malformed_files_raise_one_value_error_naming_the_file(tmp_path, blob):
    p = tmp_path / "bad.gguf"
    p.write_bytes(blob)
    with pytest.raises(ValueError, match=f"{p} is not a valid GGUF file .*: re-download or"):
        read_gguf(p)


def test_unsupported_type_is_rejected_by_name(tmp_path):
    p = tmp_path / "k.gguf"
    p.write_bytes(_header(1, 0) + _info(dims=(256,), type_id=12) + b"\0" * 512)
    assert read_gguf_header(p).tensors["w"].ggml_type == "Q4_K"  # the header is fine
    with pytest.raises(ValueError, match="Q4_K is not supported"):
        read_gguf(p)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")


# -----------------------------------------------------------------------------
# llama metadata by type and range, layers against tensors, files that are not files


def _llama_gguf(path, monkeypatch, **edits):
    """test_decoder's tiny llama GGUF with metadata keys replaced (None: removed)."""
    import test_decoder
    real = write_gguf

    def edited(p, meta, tensors):
        meta = {k: v for k, v in (meta | {k.replace("__", "."): v for k, v in edits.items()}
                                  ).items() if v is not None}
        return real(p, meta, tensors)
    monkeypatch.setattr(sys.modules[__name__], "write_gguf", edited)
    test_decoder._tiny_gguf(path, test_decoder.tiny(), test_decoder.TOK)
    monkeypatch.setattr(sys.modules[__name__], "write_gguf", real)
    return path


LLAMA_INTS = ["llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
              "llama.attention.head_count", "llama.attention.head_count_kv",
              "llama.context_length", "llama.vocab_size"]


@pytest.fixture(scope="module")
def tiny_header(tmp_path_factory):
    """test_decoder's tiny llama GGUF, written once: (path, header)."""
    import test_decoder
    path = tmp_path_factory.mktemp("gguf") / "t.gguf"
    test_decoder._tiny_gguf(path, test_decoder.tiny(), test_decoder.TOK)
    return path, read_gguf_header(path)


@pytest.mark.parametrize("key, value", [
    *((k, v) for k in LLAMA_INTS for v in ("64", 64.0, True, 0, -3)),
    *((k, v) for k in ("llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon")
      for v in ("1e4", True, 0.0, float("inf"), float("nan"))),
    ("llama.rope.dimension_count", "16"),
])
def test_llama_metadata_of_the_wrong_type_or_range_names_the_file_and_key(tiny_header, key,
                                                                          value):
    """The metadata as llama_from_gguf passes it (one case through the file: below)."""
    from models.llama import config_from_gguf
    path, header = tiny_header
    with pytest.raises(ValueError, match=f"{path}: {key}=.* is invalid: use"):
        config_from_gguf(header.metadata | {key: value}, header.tensors, str(path))


@pytest.mark.parametrize("key, value, match", [
    ("tokenizer.ggml.bos_token_id", "0", "bos_token_id='0' is invalid: use an int"),
    ("tokenizer.ggml.add_bos_token", 1, "add_bos_token=1 is invalid: use true or false"),
    ("tokenizer.ggml.pre", 3, "pre=3 is invalid: use a string"),
    ("tokenizer.ggml.tokens", [1, 2, 3], "token_type has 410 entries for 3 tokens"),
    ("tokenizer.ggml.tokens", "abc", "tokens='abc' is invalid: use a list"),
    ("tokenizer.ggml.merges", 7, "merges=7 is invalid: use a list"),
    ("tokenizer.ggml.merges", [7], "merge 0 7 is not two tokens"),
])
def test_tokenizer_metadata_of_the_wrong_type_names_the_key(tiny_header, key, value, match):
    from models.bpe import BPETokenizer
    path, header = tiny_header
    with pytest.raises(ValueError, match=match) as e:
        BPETokenizer.from_gguf(header.metadata | {key: value}, str(path))
    assert str(path) in str(e.value)


def test_wrong_metadata_in_a_file_names_the_file_and_key(tmp_path, monkeypatch):
    from models.llama import llama_from_gguf
    path = _llama_gguf(tmp_path / "t.gguf", monkeypatch, llama__embedding_length="64")
    with pytest.raises(ValueError, match=f"{path}: llama.embedding_length='64' is invalid: use"):
        llama_from_gguf(path)


def test_block_count_beyond_the_tensors_is_refused_before_building(tmp_path, monkeypatch):
    """A file claiming 10⁹ blocks built them (MemoryError after 25 s) before any tensor check."""
    from models.llama import llama_from_gguf
    path = _llama_gguf(tmp_path / "t.gguf", monkeypatch, llama__block_count=10**9)
    with pytest.raises(ValueError, match="llama.block_count=1000000000 but the"):
        llama_from_gguf(path)


def test_empty_control_token_is_never_emitted(tmp_path, monkeypatch):
    """An empty-string control token matched between every two characters of any text."""
    import test_decoder
    from models.llama import llama_from_gguf
    tokens = list(test_decoder.TOK.tokens)
    tokens[2] = ""  # a control token (type 3) in _tiny_gguf
    path = _llama_gguf(tmp_path / "t.gguf", monkeypatch, tokenizer__ggml__tokens=tokens)
    _, tok = llama_from_gguf(path)
    text = "a positive film 12"
    assert tok.encode(text) == test_decoder.TOK.encode(text)
    assert 2 not in tok.encode(text)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_or_device_is_refused_without_blocking(tmp_path):
    from test_adapter_io import _returns_within
    os.mkfifo(tmp_path / "f.gguf")
    (tmp_path / "z.gguf").symlink_to("/dev/zero")
    for name in ("f.gguf", "z.gguf"):
        e = _returns_within(lambda: read_gguf(tmp_path / name))
        assert isinstance(e, ValueError) and "not a regular file" in str(e), e
