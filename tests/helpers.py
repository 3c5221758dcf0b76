"""Shared test helpers: error measures that print themselves, and small random models."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from llama3_np.config import ModelConfig, RopeScaling


def nmse(ours, ref) -> float:
    """Normalised MSE: sum of squared differences over sum of squared reference values."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != reference shape {ref.shape}"
    return float(np.sum((ours - ref) ** 2) / max(np.sum(ref ** 2), 1e-300))


def max_rel_err(ours, ref) -> float:
    """Largest |ours - ref| relative to the largest |ref| (so near-zero entries do not dominate)."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-300))


def assert_close(ours, ref, name: str, nmse_tol: float, rel_tol: float | None = None) -> None:
    e = nmse(ours, ref)
    r = max_rel_err(ours, ref)
    assert e <= nmse_tol, f"{name}: NMSE {e:.3e} > {nmse_tol:.0e} (max rel err {r:.3e})"
    if rel_tol is not None:
        assert r <= rel_tol, f"{name}: max rel err {r:.3e} > {rel_tol:.0e} (NMSE {e:.3e})"


def tiny_config(**changes) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                vocab_size=128, norm_eps=1e-5, rope_theta=500000.0,
                rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), max_seq_len=131072,
                tie_embeddings=False)
    base.update(changes)
    return ModelConfig(**base)


def random_weights(config: ModelConfig, seed: int = 0, dtype=np.float32) -> dict:
    """Random weights in canonical (Meta) form, rounded to bfloat16 as real checkpoints are."""
    rng = np.random.default_rng(seed)
    D, F, V = config.dim, config.ffn_dim, config.vocab_size
    H, KV, Dh = config.n_heads, config.n_kv_heads, config.head_dim

    def mat(rows, cols):
        return rng.normal(0, 1 / np.sqrt(cols), (rows, cols))

    w = {"tok_embeddings.weight": rng.normal(0, 1, (V, D)), "norm.weight": 1 + 0.1 * rng.normal(size=D)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        w.update({
            p + "attention.wq.weight": mat(H * Dh, D), p + "attention.wk.weight": mat(KV * Dh, D),
            p + "attention.wv.weight": mat(KV * Dh, D), p + "attention.wo.weight": mat(D, H * Dh),
            p + "feed_forward.w1.weight": mat(F, D), p + "feed_forward.w2.weight": mat(D, F),
            p + "feed_forward.w3.weight": mat(F, D),
            p + "attention_norm.weight": 1 + 0.1 * rng.normal(size=D),
            p + "ffn_norm.weight": 1 + 0.1 * rng.normal(size=D),
        })
    w = {k: v.astype(ml_dtypes.bfloat16).astype(dtype) for k, v in w.items()}
    w["output.weight"] = (w["tok_embeddings.weight"] if config.tie_embeddings
                          else (rng.normal(0, 1 / np.sqrt(D), (V, D))).astype(ml_dtypes.bfloat16).astype(dtype))
    return w
