"""`llama3-np generate -f FILE -np N`: many prompts, N decoded together; each prompt's result is
what `generate -p` gives it alone, in the file's order; bad batches end in one line, exit 2."""

import contextlib
import io
import json

import pytest

from llama3_np import products
from llama3_np.cli import main

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,", "Water boils at"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def alone(capsys, prompt: str, *flags) -> dict:
    code, out, err = run(capsys, "generate", "-p", prompt, "-n", "6", "--json", *(flags or ("--temp", "0")))
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def greedy_alone() -> dict[str, dict]:
    """Each prompt's greedy result from `generate -p`, computed once for the module's tests."""
    results = {}
    for prompt in PROMPTS:
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
            assert main(["generate", "-p", prompt, "-n", "6", "--json", "--temp", "0"]) == 0
        results[prompt] = json.loads(out.getvalue())
    return results


@pytest.mark.parametrize("parallel,newline", [("2", "\n"), ("8", "\n"), ("2", "\r\n")])
def test_many_prompts_give_each_its_greedy_result_alone_in_the_files_order(capsys, tmp_path, parallel, newline,
                                                                           greedy_alone):
    f = tmp_path / "prompts.txt"
    f.write_bytes((newline.join(PROMPTS) + newline).encode())  # CR LF: a Windows editor's lines, the CR no prompt's
    code, out, err = run(capsys, "generate", "-f", f, "-np", parallel, "-n", "6", "--temp", "0", "--json")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [x["line"] for x in lines] == [1, 2, 3, 4, 5] and [x["prompt"] for x in lines] == PROMPTS
    for x, prompt in zip(lines, PROMPTS):
        one = greedy_alone[prompt]
        assert (x["prompt_ids"], x["ids"], x["text"]) == (one["prompt_ids"], one["ids"], one["text"]), prompt
    assert f"5 prompts, {parallel} at a time" in err


def test_jsonl_prompts_sampled_with_a_seed_draw_what_each_draws_alone(capsys, tmp_path):
    """Each prompt draws from a generator of the seed, as alone; batch-invariant products make its
    logits, and so its draws, the same bits."""
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3]))
    flags = ["--temp", "0.9", "--seed", "7", "--batch-invariant"]
    try:
        code, out, err = run(capsys, "generate", "-f", f, "-np", "3", "-n", "6", "--json", *flags)
    finally:
        products.set_batch_invariant(False)  # the command sets it for the process
    assert code == 0, err
    for line, prompt in zip(out.splitlines(), PROMPTS):
        try:
            assert json.loads(line)["ids"] == alone(capsys, prompt, *flags)["ids"], prompt
        finally:
            products.set_batch_invariant(False)


def test_text_output_is_each_prompt_and_its_continuation(capsys, tmp_path, greedy_alone):
    f = tmp_path / "prompts.txt"
    f.write_text("The capital of France is\nWater boils at")
    code, out, err = run(capsys, "generate", "-f", f, "-np", "2", "-n", "6", "--temp", "0")
    assert code == 0, err
    first, second = greedy_alone[PROMPTS[0]]["text"], greedy_alone[PROMPTS[4]]["text"]
    assert out == f"The capital of France is{first}\n\nWater boils at{second}\n\n"


@pytest.mark.parametrize("text, argv, message", [
    ("a\n\nb\n", ["-np", "2"], "prompts.txt line 2 is empty: write one prompt a line, without empty lines"),
    ("a\nb\n", ["-np", "0"], "-np/--parallel: takes a number of sequences >= 1, got '0'"),
    ("a\nb\n", ["-np", "two"], "-np/--parallel: takes a number of sequences >= 1, got 'two'"),
    ("a\nb\n", ["--parallel", "-3"], "-np/--parallel: takes a number of sequences >= 1, got '-3'"),
    ("a\n" + "one two three four five six seven\n", ["-np", "2", "-c", "4"],
     "prompts.txt line 2: the prompt has 7 tokens but the context holds 4: shorten it or raise --ctx-size"),
    ("a\nb\n", ["-np", "2", "--echo"], "--echo does not go with -np"),
])
def test_bad_batches_end_in_one_line(capsys, tmp_path, text, argv, message):
    f = tmp_path / "prompts.txt"
    f.write_text(text)
    code, out, err = run(capsys, "generate", "-f", f, "-n", "2", *argv)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and message in err, err


def test_a_bad_jsonl_line_is_named(capsys, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    code, out, err = run(capsys, "generate", "-f", f, "-np", "2")
    assert (code, out) == (2, "") and 'prompts.jsonl line 2 needs a non-empty "prompt" string' in err, err
