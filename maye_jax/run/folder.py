"""A run's output folder holds one run, and knows which.

Before any work, `prepare_run_folder` refuses a new run into a folder that holds another run's
outputs (unless `--config.overwrite=True`, which deletes them), and refuses to resume a run
under a config that would change its numbers, naming every key that differs. `run.json`
records the run's config and a fingerprint of its start model and data (`fingerprint`), and a
resumed run must find the same start model and data (`check_fingerprint`).

What a run writes into its folder is RUN_OUTPUTS; anything else there (e.g. the demo's own
synthetic data under `data/`) is not "another run" and is left alone.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

from maye_jax.errors import UserError

log = logging.getLogger("maye_jax")

RUN_OUTPUTS = (
    "run.json",
    "metrics.jsonl",
    "checkpoints",
    "rollouts",
    "eval_responses",
    "initial_model",
    "start_model",
    "sft_warmup",
    "final_hf",
    "best_hf",
    "best.json",
    "tensorboard",
    "wandb",
)

# Options a resumed run may change: they do not change its numbers (logging, checkpoint cadence
# and retention, which evaluations run, where and how fast the worker runs, the device layout).
RESUME_MAY_CHANGE = (
    "name",
    "report_group",
    "output_dir",
    "resume",
    "overwrite",
    "logging.*",
    "checkpoint.*",
    "eval.enabled",
    "eval.at_start",
    "eval.splits",
    "eval.save_responses",
    "eval.batch_size",
    "rollout.worker_python",
    "rollout.worker_devices",
    "rollout.timeout_s",
    "rollout.gpu_memory_utilization",
    "rollout.max_model_len",
    "rollout.max_num_batched_tokens",
    "rollout.worker_cpus",
    "rollout.worker_batch_rows",
    "rollout.sampler_max_rows",
    "rewards.timeout_s",
    "rewards.num_workers",
    "sharding.*",
    "experiment.*",
)


class RunFolderError(UserError):
    """The output folder holds another run, or a resume would change the run's numbers."""


def outputs_present(folder: Path) -> list[str]:
    return [name for name in RUN_OUTPUTS if (folder / name).exists()]


def prepare_run_folder(settings) -> Path:
    """Checks (and, with `overwrite`, clears) the run's folder before any work; returns it.
    Several processes: every one checks (so all raise the same error), process 0 alone clears
    and writes, and all must see the same folder (a shared file system)."""
    from maye_jax.run import multihost

    folder = Path(settings.output_dir).absolute()
    present = _check_run_folder(folder, settings)
    multihost.barrier("run folder checked")
    if multihost.is_leader():
        if present and not settings.resume:  # overwrite (the check refused it otherwise)
            for name in present:
                path = folder / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            log.warning(
                "overwrite: deleted the previous run's %s in %s", ", ".join(present), folder
            )
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".maye-write-probe"
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            raise RunFolderError(f"config.output_dir: {folder} is not writable: {error}") from None
    multihost.barrier("run folder prepared")
    multihost.check_shared_folder(folder)
    return folder


def _check_run_folder(folder: Path, settings) -> list[str]:
    """The run outputs in `folder`; raises when the run may not start there (see the module
    doc). Reads only."""
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"config.output_dir: {folder} is a file, not a folder")
    present = outputs_present(folder) if folder.is_dir() else []
    if settings.resume:
        if (folder / "run.json").is_file():
            check_resume_config(folder, settings.config_dict())
    elif present and not settings.overwrite:
        raise RunFolderError(
            f"config.output_dir: {folder} holds another run ({', '.join(present)}): "
            "resume it with --config.resume=True, choose another --config.output_dir, "
            "or delete that run with --config.overwrite=True"
        )
    return present


def _flatten(config: Mapping, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def resume_differences(recorded: Mapping, current: Mapping) -> list[str]:
    """The keys whose values would change a resumed run's numbers, `key: was -> now`."""
    from maye_jax.config.defaults import default_config

    defaults = _flatten(json.loads(json.dumps(default_config().to_dict(), default=str)))
    was = _flatten(json.loads(json.dumps(recorded, default=str)))
    now = _flatten(json.loads(json.dumps(current, default=str)))
    differences = []
    for key in sorted(set(was) | set(now)):
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUME_MAY_CHANGE):
            continue
        before, after = was.get(key, defaults.get(key)), now.get(key, defaults.get(key))
        if before != after:
            differences.append(f"config.{key}: {before!r} in the run, {after!r} now")
    return differences


def check_resume_config(folder: Path, current: Mapping) -> None:
    recorded = json.loads((folder / "run.json").read_text()).get("config", {})
    differences = resume_differences(recorded, current)
    if differences:
        raise RunFolderError(
            f"config.resume: the run in {folder} was started with other values of options "
            f"that set its numbers ({'; '.join(differences)}); resume with the run's values, or "
            "start a new run (another --config.output_dir, or --config.overwrite=True)"
        )


# --------------------------------------------------------------------------------------------------
# Fingerprints: what the run started from
# --------------------------------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def model_fingerprint(settings) -> dict:
    """The start model: its config and its weight files' names and sizes (hashing 15 GB of
    weights at every start would cost minutes), or the tiny model's settings."""
    m = settings.model
    if not m.path:
        return {
            "tiny": {
                "family": m.tiny_family,
                "hidden_size": m.tiny_hidden_size,
                "num_layers": m.tiny_num_layers,
                "seed": m.tiny_seed,
            }
        }
    path = Path(m.path)
    files = {}
    for child in sorted(path.rglob("*")):
        if child.is_file() and (
            child.suffix in (".safetensors", ".json") or "params" in child.parts
        ):
            files[str(child.relative_to(path))] = child.stat().st_size
    config = path / "config.json"
    return {"config": _file_digest(config) if config.is_file() else None, "files": files}


def _data_digest(path: Path) -> str:
    """A data file's digest (jsonl: its images are named in it; parquet: embedded), or a
    `save_to_disk` folder's: every file's name and content."""
    if not path.is_dir():
        return _file_digest(path)
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{child.relative_to(path)}\0{_file_digest(child)}\0".encode())
    return digest.hexdigest()[:16]


def data_fingerprint(data_files: Mapping[str, str]) -> dict:
    """A digest of each split's data (a jsonl or parquet file, or a `save_to_disk` folder)."""
    return {split: _data_digest(Path(path)) for split, path in sorted(data_files.items())}


def fingerprint(settings, data_files: Mapping[str, str]) -> dict:
    """The start model, the data and (when the run has any) the users' reward functions'
    sources."""
    found = {"start_model": model_fingerprint(settings), "data": data_fingerprint(data_files)}
    functions = getattr(getattr(settings, "rewards", None), "functions", ())
    if functions:
        from maye_jax.rl.user_rewards import source_digests

        found["reward_functions"] = source_digests(functions)
    return found


def check_fingerprint(settings, data_files: Mapping[str, str]) -> dict:
    """The run's fingerprint; on resume, refuses a start model, data or reward function that
    changed since the run began (compared with its run.json)."""
    current = fingerprint(settings, data_files)
    run_json = Path(settings.output_dir).absolute() / "run.json"
    if settings.resume and run_json.is_file():
        recorded = json.loads(run_json.read_text()).get("fingerprint")
        if recorded is not None:
            changed = [
                part
                for part in ("start_model", "data", "reward_functions")
                if recorded.get(part) != current.get(part)
            ]
            if changed:
                raise RunFolderError(
                    f"config.resume: the {' and the '.join(changed)} of the run in "
                    f"{run_json.parent} changed since it started "
                    f"(was {', '.join(str(recorded.get(p)) for p in changed)}; now "
                    f"{', '.join(str(current.get(p)) for p in changed)}); restore them, or start a "
                    "new run"
                )
    return current
