"""A file a command would write under a path it cannot create is refused before any work, in the
words every command uses (`files.WriteError`): which file, why (a folder on its way is a file, or
is missing), and what to do; one line on stderr, exit status 2, nothing written."""

import pytest

from llama3_np.cli import main
from llama3_np.files import WriteError, check_can_write
from tests.xcheck.test_dump import PARITY, XCHECK, assert_one_line_error

MODEL = PARITY.parent / "kld" / "model_a.gguf"  # a tiny model whose tokenizer has every byte
TEXT = XCHECK / "jargon_hack.txt"


def command(name, out, jsonl):
    return {
        "dump": ["dump", "-m", MODEL, "-p", "Hello", "-o", out / "d.safetensors"],
        "score": ["score", "-m", MODEL, "--jsonl", jsonl, "-o", out / "s.jsonl"],
        "perplexity --save-logits": ["perplexity", "-m", MODEL, "-f", TEXT, "--save-logits", out / "l.safetensors"],
        "perplexity --kl-divergence-base": ["perplexity", "-m", MODEL, "-f", TEXT, "--kl-divergence-base",
                                            out / "b.kld"],
    }[name]


@pytest.mark.parametrize("name", ["dump", "score", "perplexity --save-logits", "perplexity --kl-divergence-base"])
def test_an_output_under_a_file_or_a_missing_folder_is_refused_as_every_command_does(tmp_path, capsys, name):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"text": "Hello there"}\n')
    (tmp_path / "afile").write_text("")
    code = main([str(a) for a in command(name, tmp_path / "afile" / "sub", jsonl)])
    assert_one_line_error(code, capsys.readouterr().err, f"{tmp_path / 'afile'} is a file, not a folder",
                          "choose a folder you can write")
    code = main([str(a) for a in command(name, tmp_path / "missing", jsonl)])
    assert_one_line_error(code, capsys.readouterr().err, f"folder {tmp_path / 'missing'} does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "in.jsonl"]


def test_check_can_write(tmp_path):
    check_can_write(tmp_path / "new.txt")
    (tmp_path / "f").write_text("")
    for path, reason in ((tmp_path, "it is a folder"), (tmp_path / "f" / "x", f"{tmp_path / 'f'} is a file"),
                         (tmp_path / "f" / "a" / "x", f"{tmp_path / 'f'} is a file"),
                         (tmp_path / "no" / "x", f"folder {tmp_path / 'no'} does not exist")):
        with pytest.raises(WriteError, match=reason):
            check_can_write(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
