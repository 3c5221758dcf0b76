#!/usr/bin/env python3
"""Write tests/fixtures/lm_eval/reference.json: lm-eval's own `hf` model on the local tasks, which
llama3_np's lm-eval adapter (`llama3_np.xcheck.harness`) is held to.

    python tools/fetch_default_model.py && python tools/make_lm_eval_fixtures.py

(needs `make tools` and lm-eval: `pip install lm-eval torch==2.13.0`). Runs
`lm_eval.simple_evaluate` twice on the three tasks of tests/fixtures/lm_eval/tasks (a JSONL file
each, no hub: HF_DATASETS_OFFLINE and HF_HUB_OFFLINE are set), on the default model
(SmolLM2-135M-Instruct's Q4_1 GGUF):

    hf          lm-eval's HFLM, dtype float32, batch size 1, on the CPU, on a temporary Hugging Face
                folder of the GGUF's exact dequantized values in float32
                (`llama3_np.formats.gguf_to_hf.import_gguf`, as tools/make_default_model_reference.py)
    llama3_np   the adapter on the GGUF file itself, compute float32

both with max_length 64, so that the longer documents of the rolling task take several windows.
The file keeps, per task, every request's arguments and hf's answers (loglikelihood and
is_greedy, the rolling loglikelihood, the generated text), hf's task scores, and what this run
measured of llama3_np against them (the largest difference of a loglikelihood, and the scores),
from which tests/xcheck/test_harness.py takes its tolerances.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from llama3_np.assets import default_model  # noqa: E402
from llama3_np.formats.gguf_to_hf import import_gguf  # noqa: E402
from llama3_np.files import write_text  # noqa: E402
from llama3_np.xcheck.harness import lm_eval_model  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "lm_eval"
OUT = FIXTURES / "reference.json"
TASKS = ["llama3_np_mc", "llama3_np_rolling", "llama3_np_gen"]
MAX_LENGTH = 64


def evaluate(model: str, model_args: str, **extra) -> dict:
    # The task YAMLs name their data relative to the repository's root.
    os.chdir(REPO)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS, log_samples=True,
                                   task_manager=TaskManager(include_path=str(FIXTURES / "tasks")),
                                   random_seed=0, numpy_random_seed=0, fewshot_random_seed=0, **extra)


def answers(samples: list[dict]) -> list[dict]:
    """Each request of a task's samples (ordered by document and request): its arguments and
    its answer."""
    out = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        args = sample["arguments"]
        args = [list(a.values()) for a in args.values()] if isinstance(args, dict) else [list(a) for a in args]
        for arg, resp in zip(args, sample["resps"]):
            out.append({"doc_id": sample["doc_id"], "args": arg, "resp": resp[0]})
    return out


def scores(results: dict, task: str) -> dict:
    return {k.split(",")[0]: v for k, v in results["results"][task].items()
            if k != "alias" and "stderr" not in k and isinstance(v, (int, float))}


def main() -> int:
    model = default_model()
    with tempfile.TemporaryDirectory() as tmp:
        folder = import_gguf(model, Path(tmp) / "default")
        hf = evaluate("hf", f"pretrained={folder},dtype=float32,max_length={MAX_LENGTH}", batch_size=1,
                      device="cpu", torch_random_seed=0)
    lm_eval_model()
    ours = evaluate("llama3_np", f"pretrained={model},compute=float32,max_length={MAX_LENGTH}",
                    torch_random_seed=None)
    out = {"model": "default", "max_length": MAX_LENGTH,
           "versions": {p: metadata.version(p) for p in ("lm_eval", "torch", "transformers", "datasets")},
           "tasks": {}}
    for task in TASKS:
        theirs, mine = answers(hf["samples"][task]), answers(ours["samples"][task])
        assert [a["args"] for a in theirs] == [a["args"] for a in mine], f"{task}: the requests differ"
        measured = {"scores": scores(ours, task)}
        if task == "llama3_np_gen":
            measured["texts_equal"] = sum(a["resp"] == b["resp"] for a, b in zip(theirs, mine))
        else:
            value = (lambda r: r[0]) if task == "llama3_np_mc" else (lambda r: r)
            measured["max_abs_loglikelihood"] = max(abs(value(a["resp"]) - value(b["resp"]))
                                                    for a, b in zip(theirs, mine))
            if task == "llama3_np_mc":
                measured["is_greedy_equal"] = sum(a["resp"][1] == b["resp"][1] for a, b in zip(theirs, mine))
        out["tasks"][task] = {"requests": theirs, "scores": scores(hf, task), "llama3_np_measured": measured}
        print(task, json.dumps(out["tasks"][task]["scores"]), json.dumps(measured), file=sys.stderr)
    write_text(OUT, json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("make_lm_eval_fixtures", main))
