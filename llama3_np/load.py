"""A model ready to run: a checkpoint folder's canonical weights, its tokenizer and its chat format.

`load_model` is where the formats (`llama3_np.formats`) and the text side (`llama3_np.text`) meet;
the specification (`llama3_np.model`) only ever sees the weights and the config. A `LoadedModel`
also speaks text, as Meta's `llama-models` and `mlx-lm` do: `generate` (text in, text out),
`stream` (the text as it comes), `chat` (a dialog's next answer), each ending at the model's
end-of-generation ids and greedy unless given sampling parameters.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from . import assets
from .config import ComputeMode, ModelConfig
from .errors import Llama3Error, ParameterError
from .formats.checkpoint import Checkpoint, load_checkpoint, scan_checkpoint
from .generation import Generation, Session, generate_batch, session_size
from .linear import fuse_projections, mode_weights
from .lora import adapted, load_adapter
from .sampling import SamplingParams
from .text.chat import ChatFormat, TemplateFormat, chat_format_for, encode_dialog
from .text.template import ChatTemplate, find_chat_template, template_variables
from .formats.gguf_file import GGUFFile, is_gguf
from .formats.gguf_import import gguf_tokenizer
from .text import tokenizer as text_tokenizer
from .text.stop import StopText, check_stop_strings
from .text.tokenizer import Tokenizer

# Without an explicit context size, the KV cache holds at most this many tokens (or the model's own
# context if smaller): a 131,072-token float32 cache for an 8B model would need 34 GB.
DEFAULT_CTX = 4096


@dataclass
class LoadedModel:
    """A checkpoint (`weights`, `config`), its tokenizer (None when it has none), the load time and
    the compute mode its weights are held for (pass it to `KVCache`, `Session`)."""

    checkpoint: Checkpoint
    tokenizer: Optional[Tokenizer]
    load_seconds: float
    compute: ComputeMode = ComputeMode()  # what the weights are held for (`load_model`'s compute)

    @property
    def config(self) -> ModelConfig:
        return self.checkpoint.config

    @property
    def weights(self):
        return self.checkpoint.weights

    def ctx(self, requested: Optional[int] = None) -> int:
        """The context size in tokens: `requested`, 0 for the model's trained context (as llama.cpp's
        n_ctx 0), or by default the model's own, at most DEFAULT_CTX.

        Raises ParameterError("ctx") when `requested` is negative or longer than the context the
        model was trained for."""
        if requested is not None:
            check_ctx(requested, self.config)
            return requested or self.config.max_seq_len
        return min(self.config.max_seq_len, DEFAULT_CTX)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as a plain prompt (with BOS when the tokenizer adds one)."""
        return self.need_tokenizer().encode(text)

    def chat_template(self, tools: bool = False) -> Optional[ChatTemplate]:
        """The chat template the checkpoint carries (`text.template.TEMPLATE_FILES`; a GGUF file's
        tokenizer.chat_template), or None."""
        return chat_template_of(self.checkpoint.path, tools)

    def chat_format(self, choice: Optional[str] = None, template: Optional[ChatTemplate] = None,
                    variables: Optional[dict] = None, tools: Optional[list] = None) -> ChatFormat | TemplateFormat:
        """The chat format named `choice` ("template", "llama3", "chatml"; None: the checkpoint's
        template if it has one, else its vocabulary's built-in format), rendering `template`
        instead of the checkpoint's own when given, with `variables` (such as `date_string`)
        added to the special tokens a template sees, and the tool definitions `tools`
        (`text.tools.read_tools`) for the template to place (`text.chat.chat_format_for`)."""
        tok = self.need_tokenizer()
        template = template or self.chat_template(tools=tools is not None)
        if template is not None:
            variables = template_variables(tok, self.checkpoint.path) | dict(variables or {})
        return chat_format_for(tok, choice, template, variables, tools)

    def encode_dialog(self, system: Optional[str], user: str,
                      fmt: ChatFormat | TemplateFormat | None = None) -> list[int]:
        """Token ids of a first chat turn (an optional system message, then `user`), ending with
        the opening of the assistant's reply, in `fmt` (default: the checkpoint's chat format)."""
        messages = [{"role": "system", "content": system}] if system is not None else []
        return encode_dialog(self.need_tokenizer(), messages + [{"role": "user", "content": user}],
                             fmt=fmt or self.chat_format())

    def stop_ids(self) -> frozenset[int]:
        """The ids that end a generation, the same in completion and in chat: those the
        checkpoint's config files declare and the vocabulary's (`Tokenizer.end_of_generation_ids`)."""
        return frozenset(self.checkpoint.eos_ids) | (self.tokenizer.end_of_generation_ids if self.tokenizer else set())

    def session(self, ctx: Optional[int] = None, progress: Optional[Callable[[int, int], None]] = None) -> Session:
        """A `Session` of `ctx` tokens (`LoadedModel.ctx`) whose generations end at the model's
        end-of-generation ids (`stop_ids`) unless told otherwise, computing in the model's
        compute mode (`compute`)."""
        return Session(self.weights, self.config, self.ctx(ctx), self.stop_ids(), progress, self.compute)

    def chat_session(self, system: Optional[str] = None, ctx: Optional[int] = None,
                     progress: Optional[Callable[[int, int], None]] = None, fmt=None):
        """A multi-turn chat keeping the KV cache between turns (`chat_session.ChatSession`), in
        the chat format `fmt` (`chat_format`; None: the checkpoint's)."""
        from .chat_session import ChatSession

        return ChatSession(self, ctx, system, progress, fmt)

    def stream(self, prompt: str | Sequence[int], max_new: int = -1, params: Optional[SamplingParams] = None,
               rng: Optional[np.random.Generator] = None, ctx: Optional[int] = None,
               stop: Iterable[str] = ()) -> Iterator[str]:
        """The continuation of `prompt` (text, or token ids fed as they are) as pieces of text,
        each as soon as it is whole UTF-8:
        up to `max_new` tokens (-1: until an end-of-generation token or a full context), greedy
        unless `params` (with `rng`) sample; the end token itself is not text. `stop`: stop
        strings, the OpenAI API's (`text.stop`): the text ends before the first one generated, and
        text that could begin one is held back until it cannot. mlx-lm's `stream_generate`,
        llama-models' `completion`, token by token. Raises ParameterError("stop") for an empty
        stop string."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        yield from self._text(ids, max_new, params, rng, ctx, stop)

    def generate(self, prompt: str | Sequence[int], max_new: int = -1, params: Optional[SamplingParams] = None,
                 rng: Optional[np.random.Generator] = None, ctx: Optional[int] = None,
                 stop: Iterable[str] = ()) -> str:
        """The continuation of `prompt` as one text (`stream`'s pieces joined)."""
        return "".join(self.stream(prompt, max_new, params, rng, ctx, stop))

    def generate_batch(self, prompts: Iterable[str], max_new: int = -1, params: Optional[SamplingParams] = None,
                       seed: Optional[int] = None, ctx: Optional[int] = None, stop: Iterable[str] = (),
                       parallel: int = 8) -> list[str]:
        """The continuation of each of `prompts`, in their order, generated `parallel` at a time
        (`generation.generate_batch`: one forward pass per step for all, each weight read once).
        Each is what `generate` gives for that prompt alone with `rng=np.random.default_rng(seed)`
        (greedy: the same text; sampled: the same draws, from logits equal within float32
        rounding, bit for bit with `products.set_batch_invariant(True)`); `seed` is needed only
        when `params` sample. Raises ParameterError("parallel") for a `parallel` below 1."""
        seeded = (lambda: None) if seed is None else (lambda: np.random.default_rng(seed))
        made = self._generations(map(self.encode, prompts), max_new, params, seeded, ctx, stop)
        texts: list[StopText] = []
        pieces: list[list[str]] = []

        def generations():
            for out, text in made:
                texts.append(text)
                pieces.append([])
                yield out

        def on_step(i: int, step) -> bool:
            pieces[i].append(_step_text(texts[i], step, stop_ids))
            return texts[i].found is not None

        stop_ids = self.stop_ids()
        for i, _ in enumerate(generate_batch(generations(), parallel, on_step)):
            pieces[i].append(texts[i].flush())
        return ["".join(p) for p in pieces]

    def chat(self, messages: list[dict], max_new: int = -1, params: Optional[SamplingParams] = None,
             rng: Optional[np.random.Generator] = None, ctx: Optional[int] = None, stop: Iterable[str] = ()) -> str:
        """The assistant's answer to a dialog (`[{"role": "user", "content": ...}, ...]`, in the
        checkpoint's chat format), as llama-models' `chat_completion`; `stream`'s arguments."""
        ids = encode_dialog(self.need_tokenizer(), messages, fmt=self.chat_format())
        return "".join(self._text(ids, max_new, params, rng, ctx, stop))

    def _text(self, ids: list[int], max_new: int, params, rng, ctx, stop) -> Iterator[str]:
        out, text = next(self._generations([ids], max_new, params, lambda: rng, ctx, stop))
        for step in out:
            piece = _step_text(text, step, out.stop_ids)
            if piece:
                yield piece
            if text.found is not None:
                out.stop_reason = "stop_string"
                return
        tail = text.flush()
        if tail:
            yield tail

    def _generations(self, prompts: Iterable[list[int]], max_new: int, params: Optional[SamplingParams],
                     rngs: Callable[[], Optional[np.random.Generator]], ctx: Optional[int],
                     stop: Iterable[str]) -> Iterator[tuple[Generation, StopText]]:
        """Each of `prompts` (token ids) as a generation on a session of its own, sized for it
        (`generation.session_size`), drawing with a generator from `rngs()`, and the `StopText` its
        steps go into; `stream`'s other arguments, checked before the first prompt is read."""
        tokenizer, stop = self.need_tokenizer(), check_stop_strings(stop)
        params = params.for_tokenizer(tokenizer) if params is not None else None
        context = self.ctx(ctx)

        def each():
            for ids in prompts:
                session = self.session(session_size(context, len(ids), max_new))
                yield session.generate(ids, params, rngs(), max_new), StopText(tokenizer, stop)
        return each()

    def need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise Llama3Error(f"{self.checkpoint.path} has no tokenizer: give token ids, or copy the "
                              "checkpoint's tokenizer files into its folder")
        return self.tokenizer


def _step_text(text: StopText, step, stop_ids: frozenset[int]) -> str:
    """The text a generated token adds (`StopText.push`): none for an end-of-generation token."""
    return "" if step.token in stop_ids else text.push(step.token)


def chat_template_of(path, tools: bool = False) -> Optional[ChatTemplate]:
    """The chat template of a checkpoint: a folder's (`text.template.find_chat_template`), or a GGUF
    file's tokenizer.chat_template; None when it has none."""
    path = Path(path)
    if is_gguf(path):
        found = GGUFFile(path).get("tokenizer.chat_template")
        return None if found is None else ChatTemplate(found, f"{path}: tokenizer.chat_template")
    return find_chat_template(path, tools=tools)


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer of a checkpoint: a folder's tokenizer files, or one of them
    (`text.tokenizer.load_tokenizer`), or a GGUF file's metadata (`formats.gguf_import.gguf_tokenizer`,
    which reads no tensor). Raises Llama3Error when there is none, or the file is not what it claims."""
    path = Path(path)
    if is_gguf(path):
        return gguf_tokenizer(path)
    return text_tokenizer.load_tokenizer(path)


def check_ctx(ctx: Optional[int], config: ModelConfig) -> None:
    """A context size, checked against the context the model was trained for (None: no check; 0
    stands for the trained context).

    Raises ParameterError("ctx")."""
    if ctx is None:
        return
    if ctx < 0:
        raise ParameterError("ctx", f"ctx must be positive, or 0 for the model's context, got {ctx}")
    if ctx > config.max_seq_len:
        raise ParameterError("ctx", f"ctx {ctx} is longer than the {config.max_seq_len} tokens the model was "
                                    f"trained for: at most {config.max_seq_len}")


def residency(dtype: Optional[str], mode: ComputeMode) -> Optional[str]:
    """The weight residency to load a checkpoint with for compute mode `mode`: `dtype` ("float32",
    "bfloat16" or "gguf"; float32 compute takes any), or when None the mode's: float32 for float32 and float64 (float64 upcasts the
    float32 weights once more), bfloat16 for bfloat16 and float16 (they compute with weights held
    in their own dtype, as the engines do).
    llamacpp: `dtype` as given, which the checkpoint's format decides (`stored_residency`).
    Raises ParameterError("dtype") for a residency the mode cannot compute with."""
    if mode.dtype == "llamacpp":
        return dtype
    wanted = "float32" if mode.dtype in ("float32", "float64") else "bfloat16"
    if dtype is None or dtype == wanted or mode.dtype == "float32":
        return dtype or wanted
    raise ParameterError("dtype", f"dtype {dtype} does not combine with compute {mode.dtype}: it computes with the "
                                  f"weights held in {mode.storage.name}; leave the residency to the compute mode")


def stored_residency(dtype: Optional[str], checkpoint_format: str) -> str:
    """The residency that keeps a checkpoint's weights in the types its files store, which
    llamacpp computes with: a GGUF's own blocks ("gguf"), another checkpoint as stored
    ("bfloat16", which keeps float32 and float16 tensors as they are: what llama.cpp runs of the
    GGUF its convert_hf_to_gguf.py makes of them). Raises ParameterError("dtype") for another."""
    wanted = "gguf" if checkpoint_format == "gguf" else "bfloat16"
    if dtype not in (None, wanted):
        raise ParameterError("dtype", f"compute llamacpp multiplies this {checkpoint_format} checkpoint's weights "
                                      f"in their stored types, which dtype {wanted} keeps: leave out the residency")
    return wanted


def checkpoint_for(checkpoint: Checkpoint, mode: ComputeMode) -> Checkpoint:
    """`checkpoint` with its weights as `mode` computes with them (`linear.mode_weights`: float64,
    float16, or bfloat16 where stored otherwise; llamacpp's matrices wrapped, held as stored),
    converted once, each layer's weights that multiply one input joined for one product
    (`linear.fuse_projections`; not for llama.cpp's arithmetic, which multiplies each matrix
    alone); `dtype` says how they are held."""
    if mode.dtype == "llamacpp":
        return dataclasses.replace(checkpoint, weights=mode_weights(checkpoint.weights, mode))
    if mode.dtype != "float32":
        weights = mode_weights(checkpoint.weights, mode)
        checkpoint = dataclasses.replace(checkpoint, weights=weights, dtype=mode.storage.name)
    fuse_projections(checkpoint.weights, checkpoint.config.n_layers)
    return checkpoint


def load_model(path=None, dtype: Optional[str] = None, rope_factor: Optional[float] = None,
               need_tokenizer: bool = True, ctx: Optional[int] = None, compute: str = "float32",
               convention: str = "transformers", lora=None) -> LoadedModel:
    """Load a checkpoint (a Hugging Face or Meta folder, or a GGUF file) and its tokenizer.

    path: the folder or .gguf file (read as it is, memory-mapped, `assets.model_dir`); None for the
    default model. dtype: weight residency, "float32" (converted once, fastest), "bfloat16" (kept as
    stored, half the memory; a GGUF's values only where bfloat16 holds them exactly) or "gguf" (a GGUF
    file's own blocks, dequantized a block of rows at a time in each product); None: the compute
    mode's (`residency`).
    rope_factor: overrides the llama3 rope scaling factor a Meta params.json implies.
    need_tokenizer: when False, a folder without tokenizer files loads with `tokenizer` None. ctx:
    a context size to check against the model's trained context before any weight is read
    (`check_ctx`). compute, convention: the compute mode (`config.ComputeMode`: "float32",
    "float64", "bfloat16", "float16", "llamacpp"; "transformers" or "meta" casts) the weights are
    held for (llamacpp: as the files store them, `stored_residency`).
    lora: a peft LoRA adapter folder, run unmerged (`llama3_np.lora`; float32 compute only).
    Raises Llama3Error for a missing folder or a malformed checkpoint or adapter, ParameterError("ctx"),
    ParameterError("compute"/"convention") for an unknown mode, ParameterError("dtype") for a
    residency the mode cannot compute with.
    """
    mode = ComputeMode.of(compute, convention)
    dtype = residency(dtype, mode)
    t0 = time.perf_counter()
    path = assets.model_dir(path)
    index = scan_checkpoint(path, rope_factor=rope_factor)
    check_ctx(ctx, index.config)
    if mode.dtype == "llamacpp":
        dtype = stored_residency(dtype, index.format)
    checkpoint = checkpoint_for(load_checkpoint(index, dtype=dtype), mode)
    if lora is not None:
        if mode.dtype != "float32":
            raise ParameterError("compute", f"a LoRA adapter runs in float32 compute only, not {mode.dtype}")
        adapter, settings = load_adapter(lora, checkpoint.config)
        checkpoint.weights.update(adapted(checkpoint.weights, adapter, settings.scale))
    try:
        tokenizer = load_tokenizer(path)
    except Llama3Error:
        if need_tokenizer:
            raise
        tokenizer = None
    return LoadedModel(checkpoint, tokenizer, time.perf_counter() - t0, mode)
