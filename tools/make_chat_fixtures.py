"""Write the chat-template reference fixtures under tests/fixtures/chat/.

    python tools/make_chat_fixtures.py [--llama-cpp-source DIR]     (needs `make tools`)

- templates/: Meta's Llama 3.1 8B, 3.2 3B and 3.3 70B Instruct chat templates as llama.cpp keeps
  them (`models/templates/meta-llama-Llama-3.*-Instruct.jinja` in the llama-cpp-python sdist,
  downloaded with pip unless --llama-cpp-source names its vendor/llama.cpp folder), and the
  default model's ChatML template (its GGUF's `tokenizer.chat_template`).
- dialogs.json: the dialogs (messages, tool definitions, the template variables they are
  rendered with).
- reference.json: for each template and dialog, the ids of `transformers`' `apply_chat_template`
  (the Llama 3 templates with the Llama 3 tokenizer.model converted by transformers'
  `TikTokenConverter`; ChatML with the default model's tokenizer.json) or the error it raised;
  and Meta's `ChatFormat.encode_dialog_prompt` (llama-models) for the dialogs it can encode;
  and Meta's `ChatFormat.decode_assistant_message_from_content` on model answers in each
  published form of a tool call (the call it finds, or none).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import re
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

from tool_support import REPO as ROOT, run_tool  # first: it makes this checkout's llama3_np importable
from fetch_tokenizer import LLAMA3_TOKENIZER, fetch_llama3_tokenizer

from llama3_np.assets import default_model
from llama3_np.text.tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS

OUT = ROOT / "tests" / "fixtures" / "chat"
LLAMA3_TEMPLATES = {name: f"meta-llama-{name}-Instruct.jinja"
                    for name in ("Llama-3.1-8B", "Llama-3.2-3B", "Llama-3.3-70B")}
CHATML_TEMPLATE = "SmolLM2-135M-Instruct.jinja"

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city's name, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
CALL = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
    "name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]}
SEARCH = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
    "name": "brave_search", "arguments": {"query": "weather in Paris"}}}]}
DATE = {"date_string": "26 Jul 2024"}

# name, messages, tools, variables
DIALOGS = [
    ("user only", [{"role": "user", "content": "Hi"}], None, DATE),
    ("system and user", [SYSTEM, {"role": "user", "content": "What is 6*7?"}], None, DATE),
    ("multi-turn", [SYSTEM, {"role": "user", "content": "What is 6*7?"}, {"role": "assistant", "content": "42."},
                    {"role": "user", "content": "And 6*8?"}], None, {"date_string": "05 Dec 2026"}),
    ("empty messages", [{"role": "system", "content": ""}, {"role": "user", "content": ""},
                        {"role": "assistant", "content": ""}, {"role": "user", "content": "Say something."}], None, DATE),
    ("whitespace at the edges", [{"role": "system", "content": "\n  Be brief. \n"},
                                 {"role": "user", "content": "  padded\t\n"},
                                 {"role": "assistant", "content": " ok \n\n"}, {"role": "user", "content": "\n"}],
     None, DATE),
    ("unicode and digits", [{"role": "user", "content": "Café 1234567 ½ 🙂 — 日本語"}], None, DATE),
    ("tool result", [SYSTEM, {"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": "Let me look."},
                     {"role": "tool", "content": '{"temperature": 21, "unit": "celsius"}'}], None, DATE),
    ("ipython result", [{"role": "user", "content": "Run it."}, {"role": "ipython", "content": "stdout: 42\n"}],
     None, DATE),
    ("custom tools in the user message", [SYSTEM, {"role": "user", "content": "Weather in Paris?"}], [WEATHER], DATE),
    ("custom tools in the system message", [{"role": "user", "content": "Weather in Paris?"}], [WEATHER],
     dict(DATE, tools_in_user_message=False)),
    ("tool call and result", [{"role": "user", "content": "Weather in Paris?"}, CALL,
                              {"role": "tool", "content": {"temperature": 21}},
                              {"role": "assistant", "content": "21 degrees."}, {"role": "user", "content": "Thanks"}],
     [WEATHER], DATE),
    ("builtin tools", [SYSTEM, {"role": "user", "content": "Search the weather in Paris."}, SEARCH,
                       {"role": "ipython", "content": "Sunny, 21 C"}], None,
     dict(DATE, builtin_tools=["brave_search", "wolfram_alpha", "code_interpreter"])),
    ("tools without a user message", [SYSTEM], [WEATHER], DATE),
    ("custom tool call, text result", [{"role": "user", "content": "Weather in Paris?"}, CALL,
                                       {"role": "tool", "content": "21 C"}, {"role": "assistant", "content": "21."}],
     [WEATHER], DATE),
    ("code interpreter call", [{"role": "user", "content": "What is 6*7? Use Python."},
                               {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                                   "name": "code_interpreter", "arguments": {"code": "print(6*7)"}}}]},
                               {"role": "ipython", "content": "42"}], None, DATE),
]


# Model answers, in each published form of a tool call and a few that are not calls.
ANSWERS = [
    '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>',
    '{"type": "function", "name": "get_weather", "parameters": {"city": "Nice"}}<|eot_id|>',
    '<function=get_weather>{"city": "Paris"}</function>',
    "<function=get_weather>{'city': 'Rome'}</function>",
    '[get_weather(city="Paris", unit="celsius")]',
    '[get_weather(city="Paris"), get_time(zone="CET")]',
    '[get_forecast(days=3, cities=["Paris", "Rome"], detail={"hourly": True})]',
    '<|python_tag|>brave_search.call(query="weather in Paris")<|eom_id|>',
    'wolfram_alpha.call(query="integral of x^2")',
    '<|python_tag|>import math\nprint(math.pi)',
    '{"name": "brave_search", "parameters": {"query": "news"}}',
    "The weather in Paris is sunny.",
    '{"answer": 42}',
    "[1, 2, 3]",
    "[print('hi')]",
    '  <|python_tag|>[get_weather(city="Oslo")]<|eot_id|>',
]


def meta_tool_calls() -> list:
    """Meta's decoding of each answer: the call's tool name and arguments, or None."""
    from llama_models.datatypes import StopReason
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    fmt = ChatFormat(Tokenizer(Path(LLAMA3_TOKENIZER)))
    out = []
    for answer in ANSWERS:
        message = fmt.decode_assistant_message_from_content(answer, StopReason.end_of_turn)
        call = message.tool_calls[0] if message.tool_calls else None
        name = getattr(call.tool_name, "value", call.tool_name) if call else None
        out.append({"answer": answer, "call": {"name": name, "arguments": call.arguments} if call else None})
    return out


def llama_cpp_templates(source: Path | None) -> Path:
    """vendor/llama.cpp/models/templates of the llama-cpp-python sdist of the installed version."""
    if source is not None:
        return source / "models" / "templates"
    tmp = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={version('llama-cpp-python')}", "-d", str(tmp)], check=True)
    (sdist,) = tmp.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/models/templates/meta-llama-Llama-3." in m.name]
        tar.extractall(tmp, members=members, filter="data")
    return next(tmp.glob("llama_cpp_python-*/vendor/llama.cpp/models/templates"))


def llama3_hf_tokenizer():
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converted = TikTokenConverter(vocab_file=str(LLAMA3_TOKENIZER), pattern=LLAMA3_PATTERN,
                                  extra_special_tokens=LLAMA3_SPECIAL_TOKENS).converted()
    return PreTrainedTokenizerFast(tokenizer_object=converted, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def default_hf_tokenizer():
    from transformers import PreTrainedTokenizerFast

    folder = default_model()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                   **{k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})


def apply(tokenizer, template: str, messages, tools, variables):
    try:
        ids = tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, add_generation_prompt=True,
                                            tokenize=True, return_dict=False, **variables)
    except Exception as e:  # the template's raise_exception, as a user would meet it
        return {"error": f"{type(e).__name__}: {e}"}
    return {"ids": list(ids), "text": tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=template, add_generation_prompt=True, tokenize=False, **variables)}


def meta_ids(messages) -> list[int] | None:
    """Meta's ChatFormat ids (its default JSON tool format), for dialogs whose messages it can hold:
    text content, tool calls as its ToolCall (None for the others)."""
    from llama_models.datatypes import BuiltinTool, RawMessage, ToolCall
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    if any(not isinstance(m.get("content", ""), str) for m in messages):
        return None
    builtin = {t.value: t for t in BuiltinTool}

    def calls(m):
        return [ToolCall(call_id=str(n), tool_name=builtin.get(c["function"]["name"], c["function"]["name"]),
                         arguments=c["function"]["arguments"]) for n, c in enumerate(m.get("tool_calls", []))]

    role = {"ipython": "tool"}
    raw = [RawMessage(role=role.get(m["role"], m["role"]), content=m.get("content", ""), tool_calls=calls(m))
           for m in messages]
    fmt = ChatFormat(Tokenizer(Path(LLAMA3_TOKENIZER)))
    return fmt.encode_dialog_prompt(raw).tokens


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-cpp-source", type=Path, metavar="DIR",
                   help="llama.cpp's source folder (default: downloaded with the installed llama-cpp-python's sdist)")
    args = p.parse_args()
    fetch_llama3_tokenizer()
    (OUT / "templates").mkdir(parents=True, exist_ok=True)
    found = llama_cpp_templates(args.llama_cpp_source)
    templates = {}
    for name, file in LLAMA3_TEMPLATES.items():
        shutil.copyfile(found / file, OUT / "templates" / file)
        templates[file] = (OUT / "templates" / file).read_text()
    chatml = json.loads((default_model() / "tokenizer_config.json").read_text())["chat_template"]
    (OUT / "templates" / CHATML_TEMPLATE).write_text(chatml)
    templates[CHATML_TEMPLATE] = chatml

    llama3, default = llama3_hf_tokenizer(), default_hf_tokenizer()
    dialogs = [{"name": n, "messages": m, "tools": t, "variables": v} for n, m, t, v in DIALOGS]
    reference = {"producer": f"transformers {version('transformers')} apply_chat_template, "
                             f"llama-models {version('llama-models')} ChatFormat",
                 "templates": {}, "meta": {}}
    for file, template in templates.items():
        tok = default if file == CHATML_TEMPLATE else llama3
        reference["templates"][file] = {d["name"]: apply(tok, template, d["messages"], d["tools"], d["variables"])
                                        for d in dialogs}
    reference["meta"] = {d["name"]: meta_ids(d["messages"]) for d in dialogs}
    reference["tool_calls"] = meta_tool_calls()
    for name, data in (("dialogs.json", {"dialogs": dialogs}), ("reference.json", reference)):
        text = json.dumps(data, ensure_ascii=False, indent=1)
        # Lists of ids on one line each (json.dumps puts every number on a line of its own).
        text = re.sub(r"\[\n\s*(-?[0-9]+(?:,\n\s*-?[0-9]+)*)\n\s*\]", lambda m: "[" + "".join(m.group(1).split()) + "]",
                      text)
        (OUT / name).write_text(text + "\n", encoding="utf-8")
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("make_chat_fixtures", main))
