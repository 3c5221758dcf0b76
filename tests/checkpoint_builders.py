"""Tiny random Llama 3 checkpoints for the checkpoint tests (written in the test, never committed)."""

import functools
import json
import zipfile

import ml_dtypes
import numpy as np

from llama3_np.config import RopeScaling
from tests import helpers

# The checkpoint shape of these tests: D=32, 4 heads / 2 KV heads of 8, F=64, V=48, factor-8 scaling.
TINY_CHANGES = dict(dim=32, head_dim=8, ffn_dim=64, vocab_size=48, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192))


def tiny_config(**changes):
    return helpers.tiny_config(**dict(TINY_CHANGES, **changes))


# Canonical weights (Meta names and layout) stored as bf16; tied ones shared.
random_weights = functools.partial(helpers.random_weights, dtype=ml_dtypes.bfloat16)


# --- torch checkpoints written without torch -----------------------------------------------------
# The opcodes torch.save emits (protocol 2), spelled out, so tests can build .pth files, good or bad.

TINY_PARAMS = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 48, "multiple_of": 32,
               "ffn_dim_multiplier": 0.75, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}
STORAGE_CLASSES = {np.dtype(ml_dtypes.bfloat16): "BFloat16Storage", np.dtype("<f2"): "HalfStorage",
                   np.dtype("<f4"): "FloatStorage"}


def _string(s: str) -> bytes:
    return b"X" + len(s.encode()).to_bytes(4, "little") + s.encode()


def _ints(values) -> bytes:
    return b"(" + b"".join(b"J" + int(v).to_bytes(4, "little") for v in values) + b"t"


def tensor_opcodes(storage_class: str, key: str, numel: int, offset: int, shape, stride) -> bytes:
    """torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())."""
    return (b"ctorch._utils\n_rebuild_tensor_v2\n("
            b"(" + _string("storage") + f"ctorch\n{storage_class}\n".encode() + _string(key) + _string("cpu")
            + b"J" + numel.to_bytes(4, "little") + b"tQ"
            + b"J" + offset.to_bytes(4, "little") + _ints(shape) + _ints(stride)
            + b"\x89ccollections\nOrderedDict\n)RtR")


def state_dict_pickle(entries: dict[str, bytes]) -> bytes:
    """OrderedDict of name -> the opcodes of one value."""
    return b"\x80\x02ccollections\nOrderedDict\n)R(" + b"".join(_string(k) + v for k, v in entries.items()) + b"u."


def write_torch_zip(path, pickled: bytes, storages: dict[str, bytes] | None = None):
    with zipfile.ZipFile(path, "w") as z:  # stored uncompressed, as torch writes
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)
    return path


def write_pth(path, tensors: dict[str, np.ndarray]):
    """A state dict of contiguous tensors, one storage each, as torch.save writes it."""
    entries, storages = {}, {}
    for key, (name, t) in enumerate(tensors.items()):
        t = np.ascontiguousarray(t)
        stride = [int(np.prod(t.shape[i + 1:])) for i in range(t.ndim)]
        entries[name] = tensor_opcodes(STORAGE_CLASSES[t.dtype], str(key), t.size, 0, t.shape, stride)
        storages[str(key)] = t.tobytes()
    return write_torch_zip(path, state_dict_pickle(entries), storages)


def write_meta(folder, weights: dict, shards: int = 1, params: dict | None = None, axes: dict | None = None):
    """A Meta folder: params.json and consolidated.NN.pth split along `axes` (name kind -> axis)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params or TINY_PARAMS))
    for k in range(shards):
        part = {}
        for name, w in weights.items():
            axis = axes.get(name.split(".")[-2]) if shards > 1 else None
            part[name] = w if axis is None else np.split(w, shards, axis=axis)[k]
        write_pth(folder / f"consolidated.{k:02d}.pth", part)
    return folder
