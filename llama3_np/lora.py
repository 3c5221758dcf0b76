"""LoRA: low-rank adapters on chosen projections (Hu et al., arXiv 2106.09685), as Hugging Face
`peft` defines, initialises and stores them.

An adapted projection computes W·x + s·B·(A·x), W [n_out, n_in] frozen, A [r, n_in], B [n_out, r],
s = lora_alpha / r. peft initialises A as `kaiming_uniform_(a=√5)`, uniform in ±1/√n_in, and B as
zeros, so training starts from the base model. The gradients follow from the full weight's:
with W' = W + s·B·A, dL/dA = s·Bᵀ·dL/dW' and dL/dB = s·dL/dW'·Aᵀ.

Adapters are kept under the canonical names of the weights they adapt (`layers.0.attention.wq.weight`
-> A and B), in Meta's rope layout; `save_adapter` writes peft's layout (`adapter_config.json`,
`adapter_model.safetensors` with transformers' module names, q/k rows of B permuted as transformers
stores q/k), which `peft.PeftModel.from_pretrained` loads, and `load_adapter` reads it back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from .config import ModelConfig
from .errors import Llama3Error, ParameterError
from .formats.checkpoint import hf_name, permute_qk, unpermute_qk
from .files import make_folder, read_json, write_text
from .formats.safetensors_file import SafetensorsFile, write_safetensors

# peft's target_modules names (transformers' module names) -> the canonical projection.
TARGETS = {"q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv", "o_proj": "attention.wo",
           "gate_proj": "feed_forward.w1", "up_proj": "feed_forward.w3", "down_proj": "feed_forward.w2"}
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraConfig:
    """peft's `LoraConfig` fields that change the math: rank `r`, `lora_alpha`, `target_modules`."""

    r: int = 8
    lora_alpha: float = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        if self.r < 1:
            raise ParameterError("lora_r", f"the LoRA rank must be >= 1, got {self.r}")
        unknown = [t for t in self.target_modules if t not in TARGETS]
        if unknown or not self.target_modules:
            raise ParameterError("lora_target", f"{', '.join(unknown) or 'nothing'} names no projection; "
                                                f"targets are {', '.join(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.r

    def names(self, config: ModelConfig) -> list[str]:
        """The canonical names of the adapted weights."""
        return [f"layers.{i}.{TARGETS[t]}.weight" for i in range(config.n_layers) for t in self.target_modules]


class LoraWeight:
    """A weight with its adapter, not merged: `llama3_np.linear` computes W·x + s·B·(A·x);
    `np.asarray` gives the merged W + s·B·A (what the backward pass multiplies by)."""

    def __init__(self, base: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float):
        self.base, self.a, self.b, self.scale = base, a, b, scale
        self.shape, self.ndim = base.shape, 2

    def __array__(self, dtype=None, copy=None):
        merged = np.asarray(self.base, dtype=np.float32) + np.float32(self.scale) * (self.b @ self.a)
        return merged if dtype is None else merged.astype(dtype, copy=False)


def init_adapter(weights: Mapping[str, np.ndarray], config: ModelConfig, lora: LoraConfig,
                 seed: int) -> dict[str, np.ndarray]:
    """New adapters, {NAME.lora_A: [r, n_in], NAME.lora_B: [n_out, r]} in float32, as peft makes them."""
    rng = np.random.default_rng(seed)
    adapter = {}
    for name in lora.names(config):
        n_out, n_in = weights[name].shape
        adapter[name + ".lora_A"] = rng.uniform(-1, 1, (lora.r, n_in)).astype(np.float32) / np.float32(np.sqrt(n_in))
        adapter[name + ".lora_B"] = np.zeros((n_out, lora.r), dtype=np.float32)
    return adapter


def adapted(weights: Mapping[str, np.ndarray], adapter: Mapping[str, np.ndarray], scale: float) -> dict:
    """`weights` with every adapted weight a LoraWeight (the others as they are).

    Raises Llama3Error when an adapter's shape does not fit its weight."""
    out = dict(weights)
    for key in adapter:
        if key.endswith(".lora_A"):
            name = key[:-len(".lora_A")]
            a, b = adapter[key], adapter[name + ".lora_B"]
            (n_out, n_in), r = weights[name].shape, a.shape[0]
            if a.shape != (r, n_in) or b.shape != (n_out, r):
                raise Llama3Error(f"the adapter of {name} has A {a.shape} and B {b.shape}; the weight is "
                                  f"{weights[name].shape}: an adapter of another model")
            out[name] = LoraWeight(weights[name], a, b, scale)
    return out


def adapter_gradients(grads: Mapping[str, np.ndarray], adapter: Mapping[str, np.ndarray],
                      scale: float) -> dict[str, np.ndarray]:
    """dL/dA = s·Bᵀ·dL/dW' and dL/dB = s·dL/dW'·Aᵀ for every adapter, from the adapted weights' gradients."""
    out = {}
    for key in adapter:
        if key.endswith(".lora_A"):
            name = key[:-len(".lora_A")]
            a, b, g = adapter[key], adapter[name + ".lora_B"], grads[name]
            out[key] = g.dtype.type(scale) * (b.T @ g)
            out[name + ".lora_B"] = g.dtype.type(scale) * (g @ a.T)
    return out


def _peft_key(name: str, part: str) -> str:
    return "base_model.model." + hf_name(name)[:-len(".weight")] + f".{part}.weight"


def _heads(name: str, config: ModelConfig):
    return {"wq": config.n_heads, "wk": config.n_kv_heads}.get(name.split(".")[-2])


def save_adapter(folder: Path, adapter: Mapping[str, np.ndarray], lora: LoraConfig, config: ModelConfig,
                 base_model: str = "") -> None:
    """peft's adapter folder: adapter_config.json and adapter_model.safetensors (float32), each file
    written whole or not at all (`llama3_np.files`). Raises WriteError when the folder cannot be written."""
    tensors = {}
    for key, array in adapter.items():
        name, part = key.rsplit(".", 1)
        heads = _heads(name, config)
        tensors[_peft_key(name, part)] = permute_qk(array, heads) if heads and part == "lora_B" else array
    make_folder(folder)
    write_safetensors(folder / WEIGHTS_FILE, tensors, {"format": "pt"})
    write_text(folder / CONFIG_FILE, json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.r, "lora_alpha": lora.lora_alpha,
        "target_modules": list(lora.target_modules), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "base_model_name_or_path": base_model}, indent=2) + "\n")


def load_adapter(folder, config: ModelConfig) -> tuple[dict[str, np.ndarray], LoraConfig]:
    """A peft LoRA adapter folder as (adapter under canonical names, its LoraConfig).

    Raises Llama3Error for a folder that is not a LoRA adapter of this model's shape."""
    folder = Path(folder)
    try:
        settings = read_json(folder / CONFIG_FILE, expect=dict)
    except Llama3Error as e:
        raise Llama3Error(f"adapter {folder}: not a peft adapter folder ({e})") from None
    if settings.get("peft_type") != "LORA" or settings.get("use_dora") or settings.get("use_rslora"):
        raise Llama3Error(f"adapter {folder}: a {settings.get('peft_type')} adapter"
                          f"{' with DoRA or rsLoRA' if settings.get('peft_type') == 'LORA' else ''}; "
                          "llama3_np runs plain LoRA adapters")
    targets = settings.get("target_modules") or []
    lora = LoraConfig(int(settings["r"]), float(settings["lora_alpha"]), tuple(targets))
    stored = SafetensorsFile(folder / WEIGHTS_FILE)
    adapter = {}
    for name in lora.names(config):
        for part in ("lora_A", "lora_B"):
            key = _peft_key(name, part)
            if key not in stored.names():
                raise Llama3Error(f"adapter {folder}: {WEIGHTS_FILE} has no {key}")
            array = np.array(stored.tensor(key), dtype=np.float32)
            heads = _heads(name, config)
            adapter[f"{name}.{part}"] = unpermute_qk(array, heads) if heads and part == "lora_B" else array
    return adapter, lora
