"""The Reinforce++ policy update (SPEC §3): one jitted, sharded step per mini-batch.

    step_fn = make_train_step(model_def, optimizer, schedule, layout, UpdateConfig())
    state, metrics, finite = step_fn(state, frozen, minibatch)   # `state` is donated
    check_finite(finite, metrics, step=update_index)              # raises on NaN/Inf

A mini-batch holds `num_micro` micro-batches of `micro_bs` rows each (`make_minibatch` stacks
them). The step computes the loss normalizer over the whole mini-batch once
(`losses.loss_normalizer`), then walks the micro-batches with `lax.scan`, summing each one's
gradient of its loss *contribution* (`losses.policy_objective`), so 8 micro-batches of 1 row give
the same loss and gradients as 1 micro-batch of 8. Then global-norm clipping and AdamW on the
fp32 master weights; the forward runs in the model's compute dtype (bf16 in training).

Mini-batch arrays (leading [M, b] = micro-batches x rows per micro-batch; columns as in
`maye_jax/sequences.py`: P prompt columns, then R response columns):

    input_ids, attention_mask     [M, b, P + R] int32
    positions                     [M, 3, b, P + R] int32 (M-RoPE)
    response_mask                 [M, b, R]
    advantages, logprobs_old      [M, b, R] float32
    ref_logprobs                  [M, b, R] float32 (needed when kl_loss_coeff != 0)
    logprobs_rollout              [M, b, R] float32 (needed when rollout_is_cap is set)
    image_feature_index           [M, b, P + R] int32, -1 on text tokens
    image_features                [M, b, F, D] the frozen tower's output for each row, F features
                                  per row (`per_row_image_features`); index = position in the row
                                  (features = sequences.image_features(model, vision), once per
                                  rollout batch, with the frozen tower)
    vision                        {patches, rope_hw, full_segment_ids, window_segment_ids}, each
                                  [M, ...]: packed images of each micro-batch, when the tower
                                  trains and so must run inside the step; index = position in
                                  that micro-batch's tower output (`micro_batch_images`)

Metrics (ARCHITECTURE.md keys): loss/{policy,kl,total}, kl/k3, clip_frac/{low,high}, ratio/mean,
approx_kl, entropy (true entropy of the sampling distribution over the whole vocabulary, chunked),
grad_norm (before clipping), lr (of this update); loss/kl and kl/k3 only with ref_logprobs,
is_weight/mean only with the IS correction. A non-finite loss or gradient leaves the state
unchanged and returns `finite = False`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from maye_jax.algorithms import masked_sum
from maye_jax.losses import (
    LossConfig,
    MetricSums,
    finalize_metrics,
    loss_normalizer,
    policy_objective,
    sum_metrics,
)
from maye_jax.train_state import Layout, ModelDef, Params, TrainState
from models.configs import VisionConfig
from models.layer_scan import scanned_decoder, stack_layers
from models.logprobs import token_logprobs
from models.qwen_vl import causal_padding_mask
from models.vision_inputs import bucket, pack_images

BATCH_AXES = ("dp", "fsdp")  # mesh axes the rows of a micro-batch are split over
ROW_AXIS = {"positions": 2}  # the row dimension of each mini-batch array (default 1)


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """loss: the objective (losses.py); temperature: of the sampling distribution, so logprobs
    are those of `log_softmax(logits / temperature)`; logprob_chunk_size: sequence chunk for the
    logits (memory); scan_layers: run the decoder layers as one scan over stacked weights
    (`models/layer_scan.py`), which bounds FSDP's gathered weights and full-size gradients to
    one layer at a time."""

    loss: LossConfig = LossConfig()
    temperature: float = 1.0
    logprob_chunk_size: int = 512
    scan_layers: bool = True


# --------------------------------------------------------------------------------------------------
# Mini-batch layout
# --------------------------------------------------------------------------------------------------


def make_minibatch(arrays: Mapping[str, np.ndarray | jax.Array], num_micro: int) -> dict:
    """Splits `[B, ...]` row arrays (positions `[3, B, L]`) into `[M, B / M, ...]` micro-batches
    (positions `[M, 3, B / M, L]`); consecutive rows form a micro-batch. `vision` is not split
    (it is packed per micro-batch by the caller)."""
    out = {}
    for name, value in arrays.items():
        if name == "vision":
            out[name] = value
            continue
        axis = ROW_AXIS.get(name, 1) - 1
        rows = value.shape[axis]
        if rows % num_micro:
            raise ValueError(f"{name}: {rows} rows do not split into {num_micro} micro-batches")
        shape = value.shape[:axis] + (num_micro, rows // num_micro) + value.shape[axis + 1 :]
        value = value.reshape(shape)
        out[name] = jnp.moveaxis(value, axis, 0) if axis else value
    return out


@functools.partial(jax.jit, static_argnames="features_per_row")
def per_row_image_features(
    features: jax.Array,  # [N, D] the tower output of a whole batch (sequences.image_features)
    image_feature_index: jax.Array,  # [B, L] into `features`, -1 on text tokens
    features_per_row: int,  # F >= the largest number of image tokens in a row
) -> tuple[jax.Array, jax.Array]:  # ([B, F, D], [B, L] index into the row's F features)
    """Each row's own image features, so they can be sharded (and split) with the rows."""
    is_image = image_feature_index >= 0
    local_index = jnp.where(is_image, jnp.cumsum(is_image, axis=1) - 1, -1)
    rows = jnp.arange(image_feature_index.shape[0])[:, None]
    slot = jnp.where(is_image, local_index, features_per_row)  # out of range: dropped
    gathered = jnp.take(features, jnp.maximum(image_feature_index, 0), axis=0)  # [B, L, D]
    per_row = jnp.zeros(
        (image_feature_index.shape[0], features_per_row, features.shape[-1]), features.dtype
    )
    per_row = per_row.at[rows, slot].set(gathered, mode="drop")
    return per_row, local_index.astype(jnp.int32)


def micro_batch_images(
    prompt_images: Sequence[tuple[np.ndarray, np.ndarray] | None],
    row_prompt: np.ndarray,  # [B] the prompt of each mini-batch row; -1 on padding rows
    is_image_token: np.ndarray,  # [B, L] bool
    num_micro: int,
    vision_config: VisionConfig,
    *,
    row_len: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each micro-batch's own packed images, for a tower that trains inside the step.

    `prompt_images[p]` = (pixel_values [patches, patch_dim], image_grid_thw [k, 3]) of prompt p,
    or None for a text-only prompt. Micro-batch m holds rows [m*b, (m+1)*b) (as `make_minibatch`
    splits them); it packs each of its distinct prompts' images once (the samples of one prompt
    share the tower's output, and its gradient sums over them). Returns `vision` {name: [M, rows,
    row_len, ...]} (rows = the most any micro-batch needs, bucketed, so steps compile a bounded
    number of shapes) and `image_feature_index` [B, L]: per row, the index of each image token's
    feature in its own micro-batch's tower output, -1 on text tokens. `row_len` defaults to the
    bucket of the largest image of all prompts."""
    row_prompt = np.asarray(row_prompt)
    is_image_token = np.asarray(is_image_token, bool)
    rows_total = len(row_prompt)
    if rows_total % num_micro:
        raise ValueError(f"{rows_total} rows do not split into {num_micro} micro-batches")
    micro_rows = rows_total // num_micro
    merge_unit = vision_config.spatial_merge_size**2
    sizes = [
        int(np.asarray(grids).reshape(-1, 3).prod(axis=1).max())
        for _, grids in filter(None, prompt_images)
    ]
    row_len = row_len or bucket(max(sizes, default=merge_unit))
    packs, index = [], np.full(is_image_token.shape, -1, np.int32)
    for m in range(num_micro):
        rows = range(m * micro_rows, (m + 1) * micro_rows)
        prompts = [p for p in dict.fromkeys(int(row_prompt[r]) for r in rows) if p >= 0]
        prompts = [p for p in prompts if prompt_images[p] is not None]
        if not prompts:
            packs.append(None)
            continue
        pixels = [np.asarray(prompt_images[p][0]) for p in prompts]
        grids = [np.asarray(prompt_images[p][1]).reshape(-1, 3) for p in prompts]
        packed = pack_images(
            np.concatenate(pixels), np.concatenate(grids), vision_config, row_len=row_len
        )
        packs.append(packed.arrays())
        # Features of prompt p are packed.feature_index[start : start + count], in LLM order.
        counts = [int(g.prod(axis=1).sum()) // merge_unit for g in grids]
        starts = dict(zip(prompts, np.cumsum([0] + counts[:-1]).tolist()))
        for r in rows:
            p = int(row_prompt[r])
            expected = counts[prompts.index(p)] if p in starts else 0
            if int(is_image_token[r].sum()) != expected:
                raise ValueError(
                    f"row {r} (prompt {p}) holds {int(is_image_token[r].sum())} image tokens "
                    f"but its images give {expected} features"
                )
            if expected:
                index[r, is_image_token[r]] = packed.feature_index[starts[p] : starts[p] + expected]
    tower_rows = bucket(max((p["patches"].shape[0] for p in packs if p), default=1), minimum=1)
    vision = {
        "patches": np.zeros((num_micro, tower_rows, row_len, vision_config.patch_dim), np.float32),
        "rope_hw": np.zeros((num_micro, tower_rows, row_len, 2), np.int32),
        "full_segment_ids": np.full((num_micro, tower_rows, row_len), -1, np.int32),
        "window_segment_ids": np.full((num_micro, tower_rows, row_len), -1, np.int32),
    }
    for m, pack in enumerate(packs):
        for name, value in (pack or {}).items():
            vision[name][m, : value.shape[0]] = value
    return vision, index


def make_tower_minibatch(
    arrays: Mapping[str, np.ndarray | jax.Array],
    num_micro: int,
    *,
    prompt_images: Sequence[tuple[np.ndarray, np.ndarray] | None],
    row_prompt: np.ndarray,
    vision_config: VisionConfig,
) -> dict:
    """`make_minibatch` for a tower that trains: `arrays["image_feature_index"]` only marks the
    image tokens (>= 0); each micro-batch gets its own packed images (`micro_batch_images`)."""
    is_image = np.asarray(arrays["image_feature_index"]) >= 0
    vision, index = micro_batch_images(
        prompt_images, row_prompt, is_image, num_micro, vision_config
    )
    minibatch = make_minibatch(dict(arrays, image_feature_index=index), num_micro)
    minibatch["vision"] = vision
    return minibatch


def batch_sharding(layout: Layout, name: str, shape: tuple[int, ...]) -> NamedSharding:
    """Rows over ('dp', 'fsdp') when they divide evenly, else (e.g. 1-row micro-batches)
    replicated; the micro-batch dimension and the packed images are never split."""
    mesh = layout.mesh
    row_axis = ROW_AXIS.get(name, 1)
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    if name == "vision" or not axes or shape[row_axis] % np.prod([mesh.shape[a] for a in axes]):
        return layout.replicated
    spec = [None] * len(shape)
    spec[row_axis] = axes
    return NamedSharding(mesh, PartitionSpec(*spec))


def shard_minibatch(minibatch: Mapping, layout: Layout) -> dict:
    """Puts every mini-batch array on the mesh with `batch_sharding`."""
    return {
        name: jax.tree.map(
            lambda v, n=name: jax.device_put(v, batch_sharding(layout, n, v.shape)), value
        )
        for name, value in minibatch.items()
    }


# --------------------------------------------------------------------------------------------------
# The loss of one micro-batch and the accumulated gradient
# --------------------------------------------------------------------------------------------------


def _hidden_states(model, micro: Mapping, stacked_layers: Mapping | None) -> jax.Array:
    """Final hidden states [b, P + R, D] of one micro-batch."""
    index = micro.get("image_feature_index")
    if "vision" in micro:  # the tower trains: run it here, index into its output
        vision = micro["vision"]
        features = model.encode_images(
            vision["patches"],
            vision["rope_hw"],
            vision["full_segment_ids"],
            vision["window_segment_ids"],
        )
        embeds = model.embed(micro["input_ids"], features, index)
    else:
        embeds = model.language_model.embed_tokens(micro["input_ids"])  # [b, L, D]
    if "image_features" in micro:  # each row's precomputed features, [b, F, D]
        gathered = jnp.take_along_axis(
            micro["image_features"], jnp.maximum(index, 0)[..., None], axis=1
        )
        embeds = jnp.where((index >= 0)[..., None], gathered.astype(embeds.dtype), embeds)
    if stacked_layers is not None:
        return scanned_decoder(
            model, stacked_layers, embeds, micro["positions"], micro["attention_mask"]
        )
    mask = causal_padding_mask(micro["attention_mask"])
    hidden, _ = model.language_model(embeds, micro["positions"], mask)
    return hidden


def micro_batch_loss(
    params: Params,
    frozen: Params,
    micro: Mapping,
    normalizer: jax.Array,
    *,
    model_def: ModelDef,
    config: UpdateConfig,
    layout: Layout | None = None,
) -> tuple[jax.Array, MetricSums]:
    """This micro-batch's contribution to the mini-batch loss, and its metric (sum, count)s.

    Differentiable in `params` (fp32), which are cast to the compute dtype here, so the
    gradients arrive in fp32. With `layout`, the cast copies keep the parameters' sharding, so
    each weight is all-gathered where it is used, in the compute dtype (half the bytes of fp32
    where the backend computes in bf16), and its gradient is reduced back to shards."""
    dtype = model_def.compute_dtype

    def cast(tree, shardings):
        tree = {n: v.astype(dtype) for n, v in tree.items()}
        if layout is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, {n: shardings[n] for n in tree})

    params = cast(params, layout and layout.params)
    frozen = cast(frozen, layout and layout.frozen)
    model = model_def.merge(params, frozen)
    stacked_layers = None
    if config.scan_layers:
        shardings = layout and {**layout.params, **layout.frozen}
        stacked_layers = stack_layers({**params, **frozen}, shardings)
    response_len = micro["response_mask"].shape[-1]
    prompt_len = micro["input_ids"].shape[-1] - response_len
    hidden = _hidden_states(model, micro, stacked_layers)
    logprobs, entropy = token_logprobs(
        hidden[:, prompt_len - 1 : -1],
        model.output_embedding(),
        micro["input_ids"][:, prompt_len:],
        temperature=config.temperature,
        chunk_size=config.logprob_chunk_size,
        with_entropy=True,
    )
    loss, metric_sums = policy_objective(
        logprobs=logprobs,
        logprobs_old=micro["logprobs_old"],
        advantages=micro["advantages"],
        response_mask=micro["response_mask"],
        normalizer=normalizer,
        config=config.loss,
        ref_logprobs=micro.get("ref_logprobs"),
        logprobs_rollout=micro.get("logprobs_rollout"),
    )
    mask = micro["response_mask"].astype(bool)
    metric_sums["entropy"] = (
        jax.lax.stop_gradient(masked_sum(entropy, mask)),
        jnp.sum(mask).astype(jnp.float32),
    )
    return loss, metric_sums


def accumulate_gradients(
    params: Params,
    frozen: Params,
    minibatch: Mapping,
    *,
    model_def: ModelDef,
    config: UpdateConfig,
    layout: Layout | None = None,
) -> tuple[Params, MetricSums]:
    """(gradient of the mini-batch loss, summed metric pairs), one micro-batch at a time."""
    if "vision" not in minibatch and any(n.startswith("visual.") for n in params):
        raise ValueError(
            "the vision tower trains (train_vit/train_connector) so it must run inside the step: "
            "the mini-batch needs `vision` (packed images per micro-batch), not image_features"
        )
    mask = minibatch["response_mask"]
    normalizer = loss_normalizer(
        config.loss.loss_agg, mask.reshape(-1, mask.shape[-1]), config.loss.max_tokens
    )
    loss_fn = functools.partial(micro_batch_loss, model_def=model_def, config=config, layout=layout)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def constrain(grads):
        if layout is None:
            return grads
        return jax.lax.with_sharding_constraint(grads, {n: layout.params[n] for n in grads})

    first = jax.tree.map(lambda v: v[0], minibatch)
    _, metric_shapes = jax.eval_shape(loss_fn, params, frozen, first, normalizer)
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731
    grads_init = constrain({n: jnp.zeros(v.shape, jnp.float32) for n, v in params.items()})

    def one_micro_batch(carry, micro):
        grads_sum, metrics_sum = carry
        (_, metric_sums), grads = grad_fn(params, frozen, micro, normalizer)
        grads_sum = constrain(jax.tree.map(jnp.add, grads_sum, constrain(grads)))
        return (grads_sum, sum_metrics(metrics_sum, metric_sums)), None

    (grads, metric_sums), _ = jax.lax.scan(
        one_micro_batch, (grads_init, zeros(metric_shapes)), minibatch
    )
    return grads, metric_sums


# --------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------


def train_step(
    state: TrainState,
    frozen: Params,
    minibatch: Mapping,
    *,
    model_def: ModelDef,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: UpdateConfig,
    layout: Layout | None = None,
) -> tuple[TrainState, dict[str, jax.Array], jax.Array]:
    """One AdamW update from one mini-batch: (new state, metrics, finite flag)."""
    if layout is not None:
        minibatch = {
            n: jax.lax.with_sharding_constraint(v, batch_sharding(layout, n, v.shape))
            if n != "vision"
            else v
            for n, v in minibatch.items()
        }
    grads, metric_sums = accumulate_gradients(
        state.params, frozen, minibatch, model_def=model_def, config=config, layout=layout
    )
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = finalize_metrics(metric_sums)
    finite = jnp.isfinite(metrics["loss/total"]) & jnp.isfinite(grad_norm)
    new_state = TrainState(state.step + 1, params, opt_state)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics["grad_norm"] = grad_norm
    metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    return new_state, metrics, finite


def make_train_step(
    model_def: ModelDef,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    layout: Layout,
    config: UpdateConfig = UpdateConfig(),  # noqa: B008 (frozen dataclass)
):
    """The jitted step `(state, frozen, minibatch) -> (state, metrics, finite)`, with the state
    donated and kept in `layout`; the mini-batch is put on the mesh first (`shard_minibatch`).
    `.jitted` is the bare jitted function (e.g. to `.lower()` it on abstract inputs)."""
    step = functools.partial(
        train_step,
        model_def=model_def,
        optimizer=optimizer,
        schedule=schedule,
        config=config,
        layout=layout,
    )
    jitted = jax.jit(
        step,
        out_shardings=(layout.state, layout.replicated, layout.replicated),
        donate_argnums=0,
    )

    def run(state: TrainState, frozen: Params, minibatch: Mapping):
        return jitted(state, frozen, shard_minibatch(minibatch, layout))

    run.jitted = jitted
    return run


def check_finite(finite, metrics: Mapping[str, jax.Array], step: int | str) -> None:
    """Host-side: raises FloatingPointError naming the update step when the step reported a
    non-finite loss or gradient (the state was left unchanged)."""
    if bool(jax.device_get(finite)):
        return
    values = {k: float(jax.device_get(metrics[k])) for k in ("loss/total", "grad_norm")}
    raise FloatingPointError(
        f"non-finite loss or gradient at update step {step}: loss/total={values['loss/total']}, "
        f"grad_norm={values['grad_norm']}; the update was not applied"
    )
