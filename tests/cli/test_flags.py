"""llama.cpp's flags as README.md's table lists them, and the small things of the command line:
stop reasons and counts in the statistics, input mistakes caught before the model loads with the
message that fits, --ctx-size bounded by the trained context in every command, a byte-order mark
dropped, a description in every command's --help, and what `inspect` says about a folder."""

import io
import json
import re
from pathlib import Path

import pytest

import llama3_np.load
from llama3_np.assets import default_model
from llama3_np.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
PARITY = REPO / "tests" / "fixtures" / "parity" / "llama3_1"  # no tokenizer: --tokens only


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def subparsers() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices


def readme_flag_table() -> list[tuple[list[str], list[str]]]:
    text = (REPO / "README.md").read_text()
    table = text.split("<!-- flags: accepted")[1].split("<!-- flags: end -->")[0]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows.append((re.findall(r"`([^`]+)`", cells[0]), [c.strip() for c in cells[1].split(",")]))
    return rows


def test_every_llama_cpp_flag_in_the_readme_table_is_accepted_where_it_says():
    commands = subparsers()
    rows = readme_flag_table()
    assert len(rows) >= 10
    for flags, names in rows:
        for name in names:
            for flag in flags:
                assert flag in commands[name]._option_string_actions, f"`{name}` does not accept {flag}"


def test_unknown_flags_point_to_the_commands_own_help(capsys):
    code, out, err = run(capsys, "perplexity", "-f", "x", "--frobnicate")
    assert (code, out) == (2, "")
    assert err == ("llama3-np: error: llama3-np perplexity: unrecognized arguments: --frobnicate "
                   "(see 'llama3-np perplexity --help')\n")


def test_every_command_has_a_description():
    for name, parser in subparsers().items():
        assert parser.description and len(parser.description) > 30, f"`{name} --help` has no description"


# --- -c/--ctx-size --------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["-c", "--ctx-size", "--ctx"])
def test_ctx_size_sets_the_context(capsys, flag):
    code, _, err = run(capsys, "generate", "-m", PARITY, "--tokens", "1,2,3,4,5", flag, "4")
    assert code == 2 and "the prompt has 5 tokens but the context holds 4" in err


@pytest.mark.parametrize("argv", [["generate", "--tokens", "1"], ["chat"], ["perplexity", "-f", "README.md"]])
def test_ctx_size_beyond_the_trained_context_is_refused_alike_before_loading(capsys, monkeypatch, argv):
    def no_load(*a, **k):
        raise AssertionError("the weights were loaded before --ctx-size was checked")

    monkeypatch.setattr(llama3_np.load, "load_checkpoint", no_load)
    code, out, err = run(capsys, *argv, "-m", PARITY, "-c", "200000")
    assert (code, out) == (2, "")
    assert err == ("llama3-np: error: --ctx-size: ctx 200000 is longer than the 131072 tokens the model was "
                   "trained for: at most 131072\n")


# --- -s/--seed ------------------------------------------------------------------------------------

def _ids(capsys, *flags) -> tuple[list[int], int]:
    code, out, err = run(capsys, "generate", "-m", PARITY, "--tokens", "1,2,3", "-n", "6", "--temp", "1.5",
                         "--json", *flags)
    assert code == 0, err
    result = json.loads(out)
    return result["ids"], result["seed"]


def test_seed_short_and_long_and_minus_one_for_random(capsys):
    assert _ids(capsys, "-s", "7") == _ids(capsys, "--seed", "7")
    (_, a), (_, b) = _ids(capsys, "-s", "-1"), _ids(capsys)
    assert a != b and 0 <= a < 2**32 and 0 <= b < 2**32  # two random seeds (equal once in 2**32 runs)
    ids, seed = _ids(capsys, "-s", "-1")
    assert _ids(capsys, "-s", str(seed)) == (ids, seed)  # the seed shown reproduces the run
    code, _, err = run(capsys, "generate", "-m", PARITY, "--tokens", "1", "-s", "-2")
    assert code == 2 and "--seed must be >= 0, or -1 for a random seed, got -2" in err


# --- -sys/--system-prompt, -f - -----------------------------------------------------------------

def _prompt_ids(capsys, *flags) -> list[int]:
    code, out, err = run(capsys, "generate", "-m", default_model(), "-n", "1", "--temp", "0", "--json", *flags)
    assert code == 0, err
    return json.loads(out)["prompt_ids"]


def test_system_prompt_spellings_and_stdin_prompt(capsys, monkeypatch, tmp_path):
    from llama3_np.text.chat import encode_dialog
    from llama3_np.load import load_tokenizer

    want = encode_dialog(load_tokenizer(default_model()), [{"role": "system", "content": "Be brief."},
                                                               {"role": "user", "content": "Hi"}])
    for flag in ("-sys", "--system-prompt", "--system"):
        assert _prompt_ids(capsys, "--chat", "-p", "Hi", flag, "Be brief.") == want, flag
    code, _, err = run(capsys, "generate", "-m", PARITY, "--tokens", "1", "-sys", "x")
    assert code == 2 and err == "llama3-np: error: --system-prompt goes with --chat\n"

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"The sky is")))
    from_stdin = _prompt_ids(capsys, "-f", "-")
    assert from_stdin == _prompt_ids(capsys, "-p", "The sky is")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfThe sky is")
    assert _prompt_ids(capsys, "-f", tmp_path / "bom.txt") == from_stdin  # the byte-order mark is dropped


# --- statistics -----------------------------------------------------------------------------------

def test_stats_count_in_singular_and_plural_and_show_the_seed_of_sampled_runs_only(capsys):
    code, _, err = run(capsys, "generate", "-m", PARITY, "--tokens", "1", "-n", "1", "--temp", "0")
    assert code == 0
    assert "| prompt 1 token, " in err and "| generated 1 token, " in err and "seed" not in err
    assert err.rstrip().endswith("| stop: -n limit")
    code, _, err = run(capsys, "generate", "-m", PARITY, "--tokens", "1,2", "-n", "2", "-s", "5")
    assert "| prompt 2 tokens, " in err and "| generated 2 tokens, " in err and "| seed 5 |" in err


# --- input mistakes caught before the model loads ---------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["trace", "-p", "hi", "--layers", "5-2"], "--layers: '5-2': the range 5-2 runs backwards; write it 2-5"),
    (["perplexity", "-f", "README.md", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["dump", "-p", "hi", "-o", "out.txt"], "-o out.txt: a dump is a safetensors file; name it FILE.safetensors"),
])
def test_input_mistakes_are_named_before_the_model_is_looked_at(capsys, argv, message):
    code, out, err = run(capsys, *argv, "-m", "/no/such/model")  # the model would fail next
    assert (code, out, err) == (2, "", f"llama3-np: error: {message}\n")


# --- inspect --------------------------------------------------------------------------------------

def test_inspect_shows_chat_format_stop_tokens_and_source(capsys):
    code, out, _ = run(capsys, "inspect", "-m", default_model())
    assert code == 0
    assert f"\nchat format: template ({default_model()}: tokenizer.chat_template)\n" in out
    assert '\nstop tokens: 0 "<|endoftext|>", 2 "<|im_end|>"\n' in out
    assert "\nformat:      GGUF (SmolLM2-135M-Instruct.Q4_1.gguf)\n" in out
    assert "\nstored:      Q8_0 30.1 MB, F32 140.5 KB, Q4_1 66.4 MB\n" in out
    assert "\nsource:      the GGUF file as it is, read in place" in out
    code, out, _ = run(capsys, "inspect", "-m", PARITY)
    assert "\nchat format: none (plain generation only)\n" in out
    assert "\nsource:      as downloaded (not imported by llama3_np)" in out


# --- the prompt made visible ----------------------------------------------------------------------

def test_verbose_prompt_lists_the_tokens_and_echo_prints_the_prompt_first(capsys):
    from llama3_np.load import load_tokenizer

    tok = load_tokenizer(default_model())
    code, out, err = run(capsys, "generate", "-m", default_model(), "-p", "The sky is", "-n", "2", "--temp", "0",
                         "--verbose-prompt", "--echo")
    assert code == 0
    ids = tok.encode("The sky is")
    assert err.startswith(f"prompt: {len(ids)} tokens\n" + "".join(
        f"{i:>6} -> '{tok.decode([i])}'\n" for i in ids))
    code, plain, _ = run(capsys, "generate", "-m", default_model(), "-p", "The sky is", "-n", "2", "--temp", "0")
    assert out == "The sky is" + plain  # the prompt, then the same continuation

    code, out, _ = run(capsys, "generate", "-m", default_model(), "--chat", "-p", "Hi", "-n", "1", "--temp", "0",
                       "--echo")
    assert out.startswith("<|im_start|>system\n") and "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" in out
    code, out, err = run(capsys, "generate", "-m", PARITY, "--tokens", "1,2", "-n", "1", "--verbose-prompt")
    assert code == 0 and err.startswith("prompt: 2 tokens\n1 2\n")
    code, out, err = run(capsys, "generate", "-m", PARITY, "--tokens", "1", "--echo", "--json")
    assert code == 2 and "--echo goes with streamed text" in err


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_a_long_prefill_shows_progress_on_a_terminal_only(capsys, monkeypatch):
    import llama3_np.cli.common

    argv = ["generate", "-m", PARITY, "--tokens", ",".join(["7"] * 600), "-n", "1", "--temp", "0"]
    code, _, err = run(capsys, *argv)
    assert code == 0 and "\r" not in err  # not a terminal: no progress line

    monkeypatch.setattr(llama3_np.cli.common, "PROGRESS_AFTER_SECONDS", 0.0)  # as if each chunk took long
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main([str(a) for a in argv]) == 0
    shown = terminal.getvalue()
    assert "\rprefill 256/600 tokens (43%)" in shown and "\rprefill 512/600 tokens (85%)" in shown
    assert "\rprefill 600/600 tokens (100%)" in shown
    wiped, stats = shown.rsplit("\r", 1)
    assert wiped.endswith("\r" + " " * len("prefill 600/600 tokens (100%)")) and stats.startswith("load ")


def test_repeat_last_n_sets_the_window_the_penalty_looks_at(capsys):
    from llama3_np.formats.checkpoint import load_checkpoint
    from llama3_np.generation import Session
    from llama3_np.sampling import SamplingParams

    ckpt = load_checkpoint(PARITY)
    for n, window in [(2, [2, 3]), (0, []), (-1, [1, 2, 3]), (64, [1, 2, 3])]:
        session = Session(ckpt.weights, ckpt.config, 8)
        session.feed([1, 2, 3])
        assert session.recent_ids(SamplingParams(repeat_last_n=n).history_window) == window, n

    def greedy(*flags):
        code, out, err = run(capsys, "generate", "-m", PARITY, "--tokens", "5,5,5", "-n", "8", "--temp", "0",
                             "--json", *flags)
        assert code == 0, err
        return json.loads(out)["ids"]

    assert greedy("--repeat-penalty", "5", "--repeat-last-n", "0") == greedy("--repeat-penalty", "1")
    code, out, err = run(capsys, "generate", "-m", "/no/such/model", "-p", "x", "--repeat-last-n", "-2")
    assert (code, out) == (2, "") and err == ("llama3-np: error: --repeat-last-n: repeat_last_n must be an integer "
                                              ">= 0 (0 = off), or -1 for every id before the one drawn, got -2\n")


def test_stop_reasons_tell_the_n_limit_from_a_full_context(capsys):
    def generate(*flags):
        code, out, err = run(capsys, "generate", "-m", PARITY, "--tokens", "1,2,3", "--temp", "0", *flags)
        assert code == 0, err
        return out, err

    out, _ = generate("-n", "2", "--json")
    assert (json.loads(out)["stop_reason"], len(json.loads(out)["ids"])) == ("length", 2)
    _, err = generate("-n", "2")
    assert err.rstrip().endswith("| stop: -n limit")
    out, _ = generate("-c", "6", "--json")  # -n 128 does not fit: the context ends it
    assert (json.loads(out)["stop_reason"], len(json.loads(out)["ids"])) == ("context", 4)
    _, err = generate("-c", "6")
    assert err.rstrip().endswith("| stop: context full")


def test_perplexity_counts_one_window_in_the_singular(capsys, tmp_path):
    (tmp_path / "t.txt").write_text("The three primary colors are red, yellow and blue. " * 3)
    code, out, err = run(capsys, "perplexity", "-m", default_model(), "-f", tmp_path / "t.txt", "-c", "16",
                         "--chunks", "1")
    assert code == 0, err
    assert "; 1 window of 16, each scored on its last" in out.splitlines()[0]


def test_the_checkpoint_is_scanned_once_so_its_notes_are_said_once(tmp_path, capsys):
    from tests.checkpoint_builders import random_weights, tiny_config, write_meta

    write_meta(tmp_path / "meta", random_weights(tiny_config()))  # use_scaled_rope, no factor: a note
    code, _, err = run(capsys, "generate", "-m", tmp_path / "meta", "--tokens", "1", "-n", "1", "-c", "8")
    assert code == 0 and err.count("llama3-np: note: ") == 1, err
