"""`llama3-np compare`: the error measures, the first diverging stage named exactly, exit status 1
on divergence and 0 on agreement, stages present in one file only listed, JSON output, and
dumps that cannot be compared refused with one line on stderr and exit status 2."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from llama3_np.xcheck.compare import compare_dumps, stage_error
from llama3_np.xcheck.dump import read_dump, write_dump
from tests.helpers import max_rel_err, nmse
from tests.xcheck.test_dump import PARITY, assert_one_line_error, run_cli

REF = PARITY / "llama3_0" / "hf_prompt.safetensors"  # torch reference, 29 stages
META = PARITY / "llama3_0" / "meta_prompt.safetensors"  # the other reference, same tokens


def copy_with(tmp_path, name: str, change=None, drop=(), metadata=None) -> Path:
    """A copy of REF with stage `name` changed by `change`, stages `drop` removed, metadata edited."""
    ref = read_dump(REF)
    stages = {n: np.array(ref.stage(n)) for n in ref.names if n not in drop}
    if change is not None:
        stages[name] = change(stages[name])
    path = tmp_path / "changed.safetensors"
    write_dump(path, stages, dict(ref.metadata, **(metadata or {})))
    return path


def test_the_two_references_agree_and_exit_0(capsys):
    code, out, err = run_cli(capsys, "compare", META, REF)
    assert code == 0, out + err
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"A: {META} (llama-models") and lines[1].startswith(f"B: {REF} (transformers")
    assert lines[-1] == "all 29 common stages agree (within NMSE 1e-10)"
    rows = lines[3:-1]
    assert [r.split()[0] for r in rows][:3] == ["embed", "layers.0.attn_norm", "layers.0.q"]
    assert [r.split()[0] for r in rows][-2:] == ["norm", "logits"]


@pytest.mark.parametrize("stage", ["embed", "layers.0.k_rope", "layers.1.ffn_hidden", "logits"])
def test_a_corrupted_stage_is_named_exactly_and_exits_1(tmp_path, capsys, stage):
    """One entry of one stage moved by 1e-3 of the stage's spread: that stage, and only it."""
    def corrupt(x):
        x = x.copy()
        x.flat[x.size // 2] += 1e-3 * float(np.std(x))
        return x

    bad = copy_with(tmp_path, stage, corrupt)
    c = compare_dumps(bad, REF)
    assert c.first_divergence == stage and c.diverged == [stage]
    code, out, _ = run_cli(capsys, "compare", bad, REF)
    assert code == 1
    assert out.strip().splitlines()[-1] == f"1 of 29 stages past NMSE 1e-10; first divergence: {stage}"
    marked = [line for line in out.splitlines() if "<- first divergence" in line]
    assert len(marked) == 1 and marked[0].split()[0] == stage


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
    """A bfloat16 run against float32: diverges at 1e-10, agrees at llama.cpp's 1e-2."""
    bf16 = PARITY / "llama3_0" / "hf_bf16_prompt.safetensors"  # logits only
    assert run_cli(capsys, "compare", bf16, REF)[0] == 1
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
    assert d["nmse_tol"] == 1e-10 and d["rel_tol"] is None and d["only_in_a"] == d["only_in_b"] == []
    row = next(s for s in d["stages"] if s["name"] == "layers.0.v")
    assert row["shape"] == [16, 2, 16] and row["max_abs"] == pytest.approx(1.0, rel=1e-6)
    assert set(row) == {"name", "shape", "max_abs", "max_rel", "nmse", "cosine", "diverged"}


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
