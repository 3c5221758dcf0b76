"""`llama3-np dump`: every named stage of one forward pass, written as a dump file.

The dump file format (DESIGN.md) is shared by everything that cross-checks an implementation:
`llama3-np dump`, `tools/torch_dump.py` (Hugging Face and Meta's reference), the committed parity
fixtures, and any other implementation that wants to be compared with `llama3-np compare`.

    safetensors file, one float32 tensor per stage:
        embed [T, D]
        layers.i.attn_norm [T, D]   layers.i.q [T, H, Dh]   layers.i.k, layers.i.v [T, KV, Dh]
        layers.i.q_rope, layers.i.k_rope (q, k after rope)  layers.i.probs [H, T, S] (on request)
        layers.i.attn [T, H*Dh]     layers.i.attn_out [T, D]   layers.i.h [T, D]
        layers.i.ffn_norm [T, D]    layers.i.ffn_hidden [T, F]  layers.i.ffn_out [T, D]
        layers.i.out [T, D]
        norm [T, D], logits [T, V]
    q/k in Meta's interleaved rope layout (dims 2j, 2j+1 of a head rotate together);
    S = tokens attended to: the context already in the KV cache plus the T tokens.

    metadata (strings): config (JSON of ModelConfig.to_dict), tokens (JSON list), pos (rope
    position of the first token), context_tokens (JSON list of the tokens in the KV cache before),
    context_pos (rope position of the first of them), producer, dtype (what the producer computed
    in); llama3_np adds residency (how it kept the weights: float32 or bfloat16) and format (of
    the checkpoint folder: hf or meta).

Two dumps record the same computation when their inputs (config, tokens, positions, context)
agree; config fields no stage reads (`CONFIG_FIELDS_OUTSIDE_THE_MATH`) may differ, so that dumps
of the same weights from a Hugging Face and a Meta folder compare (`metadata_differences`).
"""

from __future__ import annotations

import fnmatch
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from . import __version__
from .config import ModelConfig
from .errors import Llama3Error
from .safetensors_file import SafetensorsFile, write_safetensors

# The stages of one transformer block, in the order the block computes them.
LAYER_STAGES = ("attn_norm", "q", "k", "v", "q_rope", "k_rope", "probs", "attn", "attn_out", "h",
                "ffn_norm", "ffn_hidden", "ffn_out", "out")
# Metadata keys that say which computation a dump records: two dumps to compare must agree on them.
INPUT_KEYS = ("config", "tokens", "pos", "context_tokens", "context_pos")
# ModelConfig fields that no stage of a forward pass reads: how a checkpoint stores its output
# projection (a Meta folder keeps a copy of the embeddings where a Hugging Face folder says
# tie_word_embeddings) and the context it was trained for. Every other field changes the math.
CONFIG_FIELDS_OUTSIDE_THE_MATH = ("tie_embeddings", "max_seq_len")
# Metadata that names who made a dump, shown beside its path rather than listed as a difference.
PRODUCER_KEYS = ("producer", "dtype")


def stage_shapes(config: ModelConfig, n_tokens: int, n_context: int = 0,
                 probs: bool = True) -> dict[str, tuple[int, ...]]:
    """Every stage name of one forward pass over `n_tokens` tokens after `n_context` cached ones,
    in model order, with its shape."""
    T, D, H, KV, Dh = n_tokens, config.dim, config.n_heads, config.n_kv_heads, config.head_dim
    per_layer = {
        "attn_norm": (T, D), "q": (T, H, Dh), "k": (T, KV, Dh), "v": (T, KV, Dh),
        "q_rope": (T, H, Dh), "k_rope": (T, KV, Dh), "probs": (H, T, n_context + T),
        "attn": (T, H * Dh), "attn_out": (T, D), "h": (T, D), "ffn_norm": (T, D),
        "ffn_hidden": (T, config.ffn_dim), "ffn_out": (T, D), "out": (T, D),
    }
    shapes = {"embed": (T, D)}
    for i in range(config.n_layers):
        shapes.update({f"layers.{i}.{name}": per_layer[name] for name in LAYER_STAGES
                       if probs or name != "probs"})
    shapes.update({"norm": (T, D), "logits": (T, config.vocab_size)})
    return shapes


def stage_order(name: str) -> tuple:
    """Sort key putting stage names in model order; names that are not stages go last."""
    if name == "embed":
        return (0,)
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in LAYER_STAGES:
        return (1, int(parts[1]), LAYER_STAGES.index(parts[2]))
    if name in ("norm", "logits"):
        return (2, name == "logits")
    return (3, name)


def check_globs(globs: Iterable[str], names: Iterable[str], flag: str = "--stages") -> list[str]:
    """The globs, each checked to match at least one of the stage `names`."""
    globs, names = list(globs), list(names)
    for glob in globs:
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            layer_stages = [s for s in LAYER_STAGES if f"layers.0.{s}" in names]
            last_layer = max((stage_order(n)[1] for n in names if stage_order(n)[0] == 1), default=0)
            raise Llama3Error(f"{flag}: {glob!r} matches no stage; stages are embed, "
                              f"layers.N.{{{','.join(layer_stages)}}} (N from 0 to {last_layer}), norm, logits")
    return globs


# ---------------------------------------------------------------------------------------------
# Reading and writing dump files


@dataclass
class Dump:
    """One dump file: its metadata and its stage tensors (memory-mapped, read on demand)."""

    path: Path
    file: SafetensorsFile

    @property
    def metadata(self) -> dict[str, str]:
        return self.file.metadata

    @property
    def names(self) -> list[str]:
        """Stage names, in model order."""
        return sorted(self.file.names(), key=stage_order)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file.shape(name)

    def stage(self, name: str) -> np.ndarray:
        return self.file.tensor(name)

    def json_list(self, key: str) -> Optional[list[int]]:
        """A metadata key holding a JSON list of token ids (None when absent)."""
        if key not in self.metadata:
            return None
        try:
            value = json.loads(self.metadata[key])
        except ValueError:
            value = None
        if not (isinstance(value, list) and all(type(t) is int for t in value)):
            raise Llama3Error(f"{self.path}: metadata {key!r} must be a JSON list of token ids, "
                              f"got {self.metadata[key][:80]!r}")
        return value

    def integer(self, key: str, default: int) -> int:
        try:
            return int(self.metadata.get(key, default))
        except ValueError:
            raise Llama3Error(f"{self.path}: metadata {key!r} must be an integer, "
                              f"got {self.metadata[key][:80]!r}") from None

    def config(self) -> Optional[ModelConfig]:
        if "config" not in self.metadata:
            return None
        try:
            return ModelConfig.from_dict(json.loads(self.metadata["config"]))
        except (ValueError, TypeError, KeyError) as e:
            raise Llama3Error(f"{self.path}: metadata 'config' is not a llama3_np ModelConfig ({e})") from None
        except Llama3Error as e:
            raise Llama3Error(f"{self.path}: metadata 'config': {e}") from None


def read_dump(path) -> Dump:
    """Open a dump file, checking that it is safetensors holding floating-point stages."""
    path = Path(path)
    if not path.is_file():
        raise Llama3Error(f"dump file {path} does not exist" if not path.exists()
                          else f"{path} is not a file: pass a dump file (.safetensors)")
    file = SafetensorsFile(path)
    for name in file.names():
        if file.dtype(name).kind != "f":
            raise Llama3Error(f"{path}: stage {name!r} is stored as {file.dtype(name)}; "
                              "dump files hold floating-point stages")
    return Dump(path, file)


def write_dump(path, stages: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    try:
        write_safetensors(path, {k: np.asarray(v, dtype=np.float32) for k, v in stages.items()}, metadata)
    except OSError as e:
        raise Llama3Error(f"cannot write {path}: {e.strerror or e}") from None


def dump_metadata(config: ModelConfig, tokens: list[int], pos: int, context: list[int],
                  context_pos: int, residency: str, checkpoint_format: str) -> dict[str, str]:
    return {"config": config.to_json(), "tokens": json.dumps(tokens), "pos": str(pos),
            "context_tokens": json.dumps(context), "context_pos": str(context_pos),
            "producer": f"llama3_np {__version__}", "dtype": "float32", "residency": residency,
            "format": checkpoint_format}


# ---------------------------------------------------------------------------------------------
# Do two dumps record the same computation?


def config_differences(a: ModelConfig, b: ModelConfig) -> tuple[dict, dict]:
    """The fields in which two configs differ, {field: (value in a, value in b)}, split into those
    that change the math and those no stage reads (`CONFIG_FIELDS_OUTSIDE_THE_MATH`)."""
    da, db = a.to_dict(), b.to_dict()
    differ = {k: (da[k], db[k]) for k in da if da[k] != db[k]}
    in_math = {k: v for k, v in differ.items() if k not in CONFIG_FIELDS_OUTSIDE_THE_MATH}
    return in_math, {k: v for k, v in differ.items() if k in CONFIG_FIELDS_OUTSIDE_THE_MATH}


def describe_differences(differences: dict) -> str:
    """`{"dim": (64, 32)}` -> `dim 64 vs 32`."""
    return "; ".join(f"{k} {json.dumps(va)} vs {json.dumps(vb)}" for k, (va, vb) in differences.items())


def metadata_differences(a: Dump, b: Dump) -> dict[str, tuple[str, str]]:
    """The metadata in which dumps `a` and `b` differ without recording different computations,
    {key: (value in a, value in b)}: config fields outside the math (as `config.<field>`) and
    other keys both files have (residency, format, a reference's settings), except the producer
    and dtype (`PRODUCER_KEYS`), which say who made each file.

    Raises Llama3Error when they record different computations: the config's math (dimensions,
    norm eps, rope), the tokens, the positions or the KV-cache context differ.
    """
    listed: dict[str, tuple[str, str]] = {}
    for key in INPUT_KEYS:
        if key not in a.metadata or key not in b.metadata:
            continue
        if key == "config":
            in_math, outside = config_differences(a.config(), b.config())
            same = not in_math
            listed.update({f"config.{k}": tuple(json.dumps(v) for v in values) for k, values in outside.items()})
            shown = describe_differences(in_math)
        elif key in ("tokens", "context_tokens"):
            same = a.json_list(key) == b.json_list(key)
        else:
            same = a.integer(key, 0) == b.integer(key, 0)
        if not same:
            shown = shown if key == "config" else f"{_short(a.metadata[key])} vs {_short(b.metadata[key])}"
            raise Llama3Error(f"{a.path} and {b.path} record different inputs: metadata {key!r} differs "
                              f"({shown}); dump the same model on the same tokens (dump --like the other file)")
    for key in sorted(set(a.metadata) & set(b.metadata)):
        if key not in INPUT_KEYS and key not in PRODUCER_KEYS and a.metadata[key] != b.metadata[key]:
            listed[key] = (a.metadata[key], b.metadata[key])
    return listed


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


# ---------------------------------------------------------------------------------------------
# The command


@dataclass
class Inputs:
    """What one forward pass runs: tokens at rope position `pos`, after `context` (in the KV cache
    first, from `context_pos`)."""

    tokens: list[int]
    pos: int
    context: list[int]
    context_pos: int
    notes: list[str] = field(default_factory=list)  # what the user should know (printed on stderr)


def add_input_args(p, what: str) -> None:
    """-p/-f/--tokens/--like and --pos: the tokens to run (shared with `trace`)."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help="text to run (tokenized as the model's tokenizer does)")
    src.add_argument("-f", "--file", help="read the text from a UTF-8 file (- for standard input)")
    src.add_argument("--tokens", help="comma-separated token ids (no tokenizer needed)")
    src.add_argument("--like", metavar="DUMP",
                     help=f"{what} the tokens, positions and KV-cache context recorded in another dump file "
                          "(of the same model, from any checkpoint format)")
    p.add_argument("--pos", type=int, metavar="N", help="rope position of the first token (default 0)")


def format_shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def load_with_inputs(args):
    """The checkpoint of -m (with its tokenizer when the input is text) and the inputs to run; what
    the user should know about them (`Inputs.notes`) goes to stderr."""
    from .generate_cmd import Loaded

    if args.prompt is None and args.file is None and args.tokens is None and args.like is None:
        raise Llama3Error("give the input: -p TEXT, -f FILE, --tokens 1,2,3 or --like DUMP")
    loaded = Loaded(args, need_tokenizer=args.prompt is not None or args.file is not None)
    encode = loaded.tokenizer.encode if loaded.tokenizer is not None else None
    inputs = resolve_inputs(args, loaded.config, encode, loaded.checkpoint.path)
    for note in inputs.notes:
        print(f"note: {note}", file=sys.stderr)
    return loaded, inputs


def resolve_inputs(args, config: ModelConfig, encode: Optional[Callable[[str], list[int]]], model) -> Inputs:
    """The tokens named by -p/-f/--tokens/--like (and --pos), checked against the model's config.

    encode: the model's tokenizer (text -> ids, as the model adds BOS), needed for -p/-f only.
    """
    from .generate_cmd import parse_token_ids, read_prompt

    if args.pos is not None and args.pos < 0:
        raise Llama3Error(f"--pos must be >= 0, got {args.pos}")
    if args.pos is not None and args.like is not None:
        raise Llama3Error("--pos goes with -p/-f/--tokens; --like takes the positions of its dump")
    pos = args.pos or 0
    vocab = config.vocab_size
    if args.like is not None:
        like = read_dump(args.like)
        in_math, outside = config_differences(like.config(), config) if like.config() is not None else ({}, {})
        if in_math:
            raise Llama3Error(f"--like {args.like} was made from a different model than {model} "
                              f"(config {describe_differences(in_math)}): pass the same checkpoint")
        notes = [f"the config recorded in --like {args.like} differs from {model}'s only in what no "
                 f"stage computes: {describe_differences(outside)}"] if outside else []
        tokens, context = like.json_list("tokens"), like.json_list("context_tokens") or []
        if not tokens:
            raise Llama3Error(f"--like {args.like}: its metadata has no 'tokens' to run")
        pos = like.integer("pos", 0)
        inputs = Inputs(tokens, pos, context, like.integer("context_pos", pos), notes)
    elif args.tokens is not None:
        inputs = Inputs(parse_token_ids(args.tokens, vocab), pos, [], pos)
    else:
        text = read_prompt(args)
        if text is None:
            raise Llama3Error("give the input: -p TEXT, -f FILE, --tokens 1,2,3 or --like DUMP")
        if text == "":
            raise Llama3Error("the text is empty: give some text")
        inputs = Inputs(encode(text), pos, [], pos)
    if not inputs.tokens:
        raise Llama3Error("no tokens to run: give some text or token ids")
    for t in inputs.context + inputs.tokens:
        if not 0 <= t < vocab:
            raise Llama3Error(f"token id {t} is outside the vocabulary (0..{vocab - 1})")
    if min(inputs.pos, inputs.context_pos) < 0:
        raise Llama3Error("rope positions must be >= 0")
    return inputs


def run_forward(loaded, inputs: Inputs, trace) -> None:
    """Fill `trace` with the stages of `inputs.tokens`, after feeding the context to the cache."""
    from .model import KVCache, forward

    weights, config = loaded.checkpoint.weights, loaded.config
    cache = KVCache(config, len(inputs.context) + len(inputs.tokens))
    if inputs.context:
        forward(weights, config, inputs.context, cache, pos=inputs.context_pos)
    forward(weights, config, inputs.tokens, cache, pos=inputs.pos, trace=trace)


def add_command(sub) -> None:
    from .generate_cmd import add_model_args

    p = sub.add_parser("dump", help="write every named stage of one forward pass to a dump file",
                       description="Run one forward pass and write its named stages (DESIGN.md's dump "
                                   "format: float32 safetensors, metadata with the config and tokens).")
    add_model_args(p)
    add_input_args(p, "run")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="dump file to write (.safetensors)")
    p.add_argument("--stages", nargs="+", metavar="GLOB",
                   help="keep only stages matching these globs (default: every stage, or those of --like); "
                        "attention probabilities layers.N.probs [H, T, S] only when a glob other than '*' "
                        "matches them, e.g. --stages '*' 'layers.0.probs'")
    p.set_defaults(func=run)


def run(args) -> int:
    from .model import Trace

    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise Llama3Error(f"-o {args.output}: a dump is a safetensors file; name it FILE.safetensors")
    if not output.parent.is_dir():
        raise Llama3Error(f"-o {args.output}: folder {output.parent} does not exist")
    loaded, inputs = load_with_inputs(args)
    names = stage_shapes(loaded.config, len(inputs.tokens), len(inputs.context))
    if args.stages is not None:
        globs = check_globs(args.stages, names)
    elif args.like is not None:
        globs = read_dump(args.like).names
    else:
        globs = ["*"]
    trace = Trace(globs)
    run_forward(loaded, inputs, trace)
    write_dump(output, dict(trace), dump_metadata(loaded.config, inputs.tokens, inputs.pos, inputs.context,
                                                  inputs.context_pos, loaded.checkpoint.dtype,
                                                  loaded.checkpoint.format))
    size = output.stat().st_size
    print(f"wrote {len(trace)} stages of {len(inputs.tokens)} tokens ({size / 1e6:.1f} MB) to {output}")
    return 0
