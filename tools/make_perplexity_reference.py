"""The Hugging Face float32 perplexity that `llama3-np perplexity` is tested against:

    python tools/make_perplexity_reference.py [-m weights/default-exact] [--text FILE] [--ctx 512] [-o JSON]
                                              [--save-logits FILE]

The text is tokenized once, by llama3_np's tokenizer, and those ids are stored in the JSON: the
reference and the test score the same ids, so a tokenizer difference cannot hide in the perplexity.
They are also checked against Hugging Face's own tokenizer (`tokenizers`, from the folder's
tokenizer.json): the tool refuses to write a reference when the two disagree.

Hugging Face's LlamaForCausalLM (float32, eager attention) scores the windows exactly as llama3_np
does (llama.cpp's method, see llama3_np/xcheck/perplexity.py, whose windowing and log-softmax are reused
here): each window of ctx tokens run from an empty cache, its second half scored. `--save-logits`
also writes the scored logits in the `--kl-base` format, to measure the KL divergence of llama3_np
against Hugging Face. Needs the tools extra (`make tools`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from tool_support import REPO, run_tool  # first: it makes this checkout's llama3_np importable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

from llama3_np.errors import Llama3Error  # noqa: E402
from llama3_np.xcheck.perplexity import (LogitsWriter, first_scored, logits_metadata,  # noqa: E402
                                  perplexity_estimate, token_nll, windows)
from llama3_np.load import load_tokenizer  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "xcheck"
DEFAULT_TEXT = FIXTURES / "jargon_hack.txt"
DEFAULT_OUT = FIXTURES / "perplexity_reference.json"


def hf_token_ids(checkpoint: Path, text: str, add_bos: bool) -> list[int]:
    """The ids Hugging Face's fast tokenizer gives for the folder's tokenizer.json."""
    from tokenizers import Tokenizer
    hf = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    ids = hf.encode(text, add_special_tokens=False).ids
    if add_bos:
        bos = json.loads((checkpoint / "tokenizer_config.json").read_text())["bos_token"]
        ids = [hf.token_to_id(bos)] + ids
    return ids


def model_name(checkpoint: Path) -> str:
    """What the folder was imported from (the GGUF file), else its path."""
    record = checkpoint / "llama3_np_import.json"
    return json.loads(record.read_text()).get("source", str(checkpoint)) if record.is_file() else str(checkpoint)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default=str(REPO / "weights" / "default-exact"), metavar="DIR")
    p.add_argument("--text", default=str(DEFAULT_TEXT), metavar="FILE")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("-o", "--output", default=str(DEFAULT_OUT), metavar="JSON")
    p.add_argument("--save-logits", metavar="FILE", help="also write Hugging Face's scored logits (for --kl-base)")
    args = p.parse_args(argv)

    import torch
    import torch_reference as ref
    ref.deterministic_torch()
    ref.transformers_module().utils.logging.disable_progress_bar()

    checkpoint, text_path = Path(args.model), Path(args.text)
    text = text_path.read_text(encoding="utf-8")
    tok = load_tokenizer(checkpoint)
    ids = tok.encode(text)
    hf_ids = hf_token_ids(checkpoint, text, tok.add_bos)
    if hf_ids != ids:
        at = next(i for i, (a, b) in enumerate(zip(ids + [-1], hf_ids + [-1])) if a != b)
        raise Llama3Error(f"llama3_np and Hugging Face tokenize {text_path} differently from token {at} "
                          f"({ids[at:at + 5]} vs {hf_ids[at:at + 5]}): fix the tokenizer first")
    bos = tok.bos_id if tok.add_bos else None
    wins = windows(ids, args.ctx, bos)
    first = first_scored(args.ctx)
    window_tokens = ids[:len(wins) * args.ctx]
    vocab_size = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    save = (LogitsWriter(args.save_logits, len(wins) * (args.ctx - 1 - first), vocab_size,
                         dict(logits_metadata(window_tokens, args.ctx),
                              producer=f"transformers {ref.transformers_module().__version__} float32"))
            if args.save_logits else None)

    model = ref.load_hf(checkpoint, torch.float32)
    nll, running = [], []
    for i, window in enumerate(wins):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([window])).logits[0].numpy()  # [ctx, V]
        scored = logits[first:args.ctx - 1]
        nll.append(token_nll(scored, np.asarray(ids[i * args.ctx + first + 1:(i + 1) * args.ctx])))
        running.append(perplexity_estimate(np.concatenate(nll)).value)
        print(f"[{i + 1}/{len(wins)}] {running[-1]:.4f}", flush=True)
        if save is not None:
            save.write(scored)
    if save is not None:
        save.close()
    ppl = perplexity_estimate(np.concatenate(nll))
    record = {
        "text": text_path.name,
        "text_sha256": hashlib.sha256(text_path.read_bytes()).hexdigest(),
        "model": model_name(checkpoint),
        "ctx": args.ctx, "bos_id": bos, "windows": len(wins), "scored_tokens": int(sum(len(x) for x in nll)),
        "ppl": ppl.value, "ppl_error": ppl.error, "running_ppl": running,
        "producer": f"transformers {ref.transformers_module().__version__} LlamaForCausalLM float32 "
                    f"(eager attention), torch {torch.__version__}",
        "tokenizer_check": "llama3_np's ids equal those of Hugging Face tokenizers "
                           f"{__import__('tokenizers').__version__} on the folder's tokenizer.json",
    }
    # One field per line, the ids on one line of their own.
    Path(args.output).write_text(json.dumps(record, indent=1)[:-2] + f',\n "ids": {json.dumps(ids)}\n}}\n')
    print(f"Final estimate: PPL = {ppl.value:.4f} +/- {ppl.error:.5f}; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("make_perplexity_reference", main, OSError))
