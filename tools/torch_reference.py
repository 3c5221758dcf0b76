"""Run token ids through the two torch references of Llama 3 and record every named stage.

The references:
- Hugging Face `transformers.LlamaForCausalLM` (eager attention: the plain softmax(QK^T)V path);
- Meta's `llama_models.llama3.model.Transformer` from `llama-models`, with fairscale model
  parallelism initialised for one CPU process.

Both load the same Hugging Face-format checkpoint folder (bf16 `model.safetensors`, upcast to the
compute dtype), so any difference between them is a difference of computation, not of weights.
Stages are recorded with forward hooks and by wrapping each implementation's module-level rope
function for the duration of a run; no line of either model is copied here.

Stage names and shapes are `llama3_np.stages`' (`embed`, `layers.i.q`, ..., `logits`). q/k stages are
returned in Meta's interleaved rope layout whoever produced them: Hugging Face stores the rows of
wq/wk permuted so that rope can rotate halves, and its q/k activations are converted back here.

Used by tools/make_reference_dumps.py (the committed fixtures); tools only, never at run time.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import socket
import types
from pathlib import Path
from typing import Callable, Optional

import ml_dtypes
import numpy as np
import torch
import torch.distributed

from llama3_np.config import ModelConfig, from_hf_config, meta_ffn_dim
from llama3_np.stages import stage_shapes

# Where each per-layer stage is observed: (submodule path inside one decoder layer, whether the
# stage is that module's input or its output). q, k, q_rope, k_rope come from the rope wrapper.
HF_LAYER_POINTS = {
    "attn_norm": ("input_layernorm", "output"),
    "v": ("self_attn.v_proj", "output"),
    "attn": ("self_attn.o_proj", "input"),
    "attn_out": ("self_attn.o_proj", "output"),
    "h": ("post_attention_layernorm", "input"),
    "ffn_norm": ("post_attention_layernorm", "output"),
    "ffn_hidden": ("mlp.down_proj", "input"),
    "ffn_out": ("mlp.down_proj", "output"),
    "out": ("", "output"),
}
HF_MODEL_POINTS = {
    "embed": ("model.embed_tokens", "output"),
    "norm": ("model.norm", "output"),
    "logits": ("lm_head", "output"),
}
META_LAYER_POINTS = {
    "attn_norm": ("attention_norm", "output"),
    "v": ("attention.wv", "output"),
    "attn": ("attention.wo", "input"),
    "attn_out": ("attention.wo", "output"),
    "h": ("ffn_norm", "input"),
    "ffn_norm": ("ffn_norm", "output"),
    "ffn_hidden": ("feed_forward.w2", "input"),
    "ffn_out": ("feed_forward.w2", "output"),
    "out": ("", "output"),
}
META_MODEL_POINTS = {
    "embed": ("tok_embeddings", "output"),
    "norm": ("norm", "output"),
    "logits": ("output", "output"),
}


def deterministic_torch(threads: int = 1) -> None:
    """torch on `threads` threads with its deterministic algorithms, as every reference is computed:
    its sums in one order, run after run, so that a fixture is regenerated bit for bit."""
    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True)


def package_version(name: str) -> str:
    return importlib.metadata.version(name)


def nmse(a: np.ndarray, ref: np.ndarray) -> float:
    """sum((a - ref)^2) / sum(ref^2), in float64."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.sum((a - ref) ** 2) / np.sum(ref ** 2))


def rotate_half_to_interleaved(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Reorder axis `dim` (one head, length Dh) from Hugging Face's rotate-half layout to Meta's.

    Hugging Face rotates dim j with dim Dh/2 + j; Meta rotates the pair (2j, 2j+1). So Hugging Face
    dim j becomes Meta dim 2j and Hugging Face dim Dh/2 + j becomes Meta dim 2j + 1.
    """
    dim = dim % x.ndim
    dh = x.shape[dim]
    halves = x.reshape(*x.shape[:dim], 2, dh // 2, *x.shape[dim + 1:])
    return halves.transpose(dim, dim + 1).reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# Recording


class _Recorder:
    """Collects stage tensors (batch row 0, float32, detached) during one forward pass."""

    def __init__(self):
        self.stages: dict[str, torch.Tensor] = {}
        self.layer: Optional[int] = None  # the decoder layer whose attention is running

    def put(self, name: str, x: torch.Tensor):
        if name in self.stages:
            raise RuntimeError(f"stage {name} recorded twice: the hooks do not match the model")
        self.stages[name] = x[0].detach().to(torch.float32).clone()

    def put_rope(self, q, k, q_rope, k_rope):
        """q, k, q_rope, k_rope as [B, T, heads, Dh] in Meta layout."""
        for name, x in (("q", q), ("k", k), ("q_rope", q_rope), ("k_rope", k_rope)):
            self.put(f"layers.{self.layer}.{name}", x)

    def result(self, config: ModelConfig, n_tokens: int) -> dict[str, np.ndarray]:
        """The recorded stages as float32 arrays of the stage contract's shapes (checked)."""
        shapes = stage_shapes(config, n_tokens, probs=False)  # the references record no probs
        if set(shapes) != set(self.stages):
            missing, extra = set(shapes) - set(self.stages), set(self.stages) - set(shapes)
            raise RuntimeError(f"stages missing {sorted(missing)}, unexpected {sorted(extra)}")
        out = {}
        for name, shape in shapes.items():
            x = self.stages[name]
            if x.numel() != int(np.prod(shape)):
                raise RuntimeError(f"stage {name}: {tuple(x.shape)} cannot be {shape}")
            out[name] = np.ascontiguousarray(x.reshape(shape).numpy(), dtype=np.float32)
        return out


def _submodule(root: torch.nn.Module, path: str) -> torch.nn.Module:
    return root.get_submodule(path) if path else root


def _hook(rec: _Recorder, module: torch.nn.Module, name: str, where: str):
    if where == "input":
        return module.register_forward_pre_hook(lambda _m, args: rec.put(name, args[0]))
    return module.register_forward_hook(
        lambda _m, _args, out: rec.put(name, out[0] if isinstance(out, tuple) else out))


@contextlib.contextmanager
def _recording(model: torch.nn.Module, layers, attention_name: str, layer_points: dict,
               model_points: dict, rope_module: types.ModuleType, rope_name: str,
               rope_wrapper: Callable):
    """Install hooks on `model` and wrap `rope_module.<rope_name>`; yield the recorder."""
    rec = _Recorder()
    handles = [_hook(rec, _submodule(model, path), name, where)
               for name, (path, where) in model_points.items()]
    for i, layer in enumerate(layers):
        handles += [_hook(rec, _submodule(layer, path), f"layers.{i}.{name}", where)
                    for name, (path, where) in layer_points.items()]

        def enter(_m, _args, i=i):
            rec.layer = i
        handles.append(_submodule(layer, attention_name).register_forward_pre_hook(enter))
    original = getattr(rope_module, rope_name)
    setattr(rope_module, rope_name, rope_wrapper(original, rec))
    try:
        yield rec
    finally:
        setattr(rope_module, rope_name, original)
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers


def transformers_module():
    """transformers, checked to be 5.x: older releases ignore `rope_parameters` and `dtype=`."""
    import transformers
    if int(transformers.__version__.split(".")[0]) < 5:
        raise RuntimeError(f"transformers {transformers.__version__} is too old for these tools: "
                           "install transformers 5 (`make tools`)")
    return transformers


@contextlib.contextmanager
def default_model_folder():
    """The default model's exact values (its GGUF, `llama3_np.assets.default_model`) imported by
    `gguf_to_hf.import_gguf` into a temporary Hugging Face folder, for the torch references to load;
    the folder goes when the block ends."""
    import tempfile

    from llama3_np.assets import default_model
    from llama3_np.formats.gguf_to_hf import import_gguf

    with tempfile.TemporaryDirectory() as tmp:
        yield import_gguf(default_model(), Path(tmp) / "default")


def load_hf(checkpoint_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """`LlamaForCausalLM` from a local folder, weights cast to `dtype`, eager attention."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers_module().LlamaForCausalLM.from_pretrained(str(checkpoint_dir), dtype=dtype,
                                             attn_implementation="eager")
    return model.eval()


def hf_new_cache(model):
    return transformers_module().DynamicCache(config=model.config)


def _hf_rope_wrapper(original, rec: _Recorder):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        q_rope, k_rope = original(q, k, cos, sin, *args, **kwargs)
        # [B, heads, T, Dh] rotate-half -> [B, T, heads, Dh] Meta layout
        rec.put_rope(*(rotate_half_to_interleaved(x.transpose(1, 2), -1)
                       for x in (q, k, q_rope, k_rope)))
        return q_rope, k_rope
    return apply_rotary_pos_emb


def hf_run(model, tokens: list[int], pos: int, cache=None) -> dict[str, np.ndarray]:
    """Every stage of Hugging Face's forward pass over `tokens` at rope positions pos, pos+1, ...

    With `cache` (a DynamicCache), the tokens attend to what it already holds and are appended.
    """
    from transformers.models.llama import modeling_llama
    config = from_hf_config(model.config.to_dict())
    ids = torch.tensor([tokens], dtype=torch.long)
    position_ids = torch.arange(pos, pos + len(tokens), dtype=torch.long)[None]
    with _recording(model, model.model.layers, "self_attn", HF_LAYER_POINTS, HF_MODEL_POINTS,
                    modeling_llama, "apply_rotary_pos_emb", _hf_rope_wrapper) as rec, torch.no_grad():
        model(input_ids=ids, position_ids=position_ids, past_key_values=cache,
              use_cache=cache is not None)
    return rec.result(config, len(tokens))


def hf_rope(config_dict: dict, positions: list[int]) -> dict[str, np.ndarray]:
    """Hugging Face's `LlamaRotaryEmbedding` for a config: inv_freq [Dh/2], cos/sin [P, Dh]."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    rotary = LlamaRotaryEmbedding(transformers_module().LlamaConfig(**config_dict))
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32),
                          torch.tensor([positions], dtype=torch.long))
    return {"inv_freq": rotary.inv_freq.numpy().astype(np.float32),
            "cos": cos[0].numpy().astype(np.float32), "sin": sin[0].numpy().astype(np.float32)}


# ---------------------------------------------------------------------------------------------
# Meta llama-models


def init_model_parallel():
    """fairscale model parallelism over one CPU process (a gloo group of size 1), once."""
    import fairscale.nn.model_parallel.initialize as fs_init
    if not torch.distributed.is_initialized():
        with socket.socket() as s:  # a free local port for the one-process rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)


@contextlib.contextmanager
def meta_rope_factor(factor: float):
    """Meta's `apply_scaling` with its hard-coded `scale_factor = 8` replaced by `factor`.

    llama-models 0.3.0 writes the llama3 scaling factor as the literal 8 inside `apply_scaling`
    (right for 3.1, wrong for 3.2 1B/3B, which were trained with 32). Inside this context the
    module attribute `apply_scaling` (which `precompute_freqs_cis` calls) is Meta's own function
    rebuilt from its own bytecode with that one constant replaced; every line of its formula runs
    as shipped. A Transformer built inside the context keeps the patched `freqs_cis`.
    """
    import llama_models.llama3.model as meta
    shipped = meta.apply_scaling
    code = shipped.__code__
    consts = code.co_consts
    if sum(1 for c in consts if type(c) is int and c == 8) != 1:
        raise RuntimeError(f"llama_models apply_scaling constants {consts} changed: cannot patch "
                           "the scale factor; check llama-models' version")
    value = int(factor) if float(factor).is_integer() else float(factor)
    patched_code = code.replace(co_consts=tuple(value if type(c) is int and c == 8 else c
                                                for c in consts))
    patched = types.FunctionType(patched_code, shipped.__globals__, shipped.__name__,
                                 shipped.__defaults__, shipped.__closure__)
    # The lowest frequency of Llama 3's rope (wavelength far above 8192) must be divided by exactly
    # `factor`, the highest left alone: proof that the constant changed is the scale factor.
    probe = torch.tensor([1.0, 1e-5])
    expected = torch.stack([probe[0], probe[1] / value])
    if not torch.equal(patched(probe), expected):
        raise RuntimeError(f"patched apply_scaling gives {patched(probe)}, expected {expected}")
    meta.apply_scaling = patched
    try:
        yield
    finally:
        meta.apply_scaling = shipped


def meta_params(checkpoint_dir: str | os.PathLike, config: ModelConfig) -> dict:
    """Meta params.json of a checkpoint: the folder's own `params.json`, else derived from config.

    Derived params give Meta's FeedForward the checkpoint's width with multiple_of 1 and the
    multiplier F / int(8 D / 3) (nudged by half a unit so that Meta's int() lands on F).
    """
    path = Path(checkpoint_dir) / "params.json"
    if path.exists():
        params = json.loads(path.read_text())
    else:
        base = int(2 * (4 * config.dim) / 3)
        params = {
            "dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
            "n_kv_heads": config.n_kv_heads, "vocab_size": config.vocab_size, "multiple_of": 1,
            "ffn_dim_multiplier": (config.ffn_dim + 0.5) / base, "norm_eps": config.norm_eps,
            "rope_theta": config.rope_theta, "use_scaled_rope": config.rope_scaling is not None,
        }
    if meta_ffn_dim(params["dim"], params.get("multiple_of", 256),
                    params.get("ffn_dim_multiplier")) != config.ffn_dim:
        raise ValueError(f"{path}: Meta's FFN formula does not give ffn_dim {config.ffn_dim}")
    if config.dim != config.n_heads * config.head_dim:
        raise ValueError(f"head_dim {config.head_dim} != dim / n_heads: Meta's model cannot run it")
    return params


def hf_to_meta_state_dict(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face names and rotate-half wq/wk rows -> Meta names and interleaved rows."""
    def qk(w, n_heads):  # [heads*Dh, D] rows per head reordered
        return rotate_half_to_interleaved(w.reshape(n_heads, config.head_dim, -1), 1).reshape(w.shape)

    sd = {"tok_embeddings.weight": hf["model.embed_tokens.weight"],
          "norm.weight": hf["model.norm.weight"],
          "output.weight": hf["model.embed_tokens.weight" if config.tie_embeddings else "lm_head.weight"]}
    for i in range(config.n_layers):
        p, m = f"model.layers.{i}.", f"layers.{i}."
        sd.update({
            m + "attention.wq.weight": qk(hf[p + "self_attn.q_proj.weight"], config.n_heads),
            m + "attention.wk.weight": qk(hf[p + "self_attn.k_proj.weight"], config.n_kv_heads),
            m + "attention.wv.weight": hf[p + "self_attn.v_proj.weight"],
            m + "attention.wo.weight": hf[p + "self_attn.o_proj.weight"],
            m + "feed_forward.w1.weight": hf[p + "mlp.gate_proj.weight"],
            m + "feed_forward.w2.weight": hf[p + "mlp.down_proj.weight"],
            m + "feed_forward.w3.weight": hf[p + "mlp.up_proj.weight"],
            m + "attention_norm.weight": hf[p + "input_layernorm.weight"],
            m + "ffn_norm.weight": hf[p + "post_attention_layernorm.weight"],
        })
    return {k: v.clone() for k, v in sd.items()}


def load_hf_tensors(checkpoint_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder's `model*.safetensors` files, as stored."""
    import safetensors.torch
    files = sorted(Path(checkpoint_dir).glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint_dir}: no model*.safetensors")
    tensors = {}
    for f in files:
        tensors.update(safetensors.torch.load_file(str(f)))
    return tensors


def load_meta(checkpoint_dir: str | os.PathLike, max_seq_len: int,
              dtype: torch.dtype = torch.float32, rope_factor: Optional[float] = None):
    """Meta's `Transformer` holding a Hugging Face folder's weights, cast to `dtype`.

    `max_seq_len` sizes Meta's KV cache; its rope table covers positions < 2 * max_seq_len.
    `rope_factor`: build the rope table with this llama3 scaling factor instead of Meta's
    hard-coded 8 (see `meta_rope_factor`); None keeps Meta's code exactly as shipped.
    """
    import llama_models.llama3.model as meta
    from llama_models.llama3.args import ModelArgs
    init_model_parallel()
    config = from_hf_config(json.loads((Path(checkpoint_dir) / "config.json").read_text()))
    args = ModelArgs(**meta_params(checkpoint_dir, config), max_batch_size=1, max_seq_len=max_seq_len)
    patch = meta_rope_factor(rope_factor) if rope_factor is not None else contextlib.nullcontext()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with patch:
            model = meta.Transformer(args)
    finally:
        torch.set_default_dtype(previous)
    state = hf_to_meta_state_dict(load_hf_tensors(checkpoint_dir), config)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    model.config = config  # for meta_run
    return model.eval()


def meta_reset_cache(model):
    """Empty Meta's KV cache (it lives in each Attention module)."""
    for layer in model.layers:
        layer.attention.cache_k.zero_()
        layer.attention.cache_v.zero_()


def _meta_rope_wrapper(original, rec: _Recorder):
    def apply_rotary_emb(xq, xk, freqs_cis):
        q_rope, k_rope = original(xq, xk, freqs_cis)
        rec.put_rope(xq, xk, q_rope, k_rope)  # already [B, T, heads, Dh], interleaved
        return q_rope, k_rope
    return apply_rotary_emb


def meta_run(model, tokens: list[int], pos: int, cache_pos: int = 0,
             config: Optional[ModelConfig] = None) -> dict[str, np.ndarray]:
    """Every stage of Meta's forward pass over `tokens` at rope positions pos, pos+1, ...

    The tokens go into KV-cache slots cache_pos, cache_pos+1, ... and attend to slots
    0..cache_pos-1 (what earlier calls put there). Meta's forward ties the two together (rope
    position = cache slot); to run tokens at a high position with a short cache, Meta's own
    forward is called with its rope table shifted by pos - cache_pos rows, so that it slices
    `freqs_cis[pos : pos + T]` while writing cache slots from `cache_pos`.
    `config` gives the stage shapes; by default the one `load_meta` attached to the model.
    """
    config = config or getattr(model, "config", None)
    if config is None:
        raise ValueError("meta_run needs the ModelConfig of a model not built by load_meta")
    import llama_models.llama3.model as meta
    if not 0 <= cache_pos <= pos:
        raise ValueError(f"need 0 <= cache_pos ({cache_pos}) <= pos ({pos})")
    table = model.freqs_cis
    if pos + len(tokens) > table.shape[0]:
        raise ValueError(f"position {pos + len(tokens) - 1} beyond Meta's rope table "
                         f"({table.shape[0]} rows): raise max_seq_len")
    with _recording(model, model.layers, "attention", META_LAYER_POINTS, META_MODEL_POINTS,
                    meta, "apply_rotary_emb", _meta_rope_wrapper) as rec:
        model.freqs_cis = table[pos - cache_pos:]
        try:
            model(torch.tensor([tokens], dtype=torch.long), cache_pos)
        finally:
            model.freqs_cis = table
    return rec.result(config, len(tokens))


def meta_rope(head_dim: int, theta: float, use_scaled: bool, positions: list[int],
              rope_factor: Optional[float] = None) -> dict[str, np.ndarray]:
    """Meta's `precompute_freqs_cis`: its frequency table `freqs` [Dh/2] and its rows at
    `positions`, cos (real) and sin (imag) [P, Dh/2].

    The frequency table is row 1 of the angles `torch.outer(t, freqs)` that `precompute_freqs_cis`
    passes to `torch.polar` (1.0 · f is f exactly), recorded by wrapping `torch.polar` for the call.
    """
    import llama_models.llama3.model as meta
    patch = meta_rope_factor(rope_factor) if rope_factor is not None else contextlib.nullcontext()
    angles = []
    polar = torch.polar

    def recording_polar(abs, angle):
        angles.append(angle.clone())
        return polar(abs, angle)

    torch.polar = recording_polar
    try:
        with patch:
            freqs_cis = meta.precompute_freqs_cis(head_dim, max(positions) + 1, theta, use_scaled)
    finally:
        torch.polar = polar
    (table,) = angles
    rows = freqs_cis[torch.tensor(positions)]
    return {"freqs": table[1].numpy().astype(np.float32),
            "cos": rows.real.numpy().astype(np.float32), "sin": rows.imag.numpy().astype(np.float32)}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a NumPy array of the same bits (bfloat16 as ml_dtypes.bfloat16)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
