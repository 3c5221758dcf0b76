"""llama3_np's safetensors reader/writer against the reference `safetensors` package, the bf16 bit
layout, and every corruption a downloaded file can have."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings, strategies as st

from llama3_np import Llama3Error
from llama3_np.formats.safetensors_file import SafetensorsFile, write_safetensors

REFERENCE_DTYPES = ["<f8", "<f4", "<f2", "<i8", "<i4", "<i2", "i1", "u1", "?"]


def _arrays(draw_dtype):
    # (rank >= 1: the reference package reads a 0-d tensor back with shape (1,))
    shapes = st.lists(st.integers(0, 5), min_size=1, max_size=3).map(tuple)
    return st.dictionaries(st.text("abc.xyz_0123", min_size=1, max_size=12),
                           st.tuples(draw_dtype, shapes, st.integers(0, 2**32 - 1)), max_size=5)


def _materialize(spec):
    out = {}
    for name, (dtype, shape, seed) in spec.items():
        raw = np.random.default_rng(seed).integers(0, 256, int(np.prod(shape)) * np.dtype(dtype).itemsize,
                                                   dtype=np.uint8)
        out[name] = raw.view(np.dtype(dtype)).reshape(shape) if dtype != "?" else (raw > 127).reshape(shape)
    return out


@settings(max_examples=60, deadline=None)
@given(_arrays(st.sampled_from(REFERENCE_DTYPES)))
def test_reference_package_reads_what_we_write_and_we_read_what_it_writes(tmp_path_factory, spec):
    arrays = _materialize(spec)
    d = tmp_path_factory.mktemp("st")
    write_safetensors(d / "ours.safetensors", arrays, {"k": "v"})
    theirs = safetensors.numpy.load_file(d / "ours.safetensors")
    assert theirs.keys() == arrays.keys()
    for name, a in arrays.items():
        assert theirs[name].dtype == a.dtype and theirs[name].shape == a.shape
        assert theirs[name].tobytes() == a.tobytes(), name
    safetensors.numpy.save_file(arrays, d / "theirs.safetensors", metadata={"k": "v"})
    f = SafetensorsFile(d / "theirs.safetensors")
    assert f.metadata == {"k": "v"} and set(f.names()) == set(arrays)
    for name, a in arrays.items():
        t = f.tensor(name)
        assert t.dtype == a.dtype and t.shape == a.shape and t.tobytes() == a.tobytes(), name


def test_bf16_is_stored_as_the_upper_half_of_float32_and_read_back_memory_mapped(tmp_path):
    values = np.array([[1.0, -2.5, 3.140625], [0.0, 65280.0, -1e-3]], np.float32)
    bf16 = values.astype(ml_dtypes.bfloat16)
    write_safetensors(tmp_path / "b.safetensors", {"w": bf16})
    raw = (tmp_path / "b.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert json.loads(raw[8:8 + n])["w"] == {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}
    assert (8 + n) % 8 == 0
    upper = (bf16.astype(np.float32).view(np.uint32) >> 16).astype("<u2")
    assert raw[8 + n:] == upper.tobytes()
    w = SafetensorsFile(tmp_path / "b.safetensors").tensor("w")
    assert w.dtype == ml_dtypes.bfloat16 and not w.flags.writeable and not w.flags.owndata
    np.testing.assert_array_equal(w.astype(np.float32), bf16.astype(np.float32))


def _file(tmp_path, header, data: bytes, n=None):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return p


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "BF16", "shape": [2], "data_offsets": [8, 12]}}


@pytest.mark.parametrize("header,data,n,message", [
    (GOOD, b"\0" * 12, 1000, "header length 1000 runs past the end"),
    (b"{not json", b"", None, "header is not valid JSON"),
    (b"[1, 2]", b"", None, "header is not a JSON object"),
    (GOOD, b"\0" * 10, None, "data offsets [8, 12] are out of range: the data section holds 10 bytes"),
    (dict(GOOD, a={"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}), b"\0" * 12, None,
     "8 bytes for a F32 tensor of shape (3,), which needs 12"),
    (dict(GOOD, a={"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}), b"\0" * 12, None,
     "dtype 'Q4' is not understood"),
    (dict(GOOD, a={"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}), b"\0" * 12, None,
     "shape [-2] is not a list of non-negative integers"),
    (dict(GOOD, a={"dtype": "F32", "shape": [2]}), b"\0" * 12, None, "must have dtype, shape and data_offsets"),
    (dict(GOOD, b={"dtype": "BF16", "shape": [2], "data_offsets": [4, 8]}), b"\0" * 12, None,
     "overlaps the previous tensor"),
    (GOOD, b"\0" * 16, None, "4 bytes after the last tensor belong to none"),
    (dict(GOOD, __metadata__={"k": 1}), b"\0" * 12, None, "__metadata__ must be an object of strings"),
])
def test_corrupted_file_is_a_clear_error(tmp_path, header, data, n, message):
    p = _file(tmp_path, header, data, n)
    with pytest.raises(Llama3Error) as e:
        SafetensorsFile(p)
    assert str(p) in str(e.value) and message in str(e.value)


def test_truncated_file_and_missing_file(tmp_path):
    p = tmp_path / "t.safetensors"
    p.write_bytes(b"\x10\0\0")
    with pytest.raises(Llama3Error, match="is 3 bytes long, too short for a safetensors header"):
        SafetensorsFile(p)
    good = _file(tmp_path, GOOD, b"\0" * 12)
    p.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(Llama3Error, match=r"data offsets \[8, 12\] are out of range"):
        SafetensorsFile(p)
    with pytest.raises(Llama3Error, match="missing.safetensors: cannot read: No such file"):
        SafetensorsFile(tmp_path / "missing.safetensors")


def test_scalars_and_empty_tensors_keep_their_shapes(tmp_path):
    write_safetensors(tmp_path / "s.safetensors", {"s": np.array(2.5, np.float32), "e": np.zeros((0, 3), np.float16)})
    f = SafetensorsFile(tmp_path / "s.safetensors")
    assert f.tensor("s").shape == () and f.tensor("s") == 2.5
    assert f.tensor("e").shape == (0, 3) and f.tensor("e").dtype == np.float16
