"""The wire format between the trainer (client.py) and the rollout worker (worker.py).

One message = one frame on a local stream socket (a `socketpair`, the worker's end inherited as a
file descriptor):

    u64 header_length | header: UTF-8 JSON object | buffer 0 | buffer 1 | ...

The header lists the raw binary buffers that follow it (`"buffers": [[dtype, shape], ...]`, C
order, native little-endian), and JSON values refer to them by index. Arrays travel as their
bytes (token ids int32, pixel values float32 exactly as the trainer computed them, logprobs
float32): no pickling, no text encoding of numbers. Weights do not travel here: they go through
a shared-memory segment (shm.py) and the `sync` message only names it.

Requests (header `op`) and replies (`ok: true` plus fields, or `ok: false, error, traceback`):
    ready     (worker -> trainer, once, unsolicited) backend, model, pid, versions
    sync      path, version, checksum, data_bytes -> version, checksum, num_tensors, seconds
    generate  version, step, sampling{...}, prompts[{tokens, pixels, grid}]
              -> version, completions[[{tokens, logprobs, text, finish_reason}]], stats{...}
    score     version, temperature, items[{tokens, pixels, grid, response}] -> logprobs[buffer]
    shutdown  -> ok, then the worker exits

This module imports no JAX (the worker runs in a torch-only environment).
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from maye_jax.rollout.engine import Prompt, Sampling

_LENGTH = struct.Struct("<Q")
MAX_HEADER_BYTES = 64 * 1024 * 1024
_DTYPES = ("int32", "int64", "float32", "uint8")


class ConnectionClosed(EOFError):
    """The peer closed the socket (it exited or died)."""


def send_message(sock: socket.socket, header: dict[str, Any], buffers: Sequence[np.ndarray] = ()):
    """Sends one frame: the JSON header (with a `buffers` list added) and the raw arrays."""
    arrays = [np.ascontiguousarray(array) for array in buffers]
    for array in arrays:
        if array.dtype.name not in _DTYPES:
            raise TypeError(f"protocol buffers must be one of {_DTYPES}, got {array.dtype}")
    header = dict(header, buffers=[[a.dtype.name, list(a.shape)] for a in arrays])
    encoded = json.dumps(header, separators=(",", ":")).encode()
    sock.sendall(_LENGTH.pack(len(encoded)) + encoded)
    for array in arrays:
        if array.nbytes:
            sock.sendall(memoryview(array.reshape(-1).view(np.uint8)))


def recv_message(sock: socket.socket) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Receives one frame; raises ConnectionClosed on a clean end of stream."""
    (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size, allow_eof=True))
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"protocol header of {length} bytes exceeds {MAX_HEADER_BYTES}")
    header = json.loads(_recv_exactly(sock, length).decode())
    buffers = []
    for dtype, shape in header.pop("buffers", []):
        if dtype not in _DTYPES:
            raise ValueError(f"protocol buffer dtype {dtype!r} is not one of {_DTYPES}")
        array = np.empty(shape, dtype=dtype)
        if array.nbytes:
            _recv_into(sock, memoryview(array.reshape(-1).view(np.uint8)))
        buffers.append(array)
    return header, buffers


def _recv_exactly(sock: socket.socket, size: int, allow_eof: bool = False) -> bytes:
    data = bytearray(size)
    _recv_into(sock, memoryview(data), allow_eof=allow_eof)
    return bytes(data)


def _recv_into(sock: socket.socket, view: memoryview, allow_eof: bool = False) -> None:
    received = 0
    while received < len(view):
        count = sock.recv_into(view[received:])
        if count == 0:
            if allow_eof and received == 0:
                raise ConnectionClosed("peer closed the connection")
            raise ConnectionClosed(f"peer closed the connection mid-message ({received} bytes)")
        received += count


class BufferList:
    """Collects arrays for one outgoing message and hands out their indices."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []

    def add(self, array: np.ndarray | None, dtype: str) -> int | None:
        if array is None:
            return None
        self.arrays.append(np.ascontiguousarray(np.asarray(array, dtype=dtype)))
        return len(self.arrays) - 1


def encode_prompt(prompt: Prompt, buffers: BufferList) -> dict[str, Any]:
    if (prompt.pixel_values is None) != (prompt.image_grid_thw is None):
        raise ValueError("a prompt needs both pixel_values and image_grid_thw, or neither")
    return dict(
        tokens=buffers.add(np.asarray(prompt.prompt_token_ids).reshape(-1), "int32"),
        pixels=buffers.add(prompt.pixel_values, "float32"),
        grid=buffers.add(
            None if prompt.image_grid_thw is None else np.reshape(prompt.image_grid_thw, (-1, 3)),
            "int64",
        ),
    )


def decode_prompt(fields: dict[str, Any], buffers: list[np.ndarray]) -> Prompt:
    def get(key):
        index = fields.get(key)
        return None if index is None else buffers[index]

    return Prompt(
        prompt_token_ids=get("tokens"), pixel_values=get("pixels"), image_grid_thw=get("grid")
    )


def encode_sampling(sampling: Sampling) -> dict[str, Any]:
    return dict(
        n=int(sampling.n),
        temperature=float(sampling.temperature),
        top_p=float(sampling.top_p),
        top_k=int(sampling.top_k),
        max_tokens=int(sampling.max_tokens),
        seed=int(sampling.seed),
        stop_token_ids=[int(token) for token in sampling.stop_token_ids],
    )


def decode_sampling(fields: dict[str, Any]) -> Sampling:
    return Sampling(**dict(fields, stop_token_ids=tuple(fields["stop_token_ids"])))
