"""The chat-format flags of `generate --chat` (and `chat`): which format, a template file and its
variables, tool definitions; and their mistakes, each one line and exit status 2."""

from __future__ import annotations

import json
import re

import pytest

from llama3_np.assets import default_model
from llama3_np.text.chat import encode_dialog
from llama3_np.text.dialog import Conversation
from llama3_np.text.tools import tool_calls_expected
from tests.cli.test_flags import run
from tests.text.test_template import CHAT, LLAMA3_TEMPLATES, template_format

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def test_verbose_prompt_names_the_format_and_the_ids_follow_it(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--chat", "-p", "Hi", "-n", "1", "--temp", "0", "--verbose-prompt")
    assert code == 0
    assert f"chat format: template ({default_model()}: tokenizer.chat_template)\nprompt: 31 tokens\n" in err
    code, _, err = run(capsys, "generate", "--chat", "-p", "Hi", "-n", "1", "--temp", "0", "--verbose-prompt",
                       "--chat-format", "chatml")
    assert "chat format: chatml (built in)\nprompt: 31 tokens\n" in err
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    code, _, err = run(capsys, "generate", "--chat", "-p", "Hi", "-n", "1", "--temp", "0", "--verbose-prompt",
                       "--chat-template-file", CHAT / "templates" / LLAMA3_TEMPLATES[0],
                       "--chat-template-kwargs", '{"date_string": "01 Jan 2025"}', "--tools", tmp_path / "tools.json")
    assert code == 0 and f"chat format: template ({CHAT / 'templates' / LLAMA3_TEMPLATES[0]})" in err
    pieces = "".join(line.split(" -> ", 1)[1][1:-1] for line in err.splitlines() if " -> " in line)
    assert "Today Date: 01 Jan 2025" in pieces and '"name": "get_weather"' in pieces


@pytest.mark.parametrize("argv, message", [
    (["--chat-format", "llama3"], "--chat-format: .* the llama3 chat format needs a Llama 3 vocabulary"),
    (["--chat-template-kwargs", "[1]"], "--chat-template-kwargs takes a JSON object"),
    (["--chat-template-file", "BAD"], "the chat template is not valid Jinja at line 2: "),
    (["--chat-template-file", "RAISE"], "the chat template fails at line 3: no user message"),
    (["--tools", "NOT_A_LIST"], "expected a JSON list of tool definitions"),
    (["--tools", "TOOLS", "--chat-format", "chatml"], "--tools: tool definitions are placed in the prompt by a "
                                                      "chat template"),
    # the default model's template has no tool section: the definitions would be dropped silently
    (["--tools", "TOOLS"], r"--tools: .*\.gguf: tokenizer\.chat_template: this chat template never reads `tools`"),
    (["--chat-template-file", "BAD", "--chat-format", "chatml"], "--chat-template-file goes with --chat-format "
                                                                 "template"),
])
def test_mistakes_are_one_line(capsys, tmp_path, argv, message):
    files = {"BAD": "{{ bos_token }}\n{% if %}", "RAISE": "{{ bos_token }}\n\n{{ raise_exception('no user message') }}",
             "NOT_A_LIST": '{"name": "f"}', "TOOLS": json.dumps(TOOLS)}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    argv = [str(tmp_path / a) if a in files else a for a in argv]
    code, out, err = run(capsys, "generate", "--chat", "-p", "Hi", "-n", "1", *argv)
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and re.search(message, err), err


def test_chat_flags_go_with_chat(capsys):
    code, _, err = run(capsys, "generate", "-p", "Hi", "--chat-format", "chatml")
    assert code == 2 and err == "llama3-np: error: --chat-format goes with --chat\n"


def test_a_tool_result_is_a_message_in_the_tool_role():
    """After an answer that called a tool, `chat` sends the next message in the tool role, which
    the Llama 3 templates and Meta's ChatFormat write under the ipython header."""
    tok, fmt = template_format(LLAMA3_TEMPLATES[0], {"date_string": "26 Jul 2024"})
    conv = Conversation(tok, fmt)
    conv.message_ids("Weather in Paris?")
    # The 3.1 template writes a tool's result through tojson, a text too (Jinja finds a string iterable).
    assert tok.decode(conv.message_ids("21 C", role="tool")) == (
        '<|start_header_id|>ipython<|end_header_id|>\n\n"21 C"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n')
    assert tool_calls_expected(fmt, "plain answer") is False
    assert tool_calls_expected(fmt, "<|python_tag|>brave_search.call(query=\"x\")<|eom_id|>")
    assert tool_calls_expected(template_format(LLAMA3_TEMPLATES[0], {"builtin_tools": ["brave_search"]})[1], "x")


def test_tool_definitions_in_the_first_user_message_stay_in_the_head():
    """The Llama 3 templates write the tool definitions into the first user message, which then
    encodes unlike later ones: it joins the head, which a full context never drops."""
    tok, fmt = template_format(LLAMA3_TEMPLATES[0], {"date_string": "26 Jul 2024"})
    fmt = type(fmt)(fmt.template, fmt.variables, TOOLS)
    conv = Conversation(tok, fmt, "Be brief.")
    assert conv.message_ids("Weather in Paris?") == []
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    assert conv.ids() == encode_dialog(tok, first, fmt=fmt) and "get_weather" in tok.decode(conv.head)
    later = conv.message_ids("And Rome?")
    assert tok.decode(later) == ("<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnd Rome?<|eot_id|>"
                                 "<|start_header_id|>assistant<|end_header_id|>\n\n")[len("<|eot_id|>"):]
