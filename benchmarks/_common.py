"""Shared pieces of the GPU benchmarks (issue 7): sizes, random weights made on the device,
batches at the real lengths, baselines measured in the same run, timing, memory, the JSON report.

Import this module before JAX: it sets the GPU allocator to use 95% of the device memory
(`XLA_PYTHON_CLIENT_MEM_FRACTION`, unless already set), so the 3B/7B steps get room.

Sizes (`--size`): `3b` = Qwen2.5-VL-3B, `7b` = Qwen2.5-VL-7B, `qwen2_vl_7b` = Qwen2-VL-7B (the
published shapes of models/presets.py, the real 152k vocabulary), and `tiny` (hidden 64, 2
layers, 1k vocabulary, short sequences): the same code path, seconds on a CPU, for the tests.

Over ~500 lines on purpose: every GPU benchmark's shared setup, so that each script stays one
command of its own.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from maye_jax.data.sequences import SequenceBatch, make_sequence_batch  # noqa: E402
from maye_jax.models.configs import ModelConfig, TextConfig, VisionConfig  # noqa: E402
from maye_jax.models.qwen_vl import build_model  # noqa: E402
from maye_jax.qwen_ids import PAD_ID  # noqa: E402
from maye_jax.tiny import preset_hf_config, small_vocab_token_ids  # noqa: E402
from maye_jax.training.train_state import (  # noqa: E402
    TrainableConfig,
    init_train_state,
    plan_layout,
    split_model,
)

GIB = 1024**3
GB = 1e9
# One H200 as lent here shows about 139 GiB; the allocator gets 95% of it (see above).
H200_USABLE_BYTES = int(0.95 * 139 * GIB)

PRESET_OF_SIZE = {"3b": "qwen2_5_vl_3b", "7b": "qwen2_5_vl_7b", "qwen2_vl_7b": "qwen2_vl_7b"}
SIZES = ("tiny", *PRESET_OF_SIZE)
TINY_VOCAB = 1024


# --------------------------------------------------------------------------------------------------
# Model configs and sequence lengths
# --------------------------------------------------------------------------------------------------


def preset_config(name: str) -> ModelConfig:
    """ModelConfig of a published model (models/presets.py), through its transformers config."""
    return ModelConfig.from_hf(preset_hf_config(name))


def tiny_config(family: str = "qwen2_5_vl") -> ModelConfig:
    """The shapes of maye_jax.tiny.tiny_hf_config (hidden 64, 2 layers) with a 1k vocabulary."""
    ids = small_vocab_token_ids(TINY_VOCAB)
    text = TextConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        mrope_section=(4, 6, 6),
    )
    vision = VisionConfig(
        depth=2,
        embed_dim=32,
        num_heads=1,
        mlp_hidden_dim=64,
        out_dim=64,
        hidden_act="silu",
        window_size=56,
        fullatt_block_indexes=(1,),
    )
    return ModelConfig(family, text, vision, tie_word_embeddings=False, **ids)


def model_config(size: str) -> ModelConfig:
    if size == "tiny":
        return tiny_config()
    if size not in PRESET_OF_SIZE:
        raise ValueError(f"--size must be one of {SIZES}, got {size!r}")
    return preset_config(PRESET_OF_SIZE[size])


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Tokens per row: the prompt (image tokens included) and the response."""

    prompt: int
    response: int
    image_tokens: int

    @property
    def total(self) -> int:
        return self.prompt + self.response


# The real lengths: prompt ~1k incl. ~400 image tokens, responses up to 2048.
REAL_LENGTHS = Lengths(prompt=1024, response=2048, image_tokens=400)
TINY_LENGTHS = Lengths(prompt=64, response=64, image_tokens=16)


def lengths_for(size: str, prompt: int = 0, response: int = 0, image_tokens: int = -1) -> Lengths:
    """The size's default lengths, overridden by the flags that are set (0 / -1: default)."""
    base = TINY_LENGTHS if size == "tiny" else REAL_LENGTHS
    return Lengths(
        prompt=prompt or base.prompt,
        response=response or base.response,
        image_tokens=base.image_tokens if image_tokens < 0 else image_tokens,
    )


def add_size_flags(parser, default_size: str = "3b") -> None:
    parser.add_argument("--size", choices=SIZES, default=default_size)
    parser.add_argument("--prompt", type=int, default=0, help="prompt tokens (0: the size's)")
    parser.add_argument("--response", type=int, default=0, help="response tokens (0: the size's)")
    parser.add_argument(
        "--image_tokens", type=int, default=-1, help="image tokens per prompt (-1: the size's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="write the results as JSON to this file")


def llm_param_count(config: ModelConfig) -> int:
    """Parameters of the text decoder: embeddings, layers, final norm and an untied lm_head."""
    abstract = build_model(config, abstract=True)
    _, params, _ = split_model(abstract, TrainableConfig())
    return sum(math.prod(v.shape) for v in params.values())


# --------------------------------------------------------------------------------------------------
# Random weights, made on the device
# --------------------------------------------------------------------------------------------------


def _random_split(config, trainable, compute_dtype, frozen_dtype, remat, seed, attention="xla"):
    model = build_model(
        config,
        dtype=compute_dtype,
        param_dtype=jnp.float32,
        seed=seed,
        remat=remat,
        attention=attention,
    )
    _, params, frozen = split_model(model, trainable)
    return params, {n: v.astype(frozen_dtype) for n, v in frozen.items()}


def random_params(
    config: ModelConfig,
    *,
    trainable: TrainableConfig = TrainableConfig(),  # noqa: B008 (frozen dataclass)
    compute_dtype=jnp.bfloat16,
    frozen_dtype=jnp.bfloat16,
    remat: bool | str = False,
    attention: str = "xla",
    seed: int = 0,
):
    """(model_def, trainable params in fp32, frozen params in `frozen_dtype`) of a randomly
    initialised model (the model's own initialisers), generated by one jitted program on the
    device: no host copy, no second copy on the device."""
    abstract = build_model(
        config,
        dtype=compute_dtype,
        param_dtype=jnp.float32,
        remat=remat,
        attention=attention,
        abstract=True,
    )
    model_def = split_model(abstract, trainable)[0]
    init = jax.jit(
        lambda: _random_split(
            config, trainable, compute_dtype, frozen_dtype, remat, seed, attention
        )
    )
    params, frozen = init()
    return model_def, params, frozen


def abstract_train_state(
    config: ModelConfig,
    optimizer,
    mesh,
    *,
    trainable: TrainableConfig,
    compute_dtype=jnp.bfloat16,
    frozen_dtype=jnp.bfloat16,
    remat: bool | str = True,
    attention: str = "xla",
):
    """(model_def, state, frozen, layout) as jax.ShapeDtypeStructs with their shardings: what
    `create_train_state` would make, without memory (for compile-only memory estimates)."""
    abstract = build_model(
        config,
        dtype=compute_dtype,
        param_dtype=jnp.float32,
        remat=remat,
        attention=attention,
        abstract=True,
    )
    model_def, params, frozen = split_model(abstract, trainable)
    layout = plan_layout(mesh, params, frozen, optimizer, frozen_dtype=frozen_dtype)
    params = {n: jax.ShapeDtypeStruct(v.shape, jnp.float32) for n, v in params.items()}
    state = jax.eval_shape(lambda p: init_train_state(p, optimizer), params)
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, layout.state
    )
    frozen = {
        n: jax.ShapeDtypeStruct(v.shape, frozen_dtype, sharding=layout.frozen[n])
        for n, v in frozen.items()
    }
    return model_def, state, frozen, layout


def random_train_state(
    config: ModelConfig,
    optimizer,
    mesh,
    *,
    trainable: TrainableConfig,
    compute_dtype=jnp.bfloat16,
    frozen_dtype=jnp.bfloat16,
    remat: bool | str = True,
    attention: str = "xla",
    seed: int = 0,
):
    """(model_def, state, frozen, layout) as `train_state.create_train_state` returns them (fp32
    master weights, AdamW moments, frozen tower in bf16, sharded by `plan_layout`), with random
    weights generated inside the same jitted program that builds the state."""
    model_def, _, _, layout = abstract_train_state(
        config,
        optimizer,
        mesh,
        trainable=trainable,
        compute_dtype=compute_dtype,
        frozen_dtype=frozen_dtype,
        remat=remat,
        attention=attention,
    )

    def init():
        params, frozen = _random_split(
            config, trainable, compute_dtype, frozen_dtype, remat, seed, attention
        )
        return init_train_state(params, optimizer), frozen

    state, frozen = jax.jit(init, out_shardings=(layout.state, layout.frozen))()
    return model_def, state, frozen, layout


# --------------------------------------------------------------------------------------------------
# Batches at the real lengths
# --------------------------------------------------------------------------------------------------


def image_grid(image_tokens: int, merge: int) -> tuple[int, int, int]:
    """A (t, h, w) patch grid of one image that gives `image_tokens` tokens after merging."""
    side = max(d for d in range(1, int(math.isqrt(image_tokens)) + 1) if image_tokens % d == 0)
    return (1, side * merge, image_tokens // side * merge)


def text_id_limit(config: ModelConfig) -> int:
    """Random text tokens are drawn below this id (no special tokens)."""
    return min(config.vision_start_token_id, config.text.vocab_size, 150_000) - 8


def pad_id_of(config: ModelConfig) -> int:
    return PAD_ID if config.text.vocab_size > PAD_ID else 0


def random_prompt(config: ModelConfig, lengths: Lengths, rng) -> dict:
    """A processor-like prompt of exactly `lengths.prompt` tokens: text, one image of
    `lengths.image_tokens` tokens (vision start/end around it), text; random pixels."""
    limit = text_id_limit(config)
    if lengths.image_tokens == 0:
        return dict(input_ids=rng.integers(0, limit, lengths.prompt).astype(np.int32))
    grid = image_grid(lengths.image_tokens, config.vision.spatial_merge_size)
    image = [config.vision_start_token_id]
    image += [config.image_token_id] * lengths.image_tokens + [config.vision_end_token_id]
    text = lengths.prompt - len(image)
    if text < 2:
        raise ValueError(f"prompt of {lengths.prompt} tokens cannot hold {len(image)} image tokens")
    before = rng.integers(0, limit, text // 4)
    after = rng.integers(0, limit, text - text // 4)
    ids = np.concatenate([before, image, after]).astype(np.int32)
    pixels = rng.standard_normal((math.prod(grid), config.vision.patch_dim), np.float32)
    return dict(input_ids=ids, pixel_values=pixels, image_grid_thw=np.array([grid]))


def random_sequences(config: ModelConfig, lengths: Lengths, rows: int, seed: int) -> SequenceBatch:
    """`rows` full-length rows (no padding): prompt + a response of `lengths.response` tokens,
    laid out by maye_jax.data.sequences (host-side M-RoPE positions, packed images)."""
    rng = np.random.default_rng(seed)
    prompts = [random_prompt(config, lengths, rng) for _ in range(rows)]
    limit = text_id_limit(config)
    responses = [list(rng.integers(0, limit, lengths.response)) for _ in range(rows)]
    return make_sequence_batch(
        prompts,
        responses,
        config,
        pad_id=pad_id_of(config),
        prompt_multiple=16,
        length_multiple=16,
        response_len=lengths.response,
    )


# --------------------------------------------------------------------------------------------------
# Timing and the baselines measured in the same run
# --------------------------------------------------------------------------------------------------


def seven_b_proportions(config: ModelConfig) -> ModelConfig:
    """`config`'s decoder with a 7B's proportions at its hidden size: head_dim 128, the MLP
    18944 / 3584 of hidden (rounded to 64), 2 query heads per KV head."""
    heads = max(1, config.text.hidden_size // 128)
    text = dataclasses.replace(
        config.text,
        intermediate_size=round(config.text.hidden_size * 18944 / 3584 / 64) * 64,
        num_heads=heads,
        num_kv_heads=max(1, heads // 2),
        mrope_section=(16, 24, 24),
    )
    return dataclasses.replace(config, text=text)


def fp32_update_step(config: ModelConfig, update_config):
    """(the random fp32 model of `config`, its jitted train step, train state, frozen) on one
    device, AdamW at a constant 1e-5: the update the CPU benchmarks time."""
    from maye_jax.sharding.mesh import make_mesh
    from maye_jax.training.optim import OptimizerConfig, make_optimizer
    from maye_jax.training.train_state import create_train_state
    from maye_jax.training.update import make_train_step

    model = build_model(config, seed=0)
    optimizer, schedule = make_optimizer(
        OptimizerConfig(learning_rate=1e-5, schedule="constant"), total_updates=1000
    )
    model_def, state, frozen, layout = create_train_state(
        model, make_mesh(fsdp=1), optimizer, frozen_dtype=jnp.float32
    )
    step = make_train_step(model_def, optimizer, schedule, layout, update_config)
    return model, step, state, frozen


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    """Median wall seconds of `run()` (which must block until its result is ready) over
    `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return dict(median=statistics.median(times), min=min(times), max=max(times), times=times)


def default_matmul_size() -> int:
    return 8192 if jax.devices()[0].platform == "gpu" else 256


def matmul_baseline(size: int = 0, repeats: int = 10, chain: int = 8, dtype=jnp.bfloat16) -> dict:
    """[n, n] @ [n, n] in `dtype` (bf16 by default) on random data, `chain` dependent products
    in one program (so dispatch does not count): the rate that model FLOPs are compared with
    (MFU)."""
    size = size or default_matmul_size()
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), dtype)
    b = (jax.random.normal(key_b, (size, size)) / math.sqrt(size)).astype(dtype)
    products = jax.jit(lambda x, w: jax.lax.fori_loop(0, chain, lambda _, y: y @ w, x))
    timing = median_seconds(lambda: products(a, b).block_until_ready(), repeats, warmup=2)
    flops = 2 * size**3 * chain
    return dict(
        size=size, flops=flops, seconds=timing["median"], tflops=flops / timing["median"] / 1e12
    )


def default_bandwidth_bytes() -> int:
    return GIB if jax.devices()[0].platform == "gpu" else 16 * 2**20


def memory_bandwidth_baseline(num_bytes: int = 0, repeats: int = 10, chain: int = 8) -> dict:
    """Device memory GB/s of `x = 2 * x` over a bf16 array, `chain` times in one program
    (bytes read + bytes written)."""
    num_bytes = num_bytes or default_bandwidth_bytes()
    x = jnp.ones((num_bytes // 2,), jnp.bfloat16)
    scale = jax.jit(lambda v: jax.lax.fori_loop(0, chain, lambda _, y: y * 2, v))
    timing = median_seconds(lambda: scale(x).block_until_ready(), repeats, warmup=2)
    moved = 2 * num_bytes * chain
    return dict(bytes=num_bytes, seconds=timing["median"], gbs=moved / timing["median"] / GB)


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


def device_memory() -> dict | None:
    """The allocator's counters of device 0 (GPU: peak_bytes_in_use, bytes_limit, ...); None
    where the backend does not expose them (CPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit", "largest_alloc_size")
    return {k: int(stats[k]) for k in keys if k in stats}


def peak_bytes() -> int | None:
    stats = device_memory()
    return None if stats is None else stats.get("peak_bytes_in_use")


def compiled_memory(compiled) -> dict:
    """XLA's memory analysis of a compiled program (per device), and its peak estimate:
    arguments + outputs - aliased (donated) + temporaries."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    out = dict(
        argument_bytes=int(analysis.argument_size_in_bytes),
        output_bytes=int(analysis.output_size_in_bytes),
        alias_bytes=int(analysis.alias_size_in_bytes),
        temp_bytes=int(analysis.temp_size_in_bytes),
    )
    out["peak_estimate_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    )
    return out


@contextlib.contextmanager
def failure_recorded(report: Report):
    """Records an exception in the report (type, message, whether it is an out-of-memory
    error) before letting it end the run."""
    try:
        yield
    except BaseException as error:
        report.set("error", error_record(error))
        raise


def error_record(error: BaseException) -> dict:
    return dict(
        type=type(error).__name__,
        message=str(error)[:4000],
        out_of_memory=is_out_of_memory(error),
    )


def is_out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))


def gib(num_bytes: int | float | None) -> str:
    """Bytes in GiB (MiB below 0.1 GiB); "n/a" where the backend gives no number."""
    if num_bytes is None:
        return "n/a"
    if num_bytes < 0.1 * GIB:
        return f"{num_bytes / 2**20:.2f} MiB"
    return f"{num_bytes / GIB:.2f} GiB"


def gb(num_bytes: int | float) -> str:
    """Bytes in GB (1e9; MB below 0.1 GB), the unit of the bandwidth figures."""
    return f"{num_bytes / GB:.2f} GB" if num_bytes >= 0.1 * GB else f"{num_bytes / 1e6:.2f} MB"


def secs(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 0.01 else f"{seconds * 1e3:.3f} ms"


def count(number: int) -> str:
    """A parameter count as 3.086 B or 0.214 M."""
    return f"{number / 1e9:.3f} B" if number >= 1e8 else f"{number / 1e6:.3f} M"


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def environment() -> dict:
    device = jax.devices()[0]
    return dict(
        platform=device.platform,
        device_kind=device.device_kind,
        num_devices=len(jax.devices()),
        jax=jax.__version__,
        python=platform.python_version(),
        host=platform.node(),
        memory=device_memory(),
    )


class Report:
    """Results of one benchmark run, rewritten to `path` (JSON) after every `set`, so a run
    cut short by a time limit still leaves what it measured."""

    def __init__(self, path: str, benchmark: str, args) -> None:
        self.path = path
        self.data: dict = dict(
            benchmark=benchmark,
            args=vars(args),
            environment=environment(),
            started=time.strftime("%Y-%m-%d %H:%M:%S"),
            complete=False,
        )
        env = self.data["environment"]
        print(
            f"{benchmark}: {env['num_devices']} x {env['device_kind']} ({env['platform']}), "
            f"jax {env['jax']}; args {vars(args)}",
            flush=True,
        )
        self.save()

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def finish(self) -> None:
        self.data["environment"]["memory"] = device_memory()
        self.set("complete", True)

    def save(self) -> None:
        if not self.path:
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        temporary = f"{self.path}.tmp"
        with open(temporary, "w") as file:
            json.dump(self.data, file, indent=1, default=_json_default)
        os.replace(temporary, self.path)


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def log(message: str) -> None:
    print(message, flush=True)


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    """The short table every benchmark prints last."""
    width = max(len(label) for label, _ in rows)
    print(f"\n== {title}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    sys.stdout.flush()
