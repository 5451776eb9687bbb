"""Start-up of a run (shared by RL, SFT, the warm-up and the experiment): logging, data, mesh,
the start model, and what a resumed run reloads.

Everything here happens once per run, after `load_settings` has checked the config; the loops
live in train.py / sft.py.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import jax

from maye_jax.config.settings import Settings
from maye_jax.data.records import Record, read_records
from maye_jax.errors import UserError
from maye_jax.run import multihost
from maye_jax.sharding.mesh import initialize_distributed, make_mesh
from maye_jax.storage.atomic import atomic_folder
from maye_jax.storage.model_folders import is_hf_directory
from maye_jax.storage.train_checkpoints import has_start_model, start_model_dir

log = logging.getLogger("maye_jax")


def setup_cli_logging() -> None:
    """maye_jax's INFO lines with timestamps on stderr; everything else (absl, Orbax, JAX) from
    WARNING up.

    Under absl's app.run the root logger already has absl's handler (so `basicConfig` does
    nothing) at absl's verbosity (WARNING hides INFO): maye_jax gets a handler of its own."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    for noisy in ("orbax", "jax", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ours = logging.getLogger("maye_jax")
    if not any(getattr(h, "_maye_cli", False) for h in ours.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s maye_jax %(levelname)s %(message)s"))
        handler._maye_cli = True  # one handler however often this runs
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


def data_files(settings: Settings) -> dict[str, str]:
    """The jsonl file of every configured split, writing the synthetic dataset first when
    asked (deterministic: the same files every time)."""
    from maye_jax.config.cross_checks import data_file

    data = settings.data
    files = {split: data_file(settings, split) for split in ("train", "validation", "test")}
    if data.synth_dir:
        from maye_jax.data.synth import generate, split_paths

        if multihost.is_leader():  # several processes: one writes, the others read
            generate(
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
        multihost.barrier("synthetic data written")
        paths = split_paths(data.synth_dir, data.synth_flavour)
        files = {split: files[split] or str(paths[split]) for split in files}
    return {split: path for split, path in files.items() if path}


def prepare_data(
    settings: Settings, files: dict[str, str] | None = None
) -> dict[str, list[Record]]:
    """Records of every configured split (`files`: from `data_files`, computed when None)."""
    files = data_files(settings) if files is None else files
    if "train" not in files:
        raise ValueError("config.data.train_file (or config.data.synth_dir) is required")
    return {
        split: read_records(path, on_error=settings.data.on_error) for split, path in files.items()
    }


def init_distributed(settings: Settings) -> None:
    """jax.distributed for a run of several processes (a no-op for one, and when done)."""
    s = settings.sharding
    initialize_distributed(
        s.coordinator_address,
        s.num_processes,
        s.process_id,
        local_device_ids=list(s.local_device_ids) if s.local_device_ids else None,
    )
    if s.local_device_ids and len(jax.local_devices()) != len(s.local_device_ids):
        raise UserError(
            f"config.sharding.local_device_ids: {list(s.local_device_ids)}, but JAX sees "
            f"{len(jax.local_devices())} devices on this host ({jax.local_devices()})"
        )


def build_mesh(settings: Settings):
    """The training mesh. `sharding.dp` unset: one dp row per process (HSDP: each host holds a
    whole copy of the weights, sharded over its `fsdp` x `tp` devices)."""
    init_distributed(settings)
    s = settings.sharding
    dp = s.dp if s.dp is not None else jax.process_count()
    mesh = make_mesh(fsdp=s.fsdp, tp=s.tp, dp=dp)
    if jax.process_count() > 1 and mesh.devices.size != len(jax.devices()):
        raise UserError(
            f"config.sharding: dp={dp} x fsdp={s.fsdp} x tp={s.tp} uses {mesh.devices.size} of "
            f"the {len(jax.devices())} devices of the {jax.process_count()} processes: "
            "a multi-process mesh must use every device"
        )
    return mesh


def materialize_start_model(settings: Settings) -> Path:
    """The directory the run starts from: `model.path`, or a tiny random model written
    (HF layout + tokenizer) to OUTPUT_DIR/initial_model."""
    m = settings.model
    if m.path:
        return Path(m.path)
    from maye_jax.data.processor import load_processor
    from maye_jax.tiny import tiny_hf_model

    path = Path(settings.output_dir).absolute() / "initial_model"
    # Written under initial_model.partial and renamed when complete: a folder under the final
    # name is whole. One without weights (written before that was so) is rewritten. Several
    # processes: process 0 writes it, the others wait and read it.
    if multihost.is_leader() and not is_hf_directory(path):
        if path.exists():
            log.warning("%s has no weights (an interrupted write): writing it again", path)
        log.info("start model: a tiny random %s model in %s", m.tiny_family, path)
        hf = tiny_hf_model(
            m.tiny_family,
            vocab_size=151936,
            seed=m.tiny_seed,
            hidden_size=m.tiny_hidden_size,
            num_layers=m.tiny_num_layers,
            initializer_range=0.02,
        )
        with atomic_folder(path, alone=True) as folder:  # process 0 writes it by itself
            hf.save_pretrained(str(folder))
            load_processor(family=m.tiny_family).save_pretrained(folder)
    multihost.barrier("initial model written")
    return path


def load_run_processor(settings: Settings, model_dir, family: str):
    """The processor of the run (the model directory's own files when it has them), with the
    configured pixel bounds."""
    from maye_jax.data.processor import load_processor

    return load_processor(
        str(model_dir),
        family=family,
        min_pixels=settings.data.min_pixels,
        max_pixels=settings.data.max_pixels,
    )


def save_start_model(output_dir, policy) -> Path:
    """Writes the RL start point (the reference model) so a resumed run can reload it."""
    from maye_jax.storage import model_folders

    path = start_model_dir(output_dir)
    if not has_start_model(output_dir):
        model_folders.save_orbax(
            path, policy.model(), policy.hf_config, source_dir=policy.source_dir
        )
    return path


def device_memory_bytes() -> int:
    total = 0
    for device in jax.local_devices():
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats:
            total += int(stats.get("bytes_in_use", 0))
    return total


def check_multiprocess(settings: Settings, *, kind: str) -> None:
    """What the config alone could not check: the actual process count's constraints."""
    from maye_jax.config.cross_checks import multiprocess_problems

    problems = multiprocess_problems(settings, kind, jax.process_count())
    if problems:
        raise UserError("\n".join(problems))


def check_rl_data(settings: Settings, data) -> None:
    """What the config alone cannot check: enough training records for one step."""
    prompts_per_step = settings.rl.batch_size // settings.rollout.num_samples
    if len(data["train"]) < prompts_per_step:
        raise UserError(
            f"config.rl.batch_size: {settings.rl.batch_size} responses of "
            f"{settings.rollout.num_samples} samples = {prompts_per_step} prompts per step, "
            f"more than the {len(data['train'])} training records"
        )
