"""Where a record's parts are in a data set's rows: the `data.layout` presets and their keys.

    layout        question          answer                     solution   images   id
    maye          question          answer                     solution   image    id
    geo3k_easyr1  problem           answer                     -          images   id
    geo3k_verl    prompt (chat)     reward_model.ground_truth  -          images   extra_info.index

Each key can be overridden (`data.question_key`, ...); a dotted key reaches into a nested
column (`reward_model.ground_truth`). `data.ground_truth` says what the accuracy reward compares
a response with: `solution_boxed`, the last `\\boxed{}` of the solution (MAYE's), or `answer`,
the whole answer field (the geo3k layouts'). With geo3k_verl the user turn already holds its
instruction, so `data.prompt_template` defaults to `plain` there.

Images go into the prompt at the question's `<image>` markers (one per image), except in the
MAYE layout's single-image records, whose image goes before the text with the marker left in
it, as the original MAYE does. This module imports no JAX.
"""

from __future__ import annotations

import dataclasses

IMAGE_MARKER = "<image>"
GROUND_TRUTHS = ("solution_boxed", "answer")
KEY_OPTIONS = ("question_key", "answer_key", "solution_key", "images_key", "id_key")


@dataclasses.dataclass(frozen=True)
class DataLayout:
    """The resolved layout of a data set: the key of each part (None: the data has none)."""

    name: str = "maye"
    question_key: str = "question"
    answer_key: str = "answer"
    solution_key: str | None = "solution"
    images_key: str = "image"
    id_key: str = "id"
    ground_truth: str = "solution_boxed"
    prompt_template: str = "maye"

    @property
    def single_image_first(self) -> bool:
        """A record with one image gets it before the text, marker or not (MAYE's layout)."""
        return self.name == "maye"

    def required_keys(self, kind: str = "rl") -> tuple[str, ...]:
        """The keys every record must have: RL and SFT need the question, the answer and
        (where the layout has one) the solution; scoring the question and the response."""
        if kind == "score":
            return (self.question_key, "response")
        keys = [self.question_key, self.answer_key]
        if self.solution_key is not None:
            keys.append(self.solution_key)
        return tuple(keys)


LAYOUTS: dict[str, DataLayout] = {
    "maye": DataLayout(),
    "geo3k_easyr1": DataLayout(
        name="geo3k_easyr1",
        question_key="problem",
        answer_key="answer",
        solution_key=None,
        images_key="images",
        id_key="id",
        ground_truth="answer",
    ),
    "geo3k_verl": DataLayout(
        name="geo3k_verl",
        question_key="prompt",
        answer_key="reward_model.ground_truth",
        solution_key=None,
        images_key="images",
        id_key="extra_info.index",
        ground_truth="answer",
        prompt_template="plain",
    ),
}


def layout_names() -> tuple[str, ...]:
    return tuple(LAYOUTS)


def resolve_layout(data) -> DataLayout:
    """The layout of `data` (the run's DataSettings, or any object with its data.* fields):
    the preset of `data.layout` with every key, `ground_truth` and `prompt_template` that the
    options set."""
    preset = LAYOUTS[data.layout]
    chosen = {
        name: getattr(data, name)
        for name in (*KEY_OPTIONS, "ground_truth", "prompt_template")
        if getattr(data, name, None) is not None
    }
    return dataclasses.replace(preset, **chosen)


def dotted_get(row: dict, key: str):
    """`row[a][b]` for the key "a.b" (a whole top-level column named "a.b" wins); raises
    KeyError naming the part that is missing."""
    if key in row:
        return row[key]
    value = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(part)
        value = value[part]
    return value


def with_layout_defaults(data):
    """`data` (the run's DataSettings) with each key option, `ground_truth` and
    `prompt_template` left unset (None) replaced by its layout's value, so everything after the
    settings check reads concrete names (a layout without solutions keeps solution_key None)."""
    layout = resolve_layout(data)
    names = (*KEY_OPTIONS, "ground_truth", "prompt_template")
    return dataclasses.replace(data, **{name: getattr(layout, name) for name in names})
