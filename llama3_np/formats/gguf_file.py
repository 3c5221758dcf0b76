"""A GGUF file read as it is: its metadata, and its tensors memory-mapped in place.

GGUF (llama.cpp's format, versions 2 and 3; docs: ggml/docs/gguf.md, writer: gguf-py) is, little-endian:

    "GGUF"  version u32  tensor_count u64  kv_count u64
    kv_count × (key: string, value_type u32, value)          the metadata
    tensor_count × (name: string, n_dims u32, ne[n_dims] u64, ggml_type u32, offset u64)
    padding to `general.alignment` (default 32), then the data section, where each tensor starts
    at its offset (a multiple of the alignment) and holds its rows one after another

where a string is a u64 byte count and UTF-8 bytes, and ne[0] is the length of a row (the
contiguous dimension): a tensor's NumPy shape is ne reversed. Its bytes are those of
`ggml_blocks` rows of its type.

Reading needs nothing but NumPy: the metadata is parsed once (no tensor data is touched, so
`inspect` and `tokenize` read only this), and a tensor's bytes are a read-only view of the mapped
file, paged in from disk when a product first reads them. Everything a header claims is checked
against the file before anything is used (`GGUFFile.__init__`), and every failure is a
Llama3Error that says in words what is wrong with which file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import bfloat16
from ..errors import Llama3Error
from .ggml_blocks import SUPPORTED, GGMLType, QuantizedWeight, dequantize_rows, supported_names, type_name

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
VALUES_PER_STEP = 1 << 18  # values dequantized at a time by `GGUFTensor.values`

# Metadata value types (gguf.md, GGUFValueType): struct format of the scalars.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def describe_start(head: bytes) -> str:
    """What a file that should be GGUF is instead, in words, from its first bytes: empty, an HTML
    page (a failed download or a login page), a git-lfs pointer (the file itself was never fetched)."""
    if not head:
        return "it is empty: 0 bytes"
    text = head.lstrip().lower()
    if text.startswith(b"version https://git-lfs"):
        return "it is a git-lfs pointer, a small text file standing for the real one: `git lfs pull` fetches it"
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "it is an HTML page, not a model: the download failed or needed a login"
    if text.startswith((b"{", b"[")):
        return f"it is JSON text, starting with {head[:24]!r}"
    return f"it starts with {head[:16]!r}"


def is_gguf(path: Path) -> bool:
    """True for a file read as GGUF: one named *.gguf (so that a damaged one is reported as GGUF
    that is damaged, `GGUFFile`), or one that starts with GGUF's magic bytes under any name."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix == ".gguf":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: name, storage type, NumPy shape and where its bytes are."""

    name: str
    type: GGMLType
    shape: tuple[int, ...]  # NumPy order: ne reversed, the row (ne0) last
    offset: int  # from the start of the file
    nbytes: int
    _file: "GGUFFile"

    @property
    def row_bytes(self) -> int:
        return self.type.row_bytes(self.shape[-1])

    def raw(self) -> np.ndarray:  # -> [rows, row_bytes] uint8, a read-only view of the mapped file
        """The stored rows, one row of blocks per line (a 1-D tensor is one row)."""
        rows = self.nbytes // self.row_bytes
        return self._file.data[self.offset:self.offset + self.nbytes].reshape(rows, self.row_bytes)

    def stored(self) -> np.ndarray:  # -> `shape`, F32: float32, F16: float16, BF16: bfloat16
        """A float tensor's values as stored, a read-only view of the mapped file."""
        if self.type.block_size != 1:
            raise ValueError(f"{self.name} is {self.type.name}, not a float type")
        dtype = bfloat16() if self.type.name == "BF16" else self.type.block
        return self.raw().view(dtype).reshape(self.shape)

    def quantized(self) -> QuantizedWeight:
        """A matrix as its blocks, mapped (`ggml_blocks.QuantizedWeight`)."""
        return QuantizedWeight(self.raw(), self.type, self.shape)

    def values(self) -> np.ndarray:  # -> float32, `shape`
        """The exact float32 values (ggml_blocks): a view of the file for F32, else a new array,
        filled a few rows at a time (the dequantizers' temporaries stay small and are reused,
        instead of each costing the page faults of a tensor-sized allocation)."""
        raw = self.raw()
        if self.type.name == "F32":
            return raw.view(np.float32).reshape(self.shape)
        out = np.empty((raw.shape[0], self.shape[-1]), np.float32)
        step = max(1, VALUES_PER_STEP // self.shape[-1])
        for start in range(0, raw.shape[0], step):
            dequantize_rows(raw[start:start + step], self.type, out=out[start:start + step])
        return out.reshape(self.shape)


class GGUFFile:
    """A GGUF file's metadata (`metadata`: key -> value; arrays as lists) and tensors (`tensors`:
    name -> GGUFTensor, in file order), checked against the file's size; the data is mapped, not read.

    Raises Llama3Error when the file is not GGUF (saying what it is instead), is of another GGUF
    version, is truncated or corrupt (a count, a length or an offset that the file cannot hold, a
    misaligned tensor, overlapping tensors, a row that is not a whole number of blocks), or holds
    a tensor of a type llama3_np does not read."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(24)
        except FileNotFoundError:
            raise Llama3Error(f"{self.path}: no such file") from None
        except OSError as e:
            raise Llama3Error(f"{self.path}: cannot read: {e.strerror or e}") from None
        if head[:4] != MAGIC:
            raise Llama3Error(f"{self.path}: not a GGUF file ({describe_start(head)}); download it again")
        if len(head) < 24:
            raise self._truncated(len(head), "the header")
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.size = self.data.size
        self._view = memoryview(self.data)
        self._pos = 4
        self.version = self._scalar("<I", "the version")
        if self.version not in VERSIONS:
            raise Llama3Error(f"{self.path}: GGUF version {self.version}; llama3_np reads versions "
                              f"{' and '.join(map(str, VERSIONS))} (convert it again with a current llama.cpp)")
        n_tensors, n_kv = self._scalar("<Q", "the header"), self._scalar("<Q", "the header")
        self.metadata: dict[str, Any] = {}
        for _ in range(self._count(n_kv, 12, "metadata entries")):
            key = self._string("a metadata key")
            self.metadata[key] = self._value(self._scalar("<I", f"metadata key {key!r}"), f"metadata key {key!r}")
        infos = [self._tensor_info() for _ in range(self._count(n_tensors, 24, "tensors"))]
        self.alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(self.alignment) is not int or self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise self._corrupt(f"general.alignment is {self.alignment!r}, not a power of two")
        self.data_offset = -(-self._pos // self.alignment) * self.alignment
        self.tensors: dict[str, GGUFTensor] = {}
        end_of = {}
        for name, t, shape, offset in infos:
            if name in self.tensors:
                raise self._corrupt(f"tensor {name!r} is listed twice")
            self.tensors[name] = self._checked_tensor(name, t, shape, offset)
            end_of[name] = self.tensors[name].offset + self.tensors[name].nbytes
        by_start = sorted(self.tensors.values(), key=lambda x: x.offset)
        for a, b in zip(by_start, by_start[1:]):
            if b.offset < end_of[a.name]:
                raise self._corrupt(f"tensors {a.name!r} and {b.name!r} overlap ({a.name!r} needs "
                                    f"{a.nbytes} bytes for its shape and type, but {b.name!r} starts "
                                    f"{b.offset - a.offset} bytes after it)")

    # -- errors ------------------------------------------------------------------------------------

    def _truncated(self, at: int, inside: str) -> Llama3Error:
        return Llama3Error(f"{self.path}: the file is truncated: it ends at byte {at}, inside {inside}; "
                           "download it again")

    def _corrupt(self, what: str) -> Llama3Error:
        return Llama3Error(f"{self.path}: the file is corrupt: {what}; download it again")

    # -- the header ----------------------------------------------------------------------------------

    def _take(self, n: int, inside: str) -> int:
        """The position of the next n bytes, which the file must hold."""
        start = self._pos
        if start + n > self.size:
            raise self._truncated(self.size, inside)
        self._pos += n
        return start

    def _scalar(self, fmt: str, inside: str):
        return struct.unpack_from(fmt, self._view, self._take(struct.calcsize(fmt), inside))[0]

    def _count(self, n: int, least_bytes: int, what: str) -> int:
        """A count from the header, which the rest of the file must have room for."""
        if n * least_bytes > self.size - self._pos:
            raise Llama3Error(f"{self.path}: the file is truncated or corrupt: the header announces {n} {what}, "
                              f"more than its remaining {self.size - self._pos} bytes could hold; download it again")
        return n

    def _string(self, inside: str) -> str:
        n = self._scalar("<Q", inside)
        start = self._take(n, inside)
        try:
            return self._view[start:start + n].tobytes().decode("utf-8")
        except UnicodeDecodeError:
            raise self._corrupt(f"{inside} is not UTF-8 text") from None

    def _value(self, value_type: int, inside: str):
        if value_type in _SCALARS:
            return self._scalar(_SCALARS[value_type], inside)
        if value_type == _STRING:
            return self._string(inside)
        if value_type == _ARRAY:
            item_type, n = self._scalar("<I", inside), self._scalar("<Q", inside)
            if item_type in _SCALARS:  # one read for the whole array
                fmt = _SCALARS[item_type]
                start = self._take(n * struct.calcsize(fmt), inside)
                return np.frombuffer(self._view, np.dtype(fmt), n, start).tolist()
            return [self._value(item_type, inside) for _ in range(self._count(n, 8 if item_type == _STRING else 12, f"items in {inside}"))]
        raise self._corrupt(f"{inside} has value type {value_type}, which GGUF does not define")

    def _tensor_info(self):
        name = self._string("the tensor list")
        where = f"the entry of tensor {name!r}"
        n_dims = self._scalar("<I", where)
        if not 1 <= n_dims <= MAX_DIMS:
            raise self._corrupt(f"tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        ne = [self._scalar("<Q", where) for _ in range(n_dims)]
        t, offset = self._scalar("<I", where), self._scalar("<Q", where)
        return name, t, tuple(reversed(ne)), offset

    def _checked_tensor(self, name: str, type_id: int, shape: tuple[int, ...], offset: int) -> GGUFTensor:
        t = SUPPORTED.get(type_id)
        if t is None:
            raise Llama3Error(f"{self.path}: tensor {name!r} is stored as {type_name(type_id)}, which llama3_np "
                              f"does not read; it reads {supported_names()} (requantize the model to one of "
                              "them with llama.cpp's llama-quantize)")
        if shape[-1] % t.block_size:
            raise self._corrupt(f"tensor {name!r} has rows of {shape[-1]} values, not a whole number of "
                                f"{t.name} blocks of {t.block_size}")
        if offset % self.alignment:
            raise self._corrupt(f"tensor {name!r} starts at offset {offset} of the data section, not a "
                                f"multiple of the alignment {self.alignment}")
        nbytes = t.row_bytes(shape[-1]) * int(np.prod(shape[:-1], dtype=np.int64))
        start = self.data_offset + offset
        if start + nbytes > self.size:
            raise Llama3Error(f"{self.path}: the file is truncated: tensor {name!r} ({t.name}, shape "
                              f"{shape}) needs bytes {start} to {start + nbytes}, but the file has "
                              f"{self.size}; download it again")
        return GGUFTensor(name, t, shape, start, nbytes, self)

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)
