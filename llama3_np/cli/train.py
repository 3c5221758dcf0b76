"""`llama3-np train`: train a Llama 3 model from scratch or fine-tune a checkpoint on text files
(`llama3_np.train`), writing Hugging Face checkpoints that resume bit for bit."""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import fields
from pathlib import Path

from ..errors import Llama3Error
from ..files import make_folder
from ..formats.checkpoint import load_checkpoint
from ..formats.gguf_file import is_gguf
from ..lora import TARGETS, LoraConfig
from ..train import (CHECKPOINT_PREFIX, PRESETS, TOKENIZER_FILES, Trainer, TrainingArguments, checkpoints,
                     init_weights, pack, save_checkpoint, scratch_config)
from .common import add_model_args, load, model_dir, read_text_file

def add_command(sub) -> None:
    p = sub.add_parser("train", help="train a model from scratch or fine-tune a checkpoint on text files",
                       description="Train with AdamW on the next-token cross-entropy of text files (each file a "
                                   "document framed by BOS/EOS, packed into sequences). Checkpoints are Hugging "
                                   "Face folders in OUT_DIR/checkpoint-STEP with the optimizer state; --resume "
                                   "continues the latest bit for bit; Ctrl-C saves one and stops. Setting names "
                                   "follow transformers' TrainingArguments.")
    add_model_args(p)
    d = TrainingArguments()
    p.add_argument("-f", "--file", nargs="+", required=True, metavar="FILE", help="training text files (UTF-8)")
    p.add_argument("--val-file", nargs="+", metavar="FILE", help="held-out text for validation loss and perplexity")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the checkpoints")
    p.add_argument("--from-scratch", metavar="SHAPE",
                   help=f"train new weights of this shape ({', '.join(PRESETS)}, or a config.json file) with "
                        "-m's tokenizer, instead of fine-tuning -m's weights")
    p.add_argument("--lora-r", type=int, metavar="R",
                   help="train LoRA adapters of rank R on the frozen weights instead of every weight (peft's r); "
                        "checkpoints are then peft adapter folders, run with -m BASE --lora ADAPTER_DIR")
    p.add_argument("--lora-alpha", type=float, default=16, metavar="A", help="peft's lora_alpha: the adapters are "
                   "scaled by A/R (default 16)")
    p.add_argument("--lora-target", default="q_proj,v_proj", metavar="NAMES",
                   help=f"projections to adapt, comma-separated (peft's target_modules: {', '.join(TARGETS)}; "
                        "default q_proj,v_proj)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT_DIR from its latest checkpoint")
    p.add_argument("--max-steps", type=int, default=d.max_steps, metavar="N",
                   help=f"optimizer steps (default {d.max_steps})")
    p.add_argument("--seq-len", type=int, default=d.seq_len, metavar="N",
                   help=f"tokens per training sequence (default {d.seq_len})")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=d.batch_size, metavar="N",
                   help=f"sequences per step, their gradients averaged (default {d.batch_size})")
    p.add_argument("-lr", "--learning-rate", type=float, default=d.learning_rate, metavar="LR",
                   help=f"peak learning rate (default {d.learning_rate})")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, metavar="N",
                   help=f"steps of linear warmup before the cosine decay to 0 (default {d.warmup_steps})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW's (default {d.weight_decay})")
    p.add_argument("--adam-beta1", type=float, default=d.adam_beta1, help=f"(default {d.adam_beta1})")
    p.add_argument("--adam-beta2", type=float, default=d.adam_beta2, help=f"(default {d.adam_beta2})")
    p.add_argument("--adam-epsilon", type=float, default=d.adam_epsilon, help=f"(default {d.adam_epsilon})")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help=f"clip the gradients' global norm to this (default {d.max_grad_norm})")
    p.add_argument("--eval-steps", type=int, default=d.eval_steps, metavar="N",
                   help=f"validate every N steps (default {d.eval_steps})")
    p.add_argument("--save-steps", type=int, default=d.save_steps, metavar="N",
                   help=f"write a checkpoint every N steps, and at the end (default {d.save_steps})")
    p.add_argument("-s", "--seed", type=int, default=d.seed, help=f"seed of the data order and new weights (default {d.seed})")
    p.set_defaults(func=run)


def parse_training_arguments(args) -> TrainingArguments:
    return TrainingArguments(**{f.name: getattr(args, f.name) for f in fields(TrainingArguments)})


def run(args) -> int:
    out = Path(args.output)
    targs = parse_training_arguments(args)
    if out.exists() and not out.is_dir():
        raise Llama3Error(f"-o {out}: is a file; name a folder for the checkpoints")
    if args.resume and not (out.is_dir() and checkpoints(out)):
        raise Llama3Error(f"-o {out}: holds no checkpoint to resume; train without --resume first")
    if not args.resume and out.is_dir() and any(out.iterdir()):
        raise Llama3Error(f"-o {out}: exists and is not empty; continue its run with --resume, or name a new folder")
    # From scratch, -m gives only the tokenizer and vocabulary: its weights stay mapped, unconverted
    # (a GGUF file's in its own blocks).
    unconverted = "gguf" if args.from_scratch and is_gguf(model_dir(args.model)) else "bfloat16"
    lora = None if args.lora_r is None else LoraConfig(args.lora_r, args.lora_alpha, tuple(args.lora_target.split(",")))
    if lora is not None and args.from_scratch:
        raise Llama3Error("--lora-r trains adapters on a model's weights; new weights (--from-scratch) train whole")
    loaded = load(argparse.Namespace(**{**vars(args), "dtype": unconverted}) if args.from_scratch else args,
                  need_tokenizer=True)
    tok = loaded.need_tokenizer()
    config = loaded.config if args.from_scratch is None else scratch_config(args.from_scratch, loaded.config.vocab_size)
    if targs.seq_len > config.max_seq_len:
        raise Llama3Error(f"--seq-len {targs.seq_len}: the model's context is {config.max_seq_len} tokens")

    def tokenized(paths):
        return pack([tok.encode(read_text_file(p, "text file"), bos=False) for p in paths], targs.seq_len,
                    tok.bos_id if tok.add_bos else None, tok.eos_id)

    train = tokenized(args.file)
    validation = tokenized(args.val_file) if args.val_file else None
    tokenizer_dir = loaded.checkpoint.tokenizer_dir or loaded.checkpoint.path
    extra = {name: (tokenizer_dir / name).read_bytes() for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()}
    if args.resume:
        latest = checkpoints(out)[-1]
        if lora is None:
            ckpt = load_checkpoint(latest, dtype="float32")
            trainer = Trainer.resume(latest, ckpt.weights, ckpt.config, train, validation, targs)
        else:
            trainer = Trainer.resume(latest, loaded.weights, config, train, validation, targs, lora)
        print(f"resuming {latest} at step {trainer.step}", file=sys.stderr)
    else:
        weights = loaded.weights if args.from_scratch is None else init_weights(config, targs.seed)
        trainer = Trainer(weights, config, train, validation, targs, lora=lora)
    make_folder(out)
    n_params = sum(a.size for k, a in trainer.parameters().items() if not (k == "output.weight" and config.tie_embeddings))
    print(f"training {n_params / 1e6:.1f}M parameters on {len(train)} sequences of {targs.seq_len} tokens "
          f"({len(train) * targs.seq_len} tokens), {targs.batch_size} per step", file=sys.stderr)
    status = StatusPrinter(targs.max_steps)
    if validation is not None and trainer.step == 0:
        loss = trainer.evaluate()
        status.say(f"step 0: validation loss {loss:.4f}, perplexity {math.exp(min(loss, 700)):.2f}")
    try:
        while trainer.step < targs.max_steps:
            report = trainer.train_step()
            status.print_step(report)
            if validation is not None and (trainer.step % targs.eval_steps == 0 or trainer.step == targs.max_steps):
                loss = trainer.evaluate()
                trainer.history[-1]["eval_loss"] = loss
                status.say(f"step {trainer.step}: validation loss {loss:.4f}, perplexity {math.exp(min(loss, 700)):.2f}")
            if trainer.step % targs.save_steps == 0 or trainer.step == targs.max_steps:
                status.say(f"step {trainer.step}: saved {save_checkpoint(trainer, out, extra)}")
    except KeyboardInterrupt:
        if trainer.step and not (out / f"{CHECKPOINT_PREFIX}{trainer.step}").exists():
            status.say(f"step {trainer.step}: saved {save_checkpoint(trainer, out, extra)}")
        raise
    return 0


class StatusPrinter:
    """The run's progress on stderr: one line per step (redrawn in place on a terminal) with the
    loss, learning rate, gradient norm, tokens per second and time left."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start, self.steps, self.tokens = time.perf_counter(), 0, 0

    def print_step(self, r) -> None:
        self.steps += 1
        self.tokens += r.tokens
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.steps * (self.total - r.step)
        line = (f"step {r.step}/{self.total}  loss {r.loss:.4f}  lr {r.learning_rate:.2e}  |g| {r.grad_norm:.3f}  "
                f"{self.tokens / elapsed:.0f} tok/s  {int(left) // 60}:{int(left) % 60:02d} left")
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        self.stream.flush()

    def say(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()
