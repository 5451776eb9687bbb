"""The update batch of a step whose rows live on several processes (multi-host runs).

Each process builds the rows of its own share of the step's prompts (`MinibatchMaker`'s rows,
host arrays). `GlobalMinibatches` makes every row field one global array, rows in process order
(process 0's rows, then process 1's, ...: the step's global row order), sharded over the data
axes, and gathers each mini-batch on the devices with a jitted take of a replicated index. So a
mini-batch mixes rows of every host exactly as the global order says, and the numbers equal
those of one process holding every row. A process's rows are padded with empty rows to a
multiple of its data devices (global arrays split evenly); padding rows are never picked.

A vision tower that trains runs inside the step on each micro-batch's packed images
(`batch.micro_batch_images`), and a micro-batch mixes every host's rows: so every process holds
every prompt's images (gathered once per step) and packs each micro-batch the same way; the
packed images and their index reach the step replicated. Every process runs the one program
whatever its rows hold (a micro-batch without images runs the tower on padding slots), so a
host whose rows are all text-only cannot hang the others.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from maye_jax.run.multihost import allgather_objects, allgather_rows
from maye_jax.sharding.layout import DATA_AXES, Layout, row_sharding
from maye_jax.training.batch import _PAD_VALUES, TowerImages, UpdateBatch, micro_batch_images


@dataclasses.dataclass(frozen=True)
class _MeshLayout:
    """What `UpdateBatch.shardings` needs of a layout: the mesh and its replicated sharding."""

    mesh: object

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())


def _pad_rows(value: np.ndarray, rows: int, fill) -> np.ndarray:
    out = np.full((rows,) + value.shape[1:], fill, value.dtype)
    out[: value.shape[0]] = value
    return out


def process_block(local_rows: UpdateBatch, padded_rows: int) -> dict[str, np.ndarray]:
    """This process's block of every global row array: its rows, then empty rows up to
    `padded_rows` (JAX puts process p's block at rows [p * padded_rows, (p + 1) * padded_rows))."""
    return {
        name: _pad_rows(np.asarray(value), padded_rows, _PAD_VALUES.get(name, 0))
        for name, value in local_rows.row_fields().items()
    }


@functools.partial(jax.jit, static_argnames=("num_micro", "micro_rows", "mesh"))
def _select(rows: UpdateBatch, index: jax.Array, *, num_micro: int, micro_rows: int, mesh):
    """Rows `index` of the global batch as `num_micro` micro-batches of `micro_rows` rows (the
    picked rows, then empty padding rows), sharded like `UpdateBatch.shardings`."""
    picked = jax.tree.map(lambda a: jnp.take(a, index, axis=0), rows).split(num_micro)
    missing = micro_rows - picked.num_rows
    padded = {}
    for name, value in picked.row_fields().items():
        widths = [(0, 0)] * value.ndim
        widths[1] = (0, missing)
        padded[name] = jnp.pad(value, widths, constant_values=_PAD_VALUES.get(name, 0))
    batch = dataclasses.replace(picked, **padded)
    return jax.lax.with_sharding_constraint(batch, batch.shardings(_MeshLayout(mesh)))


class GlobalMinibatches:
    """The mini-batches of one step from this process's rows (see the module doc)."""

    def __init__(
        self,
        local_rows: UpdateBatch,
        layout: Layout,
        *,
        num_processes: int,
        tower: TowerImages | None = None,
    ):
        """`tower`: this process's prompts' images and the prompt of each of its rows, for a
        tower that trains (the rows then mark image tokens with an index >= 0)."""
        if local_rows.vision is not None:
            raise ValueError("packed images are made per mini-batch here: pass `tower`")
        mesh = layout.mesh
        data_devices = int(np.prod([mesh.shape[a] for a in DATA_AXES if a in mesh.shape]))
        per_process = max(1, data_devices // num_processes)
        self.local_rows = local_rows.num_rows
        self.padded_rows = -(-self.local_rows // per_process) * per_process
        self.num_processes = num_processes
        self.num_rows = self.local_rows * num_processes  # real rows, every process's
        self.layout = layout
        global_rows = self.padded_rows * num_processes
        fields = {}
        for name, value in process_block(local_rows, self.padded_rows).items():
            shape = (global_rows,) + value.shape[1:]
            sharding = row_sharding(mesh, shape, 0)
            fields[name] = jax.make_array_from_process_local_data(sharding, value, shape)
        self.rows = dataclasses.replace(local_rows, **fields)
        self.tower = None if tower is None else _every_process_images(tower, local_rows)

    def global_index(self, picked: np.ndarray) -> np.ndarray:
        """Real row r (process r // L's row r % L) -> its row in the padded global arrays."""
        picked = np.asarray(picked)
        return (picked // self.local_rows) * self.padded_rows + picked % self.local_rows

    def __call__(self, picked: np.ndarray | None, num_micro: int) -> UpdateBatch:
        """The mini-batch of real rows `picked` (None: all) in `num_micro` micro-batches, each
        padded to a multiple of the data axes: ready for the step."""
        picked = np.arange(self.num_rows) if picked is None else np.asarray(picked)
        if len(picked) % num_micro:
            raise ValueError(f"{len(picked)} rows do not split into {num_micro} micro-batches")
        ways = self.layout.data_parallel_size
        micro_rows = -(-(len(picked) // num_micro) // ways) * ways
        # the same index on every process, replicated on every device
        index = jax.device_put(
            np.asarray(self.global_index(picked), np.int32),
            _MeshLayout(self.layout.mesh).replicated,
        )
        batch = _select(
            self.rows, index, num_micro=num_micro, micro_rows=micro_rows, mesh=self.layout.mesh
        )
        if self.tower is None:
            return batch
        tower, is_image_token = self.tower
        vision, feature_index = micro_batch_images(
            tower.prompt_images,
            tower.row_prompt[picked],
            is_image_token[picked],
            num_micro,
            tower.vision_config,
        )
        feature_index = feature_index.reshape(num_micro, -1, feature_index.shape[-1])
        padded = np.full((num_micro, micro_rows, feature_index.shape[-1]), -1, np.int32)
        padded[:, : feature_index.shape[1]] = feature_index
        # the same host arrays on every process: replicated global arrays (the step shards
        # the index with the rows)
        replicated = _MeshLayout(self.layout.mesh).replicated
        return dataclasses.replace(
            batch, image_feature_index=jax.device_put(padded, replicated)
        ).with_vision({n: jax.device_put(v, replicated) for n, v in vision.items()})


def _every_process_images(tower: TowerImages, local_rows: UpdateBatch):
    """(TowerImages of every process's prompts, with the global prompt of each real row in
    process order; each real row's image-token mask [rows, L]), the same on every process."""
    per_process = allgather_objects(list(tower.prompt_images))
    offsets = np.cumsum([0] + [len(p) for p in per_process])
    me = jax.process_index()
    local_prompt = np.where(tower.row_prompt >= 0, tower.row_prompt + offsets[me], -1)
    prompts = [image for images in per_process for image in images]
    row_prompt = allgather_rows(local_prompt.astype(np.int64))
    is_image_token = allgather_rows(np.asarray(local_rows.image_feature_index) >= 0)
    return TowerImages(prompts, row_prompt, tower.vision_config), is_image_token


def agree_on_image_features(batch, features, feature_width: int):
    """(features, feature table size) every process shares: the most image tokens of any row
    of any process; a process whose prompts have no image gets zeros of `feature_width` (in the
    dtype the others' tower gave), which its rows never place."""
    per_row = int((batch.image_feature_index >= 0).sum(axis=1).max())
    most = int(allgather_rows(np.asarray([per_row])).max())
    dtypes = allgather_objects(None if features is None else str(features.dtype))
    if most and features is None:
        dtype = next(d for d in dtypes if d is not None)
        features = jnp.zeros((1, feature_width), dtype)
    return features, most
