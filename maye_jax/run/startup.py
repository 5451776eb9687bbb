"""Start-up of a run (shared by RL, SFT, the warm-up and the experiment): the prologue (the
distributed start, the folder's lock, the folder, the data and its fingerprint), logging, the
mesh, the start model, and what a resumed run reloads.

    with run_prologue(settings) as (data, fingerprint):    # RL, SFT, each run of the experiment
        ...

Everything here happens once per run, after `load_settings` has checked the config; the loops
live in train.py / sft.py.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import jax

from maye_jax.config.settings import Settings
from maye_jax.data.layouts import resolve_layout
from maye_jax.data.records import Record, read_records
from maye_jax.errors import UserError
from maye_jax.run import lock, multihost
from maye_jax.run.folder import check_fingerprint, prepare_run_folder
from maye_jax.sharding.mesh import initialize_distributed, make_mesh
from maye_jax.storage.atomic import atomic_folder
from maye_jax.storage.model_folders import is_hf_directory
from maye_jax.storage.run_inputs import RunInputs
from maye_jax.storage.train_checkpoints import has_start_model, start_model_dir

log = logging.getLogger("maye_jax")


@contextlib.contextmanager
def hold_run_folder(settings: Settings, folder=None) -> Iterator[None]:
    """jax.distributed for a run of several processes (before any folder work: its barriers),
    then the lock of `folder` (default: the run's output folder; process 0's), held inside the
    block: one run per folder, so a second run never touches a running one's outputs."""
    init_distributed(settings)
    process_id = multihost.configured_process_id(settings)
    with lock.hold_output_folder(folder or settings.output_dir, process_id=process_id):
        yield


@contextlib.contextmanager
def run_prologue(
    settings: Settings, *, kind: str
) -> Iterator[tuple[dict[str, list[Record]], dict, object]]:
    """Every run's start (RL, SFT, each run of the experiment), before any model work: the
    distributed start and the folder's lock (`hold_run_folder`, to the block's end), the folder
    checked (and, with overwrite, cleared: `prepare_run_folder`), then the data, its
    fingerprint and the processor that read it (`load_run_data`)."""
    with hold_run_folder(settings):
        prepare_run_folder(settings)
        yield load_run_data(settings, kind=kind)


def load_run_data(settings: Settings, *, kind: str) -> tuple[dict[str, list[Record]], dict, object]:
    """(the records of every configured split, the fingerprint of the start model and data,
    the run's processor): the synthetic set is written first when asked, a resumed run's start
    model and data are checked against its run.json, and every prompt against the context
    (run/context.py; `kind`: rl | sft)."""
    from maye_jax.run.context import check_run_prompts

    files = data_files(settings)
    fingerprint = check_fingerprint(settings, files)
    data, processor = check_run_prompts(
        settings, prepare_data(settings, files), kind=kind, files=files
    )
    log.info(
        "data: %s", ", ".join(f"{split} {len(records)} records" for split, records in data.items())
    )
    return data, fingerprint, processor


def data_files(settings: Settings) -> dict[str, str]:
    """The data file of every configured split, writing the synthetic dataset first when
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
    layout = resolve_layout(settings.data)
    return {
        split: read_records(path, layout, fmt=settings.data.format, on_error=settings.data.on_error)
        for split, path in files.items()
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
    processes = multihost.process_count()
    dp = s.dp if s.dp is not None else processes
    mesh = make_mesh(fsdp=s.fsdp, tp=s.tp, dp=dp)
    if processes > 1 and mesh.devices.size != len(jax.devices()):
        raise UserError(
            f"config.sharding: dp={dp} x fsdp={s.fsdp} x tp={s.tp} uses {mesh.devices.size} of "
            f"the {len(jax.devices())} devices of the {processes} processes: "
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
            RunInputs.of_run(settings, eval_step=0).write(folder)
    multihost.barrier("initial model written")
    return path


def rl_policy(settings: Settings, model_dir: Path, optimizer, warmed=None):
    """RL's policy, with the reference model only when a KL term uses it: `warmed`'s weights
    (after an SFT warm-up) with a fresh optimizer, else loaded from `model_dir` (a resumed run:
    from its own saved start point, e.g. the SFT-warmed model)."""
    from maye_jax.training.policy import build_policy, with_fresh_optimizer

    reference = settings.rl.uses_reference
    if warmed is not None:
        return with_fresh_optimizer(settings, warmed, optimizer, with_reference=reference)
    output_dir = Path(settings.output_dir).absolute()
    if settings.resume and has_start_model(output_dir):
        model_dir = start_model_dir(output_dir)
    return build_policy(
        settings, build_mesh(settings), model_dir, optimizer, with_reference=reference
    )


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


def save_start_model(settings: Settings, policy) -> Path:
    """Writes the RL start point (the reference model) so a resumed run can reload it."""
    from maye_jax.storage import model_folders

    output_dir = Path(settings.output_dir).absolute()
    path = start_model_dir(output_dir)
    if not has_start_model(output_dir):
        model_folders.save_orbax(
            path,
            policy.model(),
            policy.hf_config,
            source_dir=policy.source_dir,
            run_inputs=RunInputs.of_run(settings, eval_step=0),  # RL's epoch 0
        )
    return path


def check_multiprocess(settings: Settings, *, kind: str) -> None:
    """What the config alone could not check: the actual process count's constraints (none
    for one process)."""
    from maye_jax.config.cross_checks import multiprocess_problems

    problems = multiprocess_problems(settings, kind, multihost.process_count())
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
