"""What the report draws and says of the reflection metrics beyond their values: which steps
a ratio is undefined at (SPEC §6 logs 0.0 there; a curve shows a gap), and which reflection
words no response contains (one line of the report instead of empty panels)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from maye_jax.evaluation.scheme import REFLECTION_WORDS


def ratio_is_defined(line: Mapping, name: str) -> bool:
    """Whether reflection ratio `name` of a metrics line had a response to count: the scheme
    logs 0.0 where its denominator is 0 (SPEC §6), which a curve must not show as a value.
    With r = reflection_ratio, c = correct_ratio_in_reflection_texts and n =
    correct_ratio_in_no_reflection_texts (each 0 where undefined): no reflection text iff
    r == 0, no text without one iff r == 1, no correct answer iff c == n == 0, no incorrect
    one iff each of c, n is 1 or undefined."""
    value = lambda key: line.get(f"reflection/{key}")  # noqa: E731
    r, c, n = (
        value(k)
        for k in (
            "reflection_ratio",
            "correct_ratio_in_reflection_texts",
            "correct_ratio_in_no_reflection_texts",
        )
    )
    if None in (r, c, n):
        return True  # an older line: nothing to tell by
    undefined = {
        "correct_ratio_in_reflection_texts": r == 0,
        "correct_ratio_in_no_reflection_texts": r == 1,
        "reflection_ratio_in_correct_answers": c == 0 and n == 0,
        "reflection_ratio_in_incorrect_answers": (c == 1 or r == 0) and (n == 1 or r == 1),
    }
    return not undefined.get(name, False)


def per_step_ratio(lines: Sequence[Mapping], name: str) -> dict[int, float]:
    """`per_step` of `reflection/<name>`, nan at the steps where it is undefined (a gap in its
    curve, not a 0)."""
    return {
        step: value if ratio_is_defined(line, name) else float("nan")
        for line in lines
        if (value := line.get(f"reflection/{name}")) is not None
        for step in (int(line["generation_step"]),)
    }


def words_found(group) -> list[str]:
    """The reflection words some response of the group's runs contains (a count > 0)."""
    return [
        word
        for word in REFLECTION_WORDS
        if any(
            (line.get(f"reflection/count/{word}") or 0) > 0
            for run in group.runs
            for line in run.lines
        )
    ]


def format_reflection_words(group) -> str | None:
    """One line for the reflection words no response of the RL group contains (their count is
    0 at every step, so they get no panel in reflection_counts.png); None when every word
    occurs or no count was logged."""
    logged = {key for run in group.runs for line in run.lines for key in line}
    if not any(key.startswith("reflection/count/") for key in logged):
        return None
    found = words_found(group)
    missing = [word for word in REFLECTION_WORDS if word not in found]
    if not missing:
        return None
    if not found:
        return (
            f"Reflection words: none of the {len(REFLECTION_WORDS)} occurs in any RL response "
            "(every count is 0 at every step; no reflection_counts plot)."
        )
    return (
        f"Reflection words that occur in no RL response (count 0 at every step, no panel): "
        f"{', '.join(missing)}."
    )
