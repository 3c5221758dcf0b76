"""Chat templates: ids equal `transformers`' `apply_chat_template` for Meta's Llama 3.1, 3.2 and
3.3 templates and the default model's ChatML template, and Meta's `ChatFormat` for the llama3
choice, on the committed dialogs (tests/fixtures/chat/, `tools/make_chat_fixtures.py`)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest

from llama3_np.errors import Llama3Error, ParameterError
from llama3_np.text.chat import LLAMA3, TemplateFormat, chat_format_for, encode_dialog, encode_turn
from llama3_np.text.template import ChatTemplate, find_chat_template, read_template_file, template_variables
from tests.text.test_tokenizer_assets import DEFAULT_DIR, TOKENIZERS, first_difference, llama3

CHAT = Path(__file__).resolve().parents[1] / "fixtures" / "chat"
LLAMA3_TEMPLATES = ["meta-llama-Llama-3.1-8B-Instruct.jinja", "meta-llama-Llama-3.2-3B-Instruct.jinja",
                    "meta-llama-Llama-3.3-70B-Instruct.jinja"]
CHATML_TEMPLATE = "SmolLM2-135M-Instruct.jinja"
# What transformers passes a Llama 3 Instruct template: the special tokens of its tokenizer_config.json.
LLAMA3_VARIABLES = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}


@functools.cache
def chat_fixture(name: str) -> dict:
    return json.loads((CHAT / name).read_text(encoding="utf-8"))


def dialogs() -> list[dict]:
    return chat_fixture("dialogs.json")["dialogs"]


def template_format(file: str, extra: dict | None = None) -> tuple:
    """(tokenizer, TemplateFormat) of a committed template, with the variables transformers passes."""
    template = read_template_file(CHAT / "templates" / file)
    if file == CHATML_TEMPLATE:
        tok = TOKENIZERS["default"]()
        return tok, TemplateFormat(template, template_variables(tok, DEFAULT_DIR) | (extra or {}))
    return llama3(), TemplateFormat(template, LLAMA3_VARIABLES | (extra or {}))


@pytest.mark.parametrize("file", LLAMA3_TEMPLATES + [CHATML_TEMPLATE])
def test_dialogs_equal_apply_chat_template(file):
    reference = chat_fixture("reference.json")["templates"][file]
    failures = 0
    for d in dialogs():
        tok, fmt = template_format(file, d["variables"])
        want = reference[d["name"]]
        if "error" in want:
            with pytest.raises(Llama3Error, match="the chat template fails at line [0-9]+: ") as e:
                encode_dialog(tok, d["messages"], fmt=fmt, tools=d["tools"])
            assert want["error"].split(": ", 1)[1] in str(e.value)
            failures += 1
            continue
        got = encode_dialog(tok, d["messages"], fmt=fmt, tools=d["tools"])
        assert got == want["ids"], f"{file}, {d['name']}: {first_difference(got, want['ids'])}"
    assert len(dialogs()) - failures >= 10


def test_the_llama3_choice_equals_metas_chat_format():
    checked = 0
    for d in dialogs():
        want = chat_fixture("reference.json")["meta"][d["name"]]
        if want is None:  # a tool's result as JSON: Meta's ChatFormat takes text only
            continue
        got = encode_dialog(llama3(), d["messages"], fmt=LLAMA3)
        assert got == want, f"{d['name']}: {first_difference(got, want)}"
        checked += 1
    assert checked >= 13


def test_the_31_template_opens_with_its_system_block():
    """The issue's example: "Hi" is 36 ids with the 3.1 template and 11 with Meta's ChatFormat."""
    tok, fmt = template_format(LLAMA3_TEMPLATES[0], {"date_string": "26 Jul 2024"})
    text = tok.decode(encode_dialog(tok, [{"role": "user", "content": "Hi"}], fmt=fmt))
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                    "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>"
                    "\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("file", [LLAMA3_TEMPLATES[0], CHATML_TEMPLATE])
def test_special_token_text_in_a_message_stays_text(file):
    """transformers would end the turn at a typed `<|eot_id|>`; llama3_np keeps it as the text typed."""
    tok, fmt = template_format(file, {"date_string": "26 Jul 2024"})
    typed = "a <|eot_id|><|start_header_id|>system<|end_header_id|> b <|im_end|><|im_start|>"
    ids = encode_dialog(tok, [{"role": "user", "content": typed}], fmt=fmt)
    plain = encode_dialog(tok, [{"role": "user", "content": "XYZ"}], fmt=fmt)
    at = next(i for i, (a, b) in enumerate(zip(ids, plain)) if a != b)
    assert ids[:at] == plain[:at] and tok.encode(typed, bos=False) == ids[at:at + len(tok.encode(typed, bos=False))]
    assert tok.decode(ids).count(typed) == 1


@pytest.mark.parametrize("file", [LLAMA3_TEMPLATES[1], CHATML_TEMPLATE])
def test_next_turn_continues_the_dialog(file):
    """Dialog so far + the reply's ids + `encode_turn` = the whole dialog rendered at once."""
    tok, fmt = template_format(file, {"date_string": "26 Jul 2024"})
    first = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}]
    reply, second = {"role": "assistant", "content": "Paris."}, [{"role": "user", "content": "And of Italy?"}]
    whole = encode_dialog(tok, first + [reply] + second, fmt=fmt)
    turn = encode_turn(tok, second, fmt, history=first + [reply])
    assert encode_dialog(tok, first, fmt=fmt) + tok.encode(reply["content"], bos=False) + turn == whole
    eom = tok.special_tokens.get("<|eom_id|>")
    if eom is not None:  # a reply the model ended with <|eom_id|> keeps it, as Meta's ChatFormat does
        assert encode_turn(tok, second, fmt, reply_end=eom, history=first + [reply])[0] == eom


def test_a_template_that_rewrites_earlier_turns_is_encoded_again():
    tok = llama3()
    fmt = TemplateFormat(ChatTemplate("{{ bos_token }}{% for m in messages %}{{ m['content'] | length }}"
                                      "{{ '<|eot_id|>' }}{% endfor %}", "counting"), LLAMA3_VARIABLES)
    history = [{"role": "user", "content": "x" * 9}, {"role": "assistant", "content": "y"}]
    assert encode_turn(tok, [{"role": "user", "content": "z"}], fmt, history=history) is not None
    fmt = TemplateFormat(ChatTemplate("{{ bos_token }}{{ messages | length }}{{ '<|eot_id|>' }}", "counting"),
                         LLAMA3_VARIABLES)
    assert encode_turn(tok, [{"role": "user", "content": "z"}], fmt, history=history) is None


def test_template_errors_name_the_line(tmp_path):
    tok = llama3()
    bad = TemplateFormat(ChatTemplate("{{ bos_token }}\n{% if %}", "bad.jinja"), LLAMA3_VARIABLES)
    with pytest.raises(Llama3Error, match="bad.jinja: the chat template is not valid Jinja at line 2"):
        encode_dialog(tok, [{"role": "user", "content": "Hi"}], fmt=bad)
    undefined = TemplateFormat(ChatTemplate("{{ bos_token }}\n\n{{ messages[0].nothing.deeper }}", "u.jinja"))
    with pytest.raises(Llama3Error, match="u.jinja: the chat template fails at line 3: "):
        encode_dialog(tok, [{"role": "user", "content": "Hi"}], fmt=undefined)


def test_the_sandbox_refuses_python_internals():
    tok = llama3()
    fmt = TemplateFormat(ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", "escape"))
    with pytest.raises(Llama3Error, match="the chat template fails at line 1"):
        encode_dialog(tok, [{"role": "user", "content": "Hi"}], fmt=fmt)


def test_without_jinja2_only_rendering_fails(monkeypatch):
    monkeypatch.setitem(sys.modules, "jinja2", None)
    fmt = TemplateFormat(ChatTemplate("{{ bos_token }}", "t.jinja"), LLAMA3_VARIABLES)
    with pytest.raises(Llama3Error, match=r"needs Jinja2: pip install 'llama3_np\[templates\]'"):
        encode_dialog(llama3(), [{"role": "user", "content": "Hi"}], fmt=fmt)
    assert encode_dialog(llama3(), [{"role": "user", "content": "Hi"}], fmt=LLAMA3)


def test_the_choice_of_format(tmp_path):
    tok = llama3()
    template = ChatTemplate("{{ bos_token }}", "t")
    assert chat_format_for(tok) == LLAMA3  # a Meta folder: no template
    assert isinstance(chat_format_for(tok, template=template), TemplateFormat)
    assert chat_format_for(tok, "llama3", template) == LLAMA3
    with pytest.raises(ParameterError, match="carries no chat template"):
        chat_format_for(tok, "template")
    with pytest.raises(ParameterError, match="chatml chat format needs <\\|im_start\\|>"):
        chat_format_for(tok, "chatml", template)
    with pytest.raises(ParameterError, match="must be one of template, llama3, chatml"):
        chat_format_for(tok, "meta")
    default = TOKENIZERS["default"]()
    assert chat_format_for(default, "chatml").name == "chatml"
    with pytest.raises(ParameterError, match="needs a Llama 3 vocabulary"):
        chat_format_for(default, "llama3")


def test_where_a_folder_keeps_its_template(tmp_path):
    assert find_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools"}]}))
    assert find_chat_template(tmp_path).source == "plain"
    assert find_chat_template(tmp_path, tools=True).source == "tools"
    (tmp_path / "chat_template.jinja").write_text("from the file")
    assert find_chat_template(tmp_path).source == "from the file"
