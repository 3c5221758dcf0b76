"""The lm-eval adapter (`llama3_np.xcheck.harness`) answers lm-eval's requests as lm-eval's own `hf`
model does on the same weights in float32 (tests/fixtures/lm_eval/reference.json, written by
tools/make_lm_eval_fixtures.py): the local tasks of tests/fixtures/lm_eval/tasks (multiple
choice, rolling perplexity, generation; JSONL files, no hub) on the default model.

lm-eval itself imports no torch, but it is an optional extra: the adapter's methods are run here
on stand-ins for lm-eval's `Instance` (the `args` it reads), always; the `lm_eval.simple_evaluate`
run (the registered model, lm-eval's task scores) runs only where lm-eval is installed
(`pip install -e '.[test,eval]'`) and is skipped otherwise."""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from llama3_np.errors import Llama3Error, ParameterError
from llama3_np.load import load_model
from llama3_np.xcheck.harness import ReferenceLM, lm_eval_model, rolling_windows
from llama3_np.xcheck.score import encode_pair
from tests.xcheck.test_dump import default_model

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "lm_eval"
REFERENCE = json.loads((FIXTURES / "reference.json").read_text())
TASKS = REFERENCE["tasks"]
# lm-eval reads the task's JSONL files through `datasets`, which must not look for them online.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Absolute difference of a request's loglikelihood from lm-eval's hf model, per scored token.
# lm-eval sums transformers' float32 log-softmax in float32; llama3_np's logprobs are float64 of
# its float32 logits, which differ from transformers' by the order of float32 sums: the per-token
# bound of tests/xcheck/test_score.py on this model (1e-4; measured 5.4e-5). Measured here by
# tools/make_lm_eval_fixtures.py (`llama3_np_measured` in the fixture): 3.0e-5 on a loglikelihood
# request, 9.5e-4 on the longest document of the rolling task (a sum of -337).
TOL_PER_TOKEN = 1e-4
# Perplexities are exp of a sum over a task's words or bytes: relative error at most the
# per-token tolerance times tokens per word (about 1.5 here).
TOL_PERPLEXITY = 1e-4

@dataclass
class Request:
    """What the adapter reads of lm-eval's `Instance`."""
    args: tuple


@pytest.fixture(scope="module")
def lm():
    return ReferenceLM(model=load_model(default_model()), max_length=REFERENCE["max_length"])


def requests(task):
    return [Request(tuple(r["args"])) for r in TASKS[task]["requests"]]


def test_loglikelihood_equals_lm_eval_hf_model(lm):
    reference = TASKS["llama3_np_mc"]["requests"]
    got = lm.loglikelihood(requests("llama3_np_mc"))
    tokens = [len(encode_pair(lm.tokenizer, *r["args"])[1]) for r in reference]
    errors = [abs(g[0] - r["resp"][0]) / n for g, r, n in zip(got, reference, tokens)]
    assert max(errors) <= TOL_PER_TOKEN, f"largest loglikelihood difference per token {max(errors):.3g}"
    assert [g[1] for g in got] == [r["resp"][1] for r in reference]


def test_loglikelihood_rolling_equals_lm_eval_hf_model(lm):
    reference = TASKS["llama3_np_rolling"]["requests"]
    got = lm.loglikelihood_rolling(requests("llama3_np_rolling"))
    tokens = [len(lm.tokenizer.encode(r["args"][0])) for r in reference]
    assert min(tokens) < REFERENCE["max_length"] < max(tokens), "one window for some documents, several for others"
    errors = [abs(g - r["resp"]) / n for g, r, n in zip(got, reference, tokens)]
    assert max(errors) <= TOL_PER_TOKEN, f"largest rolling loglikelihood difference per token {max(errors):.3g}"


def test_generate_until_equals_lm_eval_hf_model(lm):
    reference = TASKS["llama3_np_gen"]["requests"]
    assert lm.generate_until(requests("llama3_np_gen")) == [r["resp"] for r in reference]


@given(st.integers(0, 40), st.integers(1, 12))
def test_rolling_windows_score_every_token_once_with_the_longest_context(n, max_length):
    ids = list(range(100, 100 + n))
    windows = list(rolling_windows(ids, 7, max_length))
    assert [t for _, continuation in windows for t in continuation] == ids
    for i, (context, continuation) in enumerate(windows):
        assert len(context) + len(continuation) <= max_length + 1
        before = [7] + ids[:ids.index(continuation[0])]
        assert context == before[-len(context):]  # the tokens just before, from the prefix on
        if i:  # a later window sees max_length tokens before its last one
            assert len(context) + len(continuation) - 1 == max_length


def test_rolling_windows_are_lm_evals():
    pytest.importorskip("lm_eval", reason="lm-eval (the eval extra) is not installed")
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n in range(0, 30):
        for max_length in range(1, 12):
            ids = list(range(100, 100 + n))
            theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, 7, max_length, 1)]
            assert list(rolling_windows(ids, 7, max_length)) == [(list(a), list(b)) for a, b in theirs], (n, max_length)


def test_simple_evaluate_scores_the_local_tasks_as_the_hf_model(monkeypatch):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval (the eval extra) is not installed")
    from lm_eval.tasks import TaskManager

    lm_eval_model()
    monkeypatch.chdir(REPO)  # the task YAMLs name their JSONL files from the repository's root
    results = lm_eval.simple_evaluate(
        model="llama3_np", model_args=f"max_length={REFERENCE['max_length']}",  # no pretrained: the default model
        tasks=list(TASKS), task_manager=TaskManager(include_path=str(FIXTURES / "tasks")),
        random_seed=0, numpy_random_seed=0, torch_random_seed=None, fewshot_random_seed=0)
    for task, reference in TASKS.items():
        got = {k.split(",")[0]: v for k, v in results["results"][task].items() if k.split(",")[0] in reference["scores"]}
        for metric, want in reference["scores"].items():
            tol = TOL_PERPLEXITY * abs(want) if task == "llama3_np_rolling" else 0
            assert abs(got[metric] - want) <= tol, f"{task} {metric}: {got[metric]} against hf's {want}"


def test_the_eval_extra_needs_no_torch():
    """lm-eval requires no torch (its `hf` model is an extra of its own), so the eval extra adds
    none. (Where transformers is installed, as beside the tools, lm-eval's `evaluate` imports it,
    and torch with it; nothing of llama3_np's adapter does.)"""
    pytest.importorskip("lm_eval", reason="lm-eval (the eval extra) is not installed")
    from importlib import metadata

    required = [r for r in metadata.requires("lm-eval") or [] if "extra ==" not in r]
    assert required and not [r for r in required if r.split()[0].split(";")[0].startswith(("torch", "transformers"))]


def test_bad_model_args_are_one_clear_error(lm):
    with pytest.raises(Llama3Error, match="does not exist"):
        ReferenceLM(pretrained="no/such/folder")
    with pytest.raises(Llama3Error, match="config.json|params.json|checkpoint"):
        ReferenceLM(pretrained=str(FIXTURES / "tasks"))
    with pytest.raises(ParameterError, match="compute") as e:
        ReferenceLM(pretrained=str(default_model()), compute="float8")
    assert e.value.parameter == "compute"
    with pytest.raises(Llama3Error, match="max_length must be in 1..8191"):
        ReferenceLM(model=lm.model, max_length=8192)
    with pytest.raises(Llama3Error, match="gen_kwargs num_beams are not known"):
        lm.generate_until([Request(("Question:", {"until": ["\n"], "num_beams": 4}))])
    with pytest.raises(Llama3Error, match="max_gen_toks 64 must be in 1..63"):
        lm.generate_until([Request(("Question:", {"max_gen_toks": 64}))])
    with pytest.raises(Llama3Error, match="continuation is empty"):
        lm.loglikelihood([Request(("Question:", ""))])


def test_bad_model_args_through_lm_eval_are_one_line_and_exit_2(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval (the eval extra) is not installed")
    import subprocess

    run = subprocess.run([sys.executable, "-m", "llama3_np.xcheck.harness", "--model", "llama3_np", "--model_args",
                          "pretrained=no/such/folder", "--tasks", "llama3_np_mc", "--include_path",
                          str(FIXTURES / "tasks"), "--output_path", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("llama3_np: pretrained=no/such/folder does not exist")
    assert "Traceback" not in run.stderr


def test_without_lm_eval_registering_the_model_says_what_to_install(monkeypatch):
    import llama3_np.xcheck.harness as harness

    monkeypatch.setattr(harness, "_REGISTERED", None)
    for module in ("lm_eval", "lm_eval.models", "lm_eval.api.model", "lm_eval.api.registry"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(Llama3Error, match=r"lm-eval is not installed: pip install 'llama3_np\[eval\]'"):
        harness.lm_eval_model()
