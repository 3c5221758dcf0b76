#!/usr/bin/env python3
"""Write tests/fixtures/checkpoints/gguf_default_model_types.gguf: rows of the default model's real
tensors in every ggml type llama3_np reads, each quantized by llama.cpp itself.

    python tools/fetch_default_model.py && python tools/make_gguf_type_fixture.py

(needs `make tools`). llama-cpp-python's `llama_model_quantize` (llama.cpp's `llama-quantize`)
requantizes the default model's Q4_1 GGUF to each file type below in a temporary folder; from each
result, the first ROWS rows of the first matrix of every type not yet taken become one tensor of
the fixture, named `TYPE:original name`. The default model's rows of 576 values are not
whole K-quant super-blocks of 256, so llama.cpp keeps those tensors in a 32-block type and the
K-quants come from ffn_down (rows of 1536). tests/formats/test_ggml_blocks.py holds each of them
bit-equal to `gguf.quants.dequantize`.
"""

from __future__ import annotations

import ctypes
import sys
import tempfile
from pathlib import Path

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable

import gguf
import llama_cpp
import numpy as np

from llama3_np.assets import default_model
from llama3_np.formats.ggml_blocks import SUPPORTED
from llama3_np.formats.gguf_file import GGUFFile

OUT = REPO / "tests" / "fixtures" / "checkpoints" / "gguf_default_model_types.gguf"
ROWS = 8
FILE_TYPES = ["ALL_F32", "MOSTLY_F16", "MOSTLY_BF16", "MOSTLY_Q8_0", "MOSTLY_Q4_0", "MOSTLY_Q4_1", "MOSTLY_Q5_0",
              "MOSTLY_Q5_1", "MOSTLY_Q4_K_M", "MOSTLY_Q5_K_M", "MOSTLY_Q6_K"]


def quantize(source: Path, out: Path, file_type: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{file_type}")
    params.allow_requantize = True
    params.nthread = 2
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0:
        raise SystemExit(f"llama_model_quantize to {file_type} failed ({status})")


def main() -> int:
    source = default_model()
    taken: dict[str, tuple[str, np.ndarray]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for file_type in FILE_TYPES:
            path = Path(tmp) / f"{file_type}.gguf"
            quantize(source, path, file_type)
            for t in GGUFFile(path).tensors.values():
                if t.type.name not in taken and len(t.shape) == 2:  # a matrix: several rows
                    taken[t.type.name] = (f"{t.type.name}:{t.name}", np.array(t.raw()[:ROWS]))
            path.unlink()
    missing = [t.name for t in SUPPORTED.values() if t.name not in taken]
    if missing:
        raise SystemExit(f"no tensor of type {', '.join(missing)} in llama.cpp's files")
    w = gguf.GGUFWriter(OUT.with_name(OUT.name + ".partial"), "llama")
    w.add_name("rows of SmolLM2-135M-Instruct's tensors in every type llama3_np reads "
               f"(tools/make_gguf_type_fixture.py, llama-cpp-python {llama_cpp.__version__})")
    for type_name in [t.name for t in SUPPORTED.values()]:
        name, raw = taken[type_name]
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType[type_name])
        print(f"{name}: {raw.shape[0]} rows of {raw.shape[1]} bytes")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    OUT.with_name(OUT.name + ".partial").replace(OUT)
    print(f"wrote {OUT.relative_to(REPO)} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("make_gguf_type_fixture", main))
