"""--compute and --convention on the command line: every computing command takes them, a dump
records them, and what cannot be honoured ends in one line on stderr, exit 2, nothing written: an
unknown mode, a residency the mode does not compute with, a float16 run that overflows."""

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from llama3_np.cli import main
from llama3_np.config import ComputeMode
from llama3_np.formats.checkpoint import load_checkpoint, save_hf_checkpoint
from llama3_np.stages import Trace
from llama3_np.xcheck.dump import Inputs, run_forward
from tests.helpers import random_weights, tiny_config

REPO = Path(__file__).resolve().parents[2]
PARITY = REPO / "tests" / "fixtures" / "parity" / "llama3_1"  # no tokenizer: --tokens only
TOKENS = [5, 17, 99, 3, 64]
COMMANDS = ["generate", "chat", "dump", "trace", "walkthrough", "perplexity", "bench"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_computing_command_names_the_modes_in_its_help(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--compute {float64,float32,bfloat16,float16,llamacpp}" in text and "--convention {transformers,meta}" in text


@pytest.mark.parametrize("compute,convention", [("bfloat16", "transformers"), ("bfloat16", "meta"),
                                                ("float16", "transformers"), ("float64", "transformers")])
def test_a_dump_records_its_mode_and_holds_what_the_library_computes_in_it(tmp_path, capsys, compute, convention):
    out = tmp_path / "d.safetensors"
    code, _, err = run(capsys, "dump", "-m", PARITY, "--tokens", ",".join(map(str, TOKENS)), "--compute", compute,
                       "--convention", convention, "-o", out)
    assert code == 0, err
    with safe_open(str(out), framework="numpy") as f:
        meta = f.metadata()
        logits = f.get_tensor("logits")
    assert meta["dtype"] == compute and meta.get("convention") == (convention if compute != "float64" else None)
    mode = ComputeMode(compute, convention)
    trace = Trace(["logits"])
    ckpt = load_checkpoint(PARITY, dtype="bfloat16" if mode.casts else "float32")
    run_forward(ckpt.weights, ckpt.config, Inputs(TOKENS, 0, [], 0), trace, mode)
    assert np.array_equal(logits, trace["logits"].astype(np.float32))


def test_generate_in_bfloat16_is_greedy_on_the_bfloat16_logits(capsys):
    code, out, err = run(capsys, "generate", "-m", PARITY, "--tokens", ",".join(map(str, TOKENS)), "-n", "4",
                         "--temp", "0", "--compute", "bfloat16", "--json")
    assert code == 0, err
    ids = json.loads(out)["ids"]
    ckpt = load_checkpoint(PARITY, dtype="bfloat16")
    from llama3_np.model import KVCache, forward
    cache = KVCache(ckpt.config, len(TOKENS) + 4, "bfloat16")
    logits = forward(ckpt.weights, ckpt.config, TOKENS, cache)
    want = [int(np.argmax(logits[-1]))]
    for _ in range(3):
        want.append(int(np.argmax(forward(ckpt.weights, ckpt.config, want[-1:], cache)[-1])))
    assert ids == want


def overflowing_model(tmp_path, scale) -> Path:
    """A tiny model whose feed-forward output exceeds float16's 65504 in layer 0 (and nowhere
    before), or with `weight`, whose w2 itself does."""
    config = tiny_config()
    w = random_weights(config)
    w["layers.0.feed_forward.w2.weight"] = (w["layers.0.feed_forward.w2.weight"] * scale).astype(np.float32)
    save_hf_checkpoint(tmp_path / "big", config, w, dtype=ml_dtypes.bfloat16)
    return tmp_path / "big"


@pytest.mark.parametrize("argv,message", [
    (["--compute", "float8"], "--compute: invalid choice: 'float8'"),
    (["--convention", "vllm"], "--convention: invalid choice: 'vllm'"),
    (["--compute", "float64", "--dtype", "bfloat16"],
     "--dtype: dtype bfloat16 does not combine with compute float64: it computes with the weights held in float64"),
    (["--compute", "bfloat16", "--dtype", "float32"],
     "--dtype: dtype float32 does not combine with compute bfloat16: it computes with the weights held in bfloat16"),
    (["--compute", "llamacpp", "--dtype", "float32"],
     "--dtype: compute llamacpp multiplies this hf checkpoint's weights in their stored types, which dtype "
     "bfloat16 keeps: leave out the residency"),
    (["--compute", "float16", "OVERFLOW"],
     "--compute: float16 overflows at stage layers.0.ffn_out: it holds values beyond ±65504, float16's largest"),
    (["--compute", "float16", "BIG_WEIGHT"],
     "--compute: weight layers.0.feed_forward.w2.weight holds values beyond ±65504, float16's largest"),
])
def test_what_a_mode_cannot_honour_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, argv, message):
    scale = {"OVERFLOW": 1e5, "BIG_WEIGHT": 1e6}  # w2 up to 0.36 before: ffn_out up to 1.8
    model = next((overflowing_model(tmp_path, scale[a]) for a in argv if a in scale), PARITY)
    argv = [a for a in argv if a not in scale]
    out = tmp_path / "d.safetensors"
    code, stdout, err = run(capsys, "dump", "-m", model, "--tokens", ",".join(map(str, TOKENS)), *argv, "-o", out)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    # The same model in bfloat16 (float32's range) runs.
    if "float16" in argv:
        assert run(capsys, "dump", "-m", model, "--tokens", "5,17", "--compute", "bfloat16", "-o", out)[0] == 0
