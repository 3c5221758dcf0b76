"""Text and token ids: the tokenizers on tiktoken (`tokenizer.py`), byte-level BPE written out as
the readable specification of what tiktoken computes (`bpe.py`), and chat formats (`chat.py`)."""
