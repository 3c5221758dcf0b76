"""adjudicate: every divergence of an honest engine (transformers in bfloat16 against transformers in
float32, 20 prompts on the default model: tests/fixtures/default_model/greedy_low_precision.json,
tests/fixtures/adjudicate/, tools/calibrate_adjudicate.py) is a near-tie, every continuation of an
engine made faulty by these tests is a defect, and the engines' JSON outputs are read (llama3-np
generate --json, transformers, vLLM, llama.cpp's server)."""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from llama3_np.formats.checkpoint import load_checkpoint
from llama3_np.model import forward
from llama3_np.errors import Llama3Error
from llama3_np.xcheck import adjudicate as adjudicate_module
from llama3_np.xcheck.adjudicate import adjudicate, first_divergence, read_continuation
from llama3_np.xcheck.dump import read_dump
from tests.xcheck.test_dump import PARITY, assert_one_line_error, default_model, run_cli
from tests.xcheck.test_replay import CorruptedEngine, engine_dump

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
HONEST = json.loads((FIXTURES / "adjudicate" / "honest.json").read_text())
CALIBRATION = json.loads((FIXTURES / "adjudicate" / "calibration.json").read_text())
LOW_PRECISION = json.loads((FIXTURES / "default_model" / "greedy_low_precision.json").read_text())
PROMPTS = {p["name"]: p for p in LOW_PRECISION["prompts"]}
BFLOAT16 = {c["name"]: c["ids"] for c in LOW_PRECISION["producers"]["hf_bf16"]["cases"]}


@pytest.fixture(scope="module")
def default():
    return load_checkpoint(default_model())


def test_the_band_constant_is_the_calibration_s():
    assert adjudicate_module.NOISE_K == CALIBRATION["noise_k"]
    assert adjudicate_module.TOP_N == CALIBRATION["producer"]["top_n"]


DIVERGENT = [c for c in HONEST["cases"] if c["parts_at"] is not None]


@pytest.mark.parametrize("case", DIVERGENT, ids=[c["name"] for c in DIVERGENT])
def test_every_divergence_of_transformers_bfloat16_from_float32_is_a_near_tie(default, case):
    r = adjudicate(default.weights, default.config, PROMPTS[case["name"]]["prompt_ids"], case["float32"],
                   BFLOAT16[case["name"]], "float32", "bfloat16")
    print(f"{case['name']}: parts at {r.position}, float64 margin {r.margin:+.4f}, band {r.band:.4f}: {r.verdict}")
    assert r.position == case["parts_at"]
    assert r.verdict == "near-tie", (f"margin {r.margin:.4f}, band {r.band:.4f}, sigma {r.sigma}")


def test_the_honest_engine_parts_somewhere():
    assert [c["name"] for c in HONEST["cases"]] == list(PROMPTS) and len(PROMPTS) == 20 and len(DIVERGENT) >= 3


def greedy(model, prompt, n, compute="float32", **corruption):
    """n greedy tokens after `prompt`, by llama3_np in `compute` or by a CorruptedEngine."""
    ids = list(prompt)
    for _ in range(n):
        trace = CorruptedEngine(model.config, model.weights, compute=compute, **corruption) if corruption else None
        ids.append(int(np.argmax(forward(model.weights, model.config, ids, trace=trace, compute=compute)[-1])))
    return ids[len(prompt):]


PROMPT = [504, 3575, 282, 4649, 314]  # "The capital of France is"


@pytest.mark.parametrize("corruption", [
    dict(layer=1, stage="q_rope", rope_theta=1000.0),  # rope base 1e3 instead of 1e5 in one layer
    dict(layer=0, stage="attn_norm", eps=1.0),  # eps 1 instead of 1e-5 in one norm
    dict(layer=0, stage="ffn_norm", eps=1.0),
])
def test_a_faulty_engine_s_continuation_is_a_defect(default, corruption):
    faulty = greedy(default, PROMPT, 16, **corruption)
    honest = greedy(default, PROMPT, 16)
    k = first_divergence(faulty, honest)
    assert k is not None, "the fault must change the continuation"
    r = adjudicate(default.weights, default.config, PROMPT, faulty, honest)
    assert r.verdict == "defect" and r.position == k, (r.margin, r.band)


def test_a_faulty_engine_s_dump_names_the_stage_its_error_enters(tmp_path, default):
    corruption = dict(layer=1, stage="q_rope", rope_theta=1000.0)
    faulty = greedy(default, PROMPT, 16, **corruption)
    honest = greedy(default, PROMPT, 16)
    k = first_divergence(faulty, honest)
    path, _ = engine_dump(tmp_path, default, PROMPT + faulty[:k], **corruption)
    r = adjudicate(default.weights, default.config, PROMPT, faulty, honest, dumps={"A": read_dump(path)})
    entry = r.entries["A"]
    assert r.verdict == "defect" and entry.compute == "float32"
    assert {entry.largest.name, entry.first_past.name} <= {"layers.1.q_rope", "layers.1.k_rope"}


def test_a_missing_bfloat16_cast_parts_at_a_near_tie_and_its_dump_names_the_product(tmp_path, default):
    """A bfloat16 engine that leaves layer 12's attn_out unrounded is more precise, not less: it moves
    a margin by less than bfloat16's own noise and so parts from a correct bfloat16 engine only at a
    near-tie (here the second token of the German prompt, where transformers' bfloat16 and float32
    part too). The ruling is rightly a near-tie; the engine's dump, replayed in bfloat16, names the
    product."""
    prompt, shared = PROMPTS["german"]["prompt_ids"], BFLOAT16["german"][:2]
    corruption = dict(layer=12, stage="attn_out", unrounded=True)
    path, _ = engine_dump(tmp_path, default, prompt + shared, "bfloat16", **corruption)
    dump = read_dump(path)
    faulty = int(np.argmax(dump.stage("logits")[-1]))
    honest = int(np.argmax(forward(default.weights, default.config, prompt + shared, compute="bfloat16")[-1]))
    assert faulty != honest
    r = adjudicate(default.weights, default.config, prompt, shared + [faulty], shared + [honest], "bfloat16",
                   "bfloat16", {"A": dump})
    entry = r.entries["A"]
    assert r.position == 2 and r.verdict == "near-tie", (r.margin, r.band)
    assert entry.compute == "bfloat16" and entry.largest.name == entry.first_past.name == "layers.12.attn_out"
    assert entry.past == 1  # every other stage is llama3_np's own bfloat16 arithmetic on the same input


def test_continuations_that_agree_are_ruled_so(default):
    r = adjudicate(default.weights, default.config, PROMPT, [7042, 28], [7042, 28, 260])
    assert r.verdict == "agree" and r.common == 2


def test_the_engines_json_shapes_are_read():
    p, c = [1, 2, 3], [7, 8, 9]
    assert read_continuation(c) == (None, c, "ids")
    assert read_continuation({"prompt_ids": p, "ids": c, "text": "x"}) == (p, c, "llama3-np")
    assert read_continuation({"sequences": [p + c]}, p) == (p, c, "transformers")
    assert read_continuation([p + c], p) == (p, c, "transformers")
    assert read_continuation({"choices": [{"text": "x", "token_ids": c, "prompt_token_ids": p}]}) == (p, c, "vllm")
    assert read_continuation({"content": "x", "tokens": c}) == (None, c, "llama.cpp")
    assert read_continuation({"content": "x", "completion_probabilities": [{"id": i, "logprob": -1.0} for i in c]}) \
        == (None, c, "llama.cpp")
    with pytest.raises(Llama3Error, match="unknown shape"):
        read_continuation({"output": c})
    with pytest.raises(Llama3Error, match="text without token ids"):
        read_continuation({"choices": [{"text": "hello"}]})
    with pytest.raises(Llama3Error, match="does not start with the prompt"):
        read_continuation({"sequences": [[9] + c]}, p)


def test_the_command_reads_files_rules_and_exits_by_verdict(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"prompt_ids": PROMPT, "ids": [7042, 28, 260]}))
    b.write_text(json.dumps({"sequences": [PROMPT + [7042, 30]]}))
    code, out, _ = run_cli(capsys, "adjudicate", a, b)
    # ',' against '(' after "The capital of France is Paris": far outside float32's band, a defect
    assert code == 1 and "part at position 1" in out and out.splitlines()[-1].startswith("verdict: defect"), out
    dump = tmp_path / "a.safetensors"  # A is llama3_np itself: its dump adds no error to its own replay
    assert run_cli(capsys, "dump", "--tokens", ",".join(map(str, PROMPT + [7042])), "-o", dump)[0] == 0
    code, out, _ = run_cli(capsys, "adjudicate", a, b, "--dump-a", dump)
    assert code == 1 and "verdict: defect" in out, out
    assert out.splitlines()[-1].startswith("A's dump replayed in float32: ") and "none past" in out
    code, out, _ = run_cli(capsys, "adjudicate", "--tokens", ",".join(map(str, PROMPT)), "7042,28", "7042,28", "--json")
    assert code == 0 and json.loads(out)["verdict"] == "agree"
    # --compute is both engines' mode unless --compute-a/-b say otherwise; llamacpp's weights, held
    # as the file's blocks, are replayed in float64 by their exact values
    code, out, _ = run_cli(capsys, "adjudicate", a, b, "--compute", "llamacpp", "--compute-b", "float32", "--json")
    ruling = json.loads(out)
    assert (ruling["compute_a"], ruling["compute_b"]) == ("llamacpp", "float32") and code == (ruling["verdict"] == "defect"), out


@pytest.mark.parametrize("args,content,fragment", [
    (["--tokens", "504,3575", "1,2", "1,999999"], None, "outside the vocabulary"),
    (["--tokens", "504,3575", "1,2", ""], None, "empty"),
    (["--tokens", "504,3575", "1,2", "FILE"], '{"output": [1, 2]}', "unknown shape"),
    (["--tokens", "504,3575", "1,2", "FILE"], '{"prompt_ids": [9, 9], "ids": [1, 2]}', "other prompt"),
    (["1,2", "1,3"], None, "give the prompt"),
    (["--tokens", "504", "1,2", "nothing-here"], None, "neither comma-separated token ids nor a JSON file"),
    (["--tokens", "504,3575", "1,2", "1,3", "--dump-a", PARITY / "llama3_1" / "hf_prompt.safetensors"], None,
     "other tokens than the common prefix"),
    (["--tokens", "504,3575", "1,2", "1,2", "--dump-b", PARITY / "llama3_1" / "hf_prompt.safetensors"], None,
     "do not part"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, content, fragment):
    if content is not None:
        (tmp_path / "b.json").write_text(content)
    args = [str(tmp_path / "b.json") if a == "FILE" else str(a) for a in args]
    code, out, err = run_cli(capsys, "adjudicate", *args)
    assert_one_line_error(code, err, fragment)


def test_the_readme_s_example_prints_what_the_readme_shows(tmp_path, capsys, monkeypatch):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("\n## Ruling on a divergence\n"):]
    commands, shown = re.search(r"```sh\n(.*?)```\n```\n(.*?)```", section, re.S).groups()
    monkeypatch.chdir(tmp_path)
    for line in commands.strip().splitlines():
        args = shlex.split(line.removeprefix(".venv/bin/llama3-np "))
        target = args[args.index(">") + 1] if ">" in args else None
        code, out, _ = run_cli(capsys, *(args[:args.index(">")] if target else args))
        assert code == 0, line
        if target:
            Path(target).write_text(out)
    # The bfloat16 run parts from the float32 one at a near-tie, whose place depends on the CPU's
    # float32 sum order (OpenBLAS kernels differ between CPUs): the words and the verdict are held
    # everywhere, the tokens and numbers only where the README was written.
    def shape(text):
        return re.sub(r"'[^']*'|[-+]?\d+(\.\d+)?(e[-+]?\d+)?", "#", text)
    assert shape(out) == shape(shown), out
    assert out.splitlines()[-1].startswith("verdict: near-tie"), out
