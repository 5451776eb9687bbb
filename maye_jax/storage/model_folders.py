"""Model checkpoints: HF safetensors directories and our Orbax parameter checkpoints.

An Orbax model checkpoint is a directory:
    params/               Orbax PyTree checkpoint of the Flax parameters (nested dict, str keys)
    config.json           the HF config of the model (so the Flax model can be rebuilt)
    maye_jax.json         {"format": "maye-jax-params", "version": 1, "param_dtype": ...}
    tokenizer/processor files, when the source directory had them
Loading either kind goes through one function, `load_model`, which builds the model abstractly
and fills it tensor by tensor (HF) or shard by shard (Orbax), so no device ever holds more
than its own shards and the host at most one full tensor at a time.

Writing either kind (`save_orbax`, `export_hf`) goes through `storage.atomic.atomic_folder`:
the folder is written under `<name>.partial` and renamed when complete, so a folder under its
final name is always whole. `write_orbax_folder` / `write_hf_folder` write into a folder the
caller already holds (e.g. `convert`, which adds tokenizer files before the rename).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maye_jax.models.configs import ModelConfig
from maye_jax.models.hf_mapping import flax_param_paths, iter_hf_tensors, load_hf_tensors
from maye_jax.models.qwen_vl import build_model
from maye_jax.run import multihost
from maye_jax.storage.atomic import atomic_folder

FORMAT_NAME = "maye-jax-params"
FORMAT_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "generation_config.json",
)
SHARD_BYTES = 2 * 1024**3  # safetensors shard size on export (bounds host memory too)

Placer = Callable[[str, np.ndarray], jax.Array]


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / "maye_jax.json").is_file()


def is_hf_directory(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def tokenizer_source(path: str | os.PathLike) -> Path:
    """Where the tokenizer and processor files of the model at `path` are: a train checkpoint's
    are its run's start model's."""
    from maye_jax.storage import run_models

    if run_models.is_train_checkpoint(path):
        return run_models.start_model_of(path)
    return Path(path)


def read_hf_config(path: str | os.PathLike):
    """The transformers config of a local model directory (never touches the network)."""
    from transformers import AutoConfig

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no config.json in the model directory")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def _progress_bar(total: int, desc: str, enabled: bool):
    """A tensor-by-tensor progress bar on stderr, with ETA (a no-op when not `enabled`)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=sys.stderr)


def iter_safetensors(
    path: str | os.PathLike, *, progress: bool = False
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) for every tensor of every shard, loading one tensor at a time;
    `progress`: a bar over the tensors (counted from the shards' headers)."""
    from safetensors import safe_open

    path = Path(path)
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    total = 0
    if progress:  # only the headers are read
        for shard in shards:
            with safe_open(str(path / shard), framework="pt") as handle:
                total += len(handle.keys())
    with _progress_bar(total, f"read {path.name}", progress) as bar:
        for shard in shards:
            # framework="pt" reads bf16 too (NumPy has no bfloat16); converted per tensor below.
            with safe_open(str(path / shard), framework="pt") as handle:
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    yield name, _torch_to_numpy(tensor)
                    bar.update(1)


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy().view(jnp.bfloat16)
    return tensor.numpy()


def default_placer(param_dtype) -> Placer:
    return lambda name, value: jnp.asarray(value, dtype=param_dtype)


def load_model(
    path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    place: Placer | None = None,
    shardings: Callable[[str, tuple[int, ...]], jax.sharding.Sharding] | None = None,
    stored_shape: Callable[[str, tuple[int, ...]], tuple[int, ...]] | None = None,
    remat: bool | str = False,
    attention: str = "xla",
    progress: bool = False,
) -> tuple[nnx.Module, object]:
    """(model, hf_config) from an HF model directory, an Orbax checkpoint of ours, or a run's
    train checkpoint (`RUN/checkpoints/N`: the run's start model with the trained parameters).

    `place(flax_name, array)` puts an HF tensor on devices (default: a single-device array in
    `param_dtype`); `shardings(flax_name, shape)` gives the target sharding of each parameter
    for Orbax restores, so each device reads only its own shards, and `stored_shape(flax_name,
    shape)` the shape to read it into (a trainer's padded storage, `rules.storage_shape`;
    Orbax pads or truncates the stored array to it). `progress`: a bar over the HF tensors on
    stderr (an Orbax restore is one call, without a bar).
    """
    from maye_jax.storage import run_models

    if run_models.is_train_checkpoint(path):
        model, hf_config = load_model(
            run_models.start_model_of(path),
            dtype=dtype,
            param_dtype=param_dtype,
            place=place,
            shardings=shardings,
            stored_shape=stored_shape,
            remat=remat,
            attention=attention,
            progress=progress,
        )
        run_models.restore_trained_params(path, model, param_dtype)
        return model, hf_config
    hf_config = read_hf_config(path)
    config = ModelConfig.from_hf(hf_config)
    abstract = build_model(
        config,
        dtype=dtype,
        param_dtype=param_dtype,
        abstract=True,
        remat=remat,
        attention=attention,
    )
    if is_orbax_checkpoint(path):
        return _restore_orbax(path, abstract, param_dtype, shardings, stored_shape), hf_config
    if is_hf_directory(path):
        placer = place or default_placer(param_dtype)
        tensors = iter_safetensors(path, progress=progress)
        model = load_hf_tensors(abstract, tensors, place=placer, source=str(path))
        return model, hf_config
    raise FileNotFoundError(
        f"{path}: neither an HF model directory (config.json + *.safetensors) nor a maye-jax "
        "checkpoint (maye_jax.json + params/)"
    )


def _pure_dict_with_str_keys(tree):
    if isinstance(tree, dict):
        return {str(k): _pure_dict_with_str_keys(v) for k, v in tree.items()}
    return tree


def _restore_orbax(path, abstract_model, param_dtype, shardings, stored_shape=None):
    import orbax.checkpoint as ocp

    graphdef, state = nnx.split(abstract_model)
    pure = _pure_dict_with_str_keys(nnx.state(abstract_model, nnx.Param).to_pure_dict())

    def target(key_path, leaf):
        name = ".".join(str(getattr(k, "key", k)) for k in key_path)
        shape = stored_shape(name, leaf.shape) if stored_shape else tuple(leaf.shape)
        sharding = (
            shardings(name, shape)
            if shardings
            else jax.sharding.SingleDeviceSharding(jax.devices()[0])
        )
        return jax.ShapeDtypeStruct(shape, param_dtype, sharding=sharding)

    abstract_tree = jax.tree_util.tree_map_with_path(target, pure)
    # not strict: a trainer writes padded parameters (`rules.storage_shape`); Orbax cuts the
    # padding off, or pads a stored array to the shape asked for
    restored = ocp.StandardCheckpointer().restore(
        os.path.abspath(Path(path) / "params"), abstract_tree, strict=False
    )
    params = nnx.state(abstract_model, nnx.Param)
    _fill_state_from_str_dict(params, restored)
    return nnx.merge(graphdef, params, nnx.state(abstract_model, nnx.Not(nnx.Param)))


def _fill_state_from_str_dict(state, tree):
    flat = dict(nnx.to_flat_state(state))
    for path, variable in flat.items():
        node = tree
        for key in path:
            node = node[str(key)]
        flat[path] = variable.replace(node)
    state.update(nnx.from_flat_state(flat))


def save_orbax(
    path: str | os.PathLike, model: nnx.Module, hf_config, source_dir=None, run_inputs=None
) -> Path:
    """Writes params/ (Orbax), config.json, maye_jax.json and the source's tokenizer files into
    `path`, which appears only once complete; with `run_inputs` (storage/run_inputs.py), what
    the run that wrote it used to read its inputs."""
    path = Path(path).absolute()
    with atomic_folder(path) as folder:
        write_orbax_folder(folder, model, hf_config, source_dir=source_dir, run_inputs=run_inputs)
    return path


def write_orbax_folder(
    path: Path, model: nnx.Module, hf_config, source_dir=None, run_inputs=None
) -> Path:
    """`save_orbax` into an existing folder (no rename)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    pure = _pure_dict_with_str_keys(nnx.state(model, nnx.Param).to_pure_dict())
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "params", pure, force=True)  # collective: every process
    checkpointer.wait_until_finished()
    if not multihost.is_leader():
        # the rest is process 0's alone: a second writer of the same small files races it
        # (a reader of preprocessor_config.json saw it empty while the other rewrote it)
        return path
    hf_config.save_pretrained(str(path))
    leaves = jax.tree_util.tree_leaves(pure)
    meta = dict(
        format=FORMAT_NAME,
        version=FORMAT_VERSION,
        param_dtype=str(leaves[0].dtype) if leaves else None,
        architecture=list(getattr(hf_config, "architectures", None) or []),
    )
    (path / "maye_jax.json").write_text(json.dumps(meta, indent=2) + "\n")
    if source_dir is not None:
        copy_tokenizer_files(source_dir, path)
    if run_inputs is not None:
        run_inputs.write(path)
    return path


def copy_tokenizer_files(source_dir, out_dir) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(source_dir) / name
        if src.is_file():
            shutil.copyfile(src, Path(out_dir) / name)
            copied.append(name)
    return copied


def export_hf(
    model: nnx.Module,
    hf_config,
    out_dir,
    *,
    dtype=None,
    tokenizer_source=None,
    progress: bool = False,
    alone: bool = True,
    run_inputs=None,
) -> Path:
    """Writes an HF model directory (safetensors shards + index + config + tokenizer files)
    that transformers and vLLM load as is; `out_dir` appears only once complete. Shards are
    written as they fill, so host memory stays within one shard. `progress`: a bar over the
    tensors on stderr, with ETA. Written by this process alone (several processes: process 0,
    from its own copy of the weights, `Policy.local_model`). `run_inputs`
    (storage/run_inputs.py): what the run that wrote it used to read its inputs."""
    out_dir = Path(out_dir).absolute()
    with atomic_folder(out_dir, alone=alone) as folder:
        write_hf_folder(
            folder,
            model,
            hf_config,
            dtype=dtype,
            tokenizer_source=tokenizer_source,
            progress=progress,
            run_inputs=run_inputs,
        )
    return out_dir


def write_hf_folder(
    out_dir: Path,
    model: nnx.Module,
    hf_config,
    *,
    dtype=None,
    tokenizer_source=None,
    progress: bool = False,
    run_inputs=None,
) -> Path:
    """`export_hf` into an existing folder (no rename)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    weight_map, shard, shard_bytes, shard_files = {}, {}, 0, []

    def flush():
        nonlocal shard, shard_bytes
        if not shard:
            return
        name = f"model-{len(shard_files) + 1:05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        for key in shard:
            weight_map[key] = name
        shard_files.append(name)
        shard, shard_bytes = {}, 0

    label = out_dir.name.removesuffix(".partial")
    bar = _progress_bar(len(flax_param_paths(model)), f"write {label}", progress)
    with bar:
        for name, array in iter_hf_tensors(model):
            if dtype is not None:
                array = array.astype(dtype)
            tensor = _numpy_to_torch(np.ascontiguousarray(array))
            shard[name] = tensor
            shard_bytes += tensor.numel() * tensor.element_size()
            if shard_bytes >= SHARD_BYTES:
                flush()
            bar.update(1)
        flush()
    # Rename to the HF convention model-0000i-of-0000n.safetensors and write the index.
    total = len(shard_files)
    renamed = {}
    for i, old in enumerate(shard_files, start=1):
        new = f"model-{i:05d}-of-{total:05d}.safetensors" if total > 1 else "model.safetensors"
        os.replace(out_dir / old, out_dir / new)
        renamed[old] = new
    weight_map = {k: renamed[v] for k, v in weight_map.items()}
    if total > 1:
        index = dict(metadata={}, weight_map=dict(sorted(weight_map.items())))
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    _config_for_export(hf_config).save_pretrained(str(out_dir))
    if tokenizer_source is not None:
        copy_tokenizer_files(tokenizer_source, out_dir)
    if run_inputs is not None:
        run_inputs.write(out_dir)
    return out_dir


def _config_for_export(hf_config):
    """The config an export writes: the tie flag both where transformers 5 reads it (top level)
    and where 4.57 did (text level), so every reader ties exactly when the weights are tied (a
    hub Qwen3-VL 2B/4B config may set only the text-level one; no lm_head is written then)."""
    config = copy.deepcopy(hf_config)
    tied = ModelConfig.from_hf(hf_config).tie_word_embeddings
    config.tie_word_embeddings = tied
    config.text_config.tie_word_embeddings = tied
    return config


def _numpy_to_torch(array: np.ndarray):
    import torch

    if array.dtype == jnp.bfloat16:
        return torch.tensor(array.view(np.uint16)).view(torch.bfloat16)
    return torch.tensor(array)  # a copy: device_get arrays are read-only
