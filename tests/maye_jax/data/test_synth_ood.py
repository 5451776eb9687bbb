"""Tests for maye_jax/data/synth_ood.py: the out-of-distribution test split of the synthetic data.

What the split promises: the training skills under a shift (new kinds only), not one problem in
common with training, numbers from the training range, answers that follow from the problem,
and every distinct problem before any repeat (the demo's 64 problems are 64 distinct ones).
"""

import collections
import json
import random
import re
from pathlib import Path

import pytest

from maye_jax.data import synth, synth_ood


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _problem_key(record: dict) -> tuple:
    """(kind, numbers in the question): one problem whatever its wording."""
    return record["kind"], tuple(int(number) for number in re.findall(r"\d+", record["question"]))


# (flavour, options): the demo's split sizes and numbers, and the defaults with larger splits.
CASES = [
    ("text_dominant", dict(num_train=128, num_validation=64, num_test=64, max_number=4)),
    ("text_dominant", dict(num_train=300, num_validation=64, num_test=100, max_number=9)),
    ("vision_dominant", dict(num_train=300, num_validation=64, num_test=100)),
]


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """{case index: {split: records}}, written once for the module (32-pixel images: fast)."""
    out = {}
    for index, (flavour, options) in enumerate(CASES):
        paths = synth.generate(
            tmp_path_factory.mktemp(f"case{index}"), flavour, image_size=32, **options
        )
        out[index] = {split: _read(path) for split, path in paths.items()}
    return out


@pytest.mark.parametrize("case", range(len(CASES)))
def test_no_test_problem_occurs_in_training(splits, case):
    records = splits[case]
    seen = records["train"] + records["validation"]
    test = records["test"]
    assert {r["question"] for r in test}.isdisjoint(r["question"] for r in seen)
    assert {_problem_key(r) for r in test}.isdisjoint(_problem_key(r) for r in seen)
    # Stronger: the kinds themselves are new, so no split size or seed can make them meet.
    assert {r["kind"] for r in test}.isdisjoint(r["kind"] for r in seen)


def test_kinds_of_each_flavour(splits):
    kinds = {
        index: collections.Counter(r["kind"] for r in splits[index]["test"]) for index in splits
    }
    train_kinds = {r["kind"] for r in splits[0]["train"]}
    assert train_kinds == {"rectangle_area", "rectangle_perimeter", "right_triangle_area"}
    # The demo's 64: four families of 16 in turn; squares split between area and perimeter.
    assert kinds[0]["parallelogram_area"] == 16
    assert kinds[0]["parallelogram_perimeter"] == 16
    assert kinds[0]["triangle_area"] == 16
    assert kinds[0]["square_area"] + kinds[0]["square_perimeter"] == 16
    assert set(kinds[2]) == {
        "count_triangles",
        "count_squares",
        "sum_of_three_drawn_numbers",
        "parallelogram_area_labels_in_image",
    }
    assert kinds[2]["sum_of_three_drawn_numbers"] == 33  # 100 problems over 3 families: 34/33/33


def test_demo_test_split_is_its_64_distinct_problems_once(splits):
    test = splits[0]["test"]
    assert len(test) == 64
    assert len({r["question"] for r in test}) == 64
    # A problem differs from another in its numbers or its unit (none, cm, m): at most three
    # questions share a (kind, numbers) pair.
    assert max(collections.Counter(_problem_key(r) for r in test).values()) <= 3


@pytest.mark.parametrize("case", [0, 1])
def test_text_dominant_numbers_stay_in_the_training_range(splits, case):
    max_number = CASES[case][1]["max_number"]
    train_numbers = {n for r in splits[case]["train"] for n in re.findall(r"\d+", r["question"])}
    test_numbers = {n for r in splits[case]["test"] for n in re.findall(r"\d+", r["question"])}
    # one digit each, all seen in training: the tokenizer splits them the same way
    assert test_numbers == {str(number) for number in range(2, max_number + 1)}
    assert test_numbers <= train_numbers
    units = collections.Counter(
        re.search(r"= \d+( cm| m)?[ .]", r["question"]).group(1) for r in splits[case]["test"]
    )
    assert set(units) == {None, " cm", " m"}
    assert not any(" cm" in r["question"] or " m " in r["question"] for r in splits[case]["train"])


def test_vision_dominant_answers_follow_from_the_text_only_questions(tmp_path):
    """Text-only records spell out what the image shows: the answer must follow from it."""
    paths = synth.generate(
        tmp_path,
        "vision_dominant",
        num_train=0,
        num_validation=0,
        num_test=60,
        text_only_fraction=1.0,
    )
    for record in _read(paths["test"]):
        question, answer = record["question"], int(record["answer"])
        if record["kind"] in ("count_triangles", "count_squares"):
            symbols = re.findall("[\u25b2\u25a0]", question)
            assert len(symbols) == answer and 1 <= answer <= 9
        elif record["kind"] == "sum_of_three_drawn_numbers":
            numbers = [int(n) for n in re.findall(r"\d+", question)]
            assert len(numbers) == 3 and sum(numbers) == answer
        else:
            base, height = (int(n) for n in re.findall(r"\d+", question))
            assert base * height == answer and 2 <= min(base, height) <= max(base, height) <= 9


def test_a_problem_repeats_only_after_its_family_has_shown_every_problem():
    makers = synth_ood._test_makers("text_dominant", max_number=4)
    assert {family: len(problems) for family, problems in makers.items()} == {
        "parallelogram_area": 27,
        "parallelogram_perimeter": 27,
        "triangle_area": 24,
        "square_area_or_perimeter": 18,
    }
    problems = synth_ood.make_test_problems(random.Random(0), "text_dominant", 4 * 40, max_number=4)
    squares = [p.question for p in problems[3::4]]  # the square family's turns
    assert len(set(squares[:18])) == 18  # all 18 square problems first,
    assert set(squares[18:36]) == set(squares[:18])  # then all again in a new order
    assert squares[18:36] != squares[:18]


def test_the_paper_experiment_in_miniature_evaluates_these_64_problems():
    from configs.demo_paper import get_config

    c = get_config()
    assert "test" in c.eval.splits
    flavour, options = CASES[
        0
    ]  # the split test_demo_test_split_is_its_64_distinct_problems_once checks
    assert (c.data.synth_flavour, c.data.synth_num_test, c.data.synth_max_number) == (
        flavour,
        options["num_test"],
        options["max_number"],
    )
    assert (c.data.synth_num_train, c.data.synth_num_validation) == (128, 64)
