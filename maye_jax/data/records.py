"""Records: one problem of a data set (its question, answer, solution, images), read from any
format (maye_jax/data/tables.py) through the data set's layout (maye_jax/data/layouts.py), with
every problem reported as `where: what is wrong` (`file:line` for jsonl, `file:row N` else).

A MAYE jsonl record (SPEC §1): `question` (with a literal `<image>` marker where the image
belongs), `answer`, `solution` (`\\boxed{...}`), `id`, and optionally `image`, a path (or a
list of paths) relative to the jsonl file. Parquet and `save_to_disk` rows hold their images as
bytes. Preparing a record reads each image's header only (format and size); the pixels are
decoded when a batch needs them (`Record.load_images`).

    python -m maye_jax.data check PATH [PATH ...]   # every problem, every image decoded; exit 1
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from maye_jax.data.images import ImageError, ImageSize, ImageSource
from maye_jax.data.layouts import IMAGE_MARKER, LAYOUTS, DataLayout, dotted_get
from maye_jax.data.tables import DataError, RawImages, detect_format, iter_rows

log = logging.getLogger(__name__)

MAYE_LAYOUT = LAYOUTS["maye"]

__all__ = [
    "DataError",
    "Record",
    "check_files",
    "epoch_order",
    "images_per_prompt",
    "read_records",
]


@dataclasses.dataclass(frozen=True)
class Record:
    id: str
    question: str  # the user turn's text, `<image>` markers included
    answer: str
    solution: str  # "" where the data set has no solutions
    source: str  # where it was read ("file:line", "file:row N"), for messages
    fields: dict  # the row without its images, for pass-through (a `response` to score) and rewards
    images: tuple[ImageSource, ...] = ()
    # True: the images go before the question text (MAYE's single-image layout, the marker
    # stays in the text); False: each image replaces its `<image>` marker.
    images_first: bool = True
    system: str | None = None  # a chat-format prompt's system turn, if it has one
    ground_truth_rule: str = "solution_boxed"  # data.ground_truth: solution_boxed | answer

    @property
    def reward_solution(self) -> str:
        """What the accuracy reward reads as the solution: the solution (its last `\\boxed{}`
        is the ground truth) under data.ground_truth=solution_boxed; under `answer` nothing, so
        the whole answer field is the ground truth (maye_jax/rl/rewards.py `ground_truth`)."""
        return self.solution if self.ground_truth_rule == "solution_boxed" else ""

    def reward_fields(self) -> dict:
        """What a users' reward function gets of this record (rl/user_rewards.py): the row
        without its images, with `id`, `question`, `answer`, `solution` set to its parts."""
        return dict(
            self.fields,
            id=self.id,
            question=self.question,
            answer=self.answer,
            solution=self.solution,
        )

    def image_sizes(self) -> list[ImageSize]:
        """Each image's stored (width, height), from the header read when the data was prepared:
        no pixels are decoded."""
        return [image.size for image in self.images]

    def load_images(self) -> list[Image.Image]:
        """The images' pixels, decoded now, each in its stored mode (the processor converts
        them to RGB as transformers does)."""
        return [image.decode() for image in self.images]


def _text(value, key: str, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(
            f"{where}: field '{key}' must be a string or number, got {type(value).__name__}"
        )
    return str(value)


def _chat_turns(messages, key: str, where: str) -> tuple[str, str | None]:
    """(the user turn's text, the system turn's or None) of a chat-format prompt (verl)."""
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
    )
    roles = [m.get("role") for m in messages] if ok else []
    if not ok or roles not in (["user"], ["system", "user"]):
        raise DataError(
            f"{where}: field '{key}' must be a string or a chat of one user turn (after an "
            f"optional system turn) with string contents; got roles {roles or type(messages)}"
        )
    return messages[-1]["content"], messages[0]["content"] if len(messages) == 2 else None


def make_record(
    where: str, row: dict, raw_images: RawImages, layout: DataLayout, folder: Path, kind: str
) -> Record:
    """The record of one row; raises DataError (or ImageError) naming `where` and the field."""
    for key in layout.required_keys(kind):
        try:
            dotted_get(row, key)
        except KeyError:
            raise DataError(f"{where}: missing required field '{key}'") from None
    question, system = dotted_get(row, layout.question_key), None
    if isinstance(question, list):
        question, system = _chat_turns(question, layout.question_key, where)
    question = _text(question, layout.question_key, where)

    def optional(key: str | None) -> str:
        try:
            return "" if key is None else _text(dotted_get(row, key), key, where)
        except KeyError:
            return ""

    images = []
    for index, raw in enumerate(raw_images or (), start=1):
        if isinstance(raw, str):
            path = str((folder / raw).resolve())
            images.append(ImageSource.read_header(f"{where}: image '{raw}'", path=path))
        else:
            label = f"{where}: image {index}" if len(raw_images) > 1 else f"{where}: image"
            images.append(ImageSource.read_header(label, embedded=raw))
    images_first = layout.single_image_first and len(images) <= 1
    markers = question.count(IMAGE_MARKER)
    if not images_first and markers != len(images):
        raise DataError(
            f"{where}: the question has {markers} {IMAGE_MARKER} marker(s) but the record has "
            f"{len(images)} image(s); each image goes at its marker"
        )
    try:
        record_id = str(dotted_get(row, layout.id_key))
    except KeyError:
        record_id = where.replace(":row ", ":")
    return Record(
        id=record_id,
        question=question,
        answer=optional(layout.answer_key),
        solution=optional(layout.solution_key),
        source=where,
        fields=row,
        images=tuple(images),
        images_first=images_first,
        system=system,
        ground_truth_rule=layout.ground_truth,
    )


def iter_problems_and_records(
    path, layout: DataLayout = MAYE_LAYOUT, *, fmt: str | None = None, kind: str = "rl"
) -> Iterator[Record | DataError]:
    """Every record of a data file, or the DataError of each row that is not one."""
    try:
        fmt = detect_format(path, fmt)
    except DataError as error:
        yield error
        return
    required = layout.required_keys(kind)
    folder = Path(path).parent if fmt == "jsonl" or not Path(path).is_dir() else Path(path)
    for item in iter_rows(path, fmt, layout.images_key, required):
        if isinstance(item, DataError):
            yield item
            continue
        where, row, raw_images = item
        try:
            yield make_record(where, row, raw_images, layout, folder, kind)
        except (DataError, ImageError) as error:
            yield error if isinstance(error, DataError) else DataError(str(error))


def read_records(
    path,
    layout: DataLayout = MAYE_LAYOUT,
    *,
    fmt: str | None = None,
    on_error: str = "fail",
    kind: str = "rl",
) -> list[Record]:
    """All valid records of a data file (`fmt`: data.format, None: from the path; `kind`: rl |
    score, which fields are required). on_error='fail' raises DataError at the first problem
    (naming where it is); 'skip' logs each skipped record and the total."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    records, skipped = [], 0
    for item in iter_problems_and_records(path, layout, fmt=fmt, kind=kind):
        if isinstance(item, DataError):
            if on_error == "fail" or item.whole_file:
                raise item  # a whole-file problem is never skipped
            log.warning("skipping %s", item)
            skipped += 1
        else:
            records.append(item)
    if skipped:
        log.warning("%s: skipped %d invalid record(s), kept %d", path, skipped, len(records))
    if not records:
        raise DataError(f"{path}:0: no valid records", whole_file=True)
    return records


def images_per_prompt(splits: dict[str, Sequence[Record]]) -> int:
    """The most images one record of the data holds (vLLM's per-prompt image limit)."""
    return max((len(r.images) for records in splits.values() for r in records), default=0)


def epoch_order(num_records: int, seed: int, epoch: int) -> np.ndarray:
    """The record order of one epoch: a permutation fixed by (seed, epoch), so a resumed run
    replays exactly the order it would have seen."""
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def check_files(
    paths: Sequence[str], layout: DataLayout = MAYE_LAYOUT, *, fmt: str | None = None
) -> int:
    """`data check`: prints every problem of every file as `where: ...` (each image decoded in
    full) on stdout and each file's count of valid records on stderr; returns the number of
    problems. A file without any record is a problem: a run refuses it."""
    problems = 0
    for path in paths:
        count, before = 0, problems
        for item in iter_problems_and_records(path, layout, fmt=fmt):
            if isinstance(item, Record):
                item = _decode_problem(item)
            if isinstance(item, DataError):
                print(item)
                problems += 1
            else:
                count += 1
        if count == 0 and problems == before:  # what `train` refuses: nothing to read
            print(f"{path}:0: no records")
            problems += 1
        print(f"{path}: {count} valid record(s)", file=sys.stderr)
    return problems


def _decode_problem(record: Record) -> Record | DataError:
    """The record when all its images decode, else the problem."""
    for image in record.images:
        try:
            image.decode()
        except ImageError as error:
            return DataError(str(error))
    return record
