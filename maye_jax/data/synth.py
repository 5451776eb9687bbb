"""Synthetic MAYE-format data sets for demos and tests (SPEC §1), deterministic from a seed.

Two flavours mirror the paper's two data sets:
- ``text_dominant`` (like mm_math): every number the answer needs is in the question; the figure
  (a labelled rectangle, right triangle, ...) only supports it.
- ``vision_dominant`` (like geometry3k figures): the numbers exist only in the image (dots to count,
  numbers drawn with PIL's default font, side lengths written on a rectangle).

Train and validation share one distribution. The test split is out of distribution, like the
paper's MathVerse test set: the same skills on shapes, wordings and renderings that training
never shows, with no problem in common with training (maye_jax/data/synth_ood.py).

    python -m maye_jax.synth --out=/tmp/synth --flavour=both --num_train=64

writes ``OUT/<flavour>/<flavour>_{train,validation,test}.jsonl`` and ``OUT/<flavour>/images/``.
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FLAVOURS = ("text_dominant", "vision_dominant")
SPLITS = ("train", "validation", "test")

Draw = Callable[[ImageDraw.ImageDraw, int, random.Random], None]


@dataclass(frozen=True)
class Problem:
    """One generated problem; ``draw`` paints its figure on a square canvas."""

    kind: str
    question: str  # refers to the figure; the "<image>" marker is added by make_record
    text_only_question: str  # the same problem with everything in the text
    answer: int
    solution: str
    draw: Draw


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int) -> None:
    """Draws ``text`` centred on ``xy``."""
    draw.text(xy, text, fill="black", font=_font(size), anchor="mm")


def _boxed_solution(reasoning: str, answer: int) -> str:
    return f"{reasoning} Therefore, the answer is \\boxed{{{answer}}}"


SOLUTION_STYLES = ("full", "short")


def shorten_solution(solution: str) -> str:
    """The "short" style: only the numeric computation and the box, e.g.
    `$4 \\times 7 = 28$. \\boxed{28}` (a third as many tokens: a cheaper CPU demo)."""
    boxed = solution[solution.rindex("\\boxed{") :]
    maths = re.findall(r"\$([^$]*)\$", solution)
    if not maths:
        return boxed
    parts = maths[-1].split(" = ")
    # Drop symbolic left-hand sides such as "AB \\times BC" (no digit in them).
    while len(parts) > 1 and not re.search(r"\d", parts[0]):
        parts = parts[1:]
    return f"${' = '.join(parts)}$. {boxed}"


# ----------------------------------------------------------------------------- figures


def _rectangle_figure(width: int, height: int, labelled: bool) -> Draw:
    def draw(canvas: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
        scale = 0.6 * size / max(width, height)
        left, bottom = 0.2 * size, 0.8 * size
        right, top = left + width * scale, bottom - height * scale
        canvas.rectangle((left, top, right, bottom), outline="black", width=2)
        font_size = max(8, size // 9)
        offset = font_size / 2
        vertices = {"A": (left, bottom, -1, 1), "B": (right, bottom, 1, 1)}
        vertices |= {"C": (right, top, 1, -1), "D": (left, top, -1, -1)}
        for letter, (x, y, x_side, y_side) in vertices.items():
            _label(canvas, (x + x_side * offset, y + y_side * offset), letter, font_size)
        if labelled:
            _label(canvas, ((left + right) / 2, bottom + font_size), str(width), font_size)
            _label(canvas, (right + font_size, (top + bottom) / 2), str(height), font_size)

    return draw


def _right_triangle_figure(base: int, height: int) -> Draw:
    def draw(canvas: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
        scale = 0.6 * size / max(base, height)
        left, bottom = 0.2 * size, 0.8 * size
        corners = [(left, bottom), (left + base * scale, bottom), (left, bottom - height * scale)]
        canvas.polygon(corners, outline="black", width=2)
        mark = max(4, size // 20)
        canvas.rectangle((left, bottom - mark, left + mark, bottom), outline="black")
        font_size = max(8, size // 9)
        _label(canvas, (left + base * scale / 2, bottom + font_size), str(base), font_size)
        _label(canvas, (left - font_size, bottom - height * scale / 2), str(height), font_size)

    return draw


def _scattered_shapes_figure(count: int, shape: str) -> Draw:
    """``count`` dots, triangles or squares, one per random cell of a 5x5 grid (so none overlap)."""

    def draw(canvas: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
        cell = 0.9 * size / 5
        radius = 0.25 * cell
        for index in rng.sample(range(25), count):
            center_x = 0.05 * size + (index % 5 + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
            center_y = 0.05 * size + (index // 5 + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
            box = (center_x - radius, center_y - radius, center_x + radius, center_y + radius)
            if shape == "dot":
                canvas.ellipse(box, fill="black")
            elif shape == "square":
                canvas.rectangle(box, fill="green")
            else:
                canvas.polygon(
                    [
                        (center_x, center_y - radius),
                        (center_x - radius, center_y + radius),
                        (center_x + radius, center_y + radius),
                    ],
                    fill="blue",
                )

    return draw


def _numbers_figure(first: int, second: int) -> Draw:
    def draw(canvas: ImageDraw.ImageDraw, size: int, rng: random.Random) -> None:
        font_size = max(10, size // 5)
        for number, x_fraction in ((first, 0.28), (second, 0.72)):
            y_fraction = rng.uniform(0.3, 0.7)
            _label(canvas, (x_fraction * size, y_fraction * size), str(number), font_size)

    return draw


# ----------------------------------------------------------------------------- problems


def _rectangle_problem(rng: random.Random, low: int, high: int, numbers_in_text: bool) -> Problem:
    width, height = rng.randint(low, high), rng.randint(low, high)
    if numbers_in_text and rng.random() < 0.5:
        answer = 2 * (width + height)
        ask, kind = "Find the perimeter of rectangle ABCD.", "rectangle_perimeter"
        reasoning = f"The perimeter is $2 \\times ({width} + {height}) = {answer}$."
    else:
        answer = width * height
        ask, kind = "Find the area of rectangle ABCD.", "rectangle_area"
        reasoning = f"The area is $AB \\times BC = {width} \\times {height} = {answer}$."
    sides = f"AB = {width} and BC = {height}"
    if numbers_in_text:
        question = f"As shown in the figure, rectangle ABCD has {sides}. {ask}"
    else:
        kind += "_labels_in_image"
        question = f"The side lengths of rectangle ABCD are written in the figure. {ask}"
        reasoning = f"The figure shows {sides}. {reasoning}"
    return Problem(
        kind=kind,
        question=question,
        text_only_question=f"Rectangle ABCD has {sides}. {ask}",
        answer=answer,
        solution=_boxed_solution(reasoning, answer),
        draw=_rectangle_figure(width, height, labelled=True),
    )


def _right_triangle_problem(rng: random.Random, low: int, high: int) -> Problem:
    base, height = rng.randint(low, high), rng.randint(low, high)
    if base * height % 2:
        base += 1  # keep the area an integer
    answer = base * height // 2
    facts = f"right triangle ABC has legs AB = {base} and AC = {height}"
    return Problem(
        kind="right_triangle_area",
        question=f"In the figure, {facts}. Find the area of the triangle.",
        text_only_question=f"A {facts}. Find the area of the triangle.",
        answer=answer,
        solution=_boxed_solution(
            f"The area is $\\frac{{1}}{{2}} \\times {base} \\times {height} = {answer}$.", answer
        ),
        draw=_right_triangle_figure(base, height),
    )


def _counting_problem(rng: random.Random, low: int, high: int, shape: str) -> Problem:
    return _counting_problem_of(rng.randint(low, high), shape)


def _counting_problem_of(count: int, shape: str) -> Problem:
    symbol = {"dot": "\u25cf", "triangle": "\u25b2", "square": "\u25a0"}[shape]
    return Problem(
        kind=f"count_{shape}s",
        question=f"How many {shape}s are there in the figure?",
        text_only_question=f"How many {shape}s are in this line? " + " ".join([symbol] * count),
        answer=count,
        solution=_boxed_solution(f"Counting the {shape}s one by one gives {count}.", count),
        draw=_scattered_shapes_figure(count, shape),
    )


def _sum_problem(rng: random.Random, low: int, high: int) -> Problem:
    first, second = rng.randint(low, high), rng.randint(low, high)
    answer = first + second
    return Problem(
        kind="sum_of_drawn_numbers",
        question="Two numbers are written in the figure. What is their sum?",
        text_only_question=f"What is the sum of {first} and {second}?",
        answer=answer,
        solution=_boxed_solution(
            f"The figure shows {first} and {second}, and ${first} + {second} = {answer}$.", answer
        ),
        draw=_numbers_figure(first, second),
    )


def make_problem(rng: random.Random, flavour: str, max_number: int = 9) -> Problem:
    """One random training or validation problem (the two splits share one distribution)."""
    if flavour == "text_dominant":
        makers = [
            lambda: _rectangle_problem(rng, 2, max_number, numbers_in_text=True),
            lambda: _right_triangle_problem(rng, 2, max_number),
        ]
    elif flavour == "vision_dominant":
        makers = [
            lambda: _counting_problem(rng, 1, 9, "dot"),
            lambda: _sum_problem(rng, 1, 20),
            lambda: _rectangle_problem(rng, 2, 9, numbers_in_text=False),
        ]
    else:
        raise ValueError(f"synth: unknown flavour {flavour!r}; expected one of {FLAVOURS}")
    return rng.choice(makers)()


def make_record(problem: Problem, record_id: str, image_path: str | None) -> dict[str, str]:
    """The MAYE jsonl record (SPEC §1); without ``image_path`` a text-only record."""
    record = {"id": record_id, "kind": problem.kind}
    if image_path is None:
        record["question"] = problem.text_only_question
    else:
        record["question"] = "<image>" + problem.question
        record["image"] = image_path
    record["answer"] = str(problem.answer)
    record["solution"] = problem.solution
    return record


def _write_atomically(path: Path, data: bytes) -> None:
    """Writes through a temporary file renamed into place: a run reading the dataset while
    another run regenerates it (same seed, same bytes) never sees a half-written file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def split_paths(out_dir, flavour: str) -> dict[str, Path]:
    """Where `generate` writes each split of `flavour` under `out_dir`."""
    return {split: Path(out_dir) / flavour / f"{flavour}_{split}.jsonl" for split in SPLITS}


def generate(
    out_dir: str | Path,
    flavour: str,
    num_train: int = 64,
    num_validation: int = 16,
    num_test: int = 16,
    seed: int = 0,
    image_size: int = 112,
    text_only_fraction: float = 0.0,
    solution_style: str = "full",
    max_number: int = 9,
) -> dict[str, Path]:
    """Writes one flavour's three splits and images; returns ``{split: jsonl path}``."""
    if flavour not in FLAVOURS:
        raise ValueError(f"synth.generate: unknown flavour {flavour!r}; expected one of {FLAVOURS}")
    for name, count in (
        ("num_train", num_train),
        ("num_validation", num_validation),
        ("num_test", num_test),
    ):
        if count < 0:
            raise ValueError(f"synth.generate: {name} must be >= 0, got {count}")
    if image_size < 32:
        raise ValueError(f"synth.generate: image_size must be >= 32 pixels, got {image_size}")
    if not 2 <= max_number <= 9:
        raise ValueError(f"synth.generate: max_number must be in [2, 9], got {max_number}")
    if solution_style not in SOLUTION_STYLES:
        raise ValueError(f"synth.generate: solution_style must be one of {SOLUTION_STYLES}")
    if not 0.0 <= text_only_fraction <= 1.0:
        raise ValueError(f"synth.generate: text_only_fraction {text_only_fraction} not in [0, 1]")
    flavour_dir = Path(out_dir) / flavour
    (flavour_dir / "images").mkdir(parents=True, exist_ok=True)
    sizes = {"train": num_train, "validation": num_validation, "test": num_test}
    paths = split_paths(out_dir, flavour)
    for split in SPLITS:
        rng = random.Random(f"maye_jax.synth/{seed}/{flavour}/{split}")
        test_problems = []
        if split == "test":
            # Imported here: synth_ood builds on this module's figures and Problem.
            from maye_jax.data.synth_ood import make_test_problems

            test_problems = make_test_problems(rng, flavour, sizes[split], max_number)
        lines = []
        for index in range(sizes[split]):
            if split == "test":
                problem = test_problems[index]
            else:
                problem = make_problem(rng, flavour, max_number)
            record_id = f"{flavour}_{split}_{index:05d}"
            image_path = None
            if rng.random() >= text_only_fraction:
                image_path = f"images/{record_id}.png"
                image = Image.new("RGB", (image_size, image_size), "white")
                problem.draw(ImageDraw.Draw(image), image_size, rng)
                png = io.BytesIO()
                image.save(png, format="PNG")
                _write_atomically(flavour_dir / image_path, png.getvalue())
            record = make_record(problem, record_id, image_path)
            if solution_style == "short":
                record["solution"] = shorten_solution(record["solution"])
            lines.append(json.dumps(record, ensure_ascii=False))
        _write_atomically(paths[split], "".join(line + "\n" for line in lines).encode("utf-8"))
    return paths
