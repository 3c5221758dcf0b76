"""`llama3-np score`: teacher-forced log-probabilities of a given text (see `llama3_np.xcheck.score`).

One input (-p/-f/--tokens, with an optional --continuation) prints a table, or with --json one
object whose `logprobs` is OpenAI's completions `logprobs` object (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`, as an echoed prompt returns them: the first token's logprob is
null). Many inputs, one JSON object a line (--jsonl), give one JSON line each: the answer to an
evaluation harness's loglikelihood request (`loglikelihood`, `is_greedy`) with the details.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from typing import Optional

from ..errors import Llama3Error
from ..files import AtomicFile, WriteError
from ..sampling import SamplingParams
from ..text.pieces import pieces, quoted
from ..xcheck.score import DEFAULT_TOP_N, Scores, encode_pair, score, score_batch
from .common import (add_batch_invariant_arg, add_chain_args, add_model_args, count_of, load, parse_token_ids,
                     read_prompt, read_text_file, sampling_params)


def add_command(sub) -> None:
    p = sub.add_parser("score", help="log-probability of a given text, raw and under a sampler chain",
                       description="Teacher-forced scoring: for every token of the text (or of the continuation) "
                                   "its log-probability, rank and the most probable alternatives, and whether the "
                                   "sampler chain of the sampling flags keeps it, the size of the kept set and "
                                   "its log-probability renormalised over that set; totals: sum, mean, "
                                   "perplexity, greedy agreement.")
    add_model_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help="the text (or the context of --continuation)")
    src.add_argument("-f", "--file", help="read the text from a UTF-8 file (- for standard input)")
    src.add_argument("--tokens", help="the text as comma-separated token ids")
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


# ---------------------------------------------------------------------------------------------
# Reading the inputs


TEXT_KEYS, ID_KEYS = ({"context", "continuation"}, {"text"}), ({"context_ids", "continuation_ids"}, {"ids"})


def read_jsonl(text: str, name: str) -> list[tuple[str, dict]]:
    """Every line of a --jsonl input as (where it is, its object), its shape checked; all lines
    are read before anything is computed, so that a bad line writes nothing."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{name} line {n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise Llama3Error(f"{where} is not JSON ({e.msg}): give one JSON object a line") from None
        if not isinstance(obj, dict):
            raise Llama3Error(f"{where} is not a JSON object: give one object a line")
        keys = set(obj) - {"id"}
        if keys in TEXT_KEYS:
            if not all(isinstance(obj[k], str) for k in keys):
                raise Llama3Error(f"{where}: {', '.join(sorted(keys))} must be strings")
            if obj.get("continuation", "x") == "" or obj.get("text", "x") == "":
                raise Llama3Error(f"{where}: the text to score is empty: give some text")
        elif keys in ID_KEYS:
            for k in keys:
                if not (isinstance(obj[k], list) and all(type(t) is int for t in obj[k])):
                    raise Llama3Error(f"{where}: {k} must be a list of integer token ids")
            if not obj.get("continuation_ids", [0]) or len(obj.get("ids", [0, 0])) < 2 or obj.get("context_ids") == []:
                raise Llama3Error(f"{where} has nothing to score: give a context and a continuation, or two ids "
                                  "or more")
        else:
            raise Llama3Error(f"{where} has the keys {sorted(obj)}: give context and continuation (text), "
                              "context_ids and continuation_ids, text, or ids (and optionally id)")
        out.append((where, obj))
    if not out:
        raise Llama3Error(f"{name} holds no input: give one JSON object a line")
    return out


def encode_line(where: str, obj: dict, tokenizer, vocab_size: int) -> tuple[list[int], list[int]]:
    """The context and continuation ids of one --jsonl line (text encoded as lm-eval does)."""
    if "text" in obj or "context" in obj:  # the model was loaded with its tokenizer
        context, continuation = ((tokenizer.encode(obj["text"]), []) if "text" in obj
                                 else encode_pair(tokenizer, obj["context"], obj["continuation"]))
    else:
        context, continuation = obj.get("ids", obj.get("context_ids")), obj.get("continuation_ids", [])
    for ids in (context, continuation):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise Llama3Error(f"{where}: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    if not continuation and len(context) < 2:
        raise Llama3Error(f"{where} has nothing to score: its text is a single token")
    return context, continuation


def single_input(args, tokenizer, vocab_size: int) -> tuple[list[int], list[int]]:
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


# ---------------------------------------------------------------------------------------------
# Output


def _finite(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None  # JSON has no -inf: a filtered-out token's processed logprob


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token as the text it stands for (its bytes, split UTF-8 as \\xNN), or its id."""
    if tokenizer is None:
        return [f"<{i}>" for i in ids]
    return [p.readable for p in pieces(tokenizer, ids)]


def chain_text(params: SamplingParams) -> str:
    """The chain's order and every parameter's value (a sampler left out of the order is not applied)."""
    values = ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v!r}"
                       for k, v in asdict(params).items() if k not in ("samplers", "dry_breaker_ids"))
    return f"{';'.join(params.samplers) or '(none: the softmax of the logits)'} ({values})"


def token_names(tokenizer, s: Scores) -> dict[int, str]:
    """The text of every token an output names: the input's and the alternatives'."""
    ids = sorted(set(s.ids) | {i for t in s.tokens for i, _ in t.top})
    return dict(zip(ids, token_texts(tokenizer, ids)))


def to_json(s: Scores, names: dict[int, str]) -> dict:
    """OpenAI completions' `logprobs` object for every token of the input (the first has null
    entries), and llama3_np's details: ids, ranks, the top alternatives by id, the sampler view,
    the totals over the scored tokens."""
    texts = [names[i] for i in s.ids]
    offsets, at = [], 0
    for t in texts:
        offsets.append(at)
        at += len(t)
    by_position = {t.position: t for t in s.tokens}
    rows = [by_position.get(i) for i in range(len(s.ids))]
    out = {
        "ids": s.ids, "first_scored": s.first_scored,
        "logprobs": {"tokens": texts, "token_logprobs": [t.logprob if t else None for t in rows],
                     "top_logprobs": [{names[i]: lp for i, lp in t.top} if t else None for t in rows],
                     "text_offset": offsets},
        "ranks": [t.rank if t else None for t in rows],
        "top_ids": [[[i, lp] for i, lp in t.top] if t else None for t in rows],
    }
    if s.params is not None:
        out["processed"] = {**asdict(s.params), "samplers": list(s.params.samplers),
                            "survives": [t.processed.survives if t else None for t in rows],
                            "kept": [t.processed.kept if t else None for t in rows],
                            "token_logprobs": [_finite(t.processed.logprob) if t else None for t in rows]}
    out["totals"] = s.totals()
    return out


def table(s: Scores, names: dict[int, str]) -> str:
    scored = s.scored
    piece_width = min(24, max(len("token"), *(len(quoted(names[t.id])) for t in scored)))
    head = f"{'pos':>5}  {'id':>7}  {'token':<{piece_width}}  {'logprob':>9}  {'rank':>6}"
    if s.params is not None:
        head += f"  {'kept':>4}  {'set':>6}  {'processed':>9}"
    lines = [head + "  most probable"]
    for t in scored:
        line = (f"{t.position:>5}  {t.id:>7}  {quoted(names[t.id]):<{piece_width}.{piece_width}}  "
                f"{t.logprob:9.4f}  {t.rank:>6}")
        if s.params is not None:
            p = t.processed
            line += f"  {'yes' if p.survives else 'no':>4}  {p.kept:>6}  {p.logprob:9.4f}"
        lines.append(line + "  " + "  ".join(f"{quoted(names[i])} {lp:.3f}" for i, lp in t.top))
    n = len(scored)
    lines.append(f"{n} tokens scored: sum {s.sum_logprob:.4f}, mean {s.mean_logprob:.4f}, "
                 f"perplexity {s.perplexity:.4f}, greedy agreement {sum(t.greedy for t in scored)}/{n} "
                 f"({100 * s.greedy_agreement:.1f}%)")
    if s.params is not None:
        kept = sum(t.processed.survives for t in scored)
        processed = [t.processed.logprob for t in scored]
        total = math.fsum(processed) if kept == n else -math.inf
        lines.append(f"sampler chain {chain_text(s.params)}: keeps {kept}/{n} tokens, processed sum {total:.4f}")
    return "\n".join(lines)


def jsonl_line(obj: dict, s: Scores) -> dict:
    scored = s.scored
    out = {"id": obj["id"]} if "id" in obj else {}
    out.update(loglikelihood=s.sum_logprob, is_greedy=s.is_greedy, **{k: v for k, v in s.totals().items()
                                                                          if k not in ("sum_logprob", "is_greedy")})
    out.update(context_tokens=s.first_scored, ids=[t.id for t in scored], token_logprobs=[t.logprob for t in scored],
               ranks=[t.rank for t in scored])
    if s.params is not None:
        out["processed"] = {"survives": [t.processed.survives for t in scored],
                            "kept": [t.processed.kept for t in scored],
                            "token_logprobs": [_finite(t.processed.logprob) for t in scored]}
    return out


# ---------------------------------------------------------------------------------------------


def output_file(path: str) -> AtomicFile:
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
    lines = read_jsonl(read_text_file(args.jsonl, "--jsonl file"), args.jsonl) if args.jsonl is not None else None
    text_input = args.prompt is not None or args.file is not None or args.continuation is not None
    loaded = load(args, need_tokenizer=text_input or any("ids" not in o and "context_ids" not in o
                                                         for _, o in lines or []))
    tok, config = loaded.tokenizer, loaded.config
    weights = loaded.weights
    if lines is not None:
        inputs = [(obj, *encode_line(where, obj, tok, config.vocab_size)) for where, obj in lines]
        out = output_file(args.output) if args.output is not None else sys.stdout
        try:
            pairs = [(context, continuation) for _, context, continuation in inputs]
            scored = score_batch(weights, config, pairs, args.top_n, params, args.repeat_last_n, args.parallel)
            for (obj, _, _), s in zip(inputs, scored):
                out.write(json.dumps(jsonl_line(obj, s)) + "\n")
        except BaseException:
            if out is not sys.stdout:
                out.discard()
            raise
        if out is not sys.stdout:
            out.commit()
        return 0
    context, continuation = single_input(args, tok, config.vocab_size)
    s = score(weights, config, context, continuation, args.top_n, params, args.repeat_last_n)
    names = token_names(tok, s)
    if args.json:
        print(json.dumps(dict(to_json(s, names), model=str(loaded.checkpoint.path))))
    else:
        print(table(s, names))
    return 0
