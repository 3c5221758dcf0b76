"""AdamW, clipping and the learning-rate schedule (`llama3_np.optim`) against PyTorch: 20 training
steps of a tiny tied-embedding model from tests/fixtures/grad/adamw_20_steps.safetensors, made by
`python tools/make_grad_fixtures.py` with torch.optim.AdamW, torch.nn.utils.clip_grad_norm_ and
transformers' get_cosine_schedule_with_warmup, repeated here with llama3_np's backward pass.

Tolerance: parameters NMSE 1e-10 after 20 steps (float32). Each step's gradient differs from
torch's by NMSE ~1e-12 (summation order, tests/test_backward.py); Adam divides by √v, which does
not amplify a relative error, and 20 steps add 20 such errors.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from llama3_np import ParameterError
from llama3_np.backward import loss_and_gradients
from llama3_np.formats.checkpoint import load_checkpoint
from llama3_np.optim import AdamW, accumulate, clip_grad_norm, cosine_with_warmup
from tests.helpers import assert_close

FIXTURE = Path(__file__).parent / "fixtures" / "grad" / "adamw_20_steps.safetensors"


def test_twenty_steps_of_adamw_with_clipping_and_the_schedule_equal_torch():
    with safe_open(str(FIXTURE), framework="numpy") as f:
        meta = f.metadata()
    expected = load_file(str(FIXTURE))
    s = json.loads(meta["settings"])
    ckpt = load_checkpoint(FIXTURE.parent / s["variant"], dtype="float32")
    config = ckpt.config
    params = {k: np.array(a) for k, a in ckpt.weights.items() if k != "output.weight"}
    params["output.weight"] = params["tok_embeddings.weight"]  # tied: one array, updated once
    tokens = json.loads(meta["tokens"])
    optimizer = AdamW(lr=s["lr"], betas=tuple(s["betas"]), eps=s["eps"], weight_decay=s["weight_decay"])
    losses, norms = [], []
    for step in range(s["steps"]):
        optimizer.lr = s["lr"] * cosine_with_warmup(step, s["warmup"], s["steps"])
        loss, grads = loss_and_gradients(params, config, tokens)
        norms.append(clip_grad_norm(grads, s["max_norm"]))
        optimizer.step(params, grads)
        losses.append(loss)
    np.testing.assert_allclose(losses, json.loads(meta["losses"]), rtol=1e-5)
    np.testing.assert_allclose(norms, json.loads(meta["grad_norms"]), rtol=1e-5)
    assert sorted(expected) == sorted(k for k in params if k != "output.weight")
    for name, p in expected.items():
        assert_close(params[name], p, f"{name} after {s['steps']} steps", 1e-10)


def test_the_schedule_warms_up_linearly_then_follows_half_a_cosine():
    assert [cosine_with_warmup(s, 4, 12) for s in (0, 1, 4, 8, 12)] == pytest.approx(
        [0.0, 0.25, 1.0, 0.5, 0.0], abs=1e-15)


def test_clipping_scales_by_the_global_norm_and_leaves_small_gradients_alone():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert clip_grad_norm(grads, 1.0) == 5.0
    assert np.linalg.norm(np.concatenate([g.ravel() for g in grads.values()])) == pytest.approx(1.0, rel=1e-6)
    small = {"a": np.array([0.3]), "b": np.array([0.4])}
    clip_grad_norm(small, 1.0)
    assert small["a"][0] == 0.3 and small["b"][0] == 0.4


def test_accumulated_gradients_are_the_mean_of_the_micro_batches():
    total = accumulate(None, {"w": np.array([1.0, 2.0])}, 2)
    total = accumulate(total, {"w": np.array([3.0, 6.0])}, 2)
    assert total["w"].tolist() == [2.0, 4.0]


@pytest.mark.parametrize("kwargs,parameter", [
    ({"lr": 0}, "lr"), ({"lr": -1e-3}, "lr"), ({"betas": (0.9, 1.0)}, "betas"), ({"eps": 0}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay")])
def test_settings_out_of_range_are_refused_by_name(kwargs, parameter):
    with pytest.raises(ParameterError) as e:
        AdamW(**kwargs)
    assert e.value.parameter == parameter


def test_a_gradient_norm_limit_must_be_positive():
    with pytest.raises(ParameterError):
        clip_grad_norm({"w": np.ones(2)}, 0)
