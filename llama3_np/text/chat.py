"""Chat formats as data: how a dialog becomes token ids, and which tokens may close a message.

A format is a few sequences of parts. A part that names one of the tokenizer's special tokens
becomes that token's id; any other part is text, filled in (`{role}`, `{content}`) and encoded on
its own, as plain text: a user who types `<|eot_id|>` gets those characters, never the token.
Where the parts are cut decides the ids: Meta's `ChatFormat` encodes the header's "\\n\\n" and the
content separately; a Hugging Face chat template renders role, newline and content as one text.

The checkpoint decides the format (`chat_format_for`): Llama 3 when the tokenizer has
`<|start_header_id|>`, ChatML (`<|im_start|>`, the default model) otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from ..errors import Llama3Error
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class ChatFormat:
    name: str
    begin: tuple[str, ...]              # before the first message
    message: tuple[str, ...]            # one message, with "{role}" and "{content}" to fill in
    generation_prompt: tuple[str, ...]  # opens the assistant's reply
    # Special tokens that may close an assistant's reply in place of the one `message` ends with:
    # when the model ends its reply with one of these, the dialog keeps it.
    reply_ends: tuple[str, ...] = ()
    roles: dict[str, str] = field(default_factory=dict)  # role names the format spells differently
    default_system: str | None = None   # the system message of a dialog that brings none


# Meta's `llama_models.llama3.chat_format.ChatFormat`.
LLAMA3 = ChatFormat(
    name="llama3",
    begin=("<|begin_of_text|>",),
    message=("<|start_header_id|>", "{role}", "<|end_header_id|>", "\n\n", "{content}", "<|eot_id|>"),
    generation_prompt=("<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n"),
    # Meta's ChatFormat closes a reply whose stop reason is end_of_message (the model produced
    # <|eom_id|>, as after a tool call) with <|eom_id|>, every other reply with <|eot_id|>.
    reply_ends=("<|eom_id|>",),
    roles={"tool": "ipython"},
)

# `<|im_start|>role\ncontent<|im_end|>\n`, as Hugging Face chat templates render it.
CHATML = ChatFormat(
    name="chatml",
    begin=(),
    message=("<|im_start|>", "{role}\n{content}", "<|im_end|>", "\n"),
    generation_prompt=("<|im_start|>", "assistant\n"),
)

# A chat template that writes a fixed system message (when the dialog has none) holds it as a
# literal `<|im_start|>system\n...<|im_end|>`; the newline may be written as an escape.
_LITERAL_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>")


def chat_format_for(tok: Tokenizer) -> ChatFormat:
    """The chat format of the checkpoint this tokenizer belongs to."""
    if "<|start_header_id|>" in tok.special_tokens:
        return LLAMA3
    if "<|im_start|>" in tok.special_tokens:
        found = _LITERAL_SYSTEM.search(tok.chat_template or "")
        return replace(CHATML, default_system=found.group(1).replace("\\n", "\n")) if found else CHATML
    raise Llama3Error(f"{tok.name}: no chat format known for this tokenizer (it has neither "
                      "<|start_header_id|> nor <|im_start|>); use plain generation instead")


def encode_dialog(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                  fmt: ChatFormat | None = None) -> list[int]:
    """Token ids of a whole dialog (a list of {"role", "content"}), ending with the assistant's
    header when `add_generation_prompt`."""
    fmt = fmt or chat_format_for(tok)
    messages = _checked(messages)
    if fmt.default_system is not None and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": fmt.default_system}] + messages
    ids = _render(tok, fmt.begin)
    for m in messages:
        ids += _render(tok, fmt.message, role=fmt.roles.get(m["role"], m["role"]), content=m["content"])
    return ids + (_render(tok, fmt.generation_prompt) if add_generation_prompt else [])


def encode_turn(tok: Tokenizer, messages: list[dict], fmt: ChatFormat | None = None,
                reply_end: int | None = None) -> list[int]:
    """Ids that continue a dialog after the assistant's reply: the end of that reply, the new
    messages and the next assistant header. The reply's own ids are already in the cache, so
    earlier turns are not encoded again.

    `reply_end` is the token that ended the reply, if a stop token did: when it is the format's
    end of a message or one of its `reply_ends` (Llama 3: <|eot_id|>, <|eom_id|>), the dialog keeps
    it. A reply that ended any other way (a length limit, an interruption, <|end_of_text|>) is
    closed with the format's usual end, as Meta's ChatFormat closes a reply whose stop reason is
    out_of_tokens.
    """
    fmt = fmt or chat_format_for(tok)
    content_at = next(i for i, part in enumerate(fmt.message) if "{content}" in part)
    ids = _render(tok, fmt.message[content_at + 1:])  # [the usual end of a message, ...]
    if reply_end is not None and reply_end in _special_ids(tok, (fmt.message[content_at + 1],) + fmt.reply_ends):
        ids[0] = reply_end
    for m in _checked(messages):
        ids += _render(tok, fmt.message, role=fmt.roles.get(m["role"], m["role"]), content=m["content"])
    return ids + _render(tok, fmt.generation_prompt)


def _special_ids(tok: Tokenizer, names: tuple[str, ...]) -> set[int]:
    return {tok.special_tokens[name] for name in names if name in tok.special_tokens}


def _render(tok: Tokenizer, parts: tuple[str, ...], **fields: str) -> list[int]:
    ids: list[int] = []
    for part in parts:
        if part in tok.special_tokens:
            ids.append(tok.special_tokens[part])
        elif part.startswith("<|") and part.endswith("|>"):
            raise Llama3Error(f"{tok.name}: the chat format needs special token {part}, which this "
                              "tokenizer does not have")
        else:
            ids += tok.encode(part.format(**fields), bos=False)
    return ids


def _checked(messages: list[dict]) -> list[dict]:
    for n, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise Llama3Error(f"chat message {n}: expected {{\"role\": str, \"content\": str}}, got {m!r:.80}")
    return list(messages)
