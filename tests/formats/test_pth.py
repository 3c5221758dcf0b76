"""The torch-free .pth reader against files torch itself wrote, and against pickles that try to run
code: they are refused before anything they name is called."""

import os
import pickle
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from tests.checkpoint_builders import state_dict_pickle, tensor_opcodes, write_torch_zip
from llama3_np import Llama3Error
from llama3_np.formats.pth import PthFile
from llama3_np.formats.safetensors_file import SafetensorsFile

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"


def test_every_tensor_layout_torch_saves_reads_back_exactly():
    got = PthFile(FIXTURES / "pth_cases.pth")
    want = SafetensorsFile(FIXTURES / "pth_cases.safetensors")
    assert got.names() == ["bf16", "f16", "f32_transposed", "f32_offset", "shared_head", "shared_tail",
                           "parameter", "empty", "scalar"]
    assert sorted(got.names()) == sorted(want.names())
    for name in got.names():
        g, w = got.tensor(name), want.tensor(name)
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert np.ascontiguousarray(g).tobytes() == w.tobytes(), name
    assert got.dtype("bf16") == ml_dtypes.bfloat16 and got.dtype("f16") == np.float16
    assert not got.tensor("f32_transposed").flags.c_contiguous  # a view, as torch stored it


def test_bf16_storage_is_mapped_from_the_file_without_a_float_copy():
    t = PthFile(FIXTURES / "meta" / "consolidated.00.pth").tensor("layers.0.attention.wq.weight")
    assert t.dtype == ml_dtypes.bfloat16 and not t.flags.writeable
    base = t
    while base is not None and not isinstance(base, memoryview):
        base = base.base
    assert base is not None and type(base.obj).__name__ == "mmap"


# --- pickles that try to run code ----------------------------------------------------------------

class _Evil:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


def _malicious_pickles(marker: Path):
    command = f"touch {marker}"
    yield "os.system" if os.name != "posix" else "posix.system", pickle.dumps(_Evil(os.system, command), protocol=2)
    yield "builtins.exec", pickle.dumps(_Evil(exec, f"open({str(marker)!r}, 'w')"), protocol=4)
    # Hand-written protocol-2 opcodes: GLOBAL 'os system', a string, TUPLE1, REDUCE, STOP.
    yield "os.system", b"\x80\x02cos\nsystem\nX" + len(command).to_bytes(4, "little") + command.encode() + b"\x85R."
    # The call hidden inside an otherwise ordinary state dict, as a tensor's "backward hooks".
    yield "subprocess.call", (
        b"\x80\x02ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n("
        b"csubprocess\ncall\n]X\x05\x00\x00\x00touchX" + len(str(marker)).to_bytes(4, "little")
        + str(marker).encode() + b"e\x85Rtu.")


def test_a_pickled_call_is_refused_by_name_and_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    for i, (global_name, pickled) in enumerate(_malicious_pickles(marker)):
        path = write_torch_zip(tmp_path / f"evil{i}.pth", pickled)
        with pytest.raises(Llama3Error) as e:
            PthFile(path)
        assert str(e.value) == (f"{path}: refusing to load: the pickle asks for {global_name}; a weights file "
                                "only holds tensors, so this file is not a plain checkpoint (it may be malicious)")
        assert not marker.exists()
    # The same bytes through plain pickle would have run the command: the test can fail.
    pickle.loads(next(_malicious_pickles(marker))[1])
    assert marker.exists()


def _one_tensor(path, offset, shape, numel, storage: bytes | None):
    stride = [int(np.prod(shape[i + 1:])) for i in range(len(shape))]
    pickled = state_dict_pickle({"w": tensor_opcodes("FloatStorage", "0", numel, offset, shape, stride)})
    return write_torch_zip(path, pickled, None if storage is None else {"0": storage})


def test_hand_built_state_dict_reads_and_bad_views_are_refused(tmp_path):
    data = np.arange(12, dtype="<f4").tobytes()
    ok = PthFile(_one_tensor(tmp_path / "ok.pth", 2, (2, 5), 12, data))
    np.testing.assert_array_equal(ok.tensor("w"), np.arange(2, 12, dtype=np.float32).reshape(2, 5))
    with pytest.raises(Llama3Error, match=r"tensor 'w' \(shape \(2, 5\), offset 3\) reaches past the end of its "
                                          r"storage of 12 elements"):
        PthFile(_one_tensor(tmp_path / "past.pth", 3, (2, 5), 12, data))
    with pytest.raises(Llama3Error, match="storage '0' holds 48 bytes, fewer than its 20 elements need"):
        PthFile(_one_tensor(tmp_path / "short.pth", 0, (4, 5), 20, data))
    with pytest.raises(Llama3Error, match="storage '0' is missing from the archive; the file is truncated"):
        PthFile(_one_tensor(tmp_path / "nostorage.pth", 0, (2, 5), 12, None))


@pytest.mark.parametrize("content,message", [
    (b"\x80\x02]q\x00.", "does not hold a flat state dict of named tensors"),
    (b"\x80\x02ccollections\nOrderedDict\n", "the pickled state dict is malformed"),
])
def test_malformed_pickles(tmp_path, content, message):
    with pytest.raises(Llama3Error, match=message):
        PthFile(write_torch_zip(tmp_path / "m.pth", content))


def test_not_a_zip_and_missing(tmp_path):
    (tmp_path / "old.pth").write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.")  # torch < 1.6 magic
    with pytest.raises(Llama3Error, match="is not a torch zip checkpoint .*torch older than 1.6"):
        PthFile(tmp_path / "old.pth")
    with pytest.raises(Llama3Error, match="nothing.pth: no such file"):
        PthFile(tmp_path / "nothing.pth")
