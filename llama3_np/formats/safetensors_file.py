"""A small, validating reader and writer of the safetensors format, with bf16 through ml_dtypes.

The `safetensors` package's NumPy API has no bfloat16 (NumPy has no such dtype), and Llama 3 weights
are bfloat16; so llama3_np reads the format itself. It is simple:

    [8 bytes: N, little-endian u64] [N bytes: JSON header] [data bytes]

The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}, offsets
relative to the start of the data bytes, plus an optional "__metadata__" object of strings. The
tensors tile the data bytes exactly (no holes, no overlaps), as the reference implementation
requires. Every one of these facts is checked before any tensor is handed out, so a truncated or
corrupted file is a `Llama3Error` naming the file and what is wrong, never a wrong array.

Tensors are memory-mapped, one mapping per tensor: an array returned by `SafetensorsFile.tensor`
keeps its own mapping alive and releases it when it is dropped, so a loader that converts tensors
one by one never holds the whole file in memory.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from ..dtypes import bfloat16, is_bfloat16
from ..errors import Llama3Error
from ..files import AtomicFile

# safetensors dtype names <-> NumPy dtypes (little-endian, as the format prescribes). BF16 is
# ml_dtypes' bfloat16, imported only when a BF16 tensor is read (`llama3_np.dtypes`).
DTYPES: dict[str, Optional[np.dtype]] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": None,
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items() if v is not None}


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a safetensors dtype name of `DTYPES`."""
    return bfloat16() if name == "BF16" else DTYPES[name]


def stored_name(dtype: np.dtype) -> Optional[str]:
    """The safetensors name of a little-endian NumPy dtype, None when the format has none."""
    return "BF16" if is_bfloat16(dtype) else DTYPE_NAMES.get(dtype)

# The reference implementation refuses headers above 100 MB; a real one is a few hundred KB.
MAX_HEADER_BYTES = 100_000_000


def map_array(path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only array over bytes [offset, offset + size) of a file, memory-mapped on its own.

    The mapping lives exactly as long as the array (and views of it) do.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes == 0:
        return np.empty(shape, dtype)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), offset + nbytes - start, access=mmap.ACCESS_READ, offset=start)
    flat = np.frombuffer(mapping, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset - start)
    return flat.reshape(shape)


class SafetensorsFile:
    """The validated header of one .safetensors file; tensors are mapped on request."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise self._error(f"is {size} bytes long, too short for a safetensors header; "
                                      "the file is truncated: download it again")
                (n,) = struct.unpack("<Q", prefix)
                if n > min(size - 8, MAX_HEADER_BYTES):
                    raise self._error(f"header length {n} runs past the end of the {size}-byte file; "
                                      "the file is truncated or not safetensors: download it again")
                raw = f.read(n)
        except OSError as e:
            raise Llama3Error(f"{self.path}: cannot read: {e.strerror or e}") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise self._error(f"header is not valid JSON ({e}); the file is corrupted: download it again") from None
        if not isinstance(header, dict):
            raise self._error("header is not a JSON object; the file is corrupted: download it again")
        self.data_start = 8 + n
        self.data_size = size - self.data_start
        self.metadata: dict[str, str] = self._parse_metadata(header.pop("__metadata__", {}))
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {
            name: self._parse_entry(name, entry) for name, entry in header.items()}
        self._check_tiling()

    def _error(self, what: str) -> Llama3Error:
        return Llama3Error(f"{self.path}: {what}")

    def _parse_metadata(self, metadata) -> dict[str, str]:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._error("__metadata__ must be an object of strings; the file is corrupted")
        return metadata

    def _parse_entry(self, name: str, entry) -> tuple[np.dtype, tuple[int, ...], int, int]:
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise self._error(f"tensor {name!r}: header entry must have dtype, shape and data_offsets")
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype_name not in DTYPES:
            raise self._error(f"tensor {name!r}: dtype {dtype_name!r} is not understood "
                              f"(llama3_np reads {', '.join(DTYPES)})")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise self._error(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise self._error(f"tensor {name!r}: data_offsets {offsets!r} is not a pair of integers")
        begin, end = offsets
        if not 0 <= begin <= end <= self.data_size:
            raise self._error(f"tensor {name!r}: data offsets [{begin}, {end}] are out of range: the data "
                              f"section holds {self.data_size} bytes; the file is truncated or corrupted")
        dtype = numpy_dtype(dtype_name)
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected:
            raise self._error(f"tensor {name!r}: {end - begin} bytes for a {dtype_name} tensor of shape "
                              f"{tuple(shape)}, which needs {expected}; the file is corrupted")
        return dtype, tuple(shape), begin, end

    def _check_tiling(self):
        position = 0
        for name, (_, _, begin, end) in sorted(self.entries.items(), key=lambda kv: kv[1][2:]):
            if begin != position:
                kind = "overlaps the previous tensor" if begin < position else "leaves a hole before it"
                raise self._error(f"tensor {name!r} at byte {begin} {kind}; the file is corrupted")
            position = end
        if position != self.data_size:
            raise self._error(f"{self.data_size - position} bytes after the last tensor belong to none; "
                              "the file is corrupted")

    def names(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> np.dtype:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as stored (dtype and shape of the header), memory-mapped read-only."""
        dtype, shape, begin, _ = self.entries[name]
        return map_array(self.path, self.data_start + begin, dtype, shape)


class SafetensorsWriter:
    """Writes one safetensors file whose tensors are given in advance (`layout`: name -> (dtype,
    shape)) and whose data arrives a piece at a time (`write`), in name order: what lets the
    perplexity command stream logits it never holds all at once.

    The JSON header has its keys sorted (as the tools that write the committed fixtures always
    did), so the same tensors give the same bytes on every run, and is padded with spaces to a
    multiple of 8 bytes, as the reference writer does, so that every tensor starts 8-byte aligned.
    The file is written beside `path` and renamed into place by `close` (`files.AtomicFile`): a
    failure leaves nothing.
    """

    def __init__(self, path, layout: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
                 metadata: Optional[Mapping[str, str]] = None):
        self.path = Path(path)
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name in sorted(layout):
            dtype, shape = np.dtype(layout[name][0]).newbyteorder("<"), tuple(layout[name][1])
            if stored_name(dtype) is None:
                raise Llama3Error(f"{path}: cannot store tensor {name!r} of dtype {dtype} in safetensors")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": stored_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self.remaining = offset
        raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.file = AtomicFile(self.path)
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, array: np.ndarray) -> None:
        """Append the bytes of `array` (little-endian, C order) to the data section."""
        array = np.ascontiguousarray(array)
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8)
        self.remaining -= data.size
        self.file.write(data)

    def close(self) -> None:
        """Finish the file; raises RuntimeError (a bug) if the data written is not what was announced."""
        if self.remaining != 0:
            self.file.discard()
            raise RuntimeError(f"{self.path}: {abs(self.remaining)} bytes of data "
                               f"{'missing' if self.remaining > 0 else 'too many'}")
        self.file.commit()

    def abort(self) -> None:
        """Give up: close and delete the partial file."""
        self.file.discard()


def write_safetensors(path, tensors: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None):
    """Write tensors (any dtype of `DTYPES`, bf16 as ml_dtypes.bfloat16) and string metadata.

    This is llama3_np's one safetensors writer (dumps, checkpoints, the tools' fixtures). It streams
    each array to the file without a copy; the `safetensors` package's NumPy API would first copy
    every tensor into a bytes object, twice the memory of an 8B checkpoint being imported.
    Raises Llama3Error when a dtype cannot be stored or the file cannot be written.
    """
    arrays = {name: np.asarray(t) for name, t in tensors.items()}
    writer = SafetensorsWriter(path, {n: (a.dtype, a.shape) for n, a in arrays.items()}, metadata)
    try:
        for name in sorted(arrays):
            writer.write(arrays[name])
    except BaseException:
        writer.abort()
        raise
    writer.close()
