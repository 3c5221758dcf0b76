"""The noise floor of `llama3-np compare`: how far llama3_np and Hugging Face transformers, both in
float32, differ at each kind of stage on ordinary prompts, and whether the default tolerance holds.

    PYTHONPATH=$PWD python tools/calibrate_compare.py [-m weights/default-exact] [--prompts FILE] [-o JSON]

Each prompt of tests/fixtures/xcheck/calibration_prompts.json (text, code, several languages, 1 to
512 tokens) is tokenized by llama3_np's tokenizer and run from position 0 through
`LlamaForCausalLM` (tools/torch_reference.py: float32, eager attention, one thread) and through
llama3_np's forward pass (float32 residency); every stage is measured by `compare`'s own
`compare_stages`. Stages are grouped by kind (`q_rope` of every layer is one kind). The JSON keeps,
per kind, the worst and the median NMSE over all prompts and layers, with where the worst was;
the prompts' token counts; the producers' versions and the CPU features NumPy dispatched to. It
also measures the smallest known real fault, Meta's reference with its shipped rope factor 8 on a
factor-32 model (the committed tests/fixtures/parity/llama3_2/meta8_prompt.safetensors against
hf_prompt.safetensors), so that the JSON shows both ends of the range the default must sit in.

Rounding noise depends on the float32 kernels, which differ between CPUs: the same prompt gives
NMSE 8e-12 with one OpenBLAS sgemm and 2e-10 with another. So each prompt is run four times, in
child processes whose environment selects kernels that every x86-64 CPU can execute (`DISPATCHES`),
and the JSON keeps the worst over all of them.

The last line says whether every prompt passes at `compare`'s default tolerance (exit status 1
if not). Needs the tools extra (`make tools`); takes about five minutes on an idle two-core machine.

    python tools/calibrate_compare.py --compute bfloat16|float16

calibrates the default for dumps computed in that dtype (compare_calibration_<dtype>.json): the
same prompts through `LlamaForCausalLM` in that dtype, against llama3_np in that compute mode
(transformers' casts) and in float32, and the tiny checkpoints' committed files of transformers in
that dtype (tests/fixtures/parity/, positions 0..15 and 24571..); per stage kind, the noise is the
worst of both (a dump of either kind compares against a bfloat16 one at bfloat16's default), the
proposed default ten times it, rounded up to one digit (exit status 1 unless `compare` uses it). Against the same outputs it measures the two smallest known
faults in that mode: an RMSNorm eps of 1e-6 instead of 1e-5 (default model), and the rope factor 8
of Meta's code on the factor-32 checkpoint llama3_2. Native kernels only: a bfloat16 or float16
result moves only where a float32 sum crosses a rounding boundary of the dtype, which the prompts
sample.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

from llama3_np import __version__  # noqa: E402
from llama3_np.formats.checkpoint import load_checkpoint  # noqa: E402
from llama3_np.errors import Llama3Error  # noqa: E402
from llama3_np.model import forward  # noqa: E402
from llama3_np.stages import Trace  # noqa: E402
from llama3_np.xcheck.compare import (DEFAULT_NMSE_TOL, KIND_NMSE_TOLS, STAGE_KINDS, compare_dumps,  # noqa: E402
                                      compare_stages, stage_kind)
from llama3_np.xcheck.dump import read_dump  # noqa: E402
from llama3_np.load import load_tokenizer  # noqa: E402
from make_perplexity_reference import model_name  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"
DEFAULT_PROMPTS = FIXTURES / "xcheck" / "calibration_prompts.json"
DEFAULT_OUT = FIXTURES / "xcheck" / "compare_calibration.json"
KNOWN_FAULT = (FIXTURES / "parity" / "llama3_2" / "meta8_prompt.safetensors",
               FIXTURES / "parity" / "llama3_2" / "hf_prompt.safetensors")


# The float32 kernels that llama3_np's results depend on (OpenBLAS's sgemm for every product,
# NumPy's exp/cos/sin for silu, softmax and rope) differ between CPUs; each is re-run under
# kernels that every x86-64 CPU can execute, so that one machine samples the noise of several.
DISPATCHES = {
    "native": {},
    "openblas Sandybridge (AVX)": {"OPENBLAS_CORETYPE": "Sandybridge"},
    "openblas Nehalem (SSE)": {"OPENBLAS_CORETYPE": "Nehalem"},
    "numpy baseline": {"NPY_DISABLE_CPU_FEATURES": None},  # every dispatched target this CPU has
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default=str(REPO / "weights" / "default-exact"), metavar="DIR",
                   help="Hugging Face checkpoint folder (default: the default model)")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), metavar="FILE")
    p.add_argument("-o", "--output", default=str(DEFAULT_OUT), metavar="JSON")
    p.add_argument("--compute", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="calibrate the default of dumps computed in this dtype (default float32)")
    p.add_argument("--dispatch", choices=list(DISPATCHES), help=argparse.SUPPRESS)  # one child run
    return p.parse_args(argv)


def prompt_ids(prompts_file: Path, encode) -> list[tuple[str, list[int]]]:
    """(name, token ids) of each prompt: its `text`, or the first `first_tokens` ids of `file`
    (a path beside the prompts file)."""
    out = []
    for p in json.loads(prompts_file.read_text(encoding="utf-8"))["prompts"]:
        if "text" in p:
            ids = encode(p["text"])
        else:
            ids = encode((prompts_file.parent / p["file"]).read_text(encoding="utf-8"))[:p["first_tokens"]]
        out.append((p["name"], ids))
    return out


def numpy_targets() -> list[str]:
    """The SIMD targets NumPy dispatches to on this CPU (beyond its compiled baseline)."""
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    return [t for t in __cpu_dispatch__ if __cpu_features__.get(t)]


def dispatch_env(name: str) -> dict[str, str]:
    env = dict(DISPATCHES[name])
    if "NPY_DISABLE_CPU_FEATURES" in env:
        env["NPY_DISABLE_CPU_FEATURES"] = " ".join(numpy_targets())
    return env


def measure(checkpoint: Path, prompts_file: Path) -> dict:
    """One run under this process's kernels: {"versions", "prompts": [{name, tokens, nmse: {stage: NMSE}}]}."""
    ours = load_checkpoint(checkpoint)  # float32 residency, as `llama3-np dump` runs by default
    prompts = prompt_ids(prompts_file, load_tokenizer(checkpoint).encode)
    import torch
    import torch_reference as ref
    ref.deterministic_torch()
    transformers = ref.transformers_module()
    transformers.utils.logging.disable_progress_bar()
    hf = ref.load_hf(checkpoint, torch.float32)
    out = []
    for name, ids in prompts:
        trace = Trace()
        forward(ours.weights, ours.config, ids, trace=trace)
        errors = compare_stages(trace, ref.hf_run(hf, ids, 0))
        del trace
        out.append({"name": name, "tokens": len(ids), "nmse": {s.name: s.nmse for s in errors}})
    versions = {"llama3_np": __version__, "numpy": np.__version__,
                "numpy_cpu": " ".join(numpy_targets()) or "baseline", "torch": torch.__version__,
                "transformers": transformers.__version__, "python": platform.python_version()}
    return {"versions": versions, "prompts": out}


def run_dispatch(name: str, args, raw: Path) -> dict:
    """`measure` in a child process whose environment selects the kernels of dispatch `name`."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", **dispatch_env(name))
    cmd = [sys.executable, __file__, "--dispatch", name, "-m", args.model, "--prompts", args.prompts,
           "-o", str(raw)]
    subprocess.run(cmd, env=env, check=True)
    return json.loads(raw.read_text())


def merge(runs: dict[str, dict]) -> tuple[list[dict], dict[str, list[tuple[float, str]]]]:
    """Per prompt, its worst stage over every dispatch and whether it passes at the default; per
    stage kind, (NMSE, where) of every stage of every prompt under every dispatch."""
    prompts: dict[str, dict] = {}
    noise: dict[str, list[tuple[float, str]]] = {}
    for dispatch, run in runs.items():
        for p in run["prompts"]:
            row = prompts.setdefault(p["name"], {"name": p["name"], "tokens": p["tokens"],
                                                 "worst_nmse": -1.0, "passes": True})
            worst_stage = max(p["nmse"], key=p["nmse"].get)
            if p["nmse"][worst_stage] > row["worst_nmse"]:
                row.update(worst_nmse=p["nmse"][worst_stage], worst_stage=worst_stage, worst_dispatch=dispatch)
            row["passes"] = row["passes"] and all(v <= DEFAULT_NMSE_TOL for v in p["nmse"].values())
            for name, v in p["nmse"].items():
                noise.setdefault(stage_kind(name), []).append((v, f"{dispatch}, {p['name']}, {name}"))
    return list(prompts.values()), noise


def known_fault() -> dict[str, float]:
    """The largest NMSE per stage kind of Meta's shipped rope factor 8 on a factor-32 model."""
    fault: dict[str, float] = {}
    for s in compare_dumps(*KNOWN_FAULT).stages:
        fault[stage_kind(s.name)] = max(fault.get(stage_kind(s.name), 0.0), s.nmse)
    return fault


def main(argv=None) -> int:
    args = parse_args(argv)
    checkpoint = Path(args.model)
    if not (checkpoint / "config.json").is_file():
        raise Llama3Error(f"{checkpoint}: no config.json; pass a Hugging Face checkpoint folder")
    if args.compute != "float32":
        return calibrate_mode(args)
    if args.dispatch is not None:
        Path(args.output).write_text(json.dumps(measure(checkpoint, Path(args.prompts))))
        return 0

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dispatch in DISPATCHES:
            print(f"llama3_np with {dispatch} kernels against transformers ...", flush=True)
            runs[dispatch] = run_dispatch(dispatch, args, Path(tmp) / "raw.json")
    prompts, noise = merge(runs)
    print(f"\n{'prompt':<20} {'tokens':>6}  {'worst NMSE':>10}  stage (kernels)")
    for row in prompts:
        print(f"{row['name']:<20} {row['tokens']:6d}  {row['worst_nmse']:10.2e}  {row['worst_stage']} "
              f"({row['worst_dispatch']}){'' if row['passes'] else '  PAST THE DEFAULT'}")

    fault, kinds = known_fault(), {}
    tol = DEFAULT_NMSE_TOL
    print(f"\n{'stage kind':<11} {'median':>9} {'worst':>9}  {'default':>7}/worst  {'fault':>8}  worst at")
    for kind in STAGE_KINDS:
        worst, where = max(noise[kind])
        kinds[kind] = {"worst": worst, "worst_at": where, "median": statistics.median(v for v, _ in noise[kind]),
                       "stages": len(noise[kind]), "known_fault": fault.get(kind) or None}
        margin = f"{tol / worst:12.0f}x" if worst > 0 else f"{'exact':>13}"
        print(f"{kind:<11} {kinds[kind]['median']:9.2e} {worst:9.2e}  {margin}  {fault.get(kind, 0.0):8.2e}  {where}")

    result = {
        "about": "NMSE of llama3_np against Hugging Face transformers, both float32, per stage kind over "
                 "the prompts of calibration_prompts.json and the kernels of `dispatches` "
                 "(tools/calibrate_compare.py); known_fault: the largest NMSE per kind of Meta's shipped "
                 "rope factor 8 on a factor-32 model (parity/llama3_2/meta8_prompt against hf_prompt)",
        "model": model_name(checkpoint),
        "producers": runs["native"]["versions"],
        "dispatches": {name: dispatch_env(name) for name in DISPATCHES},
        "default_nmse_tol": tol,
        "every_prompt_passes": all(row["passes"] for row in prompts),
        "stage_kinds": kinds,
        "prompts": prompts,
    }
    Path(args.output).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    passes = result["every_prompt_passes"]
    print(f"wrote {args.output}\n{'every one' if passes else 'NOT every one'} of the {len(prompts)} prompts "
          f"passes at compare's default tolerance, NMSE {tol:.0e}")
    return 0 if result["every_prompt_passes"] else 1


# ---------------------------------------------------------------------------------------------
# bfloat16 and float16: llama3_np's compute modes against transformers in that dtype

PARITY = FIXTURES / "parity"
PARITY_FILES = {"bfloat16": "hf_bf16", "float16": "hf_fp16"}  # transformers' files of the tiny checkpoints
EPS_FAULT = 1e-6  # an RMSNorm eps of 1e-6 where the model says 1e-5 (Llama 2's value)
ROPE_FAULT = 8.0  # Meta's hard-coded rope factor on a factor-32 model


def stages_in_mode(weights, config, ids, mode, pos=0, context=(), context_pos=0) -> Trace:
    from llama3_np.model import KVCache
    cache = KVCache(config, len(context) + len(ids), mode)
    if context:
        forward(weights, config, list(context), cache, pos=context_pos)
    trace = Trace()
    forward(weights, config, ids, cache, pos=pos, trace=trace)
    return trace


def worst_per_kind(rows: list[tuple[str, dict[str, float]]]) -> dict[str, dict]:
    """{kind: {worst, worst_at, median}} over rows of (where, {stage: NMSE})."""
    per: dict[str, list[tuple[float, str]]] = {}
    for where, errors in rows:
        for name, v in errors.items():
            per.setdefault(stage_kind(name), []).append((v, f"{where}, {name}"))
    out = {}
    for kind in STAGE_KINDS:
        if kind in per:
            worst, at = max(per[kind])
            out[kind] = {"worst": worst, "worst_at": at, "median": statistics.median(v for v, _ in per[kind])}
    return out


def nmse_of(trace, ref) -> dict[str, float]:
    return {s.name: s.nmse for s in compare_stages(trace, ref)}


def measure_mode(checkpoint: Path, prompts_file: Path, dtype: str) -> dict:
    """llama3_np in compute mode `dtype` (transformers' casts) and in float32 against transformers in
    `dtype`: on the default model over the calibration prompts, and on the tiny checkpoints' committed
    files; the two faults in that mode against the same outputs."""
    import dataclasses
    import torch
    import torch_reference as ref
    from llama3_np.config import ComputeMode
    from llama3_np.linear import mode_weights
    ref.deterministic_torch()
    transformers = ref.transformers_module()
    transformers.utils.logging.disable_progress_bar()
    mode = ComputeMode(dtype)
    ours = load_checkpoint(checkpoint, dtype="bfloat16")
    weights = mode_weights(ours.weights, mode)
    bad_eps = dataclasses.replace(ours.config, norm_eps=EPS_FAULT)
    hf = ref.load_hf(checkpoint, {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
    same, cross, eps, prompts = [], [], [], []
    for name, ids in prompt_ids(prompts_file, load_tokenizer(checkpoint).encode):
        theirs = hf_stages = ref.hf_run(hf, ids, 0)
        same.append((name, nmse_of(stages_in_mode(weights, ours.config, ids, mode), theirs)))
        cross.append((name, nmse_of(stages_in_mode(ours.weights, ours.config, ids, ComputeMode()), theirs)))
        eps.append((name, nmse_of(stages_in_mode(weights, bad_eps, ids, mode), hf_stages)))
        prompts.append({"name": name, "tokens": len(ids), "worst_nmse": max(same[-1][1].values())})
        print(f"  {name}: {len(ids)} tokens, worst stage {prompts[-1]['worst_nmse']:.2e}", flush=True)
    rope = []
    for cfg in ("llama3_0", "llama3_1", "llama3_2"):
        tiny = load_checkpoint(PARITY / cfg, dtype="bfloat16")
        for case in ("prompt", "far", "far_decode"):
            d = read_dump(PARITY / cfg / f"{PARITY_FILES[dtype]}_{case}.safetensors")
            meta = d.metadata
            args = (json.loads(meta["tokens"]), int(meta["pos"]), json.loads(meta["context_tokens"]),
                    int(meta["context_pos"]))
            theirs = {n: d.stage(n) for n in d.names}
            where = f"{cfg} {case}"
            same.append((where, nmse_of(stages_in_mode(tiny.weights, tiny.config, *args[:1], mode, *args[1:]), theirs)))
            cross.append((where, nmse_of(stages_in_mode(tiny.weights, tiny.config, *args[:1], ComputeMode(), *args[1:]), theirs)))
            if cfg == "llama3_2":
                faulty = dataclasses.replace(tiny.config, rope_scaling=dataclasses.replace(
                    tiny.config.rope_scaling, factor=ROPE_FAULT))
                rope.append((where, nmse_of(stages_in_mode(tiny.weights, faulty, *args[:1], mode, *args[1:]), theirs)))
    versions = {"llama3_np": __version__, "numpy": np.__version__, "numpy_cpu": " ".join(numpy_targets()) or "baseline",
                "torch": torch.__version__, "transformers": transformers.__version__}
    return {"versions": versions, "prompts": prompts, "same": worst_per_kind(same), "cross": worst_per_kind(cross),
            "eps_fault": worst_per_kind(eps), "rope_fault": worst_per_kind(rope)}


def one_digit_up(x: float) -> float:
    """x rounded up to one significant digit: 2.3e-4 -> 3e-4 (0 stays 0)."""
    if x == 0:
        return 0.0
    e = math.floor(math.log10(x))
    digit = math.ceil(x / 10 ** e - 1e-9)
    return float(f"{digit}e{e}") if digit < 10 else float(f"1e{e + 1}")


def summarize(m: dict, dtype: str, model: str) -> dict:
    """The JSON of a calibration in `dtype`: the measurements `m` (`measure_mode`), the default per
    stage kind they give (ten times the worst of `same` and `cross`, rounded up to one digit), and
    at which kinds each fault passes it."""
    tols = {k: one_digit_up(10 * max(m["same"][k]["worst"], m["cross"][k]["worst"])) for k in m["same"]}
    caught = {f: [k for k, v in m[f].items() if v["worst"] > tols[k]] for f in ("eps_fault", "rope_fault")}
    return {
        "about": f"NMSE per stage kind of llama3_np in compute mode {dtype} (`same`) and in float32 (`cross`) "
                 f"against transformers in {dtype}, over calibration_prompts.json on the default model and the "
                 "tiny checkpoints' committed files; eps_fault: llama3_np in that mode with RMSNorm eps 1e-6 "
                 "against the same outputs (default model); rope_fault: with rope factor 8 on llama3_2 "
                 "(factor 32) against its files (tools/calibrate_compare.py --compute)",
        "model": model, "producers": m["versions"], "compute": dtype,
        "proposed_nmse_tols": tols, "faults_caught_at_proposed": caught,
        **{k: m[k] for k in ("same", "cross", "eps_fault", "rope_fault", "prompts")},
    }


def calibrate_mode(args) -> int:
    dtype = args.compute
    print(f"llama3_np in {dtype} and in float32 against transformers in {dtype} ...", flush=True)
    m = measure_mode(Path(args.model), Path(args.prompts), dtype)
    result = summarize(m, dtype, model_name(Path(args.model)))
    tols, caught = result["proposed_nmse_tols"], result["faults_caught_at_proposed"]
    print(f"\n{'stage kind':<11} {'mode worst':>10} {'f32 worst':>10} {'default':>8} {'eps fault':>10} {'rope fault':>10}")
    for k in m["same"]:
        print(f"{k:<11} {m['same'][k]['worst']:10.2e} {m['cross'][k]['worst']:10.2e} {tols[k]:8.0e} "
              f"{m['eps_fault'].get(k, {}).get('worst', 0):10.2e} {m['rope_fault'].get(k, {}).get('worst', 0):10.2e}")
    out = Path(args.output) if args.output != str(DEFAULT_OUT) else DEFAULT_OUT.with_name(f"compare_calibration_{dtype}.json")
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out}\ncaught at the proposed defaults: eps fault at {caught['eps_fault'] or 'no stage'}, "
          f"rope fault at {caught['rope_fault'] or 'no stage'}")
    return 0 if tols == KIND_NMSE_TOLS.get(dtype) else 1


if __name__ == "__main__":
    sys.exit(run_tool("calibrate_compare", main, OSError, subprocess.CalledProcessError))
