"""Interventions: edits of named stages as a forward pass computes them (replace, add, scale,
ablate; per head and per token where the stage has them) and a forward pass that starts from a
given value of the residual stream. Patching a stage from prompt A into prompt B changes B's
logits exactly as recomputing B's forward from that stage does."""

import numpy as np
import pytest

from llama3_np import Edit, KVCache, Llama3Error, Trace, forward
from llama3_np.formats.checkpoint import load_checkpoint
from llama3_np.linear import linear
from tests.xcheck.test_dump import PARITY


@pytest.fixture(scope="module")
def tiny():
    return load_checkpoint(PARITY / "llama3_1")


A = [3, 17, 99, 4, 250, 31, 8, 77]
B = [3, 17, 12, 4, 190, 31, 60, 77]


@pytest.mark.parametrize("compute", ["float32", "float64"])
def test_patching_attn_out_from_a_into_b_is_recomputing_b_from_that_stage(tiny, compute):
    w, c = tiny.weights, tiny.config
    layer = 1
    a, b = Trace(["*"]), Trace(["*"])
    forward(w, c, A, trace=a, compute=compute)
    clean_b = forward(w, c, B, trace=b, compute=compute)
    patch = Edit(f"layers.{layer}.attn_out", "replace", a[f"layers.{layer}.attn_out"])

    patched_trace = Trace(["*"], edits=[patch])
    patched = forward(w, c, B, trace=patched_trace, compute=compute)
    recomputed = forward(w, c, B, trace=Trace([], edits=[patch]), compute=compute,
                         start_from=(f"layers.{layer - 1}.out", b[f"layers.{layer - 1}.out"]))

    assert np.array_equal(patched, recomputed)
    assert np.abs(patched - clean_b).max() > 1e-3  # the patch changes B's logits
    # Before the patch B is itself; at it, h is B's residual plus A's attention output, exactly.
    assert np.array_equal(patched_trace[f"layers.{layer - 1}.out"], b[f"layers.{layer - 1}.out"])
    assert np.array_equal(patched_trace[f"layers.{layer}.attn_out"], a[f"layers.{layer}.attn_out"])
    assert np.array_equal(patched_trace[f"layers.{layer}.h"], b[f"layers.{layer - 1}.out"] + a[f"layers.{layer}.attn_out"])


def test_starting_from_a_recorded_stage_gives_the_same_logits(tiny):
    w, c = tiny.weights, tiny.config
    t = Trace(["*"])
    logits = forward(w, c, B, trace=t)
    for name in ("embed", "layers.0.out", "layers.1.out"):
        assert np.array_equal(forward(w, c, B, start_from=(name, t[name])), logits), name


def test_each_op_per_head_and_per_token(tiny):
    w, c = tiny.weights, tiny.config
    T, H, KV, Dh = len(B), c.n_heads, c.n_kv_heads, c.head_dim
    clean = Trace(["*", "layers.0.probs"])
    forward(w, c, B, trace=clean)
    edits = [Edit("layers.0.attn", "ablate", heads=(1,)),
             Edit("layers.0.q", "scale", 2.0, heads=(0, 3), tokens=(2, 5)),
             Edit("layers.1.k_rope", "add", 0.5, heads=(1,)),
             Edit("layers.1.probs", "ablate", heads=(2,), tokens=(7,))]
    t = Trace(["*", "layers.1.probs"], edits=edits)
    forward(w, c, B, trace=t)
    attn = t["layers.0.attn"].reshape(T, H, Dh)
    assert not attn[:, 1].any() and attn[:, 0].any()
    ratio = t["layers.0.q"] / clean["layers.0.q"]
    want = np.ones((T, H, 1))
    want[np.ix_([2, 5], [0, 3])] = 2
    assert np.array_equal(ratio, np.broadcast_to(want, ratio.shape))
    assert t["layers.1.k_rope"].shape == (T, KV, Dh)
    assert not t["layers.1.probs"][2, 7].any() and t["layers.1.probs"][2, 6].any()
    # A stage recorded by the trace is the edited value, and what follows computes from it.
    assert np.array_equal(t["layers.0.attn_out"], linear(t["layers.0.attn"], w["layers.0.attention.wo.weight"]))


def test_a_glob_edits_every_layer_and_edits_apply_in_order(tiny):
    w, c = tiny.weights, tiny.config
    t = Trace(["layers.*.ffn_out"], edits=[Edit("layers.*.ffn_out", "replace", 1.0), Edit("layers.1.ffn_out", "scale", 3.0)])
    forward(w, c, B, trace=t)
    assert np.all(t["layers.0.ffn_out"] == 1) and np.all(t["layers.1.ffn_out"] == 3)


@pytest.mark.parametrize("make,fragment", [
    (lambda: Edit("layers.0.q", "shift", 1.0), "replace, add, scale, ablate"),
    (lambda: Edit("layers.0.q", "replace"), "give a value"),
    (lambda: Edit("layers.0.q", "ablate", 1.0), "ablate takes no value"),
])
def test_a_malformed_edit_is_refused(make, fragment):
    with pytest.raises(Llama3Error, match=fragment):
        make()


@pytest.mark.parametrize("edit,fragment", [
    (Edit("layers.0.h", "ablate", heads=(0,)), "has no heads"),
    (Edit("layers.0.k", "ablate", heads=(2,)), "has 2 heads"),
    (Edit("layers.0.h", "ablate", tokens=(8,)), "has 8 tokens"),
])
def test_an_edit_outside_its_stage_is_refused(tiny, edit, fragment):
    with pytest.raises(Llama3Error, match=fragment):
        forward(tiny.weights, tiny.config, B, trace=Trace([], edits=[edit]))


@pytest.mark.parametrize("start_from,cache,fragment", [
    (("layers.0.h", np.zeros((8, 64))), None, "starts from embed or layers.i.out"),
    (("layers.2.out", np.zeros((8, 64))), None, "starts from embed or layers.i.out"),
    (("layers.0.out", np.zeros((7, 64))), None, "shape"),
    (("layers.0.out", np.zeros((8, 64))), 16, "no KV cache"),
])
def test_a_bad_start_is_refused(tiny, start_from, cache, fragment):
    cache = KVCache(tiny.config, cache) if cache else None
    with pytest.raises(Llama3Error, match=fragment):
        forward(tiny.weights, tiny.config, B, cache=cache, start_from=start_from)
