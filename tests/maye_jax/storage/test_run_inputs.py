"""What a model folder carries of the run that wrote it (storage/run_inputs.py): pixel limits
that transformers' own image processor reads back as the run's token count, and the run file
`evaluate` and `score` take their defaults from."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from maye_jax.config.defaults import default_config
from maye_jax.config.settings import load_settings
from maye_jax.data.processor import VLProcessor, load_processor
from maye_jax.storage.run_inputs import RUN_FILE, RunInputs, model_defaults


def test_transformers_reads_the_runs_pixel_limits_and_the_run_file_its_settings(tmp_path):
    c = default_config()
    c.model.tiny_family = "qwen2_vl"
    c.data.min_pixels, c.data.max_pixels = 3136, 4 * 3136
    c.data.prompt_template = "maye"
    c.seed = 7
    c.model.dtype = "float32"
    c.eval.max_tokens = 12
    settings = load_settings(c, kind="rl", check_files=False)
    folder = tmp_path / "model"
    folder.mkdir()
    load_processor(family="qwen2_vl").save_pretrained(folder)  # the default limits, as written
    RunInputs.of_run(settings, eval_step=5).write(folder)

    from transformers import AutoImageProcessor

    image = Image.fromarray(np.zeros((200, 300, 3), np.uint8))  # 300 x 200 pixels
    theirs = AutoImageProcessor.from_pretrained(str(folder))(images=[image], return_tensors="np")
    their_tokens = int(np.prod(theirs["image_grid_thw"][0])) // 4  # merge_size 2
    run_tokens = VLProcessor(tokenizer=None, min_pixels=3136, max_pixels=4 * 3136)
    assert their_tokens == run_tokens.image_tokens_of_size(300, 200) == 12
    default_tokens = VLProcessor(tokenizer=None).image_tokens_of_size(300, 200)
    assert default_tokens == 77  # what a folder without the run's limits gives: 6x more
    # our own reader of the folder agrees
    assert load_processor(folder, family="qwen2_vl").image_tokens_of_size(300, 200) == 12

    written = json.loads((folder / "preprocessor_config.json").read_text())
    assert written["size"] == {"shortest_edge": 3136, "longest_edge": 4 * 3136}
    assert (written["min_pixels"], written["max_pixels"]) == (3136, 4 * 3136)
    assert written["image_mean"] == list(VLProcessor(tokenizer=None).image_mean)  # kept
    assert (
        model_defaults(folder)
        == json.loads((folder / RUN_FILE).read_text())
        == {
            "prompt_template": "maye",
            "seed": 7,
            "eval_step": 5,
            "dtype": "float32",
            "eval_max_tokens": 12,
        }
    )
    assert model_defaults(tmp_path) == {}  # a folder no run wrote
