"""The backward pass (`llama3_np.backward`) against torch.autograd, and each stage's backward alone
against the derivative's definition.

Whole model: the fixtures under tests/fixtures/grad/ (made by `python tools/make_grad_fixtures.py`)
hold the gradient of every parameter of transformers' `LlamaForCausalLM` under torch.autograd, in
float32 and float64, for three tiny configurations (no rope scaling and untied; factor 8; factor 32
and tied embeddings), at 1, 7 and 64 tokens, from position 0 and from 24,571 (beyond the rope
scaling's low-frequency band). Tolerances, normalised MSE per parameter:
- float32: 1e-10. Two float32 computations of the same gradient differ by their summation order;
  torch's own float32 gradients differ from its float64 ones by about 1e-13 (the tool prints it).
- float64: 1e-24, the same argument at float64's precision (2⁻⁵³ ≈ 1e-16 per operation).

Each stage alone: the directional derivative <∇f(x), u> for a random direction u equals the
central difference (f(x + hu) - f(x - hu)) / 2h of the stage's forward in float64, whose error is
O(h²·f''') ≈ 1e-10 relative at h = 1e-5; a wrong term in a backward formula (a missing 1/rms, a
rotation by +θ instead of -θ, a softmax without its mean term) is off by O(1).
"""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from llama3_np import Llama3Error
from llama3_np.backward import (causal_attention_backward, cross_entropy, embed_backward,
                                linear_backward, loss_and_gradients, rmsnorm_backward, rope_backward,
                                swiglu_backward)
from llama3_np.formats.checkpoint import load_checkpoint
from llama3_np.config import ComputeMode
from llama3_np.model import (FeedForwardWeights, causal_attention, rmsnorm, rope, rope_cos_sin, rope_frequencies,
                             swiglu)
from tests.helpers import assert_close, tiny_config

FIXTURES = Path(__file__).parent / "fixtures" / "grad"
CASES = sorted((p.parent.name, p.name) for p in FIXTURES.glob("*/grad_*.safetensors"))


def read_case(variant: str, case: str):
    path = FIXTURES / variant / case
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


def test_fixtures_cover_the_issue_s_lengths_positions_and_variants():
    lengths = {int(c.split("_T")[1].split("_")[0]) for _, c in CASES}
    positions = {int(c.split("pos")[1].split(".")[0]) for _, c in CASES}
    assert lengths == {1, 7, 64} and positions == {0, 24571}
    assert {v for v, _ in CASES} == {"llama3_0", "llama3_1", "llama3_2"}


@pytest.mark.parametrize("compute,tol,loss_tol", [("float32", 1e-10, 1e-6), ("float64", 1e-24, 1e-13)])
@pytest.mark.parametrize("variant,case", CASES)
def test_every_gradient_equals_autograd(variant, case, compute, tol, loss_tol):
    ref, meta = read_case(variant, case)
    ckpt = load_checkpoint(FIXTURES / variant, dtype="float32")
    loss, grads = loss_and_gradients(ckpt.weights, ckpt.config, json.loads(meta["tokens"]),
                                     json.loads(meta["targets"]), pos=int(meta["pos"]), compute=compute)
    expected = {k[len(compute) + 1:]: a for k, a in ref.items() if k.startswith(compute + ".")}
    assert sorted(grads) == sorted(expected)
    assert loss == pytest.approx(float(meta[f"loss_{compute}"]), rel=loss_tol)
    for name, g in grads.items():
        assert g.dtype == np.dtype(compute)
        assert_close(g, expected[name], f"{variant} {case} {compute} d{name}", tol)


# ---------------------------------------------------------------------------------------------
# Each stage alone, in float64


def directional_check(f, x: np.ndarray, grad: np.ndarray, what: str, h: float = 1e-5, tol: float = 1e-8):
    """<grad, u> against the central difference of the scalar function f along a random u."""
    u = np.random.default_rng(1).normal(size=x.shape)
    numeric = (f(x + h * u) - f(x - h * u)) / (2 * h)
    analytic = float(np.sum(grad * u))
    assert abs(analytic - numeric) <= tol * max(1.0, abs(numeric)), \
        f"{what}: <grad, u> = {analytic!r}, central difference {numeric!r}"


RNG = np.random.default_rng(0)
T, D, H, KV, Dh, F = 5, 16, 4, 2, 8, 24
D_OUT = RNG.normal(size=(T, D))  # the upstream gradient every check projects on


def test_rmsnorm_backward():
    x, g = RNG.normal(size=(T, D)), RNG.normal(1, 0.2, size=D)
    d_x, d_g = rmsnorm_backward(x, g, 1e-5, D_OUT)
    f64 = ComputeMode("float64")
    directional_check(lambda x_: np.sum(rmsnorm(x_, g, 1e-5, f64) * D_OUT), x, d_x, "rmsnorm dx")
    directional_check(lambda g_: np.sum(rmsnorm(x, g_, 1e-5, f64) * D_OUT), g, d_g, "rmsnorm dweight")


def test_rope_backward_is_the_inverse_rotation():
    cos, sin = rope_cos_sin(24_571 + np.arange(T), rope_frequencies(tiny_config(head_dim=Dh), ComputeMode("float64")))
    x, d_out = RNG.normal(size=(T, H, Dh)), RNG.normal(size=(T, H, Dh))
    directional_check(lambda x_: np.sum(rope(x_, cos, sin) * d_out), x, rope_backward(d_out, cos, sin), "rope dx")


def test_attention_backward_with_grouped_heads_and_the_causal_mask():
    q, k, v = RNG.normal(size=(T, H, Dh)), RNG.normal(size=(KV, T, Dh)), RNG.normal(size=(KV, T, Dh))
    d_out = RNG.normal(size=(T, H, Dh))
    probs = []

    def f(q_, k_, v_):
        out = causal_attention(q_, k_, v_, keep=lambda name, p: probs.append(p) or p, mode=ComputeMode("float64"))
        return np.sum(out * d_out)

    f(q, k, v)
    d_q, d_k, d_v = causal_attention_backward(q, k, v, probs[0], d_out)
    directional_check(lambda q_: f(q_, k, v), q, d_q, "attention dq")
    directional_check(lambda k_: f(q, k_, v), k, d_k, "attention dk")
    directional_check(lambda v_: f(q, k, v_), v, d_v, "attention dv")


def test_swiglu_backward():
    x = RNG.normal(size=(T, D))
    w1, w2, w3 = RNG.normal(size=(F, D)) / 4, RNG.normal(size=(D, F)) / 5, RNG.normal(size=(F, D)) / 4
    d_x, d_w = swiglu_backward(x, FeedForwardWeights(w1, w2, w3), D_OUT)

    def f(x_=x, w1_=w1, w2_=w2, w3_=w3):
        return np.sum(swiglu(x_, FeedForwardWeights(w1_, w2_, w3_), ComputeMode("float64")) * D_OUT)

    directional_check(lambda x_: f(x_=x_), x, d_x, "swiglu dx")
    directional_check(lambda w_: f(w1_=w_), w1, d_w.w1, "swiglu dw1")
    directional_check(lambda w_: f(w2_=w_), w2, d_w.w2, "swiglu dw2")
    directional_check(lambda w_: f(w3_=w_), w3, d_w.w3, "swiglu dw3")


def test_linear_and_embedding_backward():
    x, w = RNG.normal(size=(T, D)), RNG.normal(size=(F, D))
    d_out = RNG.normal(size=(T, F))
    d_x, d_w = linear_backward(x, w, d_out)
    directional_check(lambda x_: np.sum(x_ @ w.T * d_out), x, d_x, "linear dx")
    directional_check(lambda w_: np.sum(x @ w_.T * d_out), w, d_w, "linear dw")
    table, tokens = RNG.normal(size=(11, D)), np.array([3, 7, 3, 0, 3])  # token 3 three times
    directional_check(lambda t_: np.sum(t_[tokens] * D_OUT), table, embed_backward(tokens, D_OUT, 11),
                      "embedding")


def test_cross_entropy_and_its_gradient():
    logits, targets = RNG.normal(size=(T, 11)) * 3, np.array([1, 4, -100, 0, 10])
    loss, d_logits = cross_entropy(logits, targets)
    log_probs = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    assert loss == pytest.approx(-np.mean(log_probs[[0, 1, 3, 4], [1, 4, 0, 10]]), rel=1e-14)
    assert not d_logits[2].any()
    directional_check(lambda z: cross_entropy(z, targets)[0], logits, d_logits, "cross-entropy")
    with pytest.raises(Llama3Error, match="at least one target"):
        cross_entropy(logits, np.full(T, -100))


# ---------------------------------------------------------------------------------------------
# Named gradients, dumped like stages


def test_dump_grad_matches_transformers_stage_gradients_through_compare(tmp_path, capsys):
    from llama3_np.cli import main

    reference = FIXTURES / "llama3_0" / "hf_grad_stages.safetensors"
    with safe_open(str(reference), framework="numpy") as f:
        tokens = json.loads(f.metadata()["tokens"])
    grad, stages = tmp_path / "grad.safetensors", tmp_path / "stages.safetensors"
    model = ["-m", str(FIXTURES / "llama3_0"), "--tokens", ",".join(map(str, tokens))]
    assert main(["dump", *model, "--grad", "-o", str(grad)]) == 0
    capsys.readouterr()
    assert main(["compare", str(grad), str(reference), "--all", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["stages"]) == 21, report  # every stage transformers' modules expose
    assert max(s["nmse"] for s in report["stages"]) <= 1e-10, report
    assert main(["dump", *model, "-o", str(stages)]) == 0
    capsys.readouterr()
    assert main(["compare", str(stages), str(reference)]) == 2
    assert "records gradients" in capsys.readouterr().err


def test_the_backward_pass_refuses_the_engines_low_precision_modes():
    from llama3_np import ParameterError
    ckpt = load_checkpoint(FIXTURES / "llama3_0", dtype="float32")
    with pytest.raises(ParameterError, match="float32 or float64, not bfloat16"):
        loss_and_gradients(ckpt.weights, ckpt.config, [1, 2, 3], compute="bfloat16")
