"""A run folder holds one run: a new run into another run's folder is refused (or, asked, the
other run deleted), a resume under numbers-changing options or changed data is refused naming
what differs, and a bad config is refused before any model, mesh or data work."""

from __future__ import annotations

import json

import pytest

from maye_jax.config.settings import ConfigError, load_settings
from maye_jax.run.folder import (
    RunFolderError,
    check_fingerprint,
    prepare_run_folder,
    resume_differences,
)
from tests.maye_jax.test_train import tiny_config


def settings_of(config):
    return load_settings(config, kind="rl")


def fake_run(folder, config):
    """What a started run leaves: run.json (with its config), metrics, a checkpoint folder."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"kind": "rl", "config": config.to_dict(), "fingerprint": {}}
    (folder / "run.json").write_text(json.dumps(record, default=str))
    (folder / "metrics.jsonl").write_text("")
    (folder / "checkpoints" / "1").mkdir(parents=True)


def test_a_new_run_into_another_runs_folder_is_refused_or_overwritten(tmp_path):
    config = tiny_config(tmp_path)
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)  # the run's own synthetic data is not "another run"
    (out / "data" / "keep.txt").write_text("x")
    prepare_run_folder(settings_of(config))  # only data/: accepted
    fake_run(out, config)
    with pytest.raises(RunFolderError) as refused:
        prepare_run_folder(settings_of(config))
    message = str(refused.value)
    assert str(out) in message and "--config.overwrite=True" in message
    assert "--config.resume=True" in message
    config.overwrite = True
    prepare_run_folder(settings_of(config))
    assert sorted(p.name for p in out.iterdir()) == ["data"]
    assert (out / "data" / "keep.txt").read_text() == "x"


def test_resume_refuses_options_that_change_the_numbers_and_allows_the_rest(tmp_path):
    config = tiny_config(tmp_path)
    fake_run(tmp_path / "run", config)
    config.resume = True
    config.logging.progress_bar = True  # allowed: no number changes
    config.checkpoint.keep = 5
    config.eval.splits = ("validation",)
    config.rollout.timeout_s = 30.0
    prepare_run_folder(settings_of(config))
    config.rl.batch_size = 4
    config.optim.learning_rate = 5e-3
    with pytest.raises(RunFolderError) as refused:
        prepare_run_folder(settings_of(config))
    message = str(refused.value)
    assert "config.rl.batch_size: 8 in the run, 4 now" in message
    assert "config.optim.learning_rate: 0.001 in the run, 0.005 now" in message
    assert "progress_bar" not in message and "checkpoint.keep" not in message


def test_resume_difference_against_an_older_record_uses_the_defaults():
    """A key the run's record lacks (an option added later) compares as its default."""
    from maye_jax.config.defaults import default_config

    now = default_config().to_dict()
    recorded = default_config().to_dict()
    del recorded["rollout"]["sampler_batch_bucket"]
    assert resume_differences(recorded, now) == []
    now["rollout"]["sampler_batch_bucket"] = 16
    assert resume_differences(recorded, now) == [
        "config.rollout.sampler_batch_bucket: 8 in the run, 16 now"
    ]


def test_resume_refuses_changed_data(tmp_path):
    config = tiny_config(tmp_path)
    train = tmp_path / "train.jsonl"
    train.write_text('{"question": "q", "answer": "1", "solution": "\\\\boxed{1}"}\n')
    files = {"train": str(train)}
    fingerprint = check_fingerprint(settings_of(config), files)
    (tmp_path / "run").mkdir()
    record = {"config": config.to_dict(), "fingerprint": fingerprint}
    (tmp_path / "run" / "run.json").write_text(json.dumps(record, default=str))
    config.resume = True
    assert check_fingerprint(settings_of(config), files) == fingerprint
    train.write_text('{"question": "q2", "answer": "1", "solution": "\\\\boxed{1}"}\n')
    with pytest.raises(RunFolderError, match="the data of the run .* changed"):
        check_fingerprint(settings_of(config), files)


def test_resume_refuses_a_changed_parquet_file_or_save_to_disk_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    config = tiny_config(tmp_path)
    parquet, folder = tmp_path / "train.parquet", tmp_path / "train_arrow"
    folder.mkdir()
    pq.write_table(pa.table({"problem": ["q"], "answer": ["1"]}), parquet)
    (folder / "state.json").write_text("{}")
    (folder / "data-00000-of-00001.arrow").write_bytes(b"rows")
    for path, change in (
        (parquet, lambda: pq.write_table(pa.table({"problem": ["q2"], "answer": ["1"]}), parquet)),
        (folder, lambda: (folder / "data-00000-of-00001.arrow").write_bytes(b"rows2")),
    ):
        files = {"train": str(path)}
        config.resume = False
        fingerprint = check_fingerprint(settings_of(config), files)
        (tmp_path / "run").mkdir(exist_ok=True)
        record = {"config": config.to_dict(), "fingerprint": fingerprint}
        (tmp_path / "run" / "run.json").write_text(json.dumps(record, default=str))
        config.resume = True
        assert check_fingerprint(settings_of(config), files) == fingerprint
        change()
        with pytest.raises(RunFolderError, match="the data of the run .* changed"):
            check_fingerprint(settings_of(config), files)


def test_a_bad_config_is_refused_before_any_work(tmp_path, monkeypatch):
    """The model loader, the mesh and the data generator raise if reached: the config error
    comes first, and the output folder is not even created."""
    from maye_jax.run import startup
    from maye_jax.train import run_rl
    from maye_jax.training import policy

    def reached(*args, **kwargs):
        raise AssertionError("expensive work started before the config was checked")

    monkeypatch.setattr(policy, "load_sharded_model", reached)
    monkeypatch.setattr(startup, "build_mesh", reached)
    monkeypatch.setattr(startup, "data_files", reached)
    config = tiny_config(tmp_path)
    config.rl.batch_size = -8
    config.rollout.temperature = -1.0
    config.data.synth_dir = None
    config.data.train_file = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError) as refused:
        run_rl(config)
    problems = refused.value.problems
    assert "config.rl.batch_size: -8: must be > 0" in problems
    assert "config.rollout.temperature: -1.0: must be > 0" in problems
    assert not (tmp_path / "run").exists()
    config.rl.batch_size, config.rollout.temperature = 8, 1.0
    with pytest.raises(ConfigError, match=r"config.data.train_file: .*missing.jsonl: no such file"):
        run_rl(config)
