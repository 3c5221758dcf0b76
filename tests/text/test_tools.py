"""Tool calls: a model's answer parsed into a call as Meta's reference decodes it, in each
published form (3.1 JSON with or without <|python_tag|>, function tags, built-in tools, code;
3.2 pythonic lists), on committed answers (tests/fixtures/chat/reference.json, "tool_calls");
tool definitions read from a file, and refused in one line when they are not a list of tools."""

from __future__ import annotations

import json

import pytest

from llama3_np.errors import Llama3Error
from llama3_np.text.tools import ToolCall, parse_tool_call, read_tools
from tests.text.test_template import chat_fixture


def test_calls_equal_llama_models_decoding():
    cases = chat_fixture("reference.json")["tool_calls"]
    for case in cases:
        want = case["call"] and ToolCall(case["call"]["name"], case["call"]["arguments"])
        assert parse_tool_call(case["answer"]) == want, case["answer"]
    assert sum(case["call"] is None for case in cases) >= 3 and len(cases) >= 15


def test_python_in_an_answer_is_parsed_never_run():
    assert parse_tool_call("[__import__('os').system('echo hacked')]") is None
    assert parse_tool_call('[f(x=__import__("os"))]') is None


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ('{"name": "f"}', "expected a JSON list of tool definitions"),
    ("[]", "expected a JSON list of tool definitions"),
    ('[{"type": "function", "function": {"description": "no name"}}]', "entry 0 is not a tool definition"),
    ('[{"name": "ok"}, 3]', "entry 1 is not a tool definition"),
])
def test_a_tools_file_that_is_not_a_list_of_tools_is_refused(tmp_path, content, message):
    path = tmp_path / "tools.json"
    path.write_text(content)
    with pytest.raises(Llama3Error, match=message):
        read_tools(path)


def test_a_tools_file_is_read(tmp_path):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    assert read_tools(tmp_path / "tools.json") == tools
