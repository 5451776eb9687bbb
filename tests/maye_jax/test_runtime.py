"""Run start-up: the synthetic dataset follows every data option of the config."""

from __future__ import annotations

import re

from maye_jax import runtime
from maye_jax.defaults import default_config


def test_prepare_data_applies_the_synthetic_data_options(tmp_path):
    c = default_config()
    c.seed = 5  # the run seed does not change the data
    c.data.synth_dir = str(tmp_path / "a")
    c.data.synth_num_train, c.data.synth_num_validation, c.data.synth_num_test = 12, 3, 3
    c.data.synth_image_size = 40
    c.data.synth_max_number = 3
    c.data.synth_solution_style = "short"
    data = runtime.prepare_data(c)
    assert [len(data[s]) for s in ("train", "validation", "test")] == [12, 3, 3]
    for record in data["train"]:
        sides = [int(n) for n in re.findall(r"= (\d+)", record.question)]
        assert sides and max(sides) <= 4, record.question  # +1 keeps triangle areas integral
        assert "Therefore" not in record.solution
    c.seed = 6
    c.data.synth_dir = str(tmp_path / "b")
    again = runtime.prepare_data(c)
    assert [r.question for r in again["train"]] == [r.question for r in data["train"]]
