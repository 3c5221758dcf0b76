"""`llama3-np perplexity -f FILE`: perplexity of a text by llama.cpp's method (see
`llama3_np.xcheck.perplexity`), with KL divergence against logits saved by an earlier run: llama3_np's
own float32 logits (--save-logits, --kl-base) or llama.cpp's base files (--kl-divergence-base,
--kl-divergence; `llama3_np.xcheck.kl_divergence`), read and written as llama-perplexity does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import Llama3Error
from ..files import WriteError, check_can_write
from ..xcheck.perplexity import (DEFAULT_CTX, BaseLogits, LogitsWriter, Result, first_scored, logits_metadata, report,
                                 run_perplexity, windows, windows_per_pass)
from ..xcheck.kl_divergence import LINE_HEADER, KLDBaseFile, KLDBaseWriter, KLDivergence, report as kld_report
from .common import ProgressLine, add_batch_invariant_arg, add_model_args, load, plural, read_prompt


def add_command(sub) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a text, by llama.cpp's method; KL against saved logits",
                       description="Perplexity by llama.cpp's method: windows of --ctx-size tokens, each scored "
                                   "on its second half; final PPL with its standard error.")
    add_model_args(p)
    p.add_argument("-f", "--file", help="UTF-8 text file to score (- for standard input); with --kl-divergence, "
                                        "optional: the base file holds the tokens")
    p.add_argument("-c", "--ctx-size", "--ctx", dest="ctx", type=int, metavar="N",
                   help=f"window size; 0 = the model's context (default {DEFAULT_CTX}; with --kl-divergence, "
                        "the base file's)")
    p.add_argument("-b", "--batch-size", "--batch", dest="batch", type=int, metavar="N",
                   help="tokens per forward call (default: the window size); a multiple of the window size runs "
                        "that many windows in one pass, each weight read once for all (llama.cpp's n_seq)")
    p.add_argument("--chunks", type=int, metavar="N", help="score at most N windows")
    add_batch_invariant_arg(p)
    p.add_argument("--save-logits", metavar="FILE",
                   help="write the scored logits (float32 safetensors, [scored tokens, vocabulary]) for --kl-base")
    p.add_argument("--kl-base", metavar="FILE",
                   help="logits saved by --save-logits (from this or another implementation): "
                        "report KL divergence and top-1 agreement against them")
    p.add_argument("--kl-divergence-base", "--save-all-logits", dest="kld_base", metavar="FILE",
                   help="llama.cpp's KL-divergence base file (log-probabilities in 16 bits, as llama-perplexity "
                        "writes them): written by this run, or read with --kl-divergence")
    p.add_argument("--kl-divergence", action="store_true",
                   help="score the windows of the --kl-divergence-base file and print llama-perplexity's "
                        "KL-divergence statistics against it")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of the report")
    p.set_defaults(func=run, prompt=None)


def run(args) -> int:
    if args.ctx is not None and args.ctx < 4 and args.ctx != 0:
        raise Llama3Error(f"--ctx-size must be at least 4, or 0 for the model's context, got {args.ctx}")
    if args.batch is not None and args.batch < 1:
        raise Llama3Error(f"--batch-size must be >= 1, got {args.batch}")
    kld_file = None
    if args.kl_divergence:
        if args.kld_base is None:
            raise Llama3Error("--kl-divergence compares with a base file: give it with --kl-divergence-base FILE")
        kld_file = KLDBaseFile(args.kld_base)  # llama-perplexity takes the window size from the file
        if args.ctx not in (None, kld_file.n_ctx):
            raise Llama3Error(f"--ctx-size {args.ctx}: {args.kld_base} holds windows of {kld_file.n_ctx} tokens; "
                              "leave -c out")
        if args.chunks is not None:
            raise Llama3Error(f"--chunks: --kl-divergence scores all {kld_file.n_chunk} windows of {args.kld_base}")
        args.ctx = kld_file.n_ctx
    elif args.file is None:
        raise Llama3Error("give the text to score with -f FILE (or read the tokens of a base file with "
                          "--kl-divergence-base FILE --kl-divergence)")
    text = read_prompt(args) if args.file is not None else None
    if text is not None and not text.strip():
        raise Llama3Error(f"{args.file} holds no text to score")
    written = {"--save-logits": args.save_logits, "--kl-divergence-base": None if args.kl_divergence else args.kld_base}
    read = [name for name in (args.kl_base, args.kld_base if args.kl_divergence else None) if name]
    if any(Path(o).resolve() == Path(i).resolve() for o in written.values() if o for i in read):
        raise Llama3Error("the file written and the base read are the same file: write to another one")
    for flag, name in written.items():
        if name is not None:
            try:
                check_can_write(name)  # before the model loads
            except WriteError as e:
                raise Llama3Error(f"{flag}: {e}") from None
    loaded = load(args, need_tokenizer=True)
    args.ctx = loaded.ctx(DEFAULT_CTX if args.ctx is None else args.ctx)  # -c 0: the model's context, as in llama.cpp
    config = loaded.config
    tok = loaded.tokenizer
    bos = tok.bos_id if tok.add_bos else None
    if kld_file is not None:
        kld_file.check_vocabulary(config.vocab_size)
        if text is not None:
            kld_file.check_tokens(tok.encode(text))
        ids = kld_file.tokens.tolist()
    else:
        ids = tok.encode(text)
    wins = windows(ids, args.ctx, bos, args.chunks)
    per_pass = windows_per_pass(args.ctx, args.batch or args.ctx)
    window_tokens = ids[:len(wins) * args.ctx]
    base = BaseLogits(args.kl_base, window_tokens, args.ctx, config.vocab_size) if args.kl_base else None
    kld = KLDivergence(kld_file) if kld_file is not None else None
    per_window = args.ctx - 1 - first_scored(args.ctx)
    saves = []
    try:
        if args.save_logits:
            saves.append(LogitsWriter(args.save_logits, len(wins) * per_window, config.vocab_size,
                                      logits_metadata(window_tokens, args.ctx)))
        if args.kld_base and not args.kl_divergence:
            saves.append(KLDBaseWriter(args.kld_base, args.ctx, config.vocab_size, window_tokens))
    except BaseException:
        for save in saves:
            save.abort()
        raise
    if not args.json:
        source = f"the tokens of {args.kld_base}" if text is None else plural(len(ids), "token")
        print(f"{loaded.checkpoint.path}: {source}; {plural(len(wins), 'window')} of "
              f"{args.ctx}, each scored "
              f"on its last {per_window} tokens; BOS first: {'yes' if bos is not None else 'no'}"
              + (f"; {per_pass} windows a pass" if per_pass > 1 else ""), flush=True)
        if kld is not None:
            print(LINE_HEADER, flush=True)

    progress = ProgressLine("perplexity")

    def bar(window: int, done: int, ctx: int) -> None:  # tokens of `window` run so far: `done`
        progress.update(window * ctx + done, len(wins) * ctx)

    def on_window(r: Result):
        progress.clear()
        if not args.json:
            print(kld.chunk_line(len(r.nll)) if kld is not None else f"[{len(r.nll)}] {r.ppl.value:.4f}", flush=True)

    try:
        result = run_perplexity(loaded.checkpoint.weights, config, ids, args.ctx, args.batch, bos, args.chunks,
                                saves, base, bar, on_window, loaded.compute, kld)
    except BaseException:
        progress.clear()
        for save in saves:
            save.abort()
        raise
    for save in saves:
        save.close()
    if args.json:
        out = dict(result.to_json(), tokens=len(ids), model=str(loaded.checkpoint.path), text=args.file)
        if kld is not None:
            out["kl_divergence"] = dict(kld.statistics(), base=str(args.kld_base))
        print(json.dumps(out))
        return 0
    if kld is not None:
        print()
        print(kld_report(kld.statistics()))
        if base is not None:
            print(report(result))
        return 0
    print(report(result))
    return 0


