"""A checkpoint's chat template, rendered as Hugging Face `transformers` renders it.

A Hugging Face checkpoint carries its chat format as a Jinja template (`tokenizer_config.json`'s
`chat_template`, or `chat_template.jinja`), and so does a GGUF (`tokenizer.chat_template`).
`transformers`' `apply_chat_template` (5.x, `utils/chat_template_utils.py`) renders it in Jinja2's
immutable sandbox with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, its own
`tojson` filter (`json.dumps`, `ensure_ascii=False`) and the globals `raise_exception` and
`strftime_now`; the variables are `messages`, `tools`, `documents`, `add_generation_prompt`, the
tokenizer's special tokens by role (`bos_token`, `eos_token`, ...) and any keyword the caller adds
(`date_string`, `builtin_tools`, `tools_in_user_message` for Llama 3.1). The rendered text is
then tokenized with every added token recognised in it (`add_special_tokens=False`). `ChatTemplate`
does the same, so its ids equal `apply_chat_template`'s (tests/fixtures/chat/).

One difference, on purpose: `transformers` tokenizes the rendered text as a whole, so a message
that contains `<|eot_id|>` ends the turn there. llama3_np renders the messages with every special
token's text in them replaced by a marker, and after tokenizing puts the text back as plain text:
a user who types `<|eot_id|>` gets those characters, as with Meta's `ChatFormat`.

Jinja2 is an optional dependency (the `templates` extra), imported when a template is first
rendered; a template is never given anything but data, and the sandbox lets it call no Python.
"""

from __future__ import annotations

import json
import re
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from ..errors import Llama3Error
from ..files import read_json
from .tokenizer import Tokenizer

# Where a checkpoint folder's chat template is looked for, in this order (transformers 5.x reads
# `chat_template.jinja` before the template inside tokenizer_config.json).
TEMPLATE_FILES = ("chat_template.jinja", "tokenizer_config.json")

INSTALL_HINT = "pip install 'llama3_np[templates]'"


class ChatTemplate:
    """A Jinja chat template (`source`) and where it came from (`origin`, named in errors)."""

    def __init__(self, source: str, origin: str):
        self.source, self.origin = source, origin
        self._compiled = None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: Optional[list] = None,
               **variables: Any) -> str:
        """The template's text for `messages` (dicts with "role", "content" and, for a tool call,
        "tool_calls"), as `apply_chat_template(messages, tools=tools, add_generation_prompt=...,
        tokenize=False, **variables)` renders it; `variables` also carries the tokenizer's
        special tokens (`bos_token`, ...), see `template_variables`.

        Raises Llama3Error naming the template's line when it fails to render (its own
        `raise_exception`, an undefined variable, a type error) and when Jinja2 is not installed.
        """
        template = self._template()
        try:
            return template.render(messages=messages, tools=tools, documents=None,
                                   add_generation_prompt=add_generation_prompt, **variables)
        except Exception as e:  # the template's own errors, whatever their type
            lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == "<template>"]
            where = f" at line {lines[-1]}" if lines else ""
            raise Llama3Error(f"{self.origin}: the chat template fails{where}: {e} (fix the dialog or the "
                              "template, or choose a built-in chat format: llama3, chatml)") from None

    def reads(self, name: str) -> bool:
        """Whether the template reads the variable `name` (for example `tools`) anywhere, found by
        Jinja2's own analysis of the source (`jinja2.meta.find_undeclared_variables`)."""
        import jinja2.meta

        return name in jinja2.meta.find_undeclared_variables(self._template().environment.parse(self.source))

    def _template(self):
        if self._compiled is None:
            try:
                import jinja2
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:
                raise Llama3Error(f"{self.origin}: rendering the chat template needs Jinja2: {INSTALL_HINT} "
                                  "(or choose a built-in chat format: llama3, chatml)") from None

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._compiled = env.from_string(self.source)
            except jinja2.exceptions.TemplateSyntaxError as e:
                raise Llama3Error(f"{self.origin}: the chat template is not valid Jinja at line {e.lineno}: "
                                  f"{e.message}") from None
        return self._compiled

    def __repr__(self):
        return f"ChatTemplate({self.origin!r})"


def template_variables(tok: Tokenizer, directory: Path) -> dict[str, str]:
    """The special tokens a template may name (`bos_token`, `eos_token`, `unk_token`, `pad_token`),
    as `transformers` passes them: those the folder's tokenizer_config.json names, else the
    tokenizer's own BOS and EOS."""
    path = Path(directory) / "tokenizer_config.json"
    config = read_json_object(path) if path.is_file() else {}
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    for key, token_id in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
        if key not in out and token_id is not None:
            out[key] = tok.decode([token_id])
    return out


def find_chat_template(directory: Path, tools: bool = False) -> Optional[ChatTemplate]:
    """The chat template of a checkpoint folder (the first of `TEMPLATE_FILES` that has one), or
    None. tokenizer_config.json may hold a list of named templates: "tool_use" when `tools`,
    else "default", as transformers chooses."""
    directory = Path(directory)
    for name in TEMPLATE_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if path.suffix == ".jinja":
            return ChatTemplate(_read_text(path), str(path))
        found = read_json_object(path).get("chat_template")
        if isinstance(found, list):
            named = {t.get("name"): t.get("template") for t in found if isinstance(t, dict)}
            found = named.get("tool_use") if tools and "tool_use" in named else named.get("default")
        if isinstance(found, str):
            return ChatTemplate(found, str(path))
    return None


def read_template_file(path: str | Path) -> ChatTemplate:
    """A chat template from a Jinja file."""
    return ChatTemplate(_read_text(Path(path)), str(path))


def read_json_object(path: Path) -> dict:
    return read_json(path, advice="the file is damaged", expect=dict)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise Llama3Error(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise Llama3Error(f"{path}: not UTF-8 text") from None


# -- from rendered text to ids ---------------------------------------------------------------------

def encode_rendered(tok: Tokenizer, template: ChatTemplate, messages: list[dict], add_generation_prompt: bool,
                    tools: Optional[list], variables: dict) -> list[int]:
    """Ids of the template rendered for `messages`: its special tokens' texts become their ids, the
    rest is encoded as plain text (see the module docstring for the text inside messages)."""
    names = sorted(tok.special_tokens, key=len, reverse=True)
    marker = _unused_character(template.source, messages, tools, variables)
    shield = re.compile("|".join(map(re.escape, names))) if names else None

    def hide(value):
        if isinstance(value, str):
            return shield.sub(lambda m: f"{marker}{names.index(m.group())}{marker}", value) if shield else value
        if isinstance(value, dict):
            return {k: hide(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [hide(v) for v in value]
        return value

    text = template.render(hide(messages), add_generation_prompt, hide(tools), **variables)
    unhide = re.compile(f"{marker}([0-9]+){marker}")
    ids = []
    for piece, special in tok.split_special(text):
        if special is not None:
            ids.append(special)
        else:
            ids += tok.encode(unhide.sub(lambda m: names[int(m.group(1))], piece), bos=False)
    return ids


def _unused_character(*values) -> str:
    """A private-use character that none of `values` (strings, nested in dicts and lists) holds."""
    seen = set()

    def collect(value):
        if isinstance(value, str):
            seen.update(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                collect(k), collect(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                collect(v)

    for v in values:
        collect(v)
    return next(chr(c) for c in range(0xF0000, 0x110000) if chr(c) not in seen)
