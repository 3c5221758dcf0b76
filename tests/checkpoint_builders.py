"""Tiny random Llama 3 checkpoints for the checkpoint tests (written in the test, never committed)."""

import dataclasses

import ml_dtypes
import numpy as np

from llama3_np.checkpoint import expected_shapes
from llama3_np.config import ModelConfig, RopeScaling

TINY = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, vocab_size=48,
                   norm_eps=1e-5, rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
                   max_seq_len=131072, tie_embeddings=False)


def tiny_config(**changes) -> ModelConfig:
    return dataclasses.replace(TINY, **changes)


def random_weights(config: ModelConfig, seed: int = 0) -> dict:
    """Canonical weights (Meta names and layout), bf16, every tensor distinct; tied ones shared."""
    rng = np.random.default_rng(seed)
    weights = {name: (rng.standard_normal(shape) * 0.5).astype(ml_dtypes.bfloat16)
               for name, shape in expected_shapes(config).items()}
    if config.tie_embeddings:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    return weights
