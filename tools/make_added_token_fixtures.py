"""Write the added-token fixtures under tests/fixtures/tokenizer/added/.

    python tools/make_added_token_fixtures.py     (needs `make tools`: tokenizers, gguf, llama-cpp-python)

A small byte-level BPE with Llama 3's pre-tokenizer, trained by Hugging Face `tokenizers` on the
tokenizer corpus, with special added tokens and non-special ones (`"special": false`: a
fine-tune's `<think>`, `<tool_call>`, a token that is a prefix of another, one with a space, one
with non-ASCII letters), as two files:

- hf/tokenizer.json, hf/tokenizer_config.json: the Hugging Face folder.
- added.gguf: the same vocabulary in a GGUF (a one-layer model of random float32 weights, so that
  it imports and loads in llama.cpp), its special tokens CONTROL and the others USER_DEFINED, as
  llama.cpp's `convert_hf_to_gguf.py` types them; `tokenizer.ggml.pre` "llama-bpe".
- reference.json: for each string, the ids of `tokenizers` (`encode(s, add_special_tokens=False)`,
  which also turns special tokens' text into them), llama.cpp's (`Llama(vocab_only=True).tokenize`,
  `add_bos=False`) with `special=False` (user-defined tokens matched, control tokens left as text)
  and with `special=True`.
"""

from __future__ import annotations

import json
import shutil
import sys
from importlib.metadata import version

import numpy as np

from tool_support import REPO as ROOT, run_tool  # first: it makes this checkout's llama3_np importable

from llama3_np.formats.gguf_import import PRE_TOKENIZERS, gguf_name
from llama3_np.text.tokenizer import LLAMA3_PATTERN

OUT = ROOT / "tests" / "fixtures" / "tokenizer" / "added"
SPECIAL = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool", "call me", "Ünïcødé"]
VOCAB_SIZE = 600

STRINGS = [
    "plain text without any added token",
    "<think>reasoning</think>The answer is 42.",
    "<think>\n\nlet me see\n</think>\n\n",
    "<tool_call>{\"name\": \"get_weather\"}</tool_call>",
    "<tool alone, <tool_call> and <tool_cal> and <toolbox>",
    "please call me maybe, call  me, callme",
    "Ünïcødé Ünïcødé!ÜnïcødéÜnïcødé ünïcødé",
    "<<think>> <think><think></think></think>",
    " <think> spaced </think> ",
    "<|eot_id|> is special, <think> is not",
    "<|start_header_id|>user<|end_header_id|>\n\n<think>hi</think><|eot_id|>",
    "",
    "   ",
]


def train():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = json.loads((ROOT / "tests" / "fixtures" / "tokenizer" / "corpus.json").read_text())["corpus"]
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # A lone surrogate of the corpus is not UTF-8: it becomes "?".
    tok.train_from_iterator([s.encode("utf-8", "replace").decode() for s in corpus] * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    return tok


def write_gguf(path, tokenizer_json: dict):
    import gguf

    added = {t["id"]: t for t in tokenizer_json["added_tokens"]}
    vocab = tokenizer_json["model"]["vocab"] | {t["content"]: i for i, t in added.items()}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    types = [gguf.TokenType.NORMAL if i not in added else
             gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED for i in range(len(tokens))]
    dim, ffn, n_heads = 16, 32, 2
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(dim // n_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tokenizer_json["model"]["merges"]])
    w.add_bos_token_id(vocab["<|begin_of_text|>"])
    w.add_eos_token_id(vocab["<|eot_id|>"])
    w.add_add_bos_token(False)
    rng = np.random.default_rng(0)
    head = dim // n_heads
    shapes = {"tok_embeddings.weight": (len(tokens), dim), "norm.weight": (dim,), "output.weight": (len(tokens), dim),
              "layers.0.attention_norm.weight": (dim,), "layers.0.ffn_norm.weight": (dim,),
              "layers.0.attention.wq.weight": (dim, dim), "layers.0.attention.wk.weight": (head, dim),
              "layers.0.attention.wv.weight": (head, dim), "layers.0.attention.wo.weight": (dim, dim),
              "layers.0.feed_forward.w1.weight": (ffn, dim), "layers.0.feed_forward.w2.weight": (dim, ffn),
              "layers.0.feed_forward.w3.weight": (ffn, dim)}
    for name, shape in shapes.items():
        w.add_tensor(gguf_name(name), rng.standard_normal(shape).astype(np.float32) * 0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> int:
    import llama_cpp

    assert PRE_TOKENIZERS["llama-bpe"][1], "llama3_np imports llama-bpe with ignore_merges"
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "hf").mkdir(parents=True)
    tok = train()
    tok.save(str(OUT / "hf" / "tokenizer.json"))
    (OUT / "hf" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": False}, indent=1) + "\n")
    tokenizer_json = json.loads((OUT / "hf" / "tokenizer.json").read_text())
    write_gguf(OUT / "added.gguf", tokenizer_json)
    cpp = llama_cpp.Llama(model_path=str(OUT / "added.gguf"), vocab_only=True, verbose=False)
    reference = {"producer": f"tokenizers {version('tokenizers')}, llama-cpp-python {version('llama-cpp-python')}",
                 "strings": STRINGS,
                 "tokenizers": [tok.encode(s, add_special_tokens=False).ids for s in STRINGS],
                 "llama.cpp": [cpp.tokenize(s.encode("utf-8"), add_bos=False, special=False) for s in STRINGS],
                 "llama.cpp special": [cpp.tokenize(s.encode("utf-8"), add_bos=False, special=True) for s in STRINGS]}
    text = json.dumps(reference, ensure_ascii=False)
    (OUT / "reference.json").write_text(text.replace("], [", "],\n [") + "\n", encoding="utf-8")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT.relative_to(ROOT)}: {total / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("make_added_token_fixtures", main))
