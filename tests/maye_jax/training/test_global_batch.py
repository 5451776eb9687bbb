"""The mini-batches of a step whose rows live on several processes (`GlobalMinibatches`) equal
those one process holding every row makes (`MinibatchMaker`, then the step's padding of each
micro-batch to the data axes), row for row, for several mini-batch and micro-batch counts and
for per-process row counts that do and do not fill the processes' data devices.

The processes are simulated in this one process: each process hands JAX its block of every
global array (`global_batch.process_block`: its rows, then empty rows); here the global
arrays are made from every simulated process's block in process order, which is where
`jax.make_array_from_process_local_data` puts them in a real run (tests/maye_jax/
test_multihost.py runs the real thing).
"""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest

from maye_jax.sharding.layout import data_parallel_size
from maye_jax.sharding.mesh import make_mesh
from maye_jax.training import global_batch
from maye_jax.training.batch import MinibatchMaker, UpdateBatch
from maye_jax.training.global_batch import GlobalMinibatches

PROMPT_LEN, RESPONSE_LEN, FEATURES, WIDTH = 3, 4, 2, 5


def process_rows(rng, process: int, count: int) -> UpdateBatch:
    """`count` rows, every value telling its process and row apart (ids 1000 * p + 10 * r + c),
    with a frozen tower's per-row image features."""
    length = PROMPT_LEN + RESPONSE_LEN
    ids = 1000 * process + 10 * np.arange(count)[:, None] + np.arange(length) + 1
    response_mask = rng.random((count, RESPONSE_LEN)) < 0.7
    response_mask[:, 0] = True
    image_index = np.full((count, length), -1, np.int32)
    image_index[:, :FEATURES] = np.arange(FEATURES)
    return UpdateBatch(
        input_ids=ids.astype(np.int32),
        attention_mask=np.ones((count, length), np.int32),
        positions=np.broadcast_to(np.arange(length), (count, 3, length)).astype(np.int32) + process,
        response_mask=response_mask,
        advantages=rng.normal(size=(count, RESPONSE_LEN)).astype(np.float32),
        logprobs_old=-rng.random((count, RESPONSE_LEN)).astype(np.float32),
        ref_logprobs=-rng.random((count, RESPONSE_LEN)).astype(np.float32),
        image_feature_index=image_index,
        image_features=rng.normal(size=(count, FEATURES, WIDTH)).astype(np.float32),
    )


def global_minibatches(monkeypatch, rows_by_process, layout) -> GlobalMinibatches:
    """`GlobalMinibatches` as every process builds it, each from its own rows."""
    own_block = global_batch.process_block

    def every_process_block(local_rows, padded_rows):
        blocks = [own_block(rows, padded_rows) for rows in rows_by_process]
        return {name: np.concatenate([b[name] for b in blocks]) for name in blocks[0]}

    monkeypatch.setattr(global_batch, "process_block", every_process_block)
    return GlobalMinibatches(rows_by_process[0], layout, num_processes=len(rows_by_process))


def one_process(rows_by_process, picked, num_micro, ways) -> UpdateBatch:
    """What one process holding every row (in process order) gives the step."""
    every = jax.tree.map(lambda *values: np.concatenate(values), *rows_by_process)
    return MinibatchMaker(every)(picked, num_micro).pad_micro_rows(ways)


CASES = [
    # (processes, rows per process, mini-batch rows, micro-batches per mini-batch)
    (2, 4, 8, 1),  # 8 data devices: 4 per process, filled
    (2, 4, 4, 2),  # 2 mini-batches of 2 micro-batches
    (2, 3, 3, 3),  # 3 rows per process, padded to 4: the global rows have holes
    (2, 6, 4, 2),  # 6 rows per process, padded to 8
    (4, 3, 6, 2),  # 4 processes of 2 data devices each, 3 rows padded to 4
    (4, 1, 2, 2),  # one row per process
]


@pytest.mark.parametrize("processes, rows, minibatch_rows, num_micro", CASES)
def test_global_minibatches_hold_the_rows_one_process_puts_there(
    monkeypatch, processes, rows, minibatch_rows, num_micro
):
    mesh = make_mesh(dp=2, fsdp=4)
    layout = types.SimpleNamespace(mesh=mesh, data_parallel_size=data_parallel_size(mesh))
    rng = np.random.default_rng(processes * 100 + rows)
    rows_by_process = [process_rows(rng, p, rows) for p in range(processes)]
    minibatches = global_minibatches(monkeypatch, rows_by_process, layout)
    assert minibatches.num_rows == processes * rows
    order = np.random.default_rng(0).permutation(minibatches.num_rows)
    compared = 0
    for start in range(0, minibatches.num_rows, minibatch_rows):
        picked = order[start : start + minibatch_rows]
        ours = minibatches(picked, num_micro)
        theirs = one_process(rows_by_process, picked, num_micro, layout.data_parallel_size)
        assert ours.row_fields().keys() == theirs.row_fields().keys()
        for name, expected in theirs.row_fields().items():
            np.testing.assert_array_equal(np.asarray(ours.row_fields()[name]), expected, name)
        # the rows are split over the 8 data devices, as the step expects them
        assert ours.input_ids.sharding.spec[1] == ("dp", "fsdp")
        compared += len(picked)
    assert compared == minibatches.num_rows
