"""MAYE jsonl validation: every problem reported as file:line, skip mode keeps the rest; images
are read by their headers only until a batch decodes them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from maye_jax.data import images
from maye_jax.data.records import DataError, epoch_order, read_records


@pytest.fixture
def dataset(tmp_path):
    Image.new("RGB", (30, 20), "red").save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    good = dict(id="1", question="<image>q", answer="2", solution="\\boxed{2}", image="ok.png")
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps(dict(good, id="3", image="missing.png")),
        json.dumps(dict(good, id="4", image="broken.png")),
        json.dumps({"id": "5", "question": "q", "solution": "\\boxed{1}"}),
        "",
        json.dumps(dict(id="7", question="text only", answer="1", solution="\\boxed{1}")),
        json.dumps(["a list"]),
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fail_mode_names_file_and_line(dataset):
    with pytest.raises(DataError, match=rf"{dataset}:2: invalid JSON"):
        read_records(dataset)


def test_skip_mode_keeps_valid_records(dataset, caplog):
    decoded = images.decode_count()
    records = read_records(dataset, on_error="skip")
    assert [r.id for r in records] == ["1", "7"]
    assert records[0].image_sizes() == [(30, 20)] and records[0].images[0].format == "PNG"
    assert images.decode_count() == decoded  # preparing read headers only
    assert [image.size for image in records[0].load_images()] == [(30, 20)]
    assert images.decode_count() == decoded + 1
    assert records[1].images == () and records[1].load_images() == []
    assert "skipped 5 invalid record(s), kept 2" in caplog.text


def test_check_cli_prints_every_problem(dataset):
    result = subprocess.run(
        [sys.executable, "-m", "maye_jax.data", "check", str(dataset)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    out = result.stdout
    assert f"{dataset}:2: invalid JSON" in out
    assert (
        f"{dataset}:3: image 'missing.png': image file {dataset.parent}/missing.png not found"
        in out
    )
    assert f"{dataset}:4: image 'broken.png': not an image (cannot identify image file" in out
    assert f"{dataset}:5: missing required field 'answer'" in out
    assert f"{dataset}:8: expected a JSON object" in out
    assert len(out.strip().splitlines()) == 5


def test_non_utf8_file_is_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"question": "ok", "answer": "1", "solution": "x"}\n\xff\xfe\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid UTF-8"):
        read_records(path)


def test_epoch_order_is_a_reproducible_permutation():
    a, b = epoch_order(10, seed=1, epoch=3), epoch_order(10, seed=1, epoch=3)
    assert sorted(a.tolist()) == list(range(10)) and a.tolist() == b.tolist()
    assert epoch_order(10, seed=1, epoch=4).tolist() != a.tolist()
