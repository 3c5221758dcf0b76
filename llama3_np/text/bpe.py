r"""Byte-level BPE, written out as the specification of what `Tokenizer.encode` computes.

`llama3_np.text.tokenizer` runs the same algorithm through tiktoken (compiled, fast); the tests hold
the two equal on a corpus of hostile strings and on random ones. This file is the one to read.

Encoding a text, for one tokenizer (a vocabulary, a list of split patterns, maybe a merge list):

1. Pre-tokenize: each pattern in turn cuts every piece into the pattern's matches and the text
   between them. Llama 3 has one pattern; a Hugging Face `Sequence` pre-tokenizer may have more
   (SmolLM2: first every digit alone, then the GPT-2 pattern). Pieces never merge across a cut.
2. Each piece becomes its UTF-8 bytes, one part per byte.
3. Merge: find the adjacent pair of parts with the lowest rank, join it (the leftmost if the
   pair occurs more than once), and repeat until no adjacent pair has a rank.
   - tiktoken files (Llama 3) have no merge list: a pair's rank is the rank of the joined token,
     and a piece that is itself a token is taken whole before any merging.
   - Hugging Face files list their merges: a pair's rank is its line in the list; the whole-piece
     shortcut applies only when the file says `ignore_merges`.
4. Each final part is a token of the vocabulary, which gives its id. A byte that has no token of
   its own (SmolLM2's vocabulary lacks 21 rare ones, such as 0x04 and 0xF1) can never merge with
   anything and is dropped, as llama.cpp does.

Meta's tokenizer also cuts very long inputs into chunks before all this; that step is Meta's, not
BPE's, and lives in `llama3_np.text.tokenizer`. The character classes of the patterns (\p{L}, \p{N},
\s) come from the `regex` module here and from tiktoken's own regex engine there: the two agree
on every character, except those assigned by a Unicode version only one of them knows.
"""

from __future__ import annotations

import regex

# A vocabulary maps token bytes to ids; a merge list maps a pair of parts to its rank.
Vocab = dict[bytes, int]
Merges = dict[tuple[bytes, bytes], int]


def pretokenize(text: str, patterns: list[str]) -> list[str]:
    """Cut `text` by each pattern in turn; a match and the text between matches are pieces."""
    pieces = [text]
    for pattern in patterns:
        pieces = [part for piece in pieces for part in isolate(piece, pattern)]
    return pieces


def isolate(piece: str, pattern: str) -> list[str]:
    """The matches of `pattern` in `piece` and the non-empty stretches between them, in order."""
    parts, end = [], 0
    for m in regex.finditer(pattern, piece):
        if m.start() > end:
            parts.append(piece[end:m.start()])
        if m.end() > m.start():
            parts.append(m.group())
        end = m.end()
    if end < len(piece):
        parts.append(piece[end:])
    return parts


def merge(piece: bytes, vocab: Vocab, merges: Merges | None, whole_first: bool) -> list[bytes]:
    """Run BPE merges on the bytes of one piece; returns the final parts."""
    if whole_first and piece in vocab:
        return [piece]
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        ranked = [(rank, i) for i in range(len(parts) - 1)
                  if (rank := pair_rank(parts[i], parts[i + 1], vocab, merges)) is not None]
        if not ranked:
            break
        _, i = min(ranked)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def pair_rank(left: bytes, right: bytes, vocab: Vocab, merges: Merges | None) -> int | None:
    """The priority of joining `left` and `right` (lower joins first), or None if they never join."""
    if merges is None:
        return vocab.get(left + right)
    return merges.get((left, right))


def encode(text: str, vocab: Vocab, patterns: list[str], merges: Merges | None = None,
           whole_first: bool = True) -> list[int]:
    """Token ids of `text` as plain text (special-token names are just characters here)."""
    # A lone surrogate cannot be UTF-8 encoded; tiktoken reads it as U+FFFD, and so do we.
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    ids = []
    for piece in pretokenize(text, patterns):
        for part in merge(piece.encode("utf-8"), vocab, merges, whole_first):
            if part in vocab:
                ids.append(vocab[part])
    return ids


# ---------------------------------------------------------------------------------------------
# Learning the merges


def train(texts, vocab_size: int, patterns: list[str], min_frequency: int = 0,
          alphabet_order: list[int] | None = None) -> tuple[Vocab, list[tuple[bytes, bytes]]]:
    """Learn a byte-level BPE vocabulary from `texts`: (vocabulary, merges in the order learnt).

    1. Pre-tokenize every text as `encode` does and count each piece (a "word") once per occurrence.
    2. Start from the 256 single bytes, each word a sequence of them.
    3. Count every adjacent pair of parts over all words (a word seen n times counts n times; "aaa"
       holds the pair (a, a) twice). Join the most frequent pair everywhere it occurs, left to right
       without overlap; its concatenation becomes a token. Ties go to the pair whose ids are
       smallest (first the left part's id, then the right's). Repeat until the vocabulary has
       `vocab_size` tokens, no pair is left, or the most frequent pair occurs fewer than
       `min_frequency` times.

    A pair whose concatenation is already a token (made by another pair) is still learnt as a merge,
    with that token's id. The single bytes' ids follow `alphabet_order` (default: byte value).
    This is what Hugging Face `tokenizers`' `BpeTrainer` computes with a byte-level alphabet, whose
    ids follow the code points of the printable characters that stand for the bytes (tokenizers
    `models/bpe/trainer.rs`, `Merge`'s ordering); `tests/text/test_bpe.py` holds the two equal.
    Raises ValueError for a vocabulary smaller than the 256 bytes.
    """
    if vocab_size < 256:
        raise ValueError(f"a byte-level vocabulary holds at least the 256 bytes, not {vocab_size}")
    words: dict[bytes, int] = {}
    for text in texts:
        for piece in pretokenize(text, patterns):
            key = piece.encode("utf-8")
            words[key] = words.get(key, 0) + 1
    order = list(range(256)) if alphabet_order is None else alphabet_order
    vocab: Vocab = {bytes([b]): i for i, b in enumerate(order)}
    parts = {word: [word[i:i + 1] for i in range(len(word))] for word in words}
    merges: list[tuple[bytes, bytes]] = []
    while len(vocab) < vocab_size:
        counts: dict[tuple[bytes, bytes], int] = {}
        for word, n in words.items():
            seq = parts[word]
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + n
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], vocab[p[0]], vocab[p[1]]))
        if counts[best] < min_frequency:
            break
        joined = best[0] + best[1]
        vocab.setdefault(joined, len(vocab))
        merges.append(best)
        for word, seq in parts.items():
            parts[word] = join_pair(seq, best)
    return vocab, merges


def join_pair(parts: list[bytes], pair: tuple[bytes, bytes]) -> list[bytes]:
    """`parts` with every occurrence of `pair` joined, left to right without overlap."""
    out, i = [], 0
    while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
            out.append(parts[i] + parts[i + 1])
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return out
