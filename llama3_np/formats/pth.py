"""PyTorch checkpoints (`torch.save`, as Meta ships `consolidated.NN.pth`) read without torch.

Since torch 1.6 such a file is a zip archive:

    <name>/data.pkl      a pickle of the state dict, in which each tensor is a call
                         torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
                         and each storage a persistent id ('storage', torch.XStorage, key, device, numel)
    <name>/data/<key>    the raw little-endian bytes of storage <key>
    <name>/byteorder     "little" (absent in older files, which are little-endian too)

Unpickling runs whatever callables the pickle names, so a plain `pickle.load` of a downloaded file
runs the downloader's code. `_WeightsUnpickler` resolves exactly the globals a state dict of tensors
needs, to inert stand-ins of our own, and refuses every other one before anything is called.
Tensors come back as views on the storage bytes, memory-mapped when the zip member is stored
uncompressed (torch never compresses); bf16 storages become ml_dtypes.bfloat16 arrays, no float copy.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..dtypes import bfloat16
from ..errors import Llama3Error
from .safetensors_file import map_array

# The storage classes a weights file uses; each stands for its element type (bfloat16 is made
# when a file holds one: llama3_np.dtypes).
STORAGE_DTYPES = {
    "BFloat16Storage": "bfloat16",
    "HalfStorage": "<f2",
    "FloatStorage": "<f4",
}


@dataclass(frozen=True, slots=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        spec = STORAGE_DTYPES[self.name]
        return bfloat16() if spec == "bfloat16" else np.dtype(spec)


@dataclass(frozen=True, slots=True)
class _Storage:
    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor of the pickle: a strided view (element units) on one storage."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise pickle.UnpicklingError(f"tensor {what} {value!r} is not a tuple of non-negative integers")
    return value


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2: records the view, computes nothing."""
    if not isinstance(storage, _Storage) or type(storage_offset) is not int or storage_offset < 0:
        raise pickle.UnpicklingError("a tensor's storage or offset is malformed")
    shape, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {shape} and stride {stride} differ in rank")
    if backward_hooks:
        raise pickle.UnpicklingError("a tensor carries backward hooks; a weights file has none")
    return TensorRef(storage, storage_offset, shape, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """Stand-in for torch._utils._rebuild_parameter (an nn.Parameter is its tensor)."""
    if not isinstance(data, TensorRef) or backward_hooks:
        raise pickle.UnpicklingError("a parameter wraps something other than a plain tensor")
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _Refused(Exception):
    """A global outside the allow-list: never wrapped as a mere 'malformed pickle'."""


class _WeightsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and type(pid[4]) is int and pid[4] >= 0):
            raise pickle.UnpicklingError(f"persistent id {pid!r} is not a tensor storage")
        return _Storage(key=pid[2], dtype=pid[1].dtype, numel=pid[4])


class PthFile:
    """The state dict of one torch zip checkpoint; tensors are mapped on request.

    Same reading interface as `SafetensorsFile`: `names()`, `dtype(name)`, `shape(name)`,
    `tensor(name)`.
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            archive = zipfile.ZipFile(self.path)
        except FileNotFoundError:
            raise Llama3Error(f"{self.path}: no such file") from None
        except (zipfile.BadZipFile, OSError) as e:
            raise self._error(f"is not a torch zip checkpoint ({e}); files saved by torch older than 1.6 "
                              "are not supported: re-save it with a current torch, or download it again") from None
        with archive:
            self._members = {info.filename: info for info in archive.infolist()}
            pickles = [n for n in self._members if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise self._error("holds no single <name>/data.pkl; it is not a torch checkpoint")
            self._prefix = pickles[0][: -len("data.pkl")]
            byteorder = self._members.get(self._prefix + "byteorder")
            if byteorder is not None and archive.read(byteorder) != b"little":
                raise self._error("stores big-endian tensors; re-save it on a little-endian machine")
            raw = archive.read(pickles[0])
        state = self._unpickle(raw)
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, TensorRef)
                                                  for k, v in state.items()):
            raise self._error("does not hold a flat state dict of named tensors")
        self.tensors: dict[str, TensorRef] = dict(state)
        for name, ref in self.tensors.items():
            self._check_view(name, ref)

    def _error(self, what: str) -> Llama3Error:
        return Llama3Error(f"{self.path}: {what}")

    def _unpickle(self, raw: bytes):
        try:
            return _WeightsUnpickler(io.BytesIO(raw)).load()
        except _Refused as e:
            raise self._error(f"refusing to load: the pickle asks for {e}; a weights file only holds "
                              "tensors, so this file is not a plain checkpoint (it may be malicious)") from None
        except Exception as e:  # any malformed pickle: nothing it named has run
            raise self._error(f"the pickled state dict is malformed ({type(e).__name__}: {e}); "
                              "download the file again") from None

    def _storage_member(self, storage: _Storage) -> zipfile.ZipInfo:
        info = self._members.get(f"{self._prefix}data/{storage.key}")
        if info is None:
            raise self._error(f"storage {storage.key!r} is missing from the archive; the file is truncated")
        if info.file_size < storage.numel * storage.dtype.itemsize:
            raise self._error(f"storage {storage.key!r} holds {info.file_size} bytes, fewer than its "
                              f"{storage.numel} elements need; the file is corrupted")
        return info

    def _check_view(self, name: str, ref: TensorRef):
        self._storage_member(ref.storage)
        if 0 not in ref.shape:
            last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
            if last >= ref.storage.numel:
                raise self._error(f"tensor {name!r} (shape {ref.shape}, offset {ref.offset}) reaches past the "
                                  f"end of its storage of {ref.storage.numel} elements; the file is corrupted")

    def names(self) -> list[str]:
        return list(self.tensors)

    def dtype(self, name: str) -> np.dtype:
        return self.tensors[name].storage.dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def _storage_array(self, storage: _Storage) -> np.ndarray:
        info = self._storage_member(storage)
        if info.compress_type == zipfile.ZIP_STORED:
            with open(self.path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise self._error(f"storage {storage.key!r}: bad zip entry header; the file is corrupted")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            return map_array(self.path, info.header_offset + 30 + name_len + extra_len,
                             storage.dtype, (storage.numel,))
        with zipfile.ZipFile(self.path) as archive:
            data = archive.read(info)
        return np.frombuffer(data, storage.dtype, count=storage.numel)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as stored, a read-only view on its (memory-mapped) storage."""
        ref = self.tensors[name]
        storage = self._storage_array(ref.storage)
        if 0 in ref.shape:
            return np.empty(ref.shape, storage.dtype)
        itemsize = storage.dtype.itemsize
        return np.lib.stride_tricks.as_strided(storage[ref.offset:], shape=ref.shape,
                                               strides=[s * itemsize for s in ref.stride], writeable=False)
