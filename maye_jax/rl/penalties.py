"""Length penalties on a response's score (SPEC §2): the original MAYE's no-EOS / too-short
penalty and DAPO's soft overlong penalty. Plain Python on host values; imports no JAX.

How the two combine (both can be on):

    total = (reward_penalty if no EOS or too short else sum of the enabled rewards)
            + overlong_penalty(length)

The original's penalty *replaces* the accuracy + language score; the overlong penalty is a
separate, additive reward component (logged as `train/reward/overlong`), so a response cut at
max_tokens with both on scores `reward_penalty - overlong_penalty_factor` (-1.1 by default).
"""

from __future__ import annotations


def is_too_short(response_length: int, min_response_length: int) -> bool:
    """The original's "too short": the index of the response's last valid token (its length - 1,
    0 for an empty response) is below `min_response_length`. So the original launch script's
    `MIN_RESPONSE_LENGTH=1` refuses a response of one token (an EOS alone), and 0 refuses
    nothing."""
    last_valid_index = max(response_length - 1, 0)
    return last_valid_index < min_response_length


def apply_length_penalty(
    score: float,
    finished_with_eos: bool,
    response_length: int,
    min_response_length: int = 0,
    reward_penalty: float = -0.1,
) -> float:
    """``reward_penalty`` *instead of* ``score`` for a response without EOS (cut at max_tokens)
    or too short (`is_too_short`): the original's ``PENALISE_NO_EOS`` / ``MIN_RESPONSE_LENGTH``."""
    if not finished_with_eos or is_too_short(response_length, min_response_length):
        return reward_penalty
    return score


def overlong_penalty(
    response_length: int,
    max_tokens: int,
    buffer_len: int,
    penalty_factor: float = 1.0,
) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13), an additive reward:
    0 up to `max_tokens - buffer_len` tokens, then falling linearly to `-penalty_factor` at
    `max_tokens` (a sampled response never exceeds max_tokens)."""
    if not 0 < buffer_len <= max_tokens:
        raise ValueError(
            f"penalties.overlong_penalty: buffer_len must be in (0, max_tokens={max_tokens}], "
            f"got {buffer_len}"
        )
    exceeded = response_length - (max_tokens - buffer_len)
    return 0.0 if exceeded <= 0 else -exceeded / buffer_len * penalty_factor
