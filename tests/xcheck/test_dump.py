"""`llama3-np dump`: the dump files it writes agree with the torch references' (the committed
parity fixtures and a Hugging Face dump of the default model), hold the documented metadata, keep
exactly the stages asked for, and bad input ends in one line on stderr with exit status 2."""

import json
from pathlib import Path

import numpy as np
import pytest

from llama3_np import assets
from llama3_np.cli import main
from llama3_np.xcheck.compare import DEFAULT_NMSE_TOL, compare_dumps
from llama3_np.stages import stage_shapes
from llama3_np.xcheck.dump import read_dump
from llama3_np.formats.checkpoint import load_checkpoint
from llama3_np.model import forward
from llama3_np.stages import Trace

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PARITY = FIXTURES / "parity"
XCHECK = FIXTURES / "xcheck"
PARITY_NMSE = 1e-10  # tests/test_parity.py's tolerance at every stage


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, f"exit {code}, stderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llama3-np: error: "), err
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"


def default_model() -> Path:
    """The default model's GGUF file (`python tools/fetch_default_model.py` puts it in weights/; make test does)."""
    return assets.default_model()


@pytest.mark.parametrize("case", ["prompt", "far", "far_decode"])
@pytest.mark.parametrize("ref", ["hf", "meta"])
def test_dump_like_a_parity_fixture_agrees_with_it(tmp_path, capsys, ref, case):
    """--like reruns a reference dump's tokens, positions and KV-cache context; every stage agrees."""
    fixture = PARITY / "llama3_1" / f"{ref}_{case}.safetensors"
    out = tmp_path / "ours.safetensors"
    code, _, err = run_cli(capsys, "dump", "-m", PARITY / "llama3_1", "--like", fixture, "-o", out)
    assert code == 0, err
    c = compare_dumps(out, fixture)
    worst = max(c.stages, key=lambda s: s.nmse)
    assert not c.only_in_a and not c.only_in_b, (c.only_in_a, c.only_in_b)
    assert len(c.stages) == 1 + 2 * 13 + 2
    assert worst.nmse <= PARITY_NMSE, f"{case} vs {ref}: worst stage {worst.name} NMSE {worst.nmse:.3e}"
    mine, theirs = read_dump(out).metadata, read_dump(fixture).metadata
    for key in ("config", "tokens", "pos", "context_tokens", "context_pos"):
        assert json.loads(mine[key]) == json.loads(theirs[key]), key
    assert mine["producer"].startswith("llama3_np ") and mine["dtype"] == "float32"
    assert mine["residency"] == "float32" and mine["format"] == "hf"


def test_default_model_dump_agrees_with_hugging_face_at_compare_s_default_tolerance(tmp_path, capsys):
    """The committed Hugging Face float32 dump of the default model (tools/torch_dump.py, see
    tests/fixtures/xcheck/README.md) against `llama3-np dump` of the same tokens: no divergence at
    the default tolerance, whose margin over this noise tools/calibrate_compare.py measures."""
    fixture = XCHECK / "default_hf.safetensors"
    out = tmp_path / "ours.safetensors"
    code, _, err = run_cli(capsys, "dump", "-m", default_model(), "--like", fixture, "-o", out)
    assert code == 0, err
    code, report, _ = run_cli(capsys, "compare", out, fixture)
    assert code == 0, report
    assert report.strip().splitlines()[-1] == "verdict: agree (57 of 57 common stages within NMSE 3e-09)"
    c = compare_dumps(out, fixture)
    assert [s.name for s in c.stages] == read_dump(fixture).names and not c.only_in_a and not c.diverged
    worst = max(c.stages, key=lambda s: s.nmse)
    print(f"default model vs HF float32: worst stage {worst.name} NMSE {worst.nmse:.3e}")
    assert min(s.cosine for s in c.stages) > 1 - 1e-9
    # Both compute with the GGUF's exact values (transformers on import-gguf's float32 folder): the
    # embedding rows are the same numbers, and the logits agree within the parity bound.
    nmse = {s.name: s.nmse for s in c.stages}
    assert nmse["embed"] == 0 and nmse["logits"] <= PARITY_NMSE, nmse["logits"]


def test_default_model_in_float64_is_within_float32_tolerance_of_hugging_face_float32(tmp_path, capsys):
    """float64 mode is the exact value float32 approximates: on the 30-layer default model every stage
    of the committed Hugging Face float32 dump agrees with it at compare's float32 default (3e-9)."""
    fixture = XCHECK / "default_hf.safetensors"
    out = tmp_path / "f64.safetensors"
    code, _, err = run_cli(capsys, "dump", "-m", default_model(), "--like", fixture, "--compute", "float64", "-o", out)
    assert code == 0, err
    c = compare_dumps(out, fixture)
    worst = max(c.stages, key=lambda s: s.nmse)
    assert len(c.stages) == 57 and not c.diverged and c.nmse_tol == DEFAULT_NMSE_TOL, (worst.name, worst.nmse)
    print(f"default model float64 vs HF float32: worst stage {worst.name} NMSE {worst.nmse:.3e}")


def test_dump_holds_the_trace_of_forward_with_documented_shapes_and_metadata(tmp_path, capsys):
    out = tmp_path / "d.safetensors"
    code, stdout, err = run_cli(capsys, "dump", "-m", PARITY / "llama3_0", "--tokens", "3,1,4,1,5",
                                "--pos", "7", "-o", out)
    assert code == 0, err
    assert "wrote 29 stages of 5 tokens" in stdout
    ckpt = load_checkpoint(PARITY / "llama3_0")
    trace = Trace()
    forward(ckpt.weights, ckpt.config, [3, 1, 4, 1, 5], pos=7, trace=trace)
    dump = read_dump(out)
    expected = stage_shapes(ckpt.config, 5, probs=False)
    assert dump.names == list(expected)  # model order, no attention probabilities
    for name, shape in expected.items():
        assert dump.shape(name) == shape, name
        assert np.array_equal(dump.stage(name), trace[name]), name
    m = dump.metadata
    assert json.loads(m["tokens"]) == [3, 1, 4, 1, 5] and m["pos"] == "7" and m["context_pos"] == "7"
    assert json.loads(m["context_tokens"]) == []
    assert json.loads(m["config"]) == ckpt.config.to_dict()


def test_stage_globs_select_stages_and_probs_come_only_when_named(tmp_path, capsys):
    out = tmp_path / "d.safetensors"
    code, _, err = run_cli(capsys, "dump", "-m", PARITY / "llama3_0", "--tokens", "1,2,3", "-o", out,
                           "--stages", "layers.1.q*", "*.probs", "logits")
    assert code == 0, err
    dump = read_dump(out)
    assert dump.names == ["layers.0.probs", "layers.1.q", "layers.1.q_rope", "layers.1.probs", "logits"]
    assert dump.shape("layers.0.probs") == (4, 3, 3)  # [H, T, S]
    probs = dump.stage("layers.1.probs")
    assert np.allclose(probs.sum(-1), 1, atol=1e-6) and np.all(np.triu(probs[0], 1) == 0)


def test_probs_attend_to_the_context_of_a_decode_step(tmp_path, capsys):
    """After --like a decode case (8 tokens in the cache), probs are [H, 1, 9]."""
    out = tmp_path / "d.safetensors"
    code, _, err = run_cli(capsys, "dump", "-m", PARITY / "llama3_1", "--like",
                           PARITY / "llama3_1" / "hf_far_decode.safetensors", "-o", out, "--stages", "layers.0.probs")
    assert code == 0, err
    assert read_dump(out).shape("layers.0.probs") == (4, 1, 9)


@pytest.mark.parametrize("args, fragments", [
    (["-m", "no/such/dir", "--tokens", "1"], ["no/such/dir", "does not exist"]),
    (["--tokens", "1,2", "--stages", "layer.*"], ["--stages", "'layer.*' matches no stage"]),
    (["--tokens", "1,2", "--stages", "layers.9.q"], ["'layers.9.q' matches no stage", "0 to 1"]),
    (["--like", "no_such.safetensors"], ["no_such.safetensors", "does not exist"]),
    (["--tokens", "1,x"], ["--tokens"]),
    (["--tokens", "1,999"], ["999", "outside the vocabulary"]),
    (["--tokens", ""], ["no tokens"]),
    ([], ["give the input"]),
    (["--tokens", "1", "--pos", "-3"], ["--pos"]),
    (["--like", PARITY / "llama3_0" / "hf_prompt.safetensors", "--pos", "3"], ["--pos", "--like"]),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, fragments):
    if "-m" not in args:
        args = ["-m", PARITY / "llama3_0", *args]
    code, _, err = run_cli(capsys, "dump", *args, "-o", tmp_path / "x.safetensors")
    assert_one_line_error(code, err, *fragments)


def test_empty_text_and_missing_output_folder_are_refused(tmp_path, capsys):
    code, _, err = run_cli(capsys, "dump", "-m", default_model(), "-p", "", "-o", tmp_path / "x.safetensors")
    assert_one_line_error(code, err, "empty")
    code, _, err = run_cli(capsys, "dump", "-m", PARITY / "llama3_0", "--tokens", "1",
                           "-o", tmp_path / "nowhere" / "x.safetensors")
    assert_one_line_error(code, err, "nowhere", "does not exist")


def test_like_a_dump_of_another_model_is_refused(tmp_path, capsys):
    code, _, err = run_cli(capsys, "dump", "-m", PARITY / "llama3_0", "--like",
                           PARITY / "llama3_1" / "hf_prompt.safetensors", "-o", tmp_path / "x.safetensors")
    assert_one_line_error(code, err, "different model")
