"""Every bad checkpoint a user can hand llama3_np ends in one line on stderr and exit status 2:
no traceback, no tensor data read, no code from the file run."""

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest

import llama3_np.formats.pth
import llama3_np.formats.safetensors_file
from tests.checkpoint_builders import TINY_PARAMS, write_torch_zip
from llama3_np import Llama3Error
from llama3_np.formats.checkpoint import load_checkpoint
from llama3_np.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"


def _copy(tmp_path, name):
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def _rewrite_header(folder, change):
    """Edit the JSON header of model.safetensors in place, keeping its length (so only the edit is wrong)."""
    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    new = change(header)
    new = new if isinstance(new, bytes) else json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    raw[8:8 + n] = new.ljust(n)
    path.write_bytes(raw)
    return folder


def missing_folder(tmp_path):
    return tmp_path / "no-such-model"


def missing_shard(tmp_path):
    folder = _copy(tmp_path, "hf_sharded")
    (folder / "model-00002-of-00002.safetensors").unlink()
    return folder


def truncated_safetensors(tmp_path):
    folder = _copy(tmp_path, "hf")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])  # an interrupted download
    return folder


def header_length_past_end(tmp_path):
    folder = _copy(tmp_path, "hf")
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + path.read_bytes()[8:])
    return folder


def bad_json_header(tmp_path):
    return _rewrite_header(_copy(tmp_path, "hf"), lambda h: b'{"model.norm.weight": {"dtype": "BF16", ')


def offsets_out_of_range(tmp_path):
    def change(header):
        header["model.norm.weight"]["data_offsets"] = [60000, 60064]
    return _rewrite_header(_copy(tmp_path, "hf"), change)


def malicious_pth(tmp_path):
    folder = tmp_path / "meta"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(TINY_PARAMS))

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'code-ran'}",)
    write_torch_zip(folder / "consolidated.00.pth", pickle.dumps({"tok_embeddings.weight": Payload()}, protocol=2))
    return folder


def shards_do_not_divide(tmp_path):
    folder = _copy(tmp_path, "meta_2shards")
    shutil.copy(folder / "consolidated.01.pth", folder / "consolidated.02.pth")
    return folder


def shard_from_another_split(tmp_path):
    folder = _copy(tmp_path, "meta_2shards")
    shutil.copy(FIXTURES / "meta" / "consolidated.00.pth", folder / "consolidated.01.pth")
    return folder


def hf_config_disagrees(tmp_path):
    folder = _copy(tmp_path, "hf")
    config = json.loads((folder / "config.json").read_text())
    config["num_attention_heads"] = 2
    config["head_dim"] = 16
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def meta_params_disagree(tmp_path):
    folder = _copy(tmp_path, "meta")
    params = json.loads((folder / "params.json").read_text())
    params["dim"] = 64
    (folder / "params.json").write_text(json.dumps(params))
    return folder


CASES = [
    (missing_folder, ("no-such-model does not exist: pass -m the folder of a Llama 3 checkpoint",  # the CLI
                      "no-such-model: no such file or directory; pass a checkpoint folder")),  # load_checkpoint
    (missing_shard, "model-00002-of-00002.safetensors: listed in model.safetensors.index.json but missing; "
                    "download it again"),
    (truncated_safetensors, "model.safetensors: tensor 'model.layers.1.self_attn.v_proj.weight': data offsets "
                            "[52480, 53504] are out of range: the data section holds 52568 bytes; the file is "
                            "truncated or corrupted"),
    (header_length_past_end, "model.safetensors: header length 1099511627776 runs past the end of the "
                             "55688-byte file; the file is truncated or not safetensors: download it again"),
    (bad_json_header, "model.safetensors: header is not valid JSON"),
    (offsets_out_of_range, "tensor 'model.norm.weight': data offsets [60000, 60064] are out of range: the data section holds 53568 bytes"),
    (malicious_pth, "consolidated.00.pth: refusing to load: the pickle asks for posix.system; a weights file only "
                    "holds tensors, so this file is not a plain checkpoint (it may be malicious)"),
    (shards_do_not_divide, "meta_2shards: 3 shards do not divide tensor 'tok_embeddings.weight': dimension 0 is 128 "
                           "(params.json); is a shard missing or extra?"),
    (shard_from_another_split, "consolidated.01.pth: tensor 'tok_embeddings.weight' (tok_embeddings.weight) has "
                               "shape (128, 32), but params.json split 2 ways implies (64, 32)"),
    (hf_config_disagrees, "model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' "
                          "(layers.0.attention.wk.weight) has shape (16, 32), but config.json implies (32, 32); "
                          "the config does not belong to these weights"),
    (meta_params_disagree, "consolidated.00.pth: tensor 'tok_embeddings.weight' (tok_embeddings.weight) has shape "
                           "(128, 32), but params.json implies (128, 64)"),
]


@pytest.mark.parametrize("make,message", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_checkpoint_is_one_line_exit_2_and_nothing_runs(tmp_path, capsys, monkeypatch, make, message):
    message, load_message = message if isinstance(message, tuple) else (message, message)
    folder = make(tmp_path)
    assert main(["inspect", "-m", str(folder)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("llama3-np: error: ") and err.endswith("\n") and err.count("\n") == 1
    assert message in err, err
    # Loading stops at the same point, before any tensor data is mapped or read.
    def no_data(*args):
        raise AssertionError("tensor data was read before the checkpoint was validated")
    monkeypatch.setattr(llama3_np.formats.safetensors_file, "map_array", no_data)
    monkeypatch.setattr(llama3_np.formats.pth, "map_array", no_data)
    with pytest.raises(Llama3Error) as e:
        load_checkpoint(folder)
    assert load_message in str(e.value)
    assert not (tmp_path / "code-ran").exists()


@pytest.mark.parametrize("content,says", [
    (b"<!DOCTYPE html><html><body>Sign in</body></html>", "it is an HTML page"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n", "it is a git-lfs pointer"),
    (b"", "it is empty"),
    (b"PK\x03\x04junk", "it starts with b'PK\\x03\\x04junk'"),
])
def test_a_gguf_name_on_something_else_says_what_the_file_is(tmp_path, capsys, content, says):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    assert main(["inspect", "-m", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"not a GGUF file ({says}" in err and "download it again" in err and len(err.strip().splitlines()) == 1, err
