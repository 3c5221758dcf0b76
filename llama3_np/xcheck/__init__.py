"""Cross-checking another implementation, or this one, as library functions: the dump file
(`dump.py`), stage-by-stage comparison (`compare.py`), a forward pass walked with its shapes
(`trace.py`), perplexity and KL divergence (`perplexity.py`), and speed against the machine's
limits (`bench.py`). The commands in `llama3_np.cli` are thin layers over these."""
