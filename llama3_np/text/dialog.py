"""A chat's conversation kept as text, so that a full context never ends it.

The KV cache holds the conversation as it was fed, turn after turn. When the next message and room
for its answer no longer fit, the oldest whole turns (a user message and its answer) are dropped,
the system prompt always kept, and what remains is encoded again and fed from the start: the
positions of the kept turns change, so their cached keys cannot be reused. (llama.cpp's context
shift keeps `--keep` tokens and drops half of the rest; dropping whole turns keeps the chat format
well-formed.) Answers are kept as the text they decoded to and encoded again, so a kept answer's
ids may differ from the ones the model drew where byte-level BPE has several spellings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .chat import ChatFormat, encode_dialog
from ..errors import Llama3Error
from .tokenizer import Tokenizer


@dataclass
class Conversation:
    system: Optional[str] = None  # None: the chat format's default, if it has one
    # (user, assistant), oldest first; a message that is not the user's is a {"role", "content"} dict
    turns: list[tuple[str | dict, str]] = field(default_factory=list)

    def messages(self, user: Optional[str | dict] = None) -> list[dict]:
        """The conversation as chat messages, with `user`'s new message last when given."""
        out = [{"role": "system", "content": self.system}] if self.system is not None else []
        for question, answer in self.turns + ([(user, None)] if user is not None else []):
            out += [question if isinstance(question, dict) else {"role": "user", "content": question}]
            out += [{"role": "assistant", "content": answer}] if answer is not None else []
        return out

    def fit(self, tok: Tokenizer, fmt: ChatFormat, user: str | dict, ctx: int, room: int) -> tuple[list[int], int]:
        """The ids of the whole conversation and `user`'s message, up to the assistant's header,
        after dropping the fewest oldest turns that leave `room` of the `ctx` tokens for the
        answer; and how many turns were dropped (they are gone from `turns`).

        Raises Llama3Error when the system prompt and this message leave no room by themselves.
        """
        for dropped in range(len(self.turns) + 1):
            kept = Conversation(self.system, self.turns[dropped:])
            ids = encode_dialog(tok, kept.messages(user), fmt=fmt)
            if len(ids) + room <= ctx:
                del self.turns[:dropped]
                return ids, dropped
        raise Llama3Error(f"this message takes {len(ids)} tokens with the system prompt and the chat format, "
                          f"and its answer {room} more: the context holds {ctx}")
