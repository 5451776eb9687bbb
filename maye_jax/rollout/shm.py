"""Weights from the trainer to a rollout worker through one POSIX shared-memory segment.

The segment is a safetensors file on tmpfs, `/dev/shm/maye-jax-<pid>-<hex>/model.safetensors`,
so the worker can map it without copying (torch views of the mapping) and vLLM can read it as a
checkpoint directory (`reload_weights(weights_path=...)`). Layout:

    u64 header_length | JSON header, padded with spaces to a fixed reserved size | data

The header region is reserved once, so the data offset never moves. In the data, trainable
tensors come first and frozen ones (by default the vision tower, `visual.*`; the trainer names
its frozen tensors exactly) last: the first sync writes
all of them; later syncs rewrite only the trainable prefix, and the file is truncated to it (a
safetensors file may have no unlisted bytes). The segment is allocated once, with its pages
populated up front, and rewritten in place every step: first-touch page faults on fresh memory
cost ~20x a copy (ENVIRONMENT.md), so a segment per sync would be slow.

Each sync carries a version and a checksum in the header metadata (`maye_version`,
`maye_checksum`); the worker recomputes the checksum from the bytes it maps and reports both
back. The checksum is cheap enough to compute while copying (it runs at memory bandwidth on data
still in cache): the wrapping uint64 sum of every 512 KiB chunk of the data region, hashed together
with the length by BLAKE2b. It detects stale or torn data, not deliberate forgery.

Cleanup: segments are unlinked on `close()`, at interpreter exit and on SIGTERM (the handler is
installed only where SIGTERM still has its default action); the segment's path is chosen
before the worker starts and given to it, so a worker whose trainer was killed (SIGKILL)
removes it; and segments left by processes that no longer exist (a killed trainer and
worker) are removed when a new worker engine starts.

This module imports no JAX; the worker uses the reading half in a torch-only environment.

Over ~500 lines on purpose: the segment's writer and reader share one layout and change
together.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import itertools
import json
import math
import mmap
import os
import shutil
import signal
import struct
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from maye_jax.models.hf_names import normalize_hf_name
from maye_jax.rollout.stale import remove_stale_folders

SHM_ROOT = "/dev/shm"
SEGMENT_PREFIX = "maye-jax-"
SEGMENT_FILE = "model.safetensors"
FROZEN_PREFIXES = ("visual.",)
CHUNK_BYTES = 1 << 19  # checksum granularity
COPY_BLOCK_BYTES = 1 << 21  # copy, then checksum, this much at a time (while in cache)
PREFETCH_BYTES = 1 << 30  # device-to-host transfers started ahead of the tensor being written
DATA_ALIGN = 64
_HEADER_LENGTH = struct.Struct("<Q")
SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1}
ITEM_BYTES.update(U8=1, BOOL=1)
# numpy dtype used to view each safetensors dtype on the worker side (bf16 as raw uint16)
NUMPY_VIEW_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "uint16"}
NUMPY_VIEW_DTYPES.update(I64="int64", I32="int32", I16="int16", I8="int8", U8="uint8", BOOL="bool")


class SegmentError(RuntimeError):
    """A segment whose header, version or checksum is not what the sync said."""


# ---------------------------------------------------------------------------------------------
# Checksum


class ChunkSums:
    """Streaming checksum of a uint8 buffer, advanced as the buffer is written."""

    def __init__(self, data: np.ndarray):
        self.data = data  # uint8 view of the data region
        self.done = 0
        self.sums: list[np.ndarray] = []

    def advance(self, upto: int) -> None:
        """Sums every complete chunk below byte `upto` that is not summed yet."""
        full = upto // CHUNK_BYTES * CHUNK_BYTES
        if full > self.done:
            block = self.data[self.done : full].view(np.uint64).reshape(-1, CHUNK_BYTES // 8)
            self.sums.append(block.sum(axis=1, dtype=np.uint64))
            self.done = full

    def finish(self, total: int) -> str:
        self.advance(total)
        if total > self.done:
            tail = np.zeros(-(-(total - self.done) // 8) * 8, np.uint8)
            tail[: total - self.done] = self.data[self.done : total]
            self.sums.append(tail.view(np.uint64).sum(dtype=np.uint64, keepdims=True))
        sums = np.concatenate(self.sums) if self.sums else np.zeros(0, np.uint64)
        digest = hashlib.blake2b(digest_size=16)
        digest.update(sums.astype("<u8").tobytes())
        digest.update(struct.pack("<Q", total))
        return digest.hexdigest()


def checksum(data: np.ndarray) -> str:
    """Checksum of a whole uint8 buffer (what the worker recomputes)."""
    return ChunkSums(data).finish(len(data))


# ---------------------------------------------------------------------------------------------
# Cleanup at exit and on SIGTERM

_cleanups: dict[int, Callable[[], None]] = {}
_cleanup_ids = itertools.count()
_cleanup_lock = threading.Lock()
_sigterm_installed = False


def register_cleanup(callback: Callable[[], None]) -> int:
    """Runs `callback` at interpreter exit or on SIGTERM unless unregistered first."""
    _install_sigterm_handler()
    with _cleanup_lock:
        token = next(_cleanup_ids)
        _cleanups[token] = callback
    return token


def unregister_cleanup(token: int) -> None:
    with _cleanup_lock:
        _cleanups.pop(token, None)


def run_cleanups() -> None:
    with _cleanup_lock:
        callbacks = list(_cleanups.values())
        _cleanups.clear()
    for callback in reversed(callbacks):
        try:
            callback()
        except Exception:  # noqa: BLE001 - cleanup must go on for the others
            pass


def _on_sigterm(signum, frame):
    run_cleanups()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_sigterm_handler() -> None:
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _on_sigterm)
    _sigterm_installed = True


atexit.register(run_cleanups)
# a forked child (data loader, ...) must not stop its parent's worker or unlink its segments
os.register_at_fork(after_in_child=_cleanups.clear)


def remove_segment_directory(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def cleanup_stale_segments(root: str = SHM_ROOT) -> list[str]:
    """Removes segments whose creating process no longer exists; returns their paths."""
    return remove_stale_folders(root, SEGMENT_PREFIX)


# ---------------------------------------------------------------------------------------------
# Trainer side


@dataclasses.dataclass(frozen=True)
class Slot:
    name: str
    dtype: str  # safetensors dtype
    shape: tuple[int, ...]
    start: int  # byte offsets in the data region
    end: int
    frozen: bool


@dataclasses.dataclass(frozen=True)
class SyncRecord:
    """What one `WeightSegment.write` put into the segment."""

    directory: str  # what vLLM's reload_weights(weights_path=...) takes
    path: str  # the safetensors file
    version: int
    checksum: str
    data_bytes: int
    num_tensors: int
    includes_frozen: bool
    write_seconds: float


class WeightSegment:
    """The trainer's end: one segment, laid out on the first write and rewritten in place."""

    def __init__(
        self,
        frozen_prefixes: Iterable[str] = FROZEN_PREFIXES,
        root: str = SHM_ROOT,
        frozen_names: Iterable[str] = (),
    ):
        """Frozen tensors (written by the first sync only): names under `frozen_prefixes` and
        the names in `frozen_names` (the trainer passes exactly its frozen tensors, and no
        prefixes, so a training tower or frozen embeddings are laid out right)."""
        self.frozen_prefixes = tuple(frozen_prefixes)
        self.frozen_names = frozenset(frozen_names)
        self.root = root
        # Named now (created on the first write), so a worker knows it from its start.
        self.directory = os.path.join(
            root, f"{SEGMENT_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        )
        self.path: str | None = None
        self.slots: list[Slot] = []
        self.header_bytes = 0
        self.trainable_bytes = 0
        self.total_bytes = 0
        self._file_bytes = 0
        self._map: mmap.mmap | None = None
        self._cleanup_token: int | None = None

    def is_frozen(self, name: str) -> bool:
        """By the normalised name (Qwen3-VL's hub names `model.visual.*` are `visual.*`)."""
        name = normalize_hf_name(name)
        return name in self.frozen_names or any(
            name.startswith(prefix) for prefix in self.frozen_prefixes
        )

    @property
    def data_offset(self) -> int:
        return _HEADER_LENGTH.size + self.header_bytes

    def write(
        self, named_arrays: Mapping[str, Any], version: int, include_frozen: bool = True
    ) -> SyncRecord:
        """Writes the arrays (HF names and layouts) as version `version`.

        `named_arrays` maps names to arrays (numpy, or anything `numpy.asarray` accepts, such as
        JAX arrays: each is fetched to the host only when written). The first write lays the
        segment out and must hold every tensor; later ones hold at least the trainable tensors
        (frozen ones are skipped, and not fetched, unless `include_frozen`).
        """
        started = time.perf_counter()
        if self._map is None:
            self._allocate(named_arrays)
        frozen = include_frozen and any(slot.frozen for slot in self.slots)
        written = [slot for slot in self.slots if frozen or not slot.frozen]
        missing = [slot.name for slot in written if slot.name not in named_arrays]
        unknown = sorted(set(named_arrays) - {slot.name for slot in self.slots})
        if missing or unknown:
            raise ValueError(
                f"sync of version {version} does not match the segment layout: "
                f"missing {missing[:10]}, unknown {unknown[:10]}"
            )
        data_bytes = self.total_bytes if frozen else self.trainable_bytes
        self._resize(self.data_offset + data_bytes)
        data = np.frombuffer(self._map, np.uint8, count=data_bytes, offset=self.data_offset)
        sums = ChunkSums(data)
        prefetch = _Prefetch([(named_arrays[slot.name], slot.end - slot.start) for slot in written])
        for index, slot in enumerate(written):
            prefetch.ahead_of(index)
            _copy_tensor(self._map, self.data_offset, slot, named_arrays[slot.name], sums)
        digest = sums.finish(data_bytes)
        self._write_header(written, version, digest)
        return SyncRecord(
            directory=self.directory,
            path=self.path,
            version=int(version),
            checksum=digest,
            data_bytes=data_bytes,
            num_tensors=len(written),
            includes_frozen=frozen,
            write_seconds=time.perf_counter() - started,
        )

    def _allocate(self, named_arrays: Mapping[str, Any]) -> None:
        entries = []
        for name, value in named_arrays.items():
            dtype_name = np.dtype(value.dtype).name
            if dtype_name not in SAFETENSORS_DTYPES:
                raise TypeError(f"{name}: dtype {dtype_name} has no safetensors equivalent")
            entries.append(
                (name, SAFETENSORS_DTYPES[dtype_name], tuple(int(d) for d in value.shape))
            )
        # trainable first, frozen last; wider items first so every tensor stays aligned
        entries.sort(key=lambda entry: (self.is_frozen(entry[0]), -ITEM_BYTES[entry[1]]))
        offset = 0
        for name, dtype, shape in entries:
            size = math.prod(shape) * ITEM_BYTES[dtype]
            self.slots.append(Slot(name, dtype, shape, offset, offset + size, self.is_frozen(name)))
            offset += size
        self.total_bytes = offset
        self.trainable_bytes = sum(slot.end - slot.start for slot in self.slots if not slot.frozen)
        full_header = _header_json(self.slots, version=2**63, digest="0" * 32)
        reserved = len(full_header) + 64
        aligned_end = -(-(_HEADER_LENGTH.size + reserved) // DATA_ALIGN) * DATA_ALIGN
        self.header_bytes = aligned_end - _HEADER_LENGTH.size  # data starts 64-byte aligned

        cleanup_stale_segments(self.root)
        os.mkdir(self.directory, 0o700)
        self._cleanup_token = register_cleanup(self.close)
        self.path = os.path.join(self.directory, SEGMENT_FILE)
        size = self.data_offset + self.total_bytes
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # allocate every page now, once
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self._map = mmap.mmap(fd, size, flags=flags)
        finally:
            os.close(fd)
        self._file_bytes = size

    def _resize(self, size: int) -> None:
        """Truncates the file to `size` (dropping frozen tensors the worker already has), or
        grows it back when they are sent again. The mapping keeps its first size."""
        if size != self._file_bytes:
            os.truncate(self.path, size)
            self._file_bytes = size

    def _write_header(self, slots: list[Slot], version: int, digest: str) -> None:
        header = _header_json(slots, version=version, digest=digest)
        if len(header) > self.header_bytes:
            raise SegmentError(f"header of {len(header)} bytes exceeds {self.header_bytes}")
        padded = header + b" " * (self.header_bytes - len(header))
        self._map[: self.data_offset] = _HEADER_LENGTH.pack(self.header_bytes) + padded

    def close(self) -> None:
        """Unmaps and unlinks the segment (idempotent)."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # numpy views still alive; the unlink below still frees it
                pass
            self._map = None
        remove_segment_directory(self.directory)
        if self._cleanup_token is not None:
            unregister_cleanup(self._cleanup_token)
            self._cleanup_token = None


def _header_json(slots: list[Slot], version: int, digest: str) -> bytes:
    header: dict[str, Any] = {
        "__metadata__": {"format": "pt", "maye_version": str(version), "maye_checksum": digest}
    }
    for slot in slots:
        header[slot.name] = {
            "dtype": slot.dtype,
            "shape": list(slot.shape),
            "data_offsets": [slot.start, slot.end],
        }
    return json.dumps(header, separators=(",", ":")).encode()


class _Prefetch:
    """Starts device-to-host copies of arrays that have `copy_to_host_async` (JAX arrays) up to
    PREFETCH_BYTES ahead of the one being written, so transfers overlap the copies into the
    segment without holding the whole model on the host at once."""

    def __init__(self, values_and_sizes: list[tuple[Any, int]]):
        self.items = values_and_sizes
        self.started = 0  # items[:started] have been asked for
        self.bytes_ahead = 0  # of items[index:started], for the current index

    def ahead_of(self, index: int) -> None:
        if index:
            self.bytes_ahead -= self.items[index - 1][1]
        while self.started < len(self.items) and (
            self.started <= index or self.bytes_ahead < PREFETCH_BYTES
        ):
            value, size = self.items[self.started]
            start = getattr(value, "copy_to_host_async", None)
            if start is not None:
                start()
            self.bytes_ahead += size
            self.started += 1


def _copy_tensor(buffer, data_offset: int, slot: Slot, value: Any, sums: ChunkSums) -> None:
    source = np.asarray(value)  # a JAX array's transfer was started by _Prefetch; wait for it
    if tuple(source.shape) != slot.shape or SAFETENSORS_DTYPES.get(source.dtype.name) != slot.dtype:
        raise ValueError(
            f"{slot.name}: got {source.dtype.name}{list(source.shape)}, the segment holds "
            f"{slot.dtype}{list(slot.shape)} (the layout is fixed by the first sync)"
        )
    target = np.ndarray(slot.shape, source.dtype, buffer=buffer, offset=data_offset + slot.start)
    if source.ndim == 0 or source.size == 0:
        target[...] = source
        sums.advance(slot.end)
        return
    if source.ndim == 2 and not source.flags.c_contiguous and source.T.flags.c_contiguous:
        _copy_transposed(target, source, slot, sums)
        return
    row_bytes = source.itemsize * math.prod(source.shape[1:])
    if source.ndim == 1 or row_bytes >= COPY_BLOCK_BYTES:
        # one long row (or huge rows): copy flat blocks of a contiguous source
        flat_source = np.ascontiguousarray(source).reshape(-1)
        flat_target = target.reshape(-1)
        step = max(1, COPY_BLOCK_BYTES // source.itemsize)
        for begin in range(0, flat_source.size, step):
            end = min(begin + step, flat_source.size)
            np.copyto(flat_target[begin:end], flat_source[begin:end])
            sums.advance(slot.start + end * source.itemsize)
        return
    rows = max(1, COPY_BLOCK_BYTES // row_bytes)
    for begin in range(0, source.shape[0], rows):
        end = min(begin + rows, source.shape[0])
        np.copyto(target[begin:end], source[begin:end])
        sums.advance(slot.start + end * row_bytes)


def _copy_transposed(target: np.ndarray, source: np.ndarray, slot: Slot, sums: ChunkSums) -> None:
    """Copies a transposed view (e.g. a Flax kernel as an HF weight) whole, then checksums it.
    torch's blocked transpose is ~3x faster than numpy's tiles here; used when importable."""
    as_int = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[source.itemsize]
    target, source = target.view(as_int), source.view(as_int)
    try:
        import torch
    except ImportError:
        _copy_tiled(target, source)
    else:
        with warnings.catch_warnings():
            # A fetched JAX array is read-only; torch warns that its tensor could be written
            # through, but this one is only read.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            torch.from_numpy(target).copy_(torch.from_numpy(source))
    sums.advance(slot.end)


def _copy_tiled(target: np.ndarray, source: np.ndarray, tile: int = 64) -> None:
    for row in range(0, source.shape[0], tile):
        for column in range(0, source.shape[1], tile):
            block = (slice(row, row + tile), slice(column, column + tile))
            target[block] = source[block]


# ---------------------------------------------------------------------------------------------
# Worker side


@dataclasses.dataclass
class SegmentView:
    """A verified mapping of one sync: name -> numpy view (BF16 viewed as uint16)."""

    version: int
    checksum: str
    tensors: dict[str, np.ndarray]
    dtypes: dict[str, str]  # safetensors dtype of each tensor
    data_bytes: int


class SegmentReader:
    """The worker's end: maps the segment once (again only if it grew) and verifies each sync."""

    def __init__(self) -> None:
        self.path: str | None = None
        self._map: mmap.mmap | None = None
        self._inode: int | None = None

    def read(self, path: str, version: int, expected_checksum: str) -> SegmentView:
        stat = os.stat(path)
        if (
            self._map is None
            or self.path != path
            or self._inode != stat.st_ino
            or (stat.st_size > len(self._map))
        ):
            self.close()
            with open(path, "r+b") as file:
                flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
                self._map = mmap.mmap(file.fileno(), stat.st_size, flags=flags)
            self.path, self._inode = path, stat.st_ino
        (header_bytes,) = _HEADER_LENGTH.unpack(self._map[: _HEADER_LENGTH.size])
        data_offset = _HEADER_LENGTH.size + header_bytes
        header = json.loads(bytes(self._map[_HEADER_LENGTH.size : data_offset]))
        metadata = header.pop("__metadata__", {})
        found_version = int(metadata.get("maye_version", -1))
        if found_version != version:
            raise SegmentError(
                f"{path}: segment holds version {found_version}, sync says {version}"
            )
        data_bytes = max((entry["data_offsets"][1] for entry in header.values()), default=0)
        if data_offset + data_bytes > stat.st_size:
            raise SegmentError(f"{path}: header describes {data_bytes} bytes beyond the file")
        data = np.frombuffer(self._map, np.uint8, count=data_bytes, offset=data_offset)
        digest = checksum(data)
        if digest != expected_checksum or digest != metadata.get("maye_checksum"):
            raise SegmentError(
                f"{path}: checksum of version {version} is {digest}, the trainer wrote "
                f"{expected_checksum} (header says {metadata.get('maye_checksum')})"
            )
        tensors, dtypes = {}, {}
        for name, entry in header.items():
            start, end = entry["data_offsets"]
            dtype = NUMPY_VIEW_DTYPES[entry["dtype"]]
            tensors[name] = data[start:end].view(dtype).reshape(entry["shape"])
            dtypes[name] = entry["dtype"]
        return SegmentView(found_version, digest, tensors, dtypes, data_bytes)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass
        self._map = None
        self.path = self._inode = None
