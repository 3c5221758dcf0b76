"""Test-session settings shared by every test module."""

import os
from pathlib import Path

# In a checkout the assets the tests read (the default model, the Llama 3 tokenizer) live in
# weights/, where `make test` fetches them (llama3_np/assets.py reads the variable on every call).
os.environ.setdefault("LLAMA3_NP_CACHE", str(Path(__file__).resolve().parents[1] / "weights"))

from hypothesis import settings

# Under CI (CI=true), property tests draw the same examples every run, so a run's verdict depends
# on the code alone; locally they keep exploring new examples (and replay saved failures).
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
