"""`llama3-np generate`: text from a checkpoint, streamed as it is produced.

Text goes to stdout, statistics (load time, prefill and decode speed, peak memory, the seed of a
sampled run, why it stopped) to stderr. `--verbose-prompt` first shows the prompt's tokens, `--echo`
prints the prompt before its continuation.
`--explain` prints, instead of the text, what each generated token was drawn from: the same
per-step records (`generation.Step`) the text is printed from.
`-np N` (llama.cpp's --parallel) reads many prompts from -f, one a line (or JSONL), and generates
them N at a time, one forward pass per step for all (`generation.generate_batch`); the results
come out in the order of the input.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

from ..errors import Llama3Error
from ..generation import Step, generate_batch, session_size
from ..products import get_threads
from ..text.chat import describe
from ..text.stop import StopText, check_stop_strings
from ..xcheck.bench import peak_rss_mb
from .common import (EXIT_OUTPUT_CLOSED, Printer, ProgressLine, add_batch_invariant_arg, add_chat_args, add_model_args,
                     add_sampling_args, chat_format, consume, count_of, for_model, load, parse_token_ids, plural,
                     read_prompt, read_text_file, sampling_params, seeded_generator, seeded_rng, stats_line,
                     verbose_prompt)


def add_command(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt (or answer it as a chat turn with --chat)",
                       description="Continue a prompt, streaming the text to stdout and statistics to stderr; "
                                   "with --chat, answer it as a user turn in the model's chat format.")
    add_model_args(g)
    src = g.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help="prompt text")
    src.add_argument("-f", "--file", help="read the prompt from a UTF-8 text file (- for standard input); with -np, "
                                          "many prompts: one a line, or one JSON object a line ({\"prompt\": ...}) "
                                          "in a .jsonl file")
    src.add_argument("--tokens", help="prompt as comma-separated token ids (no tokenizer needed)")
    add_sampling_args(g)
    # Not a shared sampling flag: a chat answer ends at its end-of-turn token, so `chat` has none.
    g.add_argument("-r", "--reverse-prompt", action="append", metavar="PROMPT",
                   help="end the text before this text, when generated (repeat the flag for several); the text "
                        "that could begin it is held back until it cannot")
    g.add_argument("--ignore-eos", action="store_true",
                   help="never draw an end-of-generation token (their logits become -inf, as in llama.cpp): "
                        "generate until -n or a full context; not with --chat")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the model's chat format")
    g.add_argument("-sys", "--system-prompt", "--system", dest="system", metavar="TEXT",
                   help="system message (with --chat)")
    add_chat_args(g)
    g.add_argument("-np", "--parallel", type=count_of("sequences"), metavar="N",
                   help="generate the prompts of -f N at a time, each step of all of them in one forward pass "
                        "(llama.cpp's --parallel; each prompt has a context of --ctx-size tokens of its own); "
                        "results in the order of the file")
    add_batch_invariant_arg(g)
    g.add_argument("--json", action="store_true",
                   help="print one JSON object instead of streaming text (with -np, one JSON line per prompt)")
    g.add_argument("--verbose-prompt", action="store_true",
                   help="first print the prompt's tokens to stderr: each id and the text it stands for")
    g.add_argument("--echo", action="store_true", help="print the prompt before its continuation")
    g.add_argument("--explain", nargs="?", const=5, type=int, metavar="K",
                   help="instead of the text, show for every generated token the K most probable candidates "
                        "(default 5) and the one chosen; with --json, one JSON line per token")
    g.set_defaults(func=run_generate)


def print_explanation(tokenizer, k: int, as_json: bool):
    """--explain: a step consumer printing `Step.candidates(k)`, as text or one JSON line per step."""
    def text(token: int) -> str:
        return tokenizer.decode([token]) if tokenizer is not None else f"<{token}>"

    n = 0

    def explain(step: Step) -> None:
        nonlocal n
        n += 1
        rows = step.candidates(k)
        chosen = next(c for c in rows if c.id == step.token)
        if as_json:
            sys.stdout.write(json.dumps({"step": n, "id": chosen.id, "token": text(chosen.id), "rank": chosen.rank,
                                         "p": chosen.p, "sampled_p": chosen.sampled_p,
                                         "top": [dict(asdict(c), token=text(c.id)) for c in rows]},
                                        ensure_ascii=False) + "\n")
            return
        lines = [f"#{n}  chose {json.dumps(text(chosen.id), ensure_ascii=False)} "
                 f"(id {chosen.id}, rank {chosen.rank}, p {chosen.p:.4f}, sampled p {chosen.sampled_p:.4f})"]
        for c in rows:
            mark = "  <- chosen" if c.id == chosen.id else ""
            lines.append(f"   {c.rank:>5}. {json.dumps(text(c.id), ensure_ascii=False):<16} id {c.id:>6}  "
                         f"logit {c.logit:8.3f}  p {c.p:.4f}  sampled p {c.sampled_p:.4f}{mark}")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()

    return explain


def parse_prompts(text: str, name: str) -> list[tuple[int, str]]:
    """The prompts of a -np file as (line number, prompt): one a line, or, for a .jsonl file, one
    JSON object a line with a "prompt" string. A final newline ends the last line; any other empty
    line is refused, named. A line may end in CR LF (as Windows editors write it): the CR is not
    part of the prompt."""
    jsonl = name.endswith(".jsonl")
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise Llama3Error(f"{name} holds no prompt: write one prompt a line")
    prompts = []
    for n, line in enumerate(lines, 1):
        if line.strip() == "":
            raise Llama3Error(f"{name} line {n} is empty: write one prompt a line, without empty lines")
        if jsonl:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise Llama3Error(f"{name} line {n} is not JSON ({e.msg}): write one object a line, "
                                  '{"prompt": "..."}') from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or obj["prompt"] == "":
                raise Llama3Error(f'{name} line {n} needs a non-empty "prompt" string: {{"prompt": "..."}}')
            line = obj["prompt"]
        prompts.append((n, line))
    return prompts


def run_many(args, params, seed: int) -> int:
    """-np: every prompt of -f, `args.parallel` at a time; results printed in the file's order."""
    for flag, given in (("--explain", args.explain is not None), ("--echo", args.echo), ("-p", args.prompt is not None),
                        ("--tokens", args.tokens is not None), ("--verbose-prompt", args.verbose_prompt)):
        if given:
            raise Llama3Error(f"{flag} does not go with -np: -np generates the prompts of a file, -f FILE")
    if args.file is None:
        raise Llama3Error("-np generates many prompts: give them in a file, -f FILE (one prompt a line)")
    prompts = parse_prompts(read_text_file(args.file), args.file)
    stops = check_stop_strings(args.reverse_prompt or ())
    loaded = load(args, need_tokenizer=True)
    fmt = chat_format(args, loaded) if args.chat else None
    ids = [loaded.encode_dialog(args.system, text, fmt) if args.chat else loaded.encode(text) for _, text in prompts]
    ctx = loaded.ctx(args.ctx)
    for (n, _), prompt in zip(prompts, ids):
        if len(prompt) > ctx:
            raise Llama3Error(f"{args.file} line {n}: the prompt has {len(prompt)} tokens but the context holds "
                              f"{ctx}: shorten it or raise --ctx-size")
    params = for_model(params, loaded)
    stop_ids = loaded.stop_ids()
    stop, suppressed = ((), stop_ids) if args.ignore_eos else (stop_ids, ())
    printers = [Printer(loaded.tokenizer, stop_ids, StopText(loaded.tokenizer, stops), quiet=True) for _ in ids]

    def generations():
        for prompt in ids:
            session = loaded.session(session_size(ctx, len(prompt), args.n_predict))
            yield session.generate(prompt, params, seeded_generator(seed), args.n_predict, stop, suppressed)

    def on_step(i: int, step: Step) -> bool:
        printers[i](step)
        return printers[i].text.found is not None

    total = 0
    t0 = time.perf_counter()
    try:
        for i, out in enumerate(generate_batch(generations(), args.parallel, on_step)):
            printers[i].finish()
            total += len(out.ids)
            line, text = prompts[i]
            if args.json:
                sys.stdout.write(json.dumps({"line": line, "prompt": text, "prompt_ids": out.prompt_ids, "ids": out.ids,
                                             "text": printers[i].shown, "stop_reason": out.stop_reason, "seed": seed},
                                            ensure_ascii=False) + "\n")
            else:
                sys.stdout.write(f"{text}{printers[i].shown}\n\n")
                sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    seconds = time.perf_counter() - t0
    print(f"load {loaded.load_seconds:.2f} s | {plural(len(ids), 'prompt')}, {args.parallel} at a time | generated "
          f"{plural(total, 'token')} in {seconds:.1f} s, {total / seconds:.1f} tok/s in all | "
          f"{plural(get_threads(), 'thread')} | peak RSS {peak_rss_mb():.0f} MB", file=sys.stderr)
    return 0


def run_generate(args) -> int:
    params = sampling_params(args)
    seed, rng = seeded_rng(args)
    if args.parallel is not None:
        return run_many(args, params, seed)
    text = read_prompt(args)
    if text is None and args.tokens is None:
        raise Llama3Error("give a prompt: -p TEXT, -f FILE or --tokens 1,2,3")
    if args.system is not None and not args.chat:
        raise Llama3Error("--system-prompt goes with --chat")
    for flag in ("chat_format", "chat_template_file", "chat_template_kwargs", "tools"):
        if getattr(args, flag) is not None and not args.chat:
            raise Llama3Error(f"--{flag.replace('_', '-')} goes with --chat")
    if args.explain is not None and args.explain < 1:
        raise Llama3Error(f"--explain takes a number of candidates >= 1, got {args.explain}")
    if args.echo and (args.json or args.explain is not None):
        raise Llama3Error("--echo goes with streamed text, not with --json or --explain")
    if args.ignore_eos and args.chat:
        raise Llama3Error("--ignore-eos does not go with --chat: a chat answer ends at its end-of-turn token")
    stops = check_stop_strings(args.reverse_prompt or ())
    loaded = load(args, need_tokenizer=args.tokens is None)
    if args.tokens is not None:
        if args.chat:
            raise Llama3Error("--chat needs a text prompt (-p or -f), not --tokens")
        prompt = parse_token_ids(args.tokens, loaded.config.vocab_size)
    elif args.chat:
        fmt = chat_format(args, loaded)
        if args.verbose_prompt:
            print(f"chat format: {describe(fmt)}", file=sys.stderr, flush=True)
        prompt = loaded.encode_dialog(args.system, text, fmt)
    else:
        if text == "":
            raise Llama3Error("the prompt is empty: give some text")
        prompt = loaded.encode(text)
    if not prompt:
        raise Llama3Error("the prompt is empty: give some text (-p/-f) or token ids (--tokens)")
    if args.verbose_prompt:
        print(verbose_prompt(loaded.tokenizer, prompt), file=sys.stderr, flush=True)

    ctx = loaded.ctx(args.ctx)
    if len(prompt) > ctx:
        raise Llama3Error(f"the prompt has {len(prompt)} tokens but the context holds {ctx}: "
                          "shorten it or raise --ctx-size")
    explain = args.explain is not None
    session = loaded.session(session_size(ctx, len(prompt), args.n_predict), ProgressLine("prefill"))
    stop_ids = session.stop_ids
    params = for_model(params, loaded)
    if stops and loaded.tokenizer is None:
        raise Llama3Error("-r needs the model's tokenizer to read the text generated: use a checkpoint with its "
                          "tokenizer files")
    stop_text = StopText(loaded.tokenizer, stops) if loaded.tokenizer is not None else None
    printer = Printer(loaded.tokenizer, stop_ids, stop_text, quiet=args.json or explain)
    if args.echo:
        printer.echo(prompt)
    if explain:
        explainer = print_explanation(loaded.tokenizer, args.explain, args.json)

        def on_step(step):
            explainer(step)
            printer(step)
    else:
        on_step = printer
    # --ignore-eos: the end-of-generation tokens are never drawn, so nothing stops the generation early.
    stop, suppressed = ((), stop_ids) if args.ignore_eos else (stop_ids, ())
    out = consume(session.generate(prompt, params, rng, args.n_predict, stop, suppressed), on_step, stop_text)
    printer.finish()

    if args.json:
        result = {
            "prompt_ids": out.prompt_ids, "ids": out.ids,
            "text": printer.shown if loaded.tokenizer else None,
            "stop_reason": out.stop_reason, "seed": seed,
            "timings": {"load_s": loaded.load_seconds, "prefill_s": out.prefill_seconds,
                        "decode_s": out.decode_seconds,
                        "prefill_tokens_per_s": out.prefill_tokens_per_second,
                        "decode_tokens_per_s": out.decode_tokens_per_second},
            "peak_rss_mb": peak_rss_mb(), "threads": get_threads(),
        }
        sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
    else:
        print(stats_line(loaded, out, seed if not params.greedy else None), file=sys.stderr)
    return {"interrupted": 130, "output_closed": EXIT_OUTPUT_CLOSED}.get(out.stop_reason, 0)
