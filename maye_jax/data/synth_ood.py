"""The synthetic data sets' out-of-distribution test split (maye_jax/data/synth.py writes it).

Like the paper's MathVerse test set for mm_math, the test split asks for the skills that training
teaches under shifts that training never shows, and it shares no problem with training:

- ``text_dominant``: the training split's multiplication, addition and halving of side lengths
  2..max_number on new shapes: the area of a parallelogram (base x height, a slanted figure with
  a grey height), its perimeter (2 x (a + b)), the area of a triangle that is not right-angled
  (half base x height) and a square's area or perimeter from one given side (the only question
  with one number), drawn tilted; side lengths are bare numbers or carry a unit (cm, m), which
  no training question has. The numbers stay in the training range, so the arithmetic facts and
  their tokens (one per digit) are the learned ones: what shifts is the question and the figure.
- ``vision_dominant``: counting new shapes (triangles, squares) in new colours, the sum of three
  drawn numbers (training draws two), and a parallelogram's area from labels in the image.

Every test kind is one the training split lacks, so no test question, and no (kind, numbers)
pair, occurs in training, whatever the split sizes or seed. Within a flavour the test problems
take the families in turn, and each family's distinct problems come in a random order, with no
repeat until all have appeared: the demo's 64 text-dominant test problems (max_number 4) are
its 64 distinct problems, each once.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable

from PIL import ImageDraw

from maye_jax.data.synth import (
    FLAVOURS,
    Draw,
    Problem,
    _boxed_solution,
    _counting_problem_of,
    _font,
    _label,
)

# ----------------------------------------------------------------------------- figures


def _vertex_letters(canvas: ImageDraw.ImageDraw, corners: dict, size: int) -> None:
    """Writes each corner's letter just outside the figure, away from its centre."""
    center_x = sum(x for x, _ in corners.values()) / len(corners)
    center_y = sum(y for _, y in corners.values()) / len(corners)
    font_size = max(8, size // 9)
    for letter, (x, y) in corners.items():
        distance = max(1e-6, ((x - center_x) ** 2 + (y - center_y) ** 2) ** 0.5)
        offset_x, offset_y = (x - center_x) / distance, (y - center_y) / distance
        xy = (x + offset_x * 0.7 * font_size, y + offset_y * 0.7 * font_size)
        _label(canvas, xy, letter, font_size)


def _parallelogram_figure(base: int, side: int, height_line: bool) -> Draw:
    """A slanted parallelogram ABCD, base AB labelled; with ``height_line`` the grey height
    DE is drawn and labelled, else the slanted side AD is."""

    def draw(canvas: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
        slant = 0.4 * max(base, side)
        scale = 0.6 * size / (base + slant)
        left, bottom = 0.15 * size, 0.78 * size
        top = bottom - side * scale * 0.75
        corners = {
            "A": (left, bottom),
            "B": (left + base * scale, bottom),
            "C": (left + (base + slant) * scale, top),
            "D": (left + slant * scale, top),
        }
        canvas.polygon(list(corners.values()), outline="black", width=2)
        _vertex_letters(canvas, corners, size)
        font_size = max(8, size // 9)
        _label(canvas, (left + base * scale / 2, bottom + font_size), str(base), font_size)
        if height_line:
            foot_x = corners["D"][0]
            canvas.line((foot_x, top, foot_x, bottom), fill="gray", width=1)
            _label(canvas, (foot_x + 0.7 * font_size, (top + bottom) / 2), str(side), font_size)
        else:
            side_x = (left + corners["D"][0]) / 2 - 0.7 * font_size
            _label(canvas, (side_x, (top + bottom) / 2), str(side), font_size)

    return draw


def _triangle_figure(base: int, height: int) -> Draw:
    """A triangle ABC that is not right-angled, on base BC, with its grey height AD."""

    def draw(canvas: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
        scale = 0.6 * size / max(base, height)
        left, bottom = 0.2 * size, 0.8 * size
        apex_x, apex_y = left + 0.35 * base * scale, bottom - height * scale
        corners = {"A": (apex_x, apex_y), "B": (left, bottom), "C": (left + base * scale, bottom)}
        canvas.polygon(list(corners.values()), outline="black", width=2)
        canvas.line((apex_x, apex_y, apex_x, bottom), fill="gray", width=1)
        _vertex_letters(canvas, corners, size)
        font_size = max(8, size // 9)
        _label(canvas, ((left + corners["C"][0]) / 2, bottom + font_size), str(base), font_size)
        _label(canvas, (apex_x + 0.6 * font_size, (apex_y + bottom) / 2), str(height), font_size)

    return draw


def _square_figure(side: int) -> Draw:
    """A square ABCD standing on a corner (no training figure is tilted), side AB labelled."""

    def draw(canvas: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
        center, radius = size / 2, 0.34 * size
        corners = {
            "A": (center - radius, center),
            "B": (center, center + radius),
            "C": (center + radius, center),
            "D": (center, center - radius),
        }
        canvas.polygon(list(corners.values()), outline="black", width=2)
        _vertex_letters(canvas, corners, size)
        font_size = max(8, size // 9)
        label_xy = (center - radius / 2 - 0.6 * font_size, center + radius / 2 + 0.6 * font_size)
        _label(canvas, label_xy, str(side), font_size)

    return draw


def _three_numbers_figure(numbers: tuple[int, int, int]) -> Draw:
    """Three numbers in a row, in blue, smaller than the training split's two black ones."""

    def draw(canvas: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
        font_size = max(10, size // 6)
        for number, x_fraction in zip(numbers, (0.2, 0.5, 0.8), strict=True):
            xy = (x_fraction * size, rng.uniform(0.3, 0.7) * size)
            canvas.text(xy, str(number), fill="blue", font=_font(font_size), anchor="mm")

    return draw


# ----------------------------------------------------------------------------- problems


def _parallelogram_area_problem(
    base: int, height: int, unit: str, numbers_in_text: bool
) -> Problem:
    answer = base * height
    facts = f"base AB = {base}{unit} and height DE = {height}{unit}"
    ask = "Find the area of parallelogram ABCD."
    reasoning = f"The area is $AB \\times DE = {base} \\times {height} = {answer}$."
    kind = "parallelogram_area"
    if numbers_in_text:
        question = f"As shown in the figure, parallelogram ABCD has {facts}. {ask}"
    else:
        kind += "_labels_in_image"
        question = f"The base and the height of parallelogram ABCD are written in the figure. {ask}"
        reasoning = f"The figure shows {facts}. {reasoning}"
    return Problem(
        kind=kind,
        question=question,
        text_only_question=f"Parallelogram ABCD has {facts}. {ask}",
        answer=answer,
        solution=_boxed_solution(reasoning, answer),
        draw=_parallelogram_figure(base, height, height_line=True),
    )


def _parallelogram_perimeter_problem(first: int, second: int, unit: str) -> Problem:
    answer = 2 * (first + second)
    facts = f"AB = {first}{unit} and BC = {second}{unit}"
    ask = "Find the perimeter of parallelogram ABCD."
    return Problem(
        kind="parallelogram_perimeter",
        question=f"As shown in the figure, parallelogram ABCD has {facts}. {ask}",
        text_only_question=f"Parallelogram ABCD has {facts}. {ask}",
        answer=answer,
        solution=_boxed_solution(
            f"The perimeter is $2 \\times ({first} + {second}) = {answer}$.", answer
        ),
        draw=_parallelogram_figure(first, second, height_line=False),
    )


def _triangle_area_problem(base: int, height: int, unit: str) -> Problem:
    answer = base * height // 2
    facts = f"triangle ABC has base BC = {base}{unit} and height AD = {height}{unit}"
    return Problem(
        kind="triangle_area",
        question=f"In the figure, {facts}. Find the area of the triangle.",
        text_only_question=f"A {facts}. Find the area of the triangle.",
        answer=answer,
        solution=_boxed_solution(
            f"The area is $\\frac{{1}}{{2}} \\times {base} \\times {height} = {answer}$.", answer
        ),
        draw=_triangle_figure(base, height),
    )


def _square_problem(side: int, measure: str, unit: str) -> Problem:
    if measure == "area":
        answer = side * side
        reasoning = f"The area is $AB \\times BC = {side} \\times {side} = {answer}$."
    else:
        answer = 4 * side
        reasoning = f"The perimeter is $4 \\times {side} = {answer}$."
    facts = f"square ABCD has side AB = {side}{unit}"
    ask = f"Find the {measure} of square ABCD."
    return Problem(
        kind=f"square_{measure}",
        question=f"As shown in the figure, {facts}. {ask}",
        text_only_question=f"A {facts}. {ask}",
        answer=answer,
        solution=_boxed_solution(reasoning, answer),
        draw=_square_figure(side),
    )


def _three_numbers_sum_problem(numbers: tuple[int, int, int]) -> Problem:
    answer = sum(numbers)
    first, second, third = numbers
    return Problem(
        kind="sum_of_three_drawn_numbers",
        question="Three numbers are written in the figure. What is their sum?",
        text_only_question=f"What is the sum of {first}, {second} and {third}?",
        answer=answer,
        solution=_boxed_solution(
            f"The figure shows {first}, {second} and {third}, and "
            f"${first} + {second} + {third} = {answer}$.",
            answer,
        ),
        draw=_three_numbers_figure(numbers),
    )


# ----------------------------------------------------------------------------- families


def _test_makers(flavour: str, max_number: int) -> dict[str, list[Callable[[], Problem]]]:
    """Every distinct test problem of a flavour (a maker of its Problem), by family: the kinds
    of a family share the test split's problems equally with every other family."""
    if flavour == "text_dominant":
        sides = range(2, max_number + 1)
        pairs = [(first, second) for first in sides for second in sides]
        units = ("", " cm", " m")
        return {
            "parallelogram_area": [
                functools.partial(_parallelogram_area_problem, base, height, unit, True)
                for base, height in pairs
                for unit in units
            ],
            "parallelogram_perimeter": [
                functools.partial(_parallelogram_perimeter_problem, first, second, unit)
                for first, second in pairs
                for unit in units
            ],
            "triangle_area": [
                functools.partial(_triangle_area_problem, base, height, unit)
                for base, height in pairs
                if base * height % 2 == 0
                for unit in units
            ],
            "square_area_or_perimeter": [
                functools.partial(_square_problem, side, measure, unit)
                for side in sides
                for measure in ("area", "perimeter")
                for unit in units
            ],
        }
    if flavour == "vision_dominant":
        digits = range(1, 10)
        sides = range(2, 10)
        return {
            "count_triangles_or_squares": [
                functools.partial(_counting_problem_of, count, shape)
                for count in digits
                for shape in ("triangle", "square")
            ],
            "sum_of_three_drawn_numbers": [
                functools.partial(_three_numbers_sum_problem, (first, second, third))
                for first in digits
                for second in digits
                for third in digits
            ],
            "parallelogram_area_labels_in_image": [
                functools.partial(_parallelogram_area_problem, base, height, "", False)
                for base in sides
                for height in sides
            ],
        }
    raise ValueError(f"synth: unknown flavour {flavour!r}; expected one of {FLAVOURS}")


def make_test_problems(
    rng: random.Random, flavour: str, count: int, max_number: int = 9
) -> list[Problem]:
    """``count`` test problems: the families in turn, and within a family its distinct problems
    in a random order, so that no problem repeats before all of its family's have appeared."""
    makers = _test_makers(flavour, max_number)
    families = list(makers)
    queues: dict[str, list[Callable[[], Problem]]] = {family: [] for family in families}
    problems = []
    for index in range(count):
        family = families[index % len(families)]
        if not queues[family]:
            queues[family] = rng.sample(makers[family], len(makers[family]))
        problems.append(queues[family].pop()())
    return problems
