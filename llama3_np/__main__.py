"""`python -m llama3_np` is the same as the `llama3-np` command."""

import sys

from .cli import main

sys.exit(main())
