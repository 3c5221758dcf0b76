"""Where generation ends, in every checkpoint format: at each of Llama 3's end-of-generation tokens
<|end_of_text|>, <|eom_id|> and <|eot_id|>, in plain completion as with --chat (Meta's reference
`completion` and `chat_completion` stop on all three, and so does llama.cpp), whatever the
checkpoint's config declares; with --ignore-eos, never (llama.cpp: they are never drawn).

The checkpoints are crafted so that the model's choice is known: attention and feed-forward
outputs are zero (wo = w2 = 0), so the logits are rmsnorm(embedding of the last token) · output.
Every token's embedding points along dim 0, which the output matrix maps to an ordinary token
(RUNNER_UP); a few chosen input tokens point along their own dim instead, which the output maps to
one end token each (and, with a smaller weight, to RUNNER_UP: the choice once the end tokens are
suppressed). So `--tokens BOS,TRIGGER` makes the model emit the trigger's end token, by a margin
no sampler setting can overturn; the last token of a chat prompt ("\\n\\n" after the assistant
header) is the trigger of <|eom_id|>.
"""

import functools
import json
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from llama3_np.assets import llama3_tokenizer_path
from llama3_np.formats.checkpoint import expected_shapes, load_checkpoint, save_hf_checkpoint
from llama3_np.config import from_meta_params
from llama3_np.formats.gguf_to_hf import import_gguf
from llama3_np.load import load_tokenizer
from tests.checkpoint_builders import write_meta
from tests.xcheck.test_dump import assert_one_line_error, run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_checkpoint_fixtures as fixtures  # noqa: E402

END_TOKENS = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]
RUNNER_UP = 65  # "b" in both vocabularies below: an ordinary token
TRIGGERS = {"<|end_of_text|>": 70, "<|eom_id|>": 71, "<|eot_id|>": 72}  # input token -> the end token it makes
DECLARED_ONLY_TRIGGER, DECLARED_ONLY = 73, 66  # in generation_config.json only (Hugging Face folder)

# The tiny GGUF's vocabulary: the fixture's byte-level tokens, and Llama 3's special tokens.
GGUF_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|reserved_special_token_0|>"]


def params(vocab_size: int) -> dict:
    return {"dim": 8, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "vocab_size": vocab_size, "multiple_of": 8,
            "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": False}


def emitting_weights(config, ends: dict[int, int]) -> dict[str, np.ndarray]:
    """Canonical bf16 weights of a model that answers trigger t with ends[t], anything else with RUNNER_UP."""
    w = {name: np.zeros(shape, np.float32) for name, shape in expected_shapes(config).items()}
    for name in w:
        if name.endswith("norm.weight"):
            w[name][:] = 1
    w["tok_embeddings.weight"][:, 0] = 1
    w["output.weight"][RUNNER_UP, 0] = 100
    for axis, (trigger, end) in enumerate(ends.items(), start=1):
        w["tok_embeddings.weight"][trigger] = np.eye(config.dim)[axis]
        w["output.weight"][end, axis] = 100
        w["output.weight"][RUNNER_UP, axis] = 50
    return {name: a.astype(ml_dtypes.bfloat16) for name, a in w.items()}


def header_end(tokenizer_path) -> int:
    """The last token of a Llama 3 chat prompt (the "\\n\\n" after the assistant header)."""
    return load_tokenizer(tokenizer_path).encode("\n\n", bos=False)[-1]


def end_ids(names_to_ids) -> dict[int, int]:
    return {TRIGGERS[name]: names_to_ids[name] for name in END_TOKENS}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The same kind of model as a Hugging Face folder and a Meta folder (Llama 3's tokenizer.model,
    128,256 tokens) and as an imported GGUF (a 128-token vocabulary with Llama 3's special tokens)."""
    llama3 = llama3_tokenizer_path()
    assert llama3.is_file(), f"{llama3} is missing: run `python tools/fetch_tokenizer.py`"
    root = tmp_path_factory.mktemp("stop")
    special = load_tokenizer(llama3).special_tokens
    config = from_meta_params(params(128256))
    ends = end_ids(special) | {DECLARED_ONLY_TRIGGER: DECLARED_ONLY, header_end(llama3): special["<|eom_id|>"]}
    weights = emitting_weights(config, ends)

    # An instruct-style Hugging Face folder: config.json names <|eot_id|> only; generation_config.json
    # adds an ordinary token; the tokenizer is the original/ one.
    hf = root / "hf"
    save_hf_checkpoint(hf, config, weights, extra_config={"bos_token_id": 128000, "eos_token_id": 128009})
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [128009, DECLARED_ONLY]}))
    (hf / "original").mkdir()
    shutil.copy(llama3, hf / "original" / "tokenizer.model")

    meta = write_meta(root / "meta", weights, params=params(128256))
    shutil.copy(llama3, meta / "tokenizer.model")

    # A GGUF whose metadata names only eos = <|eot_id|> (as Llama 3 instruct GGUFs often do).
    tokens = fixtures.byte_level_alphabet()[:fixtures.BYTES] + [m.replace(" ", "") for m in fixtures.MERGES] \
        + GGUF_SPECIALS
    small = from_meta_params(params(len(tokens)))
    gguf_path = root / "m.gguf"
    ends = end_ids({t: tokens.index(t) for t in END_TOKENS}) | {
        fixtures.byte_level_alphabet().index("Ċ"): tokens.index("<|eom_id|>")}  # "\n\n" is "Ċ" "Ċ" here
    fixtures.write_gguf(gguf_path, small, emitting_weights(small, ends),
                        fixtures.gguf.GGMLQuantizationType.F32, "llama-bpe", specials=GGUF_SPECIALS)
    gguf = import_gguf(gguf_path, root / "gguf")
    assert header_end(gguf) == fixtures.byte_level_alphabet().index("Ċ")
    return {"hf": hf, "meta": meta, "gguf": gguf}


def generate(capsys, folder, *args) -> dict:
    code, out, err = run_cli(capsys, "generate", "-m", folder, "--json", *args)
    assert code == 0, err
    return json.loads(out)


def run_cli_stdin(capsys, stdin: str, *args):
    import io
    old, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        return run_cli(capsys, *args)
    finally:
        sys.stdin = old


@functools.lru_cache(maxsize=None)
def tokenizer(folder: Path):
    return load_tokenizer(folder)


def bos_and(folder: Path, trigger: int) -> str:
    return f"{tokenizer(folder).bos_id},{trigger}"


@pytest.mark.parametrize("end", END_TOKENS)
@pytest.mark.parametrize("fmt", ["hf", "meta", "gguf"])
def test_plain_generation_stops_at_every_llama3_end_token(capsys, folders, fmt, end):
    folder = folders[fmt]
    end_id = tokenizer(folder).encode_special(end)
    out = generate(capsys, folder, "--tokens", bos_and(folder, TRIGGERS[end]), "-n", "8")
    assert (out["ids"], out["stop_reason"]) == ([end_id], "stop"), out
    assert out["text"] == ""  # the end token itself is not text


@pytest.mark.parametrize("fmt", ["hf", "meta", "gguf"])
def test_sampled_generation_stops_there_too(capsys, folders, fmt):
    """Default sampling settings: the margin leaves the sampler one candidate."""
    folder = folders[fmt]
    out = generate(capsys, folder, "--tokens", bos_and(folder, TRIGGERS["<|eom_id|>"]), "-n", "8", "--seed", "1")
    assert out["stop_reason"] == "stop" and out["ids"] == [tokenizer(folder).encode_special("<|eom_id|>")]


@pytest.mark.parametrize("fmt", ["hf", "meta", "gguf"])
def test_chat_stops_at_the_same_tokens_and_keeps_eom_in_the_dialog(capsys, folders, fmt, monkeypatch):
    """A chat prompt ends with the assistant header, whose last token ("\\n\\n") these models answer
    with <|eom_id|>: generate --chat and chat stop there. chat's next turn starts with that
    <|eom_id|> (never fed as the reply ended), and the ids fed over both turns are Meta's ChatFormat
    encoding of the dialog (llama3_turns.json, `cli_ids`). The GGUF carries a chat template, which
    would be the default: `--chat-format llama3` asks for Meta's."""
    from llama3_np.generation import Session

    folder = folders[fmt]
    eom = tokenizer(folder).encode_special("<|eom_id|>")
    out = generate(capsys, folder, "--chat", "-p", "hi", "-n", "8", "--chat-format", "llama3")
    assert (out["ids"], out["stop_reason"]) == ([eom], "stop"), out

    fed = []
    real_generate = Session.generate
    monkeypatch.setattr(Session, "generate",
                        lambda self, ids, *a, **k: fed.append(list(ids)) or real_generate(self, ids, *a, **k))
    code, _, err = run_cli_stdin(capsys, "hi\nagain\n", "chat", "-m", folder, "--chat-format", "llama3")
    assert code == 0, err
    stats = [line for line in err.splitlines() if line.startswith("prompt ")]
    assert len(stats) == 2 and all(line.endswith("stop: stop token") for line in stats), err
    assert len(fed) == 2 and fed[1][0] == eom
    if fmt != "gguf":  # Llama 3's own vocabulary
        reference = json.loads((Path(__file__).parent / "fixtures" / "tokenizer" / "llama3_turns.json").read_text())
        assert fed[0] + fed[1] == reference["cli_ids"]["end_of_message"]


@pytest.mark.parametrize("fmt", ["hf", "meta", "gguf"])
def test_every_format_knows_all_three(folders, fmt):
    ckpt = load_checkpoint(folders[fmt])
    tok = tokenizer(folders[fmt])
    ids = tok.end_of_generation_ids | set(ckpt.eos_ids)
    assert {tok.encode_special(name) for name in END_TOKENS} <= ids


def test_a_token_declared_in_generation_config_stops_too(capsys, folders):
    out = generate(capsys, folders["hf"], "--tokens", f"128000,{DECLARED_ONLY_TRIGGER}", "-n", "8")
    assert out["ids"] == [DECLARED_ONLY] and out["stop_reason"] == "stop"


@pytest.mark.parametrize("fmt", ["hf", "meta", "gguf"])
def test_ignore_eos_never_draws_an_end_token(capsys, folders, fmt):
    """llama.cpp's --ignore-eos: every end-of-generation token gets a logit of -inf, so the model's
    second choice is drawn and generation runs to -n."""
    folder = folders[fmt]
    for end in END_TOKENS:
        out = generate(capsys, folder, "--tokens", bos_and(folder, TRIGGERS[end]), "-n", "5", "--temp", "0",
                       "--ignore-eos")
        assert (out["ids"], out["stop_reason"]) == ([RUNNER_UP] * 5, "length"), (end, out)


@pytest.mark.parametrize("args", [["generate", "--chat", "-p", "hi"], ["chat"]])
def test_ignore_eos_is_refused_in_a_chat(capsys, folders, args):
    code, _, err = run_cli(capsys, args[0], "-m", folders["meta"], *args[1:], "--ignore-eos")
    assert_one_line_error(code, err, "--ignore-eos", "chat")
