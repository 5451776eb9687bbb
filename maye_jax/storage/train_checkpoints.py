"""Training checkpoints for exact resume: the train state plus where the run stands.

`OUTPUT_DIR/checkpoints/<step>/` holds the sharded train state (trainable params in fp32,
AdamW moments, the update counter; Orbax) and `meta` (JSON): always `generation_step` (the
step it was written after), plus what the loop adds (RL: `seed`, `weights_version`,
`epoch_correct`, the current epoch's per-response correctness so far, and `data_cursor`, the
[epoch, position] the next step reads its prompts from; SFT: `seed`, `kind`). Every random
draw derives from (seed, step), so this is all a resumed run needs to continue exactly where it
stopped. The reference model is the run's start model
(`OUTPUT_DIR/start_model`), reloaded on resume.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


class TrainCheckpointer:
    def __init__(self, output_dir, *, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(output_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, generation_step: int, state, meta: dict) -> None:
        ocp = self._ocp
        self._manager.save(
            generation_step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, generation_step: int, abstract_state):
        """(state, meta); `abstract_state` has ShapeDtypeStructs with the target shardings, so
        each device reads only its own shards."""
        ocp = self._ocp
        restored = self._manager.restore(
            generation_step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["meta"])

    def restore_latest(self, state, state_shardings):
        """(state, meta) of the latest checkpoint, read onto `state`'s shapes and
        `state_shardings`; None when there is none."""
        latest = self.latest_step()
        if latest is None:
            return None
        return self.restore(latest, abstract_like(state, state_shardings))

    def close(self) -> None:
        self._manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` placed with `shardings` (a tree of the same structure)."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        tree,
        shardings,
    )


def start_model_dir(output_dir) -> Path:
    return Path(output_dir).absolute() / "start_model"


def has_start_model(output_dir) -> bool:
    return os.path.isfile(start_model_dir(output_dir) / "maye_jax.json")
