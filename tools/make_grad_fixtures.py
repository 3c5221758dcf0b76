"""Rebuild the gradient fixtures under tests/fixtures/grad/ (`make fixtures`):

    python tools/make_grad_fixtures.py

Three tiny Llama 3 models with random bf16 weights (fixed seeds), one per rope variant (3.0: no
scaling, untied; 3.1: llama3 scaling factor 8, untied; 3.2: factor 32, tied embeddings), written as
Hugging Face folders. For each case (tokens, targets, rope position) the next-token cross-entropy of
Hugging Face `transformers`' `LlamaForCausalLM` (eager attention) is differentiated by
`torch.autograd`, once in float32 and once in float64, and every parameter's gradient is stored
under its canonical (Meta) name and layout: `float32.NAME` and `float64.NAME`, with the losses and
inputs in the metadata.

transformers computes three things in float32 whatever the model's dtype (as Meta's reference
does): RMSNorm, the attention softmax, and rope's cos/sin. The float64 run computes the first two in
float64 (patched for the run: the same formulas without the cast) and takes cos/sin from llama3_np's
float64 compute mode (every step of the frequency table and the angles in float64): float32 steps
would bound the float64 comparison at an NMSE of about 1e-15 (1e-9 at position 24,571), and what
these fixtures test is the backward pass, not the rope table (tests/test_parity.py proves it).

Needs the tools extra (`make tools`); runs in a few seconds.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import torch_reference as ref  # noqa: E402
from llama3_np.config import ComputeMode, from_hf_config  # noqa: E402
from llama3_np.formats.safetensors_file import write_safetensors  # noqa: E402
from llama3_np.model import rope_cos_sin, rope_frequencies  # noqa: E402
from llama3_np.stages import stage_shapes  # noqa: E402
from llama3_np.xcheck.dump import Inputs, dump_metadata, write_dump  # noqa: E402

transformers = ref.transformers_module()

OUT = ROOT / "tests" / "fixtures" / "grad"

# Small enough that a case's gradients in float32 and float64 take about 250 KB; grouped-query
# attention (4 query heads over 2 KV heads), an FFN width that is not a power of two, a vocabulary
# small enough that a 64-token sequence repeats tokens (the embedding's scatter-add).
DIM, N_LAYERS, N_HEADS, N_KV_HEADS, HEAD_DIM, FFN_DIM, VOCAB = 32, 2, 4, 2, 8, 56, 64
NORM_EPS, ROPE_THETA = 1e-5, 500000.0
FAR_POS = 24571  # beyond 8192 / low_freq_factor: where the llama3 scaling changes the rotation


@dataclass(frozen=True)
class Variant:
    seed: int
    rope_factor: Optional[float]
    tie_embeddings: bool
    cases: tuple[tuple[int, int], ...]  # (tokens, rope position)


VARIANTS = {
    "llama3_0": Variant(400, None, False, ((1, 0), (7, 0))),
    "llama3_1": Variant(401, 8.0, False, ((64, 0),)),
    "llama3_2": Variant(402, 32.0, True, ((7, FAR_POS), (64, FAR_POS))),
}


def hf_config(v: Variant):
    rope = ({"rope_type": "default", "rope_theta": ROPE_THETA} if v.rope_factor is None else
            {"rope_type": "llama3", "rope_theta": ROPE_THETA, "factor": v.rope_factor, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN_DIM, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=131072, rms_norm_eps=NORM_EPS, rope_parameters=rope,
        tie_word_embeddings=v.tie_embeddings, dtype="bfloat16")


def random_hf_weights(rng: np.random.Generator, tie_embeddings: bool) -> dict[str, np.ndarray]:
    """Hugging Face names and layout, float32 values rounded to bf16 (those values are the model)."""
    import ml_dtypes

    def normal(shape, mean, std):
        return rng.normal(mean, std, size=shape)

    q, kv = N_HEADS * HEAD_DIM, N_KV_HEADS * HEAD_DIM
    w = {"model.embed_tokens.weight": normal((VOCAB, DIM), 0, 0.5), "model.norm.weight": normal(DIM, 1, 0.2)}
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": normal(DIM, 1, 0.2),
                  p + "self_attn.q_proj.weight": normal((q, DIM), 0, DIM ** -0.5),
                  p + "self_attn.k_proj.weight": normal((kv, DIM), 0, DIM ** -0.5),
                  p + "self_attn.v_proj.weight": normal((kv, DIM), 0, DIM ** -0.5),
                  p + "self_attn.o_proj.weight": normal((DIM, q), 0, q ** -0.5),
                  p + "post_attention_layernorm.weight": normal(DIM, 1, 0.2),
                  p + "mlp.gate_proj.weight": normal((FFN_DIM, DIM), 0, DIM ** -0.5),
                  p + "mlp.up_proj.weight": normal((FFN_DIM, DIM), 0, DIM ** -0.5),
                  p + "mlp.down_proj.weight": normal((DIM, FFN_DIM), 0, FFN_DIM ** -0.5)})
    if not tie_embeddings:
        w["lm_head.weight"] = normal((VOCAB, DIM), 0, DIM ** -0.5)
    return {k: a.astype(ml_dtypes.bfloat16) for k, a in w.items()}


def float64_rope(model, config, pos: int, T: int):
    """Replace the model's rotary embedding by llama3_np's float64 cos/sin, in transformers'
    rotate-half layout ([1, T, Dh], each angle twice)."""
    rotation = rope_cos_sin(pos + np.arange(T), rope_frequencies(config, ComputeMode("float64")))
    cos, sin = (torch.from_numpy(np.concatenate([f] * 2, axis=-1))[None] for f in rotation)
    model.model.rotary_emb.forward = lambda x, position_ids: (cos, sin)


def rmsnorm_in_its_dtype(self, x):
    """LlamaRMSNorm.forward without its float32 cast."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@contextlib.contextmanager
def float64_throughout(model, config, pos: int, T: int):
    """transformers' model with RMSNorm, softmax and rope computed in float64 (see above)."""
    from transformers.models.llama import modeling_llama
    softmax = torch.nn.functional.softmax

    def softmax_in_its_dtype(x, dim=None, dtype=None, **kwargs):
        return softmax(x, dim=dim, dtype=x.dtype if x.dtype == torch.float64 else dtype, **kwargs)

    float64_rope(model, config, pos, T)
    norm_forward = modeling_llama.LlamaRMSNorm.forward
    modeling_llama.LlamaRMSNorm.forward = rmsnorm_in_its_dtype
    torch.nn.functional.softmax = softmax_in_its_dtype
    try:
        yield
    finally:
        modeling_llama.LlamaRMSNorm.forward = norm_forward
        torch.nn.functional.softmax = softmax


def gradients(folder: Path, config, dtype: torch.dtype, tokens, targets, pos: int):
    """(loss, {canonical name: gradient}) of transformers' model in `dtype`, by autograd."""
    model = ref.load_hf(folder, dtype)
    with float64_throughout(model, config, pos, len(tokens)) if dtype == torch.float64 else contextlib.nullcontext():
        return _gradients(model, config, tokens, targets, pos)


def _gradients(model, config, tokens, targets, pos: int):
    ids = torch.tensor([tokens])
    position_ids = torch.arange(pos, pos + len(tokens))[None]
    logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits[0]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(targets), ignore_index=-100)
    loss.backward()
    loss = loss.detach()
    hf_grads = {name: p.grad for name, p in model.named_parameters()}
    grads = ref.hf_to_meta_state_dict(hf_grads, config)
    if config.tie_embeddings:
        del grads["output.weight"]  # the same parameter as tok_embeddings: its gradient is already there
    return float(loss), {k: ref.to_numpy(g) for k, g in grads.items()}


def make_variant(name: str, v: Variant) -> list[str]:
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(v.seed)
    hf_config(v).save_pretrained(str(folder))
    write_safetensors(folder / "model.safetensors", random_hf_weights(rng, v.tie_embeddings), {"format": "pt"})
    config = from_hf_config(json.loads((folder / "config.json").read_text()))
    report = []
    for T, pos in v.cases:
        tokens = rng.integers(0, VOCAB, T).tolist()
        targets = rng.integers(0, VOCAB, T).tolist()
        if T > 1:
            targets[T // 2] = -100  # one position not scored: ignore_index is part of the definition
        loss32, g32 = gradients(folder, config, torch.float32, tokens, targets, pos)
        loss64, g64 = gradients(folder, config, torch.float64, tokens, targets, pos)
        tensors = {**{f"float32.{k}": a for k, a in g32.items()}, **{f"float64.{k}": a for k, a in g64.items()}}
        metadata = {"tokens": json.dumps(tokens), "targets": json.dumps(targets), "pos": str(pos),
                    "loss_float32": repr(loss32), "loss_float64": repr(loss64),
                    "producer": f"transformers {transformers.__version__}, torch {torch.__version__} autograd"}
        path = folder / f"grad_T{T}_pos{pos}.safetensors"
        write_safetensors(path, tensors, metadata)
        worst = max(ref.nmse(g32[k].astype(np.float64), g64[k]) for k in g64 if g64[k].any())
        report.append(f"{name} T={T} pos={pos}: loss {loss64:.6f}, worst gradient NMSE of the float32 run "
                      f"(its own float32 rope angles included) against the float64 run "
                      f"{worst:.2e}, {path.stat().st_size // 1024} KB")
    return report


# 20 steps of AdamW on one sequence, every step's gradient clipped and the learning rate scheduled:
# the same run that tests/test_optim.py repeats with llama3_np's backward pass and optimizer.
TRAIN = dict(variant="llama3_2", tokens=16, steps=20, lr=3e-3, betas=(0.9, 0.95), eps=1e-8,
             weight_decay=0.1, max_norm=0.5, warmup=5)


def make_training_run() -> str:
    folder = OUT / TRAIN["variant"]
    config = from_hf_config(json.loads((folder / "config.json").read_text()))
    rng = np.random.default_rng(500)
    tokens = rng.integers(0, VOCAB, TRAIN["tokens"]).tolist()
    model = ref.load_hf(folder, torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], betas=TRAIN["betas"], eps=TRAIN["eps"],
                                  weight_decay=TRAIN["weight_decay"])
    schedule = transformers.get_cosine_schedule_with_warmup(optimizer, TRAIN["warmup"], TRAIN["steps"])
    ids = torch.tensor([tokens])
    losses, norms = [], []
    for _ in range(TRAIN["steps"]):
        optimizer.zero_grad()
        logits = model(input_ids=ids, use_cache=False).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["max_norm"])))
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    params = ref.hf_to_meta_state_dict(dict(model.named_parameters()), config)
    if config.tie_embeddings:
        del params["output.weight"]
    metadata = {"tokens": json.dumps(tokens), "losses": json.dumps(losses), "grad_norms": json.dumps(norms),
                "settings": json.dumps(TRAIN),
                "producer": f"torch {torch.__version__} AdamW, clip_grad_norm_; transformers "
                            f"{transformers.__version__} get_cosine_schedule_with_warmup"}
    path = OUT / "adamw_20_steps.safetensors"
    write_safetensors(path, {k: ref.to_numpy(p) for k, p in params.items()}, metadata)
    return (f"AdamW: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {TRAIN['steps']} steps, "
            f"{path.stat().st_size // 1024} KB")


# Two steps of llama3_np's own trainer, its checkpoint then loaded by transformers: the logits of
# PROBE by transformers from that folder are what tests/test_train.py compares llama3_np's with.
TRAINED = dict(variant="llama3_2", steps=2, seq_len=16, batch_size=2, learning_rate=1e-3, warmup_steps=0, seed=3)
PROBE = [5, 9, 33, 2, 60, 17, 17, 41]


def make_trained_checkpoint() -> str:
    import tempfile
    from llama3_np.formats.checkpoint import load_checkpoint
    from llama3_np.model import forward
    from llama3_np.train import Trainer, TrainingArguments

    s = dict(TRAINED)
    ckpt = load_checkpoint(OUT / s.pop("variant"), dtype="float32")
    args = TrainingArguments(max_steps=s.pop("steps"), **s)
    sequences = np.random.default_rng(7).integers(0, VOCAB, (6, args.seq_len + 1))
    trainer = Trainer(ckpt.weights, ckpt.config, sequences, None, args)
    while trainer.step < args.max_steps:
        trainer.train_step()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoint"
        trainer.save(folder)
        hf = ref.load_hf(folder, torch.float32)
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([PROBE]), use_cache=False).logits[0].numpy()
        ours = forward(load_checkpoint(folder, dtype="float32").weights, ckpt.config, PROBE)
    path = OUT / "trained_checkpoint_logits.safetensors"
    write_safetensors(path, {"logits": logits}, {"settings": json.dumps(TRAINED), "probe": json.dumps(PROBE),
                                                 "sequences_seed": "7",
                                                 "producer": f"transformers {transformers.__version__}"})
    return (f"llama3_np's checkpoint after {args.max_steps} steps, logits from transformers vs llama3_np: "
            f"NMSE {ref.nmse(ours, logits):.2e}")


# The gradient of every named stage that transformers' modules expose (all but q, k and rope's),
# for `llama3-np dump --grad` to be compared with (`llama3-np compare`).
STAGE_GRADIENT_TOKENS = [3, 41, 17, 60, 9, 9, 22, 51]


def make_stage_gradients() -> str:
    folder = OUT / "llama3_0"
    config = from_hf_config(json.loads((folder / "config.json").read_text()))
    model = ref.load_hf(folder, torch.float32)
    kept: dict[str, torch.Tensor] = {}

    def keep(name: str, t):
        t = t[0] if isinstance(t, tuple) else t
        t.retain_grad()
        kept[name] = t

    def watch(module, name: str, where: str):
        if where == "output":
            module.register_forward_hook(lambda m, args, out: keep(name, out))
        else:
            module.register_forward_pre_hook(lambda m, args: keep(name, args[0]))

    for i, layer in enumerate(model.model.layers):
        for stage, (path, where) in ref.HF_LAYER_POINTS.items():
            watch(layer.get_submodule(path) if path else layer, f"layers.{i}.{stage}", where)
    for stage, (path, where) in ref.HF_MODEL_POINTS.items():
        watch(model.get_submodule(path), stage, where)
    ids = torch.tensor([STAGE_GRADIENT_TOKENS])
    logits = model(input_ids=ids, use_cache=False).logits[0]
    loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
    loss.backward()
    T = len(STAGE_GRADIENT_TOKENS)
    shapes = {name: shape for name, shape in stage_shapes(config, T, probs=False).items() if name in kept}
    stages = {name: kept[name].grad[0].reshape(shape).numpy().astype(np.float32) for name, shape in shapes.items()}
    targets = STAGE_GRADIENT_TOKENS[1:] + [-100]
    path = folder / "hf_grad_stages.safetensors"
    write_dump(path, stages, dump_metadata(
        config, Inputs(STAGE_GRADIENT_TOKENS, 0, [], 0), "float32",
        producer=f"transformers {transformers.__version__}, torch {torch.__version__} autograd",
        targets=json.dumps(targets), loss=repr(float(loss.detach()))))
    return f"stage gradients: {len(stages)} stages, {path.stat().st_size // 1024} KB"


# Two steps of LoRA training by llama3_np on llama3_0 (q and k, whose rows transformers permutes, and
# the FFN's down projection), its adapter then loaded by peft: peft's logits on PROBE, merged and
# unmerged, and the gradients of every lora_A / lora_B for the next-token loss of PROBE.
LORA = dict(variant="llama3_0", r=4, lora_alpha=8.0, target_modules=["q_proj", "k_proj", "down_proj"], steps=2,
            seq_len=16, batch_size=2, learning_rate=1e-2, seed=5)


def make_lora() -> str:
    import tempfile
    import peft
    from llama3_np.formats.checkpoint import load_checkpoint
    from llama3_np.lora import LoraConfig, TARGETS, _peft_key, unpermute_qk
    from llama3_np.train import Trainer, TrainingArguments

    s = dict(LORA)
    folder = OUT / s.pop("variant")
    ckpt = load_checkpoint(folder, dtype="float32")
    lora = LoraConfig(s.pop("r"), s.pop("lora_alpha"), tuple(s.pop("target_modules")))
    args = TrainingArguments(max_steps=s.pop("steps"), warmup_steps=0, **s)
    sequences = np.random.default_rng(9).integers(0, VOCAB, (4, args.seq_len + 1))
    trainer = Trainer(ckpt.weights, ckpt.config, sequences, None, args, lora=lora)
    while trainer.step < args.max_steps:
        trainer.train_step()
    tensors = {}
    with tempfile.TemporaryDirectory() as tmp:
        trainer.save(Path(tmp) / "adapter")
        model = peft.PeftModel.from_pretrained(ref.load_hf(folder, torch.float32), str(Path(tmp) / "adapter"),
                                               is_trainable=True)
        ids = torch.tensor([PROBE])
        logits = model(input_ids=ids, use_cache=False).logits[0]
        torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).backward()
        tensors["logits"] = logits.detach().numpy()
        for name, p in model.named_parameters():
            if "lora_" in name:
                key = next(k for k in trainer.adapter if _peft_key(*k.rsplit(".", 1)) == name.replace(".default", ""))
                heads = {"wq": ckpt.config.n_heads, "wk": ckpt.config.n_kv_heads}.get(key.split(".")[-3])
                g = p.grad.numpy()
                tensors[f"grad.{key}"] = unpermute_qk(g, heads) if heads and key.endswith("lora_B") else g
        with torch.no_grad():
            tensors["merged_logits"] = model.merge_and_unload()(input_ids=ids, use_cache=False).logits[0].numpy()
    path = OUT / "lora_peft.safetensors"
    write_safetensors(path, tensors, {"settings": json.dumps(LORA), "probe": json.dumps(PROBE), "sequences_seed": "9",
                                      "producer": f"peft {peft.__version__}, transformers {transformers.__version__}"})
    return f"LoRA: {sum(k.startswith('grad.') for k in tensors)} adapter gradients, {path.stat().st_size // 1024} KB"


def main() -> None:
    torch.manual_seed(0)
    for name, v in VARIANTS.items():
        print("\n".join(make_variant(name, v)))
    print(make_training_run())
    print(make_trained_checkpoint())
    print(make_stage_gradients())
    print(make_lora())
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"tests/fixtures/grad/: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
