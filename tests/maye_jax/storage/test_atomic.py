"""Whole or absent: a folder written by `atomic_folder` and a file written by
`atomic_write_text` appear under their names only when complete, and a failure part-way
(a kill, a full disk) leaves the previous version as it was; model folders (Orbax and HF)
are written that way."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from maye_jax.models.hf_mapping import iter_hf_tensors
from maye_jax.storage import atomic, model_folders
from maye_jax.storage.atomic import append_line, atomic_folder, atomic_write_text, open_for_append


class Full(OSError):
    def __init__(self):
        super().__init__(errno.ENOSPC, "No space left on device")


def test_atomic_folder_publishes_only_a_complete_folder(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(Full):
        with atomic_folder(target) as folder:
            assert folder.name == "model.partial" and folder.is_dir()
            (folder / "config.json").write_text("{}")
            assert not target.exists()
            raise Full
    assert not target.exists() and not (tmp_path / "model.partial").exists()

    (tmp_path / "model.partial").mkdir()  # left by a killed writer: removed by the next one
    (tmp_path / "model.partial" / "junk").write_text("x")
    with atomic_folder(target) as folder:
        (folder / "weights").write_text("v1")
    assert sorted(os.listdir(target)) == ["weights"]

    with pytest.raises(Full):  # a failed rewrite keeps the previous folder whole
        with atomic_folder(target) as folder:
            (folder / "weights").write_text("v2 (half)")
            raise Full
    assert (target / "weights").read_text() == "v1"
    with atomic_folder(target) as folder:
        (folder / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_atomic_write_text_keeps_the_old_content_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    atomic_write_text(path, "old\n")
    inode = path.stat().st_ino
    real_replace = os.replace

    def killed_before_the_rename(source, destination):
        raise Full

    monkeypatch.setattr(atomic.os, "replace", killed_before_the_rename)
    with pytest.raises(Full):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n"
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and path.stat().st_ino != inode  # renamed into place
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]  # no temporary file left


def test_append_line_writes_whole_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    with open_for_append(path) as handle:
        append_line(handle, '{"a": 1}')
        append_line(handle, '{"b": 2}')
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n'


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from maye_jax.tiny import tiny_hf_model

    path = tmp_path_factory.mktemp("hf")
    tiny_hf_model("qwen2_vl", seed=1).save_pretrained(str(path))
    return model_folders.load_model(path)


@pytest.mark.parametrize("kind", ["orbax", "hf"])
def test_model_folders_are_replaced_only_by_complete_ones(tiny_model, tmp_path, monkeypatch, kind):
    model, hf_config = tiny_model
    out = tmp_path / "out"

    def save():
        if kind == "orbax":
            return model_folders.save_orbax(out, model, hf_config)
        return model_folders.export_hf(model, hf_config, out)

    save()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def full_disk(*args, **kwargs):  # the config is written after the weights
        raise Full

    monkeypatch.setattr(type(hf_config), "save_pretrained", full_disk)
    with pytest.raises(Full):
        save()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["out"]
    monkeypatch.undo()
    reloaded, _ = model_folders.load_model(out)
    expected = dict(iter_hf_tensors(model))
    for name, value in iter_hf_tensors(reloaded):
        np.testing.assert_array_equal(value, expected[name], name)
