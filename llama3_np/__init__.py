"""llama3_np: Meta's Llama 3 inference as plain NumPy functions.

The specification is `llama3_np.model`; everything else feeds it arrays or consumes its logits.
The public API, in the order data flows (README.md, "Python"; docs/DESIGN.md, "The data path"):

    load_model(path=None, dtype="float32")   a checkpoint folder -> LoadedModel (.config, .weights,
                                             .tokenizer: .encode(text) / .decode(ids)); text in, text
                                             out: .generate(prompt), .stream(prompt), .chat(messages)
    forward(weights, config, tokens, cache=None, pos=None, trace=None, compute=None)
                                             token ids -> logits [T, V] (pos: where the cache
                                             ends, unless given; compute: "float32" or "float64")
    KVCache(config, max_len, compute="float32")   keys and values of the tokens seen so far
    forward_batch(weights, config, batch, caches=None, positions=None)   B token-id lists ->
                                             B logits arrays in one pass (each weight read once for
                                             all; each sequence its own KVCache and positions)
    Trace(patterns, edits=())                the named stages of one forward call (stages.py), and
                                             interventions: Edit(stage, op, value, heads, tokens)
    SamplingParams(...), sample(logits, params, rng)   logits [V] -> the next token id
    LoadedModel.session(ctx)                 a Session: prefill, then decode; generate(ids) yields one
                                             Step per token, greedy and ending at the model's
                                             end-of-generation ids unless told otherwise
    generate_batch(generations, parallel)   many Session.generate records run `parallel` at a
                                             time, one forward_batch per step, in input order
                                             (LoadedModel.generate_batch(prompts): the same for text)
    LoadedModel.chat_session(system)         ChatSession: a multi-turn chat on one KV cache, send(text)
    score(weights, config, context, continuation=(), top_n=5, params=None)   teacher-forced logprobs
                                             of given ids: per token logprob, rank, top-N, and under
                                             a sampler chain; totals (xcheck/score.py)
"""

__version__ = "0.1.0"

from .errors import Llama3Error, ParameterError  # noqa: E402
from .config import ModelConfig, RopeScaling  # noqa: E402
from .model import KVCache, forward, forward_batch  # noqa: E402
from .stages import Edit, Trace, stage_shapes  # noqa: E402
from .sampling import SamplingParams, sample, sampling_probs  # noqa: E402
from .generation import Generation, Session, Step, generate_batch  # noqa: E402
from .load import LoadedModel, load_model, load_tokenizer  # noqa: E402
from .chat_session import ChatSession  # noqa: E402
from .xcheck.score import Scores, score  # noqa: E402
from .text.tokenizer import StreamDecoder, Tokenizer  # noqa: E402

__all__ = [
    "Llama3Error", "ParameterError", "ModelConfig", "RopeScaling", "KVCache", "forward", "forward_batch", "Trace", "Edit",
    "stage_shapes", "SamplingParams", "sample", "sampling_probs", "Generation", "Session", "Step", "generate_batch",
    "LoadedModel", "load_model", "ChatSession", "StreamDecoder", "Tokenizer", "load_tokenizer", "score", "Scores",
]
