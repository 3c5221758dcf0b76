"""`llama3-np generate` and `llama3-np chat`: text from a checkpoint, streamed as it is produced.

Text goes to stdout, statistics (load time, prefill and decode speed, peak memory, seed) to stderr.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from . import products
from .assets import model_dir
from .errors import Llama3Error
from .generation import Generation, Session
from .sampling import SamplingParams, sampling_probs

# Without --ctx, the KV cache holds at most this many tokens (or the model's own context if smaller):
# a 131,072-token float32 cache for an 8B model would need 34 GB.
DEFAULT_CTX = 4096


def thread_count(text: str) -> int:
    """argparse type of -t/--threads: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"takes a number of threads >= 1, got {text!r}")
    return n


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags of every command that loads a model and computes with it."""
    p.add_argument("-m", "--model", metavar="DIR",
                   help="checkpoint folder (Hugging Face or Meta format); default: the embedded default model")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weight residency: float32 (fast) or bfloat16 (half the memory)")
    p.add_argument("--rope-factor", type=float, metavar="F",
                   help="override the llama3 rope scaling factor of a Meta params.json")
    p.add_argument("-t", "--threads", type=thread_count, default=products.default_threads(), metavar="N",
                   help=f"threads to compute with (default: one per core, here {products.default_threads()})")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    d = SamplingParams()
    p.add_argument("-n", "--n-predict", type=int, default=128, metavar="N",
                   help="tokens to generate; -1: until a stop token or the context is full (default 128)")
    p.add_argument("--temp", type=float, default=d.temperature, help=f"temperature; 0 = greedy (default {d.temperature})")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"0 = off (default {d.top_k})")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"1 = off (default {d.top_p})")
    p.add_argument("--min-p", type=float, default=d.min_p, help=f"0 = off (default {d.min_p})")
    p.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty,
                   help=f"penalty on the last 64 tokens; 1 = off (default {d.repeat_penalty})")
    p.add_argument("--seed", type=int, help="random seed (default: a random one, printed with the statistics)")
    p.add_argument("--ctx", type=int, metavar="N",
                   help=f"context size in tokens (default: the model's, at most {DEFAULT_CTX})")


def add_command(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt (or answer it as a chat turn with --chat)")
    add_model_args(g)
    src = g.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help="prompt text")
    src.add_argument("-f", "--file", help="read the prompt from a UTF-8 text file")
    src.add_argument("--tokens", help="prompt as comma-separated token ids (no tokenizer needed)")
    add_sampling_args(g)
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the model's chat format")
    g.add_argument("--system", help="system message (with --chat)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--explain", nargs="?", const=5, type=int, metavar="K",
                   help="instead of the text, show for every generated token the K most probable candidates "
                        "(default 5) and the one chosen; with --json, one JSON line per token")
    g.set_defaults(func=run_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat in the model's chat format")
    add_model_args(c)
    add_sampling_args(c)
    c.add_argument("--system", help="system message")
    c.set_defaults(func=run_chat, n_predict=-1)


# ---------------------------------------------------------------------------------------------


def sampling_params(args) -> SamplingParams:
    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                          min_p=args.min_p, repeat_penalty=args.repeat_penalty)


def seeded_rng(args) -> tuple[int, np.random.Generator]:
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**32)
    if seed < 0:
        raise Llama3Error(f"--seed must be >= 0, got {seed}")
    return seed, np.random.default_rng(seed)


class Loaded:
    """A checkpoint, its tokenizer (None when it has none) and chat format, and the load time."""

    def __init__(self, args, need_tokenizer: bool):
        from .checkpoint import load_checkpoint
        from .tokenizer import load_tokenizer

        t0 = time.perf_counter()
        path = model_dir(args.model)
        self.checkpoint = load_checkpoint(path, dtype=args.dtype, rope_factor=args.rope_factor)
        try:
            self.tokenizer = load_tokenizer(path)
        except Llama3Error:
            if need_tokenizer:
                raise
            self.tokenizer = None
        self.load_seconds = time.perf_counter() - t0
        self.config = self.checkpoint.config

    def ctx(self, requested: int | None) -> int:
        if requested is not None:
            if requested <= 0:
                raise Llama3Error(f"--ctx must be positive, got {requested}")
            return requested
        return min(self.config.max_seq_len, DEFAULT_CTX)

    def chat_format(self):
        from .chat import chat_format_for
        return chat_format_for(self.tokenizer)

    def encode_dialog(self, system: str | None, user: str) -> list[int]:
        from .chat import encode_dialog
        messages = [{"role": "system", "content": system}] if system is not None else []
        return encode_dialog(self.tokenizer, messages + [{"role": "user", "content": user}],
                             fmt=self.chat_format())

    def stop_ids(self, chat: bool) -> set[int]:
        """The checkpoint's end-of-sequence ids and the tokenizer's; in a chat, also the
        format's end-of-turn tokens."""
        from .chat import stop_ids
        ids = set(self.checkpoint.eos_ids)
        if self.tokenizer is not None:
            ids |= {self.tokenizer.eos_id} - {None}
            if chat:
                ids |= stop_ids(self.tokenizer, self.chat_format())
        return ids


def read_prompt(args) -> str | None:
    if args.file is not None:
        path = Path(args.file)
        if not path.exists():
            raise Llama3Error(f"prompt file {args.file} does not exist: pass -f the path of a UTF-8 text file")
        if path.is_dir():
            raise Llama3Error(f"prompt file {args.file} is a folder: pass -f the path of a UTF-8 text file")
        data = path.read_bytes()  # a regular file, or a pipe such as -f <(command)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Llama3Error(f"prompt file {args.file} is not UTF-8 text (byte 0x{data[e.start]:02x} "
                              f"at offset {e.start}): convert it to UTF-8") from None
    return args.prompt


def parse_token_ids(text: str, vocab_size: int) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise Llama3Error(f"--tokens takes comma-separated integers, got {text!r}") from None
    for i in ids:
        if not 0 <= i < vocab_size:
            raise Llama3Error(f"--tokens: id {i} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def stats_line(loaded: Loaded, out: Generation, seed: int) -> str:
    return (f"load {loaded.load_seconds:.2f} s | prompt {len(out.prompt_ids)} tokens, "
            f"{out.prefill_tokens_per_second:.1f} tok/s | generated {len(out.ids)} tokens, "
            f"{out.decode_tokens_per_second:.1f} tok/s | {products.get_threads()} threads | "
            f"peak RSS {peak_rss_mb():.0f} MB | "
            f"seed {seed} | stop: {out.stop_reason}")


class Printer:
    """Streams generated ids to stdout as UTF-8 text (ids themselves when there is no tokenizer)."""

    def __init__(self, tokenizer, stop_ids):
        from .tokenizer import StreamDecoder

        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.stream = sys.stdout.buffer

    def __call__(self, token: int) -> None:
        if token in self.stop_ids:
            return
        text = self.decoder.push(token) if self.decoder else f"{token} "
        self.write(text)

    def write(self, text: str) -> None:
        if text:
            self.stream.write(text.encode("utf-8"))
            self.stream.flush()

    def finish(self) -> None:
        self.write((self.decoder.flush() if self.decoder else "") + "\n")


class ExplainedSession(Session):
    """A Session that keeps the logits the next token is sampled from (for --explain)."""

    def feed(self, ids: list[int]) -> np.ndarray:
        self.last_logits = super().feed(ids)
        return self.last_logits


class Explainer:
    """--explain: for each generated token, the top-k candidates by model probability, with the
    probability the sampler gave each after its filters, and the token chosen."""

    def __init__(self, session: ExplainedSession, params: SamplingParams, tokenizer, k: int, as_json: bool):
        if k < 1:
            raise Llama3Error(f"--explain takes a number of candidates >= 1, got {k}")
        self.session, self.params, self.tokenizer, self.k, self.as_json = session, params, tokenizer, k, as_json
        self.generated: list[int] = []
        # The model's own distribution: every sampling filter off.
        self.plain = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else f"<{token}>"

    def __call__(self, token: int) -> None:
        logits = self.session.last_logits
        # Called before `token` is fed: the window is the one sample() saw when drawing it.
        sampled = sampling_probs(logits, self.params, self.session.recent_ids())
        p = sampling_probs(logits, self.plain)
        order = np.argsort(-logits, kind="stable")  # most probable first, lower id first on ties
        rank_of = np.empty(order.size, dtype=np.int64)
        rank_of[order] = np.arange(1, order.size + 1)
        rank = int(rank_of[token])
        self.generated.append(token)
        shown = [int(t) for t in order[:self.k]] + ([token] if rank > self.k else [])
        rows = [{"rank": int(rank_of[t]), "id": t, "token": self.text(t),
                 "logit": float(logits[t]), "p": float(p[t]), "sampled_p": float(sampled[t])} for t in shown]
        if self.as_json:
            sys.stdout.write(json.dumps({"step": len(self.generated), "id": token, "token": self.text(token),
                                         "rank": rank, "p": float(p[token]), "sampled_p": float(sampled[token]),
                                         "top": rows}, ensure_ascii=False) + "\n")
            return
        lines = [f"#{len(self.generated)}  chose {json.dumps(self.text(token), ensure_ascii=False)} "
                 f"(id {token}, rank {rank}, p {p[token]:.4f}, sampled p {sampled[token]:.4f})"]
        for r in rows:
            mark = "  <- chosen" if r["id"] == token else ""
            lines.append(f"   {r['rank']:>5}. {json.dumps(r['token'], ensure_ascii=False):<16} id {r['id']:>6}  "
                         f"logit {r['logit']:8.3f}  p {r['p']:.4f}  sampled p {r['sampled_p']:.4f}{mark}")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()


def run_generate(args) -> int:
    params = sampling_params(args)
    seed, rng = seeded_rng(args)
    text = read_prompt(args)
    if text is None and args.tokens is None:
        raise Llama3Error("give a prompt: -p TEXT, -f FILE or --tokens 1,2,3")
    if args.system is not None and not args.chat:
        raise Llama3Error("--system goes with --chat")
    loaded = Loaded(args, need_tokenizer=args.tokens is None)
    if args.tokens is not None:
        if args.chat:
            raise Llama3Error("--chat needs a text prompt (-p or -f), not --tokens")
        prompt = parse_token_ids(args.tokens, loaded.config.vocab_size)
    elif args.chat:
        prompt = loaded.encode_dialog(args.system, text)
    else:
        if text == "":
            raise Llama3Error("the prompt is empty: give some text")
        prompt = loaded.tokenizer.encode(text, bos=loaded.tokenizer.add_bos)
    if not prompt:
        raise Llama3Error("the prompt is empty: give some text (-p/-f) or token ids (--tokens)")

    ctx = loaded.ctx(args.ctx)
    if len(prompt) > ctx:
        raise Llama3Error(f"the prompt has {len(prompt)} tokens but the context holds {ctx}: "
                          "shorten it or raise --ctx")
    # The cache needs room for the prompt and the new tokens, never more than the context.
    cache_len = ctx if args.n_predict < 0 else min(ctx, len(prompt) + args.n_predict)
    explain = args.explain is not None
    session = (ExplainedSession if explain else Session)(loaded.checkpoint.weights, loaded.config, cache_len)
    stop_ids = loaded.stop_ids(chat=args.chat)
    printer = None if args.json or explain else Printer(loaded.tokenizer, stop_ids)
    on_token = Explainer(session, params, loaded.tokenizer, args.explain, args.json) if explain else printer
    out = session.generate(prompt, params, rng, args.n_predict, stop_ids, on_token=on_token)

    if args.json:
        result = {
            "prompt_ids": out.prompt_ids, "ids": out.ids,
            "text": loaded.tokenizer.decode(out.text_ids) if loaded.tokenizer else None,
            "stop_reason": out.stop_reason, "seed": seed,
            "timings": {"load_s": loaded.load_seconds, "prefill_s": out.prefill_seconds,
                        "decode_s": out.decode_seconds,
                        "prefill_tokens_per_s": out.prefill_tokens_per_second,
                        "decode_tokens_per_s": out.decode_tokens_per_second},
            "peak_rss_mb": peak_rss_mb(), "threads": products.get_threads(),
        }
        sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
    else:
        if printer is not None:
            printer.finish()
        print(stats_line(loaded, out, seed), file=sys.stderr)
    return 130 if out.stop_reason == "interrupted" else 0


def run_chat(args) -> int:
    params = sampling_params(args)
    seed, rng = seeded_rng(args)
    from .chat import encode_turn

    loaded = Loaded(args, need_tokenizer=True)
    fmt = loaded.chat_format()
    session = Session(loaded.checkpoint.weights, loaded.config, loaded.ctx(args.ctx))
    stop_ids = loaded.stop_ids(chat=True)
    interactive = sys.stdin.isatty()
    print(f"chat with {session.config.n_layers}-layer model from {loaded.checkpoint.path} "
          f"({fmt.name} format, {session.ctx}-token context, seed {seed}); "
          "Ctrl-C stops an answer, Ctrl-D quits", file=sys.stderr)
    first = True
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        if not line.strip():
            continue
        if first:
            ids = loaded.encode_dialog(args.system, line)
        else:
            # The previous answer's end-of-turn token was sampled, never fed: encode_turn closes
            # that turn, then adds this one. Earlier turns stay in the KV cache.
            ids = encode_turn(loaded.tokenizer, [{"role": "user", "content": line}], fmt)
        if len(ids) > session.ctx - session.cache.length:
            raise Llama3Error(f"the conversation no longer fits the {session.ctx}-token context: "
                              "start a new chat, with a larger --ctx")
        printer = Printer(loaded.tokenizer, stop_ids)
        out = session.generate(ids, params, rng, args.n_predict, stop_ids, on_token=printer)
        printer.finish()
        first = False
        print(stats_line(loaded, out, seed), file=sys.stderr)
        if out.stop_reason == "length" and session.cache.length >= session.ctx:
            print("the context is full; start a new chat (with a larger --ctx)", file=sys.stderr)
            return 0
