"""maye_jax/rl/penalties.py: the original's no-EOS / too-short penalty, DAPO's overlong penalty."""

import pytest

from maye_jax.rl.penalties import apply_length_penalty, is_too_short, overlong_penalty


@pytest.mark.parametrize(
    "length, minimum, too_short",
    [
        # The original compares the index of the last valid token (length - 1) with the minimum:
        # its launch script's MIN_RESPONSE_LENGTH=1 refuses an EOS alone, nothing longer.
        (1, 1, True),
        (2, 1, False),
        (0, 1, True),  # nothing generated (index clipped to 0, as the original's)
        (10, 10, True),
        (11, 10, False),
        (0, 0, False),  # 0 refuses nothing
        (1, 0, False),
    ],
)
def test_too_short_uses_the_last_valid_token_index(length, minimum, too_short):
    assert is_too_short(length, minimum) is too_short
    score = apply_length_penalty(0.7, True, length, minimum, reward_penalty=-0.1)
    assert score == (-0.1 if too_short else 0.7)


def test_no_eos_is_penalised_whatever_the_length():
    assert apply_length_penalty(1.0, False, 2048, min_response_length=1) == -0.1
    assert apply_length_penalty(1.0, False, 5, 0, reward_penalty=-0.5) == -0.5
    assert apply_length_penalty(1.0, True, 5, 1) == 1.0


def test_overlong_penalty_matches_dapo():
    """DAPO Eq. 13 with L_max = 20, L_cache = 4: 0 up to 16 tokens, then -(|y| - 16) / 4."""

    def reference(length, max_tokens=20, buffer_len=4, factor=1.0):
        if length <= max_tokens - buffer_len:
            return 0.0
        return factor * ((max_tokens - buffer_len) - length) / buffer_len

    for length in range(0, 21):
        assert overlong_penalty(length, 20, 4) == pytest.approx(reference(length), abs=0.0)
        assert overlong_penalty(length, 20, 4, 0.5) == pytest.approx(reference(length, factor=0.5))
    assert overlong_penalty(16, 20, 4) == 0.0 and overlong_penalty(20, 20, 4) == -1.0
    assert overlong_penalty(18, 20, 4) == -0.5
    with pytest.raises(ValueError, match=r"buffer_len must be in \(0, max_tokens=20\], got 0"):
        overlong_penalty(5, 20, 0)
    with pytest.raises(ValueError, match="got 21"):
        overlong_penalty(5, 20, 21)
