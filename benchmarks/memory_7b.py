"""Per-device memory of the 7B/8B policy update over 7 devices, from the compiled step (not run).

    python benchmarks/memory_7b.py [--presets=qwen2_5_vl_7b,qwen2_vl_7b,qwen3_vl_8b]
        [--layers=0] [--micro_batches=2] [--rows=14] [--prompt=512] [--response=1024]
        [--image_tokens=256]

Builds Qwen2.5-VL-7B, Qwen2-VL-7B and Qwen3-VL-8B abstractly (jax.ShapeDtypeStruct with
shardings, no memory), lowers and compiles the jitted train step on 7 fake CPU devices (fsdp=7,
as on the 8-GPU node), and prints XLA's per-device memory analysis next to the unsharded state
size. Trainable state = fp32 params + fp32 grads + AdamW mu and nu (16 bytes per parameter);
the frozen tower (bf16) and the reference model (bf16 copy of the trainable params, sharded like
them) are reported separately. Parameters with no dimension divisible by 7 (the vision towers'
widths, and every Qwen3-VL width) are stored padded to a multiple of 7 and sharded
(`sharding/rules.storage_shape`); the padding is counted in the per-device figures.

The persistent state (the step's arguments) is exact. Temporaries are backend-dependent and
overstated on CPU: XLA's CPU backend runs bf16 dots in f32 (so gathered weights and their
gradients appear in f32) and has no reduce-scatter (each gradient is all-reduced at full size,
then sliced). `--no_scan_layers` compiles the model's own unrolled layer loop instead of the
scanned layers (models/layer_scan.py), to show what the scan saves.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=7 " + os.environ.get(
    "EXTRA_XLA_FLAGS", ""
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from maye_jax.models.configs import ModelConfig  # noqa: E402
from maye_jax.models.qwen_vl import build_model  # noqa: E402
from maye_jax.sharding.mesh import make_mesh  # noqa: E402
from maye_jax.tiny import preset_hf_config  # noqa: E402
from maye_jax.training.batch import UpdateBatch  # noqa: E402
from maye_jax.training.optim import OptimizerConfig, make_optimizer  # noqa: E402
from maye_jax.training.train_state import (  # noqa: E402
    TrainableConfig,
    init_train_state,
    plan_layout,
    split_model,
    storage_shapes,
)
from maye_jax.training.update import UpdateConfig, make_train_step  # noqa: E402

GIB = 1024**3


def shard_bytes(shape_dtype: jax.ShapeDtypeStruct) -> int:
    """Bytes one device holds of an array with this sharding."""
    shard = shape_dtype.sharding.shard_shape(shape_dtype.shape)
    return int(np.prod(shard)) * np.dtype(shape_dtype.dtype).itemsize


def full_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def per_device_bytes(tree) -> int:
    return sum(shard_bytes(x) for x in jax.tree.leaves(tree))


def with_shardings(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def abstract_minibatch(layout, config, args) -> UpdateBatch:
    m, p, r = args.micro_batches, args.prompt, args.response
    b = (
        -(-args.rows // layout.data_parallel_size) * layout.data_parallel_size
    )  # padded, as the step pads
    length = p + r
    shapes = dict(
        input_ids=((m, b, length), jnp.int32),
        attention_mask=((m, b, length), jnp.int32),
        positions=((m, b, 3, length), jnp.int32),
        response_mask=((m, b, r), jnp.int32),
        advantages=((m, b, r), jnp.float32),
        logprobs_old=((m, b, r), jnp.float32),
        ref_logprobs=((m, b, r), jnp.float32),
        image_feature_index=((m, b, length), jnp.int32),
        # Qwen3-VL's features carry their DeepStack levels beside the main one
        image_features=(
            (m, b, args.image_tokens, (1 + config.num_deepstack_levels) * config.text.hidden_size),
            jnp.bfloat16,
        ),
    )
    batch = UpdateBatch(**{n: jax.ShapeDtypeStruct(s, d) for n, (s, d) in shapes.items()})
    return with_shardings(batch, batch.shardings(layout))


def measure(preset: str, mesh, args) -> None:
    hf_config = preset_hf_config(preset)
    if args.layers:
        hf_config.text_config.num_hidden_layers = args.layers
    config = ModelConfig.from_hf(hf_config)
    model = build_model(
        config,
        dtype=jnp.dtype(args.dtype),
        param_dtype=jnp.float32,
        remat=not args.no_remat,
        abstract=True,
    )
    model_def, params, frozen = split_model(model, TrainableConfig())
    optimizer, schedule = make_optimizer(OptimizerConfig(), total_updates=100)
    layout = plan_layout(mesh, params, frozen, optimizer)
    num_params = sum(int(np.prod(v.shape)) for v in params.values())  # the model's own
    unsharded_trainable = 4 * full_bytes(params)  # params + grads + mu + nu, fp32
    stored = storage_shapes({**params, **frozen}, mesh)  # padded where 7 divides nothing
    params = {n: jax.ShapeDtypeStruct(stored[n], jnp.float32) for n in params}
    state = with_shardings(
        jax.eval_shape(lambda p: init_train_state(p, optimizer), params), layout.state
    )
    frozen = {
        n: jax.ShapeDtypeStruct(stored[n], jnp.bfloat16, sharding=layout.frozen[n]) for n in frozen
    }
    minibatch = abstract_minibatch(layout, config, args)
    update_config = UpdateConfig(scan_layers=not args.no_scan_layers)
    step = make_train_step(model_def, optimizer, schedule, layout, update_config)

    start = time.perf_counter()
    compiled = step.jitted.lower(state, frozen, minibatch).compile()
    compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()

    sharded_trainable = 4 * per_device_bytes(with_shardings(params, layout.params))
    state_args = per_device_bytes(state)  # params + mu + nu actually passed to the step
    frozen_device = per_device_bytes(frozen)
    reference_device = per_device_bytes(
        {
            n: jax.ShapeDtypeStruct(v.shape, jnp.bfloat16, sharding=layout.params[n])
            for n, v in params.items()
        }
    )
    batch_device = per_device_bytes(minibatch)
    print(
        f"\n== {preset}: {config.text.num_layers} layers, {num_params / 1e9:.2f}B trainable "
        f"params, fsdp=7, compiled in {compile_seconds:.0f} s =="
    )
    print(f"  {layout.report.summary()}")
    print(
        f"  mini-batch: {args.micro_batches} micro-batches x {args.rows} rows x "
        f"{args.prompt}+{args.response} tokens, {args.image_tokens} image features per row; "
        f"{args.dtype} compute, remat per layer: {not args.no_remat}, "
        f"layers scanned: {not args.no_scan_layers}"
    )
    rows = [
        ("trainable state unsharded (params+grads+mu+nu, fp32)", unsharded_trainable),
        ("trainable state per device (from the shardings)", sharded_trainable),
        ("  of which params+mu+nu passed to the step", state_args),
        ("frozen vision tower per device (bf16)", frozen_device),
        ("reference model per device (bf16 copy, sharded; tower shared)", reference_device),
        ("mini-batch arrays per device", batch_device),
        ("compiled: arguments per device", memory.argument_size_in_bytes),
        ("compiled: outputs per device (aliased to donated state)", memory.output_size_in_bytes),
        ("compiled: aliased bytes", memory.alias_size_in_bytes),
        ("compiled: temporaries per device (grads, activations, ...)", memory.temp_size_in_bytes),
    ]
    for label, value in rows:
        print(f"  {label:<66} {value / GIB:9.3f} GiB")
    peak = memory.argument_size_in_bytes + memory.output_size_in_bytes
    peak += memory.temp_size_in_bytes - memory.alias_size_in_bytes
    print(
        f"  {'compiled: peak per device (args + outputs - aliased + temps)':<66} {peak / GIB:9.3f} GiB"
    )
    ratio = unsharded_trainable / sharded_trainable
    verdict = "meets" if ratio >= 6.5 else "MISSES"
    print(f"  trainable state: unsharded / per device = {ratio:.2f}x ({verdict} the >= 6.5x goal)")
    frozen_in_step = memory.argument_size_in_bytes - state_args - batch_device
    print(
        f"  frozen tower: {frozen_device / GIB:.2f} GiB per device, read by the step: "
        f"{frozen_in_step / GIB:.2f} GiB (image features come precomputed, so jit drops it); "
        f"reference model (outside the step): {reference_device / GIB:.2f} GiB per device"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="qwen2_5_vl_7b,qwen2_vl_7b,qwen3_vl_8b")
    parser.add_argument(
        "--layers", type=int, default=0, help="override the decoder depth (0: the preset's)"
    )
    parser.add_argument("--micro_batches", type=int, default=2)
    parser.add_argument("--rows", type=int, default=14, help="rows per micro-batch (global)")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--response", type=int, default=1024)
    parser.add_argument("--image_tokens", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
    parser.add_argument("--no_remat", action="store_true")
    parser.add_argument(
        "--no_scan_layers", action="store_true", help="the model's own unrolled layer loop"
    )
    args = parser.parse_args()
    mesh = make_mesh(fsdp=7)
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}")
    for preset in args.presets.split(","):
        measure(preset, mesh, args)


if __name__ == "__main__":
    main()
