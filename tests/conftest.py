"""Test-session settings shared by every test module."""

import os

from hypothesis import settings

# Under CI (CI=true), property tests draw the same examples every run, so a run's verdict depends
# on the code alone; locally they keep exploring new examples (and replay saved failures).
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
