"""Chat formats as data: how a dialog becomes token ids, and which tokens may close a message.

A format is a few sequences of parts. A part that names one of the tokenizer's special tokens
becomes that token's id; any other part is text, filled in (`{role}`, `{content}`) and encoded on
its own, as plain text: a user who types `<|eot_id|>` gets those characters, never the token.
Where the parts are cut decides the ids: Meta's `ChatFormat` encodes the header's "\\n\\n" and the
content separately; a Hugging Face chat template renders role, newline and content as one text.

A checkpoint that carries a chat template (a Hugging Face folder, a GGUF) is rendered by it
(`TemplateFormat`, `llama3_np.text.template`), as `transformers` and llama.cpp render it; one that
carries none (a Meta folder) uses the built-in format of its vocabulary: Llama 3 (Meta's
`ChatFormat`) when the tokenizer has `<|start_header_id|>`, ChatML (`<|im_start|>`) otherwise.
`CHAT_FORMATS` names the choices (`chat_format_for`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from ..errors import Llama3Error, ParameterError
from .template import ChatTemplate, encode_rendered
from .tools import meta_tool_call
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


@dataclass(frozen=True)
class TemplateFormat:
    """A checkpoint's Jinja chat template, the variables it is rendered with (`bos_token`,
    `eos_token`, and what the user adds: `date_string`, `builtin_tools`, ...) and the tool
    definitions it places (`text.tools`; None: no tools)."""
    template: ChatTemplate
    variables: dict = field(default_factory=dict)
    tools: list | None = None
    name: str = "template"


# The choices of chat format by name: the checkpoint's template, Meta's ChatFormat, ChatML.
CHAT_FORMATS = ("template", "llama3", "chatml")


def chat_format_for(tok: Tokenizer, choice: str | None = None, template: ChatTemplate | None = None,
                    variables: dict | None = None, tools: list | None = None) -> ChatFormat | TemplateFormat:
    """The chat format named `choice` (one of CHAT_FORMATS), for this tokenizer and the checkpoint's
    chat `template` (None: it has none). Without a choice: the template when there is one, else
    the built-in format of the vocabulary (Llama 3 when it has <|start_header_id|>, else ChatML).
    `tools`: tool definitions (`text.tools.read_tools`), which a template places in the prompt.

    Raises ParameterError("chat_format") for an unknown choice or one this checkpoint cannot use,
    ParameterError("tools") for tools with a built-in format or a template that never reads `tools`.
    """
    if choice is not None and choice not in CHAT_FORMATS:
        raise ParameterError("chat_format", f"chat format must be one of {', '.join(CHAT_FORMATS)}, got {choice!r}")
    if choice == "template" or (choice is None and template is not None):
        if template is None:
            raise ParameterError("chat_format", f"{tok.name}: this checkpoint carries no chat template; give "
                                                "one as a file, or choose llama3 or chatml")
        if tools is not None and not template.reads("tools"):
            raise ParameterError("tools", f"{template.origin}: this chat template never reads `tools`, so the tool "
                                          "definitions would not reach the prompt: give a chat template that places them, "
                                          "or describe the tools in the system message")
        return TemplateFormat(template, dict(variables or {}), list(tools) if tools is not None else None)
    if tools is not None:
        raise ParameterError("tools", "tool definitions are placed in the prompt by a chat template; the built-in "
                                      "formats (Meta's ChatFormat, ChatML) leave that to the system message")
    llama3 = "<|start_header_id|>" in tok.special_tokens
    if choice == "llama3" or (choice is None and llama3):
        if not llama3:
            raise ParameterError("chat_format", f"{tok.name}: the llama3 chat format needs a Llama 3 vocabulary "
                                                "(<|start_header_id|>), which this tokenizer does not have")
        return LLAMA3
    if "<|im_start|>" in tok.special_tokens:
        found = _LITERAL_SYSTEM.search(template.source if template is not None else tok.chat_template or "")
        return replace(CHATML, default_system=found.group(1).replace("\\n", "\n")) if found else CHATML
    if choice == "chatml":
        raise ParameterError("chat_format", f"{tok.name}: the chatml chat format needs <|im_start|>, which this "
                                            "tokenizer does not have")
    raise Llama3Error(f"{tok.name}: no chat format known for this tokenizer (it has neither "
                      "<|start_header_id|> nor <|im_start|>, and no chat template); use plain generation instead")


def describe(fmt: ChatFormat | TemplateFormat) -> str:
    """The chat format in words, with where a template came from."""
    if isinstance(fmt, TemplateFormat):
        return f"template ({fmt.template.origin})"
    return {"llama3": "llama3 (Meta's ChatFormat)", "chatml": "chatml (built in)"}.get(fmt.name, fmt.name)


def encode_dialog(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                  fmt: ChatFormat | TemplateFormat | None = None, tools: list | None = None) -> list[int]:
    """Token ids of a whole dialog (a list of {"role", "content"}), ending with the assistant's
    header when `add_generation_prompt`."""
    fmt = fmt or chat_format_for(tok)
    if isinstance(fmt, TemplateFormat):
        return encode_rendered(tok, fmt.template, _checked(messages, fmt), add_generation_prompt,
                               fmt.tools if tools is None else tools, fmt.variables)
    messages = _checked(messages)
    if fmt.default_system is not None and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": fmt.default_system}] + messages
    ids = _render(tok, fmt.begin)
    for m in messages:
        ids += _message(tok, fmt, m)
    return ids + (_render(tok, fmt.generation_prompt) if add_generation_prompt else [])


def _message(tok: Tokenizer, fmt: ChatFormat, m: dict) -> list[int]:
    """One message's ids. An assistant's tool calls follow its content as Meta's ChatFormat writes
    them (`text.tools.meta_tool_call`), after <|python_tag|> when the first is code_interpreter."""
    parts, content = fmt.message, m.get("content") or ""
    calls = m.get("tool_calls") or []
    if calls:
        calls = [meta_tool_call(c, fmt.name) for c in calls]
        content += "".join(text for _, text in calls)
        if calls[0][0] == "code_interpreter":
            at = parts.index("{content}")
            parts = parts[:at] + ("<|python_tag|>",) + parts[at:]
    return _render(tok, parts, role=fmt.roles.get(m["role"], m["role"]), content=content)


def encode_turn(tok: Tokenizer, messages: list[dict], fmt: ChatFormat | TemplateFormat | None = None,
                reply_end: int | None = None, history: list[dict] | None = None,
                tools: list | None = None) -> list[int] | None:
    """Ids that continue a dialog after the assistant's reply: the end of that reply, the new
    messages and the next assistant header. The reply's own ids are already in the cache, so
    earlier turns are not encoded again.

    A template is rendered for the whole dialog (`history`, which ends with the reply, then
    `messages`; without a history, one empty exchange stands for it): the continuation is what
    follows the reply's text, when the dialog before the reply renders as it did before. When it
    does not (a template that rewrites earlier turns), the result is None: the whole dialog must
    be encoded again (`encode_dialog`).

    `reply_end` is the token that ended the reply, if a stop token did: when it is the format's
    end of a message or one of its `reply_ends` (Llama 3: <|eot_id|>, <|eom_id|>), the dialog keeps
    it. A reply that ended any other way (a length limit, an interruption, <|end_of_text|>) is
    closed with the format's usual end, as Meta's ChatFormat closes a reply whose stop reason is
    out_of_tokens.
    """
    fmt = fmt or chat_format_for(tok)
    if isinstance(fmt, TemplateFormat):
        return _template_turn(tok, fmt, _checked(history or [], fmt), _checked(messages, fmt), reply_end, tools)
    content_at = next(i for i, part in enumerate(fmt.message) if "{content}" in part)
    ids = _render(tok, fmt.message[content_at + 1:])  # [the usual end of a message, ...]
    if reply_end is not None and reply_end in _special_ids(tok, (fmt.message[content_at + 1],) + fmt.reply_ends):
        ids[0] = reply_end
    for m in _checked(messages):
        ids += _message(tok, fmt, m)
    return ids + _render(tok, fmt.generation_prompt)


# The dialog a template's turn is cut from when the caller gives none: one exchange before it.
_STAND_IN = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]


def _template_turn(tok: Tokenizer, fmt: TemplateFormat, history: list[dict], messages: list[dict],
                   reply_end: int | None, tools: list | None) -> list[int] | None:
    history = history or _STAND_IN
    if history[-1]["role"] != "assistant":
        return None
    fed = encode_dialog(tok, history[:-1], True, fmt, tools)
    whole = encode_dialog(tok, history + messages, True, fmt, tools)
    if whole[:len(fed)] != fed:
        return None
    # The reply's text is in the cache as the model drew it; what follows starts at the first
    # special token after it (its end of turn).
    end = next((k for k in range(len(fed), len(whole)) if whole[k] in tok.special_ids), None)
    if end is None:
        return None
    rest = whole[end:]
    if reply_end is not None and reply_end in _special_ids(tok, LLAMA3.reply_ends):
        rest[0] = reply_end  # as Meta's ChatFormat keeps a reply's <|eom_id|>
    return rest


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


def _checked(messages: list[dict], fmt: ChatFormat | TemplateFormat | None = None) -> list[dict]:
    """The messages, each a dict with a "role" and a text "content"; a template, which decides
    for itself what it reads, also takes other content (a tool's result as JSON) and tool calls."""
    template = isinstance(fmt, TemplateFormat)
    for n, m in enumerate(messages):
        calls = isinstance(m, dict) and m.get("role") == "assistant" and "tool_calls" in m
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and (isinstance(m.get("content"), str) or calls and m.get("content") is None
                     or template and "content" in m)):
            raise Llama3Error(f"chat message {n}: expected {{\"role\": str, \"content\": str}}, got {m!r:.80}")
    return list(messages)
