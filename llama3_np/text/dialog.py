"""A chat's conversation kept as the token ids the model was fed, so that a full context never ends it.

The KV cache holds the conversation as it was fed, turn after turn. When the next message and room
for its answer no longer fit, the oldest whole turns (a user message and its answer) are dropped,
the system prompt always kept, and what remains is fed again after it: the positions of the kept
turns change, so their cached keys cannot be reused. (llama.cpp's context shift keeps `--keep`
tokens and drops half of the rest; dropping whole turns keeps the chat format well-formed.)

Every turn is kept as its ids, not as text to encode again: an answer's ids are the ones the model
drew and its end the token that really closed it, so a kept turn is fed again exactly as the model
saw it the first time. Text would not do: a `<|python_tag|>` tool call decoded to text comes back
as plain-text tokens, an answer that ended with `<|eom_id|>` would be closed with `<|eot_id|>`,
and byte-level BPE may spell a decoded answer with other ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .chat import ChatFormat, encode_dialog, encode_turn
from ..errors import Llama3Error
from .tokenizer import Tokenizer


@dataclass
class Turn:
    user: str  # the user's message
    answer: str  # the text of the model's answer (without its end token)
    ids: list[int]  # the message, the assistant's header, the answer's ids and the end that closed it
    role: str = "user"  # of the message: "tool" for a tool's result


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Conversation:
    """The turns of a chat, each as the ids the model was fed, after a head (the beginning of the
    dialog and the system message) that always stays.

    The ids are cut out of the chat format's own encodings (`encode_dialog` for the first message,
    `encode_turn` for each later one), so the whole conversation is exactly the ids a chat that
    never dropped anything would have fed.
    """

    tok: Tokenizer
    fmt: ChatFormat
    system: Optional[str] = None  # None: the chat format's default, if it has one
    turns: list[Turn] = field(default_factory=list)  # oldest first
    head: Optional[list[int]] = None  # set by the first message

    def _generation_prompt(self) -> list[int]:
        # Of a one-message dialog: a template may need a message to render at all.
        one = [{"role": "user", "content": ""}]
        bare = encode_dialog(self.tok, one, add_generation_prompt=False, fmt=self.fmt)
        return encode_dialog(self.tok, one, fmt=self.fmt)[len(bare):]

    def close_ids(self, end: Optional[int]) -> list[int]:
        """The ids that close an answer: its end token `end` when the chat format keeps it
        (`encode_turn`'s reply_end), else the format's usual end of a message."""
        both, prompt = encode_turn(self.tok, [], self.fmt, reply_end=end), self._generation_prompt()
        if both[len(both) - len(prompt):] != prompt:
            raise Llama3Error(f"chat format {self.fmt.name}: a turn does not end with the assistant's header")
        return both[:len(both) - len(prompt)]

    def message_ids(self, user: str, role: str = "user") -> list[int]:
        """The ids of `user`'s message (in `role`) and the assistant's header that follows it. The
        first message also fixes `head`: what the dialog's encoding holds before it. A first
        message that encodes unlike later ones (a template that writes the tool definitions into
        the first user message) becomes part of the head itself, and [] is returned: it and its
        answer are never dropped (`keep_in_head`)."""
        message = {"role": role, "content": user}
        ids = encode_turn(self.tok, [message], self.fmt)[len(self.close_ids(None)):]
        if self.head is None:
            system = [{"role": "system", "content": self.system}] if self.system is not None else []
            first = encode_dialog(self.tok, system + [message], fmt=self.fmt)
            if first[len(first) - len(ids):] != ids:
                self.head = first
                return []
            self.head = first[:len(first) - len(ids)]
        return ids

    def keep_in_head(self, ids: list[int]) -> None:
        """An answer to a message that became part of the head (`message_ids` returned []) joins it."""
        self.head = (self.head or []) + ids

    def ids(self) -> list[int]:
        """The whole conversation: the head, then every turn."""
        return (self.head or []) + [i for turn in self.turns for i in turn.ids]

    def fit(self, message: list[int], ctx: int, room: int) -> int:
        """Drop the fewest oldest turns that leave the conversation, `message` (`message_ids`)
        and `room` tokens for the answer within `ctx`; how many were dropped.

        Raises Llama3Error, dropping nothing, when the head and this message leave no room by
        themselves.
        """
        need = len(self.head or []) + len(message) + room
        kept = sum(len(turn.ids) for turn in self.turns)
        for dropped, turn in enumerate([*self.turns, None]):
            if need + kept <= ctx:
                del self.turns[:dropped]
                return dropped
            kept -= len(turn.ids) if turn is not None else 0
        raise Llama3Error(f"this message takes {need - room} tokens with the system prompt and the chat format, "
                          f"and its answer {room} more: the context holds {ctx}")

    def messages(self) -> list[dict]:
        """The conversation as chat messages (the system message first, when one was given)."""
        out = [{"role": "system", "content": self.system}] if self.system is not None else []
        for turn in self.turns:
            out += [{"role": turn.role, "content": turn.user}, {"role": "assistant", "content": turn.answer}]
        return out

    def reset(self, system: Optional[str]) -> None:
        """A new conversation with this system message."""
        self.system, self.turns, self.head = system, [], None
