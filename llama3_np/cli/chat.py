"""`llama3-np chat`: an interactive multi-turn chat in the checkpoint's chat format, keeping the
KV cache between turns."""

from __future__ import annotations

import sys

from ..errors import Llama3Error
from ..generation import Session
from ..text.chat import encode_turn
from .common import (Printer, add_model_args, add_sampling_args, consume, load, sampling_params, seeded_rng,
                     stats_line)


def add_command(sub) -> None:
    c = sub.add_parser("chat", help="interactive multi-turn chat in the model's chat format")
    add_model_args(c)
    add_sampling_args(c)
    c.add_argument("--system", help="system message")
    c.set_defaults(func=run_chat, n_predict=-1)


def run_chat(args) -> int:
    params = sampling_params(args)
    seed, rng = seeded_rng(args)
    if args.ignore_eos:
        raise Llama3Error("--ignore-eos does not go with chat: an answer ends at its end-of-turn token")
    loaded = load(args, need_tokenizer=True)
    fmt = loaded.chat_format()
    session = Session(loaded.weights, loaded.config, loaded.ctx(args.ctx))
    stop_ids = loaded.stop_ids()
    interactive = sys.stdin.isatty()
    print(f"chat with {session.config.n_layers}-layer model from {loaded.checkpoint.path} "
          f"({fmt.name} format, {session.ctx}-token context, seed {seed}); "
          "Ctrl-C stops an answer, Ctrl-D quits", file=sys.stderr)
    previous = None  # the last answer that made it into the dialog
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        if not line.strip():
            continue
        if previous is None:
            ids = loaded.encode_dialog(args.system, line)
        else:
            # The previous answer's last drawn token was never fed (a stop token, or the token
            # drawn when -n ran out): it goes first, and encode_turn closes that answer, keeping
            # the end token the model produced, then adds this turn. Earlier turns stay in the cache.
            unfed = previous.unfed_ids
            end = unfed[-1] if unfed and unfed[-1] in stop_ids else None
            ids = unfed[:len(unfed) - (end is not None)] + encode_turn(
                loaded.tokenizer, [{"role": "user", "content": line}], fmt, reply_end=end)
        if len(ids) > session.ctx - session.cache.length:
            raise Llama3Error(f"the conversation no longer fits the {session.ctx}-token context: "
                              "start a new chat, with a larger --ctx")
        printer = Printer(loaded.tokenizer, stop_ids)
        out = consume(session.generate(ids, params, rng, args.n_predict, stop_ids), printer)
        printer.finish()
        print(stats_line(loaded, out, seed), file=sys.stderr)
        if not out.prompt_fed:
            # Ctrl-C before the answer began: this turn never entered the dialog.
            session.rollback(out.start)
            continue
        previous = out
        if session.cache.length >= session.ctx:
            print("the context is full; start a new chat (with a larger --ctx)", file=sys.stderr)
            return 0
