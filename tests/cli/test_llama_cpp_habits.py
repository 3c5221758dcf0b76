"""What a llama.cpp user types: llama.cpp's flags that llama3_np does not take are refused by name
with the reason (never read as another flag: -ngl 99 is not -n gl), long flags are not
abbreviated, -f drops one final newline, -c 0 is the model's context and -n -1 no limit; and
every --help states the default the parser really has."""

import argparse
import json
import re

import pytest

from llama3_np.assets import default_model
from llama3_np.cli.common import LLAMA_CPP_ONLY_FLAGS
from tests.cli.test_flags import PARITY, REPO, run, subparsers  # PARITY: no tokenizer, trained context 131072


# --- llama.cpp's flags that llama3_np does not take ------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["-ngl", "99"], "-ngl offloads layers to a GPU; llama3_np runs on the CPU"),
    (["--n-gpu-layers=99"], "--n-gpu-layers offloads layers to a GPU; llama3_np runs on the CPU"),
    (["-fa", "on"], "-fa selects a flash-attention kernel; llama3_np computes attention one way, the "
                    "specification's (model.attention)"),
    (["-ctk", "q8_0"], "-ctk sets the data type of the KV cache; llama3_np's KV cache holds the compute mode's dtype: choose it with --compute"),
    (["-cb"], "-cb sets how parallel sequences are scheduled; generate -np N takes the next prompt as soon as one "
              "ends, always"),
    (["-cnv"], "-cnv switches between completion and conversation; use the chat command for a conversation "
               "and generate for a completion"),
])
def test_llama_cpp_flags_are_refused_by_name_not_read_as_another_flag(capsys, argv, message):
    code, out, err = run(capsys, "generate", "-m", PARITY, "--tokens", "1", *argv)
    assert (code, out, err) == (2, "", f"llama3-np: error: {message}\n")


def test_every_command_refuses_every_llama_cpp_only_flag_it_does_not_take(capsys):
    commands = subparsers()
    for flags, does, _ in LLAMA_CPP_ONLY_FLAGS:
        for flag in flags:
            for name, parser in commands.items():
                action = parser._option_string_actions.get(flag)
                assert action is not None, f"`{name}` neither takes nor refuses {flag}"
                if action.__class__.__name__ != "RefusedFlag":
                    continue  # the command takes this flag itself (perplexity's -b)
                code, out, err = run(capsys, name, flag, "1")
                assert (code, out) == (2, ""), (name, flag)
                assert err.startswith(f"llama3-np: error: {flag} {does}; ") and err.count("\n") == 1, err


def test_the_readme_lists_only_flags_that_are_refused():
    text = (REPO / "README.md").read_text()
    table = text.split("Not accepted (llama.cpp flag: what to do instead):")[1].split("\n\n")[1]
    first_column = [line.split("|")[1] for line in table.splitlines()[2:]]
    listed = [flag for cell in first_column for flag in re.findall(r"`(-[^` *]+)(?: [^`]*)?`", cell)]
    refused = {flag for flags, _, _ in LLAMA_CPP_ONLY_FLAGS for flag in flags}
    assert len(listed) > 20 and not set(listed) - refused, set(listed) - refused


def test_long_flags_are_not_abbreviated_and_llama_cpp_spellings_are_taken(capsys):
    code, out, err = run(capsys, "generate", "-m", PARITY, "--tokens", "1", "--n-pred", "2")
    assert (code, out) == (2, "") and "unrecognized arguments: --n-pred 2" in err

    def ids(*flags):
        code, out, err = run(capsys, "generate", "-m", PARITY, "--tokens", "1,2", "--json", *flags)
        assert code == 0, err
        return json.loads(out)["ids"]

    assert ids("--predict", "3", "--temperature", "0") == ids("-n", "3", "--temp", "0")
    assert len(ids("--predict", "3", "--temperature", "0")) == 3


# --- -f, -c 0, -n -1 ---------------------------------------------------------------------------

def test_file_prompt_drops_one_final_newline_as_llama_cpp_but_tokenize_keeps_it(capsys, tmp_path):
    def prompt_ids(*flags):
        code, out, err = run(capsys, "generate", "-m", default_model(), "-n", "1", "--temp", "0", "--json", *flags)
        assert code == 0, err
        return json.loads(out)["prompt_ids"]

    (tmp_path / "one.txt").write_text("The sky is\n")
    (tmp_path / "two.txt").write_text("The sky is\n\n")
    assert prompt_ids("-f", tmp_path / "one.txt") == prompt_ids("-p", "The sky is")
    assert prompt_ids("-f", tmp_path / "two.txt") == prompt_ids("-p", "The sky is\n")

    code, out, _ = run(capsys, "tokenize", "-m", default_model(), "-f", tmp_path / "one.txt", "--json")
    code, plain, _ = run(capsys, "tokenize", "-m", default_model(), "-p", "The sky is\n", "--json")
    assert code == 0 and json.loads(out)["ids"] == json.loads(plain)["ids"]  # as llama-tokenize: verbatim


def test_ctx_size_zero_is_the_models_context_and_n_minus_one_runs_until_it_is_full(capsys):
    tokens = ",".join(["7"] * 4100)  # more than the 4096 the context holds without -c
    code, _, err = run(capsys, "generate", "-m", PARITY, "--tokens", tokens, "-n", "1")
    assert code == 2 and "the prompt has 4100 tokens but the context holds 4096" in err
    code, out, err = run(capsys, "generate", "-m", PARITY, "--tokens", tokens, "-n", "1", "-c", "0", "--json")
    assert code == 0, err
    assert len(json.loads(out)["ids"]) == 1

    code, out, err = run(capsys, "generate", "-m", PARITY, "--tokens", "1,2,3", "-c", "9", "-n", "-1", "--temp", "0",
                         "--ignore-eos", "--json")
    assert code == 0, err
    assert (json.loads(out)["stop_reason"], len(json.loads(out)["ids"])) == ("context", 7)
    code, _, err = run(capsys, "generate", "-m", PARITY, "--tokens", "1", "-c", "-1")
    assert code == 2 and "ctx must be positive, or 0 for the model's context, got -1" in err


# --- --help tells the truth -----------------------------------------------------------------------

def _help_text(parser, action) -> str:
    return parser._get_formatter()._expand_help(action)


def _same(stated: str, default) -> bool:
    try:
        return float(stated) == float(default)
    except (TypeError, ValueError):
        return stated == str(default)


def test_every_help_states_the_default_the_parser_has():
    checked = 0
    for name, parser in subparsers().items():
        for action in parser._actions:
            if action.help in (None, argparse.SUPPRESS) or action.nargs == 0 or action.default is None:
                continue  # flags without a value, and values the command works out when not given
            text = _help_text(parser, action)
            where = f"`{name} {'/'.join(action.option_strings) or action.dest}`"
            assert str(action.default) in text, f"{where} --help does not say its default {action.default!r}: {text}"
            for stated in re.findall(r"default:? (-?\d[\w.+-]*)", text):
                assert _same(stated.rstrip("."), action.default), \
                    f"{where} --help says default {stated}, the parser's default is {action.default!r}"
            checked += 1
    assert checked > 30


def test_chats_help_gives_the_n_predict_default_chat_uses():
    chat = subparsers()["chat"]
    assert chat.parse_args([]).n_predict == -1
    assert "(default -1)" in chat.format_help().replace("\n", " ").replace("  ", " ")
