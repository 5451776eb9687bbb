"""Partition rules: indivisible dimensions (7B shapes over 7 devices) and the replication report."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from maye_jax.models.configs import ModelConfig
from maye_jax.models.qwen_vl import build_model
from maye_jax.sharding.mesh import make_mesh
from maye_jax.sharding.rules import (
    check_replication,
    replication_report,
    spec_for,
    storage_shape,
)
from maye_jax.tiny import preset_hf_config


def is_trainable(name: str) -> bool:
    return not name.startswith("visual.")  # the default: vision tower and merger frozen


def abstract_params(preset: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of a real-size model, built abstractly (no memory)."""
    model = build_model(ModelConfig.from_hf(preset_hf_config(preset)), abstract=True)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {
        ".".join(str(k) for k in path): (tuple(v.get_value().shape), np.dtype(np.float32))
        for path, v in flat
    }


@pytest.fixture(scope="module")
def mesh7():
    return make_mesh(fsdp=7)  # 7 of the 8 fake devices, as on the 8-GPU node


@pytest.mark.parametrize("preset", ["qwen2_vl_7b", "qwen2_5_vl_7b"])
def test_7b_over_7_devices(preset, mesh7):
    params = abstract_params(preset)
    specs = {name: spec_for(name, shape, mesh7) for name, (shape, _) in params.items()}
    for name, (shape, _) in params.items():  # every chosen axis divides its dimension
        for size, axis in zip(shape, specs[name]):
            assert axis is None or size % mesh7.shape[axis] == 0, (name, shape, specs[name])
    # The big LLM matrices are sharded on their 3584-wide dimension.
    assert specs["lm_head"] == PartitionSpec(None, "fsdp")  # vocab 152064 = 2^7 * 3^3 * 43
    assert specs["language_model.layers.0.mlp.up_proj.kernel"] == PartitionSpec("fsdp", None)
    assert specs["language_model.layers.0.mlp.down_proj.kernel"] == PartitionSpec(None, "fsdp")
    assert specs["language_model.layers.0.self_attn.k_proj.kernel"] == PartitionSpec("fsdp", None)

    report = replication_report(params, mesh7, is_trainable)
    # Left replicated among trainable tensors: only norms and biases, a tiny fraction.
    trainable_replicated = [n for n in report.replicated_names if is_trainable(n)]
    assert all(
        n.endswith(("layernorm.weight", "norm.weight", "bias")) for n in trainable_replicated
    )
    assert 0 < report.trainable_replicated_fraction < 0.001
    # Vision widths 1280 / 3420 / 5120 have no factor 7: the frozen tower stays replicated.
    assert "visual.blocks.0.attn.qkv.kernel" in report.replicated_names
    assert report.frozen_replicated_bytes > 0.95 * report.frozen_bytes
    assert "visual.merger.fc2.kernel" not in report.replicated_names  # [5120, 3584]: sharded
    check_replication(report, 0.05)
    with pytest.raises(ValueError, match="trainable"):
        check_replication(report, 0.0)
    # Training the tower too would replicate ~8% of the trainable state: refused by default.
    all_trainable = replication_report(params, mesh7, lambda name: True)
    assert all_trainable.trainable_replicated_fraction > 0.05
    with pytest.raises(ValueError, match="max_replicated_fraction"):
        check_replication(all_trainable)
    assert "GiB" in report.summary()


def test_indivisible_axis_moves_to_another_dimension():
    """tp=7 prefers the vocab (152064) and intermediate (18944) dims, neither divisible by 7."""
    mesh = make_mesh(tp=7)
    assert spec_for("lm_head", (152064, 3584), mesh) == PartitionSpec(None, "tp")
    up = "language_model.layers.0.mlp.up_proj.kernel"
    assert spec_for(up, (3584, 18944), mesh) == PartitionSpec("tp", None)
    # fsdp x tp: each axis keeps or finds its own dimension.
    mesh = make_mesh(fsdp=4, tp=2)
    assert spec_for(up, (3584, 18944), mesh) == PartitionSpec("fsdp", "tp")
    assert spec_for(up, (3584, 9), mesh) == PartitionSpec("fsdp", None)


def test_indivisible_shapes_place_without_error_and_are_reported(mesh7):
    up = "language_model.layers.0.mlp.up_proj.kernel"  # prefers ("fsdp", "tp")
    moved = np.arange(9 * 14, dtype=np.float32).reshape(9, 14)  # 9 % 7 != 0, 14 % 7 == 0
    spec = spec_for(up, moved.shape, mesh7)
    assert spec == PartitionSpec(None, "fsdp")
    placed = jax.device_put(moved, NamedSharding(mesh7, spec))
    assert placed.addressable_shards[0].data.shape == (9, 2)
    np.testing.assert_array_equal(np.asarray(placed), moved)

    down = "language_model.layers.0.mlp.down_proj.kernel"
    stuck = np.ones((9, 10), np.float32)  # no dimension divisible by 7
    assert spec_for(down, stuck.shape, mesh7) == PartitionSpec(None, None)
    jax.device_put(stuck, NamedSharding(mesh7, spec_for(down, stuck.shape, mesh7)))

    params = {up: (moved.shape, np.float32), down: (stuck.shape, np.float32)}
    report = replication_report(params, mesh7, lambda name: True)
    assert report.replicated_names == [down]
    assert report.trainable_replicated_bytes == stuck.nbytes
    assert report.trainable_bytes == stuck.nbytes + moved.nbytes
    with pytest.raises(ValueError, match="replicated"):
        check_replication(report, 0.05)


@pytest.mark.parametrize("preset", ["qwen3_vl_8b", "qwen3_vl_2b"])
def test_qwen3_vl_over_7_devices_is_stored_padded_and_sharded(preset, mesh7):
    """No width of Qwen3-VL has a factor 7 (4096, 12288, 151936, 1152, 4304, 2304, 2048, ...):
    by the rules alone nearly all of it would be replicated on each of the 7 devices. Stored
    padded along the dimension each rule prefers (by at most 6 rows), every matrix shards, the
    new ones included (position table, vision MLPs, mergers and DeepStack mergers)."""
    params = abstract_params(preset)
    logical = replication_report(params, mesh7, lambda name: True)
    assert logical.trainable_replicated_fraction > 0.95
    stored = {n: (storage_shape(n, s, mesh7), d) for n, (s, d) in params.items()}
    for name, (shape, _) in params.items():
        padded_shape = stored[name][0]
        assert all(0 <= p - s < 7 for p, s in zip(padded_shape, shape)), (name, padded_shape)
        spec = spec_for(name, padded_shape, mesh7)
        assert all(a is None or size % 7 == 0 for size, a in zip(padded_shape, spec)), name
        if len(shape) == 2:  # every matrix is split over the 7 devices
            assert "fsdp" in spec, (name, padded_shape, spec)
    hidden = params["language_model.norm.weight"][0][0]
    up = "language_model.layers.0.mlp.up_proj.kernel"
    assert stored[up][0] == (-(-hidden // 7) * 7, params[up][0][1])
    assert spec_for(up, stored[up][0], mesh7) == PartitionSpec("fsdp", None)
    for name in (
        "visual.pos_embed.weight",
        "visual.blocks.0.mlp.linear_fc1.kernel",
        "visual.merger.linear_fc2.kernel",
        "visual.deepstack_merger_list.2.linear_fc1.kernel",
    ):
        assert "fsdp" in spec_for(name, stored[name][0], mesh7), name
    report = replication_report(stored, mesh7, lambda name: True)
    assert report.trainable_replicated_fraction < 0.001  # norms and biases only
    replicated = report.replicated_names
    assert all(
        n.endswith(("norm.weight", "bias", "norm1.weight", "norm2.weight")) for n in replicated
    )
    padding = sum(np.prod(s) for s, _ in stored.values()) / sum(
        np.prod(s) for s, _ in params.values()
    )
    assert padding < 1.002  # what the padding costs
