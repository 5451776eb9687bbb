"""The update batch: the rows one policy update learns from, as one typed pytree.

RL (a generation step's trajectory) and SFT (a batch of golden solutions) build it the same way
(`MinibatchMaker`), in one of three forms, by what the vision tower does:

- frozen tower (the paper's setting): its output is computed once per step and each row carries
  its own image features (`image_features` [B, F, D], `per_row_image_features`), so features
  shard and split with the rows;
- training tower: it runs inside the step, on each micro-batch's own packed images (`vision`,
  `micro_batch_images`), so 1 x 8 and 4 x 2 micro-batches give the same gradients;
- text only: no image field at all.

Layout (columns as in `maye_jax/data/sequences.py`: P prompt columns, then R response columns).
Every field but `vision` is a row array whose first axis is the row; once `split` into M
micro-batches, its first two axes are (micro-batch, row):

    input_ids, attention_mask     [B, P + R] int32
    positions                     [B, 3, P + R] int32 (M-RoPE; row-major here, the model takes
                                  [3, b, P + R])
    response_mask                 [B, R]
    advantages, logprobs_old      [B, R] float32
    ref_logprobs                  [B, R] float32, with a KL loss
    logprobs_rollout              [B, R] float32, with the truncated importance-sampling weight
    image_feature_index           [B, P + R] int32, -1 on text tokens: into the row's own
                                  `image_features` (frozen tower) or into its micro-batch's tower
                                  output (training tower)
    image_features                [B, F, D] each row's frozen-tower features
    vision                        {patches, rope_hw, full_segment_ids, window_segment_ids,
                                  grid_hw} (vision_inputs.PackedImages.arrays()), each
                                  [M, ...]: the packed images of each micro-batch (training
                                  tower only); attached after the split, never indexed by rows
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from maye_jax.data.sequences import SequenceBatch, response_bucket
from maye_jax.models.configs import VisionConfig
from maye_jax.models.shapes import bucket
from maye_jax.models.vision_inputs import empty_vision_arrays, pack_images
from maye_jax.sharding.layout import Layout, row_sharding

# The value each row field holds on a padding row: no token is attended or learned from.
_PAD_VALUES = {"image_feature_index": -1}
# Row fields whose last axis is the sequence (P + R columns), and the response (R columns).
_SEQUENCE_FIELDS = ("input_ids", "attention_mask", "positions", "image_feature_index")
_RESPONSE_FIELDS = (
    "response_mask",
    "advantages",
    "logprobs_old",
    "ref_logprobs",
    "logprobs_rollout",
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UpdateBatch:
    input_ids: jax.Array | np.ndarray
    attention_mask: jax.Array | np.ndarray
    positions: jax.Array | np.ndarray
    response_mask: jax.Array | np.ndarray
    advantages: jax.Array | np.ndarray
    logprobs_old: jax.Array | np.ndarray
    ref_logprobs: jax.Array | np.ndarray | None = None
    logprobs_rollout: jax.Array | np.ndarray | None = None
    image_feature_index: jax.Array | np.ndarray | None = None
    image_features: jax.Array | np.ndarray | None = None
    vision: Mapping[str, jax.Array | np.ndarray] | None = None

    # -- shape -------------------------------------------------------------------------------
    @property
    def is_split(self) -> bool:
        """True once split into micro-batches (row arrays [M, b, ...])."""
        return np.ndim(self.input_ids) == 3

    @property
    def row_axis(self) -> int:
        return 1 if self.is_split else 0

    @property
    def num_rows(self) -> int:
        """Rows (per micro-batch once split)."""
        return int(np.shape(self.input_ids)[self.row_axis])

    @property
    def response_len(self) -> int:
        return int(np.shape(self.response_mask)[-1])

    def row_fields(self) -> dict[str, jax.Array | np.ndarray]:
        """The row arrays that are set, by field name."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "vision" and getattr(self, f.name) is not None
        }

    def _with_rows(self, rows: Mapping[str, jax.Array | np.ndarray]) -> UpdateBatch:
        return dataclasses.replace(self, **rows)

    # -- row operations ----------------------------------------------------------------------
    def take(self, rows: np.ndarray | Sequence[int]) -> UpdateBatch:
        """The batch of the given rows, in that order (before the split; host arrays)."""
        if self.is_split or self.vision is not None:
            raise ValueError("take() selects rows of an unsplit batch, before `vision` is attached")
        rows = np.asarray(rows)
        return self._with_rows({n: _take_rows(v, rows) for n, v in self.row_fields().items()})

    def with_response_len(self, response_len: int) -> UpdateBatch:
        """Only the first `response_len` response columns (before the split; every response of
        the batch must fit): sequence fields keep P + response_len columns."""
        if self.is_split:
            raise ValueError("with_response_len() narrows an unsplit batch")
        if np.asarray(self.response_mask)[:, response_len:].any():
            raise ValueError(f"a response of the batch is longer than {response_len}")
        columns = np.shape(self.input_ids)[-1] - self.response_len + response_len
        return self._with_rows(
            {
                n: v[..., : columns if n in _SEQUENCE_FIELDS else response_len]
                for n, v in self.row_fields().items()
                if n in _SEQUENCE_FIELDS or n in _RESPONSE_FIELDS
            }
        )

    def split(self, num_micro: int) -> UpdateBatch:
        """[B, ...] -> [M, B / M, ...]: consecutive rows form a micro-batch."""
        if self.is_split:
            raise ValueError("the batch is split into micro-batches already")
        if num_micro < 1 or self.num_rows % num_micro:
            raise ValueError(f"{self.num_rows} rows do not split into {num_micro} micro-batches")
        per_micro = self.num_rows // num_micro
        return self._with_rows(
            {
                n: v.reshape((num_micro, per_micro) + tuple(v.shape[1:]))
                for n, v in self.row_fields().items()
            }
        )

    def pad_micro_rows(self, multiple: int) -> UpdateBatch:
        """Each micro-batch padded with empty rows (nothing attended, nothing learned) to a
        multiple of `multiple` rows, so its rows shard evenly over the data axes instead of
        being replicated on every device (e.g. 16-row micro-batches over 7 devices -> 21)."""
        if not self.is_split:
            raise ValueError("pad_micro_rows() pads the micro-batches of a split batch")
        missing = -self.num_rows % multiple
        if not missing:
            return self
        padded = {}
        for name, value in self.row_fields().items():
            widths = [(0, 0)] * np.ndim(value)
            widths[1] = (0, missing)
            pad = jnp.pad if isinstance(value, jax.Array) else np.pad
            padded[name] = pad(value, widths, constant_values=_PAD_VALUES.get(name, 0))
        return self._with_rows(padded)

    def with_vision(self, vision: Mapping[str, np.ndarray]) -> UpdateBatch:
        """Attaches each micro-batch's packed images ([M, ...] each) to a split batch."""
        if not self.is_split:
            raise ValueError("vision is attached to a batch split into micro-batches")
        num_micro = np.shape(self.input_ids)[0]
        if any(np.shape(v)[0] != num_micro for v in vision.values()):
            raise ValueError(f"vision arrays must lead with the {num_micro} micro-batches")
        return dataclasses.replace(self, vision=dict(vision))

    # -- placement ---------------------------------------------------------------------------
    def shardings(self, layout: Layout) -> UpdateBatch:
        """NamedShardings of every array: rows over the data axes ('dp', 'fsdp'); the
        micro-batch axis and the packed images are never split."""
        rows = {
            n: row_sharding(layout.mesh, np.shape(v), self.row_axis)
            for n, v in self.row_fields().items()
        }
        vision = None
        if self.vision is not None:
            vision = {n: layout.replicated for n in self.vision}
        return dataclasses.replace(self._with_rows(rows), vision=vision)

    def on_mesh(self, layout: Layout) -> UpdateBatch:
        """The batch put on the mesh (`shardings`)."""
        shardings = self.shardings(layout)
        return jax.tree.map(
            lambda value, sharding: jax.device_put(value, sharding),
            self,
            shardings,
            is_leaf=lambda x: isinstance(x, NamedSharding),
        )


def _take_rows(value: jax.Array | np.ndarray, rows: np.ndarray) -> jax.Array | np.ndarray:
    """Rows of a host array on the host, of a device array on its device (no round trip)."""
    if isinstance(value, jax.Array):
        return jnp.take(value, jnp.asarray(rows), axis=0)
    return np.asarray(value)[rows]


def rows_from_sequences(batch: SequenceBatch, **per_token) -> UpdateBatch:
    """The update rows of a SequenceBatch, with per-token values (advantages, logprobs_old, ...)
    of shape [B, R] and any image fields given by name."""
    return UpdateBatch(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        positions=np.ascontiguousarray(np.moveaxis(np.asarray(batch.positions), 0, 1)),
        response_mask=batch.response_mask,
        **per_token,
    )


# --------------------------------------------------------------------------------------------------
# Image features per row (frozen tower) and packed images per micro-batch (training tower)
# --------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="features_per_row")
def per_row_image_features(
    features: jax.Array,  # [N, D] the tower output of a whole batch (sequences.image_features)
    image_feature_index: jax.Array,  # [B, L] into `features`, -1 on text tokens
    features_per_row: int,  # F >= the largest number of image tokens in a row
) -> tuple[jax.Array, jax.Array]:  # ([B, F, D], [B, L] index into the row's F features)
    """Each row's own image features, so they can be sharded (and split) with the rows."""
    is_image = image_feature_index >= 0
    local_index = jnp.where(is_image, jnp.cumsum(is_image, axis=1) - 1, -1)
    rows = jnp.arange(image_feature_index.shape[0])[:, None]
    slot = jnp.where(is_image, local_index, features_per_row)  # out of range: dropped
    gathered = jnp.take(features, jnp.maximum(image_feature_index, 0), axis=0)  # [B, L, D]
    per_row = jnp.zeros(
        (image_feature_index.shape[0], features_per_row, features.shape[-1]), features.dtype
    )
    per_row = per_row.at[rows, slot].set(gathered, mode="drop")
    return per_row, local_index.astype(jnp.int32)


def micro_batch_images(
    prompt_images: Sequence[tuple[np.ndarray, np.ndarray] | None],
    row_prompt: np.ndarray,  # [B] the prompt of each mini-batch row; -1 on padding rows
    is_image_token: np.ndarray,  # [B, L] bool
    num_micro: int,
    vision_config: VisionConfig,
    *,
    row_len: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each micro-batch's own packed images, for a tower that trains inside the step.

    `prompt_images[p]` = (pixel_values [patches, patch_dim], image_grid_thw [k, 3]) of prompt p,
    or None for a text-only prompt. Micro-batch m holds rows [m*b, (m+1)*b) (as `split` makes
    them); it packs each of its distinct prompts' images once (the samples of one prompt share
    the tower's output, and its gradient sums over them). Returns `vision` {name: [M, rows,
    row_len, ...]} (rows = the most any micro-batch needs, bucketed, so steps compile a bounded
    number of shapes) and `image_feature_index` [B, L]: per row, the index of each image token's
    feature in its own micro-batch's tower output, -1 on text tokens. `row_len` defaults to the
    bucket of the largest image of all prompts."""
    row_prompt = np.asarray(row_prompt)
    is_image_token = np.asarray(is_image_token, bool)
    rows_total = len(row_prompt)
    if rows_total % num_micro:
        raise ValueError(f"{rows_total} rows do not split into {num_micro} micro-batches")
    micro_rows = rows_total // num_micro
    merge_unit = vision_config.spatial_merge_size**2
    sizes = [
        int(np.asarray(grids).reshape(-1, 3).prod(axis=1).max())
        for _, grids in filter(None, prompt_images)
    ]
    row_len = row_len or bucket(max(sizes, default=merge_unit))
    packs, index = [], np.full(is_image_token.shape, -1, np.int32)
    for m in range(num_micro):
        rows = range(m * micro_rows, (m + 1) * micro_rows)
        prompts = [p for p in dict.fromkeys(int(row_prompt[r]) for r in rows) if p >= 0]
        prompts = [p for p in prompts if prompt_images[p] is not None]
        if not prompts:
            packs.append(None)
            continue
        pixels = [np.asarray(prompt_images[p][0]) for p in prompts]
        grids = [np.asarray(prompt_images[p][1]).reshape(-1, 3) for p in prompts]
        packed = pack_images(
            np.concatenate(pixels), np.concatenate(grids), vision_config, row_len=row_len
        )
        packs.append(packed.arrays())
        # Features of prompt p are packed.feature_index[start : start + count], in LLM order.
        counts = [int(g.prod(axis=1).sum()) // merge_unit for g in grids]
        starts = dict(zip(prompts, np.cumsum([0] + counts[:-1]).tolist()))
        for r in rows:
            p = int(row_prompt[r])
            expected = counts[prompts.index(p)] if p in starts else 0
            if int(is_image_token[r].sum()) != expected:
                raise ValueError(
                    f"row {r} (prompt {p}) holds {int(is_image_token[r].sum())} image tokens "
                    f"but its images give {expected} features"
                )
            if expected:
                index[r, is_image_token[r]] = packed.feature_index[starts[p] : starts[p] + expected]
    tower_rows = bucket(max((p["patches"].shape[0] for p in packs if p), default=1), minimum=1)
    # a micro-batch without images runs the tower on padding slots only: its output is never
    # placed, so the tower's gradient from it is exactly zero, and every step has one program
    vision = empty_vision_arrays(tower_rows, row_len, vision_config.patch_dim, (num_micro,))
    for m, pack in enumerate(packs):
        for name, value in (pack or {}).items():
            vision[name][m, : value.shape[0]] = value
    return vision, index


# --------------------------------------------------------------------------------------------------
# The one builder RL and SFT use (`build_minibatches`)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TowerImages:
    """What a tower that trains inside the step needs: each prompt's (pixel_values,
    image_grid_thw) or None, and the prompt of each row (-1 on padding rows)."""

    prompt_images: Sequence[tuple[np.ndarray, np.ndarray] | None]
    row_prompt: np.ndarray  # [B] int
    vision_config: VisionConfig


class MinibatchMaker:
    """The mini-batches of one step, from its rows.

    maker = MinibatchMaker.build(batch, per_token=dict(advantages=..., logprobs_old=...),
                                 features=features, tower=None, response_buckets=(256, 2048))
    minibatch = maker(picked_rows, num_micro)     # an UpdateBatch split into micro-batches

    With `response_buckets` (ascending lengths, `sequences.response_len_buckets`), each
    mini-batch keeps only the response columns of the smallest bucket that holds its longest
    response: the rest is padding, and the step compiles once per bucket.
    """

    def __init__(
        self,
        rows: UpdateBatch,
        tower: TowerImages | None = None,
        response_buckets: Sequence[int] | None = None,
    ):
        self.rows = rows
        self.tower = tower
        self.response_buckets = tuple(response_buckets or ())

    @classmethod
    def build(
        cls,
        batch: SequenceBatch,
        *,
        per_token: Mapping[str, np.ndarray],
        features: jax.Array | None = None,
        tower: TowerImages | None = None,
        response_buckets: Sequence[int] | None = None,
        min_features_per_row: int = 0,
    ) -> MinibatchMaker:
        """`features`: the frozen tower's output [N, D] for `batch.vision` (None: text only, or
        a tower that trains, given as `tower`). Each row's feature table holds at least
        `min_features_per_row` (several processes pass the most of any, so rows agree)."""
        per_token = {n: v for n, v in per_token.items() if v is not None}
        if tower is not None:  # image tokens marked; each micro-batch re-indexes its own
            rows = rows_from_sequences(
                batch, image_feature_index=batch.image_feature_index, **per_token
            )
        elif features is not None:
            per_row = int((batch.image_feature_index >= 0).sum(axis=1).max())
            image_features, local_index = per_row_image_features(
                features,
                batch.image_feature_index,
                features_per_row=bucket(max(per_row, min_features_per_row), 4),
            )
            rows = rows_from_sequences(
                batch, image_features=image_features, image_feature_index=local_index, **per_token
            )
        else:
            if batch.vision is not None:
                raise ValueError("a batch with images needs the frozen tower's features or a tower")
            rows = rows_from_sequences(batch, **per_token)
        return cls(rows, tower, response_buckets)

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows

    def __call__(self, picked: np.ndarray | None, num_micro: int) -> UpdateBatch:
        """The mini-batch of rows `picked` (None: all, in order) in `num_micro` micro-batches."""
        picked = np.arange(self.num_rows) if picked is None else np.asarray(picked)
        chosen = self.rows.take(picked)
        if self.response_buckets:
            longest = int(np.asarray(chosen.response_mask).sum(axis=1).max())
            width = response_bucket(max(longest, 1), self.response_buckets)
            if width < chosen.response_len:
                chosen = chosen.with_response_len(width)
        if self.tower is None:
            return chosen.split(num_micro)
        vision, index = micro_batch_images(
            self.tower.prompt_images,
            self.tower.row_prompt[picked],
            np.asarray(chosen.image_feature_index) >= 0,
            num_micro,
            self.tower.vision_config,
        )
        return (
            dataclasses.replace(chosen, image_feature_index=index)
            .split(num_micro)
            .with_vision(vision)
        )


def build_minibatches(
    batch: SequenceBatch,
    *,
    per_token: Mapping[str, np.ndarray | None],
    features: jax.Array | None,
    tower: TowerImages | None,
    layout: Layout,
    feature_width: int,
    response_buckets: Sequence[int] | None = None,
):
    """The mini-batches of one step, RL's and SFT's alike: a `MinibatchMaker` of this process's
    rows, or with several processes a `GlobalMinibatches` of every process's (each lays out its
    rows' image features with the same table size first; a tower that trains packs every
    process's images). Either is called as `minibatches(picked_rows_or_None, num_micro)`.
    `feature_width`: of one image token's features (a process without images makes zeros of
    it, in the compute dtype of the others)."""
    from maye_jax.run import multihost
    from maye_jax.training.global_batch import GlobalMinibatches, agree_on_image_features

    min_features_per_row = 0
    if multihost.multiprocess() and tower is None:  # the same feature table size everywhere
        features, min_features_per_row = agree_on_image_features(batch, features, feature_width)
    minibatches = MinibatchMaker.build(
        batch,
        per_token=per_token,
        features=features,
        tower=tower,
        min_features_per_row=min_features_per_row,
        response_buckets=response_buckets,
    )
    if multihost.multiprocess():  # every process's rows, one global batch
        return GlobalMinibatches(
            minibatches.rows, layout, num_processes=multihost.process_count(), tower=tower
        )
    return minibatches
