"""The typed update batch: row selection, the micro-batch split, padding rows for the mesh, the
three forms the builder makes (frozen tower, training tower, text only), and the step's
one-transfer check of every update's finiteness."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from maye_jax.data.sequences import make_sequence_batch
from maye_jax.models.configs import ModelConfig
from maye_jax.sharding.mesh import make_mesh
from maye_jax.tiny import tiny_hf_config
from maye_jax.training.batch import MinibatchMaker, TowerImages, UpdateBatch, rows_from_sequences
from maye_jax.training.update import StepUpdates

ROWS, PROMPT, RESPONSE = 6, 4, 3


def host_batch(rows: int = ROWS) -> UpdateBatch:
    """Row r holds the value r everywhere, so every field shows which rows it came from."""
    index = np.arange(rows)
    column = lambda width, dtype=np.int32: np.repeat(index[:, None], width, 1).astype(dtype)  # noqa: E731
    return UpdateBatch(
        input_ids=column(PROMPT + RESPONSE),
        attention_mask=np.ones((rows, PROMPT + RESPONSE), np.int32),
        positions=np.repeat(column(PROMPT + RESPONSE)[:, None], 3, axis=1),
        response_mask=np.ones((rows, RESPONSE), np.int32),
        advantages=column(RESPONSE, np.float32),
        logprobs_old=column(RESPONSE, np.float32),
        image_feature_index=column(PROMPT + RESPONSE),
    )


def test_take_and_split_keep_every_field_row_aligned():
    batch = host_batch()
    assert not batch.is_split and batch.num_rows == ROWS and batch.response_len == RESPONSE
    picked = batch.take([4, 1, 5, 0])
    for name, value in picked.row_fields().items():
        assert value.shape[0] == 4, name
        if name not in ("attention_mask", "response_mask"):  # the row-numbered fields
            np.testing.assert_array_equal(value.reshape(4, -1)[:, 0], [4, 1, 5, 0], name)
    split = picked.split(2)
    assert split.is_split and split.num_rows == 2 and split.row_axis == 1
    assert split.positions.shape == (2, 2, 3, PROMPT + RESPONSE)  # rows before the M-RoPE axis
    np.testing.assert_array_equal(split.advantages[:, :, 0], [[4, 1], [5, 0]])
    assert split.ref_logprobs is None and split.vision is None
    with pytest.raises(ValueError, match="do not split into 4"):
        batch.split(4)
    with pytest.raises(ValueError, match="unsplit"):
        split.take([0])


def test_padding_rows_are_empty_and_only_added_when_needed():
    split = host_batch().split(2)  # 3 rows per micro-batch
    assert split.pad_micro_rows(3) is split
    padded = split.pad_micro_rows(4)
    assert padded.num_rows == 4
    np.testing.assert_array_equal(padded.attention_mask[:, 3], 0)
    np.testing.assert_array_equal(padded.response_mask[:, 3], 0)
    np.testing.assert_array_equal(padded.image_feature_index[:, 3], -1)
    np.testing.assert_array_equal(padded.advantages[:, :3], split.advantages)
    with pytest.raises(ValueError, match="split batch"):
        host_batch().pad_micro_rows(4)


def test_rows_shard_over_the_data_axes_and_a_remainder_is_refused():
    from maye_jax.sharding.layout import row_sharding

    mesh = make_mesh(fsdp=4, dp=2)
    split = host_batch(8).split(2)  # 4 rows per micro-batch over 8 devices
    with pytest.raises(ValueError, match="pad them"):
        row_sharding(mesh, split.input_ids.shape, 1)
    padded = split.pad_micro_rows(8)
    spec = row_sharding(mesh, padded.input_ids.shape, 1).spec
    assert tuple(spec) == (None, ("dp", "fsdp"), None)
    vision = {"patches": np.zeros((2, 1, 16, 1176), np.float32)}
    with_vision = padded.with_vision(vision)
    with pytest.raises(ValueError, match="lead with"):
        padded.with_vision({"patches": np.zeros((3, 1, 16, 1176), np.float32)})

    class FakeLayout:
        def __init__(self, mesh):
            from jax.sharding import NamedSharding, PartitionSpec

            self.mesh, self.replicated = mesh, NamedSharding(mesh, PartitionSpec())

    shardings = with_vision.shardings(FakeLayout(mesh))
    assert tuple(shardings.positions.spec) == (None, ("dp", "fsdp"), None, None)
    assert shardings.vision["patches"].spec == FakeLayout(mesh).replicated.spec


@pytest.fixture(scope="module")
def sequences():
    """A SequenceBatch of 4 rows: two with a 4x4 image (4 image tokens), two text-only."""
    config = ModelConfig.from_hf(tiny_hf_config("qwen2_vl", vocab_size=256))
    rng = np.random.default_rng(0)
    prompts = []
    for row in range(4):
        ids = list(rng.integers(0, 200, 3))
        prompt = {}
        if row % 2 == 0:
            ids += [config.vision_start_token_id, *[config.image_token_id] * 4]
            ids += [config.vision_end_token_id]
            prompt["pixel_values"] = rng.standard_normal((16, config.vision.patch_dim), np.float32)
            prompt["image_grid_thw"] = np.array([[1, 4, 4]])
        prompt["input_ids"] = np.array(ids)
        prompts.append(prompt)
    responses = [list(rng.integers(0, 200, n)) for n in (2, 3, 1, 2)]
    batch = make_sequence_batch(prompts, responses, config, pad_id=0, length_multiple=8)
    return config, prompts, batch


def test_the_builder_makes_the_three_forms(sequences):
    from maye_jax.rl.trajectory import prompt_images

    config, prompts, batch = sequences
    shape = batch.response_mask.shape
    per_token = dict(advantages=np.ones(shape, np.float32), logprobs_old=np.zeros(shape))
    # frozen tower: each row carries its own features; 8 image features in all
    features = jnp.arange(8 * 5, dtype=jnp.float32).reshape(8, 5)
    frozen = MinibatchMaker.build(batch, per_token=per_token, features=features)(None, 2)
    assert frozen.image_features.shape == (2, 2, 4, 5) and frozen.vision is None
    index = np.asarray(frozen.image_feature_index[0, 0])
    gathered = np.asarray(frozen.image_features[0, 0])[index[index >= 0]]
    np.testing.assert_array_equal(gathered, np.asarray(features)[:4])  # row 0's image
    # training tower: packed images per micro-batch, no precomputed features
    tower = TowerImages([prompt_images(p) for p in prompts], np.arange(4), config.vision)
    training = MinibatchMaker.build(batch, per_token=per_token, tower=tower)([2, 0, 1, 3], 2)
    assert training.image_features is None and training.vision["patches"].shape[0] == 2
    # text only: no image field at all
    text_rows = rows_from_sequences(batch, **per_token)
    text = MinibatchMaker(text_rows.take([1, 3]))(None, 1)
    assert text.image_feature_index is None and text.image_features is None
    with pytest.raises(ValueError, match="frozen tower's features"):
        MinibatchMaker.build(batch, per_token=per_token)


def test_step_updates_fetch_once_and_name_the_first_bad_update():
    updates = StepUpdates("5", name_updates=True)
    for loss, grad_norm in ((1.0, 2.0), (3.0, 4.0)):
        metrics = {"loss/total": jnp.float32(loss), "grad_norm": jnp.float32(grad_norm)}
        updates.add(metrics, jnp.bool_(True))
    assert len(updates) == 2
    assert updates.mean_metrics() == {"loss/total": 2.0, "grad_norm": 3.0}
    updates.add(
        {"loss/total": jnp.float32(np.nan), "grad_norm": jnp.float32(1.0)}, jnp.bool_(False)
    )
    updates.add(
        {"loss/total": jnp.float32(np.inf), "grad_norm": jnp.float32(1.0)}, jnp.bool_(False)
    )
    with pytest.raises(FloatingPointError, match=r"update step 5 \(update 2\)"):
        updates.mean_metrics()
