"""Rebuild every committed torch reference fixture under tests/fixtures/parity/ (`make fixtures`):

    python tools/make_reference_dumps.py [--rope-only]

Three tiny Llama 3 models with random bf16 weights (fixed seeds), one per rope variant:
  llama3_0  no rope scaling, untied output             (Llama 3.0)
  llama3_1  llama3 rope scaling, factor 8, untied      (Llama 3.1 / 3.3)
  llama3_2  llama3 rope scaling, factor 32, tied       (Llama 3.2 1B / 3B)
Each is written as a Hugging Face folder (config.json, model.safetensors) plus the equivalent Meta
params.json, then run through Hugging Face transformers and Meta's llama-models in float32 (see
tools/torch_reference.py) for three cases: a 16-token prompt at position 0, 8 tokens at position
24571 with an empty cache, and one more token decoded after them. The same three cases run through
Hugging Face in bfloat16 and in float16 and through Meta's reference in bfloat16 (every stage, as
those engines round it: what llama3_np's compute modes emulate). rope.safetensors holds both references' rope tables for real Llama
shapes (alone with --rope-only). Before anything is kept, the two float32 references must agree
at every stage, and their rope frequency tables bit for bit.

Needs the tools extra (`make tools`); runs in about a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import torch_reference as ref  # noqa: E402
from llama3_np.config import from_hf_config, from_meta_params, meta_ffn_dim  # noqa: E402
from llama3_np.formats.safetensors_file import write_safetensors  # noqa: E402
from llama3_np.xcheck.dump import Inputs, dump_metadata, write_dump  # noqa: E402

transformers = ref.transformers_module()

OUT = ROOT / "tests" / "fixtures" / "parity"
# Nine stage dumps of float32 tensors per configuration (about 0.2 MB per producer) make most of it.
MAX_TOTAL_BYTES = 5_000_000

# The shape shared by the three models: grouped-query attention (4 query heads over 2 KV heads),
# an FFN width that is not a power of two.
DIM, N_LAYERS, N_HEADS, N_KV_HEADS, HEAD_DIM, FFN_DIM, VOCAB = 64, 2, 4, 2, 16, 160, 256
NORM_EPS, ROPE_THETA = 1e-5, 500000.0
# Meta derives the FFN width: 32 * ceil(int(0.9 * int(2 * 4 * 64 / 3)) / 32) = 32 * ceil(153 / 32) = 160.
MULTIPLE_OF, FFN_DIM_MULTIPLIER = 32, 0.9

PROMPT_LEN = 16
FAR_POS, FAR_LEN = 24571, 8  # far beyond 8192, where the scaling factor changes the rotation
# Meta's KV cache holds max_seq_len slots and its rope table 2 * max_seq_len rows: enough rows
# for FAR_POS + FAR_LEN + 1.
META_MAX_SEQ_LEN = 16384
AGREEMENT_NMSE = 1e-10  # Hugging Face vs Meta, float32, every stage

ROPE_POSITIONS = [0, 8191, 8192, 32768, 131071]


@dataclass(frozen=True)
class Variant:
    seed: int
    rope_factor: Optional[float]  # llama3 rope scaling factor; None: no scaling (3.0)
    tie_embeddings: bool
    max_position_embeddings: int


VARIANTS = {
    "llama3_0": Variant(seed=300, rope_factor=None, tie_embeddings=False, max_position_embeddings=8192),
    "llama3_1": Variant(seed=301, rope_factor=8.0, tie_embeddings=False, max_position_embeddings=131072),
    "llama3_2": Variant(seed=302, rope_factor=32.0, tie_embeddings=True, max_position_embeddings=131072),
}
META_SHIPPED_FACTOR = 8.0  # the literal in llama-models' apply_scaling

# The low-precision runs: file prefix -> (reference, torch dtype, dump dtype).
LOW_PRECISION = {
    "hf_bf16": ("hf", torch.bfloat16, "bfloat16"),
    "hf_fp16": ("hf", torch.float16, "float16"),
    "meta_bf16": ("meta", torch.bfloat16, "bfloat16"),
}


def rope_parameters(factor: Optional[float]) -> dict:
    if factor is None:
        return {"rope_type": "default", "rope_theta": ROPE_THETA}
    return {"rope_type": "llama3", "rope_theta": ROPE_THETA, "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def hf_config(v: Variant):
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN_DIM, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=v.max_position_embeddings, rms_norm_eps=NORM_EPS,
        rope_parameters=rope_parameters(v.rope_factor), tie_word_embeddings=v.tie_embeddings,
        dtype="bfloat16")


def meta_params(v: Variant) -> dict:
    # Like Meta's own params.json files, this says use_scaled_rope but not the factor.
    return {"dim": DIM, "n_layers": N_LAYERS, "n_heads": N_HEADS, "n_kv_heads": N_KV_HEADS,
            "vocab_size": VOCAB, "multiple_of": MULTIPLE_OF, "ffn_dim_multiplier": FFN_DIM_MULTIPLIER,
            "norm_eps": NORM_EPS, "rope_theta": ROPE_THETA, "use_scaled_rope": v.rope_factor is not None}


def random_weights(rng: np.random.Generator, tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """Hugging Face names and layout, rounded to bf16 once (those values are the model).

    Projections are normal(0, 1/sqrt(fan_in)) so every stage has O(1) spread; embeddings 0.25 so
    the (tied or untied) logits spread over a few units; norm weights normal(1, 0.2) so that a
    missing norm weight shows.
    """
    def normal(rows, cols, std):
        return rng.normal(0.0, std, size=(rows, cols))

    def norm_weight():
        return rng.normal(1.0, 0.2, size=DIM)

    q_dim, kv_dim = N_HEADS * HEAD_DIM, N_KV_HEADS * HEAD_DIM
    w = {"model.embed_tokens.weight": normal(VOCAB, DIM, 0.25)}
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm_weight()
        w[p + "self_attn.q_proj.weight"] = normal(q_dim, DIM, DIM ** -0.5)
        w[p + "self_attn.k_proj.weight"] = normal(kv_dim, DIM, DIM ** -0.5)
        w[p + "self_attn.v_proj.weight"] = normal(kv_dim, DIM, DIM ** -0.5)
        w[p + "self_attn.o_proj.weight"] = normal(DIM, q_dim, q_dim ** -0.5)
        w[p + "post_attention_layernorm.weight"] = norm_weight()
        w[p + "mlp.gate_proj.weight"] = normal(FFN_DIM, DIM, DIM ** -0.5)
        w[p + "mlp.up_proj.weight"] = normal(FFN_DIM, DIM, DIM ** -0.5)
        w[p + "mlp.down_proj.weight"] = normal(DIM, FFN_DIM, FFN_DIM ** -0.5)
    w["model.norm.weight"] = norm_weight()
    if not tie_embeddings:
        w["lm_head.weight"] = normal(VOCAB, DIM, 0.25)
    return {k: torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16) for k, a in w.items()}


def write_checkpoint(folder: Path, v: Variant, rng: np.random.Generator):
    folder.mkdir(parents=True)
    hf_config(v).save_pretrained(str(folder))
    (folder / "params.json").write_text(json.dumps(meta_params(v), indent=2) + "\n")
    weights = random_weights(rng, v.tie_embeddings)
    write_safetensors(folder / "model.safetensors", {k: ref.to_numpy(t) for k, t in weights.items()}, {"format": "pt"})
    config = from_hf_config(json.loads((folder / "config.json").read_text()))
    assert meta_ffn_dim(DIM, MULTIPLE_OF, FFN_DIM_MULTIPLIER) == FFN_DIM
    assert from_meta_params(meta_params(v), tie_embeddings=v.tie_embeddings,
                            rope_factor=v.rope_factor) == config, "params.json and config.json differ"
    return config


def check_loaded(folder: Path, hf_model):
    """The Hugging Face model computes with exactly the file's bf16 values."""
    state = hf_model.state_dict()
    for name, w in ref.load_hf_tensors(folder).items():
        if not torch.equal(state[name], w.to(state[name].dtype)):
            raise SystemExit(f"{folder}: {name} was not loaded exactly")


def worst_stage(a: dict, b: dict) -> tuple[str, float]:
    errors = {name: ref.nmse(a[name], b[name]) for name in b}
    name = max(errors, key=errors.get)
    return name, errors[name]


def make_variant(name: str, v: Variant) -> list[str]:
    """Write one configuration's folder; return the lines of its report."""
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(v.seed)
    config = write_checkpoint(folder, v, rng)
    prompt = rng.integers(0, VOCAB, PROMPT_LEN).tolist()
    far = rng.integers(0, VOCAB, FAR_LEN).tolist()
    decode = rng.integers(0, VOCAB, 1).tolist()
    # case: (tokens, rope position, tokens already in the cache, their first position)
    cases = {
        "prompt": (prompt, 0, [], 0),
        "far": (far, FAR_POS, [], FAR_POS),
        "far_decode": (decode, FAR_POS + FAR_LEN, far, FAR_POS),
    }
    torch_version = torch.__version__

    def metadata(case, producer, dtype, factor):
        return dump_metadata(config, Inputs(*cases[case]), dtype, producer, case=case, torch=torch_version,
                             rope_factor_used="none" if factor is None else f"{factor:g}")

    hf = ref.load_hf(folder)
    check_loaded(folder, hf)
    hf_producer = f"transformers {transformers.__version__} float32"
    cache = ref.hf_new_cache(hf)
    hf_dumps = {"prompt": ref.hf_run(hf, prompt, 0),
                "far": ref.hf_run(hf, far, FAR_POS, cache),
                "far_decode": ref.hf_run(hf, decode, FAR_POS + FAR_LEN, cache)}
    for case, stages in hf_dumps.items():
        meta_data = metadata(case, hf_producer, "float32", v.rope_factor)
        meta_data["attn_implementation"] = hf.config._attn_implementation
        write_dump(folder / f"hf_{case}.safetensors", stages, meta_data)

    def meta_cases(factor, prefix, case_names, dtype=torch.float32, dtype_name="float32"):
        """Meta's model with rope scaling `factor` (the shipped code when it is Meta's own)."""
        patch = None if factor in (None, META_SHIPPED_FACTOR) else factor
        model = ref.load_meta(folder, META_MAX_SEQ_LEN, dtype=dtype, rope_factor=patch)
        producer = f"llama-models {ref.package_version('llama_models')} {dtype_name}"
        if patch is not None:
            producer += f", apply_scaling factor {META_SHIPPED_FACTOR:g} patched to {patch:g}"
        dumps = {}
        for case in case_names:
            tokens, pos, context, context_pos = cases[case]
            if not context:
                ref.meta_reset_cache(model)
            dumps[case] = ref.meta_run(model, tokens, pos, cache_pos=len(context))
            write_dump(folder / f"{prefix}_{case}.safetensors", dumps[case],
                           metadata(case, producer, dtype_name, factor))
        return dumps

    report = [f"{name}: tokens {prompt[:4]}..., far position {FAR_POS}"]
    meta_dumps = meta_cases(v.rope_factor, "meta", cases)
    for case in cases:
        stage, err = worst_stage(meta_dumps[case], hf_dumps[case])
        report.append(f"  meta vs hf {case:10s} worst stage NMSE {err:.2e} ({stage})")
        if not err <= AGREEMENT_NMSE:
            raise SystemExit(f"{name} {case}: Meta and Hugging Face disagree at {stage}: NMSE {err:.3e}")

    if v.rope_factor not in (None, META_SHIPPED_FACTOR):
        shipped = meta_cases(META_SHIPPED_FACTOR, "meta8", ["prompt", "far"])
        for case in ("prompt", "far"):
            for stage in ("layers.0.q_rope", "layers.0.k_rope", "logits"):
                err = ref.nmse(shipped[case][stage], hf_dumps[case][stage])
                report.append(f"  meta as shipped (factor 8) vs hf {case:6s} {stage:16s} NMSE {err:.2e}")

    for prefix, (which, dtype, dtype_name) in LOW_PRECISION.items():
        if which == "meta":
            low = meta_cases(v.rope_factor, prefix, cases, dtype, dtype_name)
        else:
            model = ref.load_hf(folder, dtype)
            check_loaded(folder, model)
            cache = ref.hf_new_cache(model)
            low = {"prompt": ref.hf_run(model, prompt, 0), "far": ref.hf_run(model, far, FAR_POS, cache),
                   "far_decode": ref.hf_run(model, decode, FAR_POS + FAR_LEN, cache)}
            for case, stages in low.items():
                write_dump(folder / f"{prefix}_{case}.safetensors", stages,
                           metadata(case, f"transformers {transformers.__version__} {dtype_name}", dtype_name,
                                    v.rope_factor) | {"attn_implementation": model.config._attn_implementation})
        report.append(f"  {prefix} vs hf f32 logits NMSE " + ", ".join(
            f"{case} {ref.nmse(low[case]['logits'], hf_dumps[case]['logits']):.2e}" for case in cases))
    s = hf_dumps["prompt"]
    report.append("  spread (std) of hf prompt stages: " + ", ".join(
        f"{k} {float(np.std(s[k])):.2f}" for k in ("embed", "layers.0.q", "layers.1.h", "layers.1.out", "logits")))
    return report


# Real Llama 3 rope settings for rope.safetensors: (Hugging Face config keys, factor for Meta).
ROPE_MODELS = {
    "llama3_0_8b": ({"hidden_size": 4096, "num_attention_heads": 32, "head_dim": 128,
                     "rope_parameters": rope_parameters(None)}, None),
    "llama3_1_8b": ({"hidden_size": 4096, "num_attention_heads": 32, "head_dim": 128,
                     "rope_parameters": rope_parameters(8.0)}, 8.0),
    "llama3_2_1b": ({"hidden_size": 2048, "num_attention_heads": 32, "head_dim": 64,
                     "rope_parameters": rope_parameters(32.0)}, 32.0),
}


def make_rope_tables() -> list[str]:
    tensors, report = {}, []
    for key, (hf_keys, factor) in ROPE_MODELS.items():
        config = dict(hf_keys, max_position_embeddings=131072)
        hf = ref.hf_rope(config, ROPE_POSITIONS)
        patch = None if factor in (None, META_SHIPPED_FACTOR) else factor
        meta = ref.meta_rope(hf_keys["head_dim"], ROPE_THETA, factor is not None, ROPE_POSITIONS, patch)
        half = hf_keys["head_dim"] // 2
        # llama3_np's rope_frequencies claims both float32 tables bit for bit: they must be one table.
        if not np.array_equal(meta["freqs"], hf["inv_freq"]):
            raise SystemExit(f"rope {key}: Meta's and Hugging Face's frequency tables differ in "
                             f"{int(np.sum(meta['freqs'] != hf['inv_freq']))} entries")
        tensors.update({f"{key}.inv_freq": hf["inv_freq"], f"{key}.cos": hf["cos"], f"{key}.sin": hf["sin"],
                        f"{key}.meta_freqs": meta["freqs"], f"{key}.meta_cos": meta["cos"],
                        f"{key}.meta_sin": meta["sin"]})
        err = max(np.abs(meta["cos"] - hf["cos"][:, :half]).max(), np.abs(meta["sin"] - hf["sin"][:, :half]).max())
        report.append(f"rope {key}: max |meta - hf| over cos/sin {err:.2e}")
    metadata = {
        "positions": json.dumps(ROPE_POSITIONS),
        "configs": json.dumps({k: dict(c, meta_rope_factor=f) for k, (c, f) in ROPE_MODELS.items()},
                              sort_keys=True),
        "producer": f"transformers {transformers.__version__} LlamaRotaryEmbedding; "
                    f"llama-models {ref.package_version('llama_models')} precompute_freqs_cis",
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    write_dump(OUT / "rope.safetensors", tensors, metadata)
    return report


def main() -> int:
    rope_only = sys.argv[1:] == ["--rope-only"]
    if sys.argv[1:] and not rope_only:
        raise SystemExit("usage: make_reference_dumps.py [--rope-only]")
    ref.deterministic_torch()
    transformers.utils.logging.disable_progress_bar()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, v in ({} if rope_only else VARIANTS).items():
        print("\n".join(make_variant(name, v)), flush=True)
    print("\n".join(make_rope_tables()))
    files = sorted(p for p in OUT.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    for p in files:
        print(f"{p.stat().st_size:9d}  {p.relative_to(ROOT)}")
    print(f"{total:9d}  bytes in {len(files)} files under {OUT.relative_to(ROOT)}")
    if total > MAX_TOTAL_BYTES:
        raise SystemExit(f"fixtures take {total} bytes, more than {MAX_TOTAL_BYTES}: make them smaller")
    return 0


if __name__ == "__main__":
    sys.exit(main())
