"""Run start-up: the synthetic dataset follows every data option of the config."""

from __future__ import annotations

import re

from maye_jax.config.defaults import default_config
from maye_jax.config.settings import load_settings
from maye_jax.run import startup


def test_prepare_data_applies_the_synthetic_data_options(tmp_path):
    c = default_config()
    c.model.tiny_family = "qwen2_vl"
    c.seed = 5  # the run seed does not change the data
    c.data.synth_dir = str(tmp_path / "a")
    c.data.synth_num_train, c.data.synth_num_validation, c.data.synth_num_test = 12, 3, 3
    c.data.synth_image_size = 40
    c.data.synth_max_number = 3
    c.data.synth_solution_style = "short"
    data = startup.prepare_data(load_settings(c, kind="sft"))
    assert [len(data[s]) for s in ("train", "validation", "test")] == [12, 3, 3]
    for record in data["train"]:
        sides = [int(n) for n in re.findall(r"= (\d+)", record.question)]
        assert sides and max(sides) <= 4, record.question  # +1 keeps triangle areas integral
        assert "Therefore" not in record.solution
    c.seed = 6
    c.data.synth_dir = str(tmp_path / "b")
    again = startup.prepare_data(load_settings(c, kind="sft"))
    assert [r.question for r in again["train"]] == [r.question for r in data["train"]]
