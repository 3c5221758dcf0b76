"""Counts in the command line's messages: "1 token", "2 tokens"."""


def plural(n: int, noun: str) -> str:
    """`n noun` with an "s" unless n is 1 (every noun llama3_np counts takes a plain "s")."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
