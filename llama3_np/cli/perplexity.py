"""`llama3-np perplexity -f FILE`: perplexity of a text by llama.cpp's method (see
`llama3_np.xcheck.perplexity`), with KL divergence against logits saved by an earlier run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import Llama3Error
from ..xcheck.perplexity import (DEFAULT_CTX, BaseLogits, LogitsWriter, Result, first_scored, logits_metadata, report,
                                 run_perplexity, windows)
from .common import ProgressLine, add_model_args, load, plural, read_prompt


def add_command(sub) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a text, by llama.cpp's method; KL against saved logits",
                       description="Perplexity by llama.cpp's method: windows of --ctx-size tokens, each scored "
                                   "on its second half; final PPL with its standard error.")
    add_model_args(p)
    p.add_argument("-f", "--file", required=True, help="UTF-8 text file to score (- for standard input)")
    p.add_argument("-c", "--ctx-size", "--ctx", dest="ctx", type=int, default=DEFAULT_CTX, metavar="N",
                   help="window size; 0 = the model's context (default %(default)s)")
    p.add_argument("-b", "--batch-size", "--batch", dest="batch", type=int, metavar="N",
                   help="tokens per forward call (default: the window size)")
    p.add_argument("--chunks", type=int, metavar="N", help="score at most N windows")
    p.add_argument("--save-logits", metavar="FILE",
                   help="write the scored logits (float32 safetensors, [scored tokens, vocabulary]) for --kl-base")
    p.add_argument("--kl-base", metavar="FILE",
                   help="logits saved by --save-logits (from this or another implementation): "
                        "report KL divergence and top-1 agreement against them")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of the report")
    p.set_defaults(func=run, prompt=None)


def run(args) -> int:
    if args.ctx is None or args.ctx < 4 and args.ctx != 0:
        raise Llama3Error(f"--ctx-size must be at least 4, or 0 for the model's context, got {args.ctx}")
    if args.batch is not None and args.batch < 1:
        raise Llama3Error(f"--batch-size must be >= 1, got {args.batch}")
    text = read_prompt(args)
    if not text or not text.strip():
        raise Llama3Error(f"{args.file} holds no text to score")
    if args.save_logits is not None:
        if not Path(args.save_logits).resolve().parent.is_dir():
            raise Llama3Error(f"--save-logits {args.save_logits}: folder {Path(args.save_logits).parent} "
                              "does not exist")
        if args.kl_base is not None and Path(args.save_logits).resolve() == Path(args.kl_base).resolve():
            raise Llama3Error("--save-logits and --kl-base name the same file: save to another one")
    loaded = load(args, need_tokenizer=True)
    args.ctx = loaded.ctx(args.ctx)  # -c 0: the model's context, as in llama.cpp
    config = loaded.config
    tok = loaded.tokenizer
    ids = tok.encode(text)
    bos = tok.bos_id if tok.add_bos else None
    wins = windows(ids, args.ctx, bos, args.chunks)
    window_tokens = ids[:len(wins) * args.ctx]
    base = BaseLogits(args.kl_base, window_tokens, args.ctx, config.vocab_size) if args.kl_base else None
    per_window = args.ctx - 1 - first_scored(args.ctx)
    save = (LogitsWriter(args.save_logits, len(wins) * per_window, config.vocab_size,
                         logits_metadata(window_tokens, args.ctx)) if args.save_logits else None)
    if not args.json:
        print(f"{loaded.checkpoint.path}: {plural(len(ids), 'token')}; {plural(len(wins), 'window')} of "
              f"{args.ctx}, each scored "
              f"on its last {per_window} tokens; BOS first: {'yes' if bos is not None else 'no'}", flush=True)

    progress = ProgressLine("perplexity")

    def bar(window: int, done: int, ctx: int) -> None:  # tokens of `window` run so far: `done`
        progress.update(window * ctx + done, len(wins) * ctx)

    def on_window(r: Result):
        progress.clear()
        if not args.json:
            print(f"[{len(r.nll)}] {r.ppl.value:.4f}", flush=True)

    try:
        result = run_perplexity(loaded.checkpoint.weights, config, ids, args.ctx, args.batch, bos, args.chunks,
                                save, base, bar, on_window, loaded.compute)
    except BaseException:
        progress.clear()
        if save is not None:
            save.abort()
        raise
    if save is not None:
        save.close()
    if args.json:
        print(json.dumps(dict(result.to_json(), tokens=len(ids), model=str(loaded.checkpoint.path),
                              text=args.file)))
        return 0
    print(report(result))
    return 0


