"""The Reinforce++ policy update (SPEC §3): one jitted, sharded step per mini-batch.

    step_fn = make_train_step(model_def, optimizer, schedule, layout, UpdateConfig())
    state, metrics, finite = step_fn(state, frozen, minibatch)   # `state` is donated
    check_finite(finite, metrics, step=update_index)              # raises on NaN/Inf

A mini-batch is an `UpdateBatch` (maye_jax/training/batch.py) split into M micro-batches of b
rows each. The step computes the loss normalizer over the whole mini-batch once
(`losses.loss_normalizer`), then walks the micro-batches with `lax.scan`, summing each one's
gradient of its loss *contribution* (`losses.policy_objective`), so 8 micro-batches of 1 row give
the same loss and gradients as 1 micro-batch of 8. Then global-norm clipping and AdamW on the
fp32 master weights; the forward runs in the model's compute dtype (bf16 in training).

Metrics (ARCHITECTURE.md keys): loss/{policy,kl,total}, kl/k3 (kl/<rl.kl_loss_estimator>),
clip_frac/{low,high} (and clip_frac/dual with PPO dual-clip), ratio/mean, approx_kl, entropy
(true entropy of the sampling distribution over the whole vocabulary, chunked), grad_norm
(before clipping), lr (of this update); loss/kl and kl/* only with ref_logprobs,
is_weight/mean only with the IS correction. A non-finite loss or gradient leaves the state
unchanged and returns `finite = False`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from maye_jax.models.layer_scan import scanned_decoder, stack_layers
from maye_jax.models.logprobs import token_logprobs
from maye_jax.models.qwen_vl import causal_padding_mask
from maye_jax.rl.advantages import masked_sum
from maye_jax.rl.losses import (
    LossConfig,
    MetricSums,
    finalize_metrics,
    loss_normalizer,
    policy_objective,
    sum_metrics,
)
from maye_jax.sharding.layout import Layout
from maye_jax.training.batch import UpdateBatch
from maye_jax.training.train_state import ModelDef, Params, TrainState


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """loss: the objective (losses.py); temperature: of the sampling distribution, so logprobs
    are those of `log_softmax(logits / temperature)`; logprob_chunk_size: sequence chunk for the
    logits (memory); scan_layers: run the decoder layers as one scan over stacked weights
    (`models/layer_scan.py`), which bounds FSDP's gathered weights and full-size gradients to
    one layer at a time; False: the model's own layer loop; None: `scans_layers` decides."""

    loss: LossConfig = LossConfig()
    temperature: float = 1.0
    logprob_chunk_size: int = 512
    scan_layers: bool | None = None


def scans_layers(config: UpdateConfig, layout: Layout | None) -> bool:
    """Whether the step scans the decoder layers. None (the default) scans unless the run is on
    the CPU with whole (unsharded) parameters: there the scan buys no memory (nothing is
    gathered) and its stacked residuals and weights cost about a fifth of an update at hidden
    512 (`benchmarks/update_mfu.py`: 1.60 s scanned, 1.36 s looped); sharded parameters and
    accelerators keep the scan, which bounds gathered weights and compile time at 28 layers."""
    if config.scan_layers is not None:
        return config.scan_layers
    if layout is None:
        return jax.default_backend() != "cpu"
    on_cpu = all(d.platform == "cpu" for d in layout.mesh.devices.flat)
    return not (on_cpu and not layout.shards_params)


# --------------------------------------------------------------------------------------------------
# The loss of one micro-batch and the accumulated gradient
# --------------------------------------------------------------------------------------------------


def _hidden_states(model, micro: UpdateBatch, stacked_layers: dict | None) -> jax.Array:
    """Final hidden states [b, P + R, D] of one micro-batch."""
    index = micro.image_feature_index
    deepstack = None  # [K, b, L, D] Qwen3-VL's DeepStack levels at the image tokens
    if micro.vision is not None:  # the tower trains: run it here, index into its output
        features = model.encode_images(**micro.vision)
        embeds, deepstack = model.embed(micro.input_ids, features, index)
    else:
        embeds = model.language_model.embed_tokens(micro.input_ids)  # [b, L, D]
    if micro.image_features is not None:  # each row's precomputed features, [b, F, (1+K) D]
        gathered = jnp.take_along_axis(
            micro.image_features, jnp.maximum(index, 0)[..., None], axis=1
        )
        embeds, deepstack = model.place_image_features(embeds, gathered, index >= 0)
    positions = jnp.swapaxes(micro.positions, 0, 1)  # [b, 3, L] -> the model's [3, b, L]
    if stacked_layers is not None:
        return scanned_decoder(
            model, stacked_layers, embeds, positions, micro.attention_mask, deepstack
        )
    mask = causal_padding_mask(micro.attention_mask)
    hidden, _ = model.language_model(embeds, positions, mask, deepstack=deepstack)
    return hidden


def micro_batch_loss(
    params: Params,
    frozen: Params,
    micro: UpdateBatch,
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
    if scans_layers(config, layout):
        shardings = layout and {**layout.params, **layout.frozen}
        stacked_layers = stack_layers({**params, **frozen}, shardings)
    prompt_len = micro.input_ids.shape[-1] - micro.response_len
    hidden = _hidden_states(model, micro, stacked_layers)
    logprobs, entropy = token_logprobs(
        hidden[:, prompt_len - 1 : -1],
        model.output_embedding(),
        micro.input_ids[:, prompt_len:],
        temperature=config.temperature,
        chunk_size=config.logprob_chunk_size,
        with_entropy=True,
    )
    loss, metric_sums = policy_objective(
        logprobs=logprobs,
        logprobs_old=micro.logprobs_old,
        advantages=micro.advantages,
        response_mask=micro.response_mask,
        normalizer=normalizer,
        config=config.loss,
        ref_logprobs=micro.ref_logprobs,
        logprobs_rollout=micro.logprobs_rollout,
    )
    mask = micro.response_mask.astype(bool)
    metric_sums["entropy"] = (
        jax.lax.stop_gradient(masked_sum(entropy, mask)),
        jnp.sum(mask).astype(jnp.float32),
    )
    return loss, metric_sums


def accumulate_gradients(
    params: Params,
    frozen: Params,
    minibatch: UpdateBatch,
    *,
    model_def: ModelDef,
    config: UpdateConfig,
    layout: Layout | None = None,
) -> tuple[Params, MetricSums]:
    """(gradient of the mini-batch loss, summed metric pairs), one micro-batch at a time."""
    if minibatch.vision is None and any(n.startswith("visual.") for n in params):
        raise ValueError(
            "the vision tower trains (train_vit/train_connector) so it must run inside the step: "
            "the mini-batch needs `vision` (packed images per micro-batch), not image_features"
        )
    mask = minibatch.response_mask
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
    minibatch: UpdateBatch,
    *,
    model_def: ModelDef,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: UpdateConfig,
    layout: Layout | None = None,
) -> tuple[TrainState, dict[str, jax.Array], jax.Array]:
    """One AdamW update from one mini-batch: (new state, metrics, finite flag)."""
    if layout is not None:
        minibatch = jax.lax.with_sharding_constraint(minibatch, minibatch.shardings(layout))
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
    donated and kept in `layout`. The mini-batch is put on the mesh first: each micro-batch
    padded with empty rows to a multiple of the data axes (so its rows shard instead of being
    replicated), then `UpdateBatch.on_mesh`. `.jitted` is the bare jitted function (e.g. to
    `.lower()` it on abstract inputs); `.layout` the layout it was made for."""
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

    def run(state: TrainState, frozen: Params, minibatch: UpdateBatch):
        minibatch = minibatch.pad_micro_rows(layout.data_parallel_size)
        return jitted(state, frozen, minibatch.on_mesh(layout))

    run.jitted = jitted
    run.layout = layout
    return run


class StepUpdates:
    """The updates of one step, checked and averaged once at its end.

    Each update's metrics and finite flag stay on the device until `mean_metrics`, which
    fetches them all in one transfer (a host sync per update would stall the device queue
    32 times a step), raises naming the first update that was not finite (its state change
    was not applied), and averages each metric over the updates (in float64, in order)."""

    def __init__(self, label: str, *, name_updates: bool = False):
        self.label = label
        self.name_updates = name_updates  # name "<label> (update i)" in the error
        self._metrics: list[dict[str, jax.Array]] = []
        self._finite: list[jax.Array] = []

    def add(self, metrics: dict[str, jax.Array], finite: jax.Array) -> None:
        self._metrics.append(metrics)
        self._finite.append(finite)

    def __len__(self) -> int:
        return len(self._metrics)

    def mean_metrics(self) -> dict[str, float]:
        metrics, finite = jax.device_get((self._metrics, self._finite))
        for index, (values, ok) in enumerate(zip(metrics, finite)):
            if not bool(ok):
                where = f"{self.label} (update {index})" if self.name_updates else self.label
                check_finite(ok, values, step=where)
        summed: dict[str, float] = {}
        for values in metrics:
            for key, value in values.items():
                summed[key] = summed.get(key, 0.0) + float(value)
        return {key: value / len(metrics) for key, value in summed.items()}


def check_finite(finite, metrics: dict[str, jax.Array], step: int | str) -> None:
    """Host-side: raises FloatingPointError naming the update step when the step reported a
    non-finite loss or gradient (the state was left unchanged)."""
    if bool(jax.device_get(finite)):
        return
    values = {k: float(jax.device_get(metrics[k])) for k in ("loss/total", "grad_norm")}
    raise FloatingPointError(
        f"non-finite loss or gradient at update step {step}: loss/total={values['loss/total']}, "
        f"grad_norm={values['grad_norm']}; the update was not applied"
    )
