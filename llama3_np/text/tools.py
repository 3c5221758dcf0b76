"""Tool calls as Llama 3.1, 3.2 and 3.3 write them: tool definitions in, a model's answer parsed
into a call.

Tool definitions are JSON, one object per tool in OpenAI's and `transformers`' form
(`{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}`);
a chat template places them where its model expects them (`TemplateFormat.tools`).

A model's answer is a call when it reads as one of the forms Meta's reference decodes
(`llama_models.llama3.chat_format.ChatFormat.decode_assistant_message_from_content`,
llama-models 0.3.0), tried in this order:
- `<function=NAME>{JSON arguments}` (3.1's function-tag form);
- a JSON object with a "name" (3.1's JSON form: `{"name": ..., "parameters": {...}}`), with or
  without `<|python_tag|>` before it;
- a Python list of calls with keyword arguments, `[get_weather(city="Paris")]` (3.2's pythonic
  form; the first call is the one taken, as Meta's reference takes it);
- a built-in tool, `brave_search.call(query="...")` (3.1);
- anything else after `<|python_tag|>`: code for `code_interpreter`.
A custom call that names a built-in tool becomes that tool with its first argument as the query.
Python is parsed, never run: `ast.parse` and `ast.literal_eval` only.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import Llama3Error
from ..files import read_json

# Meta's built-in tools (`llama_models.datatypes.BuiltinTool`).
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")

_FUNCTION_TAG = re.compile(r"<function=(?P<name>[^}]+)>(?P<args>{.*?})")
_BUILTIN_CALL = re.compile(r'\b(?P<name>\w+)\.call\(query="(?P<query>[^"]*)"\)')


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


def parse_tool_call(content: str) -> Optional[ToolCall]:
    """The call a model's answer makes (its text, special tokens by name), or None when it makes none."""
    content = content.strip(" ")
    python_tag = content.startswith("<|python_tag|>")
    content = content.removeprefix("<|python_tag|>")
    for end in ("<|eot_id|>", "<|eom_id|>"):
        content = content.removesuffix(end)
    call = _custom_call(content)
    if call is not None:
        if call.name in BUILTIN_TOOLS and call.arguments:
            return ToolCall(call.name, {"query": next(iter(call.arguments.values()))})
        return call
    found = _BUILTIN_CALL.search(content)
    if found:
        return ToolCall(found.group("name"), {"query": found.group("query")})
    return ToolCall("code_interpreter", {"code": content}) if python_tag else None


def tool_calls_expected(fmt, answer: str) -> bool:
    """Whether to read `answer` (its text, special tokens by name) as a possible tool call: the
    chat format offers tools (definitions, or a template's `builtin_tools`), or the model began
    its answer with <|python_tag|> or ended it with <|eom_id|>, as Llama 3.1 does for a call."""
    offered = getattr(fmt, "tools", None) is not None or "builtin_tools" in getattr(fmt, "variables", {})
    answer = answer.strip(" ")
    return offered or answer.startswith("<|python_tag|>") or answer.endswith("<|eom_id|>")


def _custom_call(content: str) -> Optional[ToolCall]:
    tag = _FUNCTION_TAG.search(content)
    if tag:
        try:
            return ToolCall(tag.group("name"), json.loads(tag.group("args").replace("'", '"')))
        except ValueError:
            return None
    try:
        obj = json.loads(content)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        if isinstance(obj.get("name"), str) and isinstance(obj.get("parameters", {}), dict):
            return ToolCall(obj["name"], obj.get("parameters", {}))
        return None
    calls = _python_calls(content)
    return calls[0] if calls else None


def _python_calls(content: str) -> list[ToolCall]:
    """`[f(a=1), g(b="x")]` as calls; [] when the text is not a list of calls with keyword arguments."""
    try:
        tree = ast.parse(content)
    except (SyntaxError, ValueError):
        return []
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr) or not isinstance(tree.body[0].value, ast.List):
        return []
    calls = []
    for node in tree.body[0].value.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args):
            return []
        try:
            calls.append(ToolCall(node.func.id, {k.arg: ast.literal_eval(k.value) for k in node.keywords}))
        except ValueError:
            return []
    return calls


def meta_tool_call(call: dict, fmt: str = "llama3") -> tuple[str, str]:
    """(tool name, text) of a tool call in a dialog (`{"type": "function", "function": {"name",
    "arguments"}}`, arguments a dict) as Meta's ChatFormat writes it in an assistant message
    (`ToolUtils.encode_tool_call`, its default JSON tool format): a built-in search as
    `brave_search.call(query="...")`, code_interpreter's code as it is, any other tool as
    `{"type": "function", "name": ..., "parameters": {...}}`.

    Raises Llama3Error for a call of another shape."""
    spec = call.get("function", call) if isinstance(call, dict) else None
    if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("arguments"), dict)):
        raise Llama3Error(f"a tool call must be {{\"function\": {{\"name\": str, \"arguments\": {{...}}}}}}, "
                          f"got {json.dumps(call)[:80]}")
    name, arguments = spec["name"], spec["arguments"]
    if fmt != "llama3":
        raise Llama3Error(f"the {fmt} chat format has no way to write a tool call; use the checkpoint's template")
    if name in ("brave_search", "wolfram_alpha", "photogen"):
        return name, f'{name}.call(query="{arguments.get("query", "")}")'
    if name == "code_interpreter":
        return name, str(arguments.get("code", ""))
    return name, json.dumps({"type": "function", "name": name, "parameters": arguments})


def read_tools(path: str | Path) -> list[dict]:
    """Tool definitions from a JSON file: a list of objects, each naming its function
    (`{"type": "function", "function": {"name": ...}}`, or `{"name": ...}`).

    Raises Llama3Error, naming the file and the entry, when it is not such a list."""
    path = Path(path)
    tools = read_json(path, "tools file")
    if not isinstance(tools, list) or not tools:
        raise Llama3Error(f"tools file {path}: expected a JSON list of tool definitions, "
                          '[{"type": "function", "function": {"name": ..., "parameters": {...}}}, ...]')
    for n, tool in enumerate(tools):
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and spec["name"]):
            raise Llama3Error(f"tools file {path}: entry {n} is not a tool definition with a name "
                              f'({{"type": "function", "function": {{"name": ...}}}}), got {json.dumps(tool)[:60]}')
    return tools
