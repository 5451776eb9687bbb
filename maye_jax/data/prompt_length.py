"""Prompt lengths in tokens, counted without decoding a pixel, and the checks that keep every
prompt and its response within what the model and the engine can hold, made when the data is
prepared (before any model work or step).

    lengths = prompt_lengths(processor, records, instruction)     # == len(encode(...)["input_ids"])
    records = within_limit(records, lengths, limit=..., on_error="fail" | "skip", ...)

An image's `<|image_pad|>` tokens follow from its size alone (the processor's resize of that
size), read from the image's header when the data was prepared (`Record.image_sizes`). The chat template's text is tokenized once
per record, as the processor does.

This module must not import JAX.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from maye_jax.data.processor import render_prompt
from maye_jax.data.records import DataError, Record

log = logging.getLogger("maye_jax")

NAMED_RECORDS = 3  # a refusal names this many records over the limit, the longest first


def prompt_lengths(processor, records: Sequence[Record], instruction: str) -> list[int]:
    """The token count of each record's prompt, as `processor.encode` lays it out: the chat
    template's tokens, with the one `<|image_pad|>` of an image expanded to that image's
    tokens (each image at its place: `processor.encode_record`)."""
    if not records:
        return []
    texts = [
        render_prompt(
            processor.tokenizer,
            r.question,
            len(r.images),
            instruction,
            images_first=r.images_first,
            system=r.system,
        )
        for r in records
    ]
    token_ids = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
    lengths = []
    for record, ids in zip(records, token_ids, strict=True):
        # each image's one <|image_pad|> becomes its tokens
        images = sum(processor.image_tokens_of_size(w, h) - 1 for w, h in record.image_sizes())
        lengths.append(len(ids) + images)
    return lengths


@dataclasses.dataclass(frozen=True)
class Over:
    """The records of one file whose prompts are longer than `limit` tokens."""

    source: str  # the file (or split) the records come from
    total: int  # records in it
    ids_and_lengths: list[tuple[str, int]]  # the longest first
    limit: int

    def describe(self) -> str:
        named = ", ".join(f"{i}: {n}" for i, n in self.ids_and_lengths[:NAMED_RECORDS])
        more = len(self.ids_and_lengths) - NAMED_RECORDS
        named += f", and {more} more" if more > 0 else ""
        return (
            f"{len(self.ids_and_lengths)} of the {self.total} records of {self.source} have "
            f"prompts longer than {self.limit} tokens ({named})"
        )


def over_limit(records: Sequence[Record], lengths: Sequence[int], limit: int, source: str):
    """The records over `limit` (an `Over`), or None when every prompt fits."""
    over = sorted(
        ((r.id, n) for r, n in zip(records, lengths, strict=True) if n > limit),
        key=lambda item: -item[1],
    )
    return Over(source, len(records), over, limit) if over else None


def within_limit(
    records: Sequence[Record],
    lengths: Sequence[int],
    *,
    limit: int,
    on_error: str,
    source: str,
    field: str,
    why: str,
    skip_hint: str = ", or set data.on_error=skip to skip them",
) -> tuple[list[Record], list[int]]:
    """(the records whose prompts fit in `limit` tokens, their lengths). A record over it is
    refused (`on_error="fail"`: DataError naming how many and which, prefixed by the option
    `field` that sets the limit, with `why` it is what it is and `skip_hint`) or skipped with
    one warning giving the count (`"skip"`; nothing left is refused)."""
    over = over_limit(records, lengths, limit, source)
    if over is None:
        return list(records), list(lengths)
    if on_error == "fail":
        raise DataError(f"{field}: {over.describe()}; {why}{skip_hint}")
    kept = [(r, n) for r, n in zip(records, lengths, strict=True) if n <= limit]
    log.warning("%s; skipping them (data.on_error=skip)", over.describe())
    if not kept:
        raise DataError(f"{field}: every record of {source} is over {limit} tokens; {why}")
    return [r for r, _ in kept], [n for _, n in kept]
