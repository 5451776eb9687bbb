"""The policy update with Qwen3-VL: DeepStack levels reach the decoder the same way whether the
layers are scanned or looped and whether the tower's features come precomputed per row or from
a tower that trains inside the step; a text-only micro-batch gives the tower (its mergers and
DeepStack mergers included) exactly zero gradient.

A tiny Qwen3-VL (vocab 256, 3 layers, a 3-block tower with DeepStack after blocks 0 and 2), fp32,
8 rows of which half have an image.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maye_jax.data.sequences import make_sequence_batch, score_batch, tower_features
from maye_jax.models.configs import ModelConfig
from maye_jax.models.qwen_vl import build_model
from maye_jax.rl.losses import LossConfig
from maye_jax.rl.trajectory import prompt_images
from maye_jax.sharding.mesh import make_mesh
from maye_jax.tiny import tiny_hf_config
from maye_jax.training.batch import MinibatchMaker, TowerImages, UpdateBatch, per_row_image_features
from maye_jax.training.optim import OptimizerConfig, make_optimizer
from maye_jax.training.train_state import TrainableConfig, create_train_state
from maye_jax.training.update import UpdateConfig, accumulate_gradients

ROWS = 8
CONFIG = UpdateConfig(loss=LossConfig(kl_loss_coeff=0.01), logprob_chunk_size=8)
TOWER = TrainableConfig(train_vit=True, train_connector=True)


def host(tree):
    return jax.tree.map(lambda v: np.array(jax.device_get(v)), tree)


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def assert_trees_close(actual: dict, expected: dict, tolerance: float, what: str):
    assert actual.keys() == expected.keys()
    errors = {n: relative_error(actual[n], expected[n]) for n in expected}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tolerance, f"{what}: {worst} relative error {errors[worst]:.2e}"


def gradient_fn(model, trainable=TrainableConfig(), config=CONFIG):  # noqa: B008
    optimizer, _ = make_optimizer(OptimizerConfig(), total_updates=10)
    model_def, state, frozen, layout = create_train_state(
        model, make_mesh(fsdp=1), optimizer, trainable=trainable, frozen_dtype=jnp.float32
    )
    grads = jax.jit(
        functools.partial(accumulate_gradients, model_def=model_def, config=config, layout=layout)
    )
    return lambda minibatch: host(grads(state.params, frozen, minibatch)[0])


@pytest.fixture(scope="module")
def data():
    config = ModelConfig.from_hf(
        tiny_hf_config("qwen3_vl", vocab_size=256, num_layers=3, vision_depth=3)
    )
    assert config.vision.deepstack_visual_indexes == (0, 2)
    model = build_model(config, seed=3)
    rng = np.random.default_rng(0)

    def prompt(with_image: bool) -> dict:
        ids = list(rng.integers(0, 200, 3))
        out = {}
        if with_image:
            ids += [config.vision_start_token_id, *[config.image_token_id] * 6]
            ids += [config.vision_end_token_id]
            out["pixel_values"] = rng.standard_normal((24, config.vision.patch_dim), np.float32)
            out["image_grid_thw"] = np.array([[1, 4, 6]])
        out["input_ids"] = np.array(ids + list(rng.integers(0, 200, 2)))
        return out

    prompts = [prompt(row % 2 == 0) for row in range(ROWS)]
    responses = [list(rng.integers(0, 200, n)) for n in (3, 8, 5, 1, 7, 2, 8, 4)]
    batch = make_sequence_batch(prompts, responses, config, pad_id=0, length_multiple=8)
    arrays = batch.device_arrays()
    features = tower_features(model, arrays["vision"])  # [N, 3 * D]: main + 2 DeepStack levels
    assert features.shape[-1] == 3 * config.text.hidden_size
    logprobs = score_batch(model, arrays, prompt_len=batch.prompt_len)
    noise = lambda: jnp.asarray(rng.normal(0, 0.1, logprobs.shape), jnp.float32)  # noqa: E731
    per_row, local_index = per_row_image_features(
        features, arrays["image_feature_index"], features_per_row=8
    )
    rows = UpdateBatch(
        input_ids=arrays["input_ids"],
        attention_mask=arrays["attention_mask"],
        positions=jnp.moveaxis(arrays["positions"], 0, 1),
        response_mask=arrays["response_mask"],
        advantages=jnp.asarray(rng.standard_normal(logprobs.shape), jnp.float32),
        logprobs_old=logprobs + noise(),
        ref_logprobs=logprobs + noise(),
        image_feature_index=local_index,
        image_features=per_row,
    )
    in_step = replace(rows, image_feature_index=arrays["image_feature_index"], image_features=None)
    tower = TowerImages([prompt_images(p) for p in prompts], np.arange(ROWS), config.vision)
    # the reference: the model's own layer loop on the precomputed features
    loop = gradient_fn(model, config=replace(CONFIG, scan_layers=False))(rows.split(2))
    return dict(model=model, rows=rows, in_step=in_step, tower=tower, loop_grads=loop)


def test_scanned_layers_add_deepstack_like_the_model_loop(data):
    """The layer scan, which adds the DeepStack levels inside it, gives the gradients of the
    model's own loop."""
    config = replace(CONFIG, scan_layers=True)
    grads = gradient_fn(data["model"], config=config)(data["rows"].split(2))
    assert_trees_close(grads, data["loop_grads"], 1e-5, "scanned gradient")


def test_tower_in_the_step_equals_precomputed_features(data):
    """The LLM's gradient is the same with the (1 + K) * D features precomputed per row as with
    the tower running inside the step on each micro-batch's images."""
    grads_in_step = gradient_fn(data["model"], TOWER)(
        MinibatchMaker(data["in_step"], data["tower"])(None, 2)
    )
    precomputed = data["loop_grads"]
    llm = {n: grads_in_step[n] for n in precomputed}
    assert_trees_close(llm, precomputed, 1e-5, "LLM gradient, tower in the step")
    tower = {n: v for n, v in grads_in_step.items() if n.startswith("visual.")}
    deepstack = [n for n in tower if n.startswith("visual.deepstack_merger_list.")]
    assert deepstack and all(np.abs(tower[n]).max() > 0 for n in tower)


def test_text_only_micro_batch_gives_the_tower_zero_gradient(data):
    """Micro-batches of the text-only rows: the tower still runs (on padding slots, the same
    program as any step) and every tower gradient, merger and DeepStack mergers included, is
    exactly zero; the LLM's is not."""
    text_rows = np.arange(1, ROWS, 2)
    minibatch = MinibatchMaker(data["in_step"], data["tower"])(text_rows, 2)
    assert np.all(np.asarray(minibatch.vision["full_segment_ids"]) == -1)
    grads = gradient_fn(data["model"], TOWER)(minibatch)
    tower = [n for n in grads if n.startswith("visual.")]
    assert any(n.startswith("visual.deepstack_merger_list.") for n in tower)
    assert all(np.all(grads[n] == 0) for n in tower)
    assert all(np.abs(grads[n]).max() > 0 for n in grads if n.startswith("language_model.layers."))


def test_padded_parameters_over_7_devices_give_the_gradients_of_one_device(data):
    """Over 7 devices no dimension of the tiny model divides, so every matrix is stored padded
    with zeros (and sharded): the gradients equal one device's, the padding's gradient is
    exactly zero (so AdamW, whose moments start at zero, keeps the padding at zero), and the
    policy exports the unpadded tensors."""
    from maye_jax.models.hf_mapping import iter_hf_tensors
    from maye_jax.training.train_state import policy_model

    optimizer, _ = make_optimizer(OptimizerConfig(), total_updates=10)
    model_def, state, frozen, layout = create_train_state(
        data["model"], make_mesh(fsdp=7), optimizer, frozen_dtype=jnp.float32
    )
    kernel = "language_model.layers.0.mlp.up_proj.kernel"  # [64, 128] stored as [70, 128]
    assert state.params[kernel].shape == (70, 128) and layout.params[kernel].spec[0] == "fsdp"
    assert layout.report.trainable_replicated_fraction < 0.01
    grads = jax.jit(
        functools.partial(
            accumulate_gradients,
            model_def=model_def,
            config=replace(CONFIG, scan_layers=False),
            layout=layout,
        )
    )
    padded_grads = host(grads(state.params, frozen, data["rows"].split(2))[0])
    expected, params = data["loop_grads"], host(state.params)
    for name, value in padded_grads.items():
        region = tuple(slice(0, size) for size in expected[name].shape)
        outside = value.copy()
        outside[region] = 0
        assert np.all(outside == 0), name  # the padding's gradient
        padding = params[name].copy()
        padding[region] = 0
        assert np.all(padding == 0), name  # stored zeros
    unpadded = {
        n: v[tuple(slice(0, s) for s in expected[n].shape)] for n, v in padded_grads.items()
    }
    assert_trees_close(unpadded, expected, 1e-5, "gradients, padded over 7 devices")
    exported = dict(iter_hf_tensors(policy_model(model_def, state, frozen)))
    assert {n: v.shape for n, v in exported.items()} == {
        n: v.shape for n, v in iter_hf_tensors(data["model"])
    }
