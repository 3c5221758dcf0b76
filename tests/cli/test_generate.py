"""`llama3-np generate` and `chat` through the real command line: greedy ids, streaming of
multi-byte characters, and bad input ending in one line on stderr with exit status 2."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from llama3_np.assets import default_model
from llama3_np.formats.checkpoint import hf_config_dict, hf_name, permute_qk, scan_checkpoint
from llama3_np.formats.gguf_import import tokenizer_objects
from llama3_np.cli import main
from llama3_np.errors import ParameterError
from llama3_np.model import forward
from llama3_np.formats.safetensors_file import write_safetensors
from llama3_np.formats.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
PARITY = REPO / "tests" / "fixtures" / "parity" / "llama3_1"


def cli(*args, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama3_np", *args], capture_output=True,
                          input=stdin.encode(), cwd=REPO, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode == 2, f"exit {proc.returncode}, stderr: {err}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llama3-np: error: "), err
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"


def test_greedy_json_equals_greedy_argmax_of_forward():
    """--tokens needs no tokenizer; the ids are what repeated full forwards pick."""
    proc = cli("generate", "-m", str(PARITY), "--tokens", "5,17,99,3", "-n", "6", "--temp", "0", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    ckpt = load_checkpoint(PARITY)
    ids = [5, 17, 99, 3]
    for _ in range(6):
        ids.append(int(np.argmax(forward(ckpt.weights, ckpt.config, ids)[-1])))
    assert out["prompt_ids"] == [5, 17, 99, 3] and out["ids"] == ids[4:]
    assert out["stop_reason"] == "length" and out["text"] is None
    assert set(out["timings"]) >= {"load_s", "prefill_s", "decode_s", "prefill_tokens_per_s", "decode_tokens_per_s"}


def test_n_zero_evaluates_the_prompt_only():
    """-n 0 as in llama.cpp: the prompt is evaluated (its timing reported), nothing generated."""
    proc = cli("generate", "-m", str(PARITY), "--tokens", "5,17", "-n", "0", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    assert out["prompt_ids"] == [5, 17] and out["ids"] == [] and out["stop_reason"] == "length"
    assert out["timings"]["prefill_s"] > 0


def test_seed_reproduces_a_sampled_run():
    args = ("generate", "-m", str(PARITY), "--tokens", "1,2,3", "-n", "12", "--temp", "1.5",
            "--top-k", "0", "--top-p", "1", "--min-p", "0", "--json")
    a = json.loads(cli(*args, "--seed", "7").stdout)["ids"]
    b = json.loads(cli(*args, "--seed", "7").stdout)["ids"]
    c = json.loads(cli(*args, "--seed", "8").stdout)["ids"]
    assert a == b and a != c


# --- streaming --------------------------------------------------------------------------------

TARGET = "naïve 東京 🌸🎉 fin"


def chain_model(tmp_path: Path) -> tuple[Path, list[int]]:
    """A one-layer model with the default model's tokenizer whose greedy output is fixed: token
    chain[i] is followed by chain[i+1]. Attention and FFN outputs are zero (wo = w2 = 0), so the
    logits are rmsnorm(embedding) · output: one-hot embeddings and an output matrix that maps
    each chain token's axis to its successor make every step an exact argmax."""
    from llama3_np.load import load_tokenizer

    tok = load_tokenizer(default_model())
    chain = tok.encode(TARGET, bos=False)
    assert len(set(chain)) == len(chain), "the chain needs distinct tokens"
    assert any("\ufffd" in tok.decode([t]) for t in chain), "no token splits a character: weak test"
    D, V, F = 64, tok.n_vocab, 8
    assert len(chain) < D
    index = scan_checkpoint(default_model())
    cfg = hf_config_dict(index.config)
    cfg.update(hidden_size=D, intermediate_size=F, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=V, tie_word_embeddings=False,
               eos_token_id=list(index.eos_ids))
    emb = np.zeros((V, D), np.float32)
    out = np.zeros((V, D), np.float32)
    for k, (t, nxt) in enumerate(zip(chain, chain[1:])):
        emb[t, k] = 1.0
        out[nxt, k] = 1.0
    zeros = {"attention.wq.weight": (64, D), "attention.wk.weight": (32, D), "attention.wv.weight": (32, D),
             "attention.wo.weight": (D, 64), "feed_forward.w1.weight": (F, D),
             "feed_forward.w2.weight": (D, F), "feed_forward.w3.weight": (F, D)}
    tensors = {hf_name("tok_embeddings.weight"): emb, hf_name("output.weight"): out,
               hf_name("norm.weight"): np.ones(D, np.float32)}
    for name, shape in zeros.items():
        tensors[hf_name("layers.0." + name)] = np.zeros(shape, np.float32)
    for name in ("attention_norm.weight", "ffn_norm.weight"):
        tensors[hf_name("layers.0." + name)] = np.ones(D, np.float32)
    folder = tmp_path / "chain"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors",
                      {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()})
    (folder / "config.json").write_text(json.dumps(cfg))
    for name, obj in zip(("tokenizer.json", "tokenizer_config.json"), tokenizer_objects(default_model())):
        (folder / name).write_text(json.dumps(obj))
    return folder, chain


class Recorder(io.RawIOBase):
    """Stands in for sys.stdout.buffer and keeps every write separately."""

    def __init__(self):
        self.writes = []

    def write(self, b):
        self.writes.append(bytes(b))
        return len(b)

    def flush(self):
        pass


def test_streamed_multibyte_characters_arrive_intact(tmp_path, monkeypatch):
    folder, chain = chain_model(tmp_path)
    args = ["generate", "-m", str(folder), "--tokens", str(chain[0]), "-n", str(len(chain) - 1), "--temp", "0"]
    rec = Recorder()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(rec))
    assert main(args) == 0
    for piece in rec.writes:
        piece.decode("utf-8")  # no write may hold part of a character
    from llama3_np.load import load_tokenizer
    first = load_tokenizer(folder).decode(chain[:1])
    assert first + b"".join(rec.writes).decode() == TARGET + "\n"
    assert len(rec.writes) > 5  # it streamed, piece by piece
    # And the real process prints the same bytes.
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr.decode()
    assert first + proc.stdout.decode("utf-8") == TARGET + "\n"


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args,fragments", [
    (["generate", "-m", str(PARITY), "--tokens", "1", "--temp", "hot"], ["--temp", "invalid float value"]),
    (["generate", "-m", str(PARITY), "--tokens", "1", "--top-p", "0"], ["--top-p: top_p must be in (0, 1]"]),
    (["generate", "-m", str(PARITY), "--tokens", "1", "--top-k", "-2"], ["--top-k"]),
    (["generate", "-m", str(PARITY), "--tokens", "1", "--temp", "-1"], ["--temp: temperature must be >= 0"]),
    # --samplers is checked before the model loads: the missing folder is not what is reported
    (["generate", "-m", "/no/such/folder", "-p", "hi", "--samplers", "top_k;foo"], ["--samplers", "unknown sampler 'foo'"]),
    (["generate", "-m", "/no/such/folder", "-p", "hi", "--samplers", "top_k;temp;top-k"], ["--samplers", "'top_k' is given twice"]),
    (["generate", "-m", "/no/such/folder", "-p", "hi", "-r", ""], ["-r: a stop string must be non-empty text"]),
    (["chat", "-m", "/no/such/folder", "--samplers", "infill"], ["--samplers", "'infill'", "not implemented"]),
    (["generate", "-m", "/no/such/folder", "-p", "hi", "--dry-base", "0.5"], ["--dry-base: dry_base must be a finite number >= 1"]),
    (["generate", "-m", "/no/such/folder", "-p", "hi", "--dry-multiplier", "-1"], ["--dry-multiplier: dry_multiplier must be >= 0"]),
    (["chat", "-m", "/no/such/folder", "--dry-sequence-breaker", ""], ["--dry-sequence-breaker", "non-empty strings"]),
    (["generate", "-m", "/no/such/folder", "-p", "hi", "--xtc-probability", "2"], ["--xtc-probability: xtc_probability must be in [0, 1]"]),
    (["generate", "-m", "/no/such/folder", "-p", "hi", "--dry-penalty-last-n", "-3"], ["--dry-penalty-last-n: dry_penalty_last_n must be"]),
    # DRY's breakers are text: a model without a tokenizer cannot have them
    (["generate", "-m", str(PARITY), "--tokens", "1", "--dry-multiplier", "0.8"], ["DRY's sequence breakers", "--dry-sequence-breaker none"]),
    (["generate", "-m", "/no/such/folder", "-p", "hi", "--sampling-seq", "kq"], ["--samplers", "unknown sampler 'q'"]),
    (["generate", "-m", "/no/such/folder", "-p", "hi", "--presence-penalty", "nan"],
     ["--presence-penalty: presence_penalty must be a finite number"]),
    (["chat", "-m", "/no/such/folder", "--frequency-penalty", "inf"], ["--frequency-penalty: frequency_penalty must be a finite"]),
    (["generate", "-m", "/no/such/folder", "-p", "hi", "--typical", "1.5"], ["--typical: typical_p must be in [0, 1]"]),
    (["chat", "-m", "/no/such/folder", "--top-nsigma", "nan"], ["--top-nsigma: top_n_sigma must be a finite number"]),
    (["generate", "-p", "hi", "--samplers", "top_k", "--sampling-seq", "k"], ["--sampling-seq", "not allowed with"]),
    (["generate", "-m", str(PARITY), "--tokens", "1", "-n", "-2"], ["-n: max_new must be >= 0, or -1"]),
    (["generate", "-m", str(PARITY), "--tokens", "1", "--seed", "-2"], ["--seed", "or -1 for a random seed"]),
    (["generate", "-m", str(PARITY), "--tokens", "1", "--dtype", "int8"], ["--dtype", "invalid choice"]),
    (["generate", "-m", "/no/such/folder", "-p", "hi"], ["/no/such/folder", "does not exist"]),
    (["generate", "-m", str(PARITY), "--tokens", "1,2,3,4,5", "--ctx", "4"], ["5 tokens", "context holds 4"]),
    (["generate", "-m", str(PARITY), "--tokens", "1,x"], ["--tokens"]),
    (["generate", "-m", str(PARITY), "--tokens", "1,256"], ["id 256", "vocabulary"]),
    (["generate", "-m", str(PARITY), "--tokens", ""], ["empty"]),
    (["generate", "-m", str(PARITY)], ["give a prompt"]),
    (["generate", "-m", str(PARITY), "-p", "hi"], ["tokenizer"]),
    (["generate", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["frobnicate"], ["invalid choice"]),
])
def test_bad_input_is_one_line_and_exit_2(args, fragments):
    assert_one_line_error(cli(*args), *fragments)


def test_empty_prompt_and_non_utf8_prompt_file(tmp_path):
    model = str(default_model())
    assert_one_line_error(cli("generate", "-m", model, "-p", ""), "prompt is empty")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    assert_one_line_error(cli("generate", "-m", model, "-f", str(bad)), str(bad), "not UTF-8", "0xe9")
    assert_one_line_error(cli("generate", "-m", model, "-f", str(tmp_path / "none.txt")), "does not exist")
    assert_one_line_error(cli("generate", "-m", model, "-f", str(tmp_path)), "is a folder")


def test_prompt_file_may_be_a_pipe():
    """-f reads what a pipe holds (here /dev/stdin), as it would -f <(command)."""
    args = ("generate", "-m", str(default_model()), "-n", "1", "--temp", "0", "--json")
    piped = cli(*args, "-f", "/dev/stdin", stdin="Grüße aus Köln")
    direct = cli(*args, "-p", "Grüße aus Köln")
    assert piped.returncode == 0, piped.stderr.decode()
    assert json.loads(piped.stdout)["prompt_ids"] == json.loads(direct.stdout)["prompt_ids"]


# --- chat ----------------------------------------------------------------------------------------

def test_chat_turns_stop_at_end_of_turn_and_reuse_the_cache():
    """Two turns with the default model (ChatML): each answer ends at <|im_end|>, and the second
    turn feeds only its own tokens, the first turn staying in the KV cache."""
    from llama3_np.text.chat import encode_dialog, encode_turn
    from llama3_np.load import load_tokenizer

    proc = cli("chat", "--temp", "0", "-n", "48", stdin="What is the capital of France?\nAnd of Italy?\n")
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    stats = [line for line in err.splitlines() if line.startswith("prompt ")]
    assert len(stats) == 2, err
    assert all(line.endswith("stop: stop token") for line in stats), err
    tok = load_tokenizer(default_model())
    first_prompt = len(encode_dialog(tok, [{"role": "user", "content": "What is the capital of France?"}]))
    second_prompt = int(stats[1].split("prompt ")[1].split(" tokens")[0])
    assert f"prompt {first_prompt} tokens" in stats[0]
    turn = len(encode_turn(tok, [{"role": "user", "content": "And of Italy?"}]))
    assert second_prompt == turn < first_prompt, f"second turn fed {second_prompt} tokens, not {turn}"
    answers = proc.stdout.decode()
    assert "Paris" in answers and "Rome" in answers, answers


# --- end to end on the default model --------------------------------------------------------------

GREEDY = json.loads((REPO / "tests" / "fixtures" / "default_model" / "greedy.json").read_text())
CHAT_QUESTION = "What is the capital of France? Answer in one sentence, then name two landmarks there."


@pytest.mark.parametrize("case", GREEDY["cases"], ids=["text", "chat", "digits"])
def test_greedy_generate_reproduces_transformers_float32(case):
    """`llama3-np generate --temp 0` on the default model, from text to ids, against the greedy ids
    of Hugging Face transformers in float32 on the same weights (64 new tokens; the chat case ends
    at <|im_end|>, the format's end of turn, and must stop there)."""
    chat = case["prompt"].startswith("<|im_start|>")
    prompt = ["--chat", "-p", CHAT_QUESTION] if chat else ["-p", case["prompt"]]
    proc = cli("generate", *prompt, "--temp", "0", "-n", str(len(case["ids"])), "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    assert out["prompt_ids"] == case["prompt_ids"], "prompt tokenized differently from the reference"
    if chat:
        end = case["ids"].index(2)  # <|im_end|>
        assert out["stop_reason"] == "stop" and out["ids"] == case["ids"][:end + 1]
        assert out["text"] == "The capital of France is Paris, France."
    else:
        assert out["stop_reason"] == "length" and out["ids"] == case["ids"], (
            f"first difference at token {next(i for i, (a, b) in enumerate(zip(out['ids'], case['ids'])) if a != b)}")
        assert out["text"] == case["text"]


# --- stop strings -------------------------------------------------------------------------------

def test_reverse_prompt_ends_the_text_before_it_across_tokens_and_holds_back_only_what_could_begin_it(
        tmp_path, monkeypatch, capsys):
    folder, chain = chain_model(tmp_path)
    args = ["generate", "-m", str(folder), "--tokens", str(chain[0]), "-n", str(len(chain) - 1), "--temp", "0"]
    first = "na"  # the text of chain[0]

    def streamed(*flags):
        rec = Recorder()
        monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(rec))
        assert main(args + list(flags)) == 0
        return [w.decode("utf-8") for w in rec.writes]

    # "🌸🎉" spans tokens (and splits characters' bytes): the text ends before it
    writes = streamed("-r", "🌸🎉")
    assert first + "".join(writes) == TARGET[:TARGET.index("🌸🎉")] + "\n"
    assert "stop: stop string" in capsys.readouterr().err
    # "京 X" never comes: "京 " is held back while it could begin it, then shown with what follows
    writes = streamed("-r", "京 X", "-r", "zzz")
    assert first + "".join(writes) == TARGET + "\n"
    assert not any(w.endswith(("京", "京 ")) for w in writes) and any("京 🌸" in w for w in writes)
    # --json: the text without the stop string, stop reason "stop_string"
    monkeypatch.undo()
    assert main(args + ["--json", "-r", "東京", "-r", "fin"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["text"], result["stop_reason"]) == (TARGET[len(first):TARGET.index("東京")], "stop_string")


def test_the_api_stop_strings_end_generate_and_stream_alike(tmp_path):
    from llama3_np.load import load_model

    folder, chain = chain_model(tmp_path)
    model = load_model(folder)
    n = len(chain) - 1
    assert model.generate("na", n) == TARGET[2:]
    assert model.generate("na", n, stop=["🌸🎉", " f"]) == TARGET[2:TARGET.index("🌸🎉")]
    pieces = list(model.stream("na", n, stop=["東京"]))
    assert "".join(pieces) == TARGET[2:TARGET.index("東京")] and all(pieces)
    with pytest.raises(ParameterError, match="stop string must be non-empty"):
        model.generate("na", n, stop=[""])
