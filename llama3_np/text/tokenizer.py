"""Text <-> token ids, exactly as the checkpoint's reference tokenizer does it.

Two kinds of tokenizer file, one algorithm (byte-level BPE, specified in `llama3_np.text.bpe`), run by
tiktoken:
- Meta's `tokenizer.model` (Llama 3.x): a tiktoken BPE file, the Llama 3 split pattern and 256
  special tokens numbered after the vocabulary; ids equal `llama_models`' `Tokenizer`.
- Hugging Face `tokenizer.json` (byte-level BPE: vocabulary, merges, pre-tokenizer), as shipped
  with Hugging Face checkpoints and written by the GGUF importer; ids equal the reference
  tokenizer of that checkpoint (for the default model: llama.cpp on its GGUF).

`encode` never turns text into special tokens: a user who types `<|eot_id|>` gets those
characters. Special tokens enter only through `encode_special` (and the chat formats). Added tokens
that are not special (Hugging Face `"special": false`, a GGUF's USER_DEFINED tokens, such as a
fine-tune's `<think>` or `<tool_call>`) are text: `encode` finds them in the text first, leftmost
and longest first, as Hugging Face `tokenizers` and llama.cpp do, and runs BPE on the rest.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import re
from pathlib import Path
from typing import Iterable, Mapping

import tiktoken

from . import bpe
from ..errors import Llama3Error
from ..files import read_json

# Meta's split pattern for Llama 3 (`llama_models/llama3/tokenizer.py`).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# GPT-2's pattern: what a Hugging Face `ByteLevel` pre-tokenizer with `use_regex` splits by.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Llama 3.1+ names of the 256 special tokens; ids follow the vocabulary (128000..128255).
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    "<|image|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - 12)]

# The special tokens that end a generation wherever a vocabulary has them: Llama 3's end of text,
# end of message and end of turn (Meta's `Tokenizer.stop_tokens`, in completion as in chat), and
# ChatML's end of turn and end of text (the default model). llama.cpp builds its end-of-generation
# set from the same token texts (`llama_vocab::impl::load` in src/llama-vocab.cpp).
END_OF_GENERATION = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>", "<|im_end|>", "<|endoftext|>")



def end_of_generation_ids(tokens: Mapping[str, int], declared: Iterable[int] = ()) -> list[int]:
    """The ids that end a generation in a vocabulary (`tokens`: token text -> id): the `declared`
    ones (a checkpoint's or a GGUF's eos, eot, eom ids) first, then every token of
    END_OF_GENERATION the vocabulary holds, in id order, each id once."""
    found = sorted(tokens[name] for name in END_OF_GENERATION if name in tokens)
    return list(dict.fromkeys([*(int(i) for i in declared), *found]))


# Meta's tokenizer hands tiktoken at most this many characters at a time ...
MAX_CHUNK_CHARS = 400_000
# ... and cuts every run of whitespace, or of non-whitespace, after this many characters.
MAX_RUN_CHARS = 25_000


class Tokenizer:
    """A byte-level BPE tokenizer: a vocabulary (token bytes -> id), split patterns, special tokens.

    `patterns` are applied in order (see `bpe.pretokenize`); the last one runs inside tiktoken.
    `merges` is None for tiktoken files (a pair's rank is the rank of the joined token).
    """

    def __init__(self, *, name: str, vocab: dict[bytes, int], special_tokens: dict[str, int],
                 patterns: list[str], bos_id: int | None, eos_id: int | None, add_bos: bool,
                 merges: bpe.Merges | None = None, whole_first: bool = True,
                 meta_chunks: bool = False, chat_template: str | None = None,
                 added_tokens: dict[str, int] | None = None):
        self.name = name
        self.vocab = vocab
        self.merges = merges
        self.whole_first = whole_first
        self.patterns = patterns
        self.special_tokens = dict(special_tokens)
        self.special_ids = frozenset(special_tokens.values())
        self.added_tokens = dict(added_tokens or {})  # not special: matched in the text by `encode`
        self._added = _alternation(self.added_tokens)
        self._specials = _alternation(self.special_tokens)
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.chat_template = chat_template
        self.meta_chunks = meta_chunks
        self._bytes = {i: t for t, i in vocab.items()}
        self._bytes.update((i, s.encode("utf-8")) for s, i in special_tokens.items())
        self._bytes.update((i, s.encode("utf-8")) for s, i in self.added_tokens.items())
        self.n_vocab = max(self._bytes) + 1
        # tiktoken needs every single byte to have a rank. A byte the vocabulary lacks gets a
        # rank past the vocabulary: it then never merges, and `encode` drops it (see bpe.py).
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in vocab]
        ranks = vocab | {byte: self.n_vocab + k for k, byte in enumerate(missing)}
        self._drops_bytes = bool(missing)
        self._encoding = tiktoken.Encoding(name, pat_str=patterns[-1], mergeable_ranks=ranks,
                                           special_tokens=special_tokens)

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def llama3(cls, path: str | Path) -> "Tokenizer":
        """Meta's Llama 3 tokenizer from its tiktoken BPE file (`tokenizer.model`)."""
        path = Path(path)
        vocab = read_tiktoken_file(path)
        special = {name: len(vocab) + i for i, name in enumerate(LLAMA3_SPECIAL_TOKENS)}
        return cls(name=str(path), vocab=vocab, special_tokens=special, patterns=[LLAMA3_PATTERN],
                   bos_id=special["<|begin_of_text|>"], eos_id=special["<|end_of_text|>"],
                   add_bos=True, meta_chunks=True)

    @classmethod
    def from_hf_json(cls, path: str | Path) -> "Tokenizer":
        """A Hugging Face byte-level BPE `tokenizer.json`, with `tokenizer_config.json` beside it
        (if present) for the BOS/EOS tokens, `add_bos_token` and the chat template."""
        path = Path(path)
        return _from_hf(path, _read_json(path), _read_json(path.with_name("tokenizer_config.json"), {}))

    @classmethod
    def from_hf_objects(cls, source: str | Path, tokenizer_json: dict, tokenizer_config: dict) -> "Tokenizer":
        """As `from_hf_json`, from the two files' objects (a GGUF's metadata gives them); `source`
        names where they came from in errors."""
        return _from_hf(Path(source), tokenizer_json, tokenizer_config)

    # -- text -> ids ----------------------------------------------------------------------------

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        """Token ids of `text`, read as plain text. `bos=None` follows the checkpoint (`add_bos`)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        ids = [self._special("BOS", self.bos_id)] if (self.add_bos if bos is None else bos) else []
        for piece, added in _split(self._added, self.added_tokens, text):
            if added is not None:
                ids.append(added)
                continue
            for chunk in _meta_chunks(piece) if self.meta_chunks else [piece]:
                for pre in bpe.pretokenize(chunk, self.patterns[:-1]):
                    ids.extend(self._encoding.encode_ordinary(pre))
        if eos:
            ids.append(self._special("EOS", self.eos_id))
        if self._drops_bytes:
            ids = [i for i in ids if i < self.n_vocab]
        return ids

    def split_special(self, text: str) -> list[tuple[str, int | None]]:
        """`text` cut at the special tokens' texts it holds (leftmost, longest first): a list of
        (text, None) for the text between them and (name, id) for each special token, as
        Hugging Face's tokenizers cut a chat template's rendered text."""
        return list(_split(self._specials, self.special_tokens, text))

    def encode_special(self, name: str) -> int:
        """The id of special token `name` (e.g. "<|eot_id|>")."""
        if name not in self.special_tokens:
            raise Llama3Error(f"{self.name}: no special token {name!r} in this tokenizer")
        return self.special_tokens[name]

    @property
    def end_of_generation_ids(self) -> frozenset[int]:
        """Ids that end a generation: its EOS and the tokens of `END_OF_GENERATION` this vocabulary
        has as special tokens (`end_of_generation_ids`; for Llama 3: 128001, 128008, 128009)."""
        return frozenset(end_of_generation_ids(self.special_tokens, [self.eos_id] if self.eos_id is not None else []))

    def _special(self, what: str, token_id: int | None) -> int:
        if token_id is None:
            raise Llama3Error(f"{self.name}: this tokenizer has no {what} token")
        return token_id

    # -- ids -> text ----------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a special token: its name in UTF-8)."""
        try:
            return self._bytes[token_id]
        except (KeyError, TypeError):
            raise Llama3Error(f"token id {token_id!r} is not in the vocabulary of {self.name} "
                              f"(ids 0..{self.n_vocab - 1})") from None

    def decode(self, ids) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def __repr__(self):
        return f"Tokenizer({self.name!r}, n_vocab={self.n_vocab}, specials={len(self.special_ids)})"


class StreamDecoder:
    """Turns token ids into text as they arrive, never splitting a UTF-8 character.

    A character whose bytes are spread over several tokens is held back until it is complete.
    Bytes that can never become valid UTF-8 come out as U+FFFD (as in `decode`); an unfinished
    character at the end comes out as U+FFFD only from `flush`. The pieces put together equal
    `tok.decode(all ids)`.
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text that is safe to print now that `token_id` has arrived (often "")."""
        text = self._utf8.decode(self.tok.token_bytes(token_id))
        pending = self._utf8.getstate()[0]
        # CPython's decoder holds ED A0..ED BF, the start of a surrogate, which UTF-8 never allows,
        # until a third byte arrives (it rejects every other impossible pair at once); `decode`
        # makes each of the two bytes a U+FFFD whatever follows, so they come out now.
        if len(pending) == 2 and pending[0] == 0xED and pending[1] >= 0xA0:
            self._utf8.reset()
            text += pending.decode("utf-8", errors="replace")
        return text

    def flush(self) -> str:
        """Whatever is still held back, at the end of the stream."""
        return self._utf8.decode(b"", final=True)


# Where a checkpoint folder's tokenizer is looked for, in this order: Meta's tiktoken file first
# (its ids are the reference), then Hugging Face's tokenizer.json.
TOKENIZER_FILES = ("tokenizer.model", "original/tokenizer.model", "tokenizer.json")


def find_tokenizer_file(directory: Path) -> Path | None:
    """The first of `TOKENIZER_FILES` present in a checkpoint folder (None when none is)."""
    return next((directory / n for n in TOKENIZER_FILES if (directory / n).is_file()), None)


def load_tokenizer(checkpoint_dir: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint folder, the first of `TOKENIZER_FILES` found there.
    A path to one of those files works too (a GGUF file's tokenizer: `llama3_np.load.load_tokenizer`).
    Raises Llama3Error when there is none."""
    path = Path(checkpoint_dir)
    if not path.is_file():
        if not path.is_dir():
            raise Llama3Error(f"{path}: no such checkpoint directory")
        found = find_tokenizer_file(path)
        if found is None:
            raise Llama3Error(f"{path}: no tokenizer found (expected {', '.join(TOKENIZER_FILES[:-1])} "
                              f"or {TOKENIZER_FILES[-1]}); copy the checkpoint's tokenizer files into this folder")
        path = found
    return Tokenizer.from_hf_json(path) if path.suffix == ".json" else Tokenizer.llama3(path)


def _alternation(tokens: dict[str, int]):
    """A regex matching any of `tokens`, the longest first where several match at one place."""
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True) if t))


def _split(pattern, tokens: dict[str, int], text: str):
    """(text, None) and (token, id) pieces of `text`, cut at `pattern`'s matches; no empty text."""
    start = 0
    for m in pattern.finditer(text) if pattern is not None else ():
        if m.start() > start:
            yield text[start:m.start()], None
        yield m.group(), tokens[m.group()]
        start = m.end()
    if start < len(text) or not text:
        yield text[start:], None


# -- Meta's input chunking ------------------------------------------------------------------------

_RUNS = re.compile(r"\s+|\S+")  # the standard library's \s is str.isspace, as in Meta's code


def _meta_chunks(text: str, max_chunk: int = MAX_CHUNK_CHARS, max_run: int = MAX_RUN_CHARS):
    """The pieces Meta's tokenizer hands to tiktoken: `max_chunk` characters at a time, each cut
    inside any run of whitespace or non-whitespace longer than `max_run`, every `max_run` characters."""
    for start in range(0, len(text), max_chunk):
        chunk = text[start:start + max_chunk]
        cuts = [run.start() + k for run in _RUNS.finditer(chunk)
                for k in range(max_run, run.end() - run.start(), max_run)]
        yield from (chunk[a:b] for a, b in zip([0] + cuts, cuts + [len(chunk)]))


# -- reading tokenizer files ----------------------------------------------------------------------

def read_tiktoken_file(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file: one `base64(token bytes) rank` per line, ranks 0..N-1."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise Llama3Error(f"{path}: not a tiktoken BPE file (a binary file; SentencePiece tokenizers "
                          "of Llama 1/2 are not supported)") from None
    except OSError as e:
        raise Llama3Error(f"{path}: cannot read the tokenizer ({e.strerror})") from None
    vocab: dict[bytes, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            vocab[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise Llama3Error(f"{path}:{lineno}: not a tiktoken BPE line ('<base64 token> <rank>'); "
                              "the tokenizer file is damaged, fetch it again") from None
    if sorted(vocab.values()) != list(range(len(vocab))) or not vocab:
        raise Llama3Error(f"{path}: ranks are not 0..N-1 with one token each; the tokenizer file is "
                          "damaged, fetch it again")
    return vocab


def _read_json(path: Path, default=None):
    if default is not None and not path.exists():
        return default
    return read_json(path, advice="the file is damaged", expect=dict)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    return {c: b for b, c in chars.items()}


def _from_hf(path: Path, tj: dict, config: dict) -> Tokenizer:
    def fail(what):
        return Llama3Error(f"{path}: {what}")

    model = tj.get("model")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model:
        raise fail("not a BPE tokenizer (model.type must be BPE); llama3_np reads byte-level BPE only")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise fail(f"model.{key} = {model[key]!r} is not supported")
    if model.get("byte_fallback"):
        raise fail("byte_fallback BPE (SentencePiece style) is not supported")
    if tj.get("normalizer") is not None:
        raise fail(f"normalizer {tj['normalizer'].get('type')!r} is not supported")
    patterns = _hf_patterns(tj.get("pre_tokenizer"), fail)

    special, added = {}, {}
    for t in tj.get("added_tokens") or []:
        if t.get("special"):
            special[t["content"]] = t["id"]
            continue
        # Matched in the text as they are written; the flags that would widen a match are not read.
        widening = [flag for flag in ("lstrip", "rstrip", "single_word") if t.get(flag)]
        if widening:
            raise fail(f"added token {t['content']!r} has {', '.join(widening)} set, which llama3_np does not "
                       "support")
        added[t["content"]] = t["id"]

    # Token strings spell bytes in GPT-2's byte-level alphabet; translate them back to bytes. An
    # added token is written as its text, wherever it is listed.
    to_byte = _byte_decoder()
    unspell = str.maketrans({c: chr(b) for c, b in to_byte.items()})
    plain_tokens = {t: i for t, i in model["vocab"].items() if special.get(t) != i and added.get(t) != i}
    stray = set("".join(plain_tokens)) - to_byte.keys()
    if stray:
        raise fail(f"tokens use characters outside the byte-level alphabet ({sorted(stray)[:5]})")
    spelled = {t: t.translate(unspell).encode("latin-1") for t in plain_tokens}
    vocab = {spelled[t]: i for t, i in plain_tokens.items()}
    merges = {}
    for rank, m in enumerate(model.get("merges") or []):
        pair = m.split(" ") if isinstance(m, str) else m
        if len(pair) != 2 or pair[0] not in spelled or pair[1] not in spelled:
            raise fail(f"merge {rank} ({m!r}) is not a pair of vocabulary tokens")
        merges[spelled[pair[0]], spelled[pair[1]]] = rank
    # tiktoken joins the pair whose joined token has the lowest id; that follows the merge list
    # when every merge makes a token and later merges never make lower ids. (Several merges may
    # make the same token: Hugging Face's conversion of a tiktoken vocabulary lists every split.)
    made = [vocab.get(a + b) for a, b in merges]
    if None in made or any(x > y for x, y in zip(made, made[1:])):
        raise fail("merges do not produce vocabulary tokens in id order; llama3_np cannot run this "
                   "tokenizer through tiktoken")

    def token_id(key):
        name = config.get(key)
        name = name.get("content") if isinstance(name, dict) else name
        if name is None:
            return None
        found = special.get(name, added.get(name, vocab.get(name.encode("utf-8"))))
        if found is None:
            raise Llama3Error(f"{path.with_name('tokenizer_config.json')}: {key} {name!r} is not in the vocabulary")
        return found

    bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
    template_bos = _template_bos(tj.get("post_processor"))
    if bos_id is None and template_bos is not None:
        bos_id = special.get(template_bos)
    add_bos = config["add_bos_token"] if "add_bos_token" in config else template_bos is not None
    template = config.get("chat_template")
    return Tokenizer(name=str(path), vocab=vocab, special_tokens=special, patterns=patterns,
                     bos_id=bos_id, eos_id=eos_id, add_bos=bool(add_bos), merges=merges,
                     whole_first=bool(model.get("ignore_merges")),
                     chat_template=template if isinstance(template, str) else None, added_tokens=added)


def _hf_patterns(pre: dict | None, fail) -> list[str]:
    """The split patterns of a Hugging Face pre-tokenizer, in the order they apply."""
    stages = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    patterns, byte_level = [], False
    for stage in stages:
        kind = (stage or {}).get("type")
        if byte_level:
            raise fail(f"pre-tokenizer {kind!r} after ByteLevel is not supported")
        if kind == "Digits":
            patterns.append(r"\p{N}" if stage.get("individual_digits") else r"\p{N}+")
        elif kind == "Split" and stage.get("behavior") == "Isolated" and not stage.get("invert"):
            how = stage.get("pattern", {})
            patterns.append(how["Regex"] if "Regex" in how else re.escape(how.get("String", "")))
        elif kind == "ByteLevel" and not stage.get("add_prefix_space"):
            byte_level = True
            if stage.get("use_regex", True):
                patterns.append(GPT2_PATTERN)
        else:
            raise fail(f"pre-tokenizer {json.dumps(stage)[:120]} is not supported (llama3_np reads "
                       "byte-level BPE: Digits / Split(Isolated) / ByteLevel without add_prefix_space)")
    if not byte_level:
        raise fail("the pre-tokenizer has no ByteLevel step: not a byte-level BPE tokenizer")
    return patterns or [r"[\s\S]+"]


def _template_bos(post: dict | None) -> str | None:
    """The special token a TemplateProcessing post-processor puts before the text, if any."""
    if not post:
        return None
    if post.get("type") == "Sequence":
        return next(filter(None, map(_template_bos, post.get("processors", []))), None)
    if post.get("type") == "TemplateProcessing":
        first = (post.get("single") or [{}])[0]
        return first.get("SpecialToken", {}).get("id")
    return None
