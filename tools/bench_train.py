"""Training throughput of llama3_np beside PyTorch on the same machine, in one run:

    python tools/bench_train.py [--steps 6] [--seq-len 128] [--batch-size 4] [-t THREADS]

Two runs, each alternated between the two implementations so that a busy machine slows both alike:
a full fine-tune of the default model (SmolLM2-135M, its weights in float32) and training the
`15M` preset from scratch (llama2.c's stories15M shape with the default model's 49,152-token
vocabulary). Both sides take the same sequences (random ids, fixed seed) and the same AdamW
settings; PyTorch runs transformers' `LlamaForCausalLM` (eager attention, float32) with
`torch.set_num_threads(THREADS)`, llama3_np its `Trainer` with `-t THREADS`. Each implementation
runs in its own process (peak RSS is the process's); tokens per second is the median over the steps
after the first. Needs the tools extra (`make tools`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LLAMA3_NP_CACHE", str(ROOT / "weights"))

RUNS = {"default model, full fine-tune": None, "15M preset, from scratch": "15M"}


def sequences(vocab_size: int, n: int, seq_len: int):
    import numpy as np
    return np.random.default_rng(0).integers(0, vocab_size, (n, seq_len + 1))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_llama3_np(preset, steps: int, seq_len: int, batch: int, threads: int) -> dict:
    from llama3_np import assets, products
    from llama3_np.train import scratch_config
    from llama3_np.formats.checkpoint import load_checkpoint
    from llama3_np.train import Trainer, TrainingArguments, init_weights

    products.set_threads(threads)
    ckpt = load_checkpoint(assets.model_dir(None), dtype="float32")
    config = ckpt.config if preset is None else scratch_config(preset, ckpt.config.vocab_size)
    weights = ckpt.weights if preset is None else init_weights(config, 0)
    args = TrainingArguments(max_steps=steps, seq_len=seq_len, batch_size=batch, warmup_steps=1)
    trainer = Trainer(weights, config, sequences(config.vocab_size, batch * steps, seq_len), None, args)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    return {"times": times, "peak_rss_mb": peak_rss_mb()}


def run_torch(preset, steps: int, seq_len: int, batch: int, threads: int) -> dict:
    import torch
    import transformers
    from llama3_np import assets
    from llama3_np.train import scratch_config
    from llama3_np.formats.checkpoint import hf_config_dict

    torch.set_num_threads(threads)
    folder = assets.model_dir(None)
    if preset is None:
        model = transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                              attn_implementation="eager")
    else:
        config = scratch_config(preset, json.loads((folder / "config.json").read_text())["vocab_size"])
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_dict(config))).float()
        model.config._attn_implementation = "eager"
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.from_numpy(sequences(model.config.vocab_size, batch * steps, seq_len))
    times = []
    for step in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        for seq in data[step * batch:(step + 1) * batch]:  # one sequence at a time, as llama3_np
            logits = model(input_ids=seq[None, :-1], use_cache=False).logits[0]
            (torch.nn.functional.cross_entropy(logits, seq[1:]) / batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {"times": times, "peak_rss_mb": peak_rss_mb()}


def child(args) -> None:
    body = run_llama3_np if args.child == "llama3_np" else run_torch
    print(json.dumps(body(RUNS[args.run], args.steps, args.seq_len, args.batch_size, args.threads)))


def measure(impl: str, run: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--run", run, "--steps", str(args.steps),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "-t", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{impl} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    p.add_argument("--child", choices=["llama3_np", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--run", choices=list(RUNS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    import torch
    print(f"{os.cpu_count()} cores, {args.threads} threads; load average {os.getloadavg()[0]:.1f}; torch "
          f"{torch.__version__}; {args.batch_size} sequences of {args.seq_len} tokens per step, {args.steps} steps "
          "(the first not counted)")
    tokens = args.batch_size * args.seq_len
    for run in RUNS:
        results = {impl: measure(impl, run, args) for impl in ("llama3_np", "torch")}
        speed = {impl: tokens / statistics.median(r["times"][1:]) for impl, r in results.items()}
        print(f"{run}: llama3_np {speed['llama3_np']:.0f} tok/s ({results['llama3_np']['peak_rss_mb']:.0f} MB), "
              f"PyTorch {speed['torch']:.0f} tok/s ({results['torch']['peak_rss_mb']:.0f} MB): "
              f"{speed['llama3_np'] / speed['torch']:.2f}x")


if __name__ == "__main__":
    main()
