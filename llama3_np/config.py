"""ModelConfig: every number the Llama 3 math needs, read from a checkpoint's own config file.

Two sources are understood:
- Hugging Face `config.json` (`LlamaForCausalLM`), with rope settings either under the older
  `rope_theta` / `rope_scaling` keys or under the newer `rope_parameters` key;
- Meta `params.json`, where the FFN size is derived from `dim`, `multiple_of` and
  `ffn_dim_multiplier`, and `use_scaled_rope: true` asks for "llama3" rope scaling without saying
  by which factor.

Nothing here reads files: callers pass the parsed JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

from .dtypes import bfloat16
from .errors import Llama3Error, ParameterError

# Llama 3.0 was trained with an 8,192-token context; 3.1, 3.2 and 3.3 extend it to 131,072 with
# "llama3" rope scaling, whose formula needs the original length.
LLAMA3_ORIGINAL_CONTEXT = 8192
LLAMA31_CONTEXT = 131072

# The "llama3" scaling constants of Meta's release (llama-models' apply_scaling); Hugging Face
# configs spell them out, Meta's params.json does not.
META_LOW_FREQ_FACTOR = 1.0
META_HIGH_FREQ_FACTOR = 4.0
META_SCALE_FACTOR = 8.0
# Llama 3.2 1B and 3B were trained with factor 32 (their Hugging Face configs say so), but their
# params.json only says `use_scaled_rope: true`. They are recognised by (dim, n_layers).
META_FACTOR_32_SHAPES = {(2048, 16), (3072, 28)}
META_SCALE_FACTOR_32 = 32.0

# Where a "llama3" scaling factor came from (RopeScaling.factor_source), most trusted first: a
# Meta params.json says `use_scaled_rope` but not the factor.
ROPE_FACTOR_SOURCES = {
    "override": "given as an override",
    "config": "stated by the checkpoint's config",
    "hf_config": "stated by the Hugging Face config.json of the download this original/ folder belongs to",
    "shape": "inferred from the shape: Llama 3.2 1B and 3B use 32",
    "default": "Meta's default for use_scaled_rope (Llama 3.1)",
}


@dataclass(frozen=True)
class RopeScaling:
    """The "llama3" rope frequency scaling of Llama 3.1 and later (see `model.rope_frequencies`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_context: int  # `original_max_position_embeddings`
    # Where `factor` came from (a key of ROPE_FACTOR_SOURCES). Not part of the math: configs that
    # differ only here are equal.
    factor_source: str = field(default="config", compare=False)


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions (the legend used throughout `model.py`) and constants of one Llama 3 model."""

    dim: int  # D
    n_layers: int
    n_heads: int  # H
    n_kv_heads: int  # KV
    head_dim: int  # Dh
    ffn_dim: int  # F
    vocab_size: int  # V
    norm_eps: float
    rope_theta: float
    rope_scaling: Optional[RopeScaling]
    max_seq_len: int  # the context length the model was trained for
    tie_embeddings: bool  # output projection shares the embedding matrix (3.2 1B/3B)

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                     "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise Llama3Error(f"config: {name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise Llama3Error(
                f"config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                f"({self.n_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise Llama3Error(f"config: head_dim must be even for rope, got {self.head_dim}")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise Llama3Error(f"config: norm_eps must be a positive number, got {self.norm_eps!r}")
        if not (self.rope_theta > 1 and math.isfinite(self.rope_theta)):
            raise Llama3Error(f"config: rope_theta must be a number > 1, got {self.rope_theta!r}")
        s = self.rope_scaling
        if s is not None and not (s.factor >= 1 and s.high_freq_factor > s.low_freq_factor > 0
                                  and s.original_context > 0):
            raise Llama3Error(f"config: rope scaling values are inconsistent: {s}")

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        """Every field the math uses (a dump's `config`): not the rope factor's source."""
        d = dataclasses.asdict(self)
        if d["rope_scaling"] is not None:
            del d["rope_scaling"]["factor_source"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of `to_dict` (used for the config stored in dump files)."""
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _need(cfg: Mapping[str, Any], key: str, source: str):
    if key not in cfg:
        raise Llama3Error(f"{source}: missing key {key!r}; is this a Llama 3 checkpoint's config?")
    return cfg[key]


def _number(value, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Llama3Error(f"{source}: {key} must be a number, got {value!r}")
    return float(value)


def _integer(value, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Llama3Error(f"{source}: {key} must be an integer, got {value!r}")
    return value


def from_hf_config(cfg: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig from a Hugging Face `LlamaForCausalLM` config.json object."""
    if not isinstance(cfg, Mapping):
        raise Llama3Error(f"{source}: expected a JSON object")
    model_type = cfg.get("model_type", "llama")
    if model_type != "llama":
        raise Llama3Error(f"{source}: model_type is {model_type!r}; llama3_np runs 'llama' models only")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise Llama3Error(f"{source}: {flag} is true; Llama 3 has no biases and llama3_np does not support them")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise Llama3Error(f"{source}: hidden_act is {act!r}; Llama 3 uses 'silu'")

    dim = _integer(_need(cfg, "hidden_size", source), "hidden_size", source)
    n_heads = _integer(_need(cfg, "num_attention_heads", source), "num_attention_heads", source)
    n_kv_heads = _integer(cfg.get("num_key_value_heads") or n_heads, "num_key_value_heads", source)
    head_dim = cfg.get("head_dim") or (dim // n_heads if n_heads else 0)

    # Rope settings: newer transformers write one `rope_parameters` object (which holds the theta
    # too); older ones write `rope_theta` plus an optional `rope_scaling` object.
    rope = cfg.get("rope_parameters")
    if rope is not None:
        if not isinstance(rope, Mapping):
            raise Llama3Error(f"{source}: rope_parameters must be an object, got {rope!r}")
        theta = rope.get("rope_theta", cfg.get("rope_theta"))
        if theta is None:
            raise Llama3Error(f"{source}: rope_parameters has no rope_theta")
    else:
        theta = cfg.get("rope_theta", 10000.0)
        rope = cfg.get("rope_scaling") or {}
        if not isinstance(rope, Mapping):
            raise Llama3Error(f"{source}: rope_scaling must be an object, got {rope!r}")
    theta = _number(theta, "rope_theta", source)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        scaling = None
    elif rope_type == "llama3":
        scaling = RopeScaling(
            factor=_number(_need(rope, "factor", source + " rope"), "factor", source),
            low_freq_factor=_number(_need(rope, "low_freq_factor", source + " rope"), "low_freq_factor", source),
            high_freq_factor=_number(_need(rope, "high_freq_factor", source + " rope"), "high_freq_factor", source),
            original_context=_integer(_need(rope, "original_max_position_embeddings", source + " rope"),
                                      "original_max_position_embeddings", source),
        )
    else:
        raise Llama3Error(f"{source}: rope type {rope_type!r} is not used by Llama 3; "
                          "supported: 'default' (3.0) and 'llama3' (3.1 and later)")

    return ModelConfig(
        dim=dim,
        n_layers=_integer(_need(cfg, "num_hidden_layers", source), "num_hidden_layers", source),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=_integer(head_dim, "head_dim", source),
        ffn_dim=_integer(_need(cfg, "intermediate_size", source), "intermediate_size", source),
        vocab_size=_integer(_need(cfg, "vocab_size", source), "vocab_size", source),
        norm_eps=_number(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps", source),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=_integer(cfg.get("max_position_embeddings", LLAMA3_ORIGINAL_CONTEXT),
                             "max_position_embeddings", source),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """FFN width of Meta's FeedForward: 2/3 of 4·dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_rope_factor(dim: int, n_layers: int) -> tuple[float, str]:
    """The "llama3" scaling factor a Meta params.json with `use_scaled_rope: true` and nothing
    else to go by means, and its source ("shape" or "default")."""
    if (dim, n_layers) in META_FACTOR_32_SHAPES:
        return META_SCALE_FACTOR_32, "shape"
    return META_SCALE_FACTOR, "default"


def from_meta_params(params: Mapping[str, Any], tie_embeddings: bool = False,
                     rope_factor: Optional[float] = None,
                     source: str = "params.json", hf_config: Optional[ModelConfig] = None) -> ModelConfig:
    """ModelConfig from a Meta `params.json` object.

    `tie_embeddings` comes from the weights (a Meta checkpoint without `output.weight`).
    `use_scaled_rope: true` does not say the scaling factor; it is, in this order: `rope_factor`
    (an override), params.json's own `rope_scaling_factor`, the factor of `hf_config` (the
    Hugging Face config of the download this Meta folder is the `original/` folder of, when it
    describes the same dim and layers and states llama3 scaling), 32 for the Llama 3.2 1B/3B
    shapes, else Meta's 8. `rope_scaling.factor_source` records which.
    """
    if not isinstance(params, Mapping):
        raise Llama3Error(f"{source}: expected a JSON object")
    dim = _integer(_need(params, "dim", source), "dim", source)
    n_layers = _integer(_need(params, "n_layers", source), "n_layers", source)
    n_heads = _integer(_need(params, "n_heads", source), "n_heads", source)
    n_kv_heads = _integer(params.get("n_kv_heads") or n_heads, "n_kv_heads", source)
    vocab_size = _integer(_need(params, "vocab_size", source), "vocab_size", source)
    if vocab_size <= 0:
        raise Llama3Error(f"{source}: vocab_size is {vocab_size}; Llama 3 uses 128256")
    multiplier = params.get("ffn_dim_multiplier")
    if multiplier is not None:
        multiplier = _number(multiplier, "ffn_dim_multiplier", source)
    multiple_of = _integer(params.get("multiple_of", 256), "multiple_of", source)
    if multiple_of <= 0:
        raise Llama3Error(f"{source}: multiple_of must be positive, got {multiple_of}")

    scaled = bool(params.get("use_scaled_rope", False))
    if rope_factor is not None and not scaled:
        raise Llama3Error(f"{source}: a rope factor was given but use_scaled_rope is false")
    if scaled:
        if rope_factor is not None:
            factor, factor_source = rope_factor, "override"
        elif params.get("rope_scaling_factor") is not None:
            factor, factor_source = params["rope_scaling_factor"], "config"
        elif (hf_config is not None and hf_config.rope_scaling is not None
              and (hf_config.dim, hf_config.n_layers) == (dim, n_layers)):
            factor, factor_source = hf_config.rope_scaling.factor, "hf_config"
        else:
            factor, factor_source = meta_rope_factor(dim, n_layers)
        scaling = RopeScaling(
            factor=_number(factor, "rope_scaling_factor", source),
            low_freq_factor=META_LOW_FREQ_FACTOR,
            high_freq_factor=_number(params.get("high_freq_factor", META_HIGH_FREQ_FACTOR),
                                     "high_freq_factor", source),
            original_context=LLAMA3_ORIGINAL_CONTEXT,
            factor_source=factor_source,
        )
    else:
        scaling = None

    if dim % n_heads:
        raise Llama3Error(f"{source}: dim ({dim}) is not a multiple of n_heads ({n_heads})")
    return ModelConfig(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=dim // n_heads,
        ffn_dim=meta_ffn_dim(dim, multiple_of, multiplier),
        vocab_size=vocab_size,
        norm_eps=_number(params.get("norm_eps", 1e-5), "norm_eps", source),
        rope_theta=_number(params.get("rope_theta", 500000.0), "rope_theta", source),
        rope_scaling=scaling,
        max_seq_len=LLAMA31_CONTEXT if scaled else LLAMA3_ORIGINAL_CONTEXT,
        tie_embeddings=tie_embeddings,
    )


# ---------------------------------------------------------------------------------------------
# Compute modes

# The dtypes `forward` can compute in (`ComputeMode.dtype`), most precise first, then llama.cpp's
# arithmetic ("llamacpp": float32 with quantized activations, `llama3_np.llamacpp`).
COMPUTE_DTYPES = ("float64", "float32", "bfloat16", "float16", "llamacpp")
# Where a bfloat16 or float16 engine rounds (`ComputeMode.casts`): as Hugging Face transformers'
# LlamaForCausalLM does, or as Meta's llama-models Transformer does (`model.py` cites both per stage).
CONVENTIONS = ("transformers", "meta")


@dataclass(frozen=True)
class ComputeMode:
    """What `model.forward` computes in (`dtype`), and for bfloat16 and float16 where it rounds
    (`convention`).

    - "float32" (the default): every stage in float32, weights converted exactly from bfloat16.
    - "float64": every stage in float64, weights upcast exactly: the value float32 (and any engine)
      is measured against.
    - "bfloat16", "float16": the arithmetic of an engine holding weights and activations in that
      dtype on a CPU: every product accumulated in float32, and every stage's result rounded to the
      dtype (round to nearest even, by ml_dtypes' and NumPy's float16 conversions) where the engine
      rounds it. `convention` says which engine: "transformers" (LlamaForCausalLM, eager attention)
      or "meta" (llama-models' Transformer); they differ in rope and in the attention scale
      (`model.rope`, `model.causal_attention`).
    - "llamacpp": llama.cpp's CPU arithmetic on a GGUF's own blocks (`llama3_np.llamacpp`, which
      says where it rounds): every stage in float32, each product's activation rows converted to
      the weight's vec_dot_type first (Q8_0, Q8_1 or Q8_K blocks for a quantized weight, float16
      for a float16 one), the KV cache in float16, and q and the attention probabilities rounded
      to float16 for their products with it.
    In float32, float64 and llamacpp the convention changes nothing (in float32 and float64 both
    references compute as llama3_np does, up to the order of float32 sums) and is kept as
    "transformers".

    `work` is the NumPy dtype arrays are held in between stages (float32; float64 in float64 mode);
    `storage` the dtype of the KV cache and of the weights the mode computes with; `rounded(x)`
    rounds a work array's values to `dtype` (the identity in float32 and float64); `casts` is the
    convention when the mode rounds, else None.
    Raises ParameterError("compute") for a dtype not in COMPUTE_DTYPES, ParameterError("convention")
    for a convention not in CONVENTIONS.
    """

    dtype: str = "float32"
    convention: str = "transformers"

    def __post_init__(self):
        if self.dtype not in COMPUTE_DTYPES:
            raise ParameterError("compute", f"compute must be one of {', '.join(COMPUTE_DTYPES)}, got {self.dtype!r}")
        if self.convention not in CONVENTIONS:
            raise ParameterError("convention", f"convention must be one of {', '.join(CONVENTIONS)}, "
                                               f"got {self.convention!r}")
        if self.dtype in ("float64", "float32", "llamacpp"):
            object.__setattr__(self, "convention", "transformers")

    @property
    def work(self) -> np.dtype:
        return np.dtype(np.float64 if self.dtype == "float64" else np.float32)

    @property
    def storage(self) -> np.dtype:
        if self.dtype == "llamacpp":  # its KV cache (llama.cpp's default -ctk/-ctv f16)
            return np.dtype(np.float16)
        return bfloat16() if self.dtype == "bfloat16" else np.dtype(self.dtype)

    @property
    def casts(self) -> Optional[str]:
        return self.convention if self.dtype in ("bfloat16", "float16") else None

    @property
    def name(self) -> str:
        """"bfloat16", or "bfloat16 (meta)" for Meta's convention: how dumps and reports name it."""
        return self.dtype if self.casts in (None, "transformers") else f"{self.dtype} ({self.convention})"

    def rounded(self, x: np.ndarray) -> np.ndarray:
        if self.casts is None:
            return x
        with np.errstate(over="ignore"):  # float16 overflow becomes inf, which forward reports by stage
            return x.astype(self.storage).astype(np.float32)

    def weight(self, w: np.ndarray, name: str = "") -> np.ndarray:
        """Weight `name` as this mode computes with it: rounded to bfloat16 or float16 (a copy
        unless it is stored so already), as the engines hold it; as it is in float32 and float64
        (`linear` converts it exactly).
        In llamacpp mode a matrix as llama.cpp multiplies it (`llamacpp.llamacpp_weight`); a weight
        load_model wrapped so is its stored weight in every other mode.
        Raises ParameterError("compute") for a weight beyond float16's range."""
        from .llamacpp import LlamaCppWeight, llamacpp_weight  # here, not at the top: llamacpp imports formats

        if self.dtype == "llamacpp":
            return llamacpp_weight(w, name)
        if isinstance(w, LlamaCppWeight):
            w = w.base
        if self.casts is None or w.dtype == self.storage:
            return w
        with np.errstate(over="ignore"):
            converted = np.asarray(w).astype(self.storage)
        if self.dtype == "float16" and not np.isfinite(converted).all():
            raise ParameterError("compute", f"weight {name} holds values beyond ±65504, float16's largest: "
                                            "compute in bfloat16 or float32")
        return converted

    def kv_operand(self, x: np.ndarray) -> np.ndarray:
        """x as a product with the KV cache multiplies it: rounded to float16 in llamacpp mode
        (`llamacpp.kv_operand`), x itself in every other."""
        if self.dtype != "llamacpp":
            return x
        from .llamacpp import kv_operand

        return kv_operand(x)

    @classmethod
    def of(cls, compute: "str | ComputeMode", convention: str = "transformers") -> "ComputeMode":
        """`compute` itself, or the mode of that name and convention."""
        return compute if isinstance(compute, ComputeMode) else cls(compute, convention)
