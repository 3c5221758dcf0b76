"""Chat formats as data: how a dialog becomes token ids, and which tokens end the assistant's turn.

A format is a few sequences of parts. A part that names one of the tokenizer's special tokens
becomes that token's id; any other part is text, filled in (`{role}`, `{content}`) and encoded on
its own, as plain text: a user who types `<|eot_id|>` gets those characters, never the token.
Where the parts are cut decides the ids: Meta's `ChatFormat` encodes the header's "\\n\\n" and the
content separately; a Hugging Face chat template renders role, newline and content as one text.

The checkpoint decides the format: `chat_format_for(tok)` gives Llama 3 when the tokenizer has
`<|start_header_id|>`, ChatML (`<|im_start|>`, the default model) otherwise, bound to the tokenizer
as a `Chat` that encodes dialogs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from .errors import Llama3Error
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class ChatFormat:
    name: str
    begin: tuple[str, ...]              # before the first message
    message: tuple[str, ...]            # one message, with "{role}" and "{content}" to fill in
    generation_prompt: tuple[str, ...]  # opens the assistant's reply
    stop: tuple[str, ...]               # special tokens that end the assistant's reply
    roles: dict[str, str] = field(default_factory=dict)  # role names the format spells differently
    default_system: str | None = None   # the system message of a dialog that brings none


# Meta's `llama_models.llama3.chat_format.ChatFormat`.
LLAMA3 = ChatFormat(
    name="llama3",
    begin=("<|begin_of_text|>",),
    message=("<|start_header_id|>", "{role}", "<|end_header_id|>", "\n\n", "{content}", "<|eot_id|>"),
    generation_prompt=("<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n"),
    stop=("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"),
    roles={"tool": "ipython"},
)

# `<|im_start|>role\ncontent<|im_end|>\n`, as Hugging Face chat templates render it.
CHATML = ChatFormat(
    name="chatml",
    begin=(),
    message=("<|im_start|>", "{role}\n{content}", "<|im_end|>", "\n"),
    generation_prompt=("<|im_start|>", "assistant\n"),
    stop=("<|im_end|>", "<|endoftext|>"),
)

# A chat template that writes a fixed system message (when the dialog has none) holds it as a
# literal `<|im_start|>system\n...<|im_end|>`; the newline may be written as an escape.
_LITERAL_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>")


class Chat:
    """A chat format bound to a checkpoint's tokenizer: dialogs in, token ids out."""

    def __init__(self, tok: Tokenizer, fmt: ChatFormat):
        self.tok, self.format, self.name = tok, fmt, fmt.name
        # The reply's stop tokens and the tokenizer's EOS all end the assistant's turn.
        self.stop_ids = frozenset({tok.special_tokens[s] for s in fmt.stop if s in tok.special_tokens}
                                  | ({tok.eos_id} if tok.eos_id is not None else set()))

    def encode_dialog(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a whole dialog (a list of {"role", "content"}), ending with the assistant's
        header when `add_generation_prompt`."""
        messages = _checked(messages)
        if self.format.default_system is not None and messages and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.format.default_system}] + messages
        ids = self._render(self.format.begin)
        for m in messages:
            ids += self._message(m)
        return ids + (self._render(self.format.generation_prompt) if add_generation_prompt else [])

    def end_of_turn_ids(self) -> list[int]:
        """What closes the assistant's reply in the dialog (the message's parts after its content).
        A generation loop samples the stop token but does not feed it; these ids are fed instead."""
        parts = self.format.message
        content_at = next(i for i, part in enumerate(parts) if "{content}" in part)
        return self._render(parts[content_at + 1:])

    def encode_turn(self, *messages: dict) -> list[int]:
        """Ids that add messages (usually the user's next one) and the next assistant header to a
        dialog whose earlier turns are already in the KV cache, closed by `end_of_turn_ids`."""
        ids = []
        for m in _checked(list(messages)):
            ids += self._message(m)
        return ids + self._render(self.format.generation_prompt)

    def _message(self, m: dict) -> list[int]:
        return self._render(self.format.message, role=self.format.roles.get(m["role"], m["role"]),
                            content=m["content"])

    def _render(self, parts: tuple[str, ...], **fields: str) -> list[int]:
        ids: list[int] = []
        for part in parts:
            if part in self.tok.special_tokens:
                ids.append(self.tok.special_tokens[part])
            elif part.startswith("<|") and part.endswith("|>"):
                raise Llama3Error(f"{self.tok.name}: the {self.name} chat format needs special token "
                                  f"{part}, which this tokenizer does not have")
            else:
                ids += self.tok.encode(part.format(**fields), bos=False)
        return ids


def chat_format_for(tok: Tokenizer) -> Chat:
    """The chat format of the checkpoint this tokenizer belongs to, bound to the tokenizer."""
    if "<|start_header_id|>" in tok.special_tokens:
        return Chat(tok, LLAMA3)
    if "<|im_start|>" in tok.special_tokens:
        found = _LITERAL_SYSTEM.search(tok.chat_template or "")
        system = found.group(1).replace("\\n", "\n") if found else None
        return Chat(tok, replace(CHATML, default_system=system))
    raise Llama3Error(f"{tok.name}: no chat format known for this tokenizer (it has neither "
                      "<|start_header_id|> nor <|im_start|>); use plain generation instead")


def _checked(messages: list[dict]) -> list[dict]:
    for n, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise Llama3Error(f"chat message {n}: expected {{\"role\": str, \"content\": str}}, got {m!r:.80}")
    return list(messages)
