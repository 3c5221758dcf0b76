#!/usr/bin/env python3
"""Batch throughput: N sequences decoded together by llama3_np and by llama.cpp, paired, in one run.

    python tools/bench_batch.py [-m DIR] [-np 1,4,8] [--prompt N] [--new N] [--ppl-ctx N]
                                [--ppl-windows W] [--ppl-per-pass 1,4] [--rounds R] [-t N]
                                [--gguf-dir DIR] [--json FILE]

The job, for each N of -np: N distinct synthetic prompts of --prompt tokens, prefilled together,
then --new greedy tokens each (stop tokens ignored), every decode step one pass for all N
sequences. The figures are llama-batched-bench's: prefill tok/s = N·prompt / prefill seconds,
decode tok/s = N·(new − 1) / decode seconds (the first token comes from the prefill), over all
sequences. And for each K of --ppl-per-pass, perplexity's throughput: W windows of --ppl-ctx
tokens (synthetic, no BOS), K windows a forward pass; tok/s = W·ctx / seconds.

Engines, each in a worker process of its own that loads the model once:
    llama3_np   `generation.generate_batch` with parallel N (the path of `generate -f FILE -np N`:
                sessions, the sampler, continuous batching), float32 residency, -t threads
    llama.cpp   llama-cpp-python's low-level API on an F32 GGUF of the same weights: a context of
                n_seq_max sequences, the prompts' tokens in llama_decode calls of at most n_batch
                (512) tokens, each tagged with its sequence, then one llama_decode of N tokens per
                step (what llama-batched-bench does), -t threads; perplexity: K windows a
                llama_decode (llama-perplexity's n_seq), logits of each window's scored half only
                (as llama-perplexity asks), timed without the scoring
    (llama3_np's perplexity: `xcheck.perplexity.run_perplexity` with batch K·ctx, the path of
    `perplexity -b`, timed with its scoring)
The driver hands the same job to both in turn, round after round (llama3_np N, llama.cpp N, for
every N, R rounds), so that a drift of a shared machine's speed falls on both sides of a pair; it
prints medians over the rounds, llama3_np / llama.cpp as the median of each round's ratio, each
engine's decode as a multiple of its own at the smallest N, and the share of the read bandwidth
that the decode steps reach (every float32 weight matrix read once per step for all N sequences:
weight bytes × steps/s / read bandwidth; `xcheck.bench.measure_read_bandwidth`, measured in the
llama3_np worker before its jobs, on its threads). The load average is printed at each round's
start. Greedy ids: every sequence's ids of llama3_np beside llama.cpp's (common prefix), and
llama3_np's first sequence at every N beside itself at the smallest N.

A benchmark, not a test: nothing here is asserted. Needs llama-cpp-python and gguf (`make tools`);
without llama-cpp-python only llama3_np runs. The GGUF is written by this tool, in a process of
its own, from the float32 values llama3_np computes with (a Q4_1 default model's dequantized
values, exactly), to a temporary folder, or to --gguf-dir DIR and reused from there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tool_support import paired_ratio, run_tool  # first: it makes this checkout's llama3_np importable

from bench_compare import available, common_prefix, llama_decode, write_gguf

from llama3_np.cli.common import model_dir
from llama3_np.errors import Llama3Error
from llama3_np.products import default_threads
from llama3_np.xcheck.bench import synthetic_prompt, weight_bytes

ENGINES = ("llama3_np", "llama.cpp")
GGUF_NAME = "batch-f32.gguf"
N_BATCH = 512  # llama.cpp's tokens per llama_decode (its default n_batch and n_ubatch)


def prompts_for(n: int, prompt: int, vocab_size: int) -> list[list[int]]:
    """n distinct prompts of `prompt` tokens: consecutive slices of one synthetic prompt."""
    ids = synthetic_prompt(n * prompt, vocab_size)
    return [ids[b * prompt:(b + 1) * prompt] for b in range(n)]


# ---------------------------------------------------------------------------------------------
# The engines: each returns a `job(prompts, new) -> (prefill s, decode s, ids per sequence)`


def llama3_np_engine(path: Path, threads: int, ctx: int):
    import numpy as np

    from llama3_np import load_model
    from llama3_np.generation import generate_batch
    from llama3_np.products import set_threads
    from llama3_np.xcheck.perplexity import run_perplexity

    set_threads(threads)
    loaded = load_model(path, dtype="float32", need_tokenizer=False)
    sizes = {"vocab_size": loaded.config.vocab_size, "weight_bytes": weight_bytes(loaded.config, 4)}

    def job(prompts, new):
        first_step = []  # when the first token is drawn: the prefill pass is done

        def generations():
            for p in prompts:
                yield loaded.session(ctx).generate(p, None, np.random.default_rng(0), new, stop_ids=())

        def on_step(i, step):
            if not first_step:
                first_step.append(time.perf_counter())
            return False

        t0 = time.perf_counter()
        done = list(generate_batch(generations(), len(prompts), on_step))
        t2 = time.perf_counter()
        return first_step[0] - t0, t2 - first_step[0], [g.ids for g in done]

    def perplexity(wins, per_pass):
        t0 = time.perf_counter()
        result = run_perplexity(loaded.weights, loaded.config, [t for w in wins for t in w], len(wins[0]),
                                per_pass * len(wins[0]))
        return time.perf_counter() - t0, result.ppl.value

    return job, perplexity, sizes


def llama_cpp_engine(gguf: Path, threads: int, ctx: int, sequences: int):
    import llama_cpp as lc
    import numpy as np
    from llama_cpp._logger import set_verbose

    from llama3_np.xcheck.perplexity import first_scored, perplexity_estimate, token_nll

    set_verbose(False)  # llama.cpp's log: errors only, as Llama(verbose=False) has it
    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(str(gguf).encode(), lc.llama_model_default_params())
    if not model:
        raise Llama3Error(f"llama.cpp could not load {gguf}")
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    contexts = {}

    def context(n_seq: int, seq_tokens: int, n_batch: int):
        """A context of n_seq sequences of seq_tokens each, llama_decode calls of n_batch tokens."""
        key = (n_seq, seq_tokens, n_batch)
        if key not in contexts:
            params = lc.llama_context_default_params()
            params.n_ctx = n_seq * 256 * -(-seq_tokens // 256)  # each sequence's share a multiple of 256, as llama.cpp wants
            params.n_batch, params.n_ubatch = n_batch, min(n_batch, N_BATCH)
            params.n_seq_max = n_seq
            params.n_threads = params.n_threads_batch = threads
            contexts[key] = lc.llama_init_from_model(model, params), lc.llama_batch_init(n_batch, 0, 1)
        c, batch = contexts[key]
        lc.llama_memory_clear(lc.llama_get_memory(c), True)
        return c, batch

    def decode(c, batch, items) -> list[np.ndarray]:
        return llama_decode(lc, c, batch, items, n_vocab)

    def job(prompts, new):
        c, batch = context(sequences, ctx, N_BATCH)
        t0 = time.perf_counter()
        items = [(t, pos, b, pos == len(p) - 1) for b, p in enumerate(prompts) for pos, t in enumerate(p)]
        tokens = []
        for start in range(0, len(items), N_BATCH):
            tokens += [int(np.argmax(x)) for x in decode(c, batch, items[start:start + N_BATCH])]
        t1 = time.perf_counter()
        out = [[t] for t in tokens]
        for k in range(new - 1):
            tokens = [int(np.argmax(x)) for x in
                      decode(c, batch, [(t, len(prompts[b]) + k, b, True) for b, t in enumerate(tokens)])]
            for b, t in enumerate(tokens):
                out[b].append(t)
        return t1 - t0, time.perf_counter() - t1, out

    def perplexity(wins, per_pass):
        """llama-perplexity's loop: per_pass windows a llama_decode (its n_seq), logits of the
        scored half only; timed without the scoring, which is done after, to check the work."""
        n, first = len(wins[0]), first_scored(len(wins[0]))
        seconds, nll = 0.0, []
        for start in range(0, len(wins), per_pass):
            group = wins[start:start + per_pass]
            c, batch = context(per_pass, n, per_pass * n)
            t0 = time.perf_counter()
            logits = decode(c, batch, [(t, pos, s, first <= pos < n - 1) for s, w in enumerate(group)
                                       for pos, t in enumerate(w)])
            logits = np.array(logits, dtype=np.float32)  # copies: the next decode overwrites them
            seconds += time.perf_counter() - t0
            rows = n - 1 - first
            for s, w in enumerate(group):
                nll.append(token_nll(logits[s * rows:(s + 1) * rows], np.asarray(w[first + 1:])))
        return seconds, perplexity_estimate(np.concatenate(nll)).value

    return job, perplexity, {"vocab_size": n_vocab}


def worker(args) -> int:
    """A worker: load, say so on stdout, then run each job read on stdin (a JSON line, `Job`) and
    print its figures as a JSON line."""
    ctx, largest = args.prompt + args.new, max(args.parallel)
    t0 = time.perf_counter()
    if args.worker == "llama3_np":
        job, perplexity, sizes = llama3_np_engine(model_dir(args.model), args.threads, ctx)
    else:
        job, perplexity, sizes = llama_cpp_engine(Path(args.gguf_dir) / GGUF_NAME, args.threads, ctx, largest)
    ready = dict(sizes, load_s=time.perf_counter() - t0)
    vocab_size = sizes["vocab_size"]
    job(prompts_for(largest, 8, vocab_size), 4)  # warm-up: pages faulted in, threads started
    wins = prompts_for(args.ppl_windows, args.ppl_ctx, vocab_size) if args.ppl_windows else []
    for per_pass in args.ppl_per_pass if wins else ():
        perplexity(wins[:max(2, per_pass)], per_pass)  # warm-up, and llama.cpp's contexts made
    if args.worker == "llama3_np":
        from llama3_np.xcheck.bench import measure_read_bandwidth
        ready["bandwidth_gb_s"] = measure_read_bandwidth() / 1e9
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        kind, n = json.loads(line)
        if kind == "decode":
            prompts = prompts_for(n, args.prompt, vocab_size)
            prefill_s, decode_s, ids = job(prompts, args.new)
            answer = {"prefill_tokens_per_s": n * args.prompt / prefill_s,
                      "decode_tokens_per_s": n * (args.new - 1) / decode_s, "ids": ids}
        else:
            seconds, ppl = perplexity(wins, n)
            answer = {"tokens_per_s": len(wins) * args.ppl_ctx / seconds, "ppl": ppl}
        print(json.dumps(answer), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The driver


class Worker:
    """A worker process of one engine, started and loaded."""

    def __init__(self, engine: str, args, gguf_dir: Path):
        cmd = [sys.executable, __file__, "--worker", engine, "-m", str(args.model_path), "--prompt", str(args.prompt),
               "--new", str(args.new), "-np", ",".join(map(str, args.parallel)), "-t", str(args.threads),
               "--ppl-ctx", str(args.ppl_ctx), "--ppl-windows", str(args.ppl_windows),
               "--ppl-per-pass", ",".join(map(str, args.ppl_per_pass)), "--gguf-dir", str(gguf_dir)]
        self.engine = engine
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._answer()

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise Llama3Error(f"the {self.engine} worker ended (exit status {self.process.wait()}); see its messages above")
        return json.loads(line)

    def run(self, job: tuple[str, int]) -> dict:
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait()


def run_rounds(args, gguf_dir: Path) -> dict:
    """Every job of every engine, round after round: {"ready": engine -> its load figures, "runs":
    (engine, job) -> one answer a round, "load_averages": one a round}."""
    engines = [e for e in ENGINES if available(e)]
    if "llama.cpp" in engines and not (gguf_dir / GGUF_NAME).is_file():
        # In a process of its own: the checkpoint it reads is not kept in this one's memory.
        print(f"writing {GGUF_NAME} ...", file=sys.stderr)
        subprocess.run([sys.executable, __file__, "--write-gguf", str(gguf_dir / GGUF_NAME), "-m", str(args.model_path)],
                       check=True)
    jobs = [("decode", n) for n in args.parallel] + [("perplexity", k) for k in args.ppl_per_pass if args.ppl_windows]
    workers = []
    try:
        for engine in engines:
            print(f"starting {engine} ...", file=sys.stderr)
            workers.append(Worker(engine, args, gguf_dir))
        runs = {(w.engine, job): [] for w in workers for job in jobs}
        load_averages = []
        for r in range(args.rounds):
            load_averages.append(os.getloadavg()[0])
            print(f"round {r + 1} of {args.rounds} (load average {load_averages[-1]:.2f}) ...", file=sys.stderr)
            for job in jobs:
                for w in workers:
                    runs[w.engine, job].append(w.run(job))
                    figures = {k: round(v, 1) for k, v in runs[w.engine, job][-1].items() if isinstance(v, float)}
                    print(f"  {w.engine} {job[0]} {job[1]}: {figures}", file=sys.stderr)  # a run cut short shows these
        return {"ready": {w.engine: w.ready for w in workers}, "runs": runs, "load_averages": load_averages}
    finally:
        for w in workers:
            w.close()


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def table(results: dict, args) -> str:
    runs, ready = results["runs"], results["ready"]
    engines = list(ready)
    both = "llama.cpp" in engines
    smallest = ("decode", min(args.parallel))
    bandwidth = ready["llama3_np"]["bandwidth_gb_s"]
    matrices = ready["llama3_np"]["weight_bytes"]
    lines = [f"{args.model_path}: {args.threads} threads; medians of {args.rounds} rounds, paired (load average at the "
             "rounds' starts: " + ", ".join(f"{x:.2f}" for x in results["load_averages"]) + "); load s: "
             + ", ".join(f"{e} {ready[e]['load_s']:.2f}" for e in engines),
             f"read bandwidth {bandwidth:.1f} GB/s (in llama3_np's worker); float32 weights {matrices / 1e6:.0f} MB, "
             "read once per decode step for all sequences",
             "",
             f"decode: N sequences of {args.prompt} prompt tokens, {args.new} new tokens each, greedy; tok/s over all "
             "sequences",
             f"{'engine':10s} {'N':>3s} {'prefill tok/s':>14s} {'decode tok/s':>13s} "
             f"{'decode / N=' + str(smallest[1]):>13s} {'of read':>8s} {'llama3_np / llama.cpp, prefill':>31s} "
             f"{'decode':>7s}  same ids"]
    for n in args.parallel:
        for e in engines:
            r = runs[e, ("decode", n)]
            decode = median_of(r, "decode_tokens_per_s")
            of_read = matrices * decode / n / (bandwidth * 1e9)
            ratio, same = " " * 39, ""
            if e == "llama3_np" and both:
                other = runs["llama.cpp", ("decode", n)]
                ratio = f"{paired_ratio(r, other, 'prefill_tokens_per_s'):31.2f} {paired_ratio(r, other, 'decode_tokens_per_s'):7.2f}"
                same = f"{sum(common_prefix(a, b) for a, b in zip(r[-1]['ids'], other[-1]['ids']))}/" \
                       f"{sum(map(len, r[-1]['ids']))}"
            lines.append(f"{e:10s} {n:3d} {median_of(r, 'prefill_tokens_per_s'):14.1f} {decode:13.1f} "
                         f"{paired_ratio(r, runs[e, smallest], 'decode_tokens_per_s'):13.2f} {of_read:8.2f} {ratio}  {same}")
    alone = runs["llama3_np", smallest][-1]["ids"][0]
    lines.append(f"same ids: llama3_np's against llama.cpp's, all sequences; llama3_np's first sequence against itself "
                 f"at N={smallest[1]}: " + ", ".join(f"N={n} {common_prefix(runs['llama3_np', ('decode', n)][-1]['ids'][0], alone)}/"
                                                     f"{len(alone)}" for n in args.parallel))
    if args.ppl_windows:
        lines += ["", f"perplexity: {args.ppl_windows} windows of {args.ppl_ctx} tokens, K windows a forward pass "
                      f"(llama3_np: `perplexity -c {args.ppl_ctx} -b K·{args.ppl_ctx}`, with its scoring; llama.cpp: "
                      "llama-perplexity's n_seq = K, logits of the scored half, scoring not timed)",
                  f"{'engine':10s} {'K':>3s} {'tok/s':>9s} {'/ K=' + str(min(args.ppl_per_pass)):>8s} "
                  f"{'llama3_np / llama.cpp':>22s} {'/ llama.cpp K=1':>16s} {'PPL':>10s}"]
        base = min(args.ppl_per_pass)
        for k in args.ppl_per_pass:
            for e in engines:
                r = runs[e, ("perplexity", k)]
                ratio = " " * 39
                if e == "llama3_np" and both:
                    ratio = f"{paired_ratio(r, runs['llama.cpp', ('perplexity', k)], 'tokens_per_s'):22.2f} " \
                            f"{paired_ratio(r, runs['llama.cpp', ('perplexity', base)], 'tokens_per_s'):16.2f}"
                lines.append(f"{e:10s} {k:3d} {median_of(r, 'tokens_per_s'):9.1f} "
                             f"{paired_ratio(r, runs[e, ('perplexity', base)], 'tokens_per_s'):8.2f} {ratio} "
                             f"{r[-1]['ppl']:10.4f}")
    return "\n".join(lines)


def bench_batch(args) -> int:
    args.model_path = model_dir(args.model)
    if args.gguf_dir:
        Path(args.gguf_dir).mkdir(parents=True, exist_ok=True)
        results = run_rounds(args, Path(args.gguf_dir))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = run_rounds(args, Path(tmp))
    print(table(results, args))
    if args.json:
        flat = dict(results, runs={f"{e} {kind} {n}": r for (e, (kind, n)), r in results["runs"].items()})
        Path(args.json).write_text(json.dumps(flat, indent=1) + "\n")
    return 0


def parallel_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1 or values != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"takes increasing numbers of sequences >= 1, such as 1,4,8; got {text!r}")
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", metavar="PATH", help="checkpoint folder or GGUF file (default: the default model)")
    p.add_argument("-np", "--parallel", type=parallel_list, default=[1, 4, 8], metavar="LIST",
                   help="numbers of sequences decoded together (default 1,4,8)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens of each sequence (default 64)")
    p.add_argument("--new", type=int, default=32, help="tokens each sequence generates (default 32)")
    p.add_argument("--ppl-ctx", type=int, default=512, metavar="N", help="perplexity's window (default 512)")
    p.add_argument("--ppl-windows", type=int, default=8, metavar="W",
                   help="windows the perplexity jobs score (default 8; 0: no perplexity jobs)")
    p.add_argument("--ppl-per-pass", type=parallel_list, default=[1, 4], metavar="LIST",
                   help="windows a forward pass in the perplexity jobs (default 1,4)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of paired jobs (default 5)")
    p.add_argument("-t", "--threads", type=int, default=default_threads(),
                   help=f"threads of both engines (default: one per core, here {default_threads()})")
    p.add_argument("--gguf-dir", metavar="DIR", help=f"where llama.cpp's {GGUF_NAME} is reused from or written to "
                                                     "(default: a temporary folder, removed after the run)")
    p.add_argument("--json", metavar="FILE", help="also write every round's figures to FILE")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--write-gguf", metavar="PATH", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.prompt < 1 or args.new < 2 or args.rounds < 1 or args.ppl_windows < 0 or args.ppl_ctx < 4:
        p.error("--prompt takes >= 1, --new >= 2 (one token comes from the prefill), --rounds >= 1, "
                "--ppl-windows >= 0, --ppl-ctx >= 4")
    if args.write_gguf:
        from llama3_np.formats.checkpoint import load_checkpoint

        return run_tool("bench_batch", lambda: write_gguf(load_checkpoint(model_dir(args.model), dtype="float32"),
                                                          Path(args.write_gguf), "F32"))
    if args.worker:
        return run_tool("bench_batch", lambda: worker(args))
    return run_tool("bench_batch", lambda: bench_batch(args))


if __name__ == "__main__":
    sys.exit(main())
