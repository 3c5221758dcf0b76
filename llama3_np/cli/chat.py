"""`llama3-np chat`: an interactive multi-turn chat in the checkpoint's chat format, keeping the
KV cache between turns.

The chat itself (what each turn feeds, the turns dropped when the context fills) is the library's
`llama3_np.chat_session.ChatSession`; the terminal side (line editing, continuation lines, pastes,
the slash commands, colours) is `llama3_np.repl`. This command reads turns, prints the answers and
says what happened.
"""

from __future__ import annotations

import json
import sys

from ..errors import Llama3Error
from ..repl import HELP, Colors, TurnReader, message_text, parse_command
from ..text.chat import describe
from ..text.tools import parse_tool_call, tool_calls_expected
from .common import (Printer, ProgressLine, add_chat_args, add_model_args, add_sampling_args, chat_format, consume,
                     for_model, load, sampling_params, seeded_rng, stats_line)


def add_command(sub) -> None:
    c = sub.add_parser("chat", help="interactive multi-turn chat in the model's chat format",
                       description="Chat with the model in its chat format (Llama 3 or ChatML), keeping the "
                                   "conversation in the KV cache between turns.")
    add_model_args(c)
    add_sampling_args(c, n_predict=-1)
    c.add_argument("-sys", "--system-prompt", "--system", dest="system", metavar="TEXT", help="system message")
    add_chat_args(c)
    c.set_defaults(func=run_chat)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_chat(args) -> int:
    params = sampling_params(args)
    seed, rng = seeded_rng(args)
    loaded = load(args, need_tokenizer=True)
    chat = loaded.chat_session(args.system, args.ctx, ProgressLine("prefill"),
                               chat_format(args, loaded))
    role = "user"  # of the next message: "tool" after an answer that called a tool
    tok, stop_ids = chat.tokenizer, chat.session.stop_ids
    params = for_model(params, loaded)
    colors = Colors(sys.stdout)
    reader = TurnReader(colors)
    shown_seed = seed if not params.greedy else None
    say(f"chat with {loaded.config.n_layers}-layer model from {loaded.checkpoint.path}, loaded in "
        f"{loaded.load_seconds:.2f} s (chat format {describe(chat.format)}, {chat.ctx}-token context"
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
                chat.reset((command.text or None) if command.name == "system" else chat.system)
                role = "user"
                say("new conversation" + (f" (system prompt: {chat.system})"
                                          if command.name == "system" and chat.system else ""))
            continue
        try:
            answer = chat.send(message_text(turn), params, rng, args.n_predict, role)
        except Llama3Error as e:
            say(f"not sent: {e} (a shorter message, or a larger --ctx-size)")
            continue
        if chat.dropped:
            which = "the oldest turn" if chat.dropped == 1 else f"the {chat.dropped} oldest turns"
            say(f"(the context is full: dropped {which} of the conversation)")
        printer = Printer(tok, stop_ids)
        printer.write(colors.code("MODEL"))
        out = consume(answer, printer)
        printer.write(colors.code("RESET"))
        printer.finish()
        say(stats_line(None, out, shown_seed))
        text = tok.decode(out.ids)  # with the end token: <|eom_id|> after a call
        call = parse_tool_call(text) if out.prompt_fed and tool_calls_expected(chat.format, text) else None
        role = "tool" if call is not None else "user"
        if call is not None:
            say(f"tool call: {call.name} {json.dumps(call.arguments, ensure_ascii=False)} (llama3_np runs no "
                "tool: type its result as the next message, which goes to the model in the ipython role)")
        if out.stop_reason == "context":
            say("(the context is full: the answer was cut short; the next message drops the oldest turns)")
