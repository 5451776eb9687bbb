"""MAYE jsonl records: reading, validation with `file:line:` errors, images, epoch order.

A record is one JSON object per line (SPEC §1): `question` (with a literal `<image>` marker when
there is an image), `answer`, `solution` (`\\boxed{...}`), `id`, and optionally `image`, a path
relative to the jsonl file. Every problem is reported as `file:line: what is wrong`.

    python -m maye_jax.data check FILE.jsonl [FILE.jsonl ...]   # exit 1 if any problem
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from maye_jax.errors import UserError

log = logging.getLogger(__name__)

RL_FIELDS = ("question", "answer", "solution")


class DataError(UserError, ValueError):
    """A record problem, always prefixed with `file:line:`."""


@dataclasses.dataclass(frozen=True)
class Record:
    id: str
    question: str
    answer: str
    solution: str
    image_path: str | None  # absolute
    source: str  # "file:line", for messages
    fields: dict  # the whole JSON object, for pass-through (e.g. a `response` to score)

    def load_image(self) -> Image.Image | None:
        if self.image_path is None:
            return None
        with Image.open(self.image_path) as image:
            return image.convert("RGB") if image.mode != "RGB" else image.copy()


def _check_record(
    obj, path: Path, line_no: int, required: Sequence[str], check_images: bool
) -> Record:
    where = f"{path}:{line_no}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for field in required:
        if field not in obj:
            raise DataError(f"{where}: missing required field '{field}'")
        if not isinstance(obj[field], (str, int, float)) or isinstance(obj[field], bool):
            raise DataError(
                f"{where}: field '{field}' must be a string or number, got "
                f"{type(obj[field]).__name__}"
            )
    image_path = None
    if obj.get("image") is not None:
        if not isinstance(obj["image"], str) or not obj["image"]:
            raise DataError(f"{where}: field 'image' must be a non-empty path string")
        image_path = str((path.parent / obj["image"]).resolve())
        if check_images:
            if not os.path.isfile(image_path):
                raise DataError(f"{where}: image '{obj['image']}' not found ({image_path})")
            try:
                with Image.open(image_path) as image:
                    image.load()
            except (UnidentifiedImageError, OSError) as error:
                raise DataError(
                    f"{where}: image '{obj['image']}' does not decode: {error}"
                ) from None
    return Record(
        id=str(obj.get("id", f"{path.name}:{line_no}")),
        question=str(obj.get("question", "")),
        answer=str(obj.get("answer", "")),
        solution=str(obj.get("solution", "")),
        image_path=image_path,
        source=where,
        fields=obj,
    )


def iter_problems_and_records(
    path, required=RL_FIELDS, check_images=True
) -> Iterator[Record | DataError]:
    path = Path(path)
    if not path.is_file():
        yield DataError(f"{path}:0: file not found")
        return
    # Binary lines, decoded one by one: a bad byte costs one line, not the rest of the file.
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield DataError(f"{path}:{line_no}: not valid UTF-8 ({error.reason})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                yield DataError(
                    f"{path}:{line_no}: invalid JSON: {error.msg} (column {error.colno})"
                )
                continue
            try:
                yield _check_record(obj, path, line_no, required, check_images)
            except DataError as error:
                yield error


def read_records(
    path, *, on_error: str = "fail", required: Sequence[str] = RL_FIELDS, check_images: bool = True
) -> list[Record]:
    """All valid records of a jsonl file. on_error='fail' raises DataError at the first problem
    (naming file:line); 'skip' logs each skipped record and the total."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    records, skipped = [], 0
    for item in iter_problems_and_records(path, required, check_images):
        if isinstance(item, DataError):
            if on_error == "fail":
                raise item
            log.warning("skipping %s", item)
            skipped += 1
        else:
            records.append(item)
    if skipped:
        log.warning("%s: skipped %d invalid record(s), kept %d", path, skipped, len(records))
    if not records:
        raise DataError(f"{path}:0: no valid records")
    return records


def epoch_order(num_records: int, seed: int, epoch: int) -> np.ndarray:
    """The record order of one epoch: a permutation fixed by (seed, epoch), so a resumed run
    replays exactly the order it would have seen."""
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def check_files(paths: Sequence[str], required: Sequence[str] = RL_FIELDS) -> int:
    """Prints every problem of every file as `file:line: ...` (stdout) and each file's count of
    valid records (stderr); returns the number of problems. A file without a valid record (an
    empty one too) is a problem: a run refuses it."""
    problems = 0
    for path in paths:
        count = 0
        for item in iter_problems_and_records(path, required, check_images=True):
            if isinstance(item, DataError):
                print(item)
                problems += 1
            else:
                count += 1
        if count == 0:
            print(f"{path}:0: no valid records")
            problems += 1
        print(f"{path}: {count} valid record(s)", file=sys.stderr)
    return problems
