"""`llama3-np generate --explain`: for every generated token, the top-k candidates with the model's
probability and the probability the sampler drew from, checked against forward() recomputed here."""

import json

import numpy as np
import pytest

from llama3_np.formats.checkpoint import load_checkpoint
from llama3_np.model import forward
from tests.xcheck.test_dump import PARITY, assert_one_line_error, default_model, run_cli

MODEL = PARITY / "llama3_1"
PROMPT = [5, 17, 99, 3, 17]


def softmax64(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def explain_json(capsys, *args) -> tuple[list[dict], dict]:
    code, out, err = run_cli(capsys, "generate", "-m", MODEL, "--tokens", ",".join(map(str, PROMPT)),
                             "--json", *args)
    assert code == 0, err
    lines = [json.loads(line) for line in out.strip().splitlines()]
    return lines[:-1], lines[-1]


def test_greedy_steps_show_the_argmax_and_the_model_probabilities(capsys):
    steps, final = explain_json(capsys, "-n", "4", "--temp", "0", "--explain", "3")
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and [s["id"] for s in steps] == final["ids"]
    ckpt = load_checkpoint(MODEL)
    ids = list(PROMPT)
    for s in steps:
        logits = forward(ckpt.weights, ckpt.config, ids)[-1]
        p = softmax64(logits)
        order = np.argsort(-logits, kind="stable")[:3]
        assert s["id"] == int(order[0]) and s["rank"] == 1 and s["sampled_p"] == 1.0
        assert [r["id"] for r in s["top"]] == order.tolist() and [r["rank"] for r in s["top"]] == [1, 2, 3]
        for r in s["top"]:
            assert r["p"] == pytest.approx(p[r["id"]], rel=1e-5)
            assert r["logit"] == pytest.approx(float(logits[r["id"]]), rel=1e-5, abs=1e-5)
            assert r["sampled_p"] == (1.0 if r["id"] == s["id"] else 0.0)
            assert r["token"] == f"<{r['id']}>"  # this checkpoint has no tokenizer
        ids.append(s["id"])


def test_sampled_steps_show_the_filtered_distribution_they_were_drawn_from(capsys):
    """top-k 4 leaves four candidates: with --explain 6 they carry all the sampled probability,
    and the chosen token is one of them."""
    steps, final = explain_json(capsys, "-n", "6", "--temp", "1.3", "--top-k", "4", "--top-p", "1",
                                "--min-p", "0", "--seed", "3", "--explain", "6")
    for s in steps:
        sampled = [r["sampled_p"] for r in s["top"]]
        assert sum(sampled) == pytest.approx(1.0) and all(x > 0 for x in sampled[:4]) and sampled[4:] == [0, 0]
        assert s["rank"] <= 4 and s["sampled_p"] > 0
        # temperature 1.3 over the four survivors
        p4 = np.array([r["p"] for r in s["top"][:4]]) ** (1 / 1.3)
        assert sampled[:4] == pytest.approx((p4 / p4.sum()).tolist(), rel=1e-6)
    assert [s["id"] for s in steps] == final["ids"]


def test_repetition_penalty_shows_in_the_sampled_probabilities(capsys):
    steps, _ = explain_json(capsys, "-n", "1", "--temp", "1", "--top-k", "0", "--top-p", "1", "--min-p", "0",
                            "--repeat-penalty", "2", "--seed", "0", "--explain", "8")
    ckpt = load_checkpoint(MODEL)
    z = forward(ckpt.weights, ckpt.config, PROMPT)[-1].astype(np.float64)
    seen = sorted(set(PROMPT))
    z[seen] = np.where(z[seen] > 0, z[seen] / 2, z[seen] * 2)
    expected = softmax64(z)
    for r in steps[0]["top"]:
        assert r["sampled_p"] == pytest.approx(expected[r["id"]], rel=1e-5), r


def test_a_chosen_token_outside_the_top_k_shown_is_added(capsys):
    steps, _ = explain_json(capsys, "-n", "12", "--temp", "5", "--top-k", "0", "--top-p", "1", "--min-p", "0",
                            "--seed", "1", "--explain", "1")
    far = [s for s in steps if s["rank"] > 1]
    assert far, "with temperature 5 some token should come from below rank 1"
    for s in far:
        assert [r["rank"] for r in s["top"]] == [1, s["rank"]] and s["top"][1]["id"] == s["id"]


def test_readable_table_on_the_default_model(capsys):
    code, out, err = run_cli(capsys, "generate", "-m", default_model(), "-p", "The capital of France is",
                             "-n", "1", "--temp", "0", "--explain", "3")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith('#1  chose " Paris" (id ') and "rank 1" in lines[0]
    assert len(lines) == 4
    assert lines[1].strip().startswith('1. " Paris"') and lines[1].endswith("<- chosen")
    assert [line.strip().split(".")[0] for line in lines[1:]] == ["1", "2", "3"]
    assert "stop: -n limit" in err


def test_explain_needs_at_least_one_candidate(capsys):
    code, _, err = run_cli(capsys, "generate", "-m", MODEL, "--tokens", "1,2", "--explain", "0")
    assert_one_line_error(code, err, "--explain")
