"""A train checkpoint as a model: `RUN/checkpoints/N` (or `RUN/sft_warmup/checkpoints/N`) holds
only the trainable state (fp32 master weights, optimizer moments); the frozen tensors (the
vision tower by default) are those of the run's start model. `evaluate --model` and
`convert --input` accept such a folder: the start model, with the checkpoint's trained
parameters put in their place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from maye_jax.errors import UserError


def is_train_checkpoint(path) -> bool:
    """An Orbax step folder of a run's checkpoints: `.../checkpoints/<step>/{state,meta}`."""
    path = Path(path)
    return path.parent.name == "checkpoints" and (path / "state").is_dir()


def run_folder_of(checkpoint) -> Path:
    """The folder of the run that wrote `checkpoint` (the SFT warm-up's is its RL run's)."""
    folder = Path(checkpoint).absolute().parent.parent
    return folder.parent if folder.name == "sft_warmup" else folder


def start_model_of(checkpoint) -> Path:
    """The model the run started from: its saved start model (RL), else the configured
    `model.path`, else the tiny model it wrote (`initial_model/`)."""
    run = run_folder_of(checkpoint)
    is_warmup = Path(checkpoint).absolute().parent.parent.name == "sft_warmup"
    if not is_warmup and (run / "start_model" / "maye_jax.json").is_file():
        return run / "start_model"
    record = run / "run.json"
    if record.is_file():
        path = json.loads(record.read_text()).get("config", {}).get("model", {}).get("path")
        if path and (Path(path) / "config.json").is_file():
            return Path(path)
    if (run / "initial_model" / "config.json").is_file():
        return run / "initial_model"
    raise UserError(
        f"{checkpoint}: a train checkpoint holds only the trained tensors, and the start model "
        f"of its run ({run}: start_model/, run.json's model.path, initial_model/) was not found"
    )


def restore_trained_params(checkpoint, model, param_dtype) -> None:
    """Overwrites `model`'s parameters with the checkpoint's trainable ones (only `params` is
    read from the checkpoint, not the optimizer moments)."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    state_dir = os.path.abspath(Path(checkpoint) / "state")
    metadata = ocp.PyTreeCheckpointer().metadata(state_dir)
    tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
    names = list(tree["params"])
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    by_name = {".".join(str(k) for k in path): path for path in flat}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise UserError(f"{checkpoint}: parameters {unknown[:5]} are not in the start model")

    def target(name):  # read straight onto the model's own placement of that parameter
        value = flat[by_name[name]].get_value()
        return jax.ShapeDtypeStruct(value.shape, param_dtype, sharding=value.sharding)

    target = {"params": {name: target(name) for name in names}}
    # not strict: the run may have stored a parameter padded (`rules.storage_shape`), and
    # Orbax reads it at the model's shape
    restore_args = jax.tree.map(
        lambda leaf: ocp.ArrayRestoreArgs(
            global_shape=leaf.shape, dtype=leaf.dtype, sharding=leaf.sharding, strict=False
        ),
        target,
    )
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir,
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
    )
    for name, value in restored["params"].items():
        path = by_name[name]
        flat[path] = flat[path].replace(jax.numpy.asarray(value, param_dtype))
    nnx.update(model, nnx.from_flat_state(flat))
