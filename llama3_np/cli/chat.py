"""`llama3-np chat`: an interactive multi-turn chat in the checkpoint's chat format, keeping the
KV cache between turns."""

from __future__ import annotations

import sys

from ..errors import Llama3Error
from ..generation import Session
from ..text.chat import encode_turn
from .common import Printer, add_model_args, add_sampling_args, load, sampling_params, seeded_rng, stats_line


def add_command(sub) -> None:
    c = sub.add_parser("chat", help="interactive multi-turn chat in the model's chat format")
    add_model_args(c)
    add_sampling_args(c)
    c.add_argument("--system", help="system message")
    c.set_defaults(func=run_chat, n_predict=-1)


def run_chat(args) -> int:
    params = sampling_params(args)
    seed, rng = seeded_rng(args)
    loaded = load(args, need_tokenizer=True)
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
