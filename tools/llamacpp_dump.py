"""A dump file (docs/DESIGN.md's format, the one `llama3-np dump` writes) of llama.cpp's own
intermediate tensors, recorded by its evaluation callback:

    python tools/llamacpp_dump.py -m FILE.gguf (-p TEXT | -f FILE | --tokens 1,2,3 | --like DUMP) -o OUT.safetensors
                                  [--pos N] [--stages GLOB ...] [--flash-attn]

llama-cpp-python (0.3.36) runs the GGUF on the CPU, one thread, without ggml's extra buffer types
(`llama_cpp_model`), with the context's `cb_eval` callback (llama_context_params.cb_eval,
ggml_backend_sched_eval_callback) asking for every node of the graph; each computed float32 node whose (name, op) is in `GGML_STAGES` is copied out under the
stage contract's name (`llama3_np.stages`). The KV-cache context of `--like` is fed first, without
recording. Then:

    llama3-np dump -m FILE.gguf --compute llamacpp --like OUT.safetensors -o ours.safetensors
    llama3-np compare OUT.safetensors ours.safetensors            (or: compare OUT.safetensors --replay -m FILE.gguf --compute llamacpp)

The mapping from llama.cpp's graph (src/models/llama.cpp, src/llama-graph.cpp: the names its `cb`
gives, "-i" for layer i) to the stage contract. ggml lists a tensor's dimensions fastest first
(ne[0]); NumPy's shape is their reverse, so ggml's [Dh, H, T] is NumPy's [T, H, Dh]:

| ggml node (op)            | ggml ne           | stage                 |
|---------------------------|-------------------|-----------------------|
| embd (GET_ROWS)           | [D, T]            | embed                 |
| attn_norm-i (MUL)         | [D, T]            | layers.i.attn_norm    |
| Qcur-i (MUL_MAT)          | [H*Dh, T]         | layers.i.q            |
| Kcur-i, Vcur-i (MUL_MAT)  | [KV*Dh, T]        | layers.i.k, .v        |
| Qcur-i, Kcur-i (ROPE)     | [Dh, H or KV, T]  | layers.i.q_rope, .k_rope |
| kq_soft_max-i (SOFT_MAX)  | [n_kv, T, H]      | layers.i.probs (the first S of n_kv cache cells) |
| kqv_out-i (CONT)          | [H*Dh, T]         | layers.i.attn         |
| attn_out-i (MUL_MAT)      | [D, T]            | layers.i.attn_out     |
| ffn_inp-i (ADD)           | [D, T]            | layers.i.h            |
| ffn_norm-i (MUL)          | [D, T]            | layers.i.ffn_norm     |
| ffn_swiglu-i (SWIGLU)     | [F, T]            | layers.i.ffn_hidden   |
| ffn_out-i (MUL_MAT)       | [D, T]            | layers.i.ffn_out      |
| l_out-i (ADD)             | [D, T]            | layers.i.out          |
| result_norm (MUL)         | [D, T]            | norm                  |
| result_output (MUL_MAT)   | [V, T]            | logits                |

Rope layout: llama.cpp runs Llama with rope type NORM, which rotates adjacent pairs (dims 2i and
2i+1): Meta's interleaved layout, the dump's, so q and k are written as they are (a GGUF's q/k rows
were permuted into that layout when it was converted). `kq_soft_max` is over the context's n_kv
cells (a multiple of 256), of which the cells past S are masked to probability 0 and dropped.
With --flash-attn (llama.cpp's FLASH_ATTN_EXT kernel) no probabilities or pre-projection attention
exist as tensors, so `attn` and `probs` are missing from the dump. Needs the tools extra (`make tools`).
"""

from __future__ import annotations

import argparse
import ctypes
import fnmatch
import re
import sys
from pathlib import Path

import numpy as np

from tool_support import REPO, run_tool  # noqa: F401  (puts this checkout's llama3_np on sys.path)

from llama3_np.cli.common import add_input_args, parse_token_ids, read_prompt  # noqa: E402
from llama3_np.errors import Llama3Error  # noqa: E402
from llama3_np.formats.checkpoint import scan_checkpoint  # noqa: E402
from llama3_np.load import load_tokenizer  # noqa: E402
from llama3_np.stages import check_globs, stage_shapes  # noqa: E402
from llama3_np.xcheck.dump import dump_metadata, resolve_inputs, write_dump  # noqa: E402

# (ggml node name without its "-i", ggml op) -> the stage's name within a layer (or at the top).
GGML_STAGES = {
    ("embd", "GET_ROWS"): "embed",
    ("attn_norm", "MUL"): "attn_norm",
    ("Qcur", "MUL_MAT"): "q", ("Kcur", "MUL_MAT"): "k", ("Vcur", "MUL_MAT"): "v",
    ("Qcur", "ROPE"): "q_rope", ("Kcur", "ROPE"): "k_rope",
    ("kq_soft_max", "SOFT_MAX"): "probs",
    ("kqv_out", "CONT"): "attn",
    ("attn_out", "MUL_MAT"): "attn_out",
    ("ffn_inp", "ADD"): "h",
    ("ffn_norm", "MUL"): "ffn_norm",
    ("ffn_swiglu", "SWIGLU"): "ffn_hidden",  # ggml_op_desc names a GLU node by its kind
    ("ffn_out", "MUL_MAT"): "ffn_out",
    ("l_out", "ADD"): "out",
    ("result_norm", "MUL"): "norm",
    ("result_output", "MUL_MAT"): "logits",
}
GGML_TYPE_F32 = 0


class GGMLTensor(ctypes.Structure):
    """ggml.h's struct ggml_tensor (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10,
    GGML_MAX_NAME 64), as llama-cpp-python 0.3.36's ggml declares it."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def stage_name(ggml_name: str, op: str) -> str | None:
    """The stage a ggml node records ("Qcur-3", "ROPE" -> "layers.3.q_rope"), None if none."""
    m = re.fullmatch(r"(.+?)(?:-(\d+))?", ggml_name)
    stage = GGML_STAGES.get((m.group(1), op))
    if stage is None:
        return None
    return stage if m.group(2) is None else f"layers.{m.group(2)}.{stage}"


def tensor_array(t: GGMLTensor) -> np.ndarray:
    """A float32 node's values as a NumPy array, dimensions reversed (ggml's ne[0] is the last axis)."""
    size = sum((n - 1) * s for n, s in zip(t.ne, t.nb)) + 4
    buffer = (ctypes.c_char * size).from_address(t.data)
    values = np.frombuffer(buffer, dtype=np.float32)
    return np.lib.stride_tricks.as_strided(values, shape=tuple(t.ne)[::-1], strides=tuple(t.nb)[::-1]).copy()


def llama_cpp_model(path: Path, n_ctx: int, flash_attn: bool = False, cb_eval=None):
    """llama-cpp-python's `Llama` on GGUF `path`, on the CPU, one thread, every token's logits,
    without ggml's extra buffer types (use_extra_bufts off: no AMX tiles, no weights repacked for
    this CPU's SIMD width), so that each product runs type_traits_cpu's vec_dot, the same kernels
    on every x86-64 CPU (AMX faults on a machine that reports it without enabling it). `cb_eval`:
    the context's evaluation callback (llama_context_params.cb_eval)."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    # Llama builds its model and context from the library's default parameters: change those.
    model_defaults, context_defaults = low.llama_model_default_params, low.llama_context_default_params

    def model_params():
        params = model_defaults()
        params.use_extra_bufts = False
        return params

    def context_params():
        params = context_defaults()
        if cb_eval is not None:
            params.cb_eval, params.cb_eval_user_data = cb_eval, None
        return params

    low.llama_model_default_params, low.llama_context_default_params = model_params, context_params
    try:
        n = max(n_ctx, 64)
        return llama_cpp.Llama(model_path=str(path), n_ctx=n, n_batch=n, n_ubatch=n, n_threads=1, n_threads_batch=1,
                               logits_all=True, flash_attn=flash_attn, verbose=False)
    finally:
        low.llama_model_default_params, low.llama_context_default_params = model_defaults, context_defaults


def llama_cpp_stages(path: Path, context: list[int], tokens: list[int], flash_attn: bool) -> dict[str, np.ndarray]:
    """llama.cpp's nodes for `tokens` (after `context`), by stage name, as ggml lays them out."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    base = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    base.ggml_op_desc.restype, base.ggml_op_desc.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    recorded: dict[str, np.ndarray] = {}
    recording = [False]

    @low.ggml_backend_sched_eval_callback
    def observe(pointer, ask, _user_data):
        if ask or not recording[0]:
            return True
        t = ctypes.cast(pointer, ctypes.POINTER(GGMLTensor)).contents
        name = stage_name(t.name.decode(), base.ggml_op_desc(pointer).decode())
        if name is not None and t.type == GGML_TYPE_F32 and t.data:
            recorded[name] = tensor_array(t)
        return True

    llm = llama_cpp_model(path, len(context) + len(tokens), flash_attn, observe)
    if context:
        llm.eval(context)
    recording[0] = True
    llm.eval(tokens)
    recording[0] = False
    return recorded


def llama_cpp_dump(path: Path, config, inputs, globs=("*",), flash_attn: bool = False) -> tuple[dict, dict]:
    """The stages matching `globs` of llama.cpp's run of `inputs` on GGUF `path` (whose model
    `config` is), shaped as the stage contract says, and the dump's metadata.
    Raises Llama3Error for inputs llama.cpp cannot place (tokens not from position 0)."""
    if inputs.context_pos != 0 or inputs.pos != len(inputs.context):
        raise Llama3Error(f"llama.cpp places a sequence's tokens at positions 0, 1, 2, ...: these start at "
                          f"{inputs.context_pos if inputs.context else inputs.pos} (run them from position 0)")
    shapes = stage_shapes(config, len(inputs.tokens), len(inputs.context), probs=True)
    S = len(inputs.context) + len(inputs.tokens)
    stages = {}
    for name, values in llama_cpp_stages(path, inputs.context, inputs.tokens, flash_attn).items():
        if not any(fnmatch.fnmatchcase(name, g) for g in globs):
            continue
        if name.endswith(".probs"):  # [1, H, T, n_kv] -> [H, T, S]: the cells past S are masked
            values = values.reshape(values.shape[-3:])[:, :, :S]
        stages[name] = np.ascontiguousarray(values.reshape(shapes[name]), dtype=np.float32)
    import llama_cpp

    producer = f"llama.cpp (llama-cpp-python {llama_cpp.__version__}, CPU, flash_attn={'on' if flash_attn else 'off'})"
    return stages, dump_metadata(config, inputs, "float32", producer=producer, format="gguf")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", required=True, metavar="FILE.gguf", help="the GGUF file llama.cpp runs")
    add_input_args(p, "run")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument("--stages", nargs="+", metavar="GLOB", help="keep only stages matching these globs")
    p.add_argument("--flash-attn", action="store_true",
                   help="run llama.cpp's flash-attention kernel (llama-cpp-python's default is off)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    path = Path(args.model)
    output = Path(args.output)
    if not output.resolve().parent.is_dir():
        raise Llama3Error(f"-o {args.output}: folder {output.parent} does not exist")
    config = scan_checkpoint(path).config
    tokens = parse_token_ids(args.tokens, config.vocab_size) if args.tokens is not None else None
    inputs = resolve_inputs(config, text=read_prompt(args), tokens=tokens, like=args.like, pos=args.pos,
                            encode=lambda text: load_tokenizer(path).encode(text), model=path)
    for note in inputs.notes:
        print(f"note: {note}", file=sys.stderr)
    globs = check_globs(args.stages, stage_shapes(config, len(inputs.tokens), len(inputs.context))) \
        if args.stages is not None else ["*"]
    stages, metadata = llama_cpp_dump(path, config, inputs, globs, args.flash_attn)
    write_dump(output, stages, metadata)
    producer = metadata["producer"]
    print(f"wrote {len(stages)} stages of {len(inputs.tokens)} tokens from {producer} to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("llamacpp_dump", main, OSError))
