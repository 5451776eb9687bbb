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


def round_up_geometric(n: int, minimum_step: int, steps_per_doubling: int = 8) -> int:
    """n rounded up to a multiple of the larger of `minimum_step` and the largest power of two
    <= n / steps_per_doubling: padding stays under max(1 / steps_per_doubling, minimum_step / n)
    with about `steps_per_doubling` sizes per doubling of n. For n in 100..1500 with a minimum
    step of 16: 30 sizes, at most 13% padding (multiples of 64: 23 sizes, up to 49%; multiples
    of 16: 88 sizes)."""
    step = max(minimum_step, 1 << max(0, (n // steps_per_doubling).bit_length() - 1))
    return round_up(n, step)
