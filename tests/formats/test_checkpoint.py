"""Canonical form from Hugging Face folders: the q/k rope permutation, names, tied embeddings,
sharding, both residencies, and validation before any data is read."""

import json
import mmap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from tests.checkpoint_builders import random_weights, tiny_config, write_meta, write_pth
from llama3_np import Llama3Error, linear
from llama3_np.formats.canonical import joined_names
from llama3_np.formats.checkpoint import (hf_name, load_checkpoint, meta_name, permute_qk, save_hf_checkpoint,
                                  scan_checkpoint, unpermute_qk)
from llama3_np.formats.safetensors_file import SafetensorsFile, write_safetensors


# --- rope row order ------------------------------------------------------------------------------

def test_permute_qk_moves_each_interleaved_pair_to_the_two_halves_of_its_head():
    n_heads, head_dim, cols = 3, 8, 5
    meta = np.arange(n_heads * head_dim * cols, dtype=np.float32).reshape(n_heads * head_dim, cols)
    hf = permute_qk(meta, n_heads)
    for h in range(n_heads):
        for i in range(head_dim // 2):
            np.testing.assert_array_equal(hf[h * head_dim + i], meta[h * head_dim + 2 * i])
            np.testing.assert_array_equal(hf[h * head_dim + head_dim // 2 + i], meta[h * head_dim + 2 * i + 1])
    np.testing.assert_array_equal(unpermute_qk(hf, n_heads), meta)
    np.testing.assert_array_equal(permute_qk(unpermute_qk(meta, n_heads), n_heads), meta)


def _rope_interleaved(x, pos, theta):  # [T, H, Dh] -> [T, H, Dh]; Meta: pairs (2i, 2i+1) rotate
    dh = x.shape[-1]
    angles = np.outer(pos, theta ** (-np.arange(0, dh, 2) / dh))[:, None, :]
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles)
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


def _rope_rotate_half(x, pos, theta):  # [T, H, Dh] -> [T, H, Dh]; Hugging Face: (i, i + Dh/2) rotate
    dh = x.shape[-1]
    angles = np.outer(pos, theta ** (-np.arange(0, dh, 2) / dh))
    cos = np.concatenate([np.cos(angles)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(angles)] * 2, -1)[:, None, :]
    rotated = np.concatenate([-x[..., dh // 2:], x[..., :dh // 2]], -1)
    return x * cos + rotated * sin


def test_meta_rope_on_unpermuted_weights_equals_hf_rope_on_hf_weights():
    rng = np.random.default_rng(1)
    n_heads, n_kv, dh, dim, t = 4, 2, 16, 24, 7
    wq_hf, wk_hf = rng.standard_normal((n_heads * dh, dim)), rng.standard_normal((n_kv * dh, dim))
    x, pos, theta = rng.standard_normal((t, dim)), np.arange(t) + 1000, 500000.0
    q_hf = _rope_rotate_half((x @ wq_hf.T).reshape(t, n_heads, dh), pos, theta)
    k_hf = _rope_rotate_half((x @ wk_hf.T).reshape(t, n_kv, dh), pos, theta)
    q_meta = _rope_interleaved((x @ unpermute_qk(wq_hf, n_heads).T).reshape(t, n_heads, dh), pos, theta)
    k_meta = _rope_interleaved((x @ unpermute_qk(wk_hf, n_kv).T).reshape(t, n_kv, dh), pos, theta)
    # Attention only sees per-head dot products q·k, which the row order must not change ...
    scores_hf = np.einsum("qhd,khd->hqk", q_hf, np.repeat(k_hf, n_heads // n_kv, axis=1))
    scores_meta = np.einsum("qhd,khd->hqk", q_meta, np.repeat(k_meta, n_heads // n_kv, axis=1))
    np.testing.assert_allclose(scores_meta, scores_hf, rtol=1e-12, atol=1e-10)
    # ... and the rotated vectors themselves are the same numbers in the other order.
    np.testing.assert_allclose(unpermute_qk(q_hf.reshape(t * n_heads, dh).T, 1).T.reshape(q_meta.shape),
                               q_meta, rtol=1e-12, atol=1e-12)
    # With the wrong (not un-permuted) order the scores differ: the test can fail.
    q_wrong = _rope_interleaved((x @ wq_hf.T).reshape(t, n_heads, dh), pos, theta)
    assert not np.allclose(np.einsum("qhd,khd->hqk", q_wrong, np.repeat(k_hf, 2, axis=1)), scores_hf)


def test_names_map_both_ways():
    assert hf_name("layers.3.feed_forward.w1.weight") == "model.layers.3.mlp.gate_proj.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert meta_name("model.layers.12.self_attn.k_proj.weight") == "layers.12.attention.wk.weight"
    assert meta_name("model.layers.0.post_attention_layernorm.weight") == "layers.0.ffn_norm.weight"
    assert meta_name("layers.0.attention.wq.weight") is None
    assert meta_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None


# --- loading Hugging Face folders ----------------------------------------------------------------

def _read_all(path) -> dict:
    """In-memory copies: a file must never be rewritten while mapped (its pages would vanish)."""
    f = SafetensorsFile(path)
    return {n: np.array(f.tensor(n)) for n in f.names()}


def _same_weights(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape, name
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32), err_msg=name)


def _joined_groups(ckpt) -> bool:
    """Whether every layer's q/k/v and gate/up are the row blocks of one array each (float32
    residency: read into it, `canonical.JOINED`), rather than arrays of their own (none of them)."""
    found = {linear.joined([ckpt.weights[name] for name in names])[0] is not None
             for names in joined_names(ckpt.config.n_layers)}
    assert len(found) == 1, "some groups joined, others not"
    return found.pop()


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("tied", [False, True])
def test_hf_folder_loads_to_the_canonical_weights_in_both_residencies(tmp_path, shards, tied):
    config = tiny_config(tie_embeddings=tied)
    weights = random_weights(config, seed=2)
    save_hf_checkpoint(tmp_path, config, weights, shards=shards)
    if shards > 1:
        assert len(list(tmp_path.glob("model-*-of-00003.safetensors"))) == 3
    stored = SafetensorsFile(tmp_path / "model.safetensors") if shards == 1 else None
    if stored is not None:  # on disk q is in rotate-half order, not Meta's
        assert not np.array_equal(stored.tensor("model.layers.0.self_attn.q_proj.weight"),
                                  weights["layers.0.attention.wq.weight"])
        assert ("lm_head.weight" in stored.names()) == (not tied)
    for residency in ("float32", "bfloat16"):
        ckpt = load_checkpoint(tmp_path, dtype=residency)
        assert ckpt.format == "hf" and ckpt.config == config and ckpt.dtype == residency
        _same_weights(ckpt.weights, weights)
        want = np.float32 if residency == "float32" else ml_dtypes.bfloat16
        assert all(w.dtype == want for w in ckpt.weights.values())
        assert (ckpt.weights["output.weight"] is ckpt.weights["tok_embeddings.weight"]) == tied
        # float32: converted copies, the files no longer needed; bfloat16: read-only file mappings
        assert ckpt.weights["layers.1.ffn_norm.weight"].flags.writeable == (residency == "float32")
        assert _joined_groups(ckpt) == (residency == "float32")


def test_bfloat16_residency_maps_the_file_instead_of_copying(tmp_path):
    config = tiny_config()
    save_hf_checkpoint(tmp_path, config, random_weights(config))
    ckpt = load_checkpoint(tmp_path, dtype="bfloat16")
    w2 = ckpt.weights["layers.0.feed_forward.w2.weight"]
    base = w2
    while not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else base.base
    assert len(base) >= w2.nbytes and not w2.flags.writeable
    # q and k change row order, which needs a copy (in bf16, still half the float32 size)
    wq = ckpt.weights["layers.0.attention.wq.weight"]
    assert wq.flags.writeable and wq.dtype == ml_dtypes.bfloat16


def test_tied_embeddings_stored_twice_are_shared_if_equal_and_refused_if_not(tmp_path):
    config = tiny_config(tie_embeddings=True)
    weights = random_weights(config)
    save_hf_checkpoint(tmp_path, config, weights)
    tensors = _read_all(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    write_safetensors(tmp_path / "model.safetensors", tensors, {"format": "pt"})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.weights["output.weight"] is ckpt.weights["tok_embeddings.weight"]
    tensors["lm_head.weight"] = -tensors["model.embed_tokens.weight"]
    write_safetensors(tmp_path / "model.safetensors", tensors, {"format": "pt"})
    with pytest.raises(Llama3Error, match="'lm_head.weight' differs from 'model.embed_tokens.weight'"):
        load_checkpoint(tmp_path)


def test_rotary_inv_freq_buffers_are_ignored_and_said_so(tmp_path):
    config = tiny_config()
    weights = random_weights(config)
    save_hf_checkpoint(tmp_path, config, weights)
    tensors = _read_all(tmp_path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    write_safetensors(tmp_path / "model.safetensors", tensors)
    index = scan_checkpoint(tmp_path)
    assert index.ignored == {"model.safetensors: model.layers.0.self_attn.rotary_emb.inv_freq":
                             "rope frequencies, recomputed from the config"}
    _same_weights(load_checkpoint(tmp_path).weights, weights)


def _edit(tmp_path, change_tensors=None, change_config=None):
    config = tiny_config()
    save_hf_checkpoint(tmp_path, config, random_weights(config))
    if change_tensors:
        tensors = _read_all(tmp_path / "model.safetensors")
        change_tensors(tensors)
        write_safetensors(tmp_path / "model.safetensors", tensors)
    if change_config:
        cfg = json.loads((tmp_path / "config.json").read_text())
        cfg.update(change_config)
        (tmp_path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change_tensors,change_config,message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), None,
     "tensor 'model.layers.1.mlp.up_proj.weight' (layers.1.feed_forward.w3.weight) is missing"),
    (lambda t: t.pop("lm_head.weight"), None,
     "'lm_head.weight' (output.weight) is missing (config.json says tie_word_embeddings is false)"),
    (lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}), None,
     "unexpected tensor 'model.layers.0.self_attn.q_norm.weight'; it is not part of a Llama 3 model"),
    (None, {"num_hidden_layers": 1},
     "unexpected tensor 'model.layers.1."),
    (None, {"num_hidden_layers": 3}, "'model.layers.2.self_attn.q_proj.weight' (layers.2.attention.wq.weight) is missing"),
    (None, {"num_key_value_heads": 4},
     "tensor 'model.layers.0.self_attn.k_proj.weight' (layers.0.attention.wk.weight) has shape (16, 32), "
     "but config.json implies (32, 32); the config does not belong to these weights"),
    (None, {"intermediate_size": 96}, "'model.layers.0.mlp.gate_proj.weight' (layers.0.feed_forward.w1.weight) "
     "has shape (64, 32), but config.json implies (96, 32)"),
    (lambda t: t.update({"model.norm.weight": np.ones(32, np.int32)}), None,
     "tensor 'model.norm.weight' (norm.weight) is stored as int32; llama3_np reads float32, float16 and bfloat16"),
])
def test_checkpoint_disagreeing_with_its_config_is_refused_before_reading_data(
        tmp_path, change_tensors, change_config, message):
    _edit(tmp_path, change_tensors, change_config)
    with pytest.raises(Llama3Error) as e:
        scan_checkpoint(tmp_path)
    assert str(tmp_path) in str(e.value) and message in str(e.value)


def test_sharded_folder_whose_index_disagrees_with_its_files(tmp_path):
    config = tiny_config()
    save_hf_checkpoint(tmp_path, config, random_weights(config), shards=2)
    original = (tmp_path / "model.safetensors.index.json").read_text()
    index = json.loads(original)
    name = "model.norm.weight"
    index["weight_map"][name] = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][name])
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(Llama3Error, match="holds tensor 'model.norm.weight', but model.safetensors.index.json puts it in"):
        scan_checkpoint(tmp_path)
    index = json.loads(original)
    index["weight_map"]["model.extra.weight"] = "model-00003-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(Llama3Error, match="model-00003-of-00002.safetensors: listed in model.safetensors.index.json "
                                          "but missing"):
        scan_checkpoint(tmp_path)


def _write(relative: str, content: str):
    def make(folder):
        (folder / relative).write_text(content)
        return folder / relative if relative.endswith(".gguf") else folder
    return make


@pytest.mark.parametrize("make,message", [
    (lambda p: p, "no config.json (Hugging Face) or params.json (Meta) here"),
    (lambda p: p / "nothing", "nothing: no such file or directory"),
    (_write("m.gguf", "GGUF"), "m.gguf: the file is truncated: it ends at byte 4, inside the header"),
    (_write("config.json", "{}"), "config.json: missing key 'hidden_size'"),
    (_write("config.json", "{,"), "config.json: not valid JSON"),
])
def test_wrong_paths_say_what_to_pass(tmp_path, make, message):
    with pytest.raises(Llama3Error) as e:
        load_checkpoint(make(tmp_path))
    assert message in str(e.value)


def test_residency_must_be_float32_or_bfloat16_or_a_gguf_files_own(tmp_path):
    with pytest.raises(Llama3Error, match="dtype must be one of float32, bfloat16, gguf, got 'float16'"):
        load_checkpoint(tmp_path, dtype="float16")
    with pytest.raises(Llama3Error, match="dtype gguf keeps a GGUF file's own blocks; this is a hf checkpoint"):
        load_checkpoint(Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints" / "hf", dtype="gguf")


# --- Meta folders (written here without torch; tests/formats/test_checkpoint_formats.py has torch's) ----------

AXES = {"tok_embeddings": 0, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("tied", [False, True])
def test_meta_folder_loads_merged_and_tied(tmp_path, shards, tied):
    config = tiny_config(tie_embeddings=tied)
    weights = random_weights(config, seed=3)
    stored = {k: v for k, v in weights.items() if not (tied and k == "output.weight")}
    write_meta(tmp_path, stored, shards=shards, axes=AXES)
    for residency in ("float32", "bfloat16"):
        ckpt = load_checkpoint(tmp_path, dtype=residency)
        assert ckpt.format == "meta" and ckpt.config == config
        _same_weights(ckpt.weights, weights)
        assert (ckpt.weights["output.weight"] is ckpt.weights["tok_embeddings.weight"]) == tied
        assert _joined_groups(ckpt) == (residency == "float32")
        if residency == "bfloat16":  # one shard: mapped from the file; merged shards: a bf16 copy
            assert ckpt.weights["layers.0.feed_forward.w2.weight"].dtype == ml_dtypes.bfloat16
            assert ckpt.weights["layers.0.feed_forward.w2.weight"].flags.writeable == (shards > 1)


def test_meta_rope_factor_is_resolved_and_can_be_overridden(tmp_path):
    config = tiny_config()
    write_meta(tmp_path / "meta", random_weights(config), axes=AXES)
    assert load_checkpoint(tmp_path / "meta").config.rope_scaling.factor == 8.0
    assert load_checkpoint(tmp_path / "meta", rope_factor=32.0).config.rope_scaling.factor == 32.0
    save_hf_checkpoint(tmp_path / "hf", config, random_weights(config))
    with pytest.raises(Llama3Error, match="a rope factor override applies to Meta params.json only"):
        load_checkpoint(tmp_path / "hf", rope_factor=32.0)


def test_meta_rope_freqs_buffer_is_ignored_other_extras_are_not(tmp_path):
    weights = random_weights(tiny_config())
    write_meta(tmp_path / "a", dict(weights, **{"rope.freqs": np.ones(4, np.float32)}), axes=AXES)
    assert scan_checkpoint(tmp_path / "a").ignored == {
        "consolidated.00.pth: rope.freqs": "rope frequencies, recomputed from the config"}
    write_meta(tmp_path / "b", dict(weights, **{"layers.0.attention.bias": np.ones(4, np.float32)}), axes=AXES)
    with pytest.raises(Llama3Error, match="consolidated.00.pth: unexpected tensor 'layers.0.attention.bias'"):
        scan_checkpoint(tmp_path / "b")


def test_meta_shards_that_do_not_belong_together(tmp_path):
    weights = random_weights(tiny_config())
    folder = write_meta(tmp_path / "gap", weights, shards=2, axes=AXES)
    (folder / "consolidated.01.pth").rename(folder / "consolidated.02.pth")
    with pytest.raises(Llama3Error, match="shards must be consolidated.00.pth to consolidated.01.pth without gaps; "
                                          "found consolidated.00.pth, consolidated.02.pth"):
        scan_checkpoint(folder)

    folder = write_meta(tmp_path / "keys", weights, shards=2, axes=AXES)
    write_pth(folder / "consolidated.01.pth", {k: v for k, v in weights.items() if k != "norm.weight"})
    with pytest.raises(Llama3Error, match="consolidated.01.pth: its tensors differ from consolidated.00.pth's "
                                          r"\(for example 'norm.weight'\)"):
        scan_checkpoint(folder)

    folder = write_meta(tmp_path / "norms", weights, shards=2, axes=AXES)
    other = dict(weights)
    other["layers.1.ffn_norm.weight"] = -weights["layers.1.ffn_norm.weight"]
    write_meta(tmp_path / "other", other, shards=2, axes=AXES)
    (tmp_path / "other" / "consolidated.01.pth").replace(folder / "consolidated.01.pth")
    scan_checkpoint(folder)  # shapes agree: only the data shows it
    with pytest.raises(Llama3Error, match="consolidated.01.pth: tensor 'layers.1.ffn_norm.weight' should be "
                                          "replicated across shards but differs from consolidated.00.pth's"):
        load_checkpoint(folder)

    folder = write_meta(tmp_path / "dtype", weights, shards=2, axes=AXES)
    write_meta(tmp_path / "f32", {k: np.asarray(v, np.float32) for k, v in weights.items()}, shards=2, axes=AXES)
    (tmp_path / "f32" / "consolidated.01.pth").replace(folder / "consolidated.01.pth")
    with pytest.raises(Llama3Error, match="tensor 'tok_embeddings.weight' is float32 here but bfloat16 in "
                                          "consolidated.00.pth"):
        scan_checkpoint(folder)


def test_eos_ids_come_from_config_and_generation_config(tmp_path):
    config = tiny_config()
    save_hf_checkpoint(tmp_path, config, random_weights(config))
    assert load_checkpoint(tmp_path).eos_ids == ()
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, eos_token_id=[40, 41])))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [41, 47], "bos_token_id": 1}))
    assert load_checkpoint(tmp_path).eos_ids == (40, 41, 47)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(Llama3Error, match="generation_config.json: eos_token_id must be a token id or a list"):
        load_checkpoint(tmp_path)


def _stale_index_entry(folder, tensor: str, shard: str):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"][tensor] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_a_stale_index_entry_for_a_tensor_the_model_does_not_need_is_one_warning(tmp_path, capsys):
    """A tied checkpoint whose index still lists lm_head.weight in a shard that does not hold it
    loads, as in transformers (which loads what the shards hold), with one warning line."""
    config = tiny_config(tie_embeddings=True)
    weights = random_weights(config)
    save_hf_checkpoint(tmp_path, config, weights, shards=2)
    _stale_index_entry(tmp_path, "lm_head.weight", "model-00002-of-00002.safetensors")
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.weights["output.weight"] is ckpt.weights["tok_embeddings.weight"]
    _same_weights(ckpt.weights, weights)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llama3-np: warning: "), err
    assert "'lm_head.weight' (listed in 'model-00002-of-00002.safetensors')" in err, err


def test_a_tensor_the_model_needs_that_no_shard_holds_is_an_error(tmp_path, capsys):
    config = tiny_config(tie_embeddings=True)
    save_hf_checkpoint(tmp_path, config, random_weights(config), shards=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    tensors = _read_all(tmp_path / shard)
    del tensors["model.norm.weight"]
    write_safetensors(tmp_path / shard, tensors)
    with pytest.raises(Llama3Error) as e:
        scan_checkpoint(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'model.safetensors.index.json'}: puts tensor 'model.norm.weight' in "
                            f"'{shard}', which does not hold it, and no other shard does; download the shards again")
    assert capsys.readouterr().err == ""
