"""What the commands share: the flags they have in common, reading a prompt, loading the model of
`-m`, the table that turns a library parameter's name into the flag that sets it, streaming text,
and what Ctrl-C means during a generation (`consume`).

This module defines no command; every command module imports it and the library, never another
command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .. import assets, products
from ..checks import token_ids
from ..config import ModelConfig
from ..errors import Llama3Error, ParameterError
from ..generation import Generation, Step
from ..load import DEFAULT_CTX, LoadedModel, load_model
from ..sampling import DEFAULT_SAMPLERS, SAMPLER_ORDERS, SamplingParams, parse_samplers
from ..text.tokenizer import StreamDecoder
from ..xcheck.bench import peak_rss_mb
from ..xcheck.dump import Inputs, config_differences, describe_differences, read_dump

# Library parameter -> the flag that sets it. A ParameterError about one of these is reported with
# the flag in front.
FLAGS = {
    "temperature": "--temp", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
    "repeat_penalty": "--repeat-penalty", "max_new": "-n", "ctx": "--ctx", "stages": "--stages",
    "nmse_tol": "--tol", "rel_tol": "--rel-tol", "batch": "--batch", "chunks": "--chunks",
    "kl_base": "--kl-base", "prompt_tokens": "--prompt", "new_tokens": "--new", "runs": "--runs",
    "layers": "--layers", "samplers": "--samplers",
}


def error_message(e: Llama3Error) -> str:
    """The one line the command line prints for a library error: flags, not parameter names."""
    if isinstance(e, ParameterError) and e.parameter in FLAGS:
        return f"{FLAGS[e.parameter]}: {e}"
    return str(e)


# ---------------------------------------------------------------------------------------------
# Flags


def thread_count(text: str) -> int:
    """argparse type of -t/--threads: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"takes a number of threads >= 1, got {text!r}")
    return n


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags of every command that loads a model and computes with it."""
    p.add_argument("-m", "--model", metavar="DIR",
                   help="checkpoint folder (Hugging Face or Meta format); default: the embedded default model")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weight residency: float32 (fast) or bfloat16 (half the memory)")
    p.add_argument("--rope-factor", type=float, metavar="F",
                   help="override the llama3 rope scaling factor of a Meta params.json")
    p.add_argument("-t", "--threads", type=thread_count, default=products.default_threads(), metavar="N",
                   help=f"threads to compute with (default: one per core, here {products.default_threads()})")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    d = SamplingParams()
    p.add_argument("-n", "--n-predict", type=int, default=128, metavar="N",
                   help="tokens to generate; -1: until a stop token or the context is full (default 128)")
    p.add_argument("--temp", type=float, default=d.temperature, help=f"temperature; 0 = greedy (default {d.temperature})")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"0 = off (default {d.top_k})")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"1 = off (default {d.top_p})")
    p.add_argument("--min-p", type=float, default=d.min_p, help=f"0 = off (default {d.min_p})")
    p.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty,
                   help=f"penalty on the last 64 tokens; 1 = off (default {d.repeat_penalty})")
    orders = ", ".join(f"{name} = {';'.join(order)}" for name, order in SAMPLER_ORDERS.items())
    p.add_argument("--samplers", default=";".join(DEFAULT_SAMPLERS), metavar="SAMPLERS",
                   help="the samplers to apply, in order, separated by ';', with llama.cpp's names (penalties, "
                        "top_k, top_p, min_p, temperature); a sampler left out is not applied. Or an order by "
                        f"name: {orders}. Each filter acts on the renormalised survivors of the one before "
                        "(default: llama.cpp's order)")
    p.add_argument("--seed", type=int, help="random seed (default: a random one, printed with the statistics)")
    p.add_argument("--ctx", type=int, metavar="N",
                   help=f"context size in tokens (default: the model's, at most {DEFAULT_CTX})")
    p.add_argument("--ignore-eos", action="store_true",
                   help="never draw an end-of-generation token (their logits become -inf, as in llama.cpp): "
                        "generate until -n or a full context; not with --chat")


def add_input_args(p: argparse.ArgumentParser, what: str) -> None:
    """-p/-f/--tokens/--like and --pos: the tokens of one forward pass (dump, trace)."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help="text to run (tokenized as the model's tokenizer does)")
    src.add_argument("-f", "--file", help="read the text from a UTF-8 file")
    src.add_argument("--tokens", help="comma-separated token ids (no tokenizer needed)")
    src.add_argument("--like", metavar="DUMP",
                     help=f"{what} the tokens, positions and KV-cache context recorded in another dump file "
                          "(of the same model, from any checkpoint format)")
    p.add_argument("--pos", type=int, metavar="N", help="rope position of the first token (default 0)")


def sampling_params(args) -> SamplingParams:
    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repeat_penalty=args.repeat_penalty, samplers=parse_samplers(args.samplers))


def seeded_rng(args) -> tuple[int, np.random.Generator]:
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**32)
    if seed < 0:
        raise Llama3Error(f"--seed must be >= 0, got {seed}")
    return seed, np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# Inputs


def model_dir(arg: Optional[str]) -> Path:
    """The checkpoint folder named by -m, or the embedded default model when -m is not given."""
    if arg is not None:
        path = Path(arg)
        if not path.exists():
            raise Llama3Error(f"model folder {arg} does not exist: pass -m the folder of a Llama 3 "
                              "checkpoint (Hugging Face or Meta format)")
        return path
    return assets.default_model_dir()


def load(args, need_tokenizer: bool) -> LoadedModel:
    """The model of -m, --dtype and --rope-factor."""
    return load_model(model_dir(args.model), dtype=args.dtype, rope_factor=args.rope_factor,
                      need_tokenizer=need_tokenizer)


def read_prompt(args) -> Optional[str]:
    if args.file is not None:
        path = Path(args.file)
        if not path.exists():
            raise Llama3Error(f"prompt file {args.file} does not exist: pass -f the path of a UTF-8 text file")
        if path.is_dir():
            raise Llama3Error(f"prompt file {args.file} is a folder: pass -f the path of a UTF-8 text file")
        data = path.read_bytes()  # a regular file, or a pipe such as -f <(command)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Llama3Error(f"prompt file {args.file} is not UTF-8 text (byte 0x{data[e.start]:02x} "
                              f"at offset {e.start}): convert it to UTF-8") from None
    return args.prompt


def parse_token_ids(text: str, vocab_size: int) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise Llama3Error(f"--tokens takes comma-separated integers, got {text!r}") from None
    return token_ids(ids, vocab_size).tolist()


def load_with_inputs(args) -> tuple[LoadedModel, Inputs]:
    """The model of -m (with its tokenizer when the input is text) and the inputs to run; what
    the user should know about them (`Inputs.notes`) goes to stderr."""
    if args.prompt is None and args.file is None and args.tokens is None and args.like is None:
        raise Llama3Error("give the input: -p TEXT, -f FILE, --tokens 1,2,3 or --like DUMP")
    loaded = load(args, need_tokenizer=args.prompt is not None or args.file is not None)
    encode = loaded.tokenizer.encode if loaded.tokenizer is not None else None
    inputs = resolve_inputs(args, loaded.config, encode, loaded.checkpoint.path)
    for note in inputs.notes:
        print(f"note: {note}", file=sys.stderr)
    return loaded, inputs


def resolve_inputs(args, config: ModelConfig, encode: Optional[Callable[[str], list[int]]], model) -> Inputs:
    """The tokens named by -p/-f/--tokens/--like (and --pos), checked against the model's config.

    encode: the model's tokenizer (text -> ids, as the model adds BOS), needed for -p/-f only.
    Also used by tools/torch_dump.py, so that both sides of a comparison read their input alike.
    """
    if args.pos is not None and args.pos < 0:
        raise Llama3Error(f"--pos must be >= 0, got {args.pos}")
    if args.pos is not None and args.like is not None:
        raise Llama3Error("--pos goes with -p/-f/--tokens; --like takes the positions of its dump")
    pos = args.pos or 0
    if args.like is not None:
        like = read_dump(args.like)
        in_math, outside = config_differences(like.config(), config) if like.config() is not None else ({}, {})
        if in_math:
            raise Llama3Error(f"--like {args.like} was made from a different model than {model} "
                              f"(config {describe_differences(in_math)}): pass the same checkpoint")
        inputs = like.inputs()
        inputs.notes = [f"the config recorded in --like {args.like} differs from {model}'s only in what no "
                        f"stage computes: {describe_differences(outside)}"] if outside else []
        if not inputs.tokens:
            raise Llama3Error(f"--like {args.like}: its metadata has no 'tokens' to run")
    elif args.tokens is not None:
        inputs = Inputs(parse_token_ids(args.tokens, config.vocab_size), pos, [], pos)
    else:
        text = read_prompt(args)
        if text is None:
            raise Llama3Error("give the input: -p TEXT, -f FILE, --tokens 1,2,3 or --like DUMP")
        if text == "":
            raise Llama3Error("the text is empty: give some text")
        inputs = Inputs(encode(text), pos, [], pos)
    inputs.check(config)
    return inputs


# ---------------------------------------------------------------------------------------------
# Output


def stats_line(loaded: LoadedModel, out: Generation, seed: int) -> str:
    return (f"load {loaded.load_seconds:.2f} s | prompt {len(out.prompt_ids)} tokens, "
            f"{out.prefill_tokens_per_second:.1f} tok/s | generated {len(out.ids)} tokens, "
            f"{out.decode_tokens_per_second:.1f} tok/s | {products.get_threads()} threads | "
            f"peak RSS {peak_rss_mb():.0f} MB | "
            f"seed {seed} | stop: {out.stop_reason}")


class Printer:
    """Streams generated ids to stdout as UTF-8 text (ids themselves when there is no tokenizer)."""

    def __init__(self, tokenizer, stop_ids):
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.stream = sys.stdout.buffer

    def __call__(self, step: Step) -> None:
        if step.token in self.stop_ids:
            return
        text = self.decoder.push(step.token) if self.decoder else f"{step.token} "
        self.write(text)

    def write(self, text: str) -> None:
        if text:
            self.stream.write(text.encode("utf-8"))
            self.stream.flush()

    def finish(self) -> None:
        self.write((self.decoder.flush() if self.decoder else "") + "\n")


def consume(generation: Generation, on_step) -> Generation:
    """Run a generation, handing each step to `on_step`. Ctrl-C ends it early, with stop reason
    "interrupted"; what was printed stays, and the session keeps what its cache holds."""
    try:
        for step in generation:
            on_step(step)
    except KeyboardInterrupt:
        generation.stop_reason = "interrupted"
    return generation
