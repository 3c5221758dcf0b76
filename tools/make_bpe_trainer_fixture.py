"""Rebuild tests/fixtures/tokenizer/bpe_trainer.json (`make fixtures`):

    python tools/make_bpe_trainer_fixture.py

Hugging Face `tokenizers`' `BpeTrainer` learns a byte-level BPE on the Jargon File text of
tests/fixtures/xcheck/jargon_hack.txt with Llama 3's pre-tokenizer (the tiktoken pattern, split
isolated, then the byte-level alphabet, as Llama 3's tokenizer.json does): 256 bytes plus MERGES
merges, pairs seen at least MIN_FREQUENCY times. The file holds the merges in the order learnt
(each side as hex bytes) and the ids the trained tokenizer gives a sample text, which
`tests/text/test_bpe.py` holds `llama3_np.text.bpe.train` and its tiktoken encoding to.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tokenizers  # noqa: E402
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from llama3_np.text.tokenizer import LLAMA3_PATTERN, _byte_decoder  # noqa: E402

CORPUS = ROOT / "tests" / "fixtures" / "xcheck" / "jargon_hack.txt"
OUT = ROOT / "tests" / "fixtures" / "tokenizer" / "bpe_trainer.json"
MERGES, MIN_FREQUENCY = 300, 2
SAMPLE = "The hackers' jargon, 1983 edition: \"hack\" means  an appropriate application of ingenuity!"


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=256 + MERGES, min_frequency=MIN_FREQUENCY, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS.read_text(encoding="utf-8")], trainer)
    model = json.loads(tok.to_str())["model"]
    to_byte = _byte_decoder()

    def spelled(token: str) -> str:
        return bytes(to_byte[c] for c in token).hex()

    merges = [[spelled(a), spelled(b)] for a, b in (m.split(" ") if isinstance(m, str) else m for m in model["merges"])]
    OUT.write_text(json.dumps({
        "producer": f"tokenizers {tokenizers.__version__} BpeTrainer", "corpus": CORPUS.name,
        "pattern": LLAMA3_PATTERN, "vocab_size": 256 + MERGES, "min_frequency": MIN_FREQUENCY,
        "alphabet_ids": {spelled(t): i for t, i in model["vocab"].items() if len(bytes.fromhex(spelled(t))) == 1},
        "merges": merges, "sample": SAMPLE, "sample_ids": tok.encode(SAMPLE).ids}, indent=1) + "\n")
    print(f"{len(merges)} merges, {OUT.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
