"""Perplexity by llama.cpp's method: the windows, the scored positions and the standard error as
llama.cpp computes them; the default model's perplexity on the committed text against Hugging
Face's float32 perplexity of the same ids (tests/fixtures/xcheck/perplexity_reference.json, made by
tools/make_perplexity_reference.py); KL divergence against saved logits; bad input."""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from llama3_np.formats.checkpoint import load_checkpoint
from llama3_np.errors import Llama3Error
from llama3_np.model import forward
from llama3_np.xcheck.perplexity import (BaseLogits, LogitsWriter, logits_metadata, mean_estimate, run_perplexity,
                                  scored_logits, windows, windows_logits)
from llama3_np.load import load_tokenizer
from tests.xcheck.test_dump import PARITY, XCHECK, assert_one_line_error, default_model, run_cli

TEXT = XCHECK / "jargon_hack.txt"
REFERENCE = XCHECK / "perplexity_reference.json"
PPL_REL_TOL = 1e-3  # 0.1 %


@pytest.fixture(scope="module")
def tiny():
    return load_checkpoint(PARITY / "llama3_0")


def random_ids(n, seed=0, vocab=256):
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def test_windows_follow_llama_cpp():
    ids = list(range(100, 123))  # 23 tokens
    assert windows(ids, 8, None) == [ids[0:8], ids[8:16]]  # the 7-token tail is dropped
    assert windows(ids, 8, 1) == [[1] + ids[1:8], [1] + ids[9:16]]  # BOS replaces each first token
    assert windows(ids, 5, None, chunks=2) == [ids[0:5], ids[5:10]]
    with pytest.raises(Llama3Error, match="at least 24"):
        windows(ids, 12, None)  # two windows are needed


def test_scored_logits_are_positions_ctx_half_to_ctx_minus_2_whatever_the_batch(tiny):
    w, c = tiny.weights, tiny.config
    window = random_ids(16, seed=1)
    full = forward(w, c, window)  # [16, V], no cache
    for batch in (1, 5, 8, 16):  # the output product runs for the scored rows only: float32 rounding apart
        np.testing.assert_allclose(scored_logits(w, c, window, batch), full[8:15], rtol=1e-5, atol=1e-5)


def test_a_batch_of_whole_windows_runs_them_in_one_pass_with_each_windows_logits(tiny, monkeypatch):
    """-b 3·ctx runs three windows a forward pass, as llama-perplexity's n_seq; each window's
    logits are its own within float32 rounding, and bit for bit with batch-invariant products."""
    from llama3_np import products
    from llama3_np.xcheck import perplexity
    from tests.test_batch import BATCH_NMSE
    from tests.helpers import nmse

    w, c = tiny.weights, tiny.config
    wins = windows(random_ids(16 * 7, seed=3), 16, 1)
    calls = []
    real = perplexity.forward_batch
    monkeypatch.setattr(perplexity, "forward_batch", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    alone = list(windows_logits(w, c, wins, 16))
    assert calls == [1] * 7  # one window a pass
    calls.clear()
    batched = list(windows_logits(w, c, wins, 48))
    assert calls == [3, 3, 1] and len(batched) == 7
    assert max(nmse(b, a) for a, b in zip(alone, batched)) <= BATCH_NMSE
    products.set_batch_invariant(True)
    try:
        alone, batched = list(windows_logits(w, c, wins, 16)), list(windows_logits(w, c, wins, 48))
    finally:
        products.set_batch_invariant(False)
    assert all(np.array_equal(a, b) for a, b in zip(alone, batched))


def test_perplexity_and_its_standard_error_from_first_principles(tiny):
    w, c = tiny.weights, tiny.config
    ids = random_ids(50, seed=2)
    r = run_perplexity(w, c, ids, ctx=16, bos_id=7)
    nll = []
    for i in range(3):  # 50 // 16 windows
        window = [7] + ids[i * 16 + 1:(i + 1) * 16]
        logits = forward(w, c, window).astype(np.float64)
        for pos in range(8, 15):
            z = logits[pos]
            log_p = z - z.max() - math.log(np.sum(np.exp(z - z.max())))
            nll.append(-log_p[ids[i * 16 + pos + 1]])
    nll = np.array(nll)
    # run_perplexity's output product runs for the scored rows alone, forward's here for all 16: the
    # logits agree to float32 rounding (docs/DESIGN.md, "Batches"), the NLL to 1e-6 of its value
    got = np.concatenate(r.nll)
    assert r.scored == 21 and np.allclose(got, nll, rtol=1e-6, atol=0)
    ppl = r.ppl
    assert ppl.value == pytest.approx(math.exp(got.mean()), rel=1e-12)
    # llama.cpp: PPL * sqrt((mean(nll^2) - mean(nll)^2) / (N - 1))
    assert ppl.error == pytest.approx(ppl.value * math.sqrt(np.var(got) / (len(got) - 1)), rel=1e-9)
    assert mean_estimate(np.array([1.0, 2.0, 3.0, 4.0])).error == pytest.approx(math.sqrt(1.25 / 3))


def test_kl_against_own_saved_logits_is_zero_and_against_others_is_the_definition(tiny, tmp_path):
    w, c = tiny.weights, tiny.config
    ids = random_ids(64, seed=3)
    window_tokens = ids[:64]
    path = tmp_path / "logits.safetensors"
    writer = LogitsWriter(path, 4 * 7, c.vocab_size, logits_metadata(window_tokens, 16))
    first = run_perplexity(w, c, ids, ctx=16, save=writer)
    writer.close()
    again = run_perplexity(w, c, ids, ctx=16, base=BaseLogits(path, window_tokens, 16, c.vocab_size))
    kl = np.concatenate(again.kl)
    assert kl.shape == (28,) and np.all(kl == 0.0)
    assert np.all(np.concatenate(again.same_top) == 1.0)
    assert again.to_json()["kl"]["base_ppl"] == first.ppl.value

    # Another model's logits as the base: KL(base || this) by its definition.
    other = load_checkpoint(PARITY / "llama3_1")
    path2 = tmp_path / "other.safetensors"
    writer = LogitsWriter(path2, 28, c.vocab_size, logits_metadata(window_tokens, 16))
    run_perplexity(other.weights, other.config, ids, ctx=16, save=writer)
    writer.close()
    r = run_perplexity(w, c, ids, ctx=16, base=BaseLogits(path2, window_tokens, 16, c.vocab_size))
    p_logits = scored_logits(w, c, ids[:16], 16).astype(np.float64)
    q_logits = scored_logits(other.weights, other.config, ids[:16], 16).astype(np.float64)
    log_p = p_logits - np.log(np.exp(p_logits).sum(-1, keepdims=True))
    log_q = q_logits - np.log(np.exp(q_logits).sum(-1, keepdims=True))
    expected = np.sum(np.exp(log_q) * (log_q - log_p), axis=-1)
    np.testing.assert_allclose(r.kl[0], expected, rtol=1e-9)
    assert np.all(r.kl[0] > 0)
    assert np.array_equal(r.same_top[0], (q_logits.argmax(-1) == p_logits.argmax(-1)).astype(float))


def test_default_model_perplexity_equals_hugging_face_float32_within_0_1_percent(capsys):
    ref = json.loads(REFERENCE.read_text())
    assert hashlib.sha256(TEXT.read_bytes()).hexdigest() == ref["text_sha256"], "the committed text changed"
    ids = load_tokenizer(default_model()).encode(TEXT.read_text(encoding="utf-8"))
    assert ids == ref["ids"], "llama3_np's tokenizer no longer gives the reference ids"
    code, out, err = run_cli(capsys, "perplexity", "-m", default_model(), "-f", TEXT, "--ctx", ref["ctx"], "--json")
    assert code == 0, err
    ours = json.loads(out)
    assert (ours["chunks"], ours["scored_tokens"]) == (ref["windows"], ref["scored_tokens"])
    rel = abs(ours["ppl"] / ref["ppl"] - 1)
    print(f"PPL {ours['ppl']:.6f} vs Hugging Face float32 {ref['ppl']:.6f}: relative difference {rel:.2e}")
    assert rel <= PPL_REL_TOL, f"PPL {ours['ppl']:.6f} vs {ref['ppl']:.6f}: relative difference {rel:.2e}"
    assert ours["ppl_error"] == pytest.approx(ref["ppl_error"], rel=PPL_REL_TOL)
    assert ours["running_ppl"] == pytest.approx(ref["running_ppl"], rel=PPL_REL_TOL)
    assert "\r" not in err  # stderr is not a terminal here: no progress bar


def test_progress_is_the_command_lines_one_progress_line_on_a_terminal_only(monkeypatch, capsys):
    import io

    import llama3_np.cli.common

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(llama3_np.cli.common, "PROGRESS_AFTER_SECONDS", 0.0)
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    code, out, _ = run_cli(capsys, "perplexity", "-m", default_model(), "-f", TEXT, "--ctx", "32", "--chunks", "2",
                           "--batch", "16")
    assert code == 0
    shown = terminal.getvalue()
    assert "\rperplexity 16/64 tokens (25%)" in shown and "\rperplexity 64/64 tokens (100%)" in shown
    assert shown.endswith("\r" + " " * len("perplexity 64/64 tokens (100%)") + "\r")


def test_cli_kl_against_own_saved_logits_is_zero(tmp_path, capsys):
    saved = tmp_path / "base.safetensors"
    args = ("perplexity", "-m", default_model(), "-f", TEXT, "--ctx", "32", "--chunks", "2", "--batch", "20")
    code, out, err = run_cli(capsys, *args, "--save-logits", saved)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert "2 windows of 32, each scored on its last 15 tokens; BOS first: no" in lines[0]
    assert [line.split()[0] for line in lines[1:3]] == ["[1]", "[2]"]
    assert lines[3].startswith("Final estimate: PPL = ") and "(30 tokens scored)" in lines[3]
    code, out, err = run_cli(capsys, *args, "--kl-base", saved)
    assert code == 0, err
    assert "KL divergence from the base logits: mean 0.0000e+00 +/- 0.0000e+00, max 0.0000e+00" in out
    assert "same top-1 token: 100.000 +/- 0.000 %" in out


@pytest.mark.parametrize("make_args, fragments", [
    (lambda t: ["-f", t / "missing.txt"], ["missing.txt", "does not exist"]),
    (lambda t: ["-f", write(t / "empty.txt", "  \n")], ["no text"]),
    (lambda t: ["-f", write(t / "short.txt", "Hello there.")], ["needs at least 1024", "--ctx"]),
    (lambda t: ["-f", TEXT, "--ctx", "2"], ["--ctx"]),
    (lambda t: ["-f", TEXT, "--ctx", "32", "--batch", "0"], ["--batch"]),
    (lambda t: ["-f", TEXT, "--ctx", "32", "--chunks", "0"], ["--chunks"]),
    (lambda t: ["-f", TEXT, "--ctx", "32", "-b", "48"], ["--batch-size: a batch of more than one window holds whole "
                                                         "windows: a multiple of the context 32, got 48"]),
    (lambda t: ["-f", TEXT, "--ctx", "100000"], ["--ctx", "trained for"]),
    (lambda t: ["-f", TEXT, "--kl-base", t / "nothing.safetensors"], ["--kl-base", "does not exist"]),
    (lambda t: ["-f", TEXT, "--save-logits", t / "no" / "x.safetensors"], ["--save-logits", "does not exist"]),
    (lambda t: ["-f", TEXT, "--save-logits", t / "l.safetensors", "--kl-base", t / "l.safetensors"], ["same file"]),
    (lambda t: ["-f", TEXT, "--ctx", "32", "--chunks", "1", "--kl-base",
                PARITY / "llama3_0" / "hf_prompt.safetensors"], ["--kl-base", "other windows"]),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, make_args, fragments):
    code, _, err = run_cli(capsys, "perplexity", "-m", default_model(), *make_args(tmp_path))
    assert_one_line_error(code, err, *fragments)


def test_kl_base_of_other_windows_is_refused(tmp_path, capsys):
    saved = tmp_path / "base.safetensors"
    base = ("perplexity", "-m", default_model(), "-f", TEXT, "--chunks", "2")
    assert run_cli(capsys, *base, "--ctx", "16", "--save-logits", saved)[0] == 0
    code, _, err = run_cli(capsys, *base, "--ctx", "20", "--kl-base", saved)
    assert_one_line_error(code, err, "other windows", "ctx 16")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
