"""The one exception type for mistakes a user can make (bad flags, paths, files, prompts).

The command line turns a `Llama3Error` into one line on stderr and exit status 2. Anything else
that escapes is a bug in llama3_np and keeps its traceback.
"""


class Llama3Error(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""
