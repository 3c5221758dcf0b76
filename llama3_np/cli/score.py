"""`llama3-np score`: teacher-forced log-probabilities of a given text (see `llama3_np.xcheck.score`).

One input (-p/-f/--tokens, with an optional --continuation) prints a table, or with --json one
object whose `logprobs` is OpenAI's completions `logprobs` object (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`, as an echoed prompt returns them: the first token's logprob is
null). Many inputs, one JSON object a line (--jsonl), give one JSON line each: the answer to an
evaluation harness's loglikelihood request (`loglikelihood`, `is_greedy`) with the details.
"""

from __future__ import annotations

import json
import sys

from ..errors import Llama3Error
from ..files import AtomicFile, WriteError
from ..xcheck.score import (DEFAULT_TOP_N, encode_pair, encode_request, read_requests, request_result, score,
                            score_batch, scores_json, scores_table, token_names)
from .common import (add_batch_invariant_arg, add_chain_args, add_model_args, add_prompt_args, count_of, load,
                     parse_token_ids, read_prompt, read_text_file, sampling_params)


def add_command(sub) -> None:
    p = sub.add_parser("score", help="log-probability of a given text, raw and under a sampler chain",
                       description="Teacher-forced scoring: for every token of the text (or of the continuation) "
                                   "its log-probability, rank and the most probable alternatives, and whether the "
                                   "sampler chain of the sampling flags keeps it, the size of the kept set and "
                                   "its log-probability renormalised over that set; totals: sum, mean, "
                                   "perplexity, greedy agreement.")
    add_model_args(p)
    src = add_prompt_args(p, "the text (or the context of --continuation)")
    src.add_argument("--jsonl", metavar="FILE",
                     help="many inputs, one JSON object a line (- for standard input): {\"context\": TEXT, "
                          "\"continuation\": TEXT} (encoded as lm-evaluation-harness encodes a loglikelihood "
                          "request), {\"context_ids\": [...], \"continuation_ids\": [...]}, {\"text\": TEXT} or "
                          "{\"ids\": [...]}; an \"id\" key is copied to the output. One JSON line out per line in")
    cont = p.add_mutually_exclusive_group()
    cont.add_argument("--continuation", metavar="TEXT", help="score only this text, after the prompt")
    cont.add_argument("--continuation-tokens", metavar="IDS", help="score only these comma-separated ids")
    p.add_argument("--top-n", type=int, default=DEFAULT_TOP_N, metavar="N",
                   help=f"alternatives listed per token (default {DEFAULT_TOP_N}; 0: none)")
    add_chain_args(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (OpenAI completions' logprobs shape, and llama3_np's details)")
    p.add_argument("-o", "--output", metavar="FILE", help="with --jsonl: write the JSON lines to FILE, not stdout")
    p.add_argument("-np", "--parallel", type=count_of("inputs"), default=1, metavar="N",
                   help="with --jsonl: score N lines in each forward pass, each weight read once for all "
                        "(llama.cpp's --parallel; default 1); results in the file's order")
    add_batch_invariant_arg(p)
    p.set_defaults(func=run)


def parse_single_input(args, tokenizer, vocab_size: int) -> tuple[list[int], list[int]]:
    """The context and continuation ids of -p/-f/--tokens and --continuation(-tokens)."""
    if args.tokens is not None:
        context = parse_token_ids(args.tokens, vocab_size)
        text = None
    else:
        text = read_prompt(args)
        if text is None:
            raise Llama3Error("give the input: -p TEXT, -f FILE, --tokens 1,2,3 or --jsonl FILE")
        if text == "" and args.continuation is None:
            raise Llama3Error("the text is empty: give some text to score")
        context = None
    if args.continuation_tokens is not None:
        continuation = parse_token_ids(args.continuation_tokens, vocab_size)
        if not continuation:
            raise Llama3Error("--continuation-tokens is empty: give some ids to score")
    elif args.continuation is not None:
        if text is None:  # ids, then text: the text is encoded alone, without BOS
            continuation = tokenizer.encode(args.continuation, bos=False)
        else:
            return encode_pair(tokenizer, text, args.continuation)
    else:
        continuation = []
    if context is None:
        context = tokenizer.encode(text)
    if not context:
        raise Llama3Error("the text is empty: give some text or token ids")
    if not continuation and len(context) < 2:
        raise Llama3Error("one token alone has nothing to score: give a longer text or a continuation")
    return context, continuation


def parse_output(path: str) -> AtomicFile:
    """-o: a file that appears whole or not at all (`files.AtomicFile`)."""
    try:
        return AtomicFile(path, "w")
    except WriteError as e:
        raise Llama3Error(f"-o: {e}") from None


def run(args) -> int:
    if args.top_n < 0:
        raise Llama3Error(f"--top-n must be >= 0, got {args.top_n}")
    if args.output is not None and args.jsonl is None:
        raise Llama3Error("-o goes with --jsonl (a single input prints to stdout)")
    if args.parallel != 1 and args.jsonl is None:
        raise Llama3Error("-np goes with --jsonl (a single input is one sequence)")
    if args.jsonl is not None and (args.continuation is not None or args.continuation_tokens is not None):
        raise Llama3Error("--continuation goes with -p/-f/--tokens; --jsonl lines carry their own")
    params = sampling_params(args)
    if args.prompt == "" and args.continuation is None:
        raise Llama3Error("the text is empty: give some text to score")
    if args.continuation == "":
        raise Llama3Error("--continuation is empty: give some text to score")
    lines = read_requests(read_text_file(args.jsonl, "--jsonl file", "--jsonl"), args.jsonl) if args.jsonl is not None else None
    text_input = args.prompt is not None or args.file is not None or args.continuation is not None
    loaded = load(args, need_tokenizer=text_input or any("ids" not in o and "context_ids" not in o
                                                         for _, o in lines or []))
    tok, config = loaded.tokenizer, loaded.config
    weights = loaded.weights
    if lines is not None:
        inputs = [(obj, *encode_request(where, obj, tok, config.vocab_size)) for where, obj in lines]
        out = parse_output(args.output) if args.output is not None else sys.stdout
        try:
            pairs = [(context, continuation) for _, context, continuation in inputs]
            scored = score_batch(weights, config, pairs, args.top_n, params, args.repeat_last_n, args.parallel)
            for (obj, _, _), s in zip(inputs, scored):
                out.write(json.dumps(request_result(obj, s)) + "\n")
        except BaseException:
            if out is not sys.stdout:
                out.discard()
            raise
        if out is not sys.stdout:
            out.commit()
        return 0
    context, continuation = parse_single_input(args, tok, config.vocab_size)
    s = score(weights, config, context, continuation, args.top_n, params, args.repeat_last_n)
    names = token_names(tok, s)
    if args.json:
        print(json.dumps(dict(scores_json(s, names), model=str(loaded.checkpoint.path))))
    else:
        print(scores_table(s, names))
    return 0
