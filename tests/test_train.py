"""Training (`llama3_np.train`, `llama3-np train`): checkpoints transformers loads with the same
logits, resumption bit for bit (after Ctrl-C too), packing, and every bad input as one line.

The transformers logits come from tests/fixtures/grad/trained_checkpoint_logits.safetensors
(`python tools/make_grad_fixtures.py`): the same two training steps run by the tool, the checkpoint
written by `Trainer.save` and loaded by `LlamaForCausalLM.from_pretrained`. Tolerance: NMSE 1e-10
(measured 1.8e-13: llama3_np and transformers float32 differ by summation order only).
"""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from llama3_np.cli import main
from llama3_np.formats.checkpoint import load_checkpoint
from llama3_np.model import forward
from llama3_np.train import Trainer, TrainingArguments, pack
from tests.helpers import assert_close

GRAD = Path(__file__).parent / "fixtures" / "grad"


def replay_fixture_run(name: str, n_sequences: int, lora: bool = False):
    """The training run a fixture of tools/make_grad_fixtures.py recorded, repeated by llama3_np:
    (trainer after its steps, the base checkpoint, the fixture's tensors, its metadata)."""
    from llama3_np.lora import LoraConfig

    path = GRAD / name
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    s = json.loads(meta["settings"])
    ckpt = load_checkpoint(GRAD / s.pop("variant"), dtype="float32")
    adapters = LoraConfig(s.pop("r"), s.pop("lora_alpha"), tuple(s.pop("target_modules"))) if lora else None
    args = TrainingArguments(max_steps=s.pop("steps"), **{"warmup_steps": 0, **s})
    sequences = np.random.default_rng(int(meta["sequences_seed"])).integers(0, ckpt.config.vocab_size,
                                                                          (n_sequences, args.seq_len + 1))
    trainer = Trainer(ckpt.weights, ckpt.config, sequences, None, args, lora=adapters)
    while trainer.step < args.max_steps:
        trainer.train_step()
    return trainer, ckpt, load_file(str(path)), meta


def test_a_trained_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path):
    trainer, _, ref, meta = replay_fixture_run("trained_checkpoint_logits.safetensors", 6)
    trainer.save(tmp_path / "checkpoint")
    saved = load_checkpoint(tmp_path / "checkpoint", dtype="float32")
    assert json.loads((tmp_path / "checkpoint" / "config.json").read_text())["torch_dtype"] == "float32"
    logits = forward(saved.weights, saved.config, json.loads(meta["probe"]))
    assert_close(logits, ref["logits"], "logits of the trained checkpoint", 1e-10)


def test_pack_frames_documents_and_cuts_overlapping_windows():
    seqs = pack([[5, 6, 7], [8, 9]], 3, bos=1, eos=2)  # stream 1 5 6 7 2 1 8 9 2
    assert seqs.tolist() == [[1, 5, 6, 7], [7, 2, 1, 8]]


# ---------------------------------------------------------------------------------------------
# The command


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "the", "a", "of", "model", "token", "NumPy"]
    path = tmp_path / "train.txt"
    path.write_text(" ".join(rng.choice(words, 600)) + "\n")
    return path


def train(tmp_path, corpus, out, *extra):
    return main(["train", "--from-scratch", "tiny", "-f", str(corpus), "-o", str(out), "--seq-len", "16",
                 "--batch-size", "2", "--max-steps", "4", "--save-steps", "2", "-lr", "1e-2", "--warmup-steps",
                 "1", "-t", "1", *extra])


def checkpoint_bytes(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ("model.safetensors", "optimizer.safetensors")}


def test_a_run_stopped_by_ctrl_c_resumes_bit_for_bit(tmp_path, corpus, monkeypatch, capsys):
    assert train(tmp_path, corpus, tmp_path / "whole") == 0
    steps = []
    original = Trainer.train_step

    def interrupted(self):
        if self.step == 3:
            raise KeyboardInterrupt
        steps.append(self.step)
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    assert train(tmp_path, corpus, tmp_path / "stopped") == 130
    monkeypatch.setattr(Trainer, "train_step", original)
    assert sorted(p.name for p in (tmp_path / "stopped").iterdir()) == ["checkpoint-2", "checkpoint-3", "loss.png"]
    assert train(tmp_path, corpus, tmp_path / "stopped", "--resume") == 0
    assert "resuming" in capsys.readouterr().err
    assert checkpoint_bytes(tmp_path / "stopped" / "checkpoint-4") == checkpoint_bytes(tmp_path / "whole" / "checkpoint-4")
    state = json.loads((tmp_path / "whole" / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [1, 2, 3, 4]
    assert state["history"][-1]["loss"] < state["history"][0]["loss"]


def empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    return path


def bad_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
                                "num_attention_heads": 5, "num_key_value_heads": 5, "max_position_embeddings": 64}))
    return ["--from-scratch", str(path)]


@pytest.mark.parametrize("make_args,message", [
    (lambda tmp: ["-lr", "0"], "--learning-rate: learning rate must be > 0"),
    (lambda tmp: ["--batch-size", "0"], "--batch-size: the batch size must be >= 1"),
    (lambda tmp: ["--max-grad-norm", "-1"], "--max-grad-norm: the gradient norm limit must be > 0"),
    (lambda tmp: ["--adam-beta2", "1"], "--adam-beta1/--adam-beta2: betas must be in [0, 1)"),
    (lambda tmp: ["--seq-len", "100000"], "--seq-len 100000: the model's context is 256 tokens"),
    (lambda tmp: ["-f", str(empty_file(tmp))], "the text is 1 tokens long; a sequence needs 17"),
    (bad_config, "not divisible"),
    (lambda tmp: ["--lora-r", "4"], "--lora-r trains adapters on a model's weights"),
])
def test_bad_settings_end_in_one_line_and_write_nothing(tmp_path, corpus, capsys, make_args, message):
    out = tmp_path / "out"
    args = make_args(tmp_path)
    if args[0] == "--from-scratch":
        code = main(["train", *args, "-f", str(corpus), "-o", str(out), "--seq-len", "16"])
    else:
        code = train(tmp_path, corpus, out, *args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())


def test_an_output_folder_of_something_else_is_refused(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert train(tmp_path, corpus, out) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert train(tmp_path, corpus, tmp_path / "empty", "--resume") == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------------------------------
# LoRA


def lora_run(tmp_path):
    trainer, ckpt, ref, meta = replay_fixture_run("lora_peft.safetensors", 4, lora=True)
    trainer.save(tmp_path / "adapter")
    return trainer, ckpt, ref, json.loads(meta["probe"])


def test_a_lora_adapter_loads_in_peft_with_the_same_logits_and_gradients(tmp_path):
    from llama3_np.backward import loss_and_gradients
    from llama3_np.lora import adapted, adapter_gradients, load_adapter

    trainer, ckpt, ref, probe = lora_run(tmp_path)
    adapter, lora = load_adapter(tmp_path / "adapter", ckpt.config)
    assert lora == trainer.lora and all(np.array_equal(adapter[k], trainer.adapter[k]) for k in trainer.adapter)
    weights = adapted(ckpt.weights, adapter, lora.scale)
    assert_close(forward(weights, ckpt.config, probe), ref["logits"], "logits with the adapter unmerged vs peft", 1e-10)
    _, grads = loss_and_gradients(weights, ckpt.config, probe)
    for key, g in adapter_gradients(grads, adapter, lora.scale).items():
        assert_close(g, ref[f"grad.{key}"], f"d{key} vs peft's autograd", 1e-10)
    merged = {k: np.asarray(w) for k, w in weights.items()}
    assert_close(forward(merged, ckpt.config, probe), ref["merged_logits"], "merged logits vs peft's merge_and_unload",
                 1e-10)


def test_generate_with_an_unmerged_lora_equals_the_merged_weights(tmp_path, capsys):
    from llama3_np.lora import adapted, load_adapter
    from llama3_np.formats.checkpoint import save_hf_checkpoint

    trainer, ckpt, _, probe = lora_run(tmp_path)
    adapter, lora = load_adapter(tmp_path / "adapter", ckpt.config)
    merged = {k: np.asarray(w) for k, w in adapted(ckpt.weights, adapter, lora.scale).items()}
    save_hf_checkpoint(tmp_path / "merged", ckpt.config, merged, dtype=np.float32)
    tokens = ",".join(map(str, probe))
    runs = {}
    for name, model in (("lora", ["-m", str(GRAD / "llama3_0"), "--lora", str(tmp_path / "adapter")]),
                        ("merged", ["-m", str(tmp_path / "merged")])):
        assert main(["generate", *model, "--tokens", tokens, "-n", "12", "--temp", "0", "--ignore-eos", "--json"]) == 0
        runs[name] = json.loads(capsys.readouterr().out)["ids"]
    assert runs["lora"] == runs["merged"]


def test_a_lora_target_that_names_no_projection_is_refused(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    code = main(["train", "-f", str(corpus), "-o", str(out), "--lora-r", "4", "--lora-target", "q_proj,attn"])
    err = capsys.readouterr().err
    assert code == 2 and "--lora-target: attn names no projection" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_an_output_folder_under_a_file_is_one_line(tmp_path, corpus, capsys):
    (tmp_path / "afile").write_text("")
    assert train(tmp_path, corpus, tmp_path / "afile" / "sub") == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and len(err.strip().splitlines()) == 1, err
