"""What the commands share: the flags they have in common, reading a prompt, loading the model of
`-m`, the table that turns a library parameter's name into the flag that sets it, streaming text,
what Ctrl-C means during a generation (`consume`), and the statistics line.

This module defines no command; every command module imports it and the library, never another
command.
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .. import assets, products
from ..checks import token_ids
from ..config import COMPUTE_DTYPES, CONVENTIONS, ModelConfig
from ..errors import Llama3Error, ParameterError
from ..generation import PREFILL_CHUNK, Generation, Step
from ..load import DEFAULT_CTX, LoadedModel, load_model
from ..sampling import (DEFAULT_SAMPLERS, SAMPLER_CHARS, SAMPLER_NAMES, SAMPLER_ORDERS, SamplingParams,
                        parse_sampler_chars, parse_samplers)
from ..text.chat import CHAT_FORMATS
from ..text.pieces import format_pieces, pieces
from ..text.template import read_template_file
from ..text.tools import read_tools
from ..text.stop import StopText
from ..xcheck.bench import peak_rss_mb
from ..xcheck.dump import Inputs, resolve_inputs

# Library parameter -> the flag that sets it. A ParameterError about one of these is reported with
# the flag in front.
FLAGS = {
    "temperature": "--temp", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
    "repeat_penalty": "--repeat-penalty", "max_new": "-n", "ctx": "--ctx-size", "stages": "--stages",
    "nmse_tol": "--tol", "rel_tol": "--rel-tol", "batch": "--batch-size", "chunks": "--chunks",
    "kl_base": "--kl-base", "kl_divergence_base": "--kl-divergence-base", "prompt_tokens": "--prompt", "new_tokens": "--new", "runs": "--runs",
    "layers": "--layers", "samplers": "--samplers", "repeat_last_n": "--repeat-last-n",
    "presence_penalty": "--presence-penalty", "frequency_penalty": "--frequency-penalty", "typical_p": "--typical",
    "top_n_sigma": "--top-nsigma", "dry_multiplier": "--dry-multiplier", "dry_base": "--dry-base",
    "dry_allowed_length": "--dry-allowed-length", "dry_penalty_last_n": "--dry-penalty-last-n",
    "dry_sequence_breakers": "--dry-sequence-breaker", "xtc_probability": "--xtc-probability",
    "xtc_threshold": "--xtc-threshold", "top_n": "--top-n", "chat_format": "--chat-format", "tools": "--tools",
    "stop": "-r",
    "lr": "--learning-rate", "betas": "--adam-beta1/--adam-beta2", "eps": "--adam-epsilon",
    "weight_decay": "--weight-decay", "max_grad_norm": "--max-grad-norm", "max_steps": "--max-steps",
    "seq_len": "--seq-len", "batch_size": "--batch-size", "warmup_steps": "--warmup-steps",
    "eval_steps": "--eval-steps", "save_steps": "--save-steps", "lora_r": "--lora-r", "lora_target": "--lora-target",
    "pos": "--pos", "like": "--like", "k": "--explain",
    "compute": "--compute", "convention": "--convention", "dtype": "--dtype",
    "parallel": "-np",
}


# llama.cpp's flags (its common/arg.cpp) that llama3_np does not take: (spellings, what the flag
# does in llama.cpp, what llama3_np does instead or what to do). Every command refuses them by name, unless it
# takes that flag itself; unknown to argparse, -ngl 99 would be read as -n gl and -fa as -f a.
LLAMA_CPP_ONLY_FLAGS = [
    (("-ngl", "--gpu-layers", "--n-gpu-layers"), "offloads layers to a GPU", "llama3_np runs on the CPU"),
    (("-sm", "--split-mode", "-ts", "--tensor-split", "-mg", "--main-gpu", "-dev", "--device", "--list-devices",
      "-kvo", "--kv-offload", "-nkvo", "--no-kv-offload", "-ot", "--override-tensor", "--rpc"),
     "places work on GPUs or other devices", "llama3_np runs on the CPU"),
    (("-fa", "--flash-attn"), "selects a flash-attention kernel",
     "llama3_np computes attention one way, the specification's (model.attention)"),
    (("-ctk", "--cache-type-k", "-ctv", "--cache-type-v"), "sets the data type of the KV cache",
     "llama3_np's KV cache holds the compute mode's dtype: choose it with --compute"),
    (("-np", "--parallel"), "decodes several sequences at once",
     "generate -f FILE -np N does, for the prompts of a file; this command decodes one sequence"),
    (("-ns", "--sequences", "-cb", "--cont-batching", "-nocb", "--no-cont-batching"),
     "sets how parallel sequences are scheduled", "generate -np N takes the next prompt as soon as one ends, always"),
    (("-cnv", "--conversation", "-no-cnv", "--no-conversation", "-i", "--interactive", "-if", "--interactive-first",
      "-st", "--single-turn", "-mli", "--multiline-input"), "switches between completion and conversation",
     "use the chat command for a conversation and generate for a completion"),
    (("-co", "--color"), "colours the output",
     "chat colours the user's and the model's text on a terminal by itself (NO_COLOR turns it off)"),
    (("--mlock", "--mmap", "--no-mmap"), "controls how the weights are mapped into memory",
     "--dtype bfloat16 keeps them memory-mapped, float32 converts them once"),
    (("-b", "--batch-size", "-ub", "--ubatch-size"), "sets how many prompt tokens a forward call takes",
     f"llama3_np feeds a prompt {PREFILL_CHUNK} tokens at a time (perplexity takes -b)"),
    (("-tb", "--threads-batch"), "sets the threads of the prompt apart",
     "-t/--threads sets the threads of the prompt and of generation"),
    (("-C", "--cpu-mask", "-Cr", "--cpu-range", "--cpu-strict", "--prio", "--poll", "--numa"),
     "places threads on cores", "the operating system places llama3_np's threads (taskset does it by hand)"),
    (("--rope-freq-base", "--rope-freq-scale", "--rope-scaling", "--rope-scale", "--yarn-orig-ctx",
      "--yarn-ext-factor", "--yarn-attn-factor", "--yarn-beta-slow", "--yarn-beta-fast"), "overrides the model's rope",
     "the checkpoint's config decides; --rope-factor overrides the factor of a Meta params.json"),
    (("--display-prompt", "--no-display-prompt"), "shows or hides the prompt",
     "llama3_np shows the prompt only when asked: generate --echo"),
    (("--kl-divergence-base", "--save-all-logits", "--kl-divergence"), "saves or compares logits",
     "perplexity takes them: perplexity -f TEXT --kl-divergence-base FILE writes a base, "
     "perplexity --kl-divergence-base FILE --kl-divergence compares with it"),
    (("--mirostat", "--mirostat-lr", "--mirostat-ent", "--dynatemp-range", "--dynatemp-exp", "-l", "--logit-bias", "--grammar", "--grammar-file", "-j", "--json-schema", "-jf",
      "--json-schema-file"), "is a sampler or constraint llama3_np does not have",
     "generate --help lists the samplers llama3_np has (--samplers)"),
    (("-hf", "-hfr", "--hf-repo", "-hff", "--hf-file", "-hft", "--hf-token", "-mu", "--model-url"),
     "downloads a model",
     "llama3_np uses no network: download the model yourself and pass -m its folder or .gguf file"),
    (("--jinja", "--chat-template", "--chat-template-file"), "chooses the chat template",
     "a checkpoint's template is used by default; --chat-format llama3, chatml or template chooses"),
    (("--in-prefix", "--in-suffix", "--in-prefix-bos", "-e", "--escape", "--no-escape",
      "--keep", "--prompt-cache", "--prompt-cache-all", "--prompt-cache-ro", "--lora-scaled",
      "--control-vector", "-sysf", "--system-prompt-file", "-sp", "--special", "--no-warmup", "-v", "--verbose",
      "--log-disable", "--log-file"), "is a llama.cpp feature llama3_np does not have",
     "the command's --help lists the flags it takes"),
    (("-r", "--reverse-prompt"), "stops generation at a string", "generate takes it; chat does not yet"),
]


class RefusedFlag(argparse.Action):
    """A llama.cpp flag llama3_np does not take: refused with what it does and what to do instead
    (an optional value is swallowed, so the error names the flag and not its value)."""

    def __init__(self, option_strings, dest, does: str, instead: str):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
        self.does, self.instead = does, instead

    def __call__(self, parser, namespace, values, option_string=None):
        raise Llama3Error(f"{option_string} {self.does}; {self.instead}")


def refuse_llama_cpp_flags(p: argparse.ArgumentParser) -> None:
    """Make the command `p` refuse every flag of LLAMA_CPP_ONLY_FLAGS it does not take itself."""
    taken = {s for action in p._actions for s in action.option_strings}
    for flags, does, instead in LLAMA_CPP_ONLY_FLAGS:
        refused = [f for f in flags if f not in taken]
        if refused:
            p.add_argument(*refused, action=RefusedFlag, does=does, instead=instead)


def error_message(e: Llama3Error) -> str:
    """The one line the command line prints for a library error: flags, not parameter names."""
    if isinstance(e, ParameterError) and e.parameter in FLAGS:
        return f"{FLAGS[e.parameter]}: {e}"
    return str(e)


# ---------------------------------------------------------------------------------------------
# Flags


def count_of(things: str):
    """The argparse type of a flag that takes a number of `things`: an integer >= 1."""
    def count(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = 0
        if n < 1:
            raise argparse.ArgumentTypeError(f"takes a number of {things} >= 1, got {text!r}")
        return n
    return count


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags of every command that loads a model and computes with it."""
    p.add_argument("-m", "--model", metavar="DIR",
                   help="checkpoint folder (Hugging Face or Meta format) or .gguf file; default: the default model")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "gguf"],
                   help="weight residency: float32 (fast), bfloat16 (half the memory; a GGUF's quantized "
                        "values only where bfloat16 holds them exactly) or gguf (a GGUF file's own "
                        "quantized blocks, dequantized row block by row block in each product); default "
                        "float32, or the --compute dtype for bfloat16 and float16; for llamacpp the stored "
                        "types (gguf for a GGUF file)")
    p.add_argument("--compute", choices=COMPUTE_DTYPES, default="float32",
                   help="what every stage computes in: float32 (default); float64 (the exact value, weights "
                        "upcast); bfloat16 or float16 (an engine's arithmetic, emulated: products accumulated "
                        "in float32, each stage rounded to the dtype where the engine rounds it, KV cache in "
                        "the dtype; llama3_np/model.py cites the cast points); llamacpp (llama.cpp's CPU "
                        "arithmetic on a GGUF: activations quantized to Q8 blocks before each product with a "
                        "quantized weight, KV cache in float16; llama3_np/llamacpp.py)")
    p.add_argument("--convention", choices=CONVENTIONS, default="transformers",
                   help="where --compute bfloat16/float16 rounds: as Hugging Face transformers' LlamaForCausalLM "
                        "(eager attention) does, or as Meta's llama-models reference does; they differ in rope "
                        "and the attention scale (default transformers)")
    p.add_argument("--lora", metavar="ADAPTER_DIR",
                   help="run with a LoRA adapter (a peft folder, as `train --lora-r` writes), unmerged")
    p.add_argument("--rope-factor", type=float, metavar="F",
                   help="override the llama3 rope scaling factor of a Meta params.json")
    p.add_argument("-t", "--threads", type=count_of("threads"), default=products.default_threads(), metavar="N",
                   help="threads to compute with (default: one per core, here %(default)s)")


def add_sampling_args(p: argparse.ArgumentParser, n_predict: int = 128) -> None:
    """-n, whose default (`n_predict`) is the command's, the sampler chain's flags, -s and -c."""
    p.add_argument("-n", "--n-predict", "--predict", dest="n_predict", type=int, default=n_predict, metavar="N",
                   help="tokens to generate; -1: until a stop token or the context is full; "
                        "0: evaluate the prompt only (default %(default)s)")
    add_chain_args(p)
    p.add_argument("-s", "--seed", type=int, default=-1,
                   help="random seed; -1 = a random one, printed with the statistics (default %(default)s)")
    p.add_argument("-c", "--ctx-size", "--ctx", dest="ctx", type=int, metavar="N",
                   help=f"context size in tokens; 0 = the model's (default: the model's, at most {DEFAULT_CTX})")


def add_chain_args(p: argparse.ArgumentParser) -> None:
    """The sampler chain's flags (`sampling_params` reads them): generate's, chat's and score's."""
    d = SamplingParams()
    p.add_argument("--temp", "--temperature", dest="temp", type=float, default=d.temperature,
                   help="temperature; 0 = greedy (default %(default)s)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="0 = off (default %(default)s)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="1 = off (default %(default)s)")
    p.add_argument("--min-p", type=float, default=d.min_p, help="0 = off (default %(default)s)")
    p.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty,
                   help="penalty on the last --repeat-last-n tokens; 1 = off (default %(default)s)")
    p.add_argument("--repeat-last-n", type=int, default=d.repeat_last_n, metavar="N",
                   help="how many recent tokens the repeat, frequency and presence penalties look at; 0 = off, "
                        "-1 = the whole context (default %(default)s)")
    p.add_argument("--presence-penalty", type=float, default=d.presence_penalty, metavar="N",
                   help="subtracted from the logit of each token in the last --repeat-last-n; 0 = off "
                        "(default %(default)s)")
    p.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty, metavar="N",
                   help="subtracted from a token's logit once per occurrence in the last --repeat-last-n; "
                        "0 = off (default %(default)s)")
    p.add_argument("--typical", "--typical-p", dest="typical_p", type=float, default=d.typical_p, metavar="N",
                   help="locally typical sampling, parameter p; 1 = off (default %(default)s)")
    p.add_argument("--top-nsigma", "--top-n-sigma", dest="top_n_sigma", type=float, default=d.top_n_sigma,
                   metavar="N", help="keep logits within N standard deviations of the largest; <= 0 = off "
                                     "(default %(default)s)")
    p.add_argument("--dry-multiplier", type=float, default=d.dry_multiplier, metavar="N",
                   help=f"DRY: the penalty on a token that would extend a repeat, multiplier * base ^ (length - "
                        f"allowed length); 0 = off (default {d.dry_multiplier})")
    p.add_argument("--dry-base", type=float, default=d.dry_base, metavar="N", help=f"DRY (default {d.dry_base})")
    p.add_argument("--dry-allowed-length", type=int, default=d.dry_allowed_length, metavar="N",
                   help=f"DRY: repeats up to this long are not penalised (default {d.dry_allowed_length})")
    p.add_argument("--dry-penalty-last-n", type=int, default=d.dry_penalty_last_n, metavar="N",
                   help=f"DRY: how many recent tokens to look for repeats in; 0 = off, -1 = the whole context "
                        f"(default {d.dry_penalty_last_n})")
    p.add_argument("--dry-sequence-breaker", action="append", metavar="STRING",
                   help="DRY: text that ends a repeat; each use adds one and the first clears the defaults "
                        f"({', '.join(map(repr, d.dry_sequence_breakers))}); 'none': no breakers")
    p.add_argument("--xtc-probability", type=float, default=d.xtc_probability, metavar="N",
                   help=f"XTC: the chance of removing the likely tokens but the least of them at each step; "
                        f"0 = off (default {d.xtc_probability})")
    p.add_argument("--xtc-threshold", type=float, default=d.xtc_threshold, metavar="N",
                   help=f"XTC: the probability a token needs to count as likely; above 0.5 = off "
                        f"(default {d.xtc_threshold})")
    orders = ", ".join(f"{name} = {';'.join(order)}" for name, order in SAMPLER_ORDERS.items())
    order = p.add_mutually_exclusive_group()
    order.add_argument("--samplers", default=";".join(DEFAULT_SAMPLERS), metavar="SAMPLERS",
                       help=f"the samplers to apply, in order, separated by ';', with llama.cpp's names "
                            f"({', '.join(SAMPLER_NAMES)}); a sampler left out is not applied. Or an order by "
                            f"name: {orders}. Each filter acts on the renormalised survivors of the one before "
                            "(default: llama.cpp's order, %(default)s)")
    letters = ", ".join(f"{c} = {name}" for c, name in SAMPLER_CHARS.items())
    order.add_argument("--sampling-seq", "--sampler-seq", metavar="SEQUENCE",
                       help=f"the samplers as llama.cpp's letters, in order ({letters}; default "
                            f"{''.join(c for name in DEFAULT_SAMPLERS for c, n in SAMPLER_CHARS.items() if n == name)})")


def add_chat_args(p: argparse.ArgumentParser) -> None:
    """How a dialog becomes ids: the chat format, a template file and the template's variables."""
    p.add_argument("--chat-format", choices=CHAT_FORMATS, metavar="FORMAT",
                   help="template: the checkpoint's chat template (Jinja, as transformers renders it; the default "
                        "when the checkpoint carries one); llama3: Meta's ChatFormat (the default for a Llama 3 "
                        "checkpoint without a template, such as a Meta folder); chatml: <|im_start|>role ... "
                        "<|im_end|>")
    p.add_argument("--chat-template-file", metavar="FILE",
                   help="render this Jinja chat template instead of the checkpoint's")
    p.add_argument("--chat-template-kwargs", metavar="JSON",
                   help='variables for the template, as a JSON object, e.g. \'{"date_string": "26 Jul 2024"}\'')
    p.add_argument("--tools", metavar="FILE",
                   help='tool definitions, a JSON list ([{"type": "function", "function": {"name": ..., "parameters": '
                        '...}}]), placed in the prompt by the chat template; built-in tools (brave_search, '
                        'wolfram_alpha) go in --chat-template-kwargs \'{"builtin_tools": [...]}\'')


def chat_format(args, loaded: LoadedModel):
    """The chat format --chat-format, --chat-template-file and --chat-template-kwargs choose."""
    template = read_template_file(args.chat_template_file) if args.chat_template_file else None
    variables = None
    if args.chat_template_kwargs is not None:
        try:
            variables = json.loads(args.chat_template_kwargs)
        except ValueError as e:
            variables = e
        if not isinstance(variables, dict):
            raise Llama3Error(f"--chat-template-kwargs takes a JSON object, got {args.chat_template_kwargs!r}")
    if template is not None and args.chat_format not in (None, "template"):
        raise Llama3Error(f"--chat-template-file goes with --chat-format template, not {args.chat_format}")
    choice = args.chat_format or ("template" if template is not None else None)
    tools = read_tools(args.tools) if args.tools is not None else None
    return loaded.chat_format(choice, template, variables, tools)


def add_prompt_args(p: argparse.ArgumentParser, what: str = "the prompt") -> argparse._MutuallyExclusiveGroup:
    """-p/-f/--tokens, one of them: `what` as text, as a file's text or as ids (score, adjudicate;
    read by `read_prompt` and `parse_token_ids`). Returns the group, for a command's other sources."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help=f"{what} as text (encoded as the model's tokenizer does)")
    src.add_argument("-f", "--file", help=f"read {what} from a UTF-8 text file (- for standard input)")
    src.add_argument("--tokens", help=f"{what} as comma-separated token ids (no tokenizer needed)")
    return src


def add_input_args(p: argparse.ArgumentParser, what: str) -> None:
    """-p/-f/--tokens/--like and --pos: the tokens of one forward pass (dump, trace)."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help="text to run (tokenized as the model's tokenizer does)")
    src.add_argument("-f", "--file", help="read the text from a UTF-8 file (- for standard input)")
    src.add_argument("--tokens", help="comma-separated token ids (no tokenizer needed)")
    src.add_argument("--like", metavar="DUMP",
                     help=f"{what} the tokens, positions and KV-cache context recorded in another dump file "
                          "(of the same model, from any checkpoint format)")
    p.add_argument("--pos", type=int, metavar="N", help="rope position of the first token (default 0)")


def dry_sequence_breakers(values: Optional[list[str]]) -> tuple[str, ...]:
    """The breakers of --dry-sequence-breaker, as llama.cpp reads them: the defaults when the flag
    is not given, else the values given ('none' drops those before it)."""
    if values is None:
        return SamplingParams().dry_sequence_breakers
    out: list[str] = []
    for value in values:
        out = [] if value == "none" else out + [value]
    return tuple(out)


def sampling_params(args) -> SamplingParams:
    """The sampling flags as SamplingParams; DRY's sequence breakers become token ids when the
    model is loaded (`for_model`)."""
    samplers = parse_samplers(args.samplers) if args.sampling_seq is None else parse_sampler_chars(args.sampling_seq)
    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repeat_penalty=args.repeat_penalty, samplers=samplers,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          typical_p=args.typical_p, top_n_sigma=args.top_n_sigma, repeat_last_n=args.repeat_last_n,
                          dry_multiplier=args.dry_multiplier, dry_base=args.dry_base,
                          dry_allowed_length=args.dry_allowed_length, dry_penalty_last_n=args.dry_penalty_last_n,
                          dry_sequence_breakers=dry_sequence_breakers(args.dry_sequence_breaker),
                          xtc_probability=args.xtc_probability, xtc_threshold=args.xtc_threshold)


def for_model(params: SamplingParams, loaded: LoadedModel) -> SamplingParams:
    """`params` with DRY's sequence breakers as ids of the model's vocabulary."""
    if params.dry_on and params.dry_sequence_breakers and loaded.tokenizer is None:
        raise Llama3Error("DRY's sequence breakers are text and this model has no tokenizer: "
                          "add --dry-sequence-breaker none, or use a checkpoint with its tokenizer")
    return params.for_tokenizer(loaded.tokenizer) if loaded.tokenizer is not None else params


def seeded_rng(args) -> tuple[int, np.random.Generator]:
    """The seed (-1, as in llama.cpp: a random one) and its generator."""
    if args.seed < -1:
        raise Llama3Error(f"--seed must be >= 0, or -1 for a random seed, got {args.seed}")
    seed = args.seed if args.seed != -1 else int(np.random.SeedSequence().entropy % 2**32)
    return seed, seeded_generator(seed)


def seeded_generator(seed: int) -> np.random.Generator:
    """A new random generator from `seed` (each prompt of generate -np draws from its own, so that
    it draws what it would alone)."""
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# Inputs


def check_model_arg(arg: Optional[str]) -> None:
    if arg is not None and not Path(arg).exists():
        raise Llama3Error(f"model {arg} does not exist: pass -m the folder of a Llama 3 checkpoint "
                          "(Hugging Face or Meta format) or a .gguf file")


def model_dir(arg: Optional[str]) -> Path:
    """The checkpoint of -m (a folder, or a .gguf file read as it is), or the default model's GGUF."""
    check_model_arg(arg)
    return assets.model_dir(arg)


def add_batch_invariant_arg(p: argparse.ArgumentParser) -> None:
    """--batch-invariant, for the commands that run batches (`load` applies it)."""
    p.add_argument("--batch-invariant", action="store_true",
                   help="compute every row of every weight product by the same kernel, so that an input's logits "
                        "in a batch are bit for bit its logits alone (slower prompts; docs/DESIGN.md, Batches)")


def load(args, need_tokenizer: bool) -> LoadedModel:
    """The model of -m, --dtype, --rope-factor, --compute and --convention; a -c/--ctx-size beyond
    its trained context is refused before its weights are read. --batch-invariant makes the
    process's products batch-invariant."""
    check_model_arg(args.model)
    if getattr(args, "batch_invariant", False):
        products.set_batch_invariant(True)
    return load_model(args.model, dtype=args.dtype, rope_factor=args.rope_factor, need_tokenizer=need_tokenizer,
                      ctx=getattr(args, "ctx", None), lora=getattr(args, "lora", None), compute=args.compute,
                      convention=args.convention)


def read_text_file(name: str, what: str = "prompt file", flag: str = "-f") -> str:
    """The UTF-8 text of file `name` ("-": standard input, as in llama.cpp) without a leading
    byte-order mark: editors on Windows write one, and it would become three tokens of the prompt.
    Errors tell the user what to pass to `flag`."""
    if name == "-":
        data = sys.stdin.buffer.read()
    else:
        path = Path(name)
        if not path.exists():
            raise Llama3Error(f"{what} {name} does not exist: pass {flag} the path of a UTF-8 text file "
                              "(or - for standard input)")
        if path.is_dir():
            raise Llama3Error(f"{what} {name} is a folder: pass {flag} the path of a UTF-8 text file")
        data = path.read_bytes()  # a regular file, or a pipe such as -f <(command)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Llama3Error(f"{what} {name} is not UTF-8 text (byte 0x{data[e.start]:02x} "
                          f"at offset {e.start}): convert it to UTF-8") from None
    return text[1:] if data.startswith(codecs.BOM_UTF8) else text


def read_prompt(args, verbatim: bool = False) -> Optional[str]:
    """The text of -f (when given) or -p; None when neither was given.

    As llama.cpp's -f, one final newline of the file is dropped (an editor ends every file with
    one; it would be a token of the prompt), unless `verbatim` (tokenize: the bytes as they are,
    as llama-tokenize reads its file)."""
    if getattr(args, "file", None) is not None:
        text = read_text_file(args.file)
        return text[:-1] if text.endswith("\n") and not verbatim else text
    return getattr(args, "prompt", None)


def parse_token_ids(text: str, vocab_size: int) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise Llama3Error(f"--tokens takes comma-separated integers, got {text!r}") from None
    return token_ids(ids, vocab_size).tolist()


def load_with_inputs(args) -> tuple[LoadedModel, Inputs]:
    """The model of -m (with its tokenizer when the input is text) and the inputs to run
    (`xcheck.dump.resolve_inputs` of -p/-f/--tokens/--like and --pos); what the user should know
    about them (`Inputs.notes`) goes to stderr."""
    if args.prompt is None and args.file is None and args.tokens is None and args.like is None:
        raise Llama3Error("give the input: -p TEXT, -f FILE, --tokens 1,2,3 or --like DUMP")
    if args.pos is not None and args.like is not None:
        raise Llama3Error("--pos goes with -p/-f/--tokens; --like takes the positions of its dump")
    loaded = load(args, need_tokenizer=args.prompt is not None or args.file is not None)
    encode = loaded.tokenizer.encode if loaded.tokenizer is not None else None
    tokens = parse_token_ids(args.tokens, loaded.config.vocab_size) if args.tokens is not None else None
    inputs = resolve_inputs(loaded.config, text=read_prompt(args), tokens=tokens, like=args.like, pos=args.pos,
                            encode=encode, model=loaded.checkpoint.path)
    for note in inputs.notes:
        print(f"note: {note}", file=sys.stderr)
    return loaded, inputs


# ---------------------------------------------------------------------------------------------
# Output


def plural(n: int, noun: str) -> str:
    """`n noun` with an "s" unless n is 1 (every noun the command line counts takes a plain "s")."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


# How the statistics line says why generation ended (Generation.stop_reason).
STOP_REASONS = {"stop": "stop token", "stop_string": "stop string", "length": "-n limit", "context": "context full",
                "interrupted": "interrupted", "output_closed": "output closed"}

# The exit status of a command whose reader went away (`llama3-np generate ... | head -1`): that of
# a program ended by SIGPIPE, as the shell reports it (128 + 13) for head's other writers.
EXIT_OUTPUT_CLOSED = 141


def silence_stdout() -> None:
    """Point standard output at /dev/null once its reader has gone, so that nothing buffered fails
    again when Python flushes it at exit."""
    import os
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def stats_line(loaded: Optional[LoadedModel], out: Generation, seed: Optional[int]) -> str:
    """load time (None: not shown), prompt and generated counts and speeds, peak RSS, the seed
    (None for greedy runs, where it changes nothing) and why generation stopped."""
    parts = [f"load {loaded.load_seconds:.2f} s"] if loaded is not None else []
    parts += [f"prompt {plural(len(out.prompt_ids), 'token')}, {out.prefill_tokens_per_second:.1f} tok/s",
              f"generated {plural(len(out.ids), 'token')}, {out.decode_tokens_per_second:.1f} tok/s",
              plural(products.get_threads(), "thread"), f"peak RSS {peak_rss_mb():.0f} MB"]
    parts += [f"seed {seed}"] if seed is not None else []
    return " | ".join(parts + [f"stop: {STOP_REASONS.get(out.stop_reason, out.stop_reason)}"])


def verbose_prompt(tokenizer, prompt: list[int]) -> str:
    """--verbose-prompt: the prompt's token count, then one `id -> 'piece'` line per token."""
    lines = format_pieces(pieces(tokenizer, prompt)) if tokenizer is not None else " ".join(map(str, prompt))
    return f"prompt: {plural(len(prompt), 'token')}\n{lines}"


class Printer:
    """Streams generated ids to stdout as UTF-8 text (ids themselves when there is no tokenizer),
    ending the text before a stop string (`stop_text`, which then ends the generation: `consume`).
    `shown` is all the text so far; quiet: print nothing (--json, --explain keep only `shown`)."""

    def __init__(self, tokenizer, stop_ids, stop_text: Optional[StopText] = None, quiet: bool = False):
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.text = stop_text if stop_text is not None else StopText(tokenizer) if tokenizer is not None else None
        self.stream = None if quiet else sys.stdout.buffer
        self.shown = ""

    def __call__(self, step: Step) -> None:
        if step.token in self.stop_ids:
            return
        self.write(self.text.push(step.token) if self.text else f"{step.token} ")

    def write(self, text: str, end: str = "") -> None:
        self.shown += text
        if self.stream is not None and text + end:
            try:
                self.stream.write((text + end).encode("utf-8"))
                self.stream.flush()
            except BrokenPipeError:  # the reader went away: nothing more is printed (`consume` stops)
                self.stream = None
                silence_stdout()
                raise

    def echo(self, prompt: list[int]) -> None:
        """Print the prompt as the model reads it (special tokens by name), without the BOS the
        tokenizer adds."""
        tok = self.tokenizer
        if tok is not None and tok.add_bos and prompt[:1] == [tok.bos_id]:
            prompt = prompt[1:]
        self.write(tok.decode(prompt) if tok is not None else "".join(f"{i} " for i in prompt))

    def finish(self) -> None:
        self.write(self.text.flush() if self.text else "", end="\n")


# A progress line on stderr is shown once the work has run for this long.
PROGRESS_AFTER_SECONDS = 1.0


class ProgressLine:
    """The command line's one progress display: a line on stderr, `label done/total unit (pct%)`,
    redrawn in place and wiped at the end; on a terminal only (a log file or a pipe gets no
    control characters), and only once the work has run for a while. Called as the progress
    callback (done, total) of the library's long work: a `Session`'s prefill, where (0, total)
    starts it and (total, total) wipes it; `update` alone for imports and bench, which `clear` it."""

    def __init__(self, label: str, unit: str = "tokens", stream=None):
        self.label, self.unit, self.stream = label, unit, stream or sys.stderr
        self.on = self.stream.isatty()
        self.start = time.perf_counter()
        self.width = 0

    def __call__(self, done: int, total: int) -> None:
        if done == 0:
            self.start = time.perf_counter()
        self.update(done, total)
        if done == total:
            self.clear()

    def update(self, done: int, total: int) -> None:
        if not self.on or time.perf_counter() - self.start <= PROGRESS_AFTER_SECONDS:
            return
        line = f"{self.label} {done}/{total} {self.unit} ({100 * done / total:.0f}%)"
        self.width = max(self.width, len(line))
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()

    def clear(self) -> None:
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


def consume(generation: Generation, on_step, stop_text: Optional[StopText] = None) -> Generation:
    """Run a generation, handing each step to `on_step`. A stop string found by `stop_text` ends
    it, with stop reason "stop_string"; Ctrl-C ends it early, with stop reason "interrupted", and
    a reader of the output that went away (`| head -1`) with "output_closed"; what was printed
    stays (a prefill's progress line is wiped), and the session keeps what its cache holds."""
    try:
        for step in generation:
            on_step(step)
            if stop_text is not None and stop_text.found is not None:
                generation.stop_reason = "stop_string"
                break
    except KeyboardInterrupt:
        generation.stop_reason = "interrupted"
    except BrokenPipeError:
        generation.stop_reason = "output_closed"
    finally:
        if isinstance(generation.session.progress, ProgressLine):
            generation.session.progress.clear()
    return generation
