"""llama3_np as a model of EleutherAI's lm-evaluation-harness (`lm-eval`, the `eval` extra).

lm-eval asks a model three kinds of request (its `LM` interface, lm-eval 0.4); `ReferenceLM`
answers them on the reference, each as lm-eval's own `hf` model (`HFLM`) encodes and cuts it, so
that the same weights give the same scores:

    loglikelihood           (context, continuation) -> (sum of the continuation's logprobs,
                            is_greedy): one `score` call, the pair encoded by `encode_pair` (HFLM's
                            `_encode_pair`; an empty context is the prefix token, BOS or else the
                            end-of-text token), the context cut on the left so that at most
                            max_length + 1 tokens are scored at once
    loglikelihood_rolling   (text,) -> the sum of the logprobs of all its tokens, in lm-eval's
                            disjoint windows of max_length tokens (`rolling_windows`), the first
                            conditioned on the prefix token
    generate_until          (context, gen_kwargs) -> the text generated from the context (cut on
                            the left to max_length - max_gen_toks tokens) until a string of
                            `until`, an end-of-generation token or max_gen_toks tokens; greedy
                            unless do_sample (then temperature, top_k, top_p in transformers'
                            order, drawn with `seed`: not the draws of torch's generator)

A request is anything with lm-eval's `Instance.args`, so the class runs without lm-eval
installed. `lm_eval_model()` makes it an `lm_eval.api.model.LM` registered as "llama3_np"; lm-eval
0.4 discovers no models outside its own package, so its command line needs the registration first:
`python -m llama3_np.xcheck.harness` is lm-eval's command line with it done.

Sources: lm-evaluation-harness 0.4.13, `lm_eval/api/model.py` (`TemplateLM.loglikelihood`,
`_encode_pair`), `lm_eval/models/huggingface.py` (`HFLM.loglikelihood_rolling`, `generate_until`),
`lm_eval/utils.py` (`get_rolling_token_windows`, `make_disjoint_window`), `lm_eval/models/utils.py`
(`normalize_gen_kwargs`, `postprocess_generated_text`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from ..errors import Llama3Error
from ..load import LoadedModel, load_model
from ..sampling import SAMPLER_ORDERS, SamplingParams
from .score import encode_pair, score

DEFAULT_MAX_GEN_TOKS = 256  # HFLM's max_gen_toks
# gen_kwargs lm-eval's tasks pass, and the names normalize_gen_kwargs takes for max_gen_toks
# (in its order of priority).
MAX_GEN_TOKS_NAMES = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
GEN_KWARGS = {"until", "do_sample", "temperature", "top_k", "top_p", *MAX_GEN_TOKS_NAMES}


def rolling_windows(ids: Sequence[int], prefix: int, max_length: int) -> Iterator[tuple[list[int], list[int]]]:
    """(context, continuation) windows that together score every token of `ids` once, each with
    as much context as max_length allows: the first predicts ids[:max_length] from `prefix`
    and the ids before each; each later one predicts the next max_length ids (fewer at the end)
    from the max_length ids before its last one. lm-eval's `get_rolling_token_windows` with
    context_len 1, then `make_disjoint_window`."""
    ids = list(ids)
    if not ids:
        return
    first = min(max_length, len(ids))
    yield [prefix], ids[:first]
    done = first
    while done < len(ids):
        n = min(len(ids) - done, max_length)
        end = done + n
        window = ids[end - max_length - 1:end - 1]
        yield window[:len(window) - (n - 1)], ids[end - n:end]
        done = end


class ReferenceLM:
    """lm-eval's `LM` interface on llama3_np (module docstring). The arguments are lm-eval's
    `--model_args` (key=value, as for its `hf` model) and the settings it adds:

    pretrained   the checkpoint: a Hugging Face or Meta folder, or a .gguf file (default: the
                 default model, as for every command)
    compute      the compute mode, "float32" (default), "float64", "bfloat16", "float16"
                 (`config.ComputeMode`); convention "transformers" or "meta" for the last two
    dtype        weight residency, "float32", "bfloat16" or "gguf" (`load_model`; default: the
                 compute mode's)
    max_length   the most tokens one forward pass sees (default: the model's context less one:
                 `score` also feeds the last token, whose logits nothing reads)
    max_gen_toks generate_until's default limit, as HFLM's (256)
    seed         seed of the generator that draws sampled tokens (do_sample)
    batch_size, max_batch_size   accepted and unused: one forward pass per request
    model        a `LoadedModel` to use instead of loading `pretrained` (from Python)
    device       accepted and unused: llama3_np computes on the CPU (lm-eval's command line
                 passes cuda:0 unless told otherwise)

    Raises Llama3Error when `pretrained` names no checkpoint (or, without it, the default model is
    not installed), for a max_length outside
    1 .. context - 1; ParameterError("compute"/"convention"/"dtype")
    for an unknown compute mode or convention, or a residency the mode cannot use."""

    def __init__(self, pretrained=None, compute: str = "float32", convention: str = "transformers",
                 dtype: Optional[str] = None, max_length: Optional[int] = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 0, batch_size=1, max_batch_size=None,
                 device: Optional[str] = None, model: Optional[LoadedModel] = None):
        super().__init__()  # lm-eval's LM, when lm_eval_model() adds it
        if model is None:
            if pretrained is not None and not Path(str(pretrained)).exists():
                raise Llama3Error(f"pretrained={pretrained} does not exist: name the folder of a Llama 3 checkpoint "
                                  "(Hugging Face or Meta format) or a .gguf file")
            model = load_model(None if pretrained in (None, "") else str(pretrained), dtype=dtype,
                               compute=str(compute), convention=str(convention))
        self.model = model
        limit = model.config.max_seq_len - 1
        self.max_length = limit if max_length is None else int(max_length)
        if not 1 <= self.max_length <= limit:
            raise Llama3Error(f"max_length must be in 1..{limit} (the model's context less one), got {max_length}")
        if int(max_gen_toks) < 1:
            raise Llama3Error(f"max_gen_toks must be >= 1, got {max_gen_toks}")
        self.max_gen_toks = int(max_gen_toks)
        self.rng = np.random.default_rng(int(seed))
        self.tokenizer = model.need_tokenizer()

    @property
    def prefix_token_id(self) -> int:
        """What an empty context stands for: BOS, else the end-of-text token (HFLM's)."""
        prefix = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id
        if prefix is None:
            raise Llama3Error("the tokenizer has no BOS or end-of-text token to condition an empty context on")
        return prefix

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        # The context cut on the left to max_length + 1 tokens with the continuation (HFLM's
        # `(context_enc + continuation_enc)[-(self.max_length + 1):]`).
        keep = self.max_length + 1 - len(continuation)
        if keep < 1:
            raise Llama3Error(f"a continuation of {len(continuation)} tokens does not fit in max_length "
                              f"{self.max_length}: raise max_length")
        s = score(self.model.weights, self.model.config, context[-keep:], continuation, top_n=0,
                  compute=self.model.compute)
        return s.sum_logprob, s.is_greedy

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """For each request, args (context, continuation): (log p(continuation | context), whether
        greedy decoding would produce the continuation)."""
        out = []
        for request in requests:
            context, continuation = request.args
            if continuation == "":
                raise Llama3Error("loglikelihood: the continuation is empty: there is nothing to score")
            if context == "":
                cont = self.tokenizer.encode(continuation, bos=False)
                # lm-eval: a continuation that starts with the prefix token conditions on it itself
                pair = ([self.prefix_token_id], cont) if cont[:1] != [self.prefix_token_id] else (cont[:1], cont[1:])
            else:
                pair = encode_pair(self.tokenizer, context, continuation)
            out.append(self._score(*pair))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        """For each request, args (text,): the log-probability of the whole text, every token
        scored once (`rolling_windows`)."""
        out = []
        for request in requests:
            (text,) = request.args
            windows = rolling_windows(self.tokenizer.encode(text), self.prefix_token_id, self.max_length)
            out.append(math.fsum(self._score(context, continuation)[0] for context, continuation in windows))
        return out

    def generate_until(self, requests) -> list[str]:
        """For each request, args (context, gen_kwargs): the generated text, ending before the first
        string of gen_kwargs["until"] (one string or a list). gen_kwargs: until, max_gen_toks (or
        max_new_tokens, max_tokens, max_completion_tokens), do_sample, temperature, top_k, top_p.
        Raises Llama3Error for another key, and for max_gen_toks not below max_length."""
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            until, max_new, params = self._generation_settings(dict(gen_kwargs or {}))
            ids = self.tokenizer.encode(context)[-(self.max_length - max_new):]
            text = self.model.generate(ids, max_new, params, self.rng, ctx=len(ids) + max_new, stop=until)
            # lm-eval cuts the text before each stop string in turn (`postprocess_generated_text`)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out

    def _generation_settings(self, kw: dict) -> tuple[list[str], int, Optional[SamplingParams]]:
        unknown = sorted(set(kw) - GEN_KWARGS)
        if unknown:
            raise Llama3Error(f"generate_until: gen_kwargs {', '.join(unknown)} are not known to llama3_np: "
                              f"use {', '.join(sorted(GEN_KWARGS))}")
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        max_new = next((int(kw[k]) for k in MAX_GEN_TOKS_NAMES if kw.get(k) is not None), self.max_gen_toks)
        if not 1 <= max_new < self.max_length:
            raise Llama3Error(f"generate_until: max_gen_toks {max_new} must be in 1..{self.max_length - 1} "
                              f"(below max_length {self.max_length})")
        temperature = float(kw.get("temperature") or 0.0)
        do_sample = kw.get("do_sample", temperature > 0)  # normalize_gen_kwargs: temperature 0 is greedy
        if not do_sample or temperature == 0.0:
            return until, max_new, None
        params = SamplingParams(temperature=temperature, top_k=int(kw.get("top_k") or 0),
                                top_p=float(kw.get("top_p") or 1.0), min_p=0.0,
                                samplers=SAMPLER_ORDERS["transformers"])
        return until, max_new, params

    @property
    def tokenizer_name(self) -> str:
        """The name lm-eval files results and caches under."""
        return str(self.model.checkpoint.path).replace("/", "__")


_REGISTERED = None


def lm_eval_model():
    """`ReferenceLM` as an `lm_eval.api.model.LM`, registered in lm-eval's model registry as
    "llama3_np" (once): `lm_eval.simple_evaluate(model="llama3_np", model_args="pretrained=...")`.
    Needs lm-eval (the `eval` extra); raises Llama3Error without it."""
    global _REGISTERED
    if _REGISTERED is None:
        try:
            import lm_eval.models  # noqa: F401  registers lm-eval's own models (the registry fills lazily)
            from lm_eval.api.model import LM
            from lm_eval.api.registry import register_model
        except ImportError:
            raise Llama3Error("lm-eval is not installed: pip install 'llama3_np[eval]'") from None

        @register_model("llama3_np")
        class Llama3NpLM(ReferenceLM, LM):
            __doc__ = ReferenceLM.__doc__

        _REGISTERED = Llama3NpLM
    return _REGISTERED


def main() -> None:
    """lm-eval's command line with llama3_np registered: `python -m llama3_np.xcheck.harness --model
    llama3_np --model_args pretrained=FOLDER --tasks ...`; llama3_np's errors end in one line on
    stderr and exit status 2."""
    import sys

    try:
        lm_eval_model()
        from lm_eval.__main__ import cli_evaluate

        cli_evaluate()
    except Llama3Error as e:
        print(f"llama3_np: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
