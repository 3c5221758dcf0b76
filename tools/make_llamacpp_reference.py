"""llama.cpp's own numbers for compute mode "llamacpp" (llama3_np/llamacpp.py), the fixtures the
tests hold it to, and the measurements of docs/DESIGN.md ("Numerical facts"):

    python tools/make_llamacpp_reference.py            (`make fixtures` runs it; needs `make tools`)

Fixtures (tests/fixtures/llamacpp/, from llama-cpp-python 0.3.36 on the CPU, one thread):

- activation_quantizers.safetensors: activation rows (random over a wide range of scales, with a
  zero block, ties, ±amax pairs, tiny values) and the Q8_0, Q8_1 and Q8_K blocks ggml's CPU
  backend makes of them (the quantize_row_q8_0/q8_1/q8_K that libggml-cpu.so exports, which
  ggml_mul_mat's conversion calls); and for each weight type, random weights quantized by ggml
  and their products with rows of x as ggml computes them (`ggml_products`).
- tiny_q8_0.safetensors: every stage of llama.cpp's run of TINY_TOKENS on the tiny Q8_0 checkpoint
  tests/fixtures/checkpoints/gguf_q8_0.gguf (tools/llamacpp_dump.py, flash attention off).
- default_q4_1.safetensors: DEFAULT_STAGES of llama.cpp's run of the first 3 tokens of PROMPT on
  the default model's own Q4_1 file: enough to replay its first and last layers;
  default_q8_0.safetensors, default_q4_0.safetensors: REQUANTIZED_STAGES of its run on the Q8_0 and
  Q4_0 requantizations below (the tests make the same blocks with gguf-py, `requantize`).

Measured, not committed (weights/llamacpp/, git-ignored): the default model requantized to Q8_0
and Q4_0 by gguf-py (every matrix's exact values through gguf.quants.quantize, norms F32) and to
Q4_K_M by llama.cpp's own quantizer (llama_model_quantize, from an F32 GGUF of the exact values).
For each of these and the Q4_1 file, in exact math (compute float32) and in llama.cpp's arithmetic
(compute llamacpp): the logits NMSE against llama.cpp's (`Llama(logits_all=True)`, its default
flash_attn=False) over PROMPT, PREFILL tokens prefilled then one at a time through the KV cache;
and the largest local NMSE of any stage replayed on llama.cpp's own input (`compare --replay`);
and how far llama.cpp's own logits move with its flash-attention kernel (flash_attn=True, the
default of llama.cpp's own tools), which llama3_np does not emulate, and when it decodes every
token alone instead of prefilling (other kernels, the same arithmetic in another float32 order).
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable
import gguf

from llama3_np.formats.safetensors_file import write_safetensors

OUT = REPO / "tests" / "fixtures" / "llamacpp"
GGUFS = REPO / "weights" / "llamacpp"
DEFAULT_GGUF = REPO / "weights" / "default" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is Paris, and the capital of Germany is"
PREFILL = 8
TYPES = ("Q4_1", "Q8_0", "Q4_0", "Q4_K_M")  # Q4_1: the default model's file as it is
TINY_GGUF = REPO / "tests" / "fixtures" / "checkpoints" / "gguf_q8_0.gguf"
TINY_TOKENS = [1, 7, 42, 3, 99, 5]
# The default model's committed stages: enough to replay its first and last layers and the norm.
DEFAULT_STAGES = ("embed", "layers.0.*", "layers.28.out", "layers.29.*", "norm")
# ... and of its Q8_0 and Q4_0 requantizations: the last layer, and the norm.
REQUANTIZED_STAGES = ("layers.28.out", "layers.29.*", "norm")


def llama_cpp_lib(name: str) -> ctypes.CDLL:
    import llama_cpp

    return ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / name))


# --- 1. the activation quantizers --------------------------------------------------------------

# ggml-common.h's activation blocks
Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
Q8_1 = np.dtype([("d", "<f2"), ("s", "<f2"), ("qs", "i1", 32)])
Q8_K = np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)])


def activation_rows() -> np.ndarray:  # -> [R, 512] float32
    rng = np.random.default_rng(21)
    x = (rng.standard_normal((16, 512)) * rng.lognormal(0, 3, (16, 1))).astype(np.float32)
    x[0, :256] = 0  # a zero block and a zero super-block
    x[1, :256] = np.round(x[1, :256] * 4) / 4  # many exact halves after scaling: ties
    x[2, :256] = np.clip(x[2, :256], -2, 2)  # +amax and -amax both, many times
    x[3, 40] = -np.abs(x[3]).max() * 3  # a negative peak
    x[4] = np.linspace(-1, 1, 512, dtype=np.float32)
    x[5, :] = np.float32(1e-30) * rng.standard_normal(512).astype(np.float32)  # tiny scales (float16 subnormal d)
    return x


def ggml_quantized(x: np.ndarray) -> dict[str, np.ndarray]:
    lib = llama_cpp_lib("libggml-cpu.so")
    out = {}
    for name, block, size in (("q8_0", Q8_0, 32), ("q8_1", Q8_1, 32), ("q8_K", Q8_K, 256)):
        f = getattr(lib, f"quantize_row_{name}")
        f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
        blocks = np.zeros((x.shape[0], x.shape[1] // size), dtype=block)
        for r in range(x.shape[0]):
            row = np.ascontiguousarray(x[r])
            f(row.ctypes.data, blocks[r].ctypes.data, x.shape[1])
        for field in block.names:
            out[f"{name}.{field}"] = np.ascontiguousarray(blocks[field])
    return out


# The weight types whose products the fixture records, and ggml's type ids (ggml.h, enum ggml_type).
WEIGHT_TYPES = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}


class TypeTraitsCPU(ctypes.Structure):  # ggml-cpu.h, struct ggml_type_traits_cpu
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t, ctypes.c_void_p,
                           ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def ggml_products(x: np.ndarray) -> dict[str, np.ndarray]:
    """For each weight type: random weights [8, n] quantized by ggml (ggml_quantize_chunk, no
    importance matrix) and x · wᵀ as ggml's CPU backend computes it: x's rows converted by the
    vec_dot_type's from_float, then the type's vec_dot (the functions ggml_mul_mat calls)."""
    base, cpu = llama_cpp_lib("libggml-base.so"), llama_cpp_lib("libggml-cpu.so")
    cpu.ggml_cpu_init()
    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(TypeTraitsCPU)
    base.ggml_row_size.restype, base.ggml_row_size.argtypes = ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]
    base.ggml_quantize_chunk.restype = ctypes.c_size_t
    base.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    rng = np.random.default_rng(3)
    T, n = x.shape
    out = {}
    for name, type_id in WEIGHT_TYPES.items():
        w = (rng.standard_normal((8, n)) * 0.05).astype(np.float32)
        raw = np.zeros((8, base.ggml_row_size(type_id, n)), dtype=np.uint8)
        base.ggml_quantize_chunk(type_id, w.ctypes.data, raw.ctypes.data, 0, 8, n, None)
        traits = cpu.ggml_get_type_traits_cpu(type_id).contents
        act_type = traits.vec_dot_type
        act = np.zeros((T, base.ggml_row_size(act_type, n)), dtype=np.uint8)
        from_float = FROM_FLOAT(cpu.ggml_get_type_traits_cpu(act_type).contents.from_float)
        for t in range(T):
            row = np.ascontiguousarray(x[t])
            from_float(row.ctypes.data, act[t].ctypes.data, n)
        vec_dot = VEC_DOT(traits.vec_dot)
        result = np.zeros((T, 8), dtype=np.float32)
        s = ctypes.c_float()
        for t in range(T):
            for o in range(8):
                vec_dot(n, ctypes.byref(s), 0, raw[o].ctypes.data, 0, act[t].ctypes.data, 0, 1)
                result[t, o] = s.value
        out[f"{name}.weight"], out[f"{name}.product"] = raw, result
    return out


def write_quantizer_fixture() -> None:
    x = activation_rows()
    tensors = {"x": x, **ggml_quantized(x), **ggml_products(x[6:])}
    write_safetensors(OUT / "activation_quantizers.safetensors", tensors,
                      {"producer": "libggml-cpu.so of llama-cpp-python 0.3.36: quantize_row_q8_0/q8_1/q8_K; "
                                   "products of x[6:] by type_traits_cpu's from_float and vec_dot"})


# --- 2. the GGUFs -------------------------------------------------------------------------------

def requantize(values: np.ndarray, type_name: str) -> np.ndarray:
    """A matrix's exact float32 values as `type_name` blocks (uint8 rows), by gguf-py's quantizer
    (a NumPy copy of ggml's quantize_row_*_ref). The tests make the same blocks the same way."""
    return gguf.quants.quantize(values, gguf.GGMLQuantizationType[type_name])


def write_gguf(src: Path, dst: Path, type_name: str) -> None:
    """`src` with every matrix requantized to `type_name` ("F32": its exact values), vectors as they are."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = dst.with_suffix(".partial")
    writer = gguf.GGUFWriter(tmp, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name == gguf.Keys.General.FILE_TYPE:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[type_name])
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        if values.ndim == 2 and type_name != "F32":
            writer.add_tensor(t.name, requantize(values, type_name), raw_dtype=gguf.GGMLQuantizationType[type_name])
        else:
            writer.add_tensor(t.name, values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dst)


def llama_cpp_quantize(src: Path, dst: Path, ftype_name: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = 1
    tmp = dst.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {dst}")
    tmp.replace(dst)


def gguf_path(type_name: str) -> Path:
    if type_name == "Q4_1":
        return DEFAULT_GGUF
    path = GGUFS / f"SmolLM2-135M-Instruct.{type_name}.gguf"
    if path.exists():
        return path
    GGUFS.mkdir(parents=True, exist_ok=True)
    if type_name in ("Q8_0", "Q4_0", "F32"):
        write_gguf(DEFAULT_GGUF, path, type_name)
    else:
        llama_cpp_quantize(gguf_path("F32"), path, type_name)
    return path


# --- 3. llama.cpp's stages, and the measurements -------------------------------------------------

def prompt_tokens() -> list[int]:
    from llama3_np.load import load_tokenizer

    return load_tokenizer(DEFAULT_GGUF).encode(PROMPT)


def llama_cpp_logits(path: Path, tokens: list[int], flash_attn: bool = False,
                     prefill: int = PREFILL) -> np.ndarray:  # -> [T, V] float32
    from llamacpp_dump import llama_cpp_model

    llm = llama_cpp_model(path, len(tokens), flash_attn)
    llm.eval(tokens[:prefill])
    for t in tokens[prefill:]:
        llm.eval([t])
    return np.array(llm.scores[:len(tokens)], dtype=np.float32)


def llama3_np_logits(checkpoint, tokens: list[int], compute: str) -> np.ndarray:
    from llama3_np.model import KVCache, forward

    cache = KVCache(checkpoint.config, len(tokens), compute)
    rows = [forward(checkpoint.weights, checkpoint.config, tokens[:PREFILL], cache)]
    rows += [forward(checkpoint.weights, checkpoint.config, [t], cache) for t in tokens[PREFILL:]]
    return np.concatenate(rows)


def nmse(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sum((a.astype(np.float64) - ref) ** 2) / np.sum(ref.astype(np.float64) ** 2))


def write_llama_cpp_dump(gguf_file: Path, out: Path, tokens: list[int], globs=("*",)) -> None:
    from llamacpp_dump import llama_cpp_dump
    from llama3_np.formats.checkpoint import scan_checkpoint
    from llama3_np.xcheck.dump import Inputs, write_dump

    stages, metadata = llama_cpp_dump(gguf_file, scan_checkpoint(gguf_file).config, Inputs(tokens, 0, [], 0), globs)
    write_dump(out, stages, metadata)


def measure(type_name: str, tokens: list[int]) -> str:
    """One line: logits NMSE against llama.cpp over PROMPT (prefill, then decode), and the largest
    local NMSE of any stage replayed on llama.cpp's own inputs (3 tokens), in both modes."""
    from llama3_np.formats.checkpoint import load_checkpoint
    from llama3_np.xcheck.dump import read_dump
    from llama3_np.xcheck.replay import replay

    path = gguf_path(type_name)
    checkpoint = load_checkpoint(path, "gguf")
    reference = llama_cpp_logits(path, tokens)
    dump_file = GGUFS / f"dump.{type_name}.safetensors"
    write_llama_cpp_dump(path, dump_file, tokens[:3])
    dump = read_dump(dump_file)
    line = f"{type_name:7}"
    for compute in ("float32", "llamacpp"):
        free = nmse(llama3_np_logits(checkpoint, tokens, compute), reference)
        worst = replay(checkpoint.weights, checkpoint.config, dump, compute=compute)[0]
        line += f" | {free:9.2e} {worst.local.nmse:9.2e} ({worst.name})"
    line += f" | {nmse(llama_cpp_logits(path, tokens, flash_attn=True), reference):9.2e}"
    return line + f" | {nmse(llama_cpp_logits(path, tokens, prefill=1), reference):9.2e}"


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    GGUFS.mkdir(parents=True, exist_ok=True)
    write_quantizer_fixture()
    write_llama_cpp_dump(TINY_GGUF, OUT / "tiny_q8_0.safetensors", TINY_TOKENS)
    tokens = prompt_tokens()
    write_llama_cpp_dump(DEFAULT_GGUF, OUT / "default_q4_1.safetensors", tokens[:3], DEFAULT_STAGES)
    for type_name in ("Q8_0", "Q4_0"):
        write_llama_cpp_dump(gguf_path(type_name), OUT / f"default_{type_name.lower()}.safetensors", tokens[:3],
                             REQUANTIZED_STAGES)
    print(f"llama.cpp against llama3_np: logits NMSE over {len(tokens)} tokens ({PREFILL} prefilled), and the "
          "largest local NMSE of a stage replayed on llama.cpp's input (3 tokens)")
    print("type    | exact math: logits, replayed stage | llama.cpp's arithmetic: logits, replayed stage "
          "| llama.cpp with flash attention: logits | llama.cpp, every token decoded alone: logits")
    for type_name in TYPES:
        print(measure(type_name, tokens), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("make_llamacpp_reference", main))
