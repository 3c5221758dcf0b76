"""A multi-turn chat on one KV cache: what `llama3-np chat` runs, as a library.

Each `ChatSession.send` feeds only what the cache does not hold yet: the end of the previous
answer (its last drawn token, which no step fed, and the end that closes it), the new message and
the assistant's header. When the conversation, the message and room for the answer no longer fit
the context, the oldest whole turns are dropped (`text.dialog.Conversation.fit`) and the kept ones
fed again after the system prompt, whose keys stay cached: every turn as the very ids the model
was fed the first time.

The command line adds the terminal (reading turns, slash commands, colours: `llama3_np.repl`) and
prints the steps; anything else of a chat lives here.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .generation import Generation
from .sampling import SamplingParams
from .text.dialog import Conversation, Turn, common_prefix


class ChatSession:
    """A chat with `model` (a `load.LoadedModel`) in its chat format, keeping the KV cache between turns.

    ctx: the context in tokens (None: the model's, at most `load.DEFAULT_CTX`); system: the system
    message (None: the chat format's default, if it has one); progress: as `Session`'s; fmt: the
    chat format (`LoadedModel.chat_format`; None: the checkpoint's).
    """

    def __init__(self, model, ctx: Optional[int] = None, system: Optional[str] = None,
                 progress: Optional[Callable[[int, int], None]] = None,
                 fmt=None):
        self.tokenizer = model.need_tokenizer()
        self.format = fmt or model.chat_format()
        self.session = model.session(ctx, progress)
        self.conversation = Conversation(self.tokenizer, self.format, system)
        self.dropped = 0  # how many of the oldest turns the last `send` dropped
        self._pending: Optional[tuple[str, list[int], Generation]] = None  # the answer last sent

    @property
    def ctx(self) -> int:
        return self.session.ctx

    @property
    def system(self) -> Optional[str]:
        return self.conversation.system

    def room(self, max_new: int) -> int:
        """Room a new message must leave for its answer before older turns are dropped: `max_new`,
        but never more than half the context (a longer answer is cut by the context anyway), and
        a quarter of it when the answer has no limit (-1)."""
        return max(min(max_new if max_new > 0 else self.ctx // 4, self.ctx // 2), 1)

    def send(self, text: str, params: Optional[SamplingParams] = None, rng: Optional[np.random.Generator] = None,
             max_new: int = -1, role: str = "user") -> Generation:
        """The model's answer to the user's message `text` (or, with `role` "tool", a tool's
        result), as a `Generation` to iterate (the `Session.generate` arguments), ending at the
        model's end-of-generation ids.

        Raises Llama3Error, leaving the conversation as it was, when the message does not fit the
        context even with every earlier turn dropped; `dropped` tells how many were dropped.
        """
        self._settle()
        message = self.conversation.message_ids(text, role)
        self.dropped = self.conversation.fit(message, self.ctx, self.room(max_new))
        ids = self.conversation.ids() + message
        # What the cache holds of these ids stays (all of them but the new ones, unless turns
        # were dropped: then the head); the rest is fed.
        kept = common_prefix(self.session.history, ids)
        self.session.rollback(kept)
        out = self.session.generate(ids[kept:], params, rng, max_new)
        self._pending = (text, message, out, role)
        return out

    def _settle(self) -> None:
        """Keep the last answer as a turn: its message, its ids and the end that closed it (the
        end token the model drew, when the format keeps it). An answer whose prompt never entered
        the cache (Ctrl-C during the prefill) leaves no turn."""
        if self._pending is None:
            return
        text, message, out, role = self._pending
        self._pending = None
        if not out.prompt_fed:
            return
        end = out.ids[-1] if out.stop_reason == "stop" else None
        ids = message + out.text_ids + self.conversation.close_ids(end)
        if not message:  # the first message is in the head (`Conversation.message_ids`)
            self.conversation.keep_in_head(ids)
            return
        self.conversation.turns.append(Turn(text, self.tokenizer.decode(out.text_ids), ids, role))

    def messages(self) -> list[dict]:
        """The conversation so far as chat messages, the last answer included."""
        self._settle()
        return self.conversation.messages()

    def reset(self, system: Optional[str] = None) -> None:
        """A new conversation with the same model and this system message."""
        self._pending = None
        self.conversation.reset(system)
        self.session.rollback(0)
