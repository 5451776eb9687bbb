"""The pieces of benchmarks/gpu_update.py: a variant of the update, its compile on abstract arrays
(XLA's memory estimate without any weights), and the real state, tower features and mini-batch.

A variant is compiled once, on abstract arrays; the executable then runs on the real arrays (same
shapes, dtypes and shardings), so deciding whether it fits costs no second compile.
"""

from __future__ import annotations

import dataclasses
import math
import time

import _common as common
import jax
import jax.numpy as jnp
import numpy as np

from maye_jax.data.sequences import image_features
from maye_jax.models.shapes import bucket
from maye_jax.rl.losses import LossConfig
from maye_jax.sharding.mesh import make_mesh
from maye_jax.training.batch import MinibatchMaker, UpdateBatch
from maye_jax.training.optim import OptimizerConfig, make_optimizer
from maye_jax.training.train_state import TrainableConfig
from maye_jax.training.update import UpdateConfig, make_train_step

KL_COEFF = 0.001  # the paper's kl_loss_coeff


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration of the update: what trains, the KL term, the mini-batch layout."""

    name: str
    micro_batches: int
    micro_rows: int
    train_embeddings: bool = True
    kl_coeff: float = KL_COEFF

    @property
    def rows(self) -> int:
        return self.micro_batches * self.micro_rows

    @property
    def trainable(self) -> TrainableConfig:
        return TrainableConfig(train_embeddings=self.train_embeddings)


def model_flops(num_params: int, config, rows: int, seq_len: int) -> dict:
    """The issue's model FLOPs of one update: 6 N T + 6 layers hidden S T (gpu_update.py)."""
    tokens = rows * seq_len
    dense = 6 * num_params * tokens
    attention = 6 * config.text.num_layers * config.text.hidden_size * seq_len * tokens
    return dict(tokens=tokens, dense=dense, attention=attention, total=dense + attention)


def tree_bytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def features_per_row(lengths) -> int:
    return bucket(max(lengths.image_tokens, 1), 4)  # as the RL loop rounds it (train.py)


def abstract_minibatch(config, lengths, variant: Variant, layout) -> UpdateBatch:
    m, p, r = variant.micro_batches, lengths.prompt, lengths.response
    ways = layout.data_parallel_size
    b = -(-variant.micro_rows // ways) * ways  # each micro-batch padded as the step pads it
    shapes = dict(
        input_ids=((m, b, p + r), jnp.int32),
        attention_mask=((m, b, p + r), jnp.int32),
        positions=((m, b, 3, p + r), jnp.int32),
        response_mask=((m, b, r), jnp.int32),
        advantages=((m, b, r), jnp.float32),
        logprobs_old=((m, b, r), jnp.float32),
    )
    if variant.kl_coeff:
        shapes["ref_logprobs"] = ((m, b, r), jnp.float32)
    if lengths.image_tokens:
        shapes["image_feature_index"] = ((m, b, p + r), jnp.int32)
        features = (m, b, features_per_row(lengths), config.text.hidden_size)
        shapes["image_features"] = (features, jnp.bfloat16)
    batch = UpdateBatch(**{n: jax.ShapeDtypeStruct(s, d) for n, (s, d) in shapes.items()})
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        batch,
        batch.shardings(layout),
    )


class Compiled:
    """A variant compiled on abstract arrays, with XLA's memory estimate."""

    def __init__(self, args, variant: Variant):
        self.args, self.variant = args, variant
        self.config = common.model_config(args.size)
        self.lengths = common.lengths_for(args.size, args.prompt, args.response, args.image_tokens)
        self.optimizer, schedule = make_optimizer(
            OptimizerConfig(learning_rate=1e-6, schedule="constant"), total_updates=1000
        )
        self.mesh = make_mesh(fsdp=1)
        self.remat = {"layer": True, "dots": "dots", "none": False}[args.remat]
        self.attention = getattr(args, "attention", "xla")
        model_def, state, frozen, layout = common.abstract_train_state(
            self.config,
            self.optimizer,
            self.mesh,
            trainable=variant.trainable,
            remat=self.remat,
            attention=self.attention,
        )
        minibatch = abstract_minibatch(self.config, self.lengths, variant, layout)
        update_config = UpdateConfig(
            loss=LossConfig(kl_loss_coeff=variant.kl_coeff),
            logprob_chunk_size=args.chunk,
            scan_layers=not args.no_scan_layers,
        )
        step = make_train_step(model_def, self.optimizer, schedule, layout, update_config)
        started = time.perf_counter()
        self.executable = step.jitted.lower(state, frozen, minibatch).compile()
        self.compile_seconds = time.perf_counter() - started
        memory = common.compiled_memory(self.executable)
        state_bytes, frozen_bytes = tree_bytes(state), tree_bytes(frozen)
        batch_bytes = tree_bytes(minibatch)
        # the step reads no frozen weight when image features come precomputed (jit drops
        # unused arguments), but the frozen tower stays resident beside it
        frozen_in_args = max(0, memory.get("argument_bytes", 0) - state_bytes - batch_bytes)
        step_resident = memory.get("peak_estimate_bytes", 0) + frozen_bytes - frozen_in_args
        reference_bytes = tree_bytes(state.params) // 2 if variant.kl_coeff else 0
        self.num_params = sum(math.prod(v.shape) for v in state.params.values())
        self.estimate = dict(
            variant=dataclasses.asdict(variant),
            compile_seconds=self.compile_seconds,
            trainable_params=self.num_params,
            state_bytes=state_bytes,
            frozen_bytes=frozen_bytes,
            minibatch_bytes=batch_bytes,
            step_resident_estimate_bytes=step_resident,
            reference_bytes=reference_bytes,
            resident_estimate_bytes=step_resident + reference_bytes,
            **memory,
        )

    def describe(self) -> str:
        return (
            f"{self.variant.name}: compiled in {self.compile_seconds:.1f} s; step peak estimate "
            f"{common.gib(self.estimate.get('peak_estimate_bytes'))}; with the frozen tower "
            f"{common.gib(self.estimate['step_resident_estimate_bytes'])}, and the bf16 "
            f"reference of the RL loop {common.gib(self.estimate['resident_estimate_bytes'])}"
        )

    def allocate(self, seed: int, *, with_reference: bool) -> dict:
        """The real arrays: state, frozen tower, (reference copy), the tower's features of a
        batch (timed) and the mini-batch. Returns them with the tower's timing."""
        arrays = {}
        started = time.perf_counter()
        model_def, arrays["state"], arrays["frozen"], layout = common.random_train_state(
            self.config,
            self.optimizer,
            self.mesh,
            trainable=self.variant.trainable,
            remat=self.remat,
            attention=self.attention,
            seed=seed,
        )
        jax.block_until_ready(arrays["state"])
        arrays["init_seconds"] = time.perf_counter() - started
        if with_reference:
            cast = jax.jit(lambda p: {n: v.astype(jnp.bfloat16) for n, v in p.items()})
            arrays["reference"] = cast(arrays["state"].params)
        batch = common.random_sequences(self.config, self.lengths, self.variant.rows, seed)
        features = None
        if batch.vision is not None:
            vision = jax.tree.map(jnp.asarray, batch.vision)
            tower = jax.jit(
                lambda params, frozen, vision: image_features(
                    model_def.merge(params, frozen), vision
                )
            )

            def run_tower():
                return tower(arrays["state"].params, arrays["frozen"], vision).block_until_ready()

            timing = common.median_seconds(run_tower, self.args.tower_repeats)
            features = run_tower()
            patches = int((np.asarray(batch.vision["full_segment_ids"]) >= 0).sum())
            arrays["tower"] = dict(
                images=self.variant.rows,
                patches=patches,
                image_tokens=self.variant.rows * self.lengths.image_tokens,
                seconds=timing["median"],
                patches_per_second=patches / timing["median"],
            )
        arrays["minibatch"] = real_minibatch(
            batch, features, self.variant, layout, self.config.text.vocab_size, seed
        )
        return arrays


def real_minibatch(batch, features, variant: Variant, layout, vocab_size: int, seed: int):
    """The update's mini-batch from a SequenceBatch and the tower's features, as train.py
    builds it (`MinibatchMaker`), padded and put on the mesh as the step does."""
    rng = np.random.default_rng(seed)
    shape = batch.response_mask.shape
    # random weights give near-uniform next-token distributions: keep the PPO ratios near 1
    uniform_logprob = -math.log(vocab_size)
    per_token = dict(
        advantages=rng.standard_normal(shape).astype(np.float32),
        logprobs_old=rng.normal(uniform_logprob, 0.05, shape).astype(np.float32),
    )
    if variant.kl_coeff:
        per_token["ref_logprobs"] = rng.normal(uniform_logprob, 0.05, shape).astype(np.float32)
    maker = MinibatchMaker.build(batch, per_token=per_token, features=features)
    minibatch = maker(None, variant.micro_batches)
    return minibatch.pad_micro_rows(layout.data_parallel_size).on_mesh(layout)


def run_steps(executable, state, frozen, minibatch, count: int):
    """`count` updates; returns (state, seconds of each, last metrics, all finite)."""
    times, finite_all, metrics = [], True, {}
    for _ in range(count):
        started = time.perf_counter()
        state, metrics, finite = executable(state, frozen, minibatch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - started)
        finite_all = finite_all and bool(finite)
    return state, times, metrics, finite_all
