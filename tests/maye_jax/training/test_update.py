"""The jitted policy update: exact accumulation, sharded == unsharded, gradients and AdamW steps
against a straightforward reference, frozen parameters, learning, NaN detection.

A tiny Qwen2.5-VL (vocab 256, 2 layers, 2-block vision tower) in fp32, a batch of 8 rows (half
with an image), 8 fake CPU devices. Every jitted function is compiled once per module.

Over ~500 lines on purpose: the update's properties share the module's compiled steps.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from maye_jax.data.sequences import image_features, make_sequence_batch, response_logprobs
from maye_jax.models.configs import ModelConfig
from maye_jax.models.qwen_vl import build_model
from maye_jax.rl.losses import LossConfig
from maye_jax.rl.trajectory import prompt_images
from maye_jax.sharding.mesh import make_mesh
from maye_jax.tiny import preset_hf_config, tiny_hf_config, tiny_hf_model
from maye_jax.training.batch import (
    MinibatchMaker,
    TowerImages,
    UpdateBatch,
    micro_batch_images,
    per_row_image_features,
)
from maye_jax.training.optim import OptimizerConfig, make_optimizer
from maye_jax.training.train_state import (
    TrainableConfig,
    create_train_state,
    load_sharded_model,
    plan_layout,
    reference_model,
    reference_params,
    split_model,
)
from maye_jax.training.update import (
    UpdateConfig,
    accumulate_gradients,
    check_finite,
    make_train_step,
    scans_layers,
)

ROWS = 8


def make_minibatch(rows: UpdateBatch, num_micro: int) -> UpdateBatch:
    return rows.split(num_micro)


LR = 1e-3
MAX_GRAD_NORM = 1.0  # below the test gradients' norm (~2.6), so clipping is exercised
OPTIMIZER = OptimizerConfig(learning_rate=LR, schedule="constant", max_grad_norm=MAX_GRAD_NORM)
CONFIG = UpdateConfig(loss=LossConfig(kl_loss_coeff=0.01), logprob_chunk_size=8)
METRIC_KEYS = {
    "loss/policy",
    "loss/kl",
    "loss/total",
    "kl/k3",
    "clip_frac/low",
    "clip_frac/high",
    "ratio/mean",
    "approx_kl",
    "entropy",
    "grad_norm",
    "lr",
}


def host(tree):
    """A NumPy copy (states are donated, so compare copies)."""
    return jax.tree.map(lambda v: np.array(jax.device_get(v)), tree)


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


# Parameter changes after Adam steps agree to 1e-4 (relative norm), gradients to 1e-5: Adam
# divides by sqrt(v), so where a gradient entry is small its fp32 rounding (another summation
# order: micro-batches, shards, a narrower batch) is magnified in the step (1.1e-5 measured on
# the CI machine for the narrowed batch). A masking, scaling or accumulation error is O(1).
PARAM_CHANGE_TOLERANCE = 1e-4


def assert_trees_close(actual: dict, expected: dict, tolerance: float, what: str):
    assert actual.keys() == expected.keys()
    errors = {n: relative_error(actual[n], expected[n]) for n in expected}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tolerance, f"{what}: {worst} relative error {errors[worst]:.2e}"


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


def make_model(dtype=jnp.float32, remat=False, attention="xla"):
    config = ModelConfig.from_hf(tiny_hf_config("qwen2_5_vl", vocab_size=256))
    model = build_model(config, dtype=dtype, seed=3, remat=remat, attention=attention)
    return model, config


@pytest.fixture(scope="module")
def data():
    """The model, a SequenceBatch and the mini-batch arrays (all rows), fp32."""
    model, config = make_model()
    rng = np.random.default_rng(0)

    def prompt(with_image: bool) -> dict:
        ids = list(rng.integers(0, 200, 3))
        out = {}
        if with_image:
            ids += [config.vision_start_token_id, *[config.image_token_id] * 4]
            ids += [config.vision_end_token_id]
            out["pixel_values"] = rng.standard_normal((16, config.vision.patch_dim), np.float32)
            out["image_grid_thw"] = np.array([[1, 4, 4]])
        out["input_ids"] = np.array(ids + list(rng.integers(0, 200, 2)))
        return out

    prompts = [prompt(row % 2 == 0) for row in range(ROWS)]
    responses = [list(rng.integers(0, 200, n)) for n in (3, 8, 5, 1, 7, 2, 8, 4)]
    batch = make_sequence_batch(prompts, responses, config, pad_id=0, length_multiple=8)
    arrays = batch.device_arrays()
    features = image_features(model, arrays["vision"])  # [N, D], the frozen tower's output
    logprobs = response_logprobs(model, arrays, features, prompt_len=batch.prompt_len)
    noise = lambda: jnp.asarray(rng.normal(0, 0.1, logprobs.shape), jnp.float32)  # noqa: E731
    rows, local_index = per_row_image_features(
        features, arrays["image_feature_index"], features_per_row=8
    )
    minibatch = UpdateBatch(
        input_ids=arrays["input_ids"],
        attention_mask=arrays["attention_mask"],
        positions=jnp.moveaxis(arrays["positions"], 0, 1),  # row-major [B, 3, L]
        response_mask=arrays["response_mask"],
        advantages=jnp.asarray(rng.standard_normal(logprobs.shape), jnp.float32),
        logprobs_old=logprobs + noise(),
        ref_logprobs=logprobs + noise(),
        image_feature_index=local_index,
        image_features=rows,
    )
    return dict(
        model=model,
        batch=batch,
        arrays=arrays,
        features=features,
        rows=minibatch,
        prompts=prompts,
        config=config,
    )


class Setup:
    """State, frozen params, layout and the jitted step/gradient functions on one mesh."""

    def __init__(self, model, mesh, trainable=TrainableConfig(), config=CONFIG):  # noqa: B008
        optimizer, schedule = make_optimizer(OPTIMIZER, total_updates=100)
        self.model_def, self.state, self.frozen, self.layout = create_train_state(
            model, mesh, optimizer, trainable=trainable, frozen_dtype=jnp.float32
        )
        self.step = make_train_step(self.model_def, optimizer, schedule, self.layout, config)
        self.grads = jax.jit(
            functools.partial(
                accumulate_gradients, model_def=self.model_def, config=config, layout=self.layout
            )
        )


@pytest.fixture(scope="module")
def unsharded(data):
    return Setup(data["model"], make_mesh(fsdp=1))


def run_steps(setup: Setup, minibatch: dict, num_steps: int):
    """Fresh state from the model, `num_steps` updates; returns (parameter changes, metrics
    of each). Changes, not parameters, are compared: they are ~lr per step, far smaller than
    the parameters."""
    state, all_metrics = setup.state, []
    # Copy the initial state: the step donates it and the fixture's state is reused.
    state = jax.tree.map(
        lambda v, s: jax.device_put(np.array(v), s), host(state), setup.layout.state
    )
    for _ in range(num_steps):
        state, metrics, finite = setup.step(state, setup.frozen, minibatch)
        assert bool(finite)
        all_metrics.append(host(metrics))
    initial = host(setup.state.params)
    return {n: v - initial[n] for n, v in host(state.params).items()}, all_metrics


# --------------------------------------------------------------------------------------------------
# The straightforward reference: whole batch at once, global feature table, loss written out
# --------------------------------------------------------------------------------------------------


def reference_loss(params, frozen, model_def, arrays, features, rows):
    model = model_def.merge(params, frozen)
    prompt_len = arrays["input_ids"].shape[1] - arrays["response_mask"].shape[1]
    logprobs = response_logprobs(model, arrays, features, prompt_len=prompt_len, chunk_size=8)
    mask = rows.response_mask.astype(jnp.float32)
    advantages = rows.advantages
    ratio = jnp.exp(logprobs - rows.logprobs_old)
    policy = jnp.maximum(-advantages * ratio, -advantages * jnp.clip(ratio, 0.8, 1.2))
    log_ratio_ref = rows.ref_logprobs - logprobs
    kl = jnp.clip(jnp.exp(log_ratio_ref) - 1 - log_ratio_ref, -10, 10)
    token_loss = policy + CONFIG.loss.kl_loss_coeff * kl
    return jnp.sum(mask * token_loss) / jnp.sum(mask)


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_gradient_and_adamw_steps_match_straightforward_reference(data, unsharded):
    setup = unsharded
    rows, arrays, features = data["rows"], data["arrays"], data["features"]
    params0 = host(setup.state.params)
    grad_fn = jax.jit(
        jax.value_and_grad(
            lambda p: reference_loss(p, setup.frozen, setup.model_def, arrays, features, rows)
        )
    )
    loss, expected = grad_fn(params0)
    grads, metric_sums = setup.grads(params0, setup.frozen, make_minibatch(rows, 2))
    total, count = metric_sums["loss/total"]
    assert relative_error(total / count, loss) <= 1e-6
    assert_trees_close(host(grads), host(expected), 1e-5, "gradient")

    # Several steps at a constant lr against optax written out here.
    reference = optax.chain(
        optax.clip_by_global_norm(MAX_GRAD_NORM),
        optax.adamw(LR, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.01),
    )
    params, opt_state = params0, reference.init(params0)
    for _ in range(3):
        _, g = grad_fn(params)
        updates, opt_state = reference.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
    ours, metrics = run_steps(setup, make_minibatch(rows, 1), 3)
    expected_change = {n: v - params0[n] for n, v in host(params).items()}
    assert_trees_close(ours, expected_change, PARAM_CHANGE_TOLERANCE, "parameter change")
    assert metrics[0]["grad_norm"] > MAX_GRAD_NORM  # clipping was active
    assert metrics[0]["lr"] == pytest.approx(LR)
    assert set(metrics[0]) == METRIC_KEYS


def test_accumulation_is_exact(data, unsharded):
    """1 x 8 == 8 x 1 == 2 x 4: loss, every gradient, parameters after steps."""
    setup, rows = unsharded, data["rows"]
    results = {}
    for num_micro in (1, 8, 2):
        minibatch = make_minibatch(rows, num_micro)
        grads, metric_sums = setup.grads(setup.state.params, setup.frozen, minibatch)
        changes, metrics = run_steps(setup, minibatch, 2) if num_micro != 2 else (None, None)
        results[num_micro] = (host(grads), host(metric_sums), changes, metrics)
    grads1, sums1, changes1, metrics1 = results[1]
    for num_micro in (8, 2):
        grads, sums, changes, metrics = results[num_micro]
        assert_trees_close(grads, grads1, 1e-5, f"gradients {num_micro} micro-batches")
        for name in sums1:
            assert (
                relative_error(sums[name][0] / sums[name][1], sums1[name][0] / sums1[name][1])
                <= 1e-5
            )
        if changes is not None:
            assert_trees_close(
                changes,
                changes1,
                PARAM_CHANGE_TOLERANCE,
                f"param changes {num_micro} micro-batches",
            )
            for name in METRIC_KEYS:
                assert metrics[1][name] == pytest.approx(metrics1[1][name], rel=1e-5, abs=1e-7)


def with_padding_columns(rows: UpdateBatch, extra: int) -> UpdateBatch:
    """The same rows with `extra` more response columns of padding (as max_tokens would)."""
    fill = {"image_feature_index": -1}
    padded = {}
    for name, value in rows.row_fields().items():
        value = np.asarray(value)
        if name == "image_features":
            padded[name] = value
            continue
        widths = [(0, 0)] * (value.ndim - 1) + [(0, extra)]
        padded[name] = np.pad(value, widths, constant_values=fill.get(name, 0))
    return replace(rows, **padded)


def test_response_buckets_narrow_a_minibatch_without_changing_its_update(data, unsharded):
    """Rows padded to R = 24 (max_tokens) and the same rows narrowed to the 8-column bucket that
    holds their longest response: the same loss, metrics and parameter changes."""
    padded = with_padding_columns(data["rows"], 16)
    full = MinibatchMaker(padded)(None, 2)
    narrow = MinibatchMaker(padded, response_buckets=(8, 16, 24))(None, 2)
    assert (full.response_len, narrow.response_len) == (24, 8)
    assert np.shape(narrow.input_ids)[-1] == np.shape(full.input_ids)[-1] - 16
    changes_full, metrics_full = run_steps(unsharded, full, 2)
    changes_narrow, metrics_narrow = run_steps(unsharded, narrow, 2)
    assert_trees_close(
        changes_narrow, changes_full, PARAM_CHANGE_TOLERANCE, "param changes, narrowed"
    )
    for step in range(2):
        for name in METRIC_KEYS:
            assert metrics_narrow[step][name] == pytest.approx(
                metrics_full[step][name], rel=1e-5, abs=1e-7
            )
    with pytest.raises(ValueError, match="longer than 4"):
        padded.with_response_len(4)


@pytest.mark.parametrize("fsdp,tp", [(8, 1), (4, 2)])
def test_sharded_equals_unsharded(data, unsharded, fsdp, tp):
    """Same loss, gradient norm (a scale error in a sharded reduction would show) and parameter
    changes after 3 steps."""
    sharded = Setup(data["model"], make_mesh(fsdp=fsdp, tp=tp))
    lm_head = sharded.state.params["lm_head"]
    assert len(lm_head.sharding.device_set) == 8
    assert lm_head.addressable_shards[0].data.size == lm_head.size // 8
    mu = sharded.state.opt_state[1][0].mu  # (clip, (adam, ...))
    assert all(mu[n].sharding == sharded.layout.params[n] for n in mu)
    minibatch = make_minibatch(data["rows"], 1)
    changes, metrics = run_steps(sharded, minibatch, 3)
    expected_changes, expected_metrics = run_steps(unsharded, minibatch, 3)
    assert_trees_close(changes, expected_changes, PARAM_CHANGE_TOLERANCE, "sharded param changes")
    for ours, expected in zip(metrics, expected_metrics):
        for name in ("loss/total", "loss/policy", "loss/kl", "grad_norm", "entropy"):
            # abs: the loss shrinks to ~0.005 by cancellation after the first step
            assert ours[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name


def test_micro_batches_that_do_not_divide_the_mesh_are_padded_not_replicated(data, unsharded):
    """3-row micro-batches over 8 devices (the paper's 16-row SFT micro-batches over 7 ranks
    alike): the step pads each to 8 rows of which 5 are empty, shards the rows, and computes
    the numbers of the unpadded batch."""
    sharded = Setup(data["model"], make_mesh(fsdp=8))
    minibatch = make_minibatch(data["rows"].take(np.arange(6)), 2)
    padded = minibatch.pad_micro_rows(sharded.layout.data_parallel_size)
    rows_spec = padded.shardings(sharded.layout).input_ids.spec[1]
    assert padded.num_rows == 8 and rows_spec in ("fsdp", ("fsdp",))  # split, not replicated
    changes, metrics = run_steps(sharded, minibatch, 2)
    expected_changes, expected_metrics = run_steps(unsharded, minibatch, 2)
    assert_trees_close(
        changes, expected_changes, PARAM_CHANGE_TOLERANCE, "padded sharded param changes"
    )
    for ours, expected in zip(metrics, expected_metrics):
        for name in ("loss/total", "grad_norm", "entropy", "clip_frac/low"):
            assert ours[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name


def test_scanned_layers_equal_the_model_loop(data):
    """UpdateConfig.scan_layers=True computes what the model's own layer loop does."""
    mesh = make_mesh(fsdp=1)
    scanned = Setup(data["model"], mesh, config=replace(CONFIG, scan_layers=True))
    looped = Setup(data["model"], mesh, config=replace(CONFIG, scan_layers=False))
    minibatch = make_minibatch(data["rows"], 2)
    grads, sums = scanned.grads(scanned.state.params, scanned.frozen, minibatch)
    expected, expected_sums = looped.grads(looped.state.params, looped.frozen, minibatch)
    assert_trees_close(host(grads), host(expected), 1e-5, "scanned-layer gradient")
    assert relative_error(sums["loss/total"][0], expected_sums["loss/total"][0]) <= 1e-6


def test_layers_are_scanned_where_parameters_are_sharded_and_looped_on_one_cpu(data, unsharded):
    """scan_layers=None: the scan where FSDP gathers layer by layer, the faster loop where the
    CPU holds whole parameters; an explicit True/False is kept."""
    assert unsharded.layout.shards_params is False
    assert scans_layers(CONFIG, unsharded.layout) is False
    sharded_layout = Setup(data["model"], make_mesh(fsdp=4)).layout
    assert sharded_layout.shards_params is True
    assert scans_layers(CONFIG, sharded_layout) is True
    assert scans_layers(replace(CONFIG, scan_layers=True), unsharded.layout) is True
    assert scans_layers(replace(CONFIG, scan_layers=False), sharded_layout) is False


@pytest.mark.parametrize(
    "remat,attention,scan",
    [("dots", "xla", True), ("dots", "xla", False), ("full", "jax_xla", True)],
)
def test_remat_policy_and_attention_path_leave_gradients_unchanged(
    data, unsharded, remat, attention, scan
):
    """How the step computes (what remat keeps, which attention kernel) changes no number."""
    model, _ = make_model(remat=remat, attention=attention)
    variant = Setup(model, make_mesh(fsdp=1), config=replace(CONFIG, scan_layers=scan))
    minibatch = make_minibatch(data["rows"], 2)
    grads, sums = variant.grads(variant.state.params, variant.frozen, minibatch)
    expected, expected_sums = unsharded.grads(unsharded.state.params, unsharded.frozen, minibatch)
    assert_trees_close(host(grads), host(expected), 1e-5, f"gradient ({remat}, {attention})")
    assert relative_error(sums["loss/total"][0], expected_sums["loss/total"][0]) <= 1e-6


def test_frozen_untouched_and_every_trainable_tensor_changes(data, unsharded):
    setup = unsharded
    frozen_before = host(setup.frozen)
    assert frozen_before and all(n.startswith("visual.") for n in frozen_before)
    assert not any(n.startswith("visual.") for n in setup.state.params)
    initial = host(setup.state.params)
    ref = reference_params(setup.state, setup.layout, dtype=jnp.float32)
    changes, _ = run_steps(setup, make_minibatch(data["rows"], 1), 2)
    unchanged = [n for n in changes if np.max(np.abs(changes[n])) == 0]
    assert not unchanged
    for name, value in host(setup.frozen).items():
        np.testing.assert_array_equal(value, frozen_before[name])
    # The reference keeps its own copy: intact and equal to the initial parameters.
    for name, value in host(ref).items():
        np.testing.assert_array_equal(value, initial[name])
    model = reference_model(setup.model_def, ref, setup.frozen)
    assert model.lm_head[...].shape == initial["lm_head"].shape


def test_positive_advantage_raises_logprob_negative_lowers(data, unsharded):
    setup, rows, arrays = unsharded, data["rows"], data["arrays"]
    prompt_len = data["batch"].prompt_len

    @jax.jit
    def logprobs_of(params):
        model = setup.model_def.merge(params, setup.frozen)
        return response_logprobs(model, arrays, data["features"], prompt_len=prompt_len)

    mask = np.asarray(rows.response_mask, bool)
    sign = np.where(np.arange(ROWS) < ROWS // 2, 1.0, -1.0)[:, None]
    advantages = jnp.asarray(np.broadcast_to(sign, mask.shape), jnp.float32)
    state = jax.tree.map(
        lambda v, s: jax.device_put(np.array(v), s), host(setup.state), setup.layout.state
    )
    sequence_logprob = lambda lp: np.sum(np.where(mask, np.asarray(lp), 0), axis=1)  # noqa: E731
    before = sequence_logprob(logprobs_of(state.params))
    for _ in range(4):
        logprobs_old = logprobs_of(state.params)
        minibatch = replace(rows, advantages=advantages, logprobs_old=logprobs_old)
        state, _, _ = setup.step(state, setup.frozen, make_minibatch(minibatch, 1))
    after = sequence_logprob(logprobs_of(state.params))
    assert np.all(after[: ROWS // 2] > before[: ROWS // 2] + 0.1), (before, after)
    assert np.all(after[ROWS // 2 :] < before[ROWS // 2 :] - 0.1), (before, after)


def test_nan_is_flagged_named_and_not_applied(data, unsharded):
    setup, rows = unsharded, data["rows"]
    advantages = np.array(rows.advantages)
    advantages[1, 0] = np.nan  # a valid token
    minibatch = make_minibatch(replace(rows, advantages=jnp.asarray(advantages)), 1)
    state = jax.tree.map(
        lambda v, s: jax.device_put(np.array(v), s), host(setup.state), setup.layout.state
    )
    before = host(state)
    state, metrics, finite = setup.step(state, setup.frozen, minibatch)
    assert not bool(finite)
    with pytest.raises(FloatingPointError, match="update step 7"):
        check_finite(finite, metrics, step=7)
    after = host(state)
    assert after.step == before.step
    for name in before.params:
        np.testing.assert_array_equal(after.params[name], before.params[name])


def test_tower_runs_inside_the_step_when_the_connector_trains(data, unsharded):
    trainable = TrainableConfig(train_connector=True)
    setup = Setup(data["model"], make_mesh(fsdp=1), trainable)
    assert any(n.startswith("visual.merger.") for n in setup.state.params)
    assert not any(n.startswith("visual.merger.") for n in setup.frozen)
    rows, batch = data["rows"], data["batch"]
    with pytest.raises(ValueError, match="vision"):
        setup.grads(setup.state.params, setup.frozen, make_minibatch(rows, 1))
    in_step = replace(
        rows, image_feature_index=data["arrays"]["image_feature_index"], image_features=None
    )
    minibatch = make_minibatch(in_step, 1).with_vision(
        {k: jnp.asarray(v)[None] for k, v in batch.vision.items()}
    )
    frozen_before = host(setup.frozen)
    changes, metrics = run_steps(setup, minibatch, 1)
    # Same loss as with the precomputed features (same initial parameters).
    _, expected = run_steps(unsharded, make_minibatch(rows, 1), 1)
    assert metrics[0]["loss/total"] == pytest.approx(expected[0]["loss/total"], rel=1e-5)
    merger = [n for n in changes if n.startswith("visual.merger.")]
    assert all(np.max(np.abs(changes[n])) > 0 for n in merger)
    for name, value in host(setup.frozen).items():
        np.testing.assert_array_equal(value, frozen_before[name])


def test_micro_batch_images_map_each_token_to_its_prompts_features(data):
    """Prompts of different image sizes (one text-only), repeated over rows as samples are, and
    a padding row: every image token's index points at its own prompt's feature in its own
    micro-batch's tower output, each distinct prompt packed once per micro-batch."""
    model, config = data["model"], data["config"]
    rng = np.random.default_rng(5)
    grids = [np.array([[1, 4, 4]]), np.array([[1, 2, 4]]), None, np.array([[1, 4, 2], [1, 2, 2]])]
    images = [
        None if g is None else (rng.standard_normal((int(g.prod(1).sum()), 1176)), g) for g in grids
    ]
    tokens = [0 if g is None else int(g.prod(1).sum()) // 4 for g in grids]
    row_prompt = np.array([0, 1, 0, 2, 3, 1, 3, -1])
    is_image = np.zeros((8, 12), bool)
    for row, prompt in enumerate(row_prompt):
        if prompt >= 0:
            is_image[row, 2 : 2 + tokens[prompt]] = True
    vision, index = micro_batch_images(images, row_prompt, is_image, 2, config.vision)
    # 16-slot tower rows (the largest image); micro-batch 0 packs 16 + 8 patches (prompt 0's
    # two rows share one packing), micro-batch 1 packs 8 + 4 + 8: two tower rows each.
    assert vision["patches"].shape[:3] == (2, 2, 16)
    assert set(vision["full_segment_ids"][0].ravel()) == {-1, 0, 1}  # prompts 0 and 1, once each
    tower = jax.jit(lambda v: image_features(model, v))
    for m in range(2):
        features = np.asarray(tower({k: jnp.asarray(v[m]) for k, v in vision.items()}))
        for row in range(4 * m, 4 * m + 4):
            prompt = row_prompt[row]
            assert np.all((index[row] >= 0) == is_image[row])
            if prompt < 0 or images[prompt] is None:
                continue
            expected = _features_alone(tower, images[prompt], config)
            np.testing.assert_allclose(features[index[row][is_image[row]]], expected, atol=1e-5)
    with pytest.raises(ValueError, match="row 0 .* image tokens"):
        micro_batch_images(images, row_prompt, np.zeros((8, 12), bool), 2, config.vision)


def _features_alone(tower, image, config):
    """The tower's features of one prompt's images, packed by themselves, in LLM order."""
    from maye_jax.models.vision_inputs import pack_images

    packed = pack_images(image[0], image[1], config.vision)
    features = np.asarray(tower({k: jnp.asarray(v) for k, v in packed.arrays().items()}))
    return features[packed.feature_index]


def test_training_tower_accumulation_is_exact(data):
    """With the tower and merger training, micro-batches that pack their own images give the
    gradients of one micro-batch holding the whole batch's packing (1 x 8 == 2 x 4 == 4 x 2),
    sharded over 8 devices as unsharded."""
    trainable = TrainableConfig(train_vit=True, train_connector=True)
    setup = Setup(data["model"], make_mesh(fsdp=1), trainable)
    assert not setup.frozen
    rows, batch = data["rows"], data["batch"]
    in_step = replace(
        rows, image_feature_index=data["arrays"]["image_feature_index"], image_features=None
    )
    whole = make_minibatch(in_step, 1).with_vision(
        {k: jnp.asarray(v)[None] for k, v in batch.vision.items()}
    )
    expected, expected_sums = setup.grads(setup.state.params, setup.frozen, whole)
    expected = host(expected)
    assert all(np.max(np.abs(v)) > 0 for n, v in expected.items() if n.startswith("visual."))
    for num_micro in (2, 4):
        tower = TowerImages(
            [prompt_images(p) for p in data["prompts"]], np.arange(ROWS), data["config"].vision
        )
        minibatch = MinibatchMaker(in_step, tower)(None, num_micro)
        grads, sums = setup.grads(setup.state.params, setup.frozen, minibatch)
        assert_trees_close(host(grads), expected, 1e-5, f"gradients, {num_micro} micro-batches")
        assert relative_error(sums["loss/total"][0], expected_sums["loss/total"][0]) <= 1e-6
    # sharded == unsharded: the tower's weights split over 8 devices, its images replicated
    sharded = Setup(data["model"], make_mesh(fsdp=8), trainable)
    assert any(
        len(v.sharding.device_set) == 8 and v.addressable_shards[0].data.size < v.size
        for n, v in sharded.state.params.items()
        if n.startswith("visual.")
    )
    grads, _ = sharded.grads(sharded.state.params, sharded.frozen, minibatch)
    assert_trees_close(host(grads), expected, 1e-5, "gradients, tower sharded over 8 devices")


def test_7b_layout_over_7_devices(preset="qwen2_5_vl_7b"):
    """Abstract 7B: AdamW moments sharded like the parameters, ~1/7 of the trainable state per
    device; the tower's widths have no factor 7, so its matrices are stored padded and sharded
    (frozen, or training: nothing big is replicated)."""
    model = build_model(ModelConfig.from_hf(preset_hf_config(preset)), abstract=True)
    model_def, params, frozen = split_model(model, TrainableConfig())
    optimizer, _ = make_optimizer(OptimizerConfig(), total_updates=100)
    mesh = make_mesh(fsdp=7)
    layout = plan_layout(mesh, params, frozen, optimizer)
    mu, nu = layout.state.opt_state[1][0].mu, layout.state.opt_state[1][0].nu
    assert mu == layout.params and nu == layout.params
    per_device = sum(np.prod(s.shard_shape(params[n].shape)) for n, s in layout.params.items())
    total = sum(np.prod(v.shape) for v in params.values())
    assert total / per_device > 6.5
    assert layout.report.trainable_replicated_fraction < 0.001
    assert layout.report.frozen_replicated_bytes < 0.001 * layout.report.frozen_bytes
    qkv = "visual.blocks.0.attn.qkv.kernel"  # [1280, 3840]: padded to [1281, 3840]
    assert layout.frozen[qkv].shard_shape((1281, 3840)) == (183, 3840)
    _, params, frozen = split_model(model, TrainableConfig(train_vit=True, train_connector=True))
    everything = plan_layout(mesh, params, frozen, optimizer)
    assert everything.report.trainable_replicated_fraction < 0.001
    with pytest.raises(ValueError, match="replicated"):
        plan_layout(mesh, params, frozen, optimizer, max_replicated_fraction=0.0)


@pytest.mark.parametrize("tied", [True, False])
def test_train_embeddings_false_freezes_embeddings_and_lm_head_only(tied):
    hf = tiny_hf_config("qwen2_vl", vocab_size=256)
    hf.tie_word_embeddings = tied
    hf.text_config.tie_word_embeddings = tied
    model = build_model(ModelConfig.from_hf(hf), abstract=True)
    _, params, frozen = split_model(model, TrainableConfig(train_embeddings=False))
    embeddings = {"language_model.embed_tokens.weight"} | (set() if tied else {"lm_head"})
    assert embeddings <= set(frozen) and not embeddings & set(params)
    _, all_params, _ = split_model(model, TrainableConfig())
    assert set(params) == set(all_params) - embeddings
    assert any(name.startswith("language_model.layers.") for name in params)


def test_checkpoint_loads_straight_onto_shards(tmp_path):
    hf = tiny_hf_model("qwen2_5_vl", seed=2, vocab_size=256)
    hf.save_pretrained(str(tmp_path))
    mesh = make_mesh(fsdp=8)
    model, _ = load_sharded_model(tmp_path, mesh, dtype=jnp.float32)
    model_def, params, frozen = split_model(model, TrainableConfig())
    expected = hf.state_dict()
    lm_head = params["lm_head"]
    assert lm_head.dtype == jnp.float32 and lm_head.sharding.spec == PartitionSpec(None, "fsdp")
    assert lm_head.addressable_shards[0].data.shape == (256, 64 // 8)
    np.testing.assert_array_equal(np.asarray(lm_head), expected["lm_head.weight"].numpy())
    assert all(v.dtype == jnp.bfloat16 for v in frozen.values())


def test_bf16_remat_default_optimizer(data):
    """The training configuration: bf16 compute, fp32 master weights and moments, remat,
    warmup (step-0 lr is 0, so the first update changes nothing)."""
    model, _ = make_model(dtype=jnp.bfloat16, remat=True)
    optimizer, schedule = make_optimizer(OptimizerConfig(), total_updates=10)
    model_def, state, frozen, layout = create_train_state(model, make_mesh(fsdp=8), optimizer)
    assert all(v.dtype == jnp.float32 for v in state.params.values())
    assert all(v.dtype == jnp.float32 for v in state.opt_state[1][0].mu.values())
    assert all(v.dtype == jnp.bfloat16 for v in frozen.values())
    step = make_train_step(model_def, optimizer, schedule, layout, CONFIG)
    initial = host(state.params)
    minibatch = make_minibatch(data["rows"], 2)
    state, metrics0, _ = step(state, frozen, minibatch)
    after_first = host(state.params)
    state, metrics1, finite = step(state, frozen, minibatch)
    assert bool(finite) and set(metrics1) == METRIC_KEYS
    assert float(metrics0["lr"]) == 0.0 and float(metrics1["lr"]) == pytest.approx(5e-6)
    for name in initial:
        np.testing.assert_array_equal(after_first[name], initial[name])
    assert int(state.step) == 2
