"""Data in the formats users bring: parquet files and `datasets` `save_to_disk` folders with
embedded PNG / JPEG bytes, in the geo3k_easyr1 and geo3k_verl layouts (tests/byod_data.py writes
them with `datasets`): the records read, the images' headers only until a batch decodes them,
each image placed at its marker, and every problem named by file, row and field."""

from __future__ import annotations

import io
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from maye_jax.data import images
from maye_jax.data.layouts import LAYOUTS, resolve_layout, with_layout_defaults
from maye_jax.data.processor import load_processor
from maye_jax.data.records import DataError, read_records
from maye_jax.data.tokenizer import IMAGE_PAD_ID
from tests.byod_data import image_bytes, problems, write_sets

VISION_START = 151652


@pytest.fixture(scope="module")
def sets(module_scratch):
    return write_sets(module_scratch("formats"))


@pytest.fixture(scope="module")
def processor():
    return load_processor()


@pytest.mark.parametrize("name", ["easyr1_parquet", "easyr1_arrow", "verl_parquet", "verl_arrow"])
def test_every_format_and_layout_reads_the_records_with_headers_only(sets, name):
    layout = LAYOUTS["geo3k_easyr1" if name.startswith("easyr1") else "geo3k_verl"]
    decoded = images.decode_count()
    records = read_records(sets[name], layout)
    assert images.decode_count() == decoded  # preparation reads headers, decodes no pixels
    expected = problems()
    assert len(records) == 4
    for index, (record, want) in enumerate(zip(records, expected)):
        assert record.id == (want["id"] if layout.name == "geo3k_easyr1" else str(index))
        assert record.question.startswith(want["problem"])
        if layout.name == "geo3k_verl":  # the user turn as given: it holds its instruction
            assert record.question.endswith("Put the final answer in \\boxed{}.")
        assert record.answer == want["answer"] and record.solution == ""
        assert record.reward_solution == ""  # ground truth: the whole answer field
        assert not record.images_first  # each image goes at its marker
        sizes = [Image.open(io.BytesIO(b)).size for b in want["images"]]
        assert record.image_sizes() == sizes
        assert record.source == f"{sets[name]}:row {index + 1}"
    assert [i.format + "/" + i.mode for i in records[1].images] == ["JPEG/CMYK"]
    assert [i.mode for i in records[2].images] == ["RGB", "RGBA"]
    assert images.decode_count() == decoded
    assert [image.size for image in records[2].load_images()] == records[2].image_sizes()
    assert images.decode_count() == decoded + 2


def test_layout_presets_and_overrides():
    def data(**given):
        fields = dict.fromkeys(
            ("question_key", "answer_key", "solution_key", "images_key", "id_key"), None
        )
        fields.update(ground_truth=None, prompt_template=None, layout="maye")
        fields.update(given)
        return types.SimpleNamespace(**fields)

    verl = resolve_layout(data(layout="geo3k_verl"))
    assert (verl.question_key, verl.answer_key, verl.prompt_template) == (
        "prompt",
        "reward_model.ground_truth",
        "plain",
    )
    assert (verl.ground_truth, verl.solution_key) == ("answer", None)
    maye = resolve_layout(data(answer_key="extra.gold", ground_truth="answer"))
    assert (maye.answer_key, maye.ground_truth, maye.question_key) == (
        "extra.gold",
        "answer",
        "question",
    )
    from maye_jax.config.options import DataSettings

    filled = with_layout_defaults(DataSettings(layout="geo3k_easyr1"))
    assert (filled.question_key, filled.images_key, filled.prompt_template) == (
        "problem",
        "images",
        "maye",
    )


def test_two_images_go_at_their_markers_as_transformers_places_them(sets, processor):
    record = read_records(sets["easyr1_parquet"], LAYOUTS["geo3k_easyr1"])[2]
    ours = processor.encode_record(record, "")
    # transformers: the chat template over the text pieces and image items in marker order,
    # its PIL image processor on the images as the data set gives them, each image's pad
    # repeated once per merged patch
    pieces = record.question.split("<image>")
    content = [{"type": "text", "text": pieces[0]}]
    for piece in pieces[1:]:
        content += [{"type": "image"}, {"type": "text", "text": piece}]
    content = [item for item in content if item.get("text", "x")]
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    hf_images = [Image.open(io.BytesIO(b)) for b in problems()[2]["images"]]
    hf = Qwen2VLImageProcessorPil(min_pixels=processor.min_pixels, max_pixels=processor.max_pixels)(
        images=hf_images
    )
    counts = iter(np.prod(hf["image_grid_thw"], axis=1) // 4)
    text = text.replace("<|image_pad|>", "\0")
    while "\0" in text:
        text = text.replace("\0", "<|image_pad|>" * int(next(counts)), 1)
    expected_ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(ours["input_ids"], expected_ids)
    np.testing.assert_array_equal(ours["image_grid_thw"], hf["image_grid_thw"])
    np.testing.assert_array_equal(ours["pixel_values"], hf["pixel_values"])
    ids = list(ours["input_ids"])
    first, second = [i for i, t in enumerate(ids) if t == VISION_START]
    assert "Compare " in processor.tokenizer.decode(ids[first - 3 : first])
    assert " with " in processor.tokenizer.decode(ids[first:second])
    assert ids.count(IMAGE_PAD_ID) == int(np.prod(hf["image_grid_thw"], axis=1).sum() // 4)


def _write_parquet(path, columns: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def test_data_check_names_each_problem_by_file_row_and_field(sets, tmp_path):
    png = image_bytes(0, (28, 28))
    bad = tmp_path / "bad.parquet"
    _write_parquet(
        bad,
        {
            "problem": ["<image>ok", "<image>bad bytes", "<image><image>two markers", "x"],
            "answer": ["1", "2", "3", "4"],
            "images": [
                [{"bytes": png, "path": None}],
                [{"bytes": b"not an image", "path": None}],
                [{"bytes": png, "path": None}],
                [],
            ],
        },
    )
    truncated = tmp_path / "truncated.parquet"  # a good header over missing pixels
    _write_parquet(
        truncated,
        {"problem": ["<image>q"], "answer": ["1"], "images": [[{"bytes": png[:80], "path": None}]]},
    )
    wrong = tmp_path / "wrong.parquet"
    _write_parquet(wrong, {"question": ["q"], "solution": ["s"]})
    empty = tmp_path / "empty.parquet"
    _write_parquet(empty, {"problem": [], "answer": []})
    result = subprocess.run(
        [sys.executable, "-m", "maye_jax.data", "check", "--layout=geo3k_easyr1"]
        + [str(p) for p in (bad, truncated, wrong, empty, sets["easyr1_arrow"])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines == [
        f"{bad}:row 2: image: not an image (cannot identify image file <_io.BytesIO object at "
        + lines[0].split(" at ")[1],
        f"{bad}:row 3: the question has 2 <image> marker(s) but the record has 1 image(s); "
        "each image goes at its marker",
        f"{truncated}:row 1: image: the image does not decode (" + lines[2].split(" (", 1)[1],
        f"{wrong}:0: no column 'problem', 'answer'; the columns are question, solution (set "
        "data.layout or the data.*_key options)",
        f"{empty}:0: no records",
    ]
    assert f"{bad}: 2 valid record(s)" in result.stderr
    assert f"{sets['easyr1_arrow']}: 4 valid record(s)" in result.stderr
    with pytest.raises(DataError, match=r"bad.parquet:row 2: image: not an image"):
        read_records(bad, LAYOUTS["geo3k_easyr1"])
    kept = read_records(bad, LAYOUTS["geo3k_easyr1"], on_error="skip")
    assert [r.source.rsplit(":", 1)[1] for r in kept] == ["row 1", "row 4"]
