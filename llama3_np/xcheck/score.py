"""Teacher-forced log-probabilities of a given text: what the model thinks of every token of it.

One forward pass over `context + continuation` gives the logits of every position; the logits at
position i are the model's distribution for token i + 1. For every token after the first, `score`
reports

    logprob     log softmax(logits)[token], over the whole vocabulary, in float64 from the float32
                logits (the "raw" log-probability evaluation harnesses sum)
    rank        1 + the number of tokens with a larger logit (1: no token is more probable)
    top         the N most probable tokens and their logprobs (most probable first, the lower id
                first on equal logits)
    processed   under a sampler chain (`llama3_np.sampling`, the chain `generate` draws from):
                whether the token survives it, how many tokens do (the kept set), and its
                log-probability renormalised over the kept set: log of the probability
                `sampling.sampling_probs` gives it (-inf when the chain filters it out). The
                repetition penalty looks at the `repeat_last_n` tokens before the scored one, as
                in a generation that had drawn them.

Totals are over the scored tokens: the continuation's when one is given, else every token after
the first. sum and mean of the logprobs, perplexity exp(-mean), and greedy agreement: the
fraction of scored tokens that are the argmax of their logits (the lower id on equal logits, as
greedy `sample` picks); `is_greedy` when all are. An evaluation harness's loglikelihood request
(context, continuation) is answered by (sum, is_greedy) of one `score` call, which is what
EleutherAI lm-evaluation-harness's `LM.loglikelihood` returns.

Long inputs go through the model PREFILL_CHUNK tokens at a time (as generate's prefill: same
logits, smaller attention arrays); an input that fits in a chunk is one `forward` call.
`score_batch` scores many inputs, `parallel` of them in each forward pass (`model.forward_batch`:
each weight read once for all; each input's logits its own within float32 rounding).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from ..checks import check_parallel, token_ids
from ..config import ComputeMode, ModelConfig
from ..errors import Llama3Error, ParameterError
from ..generation import PREFILL_CHUNK, REPEAT_LAST_N
from ..model import KVCache, forward_batch
from ..sampling import SamplingParams, survivors
from ..text.pieces import pieces, quoted
from .perplexity import log_softmax

DEFAULT_TOP_N = 5


@dataclass(frozen=True)
class Processed:
    """A token as a sampler chain sees it."""

    survives: bool
    kept: int  # how many tokens survive the chain
    logprob: float  # renormalised over the kept set; -inf when the token does not survive


@dataclass(frozen=True)
class TokenScore:
    position: int  # index of the token in the scored ids (its logits are those of position - 1)
    id: int
    logprob: float  # log p(token | the tokens before it), float64
    rank: int  # 1 + the number of tokens with a larger logit
    greedy: bool  # the token is the argmax of its logits (the lower id on equal logits)
    top: tuple[tuple[int, float], ...]  # the N most probable (id, logprob), most probable first
    processed: Optional[Processed] = None


@dataclass
class Scores:
    """The scores of one input: `ids` = context + continuation; `tokens` holds every token after
    the first (positions 1 .. len(ids) - 1); the totals count positions `first_scored` on."""

    ids: list[int]
    first_scored: int
    tokens: list[TokenScore] = field(default_factory=list)
    params: Optional[SamplingParams] = None

    @property
    def scored(self) -> list[TokenScore]:
        return [t for t in self.tokens if t.position >= self.first_scored]

    @property
    def sum_logprob(self) -> float:
        return math.fsum(t.logprob for t in self.scored)

    @property
    def mean_logprob(self) -> float:
        return self.sum_logprob / len(self.scored)

    @property
    def perplexity(self) -> float:
        return math.exp(-self.mean_logprob)

    @property
    def greedy_agreement(self) -> float:
        return sum(t.greedy for t in self.scored) / len(self.scored)

    @property
    def is_greedy(self) -> bool:
        return all(t.greedy for t in self.scored)

    def totals(self) -> dict:
        return {"tokens": len(self.scored), "sum_logprob": self.sum_logprob, "mean_logprob": self.mean_logprob,
                "perplexity": self.perplexity, "greedy_agreement": self.greedy_agreement,
                "is_greedy": self.is_greedy}


def processed(logits: np.ndarray, token: int, params: SamplingParams, recent: Sequence[int] = ()) -> Processed:
    # [V] -> Processed
    """Token `token` under the chain `params` applied to `logits` (float32 [V]) with `recent` the
    ids the repetition penalty looks at: whether it survives, the size of the kept set, and its
    log-probability under the chain's distribution (`sampling.sampling_probs`), computed as
    z - logsumexp(z) over the survivors' final logits z in float64.

    Raises Llama3Error when the chain keeps no token (logits that are all -inf or NaN)."""
    ids, z = survivors(logits, params, recent) if np.isfinite(logits).any() else (np.zeros(0, np.int64), None)
    if ids.size == 0:
        raise Llama3Error("the sampler chain keeps no token (the logits are all -inf or NaN): "
                          "check the logits or the sampler chain")
    i = int(np.searchsorted(ids, token))  # survivors' ids are ascending
    if i == ids.size or ids[i] != token:
        return Processed(False, int(ids.size), -math.inf)
    z = z.astype(np.float64)
    top = z.max()
    return Processed(True, int(ids.size), float(z[i] - top - np.log(np.sum(np.exp(z - top)))))


def token_scores(logits: np.ndarray, ids: Sequence[int], first_position: int, top_n: int = DEFAULT_TOP_N,
                 params: Optional[SamplingParams] = None, repeat_last_n: int = REPEAT_LAST_N) -> list[TokenScore]:
    # [n, V] logits of positions first_position - 1 .. first_position + n - 2 -> n scores
    """The scores of tokens ids[first_position .. first_position + n - 1], from the logits that
    predict them: row r of `logits` is the model's output at position first_position - 1 + r.
    `ids` is the whole input (the repetition penalty reads the tokens before each scored one).
    params: a sampler chain for the processed view (None: raw logprobs only). repeat_last_n: how
    many tokens before the scored one the penalty looks at (0: none, -1: all)."""
    logits = np.asarray(logits, dtype=np.float32)
    logprobs = log_softmax(logits)  # [n, V] float64
    out = []
    for r, row in enumerate(logits):
        position = first_position + r
        token = int(ids[position])
        lp = logprobs[r]
        k = min(top_n, row.size)
        top = np.argpartition(-row, k - 1)[:k] if k > 0 else np.zeros(0, dtype=np.int64)
        top = top[np.lexsort((top, -row[top]))]  # most probable first, lower id first on ties
        rank = 1 + int(np.count_nonzero(row > row[token]))
        view = None
        if params is not None:
            start = 0 if repeat_last_n == -1 else max(position - repeat_last_n, 0)
            recent = ids[start:position] if repeat_last_n != 0 else []
            view = processed(row, token, params, recent)
        out.append(TokenScore(position, token, float(lp[token]), rank, int(np.argmax(row)) == token,
                              tuple((int(i), float(lp[i])) for i in top), view))
    return out


def score(weights: Mapping[str, np.ndarray], config: ModelConfig, context: Sequence[int],
          continuation: Sequence[int] = (), top_n: int = DEFAULT_TOP_N, params: Optional[SamplingParams] = None,
          repeat_last_n: int = REPEAT_LAST_N, compute: str | ComputeMode = "float32") -> Scores:
    """Teacher-forced scores of `context` + `continuation` (token ids), in one forward pass.

    The totals count the continuation's tokens, or, without one, every token of `context` after
    the first (the first has no logits before it). top_n: alternatives listed per token (>= 0).
    params: also score each token under this sampler chain (module docstring). Positions start
    at 0 on an empty KV cache. compute: the compute mode (`config.ComputeMode`; a `LoadedModel`'s
    `compute` for the weights it holds).

    Raises Llama3Error for ids outside the vocabulary, an empty context, a context of one token
    without a continuation, an input longer than the model's trained context, a negative top_n
    or repeat_last_n below -1.
    """
    return next(score_batch(weights, config, [(context, continuation)], top_n, params, repeat_last_n,
                            compute=compute))


def score_batch(weights: Mapping[str, np.ndarray], config: ModelConfig,
                inputs: Iterable[tuple[Sequence[int], Sequence[int]]], top_n: int = DEFAULT_TOP_N,
                params: Optional[SamplingParams] = None, repeat_last_n: int = REPEAT_LAST_N,
                parallel: int = 1, compute: str | ComputeMode = "float32") -> Iterator[Scores]:
    """`score` of each (context, continuation) of `inputs`, in their order, `parallel` inputs in
    each forward pass (`model.forward_batch`, each input from its own empty KV cache; long inputs
    PREFILL_CHUNK tokens a pass). Each input's logits are its logits alone within float32
    rounding (bit for bit with `products.set_batch_invariant(True)`). Raises what `score` raises,
    for the first input that is wrong, before any is scored in its group; ParameterError("parallel")
    when parallel is not an integer >= 1. compute: as `score`'s."""
    if top_n < 0:
        raise ParameterError("top_n", f"top_n must be >= 0, got {top_n}")
    if repeat_last_n < -1:
        raise ParameterError("repeat_last_n", f"repeat_last_n must be >= 0 (0 = off), or -1 for the whole "
                                              f"context, got {repeat_last_n}")
    check_parallel(parallel)
    pending = iter(inputs)
    while group := [scores_for(config, *pair, params) for pair in itertools.islice(pending, parallel)]:
        caches = [KVCache(config, len(s.ids), compute) for s in group]
        for start in range(0, max(len(s.ids) for s in group), PREFILL_CHUNK):
            fed = [(s, c) for s, c in zip(group, caches) if start < len(s.ids)]
            chunks = [s.ids[start:start + PREFILL_CHUNK] for s, _ in fed]
            for (s, _), logits in zip(fed, forward_batch(weights, config, chunks, [c for _, c in fed])):
                # Row r predicts token start + r + 1; the last row of the input predicts nothing.
                rows = logits[:len(s.ids) - 1 - start]  # [len(chunk), V] at most
                s.tokens += token_scores(rows, s.ids, start + 1, top_n, params, repeat_last_n)
        yield from group


def scores_for(config: ModelConfig, context: Sequence[int], continuation: Sequence[int],
               params: Optional[SamplingParams]) -> Scores:
    """The empty `Scores` of one input, checked (`score`'s errors)."""
    context, continuation = [int(i) for i in context], [int(i) for i in continuation]
    if not context:
        raise Llama3Error("the context is empty: give at least one token to condition on (a BOS token)")
    if not continuation and len(context) < 2:
        raise Llama3Error("one token alone has nothing to score: give a longer text or a continuation")
    ids = context + continuation
    token_ids(ids, config.vocab_size)
    if len(ids) > config.max_seq_len:
        raise Llama3Error(f"the input has {len(ids)} tokens, more than the {config.max_seq_len} the model was "
                          "trained for: shorten it")
    return Scores(ids, len(context) if continuation else 1, params=params)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a (context, continuation) pair as lm-evaluation-harness encodes a loglikelihood
    request (lm-eval 0.4, `TemplateLM.loglikelihood` and `HFLM._encode_pair`): whitespace at the end
    of the context moves to the front of the continuation; the continuation's ids are those that
    follow the context's own encoding in the encoding of the whole text. An empty context is the
    prefix token alone (BOS, else the end-of-text token), and the continuation is encoded alone.
    `tokenizer.encode` adds BOS when the checkpoint does (`Tokenizer.add_bos`)."""
    if context == "":
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if prefix is None:
            raise Llama3Error("the context is empty and the tokenizer has no BOS or end-of-text token to "
                              "stand for it: give a context")
        return [prefix], tokenizer.encode(continuation, bos=False)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


# ---------------------------------------------------------------------------------------------
# Requests: one JSON object a line


TEXT_KEYS, ID_KEYS = ({"context", "continuation"}, {"text"}), ({"context_ids", "continuation_ids"}, {"ids"})


def read_requests(text: str, name: str) -> list[tuple[str, dict]]:
    """Every line of JSONL requests `text` (from the file `name`) as (where it is, its object), its
    shape checked: {"context": TEXT, "continuation": TEXT}, {"context_ids": [...],
    "continuation_ids": [...]}, {"text": TEXT} or {"ids": [...]}, each with an optional "id". All
    lines are read before anything is computed, so that a bad line writes nothing.
    Raises Llama3Error for a line that is not such an object, and for no line at all."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{name} line {n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise Llama3Error(f"{where} is not JSON ({e.msg}): give one JSON object a line") from None
        if not isinstance(obj, dict):
            raise Llama3Error(f"{where} is not a JSON object: give one object a line")
        keys = set(obj) - {"id"}
        if keys in TEXT_KEYS:
            if not all(isinstance(obj[k], str) for k in keys):
                raise Llama3Error(f"{where}: {', '.join(sorted(keys))} must be strings")
            if obj.get("continuation", "x") == "" or obj.get("text", "x") == "":
                raise Llama3Error(f"{where}: the text to score is empty: give some text")
        elif keys in ID_KEYS:
            for k in keys:
                if not (isinstance(obj[k], list) and all(type(t) is int for t in obj[k])):
                    raise Llama3Error(f"{where}: {k} must be a list of integer token ids")
            if not obj.get("continuation_ids", [0]) or len(obj.get("ids", [0, 0])) < 2 or obj.get("context_ids") == []:
                raise Llama3Error(f"{where} has nothing to score: give a context and a continuation, or two ids "
                                  "or more")
        else:
            raise Llama3Error(f"{where} has the keys {sorted(obj)}: give context and continuation (text), "
                              "context_ids and continuation_ids, text, or ids (and optionally id)")
        out.append((where, obj))
    if not out:
        raise Llama3Error(f"{name} holds no input: give one JSON object a line")
    return out


def encode_request(where: str, obj: dict, tokenizer, vocab_size: int) -> tuple[list[int], list[int]]:
    """The context and continuation ids of one request of `read_requests` (text encoded as lm-eval
    does, `encode_pair`; `tokenizer` may be None for requests of ids).
    Raises Llama3Error for an id outside the vocabulary or nothing to score."""
    if "text" in obj or "context" in obj:  # the model was loaded with its tokenizer
        context, continuation = ((tokenizer.encode(obj["text"]), []) if "text" in obj
                                 else encode_pair(tokenizer, obj["context"], obj["continuation"]))
    else:
        context, continuation = obj.get("ids", obj.get("context_ids")), obj.get("continuation_ids", [])
    for ids in (context, continuation):
        try:
            token_ids(ids, vocab_size)
        except Llama3Error as e:
            raise Llama3Error(f"{where}: {e}") from None
    if not continuation and len(context) < 2:
        raise Llama3Error(f"{where} has nothing to score: its text is a single token")
    return context, continuation


# ---------------------------------------------------------------------------------------------
# Reports: the table, OpenAI's logprobs object, the answer to a request


def _finite(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None  # JSON has no -inf: a filtered-out token's processed logprob


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token as the text it stands for (its bytes, split UTF-8 as \\xNN), or its id."""
    if tokenizer is None:
        return [f"<{i}>" for i in ids]
    return [p.readable for p in pieces(tokenizer, ids)]


def chain_text(params: SamplingParams) -> str:
    """The chain's order and every parameter's value (a sampler left out of the order is not applied)."""
    values = ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v!r}"
                       for k, v in asdict(params).items() if k not in ("samplers", "dry_breaker_ids"))
    return f"{';'.join(params.samplers) or '(none: the softmax of the logits)'} ({values})"


def token_names(tokenizer, s: Scores) -> dict[int, str]:
    """The text of every token an output names: the input's and the alternatives'."""
    ids = sorted(set(s.ids) | {i for t in s.tokens for i, _ in t.top})
    return dict(zip(ids, token_texts(tokenizer, ids)))


def scores_json(s: Scores, names: dict[int, str]) -> dict:
    """OpenAI completions' `logprobs` object for every token of the input (the first has null
    entries), and llama3_np's details: ids, ranks, the top alternatives by id, the sampler view,
    the totals over the scored tokens."""
    texts = [names[i] for i in s.ids]
    offsets, at = [], 0
    for t in texts:
        offsets.append(at)
        at += len(t)
    by_position = {t.position: t for t in s.tokens}
    rows = [by_position.get(i) for i in range(len(s.ids))]
    out = {
        "ids": s.ids, "first_scored": s.first_scored,
        "logprobs": {"tokens": texts, "token_logprobs": [t.logprob if t else None for t in rows],
                     "top_logprobs": [{names[i]: lp for i, lp in t.top} if t else None for t in rows],
                     "text_offset": offsets},
        "ranks": [t.rank if t else None for t in rows],
        "top_ids": [[[i, lp] for i, lp in t.top] if t else None for t in rows],
    }
    if s.params is not None:
        out["processed"] = {**asdict(s.params), "samplers": list(s.params.samplers),
                            "survives": [t.processed.survives if t else None for t in rows],
                            "kept": [t.processed.kept if t else None for t in rows],
                            "token_logprobs": [_finite(t.processed.logprob) if t else None for t in rows]}
    out["totals"] = s.totals()
    return out


def scores_table(s: Scores, names: dict[int, str]) -> str:
    """The table `llama3-np score` prints: a row per scored token (position, id, text, logprob, rank,
    the sampler view, the most probable alternatives), then the totals."""
    scored = s.scored
    piece_width = min(24, max(len("token"), *(len(quoted(names[t.id])) for t in scored)))
    head = f"{'pos':>5}  {'id':>7}  {'token':<{piece_width}}  {'logprob':>9}  {'rank':>6}"
    if s.params is not None:
        head += f"  {'kept':>4}  {'set':>6}  {'processed':>9}"
    lines = [head + "  most probable"]
    for t in scored:
        line = (f"{t.position:>5}  {t.id:>7}  {quoted(names[t.id]):<{piece_width}.{piece_width}}  "
                f"{t.logprob:9.4f}  {t.rank:>6}")
        if s.params is not None:
            p = t.processed
            line += f"  {'yes' if p.survives else 'no':>4}  {p.kept:>6}  {p.logprob:9.4f}"
        lines.append(line + "  " + "  ".join(f"{quoted(names[i])} {lp:.3f}" for i, lp in t.top))
    n = len(scored)
    lines.append(f"{n} tokens scored: sum {s.sum_logprob:.4f}, mean {s.mean_logprob:.4f}, "
                 f"perplexity {s.perplexity:.4f}, greedy agreement {sum(t.greedy for t in scored)}/{n} "
                 f"({100 * s.greedy_agreement:.1f}%)")
    if s.params is not None:
        kept = sum(t.processed.survives for t in scored)
        processed = [t.processed.logprob for t in scored]
        total = math.fsum(processed) if kept == n else -math.inf
        lines.append(f"sampler chain {chain_text(s.params)}: keeps {kept}/{n} tokens, processed sum {total:.4f}")
    return "\n".join(lines)


def request_result(obj: dict, s: Scores) -> dict:
    """The JSON line answering the request `obj`: its id, the loglikelihood and is_greedy an
    evaluation harness reads, the totals, and every scored token's id, logprob and rank."""
    scored = s.scored
    out = {"id": obj["id"]} if "id" in obj else {}
    out.update(loglikelihood=s.sum_logprob, is_greedy=s.is_greedy, **{k: v for k, v in s.totals().items()
                                                                          if k not in ("sum_logprob", "is_greedy")})
    out.update(context_tokens=s.first_scored, ids=[t.id for t in scored], token_logprobs=[t.logprob for t in scored],
               ranks=[t.rank for t in scored])
    if s.params is not None:
        out["processed"] = {"survives": [t.processed.survives for t in scored],
                            "kept": [t.processed.kept for t in scored],
                            "token_logprobs": [_finite(t.processed.logprob) for t in scored]}
    return out
