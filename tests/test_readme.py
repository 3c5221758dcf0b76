"""README.md's Python example runs, and continues its prompt as Hugging Face transformers does
(greedy, float32: tests/fixtures/default_model/greedy.json)."""

import json
import re
from pathlib import Path

from llama3_np.assets import default_model
from llama3_np.load import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
GREEDY = json.loads((REPO / "tests" / "fixtures" / "default_model" / "greedy.json").read_text())


def python_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("\n## Python\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_produces_the_default_model_greedy_continuation(capsys):
    assert default_model().is_file(), "run `python tools/fetch_default_model.py` (make test does)"
    code = python_example()
    assert len(code.strip().splitlines()) <= 16, "the example should stay short"
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()

    case = next(c for c in GREEDY["cases"] if c["prompt"] == "The three primary colors are")
    assert lines[0] == "(5, 9, 64)"
    assert lines[1] == str(case["ids"][0])
    max_new = int(re.search(r"max_new=(\d+)", code).group(1))
    want = load_tokenizer(default_model()).decode(case["ids"][:max_new])
    assert "".join(lines[2:]) == want.replace("\n", ""), f"README example printed {lines[2:]!r}, transformers {want!r}"
