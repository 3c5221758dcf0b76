"""llama.cpp's own numbers for compute mode "llamacpp" (llama3_np/llamacpp.py), and the GGUFs they
are measured on:

    python tools/make_llamacpp_reference.py            (`make fixtures` runs it; needs `make tools`)

1. tests/fixtures/llamacpp/activation_quantizers.safetensors: activation rows (random, with zero
   blocks, integer ties, ±amax pairs and a wide range of scales) and the Q8_0, Q8_1 and Q8_K blocks
   ggml's CPU backend makes of them: its exported quantize_row_q8_0/q8_1/q8_K of
   libggml-cpu.so, the functions ggml_mul_mat's conversion calls (AVX2 paths on this machine).
2. weights/llamacpp/: the default model requantized: Q8_0 and Q4_0 by gguf-py (`requantize`:
   every matrix's exact values, gguf.quants.quantize, norms kept F32; the test rebuilds the same
   blocks from the default model without llama.cpp) and Q4_K_M by llama.cpp's own quantizer
   (llama_model_quantize) from an F32 GGUF of the exact values (its file is too large to commit;
   it is measured here and in BENCHMARKS.md, not in the tests).
3. tests/fixtures/llamacpp/logits_<TYPE>.safetensors: llama.cpp's logits (llama-cpp-python
   0.3.36, `Llama(logits_all=True)`, its default flash_attn=False, 1 thread) of PROMPT on the
   default model's own Q4_1 file and on Q8_0 and Q4_0: a prefill of the first PREFILL tokens and
   the rest one at a time through the KV cache; every position, every STRIDE-th vocabulary entry
   (the NMSE over 3072 of 49152 entries estimates the whole: a full row is 192 KiB).

It prints the logits NMSE of llama3_np against llama.cpp in exact math (compute float32) and in
llama.cpp's arithmetic (compute llamacpp) for each file, Q4_K_M included: the figures of
docs/DESIGN.md, "Numerical facts".
"""

from __future__ import annotations

import ctypes
import hashlib
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
STRIDE = 16
TYPES = ("Q4_1", "Q8_0", "Q4_0")  # committed logits; Q4_1 is the default model's file as it is
REPORTED = ("Q4_K_M",)  # measured here only


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


# --- 3. llama.cpp's logits ----------------------------------------------------------------------

def prompt_tokens() -> list[int]:
    from llama3_np.load import load_tokenizer

    return load_tokenizer(DEFAULT_GGUF).encode(PROMPT)


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:  # -> [T, V] float32
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=1, logits_all=True, verbose=False)
    llm.eval(tokens[:PREFILL])
    for t in tokens[PREFILL:]:
        llm.eval([t])
    return np.array(llm.scores[:len(tokens)], dtype=np.float32)


def llama3_np_logits(path: Path, tokens: list[int], compute: str) -> np.ndarray:
    from llama3_np.load import load_model
    from llama3_np.model import KVCache, forward

    model = load_model(path, dtype="gguf", need_tokenizer=False, compute=compute)
    cache = KVCache(model.config, len(tokens), model.compute)
    rows = [forward(model.weights, model.config, tokens[:PREFILL], cache)]
    rows += [forward(model.weights, model.config, [t], cache) for t in tokens[PREFILL:]]
    return np.concatenate(rows)


def nmse(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sum((a.astype(np.float64) - ref) ** 2) / np.sum(ref.astype(np.float64) ** 2))


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    write_quantizer_fixture()
    tokens = prompt_tokens()
    for type_name in TYPES + REPORTED:
        path = gguf_path(type_name)
        reference = llama_cpp_logits(path, tokens)
        if type_name in TYPES:
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if type_name == "Q4_1" else ""
            write_safetensors(OUT / f"logits_{type_name}.safetensors",
                              {"logits": np.ascontiguousarray(reference[:, ::STRIDE]),
                               "argmax": reference.argmax(axis=-1).astype(np.int64)},
                              {"producer": "llama-cpp-python 0.3.36 (flash_attn=False, n_threads=1)",
                               "tokens": ",".join(map(str, tokens)), "prefill": str(PREFILL),
                               "stride": str(STRIDE), "type": type_name, "gguf_sha256": digest})
        exact = nmse(llama3_np_logits(path, tokens, "float32"), reference)
        emulated = nmse(llama3_np_logits(path, tokens, "llamacpp"), reference)
        print(f"{type_name}: logits NMSE against llama.cpp: exact math {exact:.3g}, "
              f"llama.cpp's arithmetic {emulated:.3g} ({exact / emulated:.0f}x smaller)")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("make_llamacpp_reference", main))
