"""compare --replay names the stage that adds the error: engines made by these tests (llama3_np
with one stage computed wrongly: a wrong rope factor in one layer, a wrong eps in one norm) are
dumped, and the corrupted stage must have the largest local error, also when the corruption is so
small that no stage but the logits passes the tolerance in a plain comparison."""

import dataclasses
import json

import numpy as np
import pytest

from llama3_np.formats.checkpoint import load_checkpoint
from llama3_np.model import forward, rmsnorm, rope, rope_cos_sin, rope_frequencies
from llama3_np.stages import Trace, split
from llama3_np.xcheck.compare import DEFAULT_NMSE_TOL, compare_stages
from llama3_np.xcheck.dump import Inputs, dump_metadata, read_dump, write_dump
from llama3_np.xcheck.replay import reads, replay
from tests.xcheck.test_dump import PARITY, assert_one_line_error, default_model, run_cli


class CorruptedEngine(Trace):
    """llama3_np computing one stage of one layer wrongly: `rope_factor` (q_rope and k_rope with
    the llama3 rope scaling factor replaced) or `eps` (the norm `stage` with another epsilon).
    Everything after computes from the wrong value, as in a real faulty engine."""

    def __init__(self, config, weights, layer, stage, rope_factor=None, eps=None):
        super().__init__(["*"])
        self.config, self.weights, self.layer, self.stage = config, weights, layer, stage
        self.rope_factor, self.eps = rope_factor, eps
        self.seen = {}

    def keep(self, name, x):
        layer, stage = split(name)
        if name == ("embed" if self.layer == 0 else f"layers.{self.layer - 1}.out"):
            self.seen["x"] = x
        if layer == self.layer:
            self.seen[stage] = x
            if self.rope_factor is not None and stage in ("q_rope", "k_rope"):
                s = self.config.rope_scaling
                wrong = dataclasses.replace(self.config, rope_scaling=dataclasses.replace(s, factor=self.rope_factor))
                cos, sin = rope_cos_sin(np.arange(x.shape[0]), rope_frequencies(wrong))
                x = rope(self.seen[stage[0]], cos, sin)
            if self.eps is not None and stage == self.stage:
                source, weight = {"attn_norm": ("x", "attention_norm"), "ffn_norm": ("h", "ffn_norm")}[stage]
                x = rmsnorm(self.seen[source], self.weights[f"layers.{layer}.{weight}.weight"], self.eps)
        return super().keep(name, x)


def engine_dump(tmp_path, model, tokens, **corruption):
    engine = CorruptedEngine(model.config, model.weights, **corruption)
    forward(model.weights, model.config, tokens, trace=engine)
    path = tmp_path / "engine.safetensors"
    write_dump(path, engine, dump_metadata(model.config, Inputs(tokens, 0, [], 0), "float32", producer="crafted"))
    clean = Trace(["*"])
    forward(model.weights, model.config, tokens, trace=clean)
    return path, compare_stages(engine, clean)


@pytest.fixture(scope="module")
def tiny():
    return load_checkpoint(PARITY / "llama3_1")  # llama3 rope scaling, factor 8


@pytest.fixture(scope="module")
def default():
    return load_checkpoint(default_model())


TOKENS = np.random.default_rng(5).integers(0, 256, 16).tolist()
DEFAULT_TOKENS = [504, 3575, 282, 4649, 314, 7042, 28, 284, 260, 3575, 282, 10489, 314]  # "The capital of France is Paris, and the capital of Italy is"


@pytest.mark.parametrize("corruption,culprits", [
    (dict(layer=1, stage="q_rope", rope_factor=32.0), {"layers.1.q_rope", "layers.1.k_rope"}),
    (dict(layer=0, stage="ffn_norm", eps=1e-2), {"layers.0.ffn_norm"}),
    (dict(layer=1, stage="attn_norm", eps=1e-3), {"layers.1.attn_norm"}),
])
def test_replay_names_the_corrupted_stage_of_a_tiny_engine(tmp_path, capsys, tiny, corruption, culprits):
    path, plain = engine_dump(tmp_path, tiny, TOKENS, **corruption)
    code, out, _ = run_cli(capsys, "compare", path, "--replay", "-m", PARITY / "llama3_1", "--json")
    result = json.loads(out)
    assert code == 1 and result["largest_local"] in culprits
    first = next(s.name for s in plain if s.diverged)
    # The plain comparison sees every stage after the fault diverge; replay sees only the fault.
    assert set(result["past_tolerance"]) <= culprits < {s.name for s in plain if s.diverged} | {first}


def test_replay_finds_a_fault_that_only_the_logits_show_in_a_plain_comparison(tmp_path, capsys, default):
    """eps 4e-2 instead of 1e-5 in the last layer's ffn_norm: the last layer's feed-forward and the
    output product amplify it, so the logits pass compare's tolerance and no other stage does."""
    path, plain = engine_dump(tmp_path, default, DEFAULT_TOKENS, layer=29, stage="ffn_norm", eps=4e-2)
    assert [s.name for s in plain if s.diverged] == ["logits"], [(s.name, s.nmse) for s in plain if s.diverged]
    worst_inside = max((s for s in plain if s.name != "logits"), key=lambda s: s.nmse)
    assert worst_inside.nmse < DEFAULT_NMSE_TOL / 1.5  # with room: the fault is not at the edge
    stages = replay(default.weights, default.config, read_dump(path))
    assert stages[0].name == "layers.29.ffn_norm"
    assert stages[0].local.nmse > 100 * stages[1].local.nmse, (stages[0].local.nmse, stages[1].name, stages[1].local.nmse)
    assert stages[0].inherited.nmse < 1e-12  # its input, layers.29.h, is llama3_np's own


def test_replay_of_an_honest_reference_adds_only_rounding(capsys):
    code, out, _ = run_cli(capsys, "compare", PARITY / "llama3_1" / "hf_prompt.safetensors", "--replay", "-m",
                           PARITY / "llama3_1", "--json")
    result = json.loads(out)
    assert code == 0 and result["past_tolerance"] == []
    assert max(s["local"]["nmse"] for s in result["stages"]) < 1e-12


def test_replay_shows_meta_s_rope_factor_8_at_the_rope_stages_only(capsys):
    code, out, _ = run_cli(capsys, "compare", PARITY / "llama3_2" / "meta8_prompt.safetensors", "--replay", "-m",
                           PARITY / "llama3_2")
    assert code == 1
    lines = out.splitlines()
    assert {line.split()[0] for line in lines[2:6]} == {f"layers.{i}.{s}" for i in (0, 1) for s in ("q_rope", "k_rope")}
    assert "past tolerance" not in lines[6]
    assert lines[-1].startswith("verdict: layers.")


def test_reads_follows_the_stage_contract():
    assert reads("layers.0.attn_norm", 2) == "embed" and reads("layers.1.attn_norm", 2) == "layers.0.out"
    assert reads("layers.1.q_rope", 2) == "layers.1.q" and reads("norm", 2) == "layers.1.out"
    assert reads("logits", 2) == "norm" and reads("embed", 2) is None


def test_a_dump_of_another_model_or_of_gradients_is_refused(capsys, tmp_path):
    code, _, err = run_cli(capsys, "compare", PARITY / "llama3_0" / "hf_prompt.safetensors", "--replay", "-m",
                           PARITY / "llama3_1")
    assert_one_line_error(code, err, "different model")
    grad = tmp_path / "grad.safetensors"
    assert run_cli(capsys, "dump", "-m", PARITY / "llama3_1", "--tokens", "1,2,3", "--grad", "-o", grad)[0] == 0
    code, _, err = run_cli(capsys, "compare", grad, "--replay", "-m", PARITY / "llama3_1")
    assert_one_line_error(code, err, "records gradients")


@pytest.mark.parametrize("args,fragment", [
    (["--replay"], "give one dump file and -m MODEL"),
    ([], "-m goes with --replay"),
])
def test_replay_flags_are_checked(capsys, args, fragment):
    a = PARITY / "llama3_1" / "hf_prompt.safetensors"
    extra = ["-m", PARITY / "llama3_1"]
    code, _, err = run_cli(capsys, "compare", a, a, *args, *extra)
    assert_one_line_error(code, err, fragment)
