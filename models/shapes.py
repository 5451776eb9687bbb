"""Static shapes under `jit`: sizes rounded up so a run compiles a bounded number of programs."""

from __future__ import annotations


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= n (0 stays 0)."""
    return -(-n // multiple) * multiple


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum)."""
    size = minimum
    while size < n:
        size *= 2
    return size
