"""Start-up of a run (shared by RL, SFT and the demo): data, mesh, model, train state.

Everything here happens once per run; the loop itself lives in train.py / sft.py.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from maye_jax import checkpoint
from maye_jax.data import Record, read_records
from maye_jax.optim import OptimizerConfig, make_optimizer
from maye_jax.train_checkpoint import has_start_model, start_model_dir
from maye_jax.train_state import (
    TrainableConfig,
    create_train_state,
    load_sharded_model,
    policy_model,
    reference_model,
    reference_params,
)
from models.configs import ModelConfig
from sharding.mesh import initialize_distributed, make_mesh

log = logging.getLogger("maye_jax")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def setup_cli_logging() -> None:
    """Our INFO logs with timestamps; absl's (Orbax, JAX) only from WARNING up."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)


def dtype_of(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(DTYPES)}")
    return DTYPES[name]


def prepare_data(config: ml_collections.ConfigDict) -> dict[str, list[Record]]:
    """Records of every configured split; writes the synthetic dataset first when asked."""
    data = config.data
    files = {"train": data.train_file, "validation": data.validation_file, "test": data.test_file}
    if data.synth_dir:
        from maye_jax.synth import generate

        paths = generate(
            data.synth_dir,
            data.synth_flavour,
            num_train=data.synth_num_train,
            num_validation=data.synth_num_validation,
            num_test=data.synth_num_test,
            seed=data.synth_seed,
            image_size=data.synth_image_size,
            solution_style=data.synth_solution_style,
            max_number=data.synth_max_number,
        )
        files = {split: files[split] or str(paths[split]) for split in files}
    out = {}
    for split, path in files.items():
        if path:
            if data.root and not Path(path).is_absolute():
                path = str(Path(data.root) / path)
            out[split] = read_records(path, on_error=data.on_error)
    if "train" not in out:
        raise ValueError("config.data.train_file (or config.data.synth_dir) is required")
    return out


def build_mesh(config: ml_collections.ConfigDict):
    s = config.sharding
    initialize_distributed(
        s.coordinator_address or None,
        s.num_processes if s.num_processes >= 0 else None,
        s.process_id if s.process_id >= 0 else None,
    )
    return make_mesh(fsdp=s.fsdp, tp=s.tp, dp=s.dp)


def materialize_start_model(config: ml_collections.ConfigDict) -> Path:
    """The directory the run starts from: `config.model.path`, or a tiny random model written
    (HF layout + tokenizer) to OUTPUT_DIR/initial_model."""
    if config.model.path:
        return Path(config.model.path)
    if not config.model.tiny_family:
        raise ValueError("set config.model.path (HF dir or checkpoint) or config.model.tiny_family")
    from maye_jax.processor import load_processor
    from maye_jax.tiny import tiny_hf_model

    path = Path(config.output_dir).absolute() / "initial_model"
    if not (path / "config.json").is_file():
        hf = tiny_hf_model(
            config.model.tiny_family,
            vocab_size=151936,
            seed=config.model.tiny_seed,
            hidden_size=config.model.tiny_hidden_size,
            num_layers=config.model.tiny_num_layers,
            initializer_range=0.02,
        )
        hf.save_pretrained(str(path))
        load_processor(family=config.model.tiny_family).save_pretrained(path)
    return path


@dataclasses.dataclass
class Policy:
    """The sharded policy: definition, train state, frozen params, layout, reference params."""

    model_def: object
    state: object
    frozen: dict
    layout: object
    ref_params: dict | None
    model_config: ModelConfig
    hf_config: object
    source_dir: Path  # where the weights came from (tokenizer/processor files too)

    def model(self):
        return policy_model(self.model_def, self.state, self.frozen)

    def reference(self):
        return (
            None
            if self.ref_params is None
            else reference_model(self.model_def, self.ref_params, self.frozen)
        )


def trainable_config(config) -> TrainableConfig:
    return TrainableConfig(
        train_vit=config.model.train_vit,
        train_connector=config.model.train_connector,
        train_llm=config.model.train_llm,
        train_embeddings=config.model.train_embeddings,
    )


def build_policy(config, mesh, source_dir, optimizer, *, with_reference: bool) -> Policy:
    model, hf_config = load_sharded_model(
        source_dir,
        mesh,
        trainable=trainable_config(config),
        dtype=dtype_of(config.model.dtype),
        frozen_dtype=dtype_of(config.model.frozen_dtype),
        remat=config.model.remat and config.model.remat_policy,
        attention=config.model.attention,
    )
    return _policy_from_model(
        config,
        model,
        mesh,
        optimizer,
        with_reference=with_reference,
        hf_config=hf_config,
        source_dir=Path(source_dir),
    )


def _policy_from_model(
    config, model, mesh, optimizer, *, with_reference: bool, hf_config, source_dir: Path
) -> Policy:
    """Train state (fp32 masters + a fresh optimizer), frozen params and layout of `model` on
    `mesh`, and the reference (a bf16 copy of the trainable weights) when asked."""
    model_def, state, frozen, layout = create_train_state(
        model,
        mesh,
        optimizer,
        trainable=trainable_config(config),
        frozen_dtype=dtype_of(config.model.frozen_dtype),
        max_replicated_fraction=config.sharding.max_replicated_fraction,
    )
    log.info("sharding: %s", layout.report.summary())
    ref = (
        reference_params(state, layout, dtype=dtype_of(config.model.dtype))
        if with_reference
        else None
    )
    return Policy(
        model_def,
        state,
        frozen,
        layout,
        ref,
        ModelConfig.from_hf(hf_config),
        hf_config,
        source_dir,
    )


def optimizer_for(config, total_updates: int, *, learning_rate=None, warmup_fraction=None):
    o = config.optim
    return make_optimizer(
        OptimizerConfig(
            learning_rate=o.learning_rate if learning_rate is None else learning_rate,
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            max_grad_norm=o.max_grad_norm if o.max_grad_norm > 0 else None,
            schedule=o.schedule,
            warmup_fraction=o.warmup_fraction if warmup_fraction is None else warmup_fraction,
        ),
        max(total_updates, 1),
    )


def start_for_sft(config):
    """(data, policy without reference, processor) of a run that begins with SFT: the SFT
    baseline, or the RL demo's warm-up. The optimizer is rebuilt by the SFT runner."""
    from maye_jax.processor import load_processor

    data = prepare_data(config)
    mesh = build_mesh(config)
    source = materialize_start_model(config)
    optimizer, _ = optimizer_for(config, 1)
    policy = build_policy(config, mesh, source, optimizer, with_reference=False)
    processor = load_processor(
        str(source),
        family=policy.model_config.family,
        min_pixels=config.data.min_pixels,
        max_pixels=config.data.max_pixels,
    )
    return data, policy, processor


def save_start_model(output_dir, policy: Policy) -> Path:
    """Writes the RL start point (the reference model) so a resumed run can reload it."""
    path = start_model_dir(output_dir)
    if not has_start_model(output_dir):
        checkpoint.save_orbax(path, policy.model(), policy.hf_config, source_dir=policy.source_dir)
    return path


def device_memory_bytes() -> int:
    total = 0
    for device in jax.local_devices():
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats:
            total += int(stats.get("bytes_in_use", 0))
    return total


def with_fresh_optimizer(c, policy: Policy, optimizer) -> Policy:
    """A fresh optimizer state (and reference = current weights) for an already trained policy,
    e.g. RL after an SFT warm-up, or SFT with its own learning rate schedule."""
    return _policy_from_model(
        c,
        policy.model(),
        policy.layout.mesh,
        optimizer,
        with_reference=True,
        hf_config=policy.hf_config,
        source_dir=policy.source_dir,
    )
