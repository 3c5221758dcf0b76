"""`llama3-np compare`: the error measures, the first diverging stage named exactly, exit status 1
on divergence and 0 on agreement, a default tolerance that sits between the measured float32 noise
(tests/fixtures/xcheck/compare_calibration.json) and the smallest known real fault, only the
stages past tolerance printed unless --all, a one-line verdict, stages present in one file only
listed, JSON output, dumps of the same weights from different formats compared, and dumps that
cannot be compared refused with one line on stderr and exit status 2."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from llama3_np.formats.checkpoint import load_checkpoint
from llama3_np.stages import Edit, Trace, stage_order
from llama3_np.xcheck.compare import (DEFAULT_NMSE_TOL, KIND_NMSE_TOLS, STAGE_KINDS, compare_dumps, off_dtype,
                                      stage_error, stage_kind)
from llama3_np.xcheck.dump import Inputs, dump_metadata, read_dump, run_forward, write_dump
from tests.checkpoint_builders import write_meta
from tests.helpers import max_rel_err, nmse
from tests.xcheck.test_dump import PARITY, XCHECK, assert_one_line_error, run_cli

REF = PARITY / "llama3_0" / "hf_prompt.safetensors"  # torch reference, 29 stages
META = PARITY / "llama3_0" / "meta_prompt.safetensors"  # the other reference, same tokens
CALIBRATION = XCHECK / "compare_calibration.json"  # tools/calibrate_compare.py
# The smallest real fault known: Meta's reference as shipped (rope factor 8) on a model trained
# with factor 32, against Hugging Face following the config (tests/fixtures/parity/README.md).
FAULT = PARITY / "llama3_2" / "meta8_prompt.safetensors", PARITY / "llama3_2" / "hf_prompt.safetensors"
KNOWN_FAULT_NMSE = 1e-7  # what that fault does to position-0 logits of a Llama 3.2 1B-shaped model


def corrupt_by_nmse(x: np.ndarray, target: float, seed: int = 0) -> np.ndarray:
    """x plus random noise scaled so that NMSE(result, x) is `target` (to float32 rounding)."""
    x64 = np.asarray(x, np.float64)
    noise = np.random.default_rng(seed).normal(size=x.shape)
    noise *= np.sqrt(target * np.sum(x64 ** 2) / np.sum(noise ** 2))
    return (x64 + noise).astype(np.float32)


def copy_with(tmp_path, name: str, change=None, drop=(), metadata=None, source: Path = REF) -> Path:
    """A copy of `source` with stage `name` changed by `change`, stages `drop` removed, metadata edited."""
    ref = read_dump(source)
    stages = {n: np.array(ref.stage(n)) for n in ref.names if n not in drop}
    if change is not None:
        stages[name] = change(stages[name])
    path = tmp_path / "changed.safetensors"
    write_dump(path, stages, dict(ref.metadata, **(metadata or {})))
    return path


def test_the_two_references_agree_and_exit_0_with_a_summary_and_a_verdict(capsys):
    code, out, err = run_cli(capsys, "compare", META, REF)
    assert code == 0, out + err
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"A: {META} (llama-models") and lines[1].startswith(f"B: {REF} (transformers")
    assert len(lines) == 4, out  # no stage past tolerance: no table
    assert lines[2].startswith("29 common stages, 0 past tolerance; largest NMSE ")
    assert lines[2].endswith("; --all lists every stage")
    assert lines[3] == "verdict: agree (29 of 29 common stages within NMSE 3e-09)"


def test_all_lists_every_stage_in_model_order_and_json_keeps_everything(capsys):
    code, out, _ = run_cli(capsys, "compare", META, REF, "--all")
    assert code == 0, out
    lines = out.strip().splitlines()
    assert lines[2].split() == ["stage", "shape", "max", "abs", "max", "rel", "NMSE", "cosine"]
    rows = lines[3:-2]
    names = [r.split()[0] for r in rows]
    assert names == read_dump(REF).names and len(names) == 29
    assert not any("diverges" in r or "<- first divergence" in r for r in rows)
    assert "--all lists" not in lines[-2] and lines[-1].startswith("verdict: agree")
    code, out, _ = run_cli(capsys, "compare", META, REF, "--json")
    d = json.loads(out)
    assert code == 0 and len(d["stages"]) == 29 and d["diverged"] == [] and d["verdict"] == lines[-1]
    assert d["nmse_tol"] == DEFAULT_NMSE_TOL


@pytest.mark.parametrize("source, stage", [
    (REF, "embed"), (REF, "layers.0.k_rope"), (REF, "layers.1.ffn_hidden"), (REF, "logits"),
    (XCHECK / "default_hf.safetensors", "layers.29.ffn_hidden"), (XCHECK / "default_hf.safetensors", "logits"),
])
def test_a_stage_corrupted_by_nmse_1e_6_is_named_exactly_and_exits_1(tmp_path, capsys, source, stage):
    """One stage moved by NMSE 1e-6 (what the smallest known real fault does to the logits of a
    Llama 3.2 1B-shaped model, times ten): that stage, and only it, is past the default tolerance,
    printed alone with the summary and the verdict."""
    bad = copy_with(tmp_path, stage, lambda x: corrupt_by_nmse(x, 1e-6), source=source)
    c = compare_dumps(bad, source)
    n = len(c.stages)
    assert c.first_divergence == stage and c.diverged == [stage]
    assert next(s.nmse for s in c.stages if s.name == stage) == pytest.approx(1e-6, rel=1e-3)
    code, out, _ = run_cli(capsys, "compare", bad, source)
    assert code == 1
    lines = out.strip().splitlines()
    assert lines[-1] == f"verdict: diverge at {stage} (1 of {n} stages past NMSE 3e-09)"
    assert lines[-2].startswith(f"{n} common stages, 1 past tolerance; largest NMSE 1.00e-06 (")
    rows = lines[3:-2]
    assert len(rows) == 1 and rows[0].split()[0] == stage and rows[0].endswith("<- first divergence"), out


def test_first_divergence_is_the_earliest_in_model_order(tmp_path):
    """Model order, not the alphabetical order of the file: q before k, norm before logits."""
    ref = read_dump(REF)
    stages = {n: np.array(ref.stage(n)) for n in ref.names}
    for name in ("logits", "layers.1.k", "norm", "layers.1.q"):
        stages[name] = stages[name] * 1.01
    path = tmp_path / "bad.safetensors"
    write_dump(path, stages, ref.metadata)
    c = compare_dumps(path, REF)
    assert c.diverged == ["layers.1.q", "layers.1.k", "norm", "logits"] and c.first_divergence == "layers.1.q"


def test_measures_match_their_definitions():
    rng = np.random.default_rng(0)
    b = rng.normal(size=(4, 6)).astype(np.float32)
    a = b + rng.normal(scale=1e-3, size=b.shape).astype(np.float32)
    e = stage_error("x", a, b, nmse_tol=1e-10)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert e.nmse == pytest.approx(nmse(a, b), rel=1e-12)
    assert e.max_rel == pytest.approx(max_rel_err(a, b), rel=1e-12)
    assert e.max_abs == pytest.approx(np.max(np.abs(a64 - b64)), rel=1e-12)
    assert e.cosine == pytest.approx(np.dot(a64.ravel(), b64.ravel()) / np.linalg.norm(a64) / np.linalg.norm(b64))
    assert e.diverged and e.shape == (4, 6)
    assert not stage_error("x", a, b, nmse_tol=1e-5).diverged
    assert stage_error("x", a, b, nmse_tol=1e-5, rel_tol=1e-6).diverged  # max rel ~1e-3
    same = stage_error("x", b, b, 0.0)
    assert (same.nmse, same.max_abs, same.cosine, same.diverged) == (0.0, 0.0, 1.0, False)


def test_non_finite_values_diverge_unless_identical_in_both():
    b = np.array([[1.0, -np.inf], [2.0, 3.0]], np.float32)
    same = stage_error("x", b.copy(), b, 1e-10)
    assert not same.diverged and same.nmse == 0.0 and same.shape == (2, 2)
    a = b.copy()
    a[1, 0] = np.nan
    bad = stage_error("x", a, b, 1e-10)
    assert bad.diverged and math.isinf(bad.nmse)


def test_tolerance_flags(tmp_path, capsys):
    """A bfloat16 run against float32: diverges at float32's default, agrees at llama.cpp's 1e-2
    (and at bfloat16's own default, which the dumps' dtypes choose)."""
    bf16 = PARITY / "llama3_0" / "hf_bf16_prompt.safetensors"
    assert run_cli(capsys, "compare", bf16, REF, "--tol", str(DEFAULT_NMSE_TOL))[0] == 1
    assert run_cli(capsys, "compare", bf16, REF)[0] == 0
    code, out, _ = run_cli(capsys, "compare", bf16, REF, "--tol", "1e-2")
    assert code == 0, out
    assert run_cli(capsys, "compare", bf16, REF, "--tol", "1e-2", "--rel-tol", "1e-6")[0] == 1


def test_stages_in_one_file_only_are_listed_not_divergent(tmp_path, capsys):
    path = copy_with(tmp_path, "norm", drop=["layers.1.h", "norm"])
    code, out, _ = run_cli(capsys, "compare", path, REF)
    assert code == 0, out
    assert "only in B (2): layers.1.h, norm" in out
    c = compare_dumps(REF, path)
    assert c.only_in_a == ["layers.1.h", "norm"] and c.only_in_b == [] and len(c.stages) == 27


def test_json_output(tmp_path, capsys):
    bad = copy_with(tmp_path, "layers.0.v", lambda x: x + 1)
    code, out, _ = run_cli(capsys, "compare", bad, REF, "--json")
    assert code == 1
    d = json.loads(out)
    assert d["first_divergence"] == "layers.0.v" and d["diverged"] == ["layers.0.v"]
    assert d["nmse_tol"] == DEFAULT_NMSE_TOL and d["rel_tol"] is None and d["only_in_a"] == d["only_in_b"] == []
    assert d["verdict"] == "verdict: diverge at layers.0.v (1 of 29 stages past NMSE 3e-09)"
    assert d["metadata_differences"] == {}
    row = next(s for s in d["stages"] if s["name"] == "layers.0.v")
    assert row["shape"] == [16, 2, 16] and row["max_abs"] == pytest.approx(1.0, rel=1e-6)
    assert len(d["stages"]) == 29
    assert set(row) == {"name", "shape", "max_abs", "max_rel", "nmse", "cosine", "diverged", "note"}


@pytest.mark.parametrize("metadata, fragment", [
    ({"tokens": "[1, 2, 3]"}, "metadata 'tokens'"),
    ({"pos": "5"}, "metadata 'pos'"),
    ({"context_tokens": "[7]"}, "metadata 'context_tokens'"),
    ({"config": (PARITY / "llama3_1" / "hf_prompt.safetensors")}, "metadata 'config'"),
])
def test_dumps_of_different_inputs_are_refused(tmp_path, capsys, metadata, fragment):
    if "config" in metadata:
        metadata = {"config": read_dump(metadata["config"]).metadata["config"]}
    path = copy_with(tmp_path, "embed", metadata=metadata)
    code, _, err = run_cli(capsys, "compare", path, REF)
    assert_one_line_error(code, err, fragment, "different inputs")


def test_shape_mismatch_and_nothing_in_common_are_refused(tmp_path, capsys):
    path = copy_with(tmp_path, "layers.0.q", lambda x: x.reshape(16, 64))
    code, _, err = run_cli(capsys, "compare", path, REF)
    assert_one_line_error(code, err, "'layers.0.q'", "[16, 64]", "[16, 4, 16]")
    other = tmp_path / "other.safetensors"
    write_dump(other, {"something": np.zeros(3, np.float32)}, {})
    code, _, err = run_cli(capsys, "compare", other, REF)
    assert_one_line_error(code, err, "no stage in common")


def test_missing_and_malformed_files_are_refused(tmp_path, capsys):
    code, _, err = run_cli(capsys, "compare", tmp_path / "missing.safetensors", REF)
    assert_one_line_error(code, err, "missing.safetensors", "does not exist")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    code, _, err = run_cli(capsys, "compare", garbage, REF)
    assert_one_line_error(code, err, "garbage.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(REF.read_bytes()[:-100])
    code, _, err = run_cli(capsys, "compare", truncated, REF)
    assert_one_line_error(code, err, "truncated.safetensors")
    ints = tmp_path / "ints.safetensors"
    from llama3_np.formats.safetensors_file import write_safetensors
    write_safetensors(ints, {"embed": np.zeros((2, 2), np.int32)})
    code, _, err = run_cli(capsys, "compare", ints, REF)
    assert_one_line_error(code, err, "'embed'", "int32")
    code, _, err = run_cli(capsys, "compare", REF, REF, "--tol", "-1")
    assert_one_line_error(code, err, "--tol")
    shutil.copy(REF, tmp_path / "copy.safetensors")
    assert run_cli(capsys, "compare", tmp_path / "copy.safetensors", REF)[0] == 0


# ---------------------------------------------------------------------------------------------
# Where the default tolerance comes from


def test_the_default_tolerance_sits_10x_above_the_measured_noise_and_below_the_known_fault():
    """The committed calibration: llama3_np against Hugging Face float32 on the default model, over
    varied prompts of 1 to 512 tokens and several kernel dispatches (tools/calibrate_compare.py)."""
    cal = json.loads(CALIBRATION.read_text())
    tokens = [p["tokens"] for p in cal["prompts"]]
    assert len(tokens) >= 20 and min(tokens) == 1 and max(tokens) == 512, tokens
    assert set(cal["stage_kinds"]) == set(STAGE_KINDS)
    tol = DEFAULT_NMSE_TOL
    for kind, measured in cal["stage_kinds"].items():
        assert tol >= 10 * measured["worst"], (
            f"{kind}: default {tol:.0e} is not 10x above the noise measured, {measured['worst']:.2e} "
            f"({measured['worst_at']})")
        assert tol < KNOWN_FAULT_NMSE / 10, f"{kind}: default {tol:.0e} would miss the rope-factor fault"
        fault = measured["known_fault"]
        assert fault is None or tol < fault, f"{kind}: default {tol:.0e} >= the fault's {fault:.2e}"
    assert all(stage_kind(f"layers.7.{kind}") == kind for kind in STAGE_KINDS[1:-2])
    assert cal["every_prompt_passes"] and all(p["passes"] for p in cal["prompts"])


def test_the_known_rope_factor_fault_is_caught_at_the_first_stage_it_touches_and_at_the_logits(capsys):
    """Meta's shipped factor 8 against factor 32 (committed dumps of both references), positions 0-15."""
    c = compare_dumps(*FAULT)
    assert c.first_divergence == "layers.0.q_rope" and "logits" in c.diverged
    assert not any(s.diverged for s in c.stages if s.nmse == 0)  # embed .. layers.0.v are untouched
    logits = next(s for s in c.stages if s.name == "logits")
    print(f"rope factor 8 vs 32: logits NMSE {logits.nmse:.2e}, tolerance {DEFAULT_NMSE_TOL:.0e}")
    assert logits.nmse >= 5 * DEFAULT_NMSE_TOL
    code, out, _ = run_cli(capsys, "compare", *FAULT)
    assert code == 1 and out.strip().splitlines()[-1].startswith("verdict: diverge at layers.0.q_rope (")
    assert "metadata that differ (the inputs agree): rope_factor_used 8 vs 32" in out


# ---------------------------------------------------------------------------------------------
# Dumps of the same weights from different formats


def meta_folder_of(hf_folder: Path, folder: Path) -> Path:
    """The weights of a Hugging Face folder written as Meta ships them: consolidated.00.pth in
    Meta's names and layout, the tied output projection stored as a copy of the embeddings (as
    Meta's Llama 3.2 files do), and the folder's params.json."""
    weights = dict(load_checkpoint(hf_folder).weights)
    weights["output.weight"] = np.array(weights["tok_embeddings.weight"])
    return write_meta(folder, weights, params=json.loads((hf_folder / "params.json").read_text()))


def test_hugging_face_and_meta_dumps_of_the_same_weights_compare_and_list_what_differs(tmp_path, capsys):
    hf_folder = PARITY / "llama3_2"  # tied embeddings, rope factor 32
    meta = meta_folder_of(hf_folder, tmp_path / "meta")
    hf_dump, meta_dump = tmp_path / "hf.safetensors", tmp_path / "meta.safetensors"
    code, _, err = run_cli(capsys, "dump", "-m", hf_folder, "--tokens", "5,17,99,3", "-o", hf_dump)
    assert code == 0, err
    # --like accepts the other format's dump and says what it let through.
    code, _, err = run_cli(capsys, "dump", "-m", meta, "--rope-factor", "32", "--like", hf_dump, "-o", meta_dump)
    assert code == 0, err
    assert err.strip() == (f"note: the config recorded in {hf_dump} differs from {meta}'s only in what "
                           "no stage computes: tie_embeddings true vs false"), err
    code, out, err = run_cli(capsys, "compare", meta_dump, hf_dump)
    assert code == 0, out + err
    assert ("metadata that differ (the inputs agree): config.tie_embeddings false vs true; format meta vs hf"
            in out.splitlines())
    assert out.strip().splitlines()[-1] == "verdict: agree (29 of 29 common stages within NMSE 3e-09)"
    c = compare_dumps(meta_dump, hf_dump)
    assert max(s.nmse for s in c.stages) == 0.0  # the same float32 weights, the same arithmetic
    assert c.metadata_differences == {"config.tie_embeddings": ("false", "true"), "format": ("meta", "hf")}


def test_a_config_difference_that_changes_the_math_still_refuses(tmp_path, capsys):
    """The same weights run with rope factor 8 (what Meta's code hard-codes) are a different model
    from the factor-32 dump: --like and compare refuse, naming what differs."""
    meta = meta_folder_of(PARITY / "llama3_2", tmp_path / "meta")
    hf_dump = PARITY / "llama3_2" / "hf_prompt.safetensors"
    code, _, err = run_cli(capsys, "dump", "-m", meta, "--rope-factor", "8", "--like", hf_dump,
                           "-o", tmp_path / "x.safetensors")
    assert_one_line_error(code, err, "different model", "rope_scaling", '"factor": 32.0')
    assert not (tmp_path / "x.safetensors").exists()
    ours = tmp_path / "ours.safetensors"
    code, _, err = run_cli(capsys, "dump", "-m", meta, "--rope-factor", "8", "--tokens", "1,2,3", "-o", ours)
    assert code == 0, err
    config = json.loads(read_dump(ours).metadata["config"])
    for field, value in (("norm_eps", 1e-6), ("ffn_dim", 96), ("rope_theta", 10000.0),
                         ("rope_scaling", dict(config["rope_scaling"], factor=32.0))):
        path = copy_with(tmp_path, "embed", metadata={"config": json.dumps(dict(config, **{field: value})),
                                                     "tokens": "[1, 2, 3]"})
        code, _, err = run_cli(capsys, "compare", path, ours)
        assert_one_line_error(code, err, "different inputs", "metadata 'config'", field)


# ---------------------------------------------------------------------------------------------
# Precisions: dumps computed in bfloat16 or float16


LOW_CALIBRATION = {d: XCHECK / f"compare_calibration_{d}.json" for d in ("bfloat16", "float16")}
ENGINE_FILES = {"bfloat16": "hf_bf16", "float16": "hf_fp16"}  # transformers in that dtype


def mode_dump(tmp_path, reference: Path, compute: str, config=None, name="ours", edits=()) -> Path:
    """llama3_np's dump, in compute mode `compute`, of the computation `reference` records (with
    `config` changed by a fault when given, and `edits` (`stages.Edit`) made to its stages as it
    computes them)."""
    ref = read_dump(reference)
    meta = ref.metadata
    ckpt = load_checkpoint(reference.parent, dtype="bfloat16")
    inputs = Inputs(json.loads(meta["tokens"]), int(meta["pos"]), json.loads(meta["context_tokens"]),
                    int(meta["context_pos"]))
    trace = Trace(edits=list(edits))
    run_forward(ckpt.weights, config or ckpt.config, inputs, trace, compute)
    path = tmp_path / f"{name}.safetensors"
    write_dump(path, dict(trace), dump_metadata(ckpt.config, inputs, compute))
    return path


@pytest.mark.parametrize("dtype", list(LOW_CALIBRATION))
def test_each_precisions_default_is_10x_its_calibrated_noise(dtype):
    """tools/calibrate_compare.py --compute DTYPE: llama3_np in that mode and in float32 against
    transformers in that dtype, on the default model over the calibration prompts and on the tiny
    checkpoints; each stage kind's default is ten times its worst, rounded up to one digit."""
    cal = json.loads(LOW_CALIBRATION[dtype].read_text())
    assert cal["compute"] == dtype and len(cal["prompts"]) >= 20
    assert KIND_NMSE_TOLS[dtype] == cal["proposed_nmse_tols"] and set(KIND_NMSE_TOLS[dtype]) == set(STAGE_KINDS)
    for kind, tol in KIND_NMSE_TOLS[dtype].items():
        for which in ("same", "cross"):
            assert tol >= 10 * cal[which][kind]["worst"], (kind, which, cal[which][kind])


@pytest.mark.parametrize("dtype", list(LOW_CALIBRATION))
def test_each_precisions_default_catches_metas_rope_factor_and_passes_the_right_computation(tmp_path, dtype):
    """Beyond position 20,000 rope factor 8 instead of 32 moves q_rope far past the noise of the
    dtype; the same computation with the right factor agrees with transformers' own output."""
    reference = PARITY / "llama3_2" / f"{ENGINE_FILES[dtype]}_far.safetensors"
    right = compare_dumps(mode_dump(tmp_path, reference, dtype), reference)
    assert not right.diverged and right.kind_tols == KIND_NMSE_TOLS[dtype]
    config = load_checkpoint(reference.parent).config
    faulty = dataclasses.replace(config, rope_scaling=dataclasses.replace(config.rope_scaling, factor=8.0))
    wrong = compare_dumps(mode_dump(tmp_path, reference, dtype, faulty, "faulty"), reference)
    assert wrong.first_divergence == "layers.0.q_rope", [(s.name, s.nmse) for s in wrong.stages[:8]]


@pytest.mark.parametrize("dtype", list(LOW_CALIBRATION))
def test_an_rmsnorm_eps_fault_is_below_the_noise_of_each_low_precision(dtype):
    """eps 1e-6 instead of 1e-5 changes the default model's first norm by NMSE ~1e-6 in these
    dtypes (its embeddings are small), and then its rounding spreads like any other: the calibration
    measures it under the noise of two correct implementations, so no default tolerance can catch
    it in these dtypes (float32's does: its noise is 3e-10). Compare such dumps in float32."""
    cal = json.loads(LOW_CALIBRATION[dtype].read_text())
    assert cal["faults_caught_at_proposed"] == {"eps_fault": [], "rope_fault": ["q_rope", "k_rope"]}
    for kind, tol in KIND_NMSE_TOLS[dtype].items():
        assert cal["eps_fault"][kind]["worst"] <= tol, kind


def test_a_float32_dump_against_a_bfloat16_one_says_so_and_uses_bfloat16s_default(tmp_path, capsys):
    reference = PARITY / "llama3_0" / "hf_bf16_prompt.safetensors"
    ours = mode_dump(tmp_path, reference, "float32")
    c = compare_dumps(ours, reference)
    assert c.kind_tols == KIND_NMSE_TOLS["bfloat16"] and not c.diverged
    assert c.precision_note == (f"A was computed in float32, B in bfloat16: compared at bfloat16's default "
                                f"tolerance per stage kind (q_rope {KIND_NMSE_TOLS['bfloat16']['q_rope']:.0e})")
    code, out, _ = run_cli(capsys, "compare", ours, reference)
    assert code == 0 and c.precision_note in out.splitlines()[2]
    # At float32's default the same pair diverges: the band is what makes the comparison fair.
    assert compare_dumps(ours, reference, DEFAULT_NMSE_TOL).diverged


# Faults injected into a computation in a precision's mode, each named by compare at the stage where
# it happens, while the right computation passes against transformers' output in that dtype.

def test_every_stage_of_the_engines_low_precision_dumps_holds_only_values_of_its_dtype():
    """What the cast check relies on: transformers' and llama-models' bfloat16 and float16 stages
    are tensors of that dtype, so each committed file's stages hold nothing else."""
    files = sorted(PARITY.glob("*/*_bf16_*.safetensors")) + sorted(PARITY.glob("*/*_fp16_*.safetensors"))
    assert len(files) == 27
    for path in files:
        d = read_dump(path)
        assert d.metadata["dtype"] in KIND_NMSE_TOLS
        assert all(off_dtype(d.stage(n), d.metadata["dtype"]) == 0 for n in d.names), path


@pytest.mark.parametrize("dtype", list(LOW_CALIBRATION))
def test_a_missing_cast_is_named_at_its_stage_though_its_nmse_is_inside_the_default(tmp_path, dtype):
    """transformers rounds the residual sum h = x + attn_out to the dtype (LlamaDecoderLayer.forward:
    `residual + hidden_states` on tensors of that dtype). An engine that keeps it in float32 moves h
    by less than one rounding, far inside a default that passes a float32 dump; compare names the
    stage by its values, which are not of the dtype, whatever the tolerance."""
    reference = PARITY / "llama3_1" / f"{ENGINE_FILES[dtype]}_prompt.safetensors"
    clean = read_dump(mode_dump(tmp_path, reference, dtype, name="clean"))
    assert not compare_dumps(clean.path, reference).diverged
    unrounded = clean.stage("layers.0.out") + clean.stage("layers.1.attn_out")  # float32, not rounded
    faulty = mode_dump(tmp_path, reference, dtype, name="faulty", edits=[Edit("layers.1.h", "replace", unrounded)])
    c = compare_dumps(faulty, reference)
    first = next(s for s in c.stages if s.diverged)
    assert c.diverged == ["layers.1.h"] and first.nmse <= KIND_NMSE_TOLS[dtype]["h"], (c.diverged, first.nmse)
    assert first.note.startswith("A holds ") and first.note.endswith(
        f"values that are not {dtype}, which A says it computed in: a cast is missing there")
    assert compare_dumps(faulty, reference, nmse_tol=1.0).diverged == ["layers.1.h"]


@pytest.mark.parametrize("dtype", list(LOW_CALIBRATION))
def test_a_wrong_rope_theta_is_named_at_q_rope(tmp_path, dtype):
    """Rope theta 10,000 (Llama 2's) for the model's 500,000, beyond position 20,000."""
    reference = PARITY / "llama3_0" / f"{ENGINE_FILES[dtype]}_far.safetensors"
    config = load_checkpoint(reference.parent).config
    assert config.rope_theta == 500000.0
    wrong = compare_dumps(mode_dump(tmp_path, reference, dtype, dataclasses.replace(config, rope_theta=10000.0),
                                    "faulty"), reference)
    assert wrong.first_divergence == "layers.0.q_rope", [(s.name, s.nmse) for s in wrong.stages[:8]]
    print(f"{dtype}: rope theta fault at layers.0.q_rope NMSE {next(s.nmse for s in wrong.stages if s.name == 'layers.0.q_rope'):.2f}, "
          f"default {KIND_NMSE_TOLS[dtype]['q_rope']}")


def test_a_float16_overflow_is_named_where_it_happens(tmp_path, capsys):
    """An engine whose float16 result overflows (injected: one element of layers.1.ffn_hidden
    beyond ±65504 becomes inf, and that token is NaN from there on, as inf - inf makes it) against
    transformers' float16 output, which stays finite: compare names the stage and says why.
    llama3_np's own float16 mode refuses such a run instead (tests/cli/test_compute.py)."""
    reference = PARITY / "llama3_0" / "hf_fp16_prompt.safetensors"
    ref = read_dump(reference)
    stages = {n: np.array(ref.stage(n)) for n in ref.names}
    stages["layers.1.ffn_hidden"][0, 3] = np.inf
    for name in stages:
        if stage_order(name) > stage_order("layers.1.ffn_hidden"):
            stages[name][0] = np.nan
    faulty = tmp_path / "overflow.safetensors"
    write_dump(faulty, stages, {**ref.metadata, "producer": "an engine that overflows"})
    c = compare_dumps(faulty, reference)
    assert c.first_divergence == "layers.1.ffn_hidden" and c.kind_tols == KIND_NMSE_TOLS["float16"], c.diverged
    assert c.stages[[s.name for s in c.stages].index("layers.1.ffn_hidden")].note == "inf or NaN in A where B is finite"
    code, out, _ = run_cli(capsys, "compare", faulty, reference)
    assert code == 1 and out.splitlines()[-1].startswith("verdict: diverge at layers.1.ffn_hidden (")
    assert out.splitlines()[-1].endswith("; inf or NaN in A where B is finite)")
