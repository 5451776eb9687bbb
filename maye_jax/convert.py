"""Checkpoint conversion CLI: HF safetensors directory <-> maye-jax Orbax parameters.

    python -m maye_jax.convert --input=HF_DIR --output=CKPT_DIR            # HF -> Orbax
    python -m maye_jax.convert --input=CKPT_DIR --output=HF_DIR            # Orbax -> HF
    python -m maye_jax.convert --input=HF_DIR --output=CKPT_DIR --fsdp=8   # written sharded
    python -m maye_jax.convert --input=RUN/checkpoints/N --output=HF_DIR   # a train checkpoint

The direction follows from what `--input` is. HF -> Orbax streams tensor by tensor (each one
converted and placed on its devices before the next is read); Orbax -> HF writes safetensors
shards as they fill, plus config and tokenizer/processor files, loadable by transformers/vLLM.
Either direction shows a tensor-by-tensor progress bar on stderr (`--noprogress`: none); the
Orbax side is one save or restore call. Either way the output is written as `OUTPUT.partial`
and renamed when complete: a folder under the output name is always whole, and one that
`--overwrite` replaces is replaced only by a complete one.
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import flags

from maye_jax.errors import UserError
from maye_jax.qwen_ids import NUM_BPE_TOKENS

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """CLI flags, defined only when run as a script so importing this module defines none."""
    flags.DEFINE_string(
        "input", None, "HF model directory or maye-jax Orbax checkpoint.", required=True
    )
    flags.DEFINE_string("output", None, "Output directory.", required=True)
    flags.DEFINE_enum(
        "param_dtype",
        "float32",
        ["float32", "bfloat16"],
        "dtype of the Flax parameters written (HF -> Orbax).",
    )
    flags.DEFINE_enum(
        "hf_dtype",
        "auto",
        ["auto", "float32", "bfloat16", "float16"],
        "dtype of exported safetensors (Orbax -> HF); auto = the parameters' dtype.",
    )
    flags.DEFINE_bool(
        "overwrite", False, "Replace an existing non-empty --output folder (else it is refused)."
    )
    flags.DEFINE_integer(
        "fsdp", 0, "Shard parameters over this many devices while converting (0: no)."
    )
    flags.DEFINE_string(
        "tokenizer_dir",
        None,
        "Where tokenizer/processor files come from on export (default: the input "
        "directory; if it has none, the offline Qwen tokenizer is written).",
    )
    flags.DEFINE_bool("progress", True, "Progress bars on stderr (--noprogress: none).")


def main(argv):
    del argv
    import jax.numpy as jnp
    import numpy as np

    from maye_jax.storage import model_folders as checkpoint
    from maye_jax.storage.atomic import atomic_folder
    from maye_jax.storage.run_models import is_train_checkpoint

    started = time.time()
    source = FLAGS.input
    target = Path(FLAGS.output)
    _check_arguments(source, target)
    if target.exists() and not target.is_dir():  # --overwrite (checked)
        target.unlink()  # a folder is replaced only once the new output is complete
    param_dtype = jnp.bfloat16 if FLAGS.param_dtype == "bfloat16" else jnp.float32
    place, shardings = None, None
    if FLAGS.fsdp:
        import jax

        from maye_jax.sharding.mesh import make_mesh
        from maye_jax.sharding.rules import param_sharding_fn

        mesh = make_mesh(fsdp=FLAGS.fsdp)
        sharding_of = param_sharding_fn(mesh)
        shardings = sharding_of
        place = lambda name, value: jax.device_put(  # noqa: E731
            np.asarray(value, dtype=param_dtype), sharding_of(name, value.shape)
        )
    try:
        if checkpoint.is_orbax_checkpoint(source) or is_train_checkpoint(source):
            # a run's train checkpoint: its start model with the trained parameters
            model, hf_config = checkpoint.load_model(
                source, param_dtype=param_dtype, shardings=shardings, progress=FLAGS.progress
            )
            dtype = (
                None
                if FLAGS.hf_dtype == "auto"
                else np.dtype(jnp.bfloat16 if FLAGS.hf_dtype == "bfloat16" else FLAGS.hf_dtype)
            )
            # The output appears under its name only once complete, tokenizer files included.
            with atomic_folder(FLAGS.output) as folder:
                checkpoint.write_hf_folder(
                    folder,
                    model,
                    hf_config,
                    dtype=dtype,
                    tokenizer_source=FLAGS.tokenizer_dir or checkpoint.tokenizer_source(source),
                    progress=FLAGS.progress,
                )
                _ensure_tokenizer(folder, hf_config)
            out = Path(FLAGS.output).absolute()
        else:  # an HF directory (checked above)
            model, hf_config = checkpoint.load_model(
                source, param_dtype=param_dtype, place=place, progress=FLAGS.progress
            )
            out = checkpoint.save_orbax(FLAGS.output, model, hf_config, source_dir=source)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(str(error)) from None
    print(f"convert: wrote {out} in {time.time() - started:.1f} s")
    return 0


def _check_arguments(source: str, target: Path) -> None:
    """Every mistake in the arguments, before any work: an input that is no model, a device
    count JAX does not have, an output that is not empty (without --overwrite) or cannot be
    written."""
    from maye_jax.storage import model_folders
    from maye_jax.storage.atomic import cannot_write
    from maye_jax.storage.run_models import is_train_checkpoint

    if not (
        model_folders.is_orbax_checkpoint(source)
        or is_train_checkpoint(source)
        or model_folders.is_hf_directory(source)
    ):
        raise UserError(
            f"--input: {source}: not an HF model directory (config.json + *.safetensors) nor a "
            "maye-jax checkpoint (maye_jax.json + params/, or a run's checkpoints/<step>)"
        )
    if FLAGS.fsdp < 0:
        raise UserError(f"--fsdp={FLAGS.fsdp}: must be >= 0 (0: not sharded)")
    if FLAGS.fsdp:
        import jax

        if FLAGS.fsdp > len(jax.devices()):
            raise UserError(
                f"--fsdp={FLAGS.fsdp}: JAX sees {len(jax.devices())} device(s) here "
                f"({jax.default_backend()}); on a CPU, XLA_FLAGS="
                f"--xla_force_host_platform_device_count={FLAGS.fsdp} gives it that many"
            )
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not FLAGS.overwrite:
        raise UserError(
            f"--output: {target} is not empty (a model written over another keeps the other's "
            "files); choose an empty folder or pass --overwrite to replace it"
        )
    problem = cannot_write(target)
    if problem:
        raise UserError(f"--output: {target}: {problem}")


def _ensure_tokenizer(out_dir, hf_config) -> None:
    """An exported directory must be loadable on its own: add the offline tokenizer if the
    source carried no tokenizer files."""
    if (Path(out_dir) / "tokenizer_config.json").is_file():
        return
    if int(hf_config.text_config.vocab_size) < NUM_BPE_TOKENS:
        return  # a small-vocabulary test model: the Qwen tokenizer would not fit it
    from maye_jax.data.processor import load_processor
    from maye_jax.models.configs import ModelConfig

    load_processor(family=ModelConfig.from_hf(hf_config).family).save_pretrained(out_dir)


if __name__ == "__main__":
    from maye_jax.run.cli import run_cli

    _define_flags()
    run_cli("convert", main)
