"""The rows of a data file in any of the formats users bring, as plain dicts.

    jsonl     one JSON object per line (MAYE's release); images are paths relative to the file
    parquet   a parquet file (the hub's geometry3k, verl's preprocessed geo3k)
    arrow     a `datasets` `save_to_disk` folder (state.json + Arrow stream files), read with
              pyarrow alone, memory-mapped

`data.format` names one; unset, it follows the path (`.jsonl` / `.json`, `.parquet`, a folder or
an `.arrow` file). In parquet and Arrow rows the image column is kept out of the dicts: each
row's images become `EmbeddedBytes` references into the Arrow buffers (a `datasets` Image is a
struct `{bytes, path}`; a list of them is several images), read only when decoded.

Every row comes with its place (`file:line` for jsonl, `file:row N` for the others, 1-based),
and every problem is a `DataError` naming it. This module imports no JAX.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from maye_jax.data.images import EmbeddedBytes
from maye_jax.errors import UserError

FORMATS = ("jsonl", "parquet", "arrow")


class DataError(UserError, ValueError):
    """A data problem, always prefixed with where it is (`file:line:` or `file:row N:`);
    `whole_file`: the file itself cannot be read as data (`file:0:`), so no record of it can."""

    def __init__(self, message: str, *, whole_file: bool = False):
        super().__init__(message)
        self.whole_file = whole_file


def file_error(path, problem: str) -> DataError:
    """A problem of the whole file (`file:0: ...`)."""
    return DataError(f"{path}:0: {problem}", whole_file=True)


# A row's images as found in the data: paths (str, relative to the data file's folder) or
# embedded bytes; None where the row has no image column or a null there.
RawImages = list[str | EmbeddedBytes] | None


def detect_format(path: str | Path, configured: str | None = None) -> str:
    """`configured` (data.format) when set, else the format the path names."""
    if configured is not None:
        return configured
    path = Path(path)
    if path.is_dir() or path.suffix == ".arrow":
        return "arrow"
    if path.suffix == ".parquet":
        return "parquet"
    if path.suffix in (".jsonl", ".json"):
        return "jsonl"
    raise file_error(
        path,
        "cannot tell the data format from the name (.jsonl, .parquet, or a "
        "save_to_disk folder); set data.format (jsonl, parquet or arrow)",
    )


def iter_rows(
    path: str | Path, fmt: str, images_key: str, required: Sequence[str]
) -> Iterator[tuple[str, dict, RawImages] | DataError]:
    """(where, the row without its images, its raw images) for each row, or a DataError for a
    row that cannot be read; a whole-file problem (missing, no such columns) is one DataError.
    `required`: keys whose top-level columns a parquet / Arrow file must have."""
    path = Path(path)
    if fmt == "jsonl":
        yield from _jsonl_rows(path, images_key)
        return
    try:
        table = _read_table(path, fmt)
    except DataError as error:
        yield error
        return
    missing = [key for key in required if not _has_column(table.schema, key)]
    if missing:
        yield file_error(
            path,
            f"no column {', '.join(repr(k) for k in missing)}; the columns are "
            f"{', '.join(table.schema.names)} (set data.layout or the data.*_key options)",
        )
        return
    top = images_key.split(".")[0]
    image_column = images_key if images_key in table.schema.names else top
    if image_column not in table.schema.names:
        image_column = None  # no image column: text-only records
    row = 0
    for batch in table.to_batches(max_chunksize=1024):
        images: list[RawImages] = [None] * batch.num_rows
        if image_column is not None:
            try:
                images = _batch_images(batch.column(image_column), images_key, image_column)
            except DataError as error:
                yield file_error(path, f"column '{images_key}': {error}")
                return
            batch = batch.drop_columns([image_column])
        for fields, raw in zip(batch.to_pylist(), images):
            row += 1
            yield f"{path}:row {row}", fields, raw


def _jsonl_rows(path: Path, images_key: str) -> Iterator[tuple[str, dict, RawImages] | DataError]:
    if not path.is_file():
        yield file_error(path, "file not found")
        return
    # Binary lines, decoded one by one: a bad byte costs one line, not the rest of the file.
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield DataError(f"{where}: not valid UTF-8 ({error.reason})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                yield DataError(f"{where}: invalid JSON: {error.msg} (column {error.colno})")
                continue
            if not isinstance(obj, dict):
                yield DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                continue
            value = obj.get(images_key)
            if value is None or value == []:
                yield where, obj, None
            elif isinstance(value, str) and value:
                yield where, obj, [value]
            elif isinstance(value, list) and all(isinstance(v, str) and v for v in value):
                yield where, obj, list(value)
            else:
                yield DataError(
                    f"{where}: field '{images_key}' must be an image path or a list of paths "
                    "(relative to the jsonl file)"
                )


def _read_table(path: Path, fmt: str):
    import pyarrow as pa

    if not path.exists():
        raise file_error(path, "not found")
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            if path.is_dir():
                raise file_error(path, "a folder; data.format=parquet reads one .parquet file")
            return pq.read_table(path)
        files = _arrow_files(path)
        return pa.concat_tables([_read_arrow_file(file) for file in files])
    except DataError:
        raise
    except (OSError, pa.ArrowException) as error:
        raise file_error(path, f"not a readable {fmt} file ({error})") from None


def _arrow_files(path: Path) -> list[Path]:
    """The Arrow files of a `save_to_disk` folder, in order (its state.json lists them)."""
    if path.is_file():
        return [path]
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise file_error(
            path,
            f"a DatasetDict folder (splits {', '.join(splits)}); name one split's "
            f"folder, e.g. {path / (splits[0] if splits else 'train')}",
        )
    state = path / "state.json"
    if state.is_file():
        names = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
        return [path / name for name in names]
    files = sorted(path.glob("*.arrow"))
    if not files:
        raise file_error(path, "no state.json and no .arrow files (not a save_to_disk folder)")
    return files


def _read_arrow_file(file: Path):
    """An Arrow IPC file, memory-mapped (zero copy): the stream format `datasets` writes, or
    the random-access file format."""
    import pyarrow as pa

    source = pa.memory_map(str(file))
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source).read_all()


def _has_column(schema, key: str) -> bool:
    """True when `key` (dotted: into struct columns) names a column of `schema`; a part behind
    a list cannot be checked from the schema and counts as present."""
    import pyarrow as pa

    if key in schema.names:
        return True
    parts = key.split(".")
    if parts[0] not in schema.names:
        return False
    kind = schema.field(parts[0]).type
    for part in parts[1:]:
        if not pa.types.is_struct(kind):
            return True
        index = kind.get_field_index(part)
        if index < 0:
            return False
        kind = kind.field(index).type
    return True


def _batch_images(column, images_key: str, top: str) -> list[RawImages]:
    """Each row's images of an Arrow image column: a `datasets` Image struct {bytes, path},
    binary, a path string, or a list of any of them; a dotted key reaches into a struct."""
    import pyarrow as pa

    for part in images_key.split(".")[1:] if images_key != top else []:
        column = column.field(part)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        # `offsets` index the whole child array (a batch is a slice of it): take the batch's part
        offsets = column.offsets.to_pylist()
        items = _items(column.values.slice(offsets[0], offsets[-1] - offsets[0]))
        valid = column.is_valid().to_pylist()
        rows = []
        for row, ok in enumerate(valid):
            start, stop = offsets[row] - offsets[0], offsets[row + 1] - offsets[0]
            found = [i for i in items[start:stop] if i is not None]
            rows.append(found if ok and found else None)
        return rows
    return [None if item is None else [item] for item in _items(column)]


def _items(array) -> list[str | EmbeddedBytes | None]:
    """One image (or None) per item of an Arrow array of images."""
    import pyarrow as pa

    kind = array.type
    if pa.types.is_struct(kind):
        names = [kind.field(i).name for i in range(kind.num_fields)]
        data = array.field("bytes") if "bytes" in names else None
        paths = array.field("path").to_pylist() if "path" in names else [None] * len(array)
        valid = array.is_valid().to_pylist()
        has_bytes = data.is_valid().to_pylist() if data is not None else [False] * len(array)
        return [
            None if not ok else EmbeddedBytes(data, i) if has_bytes[i] else paths[i] or None
            for i, ok in enumerate(valid)
        ]
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        valid = array.is_valid().to_pylist()
        return [EmbeddedBytes(array, i) if ok else None for i, ok in enumerate(valid)]
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return [value or None for value in array.to_pylist()]
    raise DataError(f"an image column of type {kind} (expected binary, a path or {{bytes, path}})")
