"""Small data sets in the formats users bring, written by `datasets` itself (as the hub's
geometry3k for EasyR1 and verl's preprocessed geo3k are): parquet files and `save_to_disk`
folders with PNG and JPEG bytes embedded, in both geo3k layouts.

Each set has four records: a PNG, a JPEG (CMYK: decoded as transformers does), a record with
two images (PNG, RGBA PNG) at two `<image>` markers, and a text-only record."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(seed: int, size: tuple[int, int], fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """`fmt` bytes of a random image of `size` (width, height) in `mode`."""
    rng = np.random.default_rng(seed)
    channels = len(mode)
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode).save(out, fmt)
    return out.getvalue()


def problems() -> list[dict]:
    """The records' parts: id, problem text (markers included), answer, image bytes."""
    return [
        dict(
            id="p0",
            problem="<image>Find x in the figure.",
            answer="3",
            images=[image_bytes(0, (56, 56))],
        ),
        dict(
            id="p1",
            problem="<image>What is the area?",
            answer="12",
            images=[image_bytes(1, (84, 56), "JPEG", "CMYK")],
        ),
        dict(
            id="p2",
            problem="Compare <image> with <image>. Which is larger?",
            answer="2",
            images=[
                image_bytes(2, (56, 84)),
                image_bytes(3, (60, 40), "PNG", "RGBA"),
            ],
        ),
        dict(id="p3", problem="What is 3 + 4?", answer="7", images=[]),
    ]


def easyr1_rows() -> dict[str, list]:
    """geo3k_easyr1 columns: `images` a list of {bytes, path}, `problem` with `<image>`,
    `answer` a bare value (the hub's set also has no id column; ours adds one)."""
    rows = problems()
    return dict(
        id=[r["id"] for r in rows],
        problem=[r["problem"] for r in rows],
        answer=[r["answer"] for r in rows],
        images=[[{"bytes": b, "path": None} for b in r["images"]] for r in rows],
    )


def verl_rows() -> dict[str, list]:
    """verl's geo3k columns: `prompt` a chat list already holding its instruction,
    `images`, `reward_model.ground_truth`, `extra_info.index`."""
    rows = problems()
    instruction = " Put the final answer in \\boxed{}."
    return dict(
        data_source=["hiyouga/geometry3k"] * len(rows),
        prompt=[[{"content": r["problem"] + instruction, "role": "user"}] for r in rows],
        images=[[{"bytes": b, "path": None} for b in r["images"]] for r in rows],
        ability=["math"] * len(rows),
        reward_model=[{"ground_truth": r["answer"], "style": "rule"} for r in rows],
        extra_info=[
            {"index": i, "split": "train", "answer": r["answer"]} for i, r in enumerate(rows)
        ],
    )


def write_sets(folder: Path) -> dict[str, Path]:
    """{easyr1_parquet, easyr1_arrow, verl_parquet, verl_arrow}: the four sets under `folder`."""
    import datasets

    image_list = datasets.List(datasets.Image())
    easyr1 = datasets.Dataset.from_dict(
        easyr1_rows(),
        features=datasets.Features(
            id=datasets.Value("string"),
            problem=datasets.Value("string"),
            answer=datasets.Value("string"),
            images=image_list,
        ),
    )
    verl = datasets.Dataset.from_dict(verl_rows())
    verl = verl.cast_column("images", image_list)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "easyr1_parquet": folder / "geo3k_easyr1.parquet",
        "easyr1_arrow": folder / "geo3k_easyr1_arrow",
        "verl_parquet": folder / "geo3k_verl.parquet",
        "verl_arrow": folder / "geo3k_verl_arrow",
    }
    easyr1.to_parquet(str(paths["easyr1_parquet"]))
    easyr1.save_to_disk(str(paths["easyr1_arrow"]))
    verl.to_parquet(str(paths["verl_parquet"]))
    verl.save_to_disk(str(paths["verl_arrow"]))
    return paths
