"""`llama3-np trace`: the printed shapes of every stage are those the config implies (written out
here from the dimensions, not from llama3_np's own shape table), the statistics are those of the
stages, --layers selects layers, and bad input ends in one line on stderr with exit status 2."""

import re

import numpy as np
import pytest

from llama3_np.formats.checkpoint import load_checkpoint
from llama3_np.model import forward
from llama3_np.stages import Trace
from tests.xcheck.test_dump import PARITY, assert_one_line_error, default_model, run_cli

ROW = re.compile(r"^(\S+)\s+(.+?)\s+(\[[\d, ]*\]) -> (\[[\d, ]*\])\s+(\S+)\s+(\S+)\s+(\S+)$")


def parse(out: str) -> tuple[str, dict[str, tuple]]:
    """The header line and {stage: (operation, in shape, out shape, mean, std, max abs)}."""
    lines = out.strip().splitlines()
    assert lines[1].split()[:3] == ["stage", "operation", "shape"], lines[1]
    rows = {}
    for line in lines[2:]:
        m = ROW.match(line)
        assert m, f"unparsable trace row: {line!r}"
        name, op, src, dst, *stats = m.groups()
        rows[name] = (op, src, dst, *map(float, stats))
    return lines[0], rows


def shape(*dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def expected_flow(D, H, KV, Dh, F, V, T, S, layers) -> dict[str, tuple[str, str]]:
    """stage -> (shape read, shape written), from the dimensions of Llama 3's equations."""
    flow = {"embed": (shape(T), shape(T, D))}
    for i in layers:
        p = f"layers.{i}."
        flow.update({
            p + "attn_norm": (shape(T, D), shape(T, D)),
            p + "q": (shape(T, D), shape(T, H, Dh)),
            p + "k": (shape(T, D), shape(T, KV, Dh)),
            p + "v": (shape(T, D), shape(T, KV, Dh)),
            p + "q_rope": (shape(T, H, Dh), shape(T, H, Dh)),
            p + "k_rope": (shape(T, KV, Dh), shape(T, KV, Dh)),
            p + "probs": (shape(T, H, Dh), shape(H, T, S)),
            p + "attn": (shape(H, T, S), shape(T, H * Dh)),
            p + "attn_out": (shape(T, H * Dh), shape(T, D)),
            p + "h": (shape(T, D), shape(T, D)),
            p + "ffn_norm": (shape(T, D), shape(T, D)),
            p + "ffn_hidden": (shape(T, D), shape(T, F)),
            p + "ffn_out": (shape(T, F), shape(T, D)),
            p + "out": (shape(T, D), shape(T, D)),
        })
    flow.update({"norm": (shape(T, D), shape(T, D)), "logits": (shape(T, D), shape(T, V))})
    return flow


def test_trace_prints_the_shapes_the_config_implies_and_the_stage_statistics(capsys):
    model = PARITY / "llama3_2"
    code, out, err = run_cli(capsys, "trace", "-m", model, "--tokens", "5,6,7,8,9,10,11", "--pos", "100")
    assert code == 0, err
    header, rows = parse(out)
    c = load_checkpoint(model).config
    assert f"D={c.dim} H={c.n_heads} KV={c.n_kv_heads} Dh={c.head_dim} F={c.ffn_dim} V={c.vocab_size}" in header
    assert "T=7 tokens at positions 100..106" in header
    flow = expected_flow(64, 4, 2, 16, 160, 256, T=7, S=7, layers=[0, 1])
    assert list(rows) == list(flow)  # every stage, in model order
    for name, (src, dst) in flow.items():
        assert rows[name][1:3] == (src, dst), f"{name}: printed {rows[name][1]} -> {rows[name][2]}, expected {src} -> {dst}"

    trace = Trace(["*", "*.probs"])
    ckpt = load_checkpoint(model)
    forward(ckpt.weights, ckpt.config, [5, 6, 7, 8, 9, 10, 11], pos=100, trace=trace)
    for name, x in trace.items():
        x = x.astype(np.float64)
        printed = rows[name][3:]
        for value, want in zip(printed, (x.mean(), x.std(), np.abs(x).max())):
            assert value == pytest.approx(want, rel=1e-3, abs=1e-6), f"{name}: {printed}"
    assert rows["layers.0.probs"][5] == pytest.approx(1.0)  # the first token attends only to itself


def test_layers_selects_layers_and_a_context_widens_the_attention(capsys):
    """--layers 1 with the 8-token context of a decode fixture: probs read S = 9 positions."""
    code, out, err = run_cli(capsys, "trace", "-m", PARITY / "llama3_1", "--layers", "1",
                             "--like", PARITY / "llama3_1" / "hf_far_decode.safetensors")
    assert code == 0, err
    header, rows = parse(out)
    assert "T=1 tokens at positions 24579..24579, attending to S=9" in header
    assert list(rows) == list(expected_flow(64, 4, 2, 16, 160, 256, T=1, S=9, layers=[1]))
    assert rows["layers.1.probs"][2] == "[4, 1, 9]"


def test_trace_of_the_default_model_from_text(capsys):
    code, out, err = run_cli(capsys, "trace", "-m", default_model(), "-p", "The capital of France is",
                             "--layers", "0,28-29")
    assert code == 0, err
    header, rows = parse(out)
    # SmolLM2-135M: D 576, 9 query heads over 3 KV heads of 64, F 1536, V 49152; 5 tokens, no BOS.
    assert list(rows) == list(expected_flow(576, 9, 3, 64, 1536, 49152, T=5, S=5, layers=[0, 28, 29]))
    for name, (src, dst) in expected_flow(576, 9, 3, 64, 1536, 49152, 5, 5, [0, 28, 29]).items():
        assert rows[name][1:3] == (src, dst), name


@pytest.mark.parametrize("args, fragments", [
    (["--tokens", "1,2", "--layers", "2"], ["--layers", "0 to 1"]),
    (["--tokens", "1,2", "--layers", "0-x"], ["--layers"]),
    (["--tokens", "1,2", "--layers", "1-0"], ["--layers"]),
    (["--tokens", "1,300"], ["300", "outside the vocabulary"]),
    ([], ["give the input"]),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, fragments):
    code, _, err = run_cli(capsys, "trace", "-m", PARITY / "llama3_0", *args)
    assert_one_line_error(code, err, *fragments)


def test_missing_model_and_empty_text_are_refused(capsys, tmp_path):
    code, _, err = run_cli(capsys, "trace", "-m", tmp_path / "nothing", "--tokens", "1")
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run_cli(capsys, "trace", "-m", default_model(), "-p", "")
    assert_one_line_error(code, err, "empty")
