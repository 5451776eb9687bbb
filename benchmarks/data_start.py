"""Start-up time and memory of a large parquet data set with embedded images: preparing the
records reads each image's header only (format and size); the baseline, measured in the same
run, decodes every image at start (what `data check` does, and what a loader that checks the
pixels up front pays).

    python benchmarks/data_start.py [--records=20000] [--size=224] [--folder=/tmp/maye-bench]

Writes a geo3k_easyr1 parquet of `--records` rows (one PNG figure of `--size` pixels each,
lines on white as in geometry sets, a few KB each) once into `--folder`, then prints the
preparation's seconds and resident-memory growth, the decode-everything baseline's seconds,
and their ratio.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402


def figure_png(rng, size: int) -> bytes:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        draw.line([tuple(rng.integers(0, size, 2)) for _ in range(2)], fill="black", width=2)
    draw.text(tuple(rng.integers(0, size - 20, 2)), str(int(rng.integers(0, 100))), fill="black")
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def write_set(path: Path, records: int, size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    image_type = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    batches, batch = [], 2000
    for start in range(0, records, batch):
        rows = range(start, min(records, start + batch))
        images = [[{"bytes": figure_png(rng, size), "path": None}] for _ in rows]
        batches.append(
            pa.record_batch(
                {
                    "id": pa.array([f"r{i}" for i in rows]),
                    "problem": pa.array([f"<image>Find x in figure {i}." for i in rows]),
                    "answer": pa.array([str(i % 97) for i in rows]),
                    "images": pa.array(images, image_type),
                }
            )
        )
    pq.write_table(pa.Table.from_batches(batches), path, row_group_size=batch)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--folder", default="/tmp/maye-bench")
    args = parser.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"geo3k_{args.records}x{args.size}.parquet"
    if not path.is_file():
        write_set(path, args.records, args.size)
    from maye_jax.data import images
    from maye_jax.data.layouts import LAYOUTS
    from maye_jax.data.records import read_records

    process = psutil.Process()
    rss_before = process.memory_info().rss
    start = time.perf_counter()
    records = read_records(path, LAYOUTS["geo3k_easyr1"])
    prepare_s = time.perf_counter() - start
    rss_growth = process.memory_info().rss - rss_before
    assert images.decode_count() == 0 and len(records) == args.records

    start = time.perf_counter()
    for record in read_records(path, LAYOUTS["geo3k_easyr1"]):
        for image in record.load_images():
            image.convert("RGB")  # the decode everything at start baseline
    eager_s = time.perf_counter() - start
    print(
        f"{args.records} records, {path.stat().st_size / 2**20:.1f} MiB parquet "
        f"({args.size}x{args.size} PNG each)"
    )
    print(
        f"prepare (headers only): {prepare_s:.2f} s, resident memory +{rss_growth / 2**20:.0f} MiB "
        f"({rss_growth / args.records / 1024:.1f} KiB per record)"
    )
    print(f"decode every image at start (baseline): {eager_s:.2f} s")
    print(f"ratio (baseline / headers only): {eager_s / prepare_s:.1f}x")


if __name__ == "__main__":
    main()
