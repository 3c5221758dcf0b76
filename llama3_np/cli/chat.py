"""`llama3-np chat`: an interactive multi-turn chat in the checkpoint's chat format, keeping the
KV cache between turns.

The terminal side (line editing, continuation lines, pastes, the slash commands, colours) is
`llama3_np.repl`; the conversation kept as text, whose oldest turns are dropped when the context
fills, is `llama3_np.text.dialog`.
"""

from __future__ import annotations

import sys

from ..errors import Llama3Error
from ..repl import HELP, Colors, TurnReader, message_text, parse_command
from ..text.chat import encode_turn
from ..text.dialog import Conversation
from .common import (Printer, ProgressSession, add_model_args, add_sampling_args, consume, load, sampling_params,
                     seeded_rng, stats_line)


def add_command(sub) -> None:
    c = sub.add_parser("chat", help="interactive multi-turn chat in the model's chat format",
                       description="Chat with the model in its chat format (Llama 3 or ChatML), keeping the "
                                   "conversation in the KV cache between turns.")
    add_model_args(c)
    add_sampling_args(c, n_predict=-1)
    c.add_argument("-sys", "--system-prompt", "--system", dest="system", metavar="TEXT", help="system message")
    c.set_defaults(func=run_chat)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_chat(args) -> int:
    params = sampling_params(args)
    seed, rng = seeded_rng(args)
    loaded = load(args, need_tokenizer=True)
    tok, fmt = loaded.tokenizer, loaded.chat_format()
    session = ProgressSession(loaded.weights, loaded.config, loaded.ctx(args.ctx), args.repeat_last_n)
    stop_ids = loaded.stop_ids()
    # Room a new message must leave for its answer before older turns are dropped: the -n limit,
    # but never more than half the context (a longer answer is cut by the context anyway).
    room = max(min(args.n_predict if args.n_predict > 0 else session.ctx // 4, session.ctx // 2), 1)
    colors = Colors(sys.stdout)
    reader = TurnReader(colors)
    conversation = Conversation(args.system)
    previous = None  # the last answer, while the cache holds the dialog up to it
    shown_seed = seed if not params.greedy else None
    say(f"chat with {session.config.n_layers}-layer model from {loaded.checkpoint.path}, loaded in "
        f"{loaded.load_seconds:.2f} s ({fmt.name} format, {session.ctx}-token context"
        f"{f', seed {seed}' if shown_seed is not None else ''}); /help lists the commands, Ctrl-C stops an "
        "answer, Ctrl-D quits")
    while True:
        turn = reader.read()
        if turn is None:
            return 0
        if not turn.strip():
            continue
        command = parse_command(turn)
        if command is not None:
            if not command.known:
                say(f"unknown command /{command.name}: /help lists the commands")
            elif command.name == "quit":
                return 0
            elif command.name == "help":
                print(HELP, flush=True)
            else:  # reset, system: a new conversation with the same model
                if command.name == "system":
                    conversation.system = command.text or None
                conversation.turns.clear()
                session.rollback(0)
                previous = None
                say("new conversation" + (f" (system prompt: {conversation.system})"
                                          if command.name == "system" and conversation.system else ""))
            continue
        text = message_text(turn)
        ids = None
        if previous is not None:
            # The previous answer's last drawn token was never fed (a stop token, or the token
            # drawn when -n ran out): it goes first, and encode_turn closes that answer, keeping
            # the end token the model produced, then adds this turn. Earlier turns stay in the cache.
            unfed = previous.unfed_ids
            end = unfed[-1] if unfed and unfed[-1] in stop_ids else None
            ids = unfed[:len(unfed) - (end is not None)] + encode_turn(
                tok, [{"role": "user", "content": text}], fmt, reply_end=end)
        if ids is None or len(ids) + room > session.ctx - session.cache.length:
            try:
                ids, dropped = conversation.fit(tok, fmt, text, session.ctx, room)
            except Llama3Error as e:
                say(f"not sent: {e} (a shorter message, or a larger --ctx-size)")
                continue
            session.rollback(0)  # the kept turns move to other positions: feed them again
            if dropped:
                which = "the oldest turn" if dropped == 1 else f"the {dropped} oldest turns"
                say(f"(the context is full: dropped {which} of the conversation)")
        printer = Printer(tok, stop_ids)
        printer.write(colors.code("MODEL"))
        out = consume(session.generate(ids, params, rng, args.n_predict, stop_ids), printer)
        printer.write(colors.code("RESET"))
        printer.finish()
        say(stats_line(None, out, shown_seed))
        if not out.prompt_fed:
            # Ctrl-C before the answer began: this turn never entered the dialog.
            session.rollback(out.start)
            previous = previous if session.cache.length else None
            continue
        previous = out
        conversation.turns.append((text, tok.decode(out.text_ids)))
        if out.stop_reason == "context":
            say("(the context is full: the answer was cut short; the next message drops the oldest turns)")
