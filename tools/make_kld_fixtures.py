#!/usr/bin/env python3
"""Write tests/fixtures/kld/: llama.cpp's KL-divergence base file and the statistics
llama-perplexity prints, and prove the format by a round trip between llama.cpp and llama3_np.

    python tools/make_kld_fixtures.py [--llama-perplexity BIN] [--default-model]

llama-perplexity is built from the installed llama-cpp-python's sdist (tools/build_llama_cpp.py)
unless --llama-perplexity names a binary. The models are tiny (so that a base file is small: one
row per scored token holds the whole vocabulary) and in float32, so that llama.cpp computes what
llama3_np computes, up to the order of float32 sums:

    model_a.gguf   the random checkpoint of tools/make_checkpoint_fixtures.py (D=32, 2 layers) with a
                   byte-level vocabulary of 272 (all 256 bytes, 8 merges of two bytes, 8 special
                   tokens), F32
    model_b.gguf   the same with every matrix quantized to Q4_0, dequantized and rounded to bfloat16,
                   stored F32: the "quantized model" whose divergence from model_a a quantizer
                   measures (every value of both models is a bfloat16, so any residency holds it)

On the first 8 windows of 64 tokens of tests/fixtures/xcheck/jargon_hack.txt (248 scored tokens):

    base_llamacpp.kld        llama-perplexity -m model_a.gguf -f TEXT -c 64 --chunks 8 --kl-divergence-base
    llama_perplexity.json    what llama-perplexity --kl-divergence -m model_b.gguf printed reading that file
                             and reading the base llama3_np wrote with the same command line; llama3_np's
                             statistics of both files; the command lines and versions

The round trip: llama3-np perplexity writes its own base of model_a; llama-perplexity reads it, and
llama3_np reads llama.cpp's; each reader's statistics of each file are compared at the digits
llama-perplexity prints. With --default-model the same round trip runs on the default model's
Q4_1 GGUF (base: llama3_np's exact float32 logits, read by llama.cpp with its own arithmetic, and
the other way round); its statistics go into the JSON only (a base file of a 49,152-token
vocabulary takes 98 KB per scored token).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable

import gguf  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

import build_llama_cpp  # noqa: E402
from make_checkpoint_fixtures import PARAMS, fixture_weights, write_gguf  # noqa: E402
from llama3_np import __version__  # noqa: E402
from llama3_np.config import from_meta_params  # noqa: E402

OUT = REPO / "tests" / "fixtures" / "kld"
TEXT = REPO / "tests" / "fixtures" / "xcheck" / "jargon_hack.txt"
# Merges of two bytes each: llama.cpp applies a GGUF's merges in their order, llama3_np's tiktoken
# merges by the rank of the token made; on a vocabulary whose merged tokens all come from one merge of
# two bytes, ranked in merge order, the two are the same.
MERGES = ["h e", "i n", "a n", "e d", "o n", "e r", "r e", "t h"]
VOCAB = 256 + len(MERGES) + 8  # bytes, merges, special tokens
CTX, CHUNKS = 64, 8
# One sequence per batch, the KV cache in float32 and no flash attention: llama.cpp's attention then
# computes in float32 as llama3_np's does.
LLAMA_CPP_ARGS = ["-c", str(CTX), "-b", str(CTX), "-ctk", "f32", "-ctv", "f32", "-fa", "off", "-t", "2",
                  "--seed", "0"]
STATISTICS_START = "====== Perplexity statistics ======"
NUMBER = re.compile(r"-?\d+\.\d+")


def write_models() -> None:
    config = from_meta_params(dict(PARAMS, vocab_size=VOCAB))
    weights = fixture_weights(config)
    write_gguf(OUT / "model_a.gguf", config, weights, gguf.GGMLQuantizationType.F32, "llama-bpe",
               n_bytes=256, merges=MERGES)
    q4 = {name: gguf.quants.dequantize(gguf.quants.quantize(w.astype(np.float32), gguf.GGMLQuantizationType.Q4_0),
                                       gguf.GGMLQuantizationType.Q4_0).astype(ml_dtypes.bfloat16) if w.ndim == 2 else w
          for name, w in weights.items()}
    write_gguf(OUT / "model_b.gguf", config, q4, gguf.GGMLQuantizationType.F32, "llama-bpe",
               n_bytes=256, merges=MERGES)


def run(command: list, what: str, env=None) -> str:
    """stdout and stderr of `command` (llama.cpp logs the statistics to one and the rest to the other)."""
    print("$", " ".join(map(str, command)), flush=True)
    done = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise RuntimeError(f"{what} failed with exit status {done.returncode}")
    return done.stdout + "\n" + done.stderr


def kld_lines(output: str) -> dict:
    """The per-chunk lines and the summary of a --kl-divergence run, as printed."""
    lines = output.splitlines()
    chunks = [line for line in lines if re.match(r"^\s*\d+\s+-?\d+\.\d+ ± ", line)]
    start = next(i for i, line in enumerate(lines) if line.startswith(STATISTICS_START))
    end = next(i for i, line in enumerate(lines) if line.startswith("Same top p:"))
    return {"chunks": chunks, "summary": lines[start:end + 1]}


def llama3_np(*args) -> str:
    """llama3-np perplexity of this checkout (not of an installed llama3_np)."""
    return run([sys.executable, "-m", "llama3_np", "perplexity", *map(str, args)], "llama3-np perplexity",
               dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])))


def scale_of(line: str, value: float, printout: dict) -> float:
    """What a printed value's difference is relative to: PPL(Q) for the difference of two PPLs."""
    if line.startswith("Mean PPL(Q)-PPL(base)"):
        return float(NUMBER.findall(printout["summary"][1])[0])
    return abs(value)


def compare(a: dict, b: dict) -> dict:
    """How two printouts differ: the number of printed values, how many are equal as printed and
    how many within one unit of their last printed digit, and the largest relative difference of
    the others (`scale_of`)."""
    values = equal = within_one = 0
    worst = 0.0
    assert len(a["summary"]) == len(b["summary"]) and len(a["chunks"]) == len(b["chunks"]), (a, b)
    for line_a, line_b in zip(a["chunks"] + a["summary"], b["chunks"] + b["summary"]):
        for x, y in zip(NUMBER.findall(line_a), NUMBER.findall(line_b)):
            values += 1
            equal += x == y
            unit = 10.0 ** -len(x.split(".")[1])
            if round(abs(float(x) - float(y)) / unit) <= 1:
                within_one += 1
            else:
                worst = max(worst, abs(float(x) - float(y)) / scale_of(line_b, float(y), b))
    return {"values": values, "equal_as_printed": equal, "within_one_in_the_last_digit": within_one,
            "worst_relative_difference_of_the_others": float(f"{worst:.2g}")}


def round_trip(perplexity: Path, model_a: Path, model_b: Path, llama3_np_model_a: Path, llama3_np_model_b: Path,
               folder: Path, cpp_base: Path, extra: list) -> dict:
    """Both bases of model a (llama.cpp's and llama3_np's), each read by both tools with model b."""
    np_base = folder / "base_llama3_np.kld"
    run([perplexity, "-m", model_a, "-f", TEXT, "--chunks", CHUNKS, *extra, "--kl-divergence-base", cpp_base],
        "llama-perplexity --kl-divergence-base")
    llama3_np("-m", llama3_np_model_a, "-f", TEXT, "-c", CTX, "--chunks", CHUNKS, "--kl-divergence-base", np_base)
    out = {}
    for name, base in (("llamacpp_base", cpp_base), ("llama3_np_base", np_base)):
        by_cpp = kld_lines(run([perplexity, "-m", model_b, *extra, "--kl-divergence-base", base, "--kl-divergence"],
                               "llama-perplexity --kl-divergence"))
        by_np = kld_lines(llama3_np("-m", llama3_np_model_b, "--kl-divergence-base", base, "--kl-divergence"))
        out[name] = {"read_by_llama_perplexity": by_cpp, "read_by_llama3_np": by_np,
                     "agreement": compare(by_cpp, by_np)}
        print(f"{name}: {out[name]['agreement']}", flush=True)
    cpp_rows, np_rows = (np.fromfile(p, dtype="<u2") for p in (cpp_base, np_base))
    header = 10 + 2 * CTX * CHUNKS  # uint16 of the header and tokens
    out["files"] = {"header_and_tokens_equal": bool(np.array_equal(cpp_rows[:header], np_rows[:header])),
                    "sizes": [int(cpp_base.stat().st_size), int(np_base.stat().st_size)]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-perplexity", type=Path, metavar="BIN",
                   help="llama.cpp's llama-perplexity (default: built by tools/build_llama_cpp.py)")
    p.add_argument("--llama-cpp-source", type=Path, metavar="DIR", help="passed to tools/build_llama_cpp.py")
    p.add_argument("--default-model", type=Path, nargs="?", const=REPO / "weights" / "default", metavar="GGUF",
                   help="also run the round trip on the default model's GGUF (default: weights/default's)")
    args = p.parse_args(argv)
    perplexity = args.llama_perplexity or build_llama_cpp.build("llama-perplexity", args.llama_cpp_source)
    OUT.mkdir(parents=True, exist_ok=True)
    write_models()
    a, b = OUT / "model_a.gguf", OUT / "model_b.gguf"
    with tempfile.TemporaryDirectory() as tmp:
        record = {
            "llama_cpp": f"llama-perplexity built from llama-cpp-python {version('llama-cpp-python')}'s "
                         "vendor/llama.cpp by tools/build_llama_cpp.py",
            "llama3_np": __version__,
            "text": TEXT.name, "ctx": CTX, "chunks": CHUNKS,
            "llama_perplexity_args": LLAMA_CPP_ARGS,
            "tiny": round_trip(perplexity, a, b, a, b, Path(tmp), OUT / "base_llamacpp.kld", LLAMA_CPP_ARGS),
        }
        if args.default_model is not None:
            gguf_file = args.default_model if args.default_model.suffix == ".gguf" else \
                next(args.default_model.glob("*.gguf"))
            # llama.cpp's defaults (float16 KV cache, flash attention as it chooses): what a user runs
            default_args = ["-c", str(CTX), "-b", str(CTX), "-t", "2", "--seed", "0"]
            record["default_model"] = dict(
                model=gguf_file.name,
                note="base: model a; read with model b; both the default model's Q4_1 GGUF: llama.cpp "
                     "with its own arithmetic, llama3_np with the file's exact values in float32",
                llama_perplexity_args=default_args,
                **round_trip(perplexity, gguf_file, gguf_file, gguf_file, gguf_file, Path(tmp),
                             Path(tmp) / "base_llamacpp_default.kld", default_args))
    (OUT / "llama_perplexity.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    total = sum(f.stat().st_size for f in OUT.iterdir() if f.is_file())
    print(f"wrote {OUT.relative_to(REPO)}: {total / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("make_kld_fixtures", main, OSError, RuntimeError, subprocess.CalledProcessError))
