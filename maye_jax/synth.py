"""python -m maye_jax.synth --out=DIR [--flavour=both --num_train=64 ...]: writes the synthetic
MAYE-format data sets (maye_jax/data/synth.py) as jsonl files plus images."""

from __future__ import annotations

from absl import flags

from maye_jax.data.synth import FLAVOURS, SOLUTION_STYLES, generate
from maye_jax.errors import UserError
from maye_jax.storage.atomic import cannot_write


def _define_flags() -> None:
    """CLI flags, defined only when run as a script so importing this module defines none."""
    flags.DEFINE_string("out", None, "Output directory.")
    flags.DEFINE_enum("flavour", "both", [*FLAVOURS, "both"], "Which data set(s).")
    flags.DEFINE_integer("num_train", 64, "Training records per flavour.")
    flags.DEFINE_integer("num_validation", 16, "Validation records per flavour.")
    flags.DEFINE_integer("num_test", 16, "Test (out-of-distribution) records per flavour.")
    flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives the same bytes.")
    flags.DEFINE_integer("image_size", 112, "Side of the square images in pixels.")
    flags.DEFINE_float("text_only_fraction", 0.0, "Fraction of records without an image.")
    flags.DEFINE_enum("solution_style", "full", list(SOLUTION_STYLES), "Worked solution or short.")
    flags.DEFINE_integer("max_number", 9, "Text-dominant side lengths are 2..max_number.")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}")
    options = flags.FLAGS
    if not options.out:
        raise UserError("--out=DIR is required")
    if options.num_train < 1:  # a data set without training records cannot be meant
        raise UserError(f"--num_train={options.num_train}: must be >= 1")
    problem = cannot_write(options.out)
    if problem:
        raise UserError(f"--out: {options.out}: {problem}")
    flavours = FLAVOURS if options.flavour == "both" else (options.flavour,)
    for flavour in flavours:
        try:
            paths = generate(
                options.out,
                flavour,
                num_train=options.num_train,
                num_validation=options.num_validation,
                num_test=options.num_test,
                seed=options.seed,
                image_size=options.image_size,
                text_only_fraction=options.text_only_fraction,
                solution_style=options.solution_style,
                max_number=options.max_number,
            )
        except ValueError as error:  # a bad option, named by generate
            raise UserError(str(error).replace("synth.generate: ", "--")) from None
        for split, path in paths.items():
            print(f"{flavour} {split}: {path}")
    return 0


if __name__ == "__main__":
    from maye_jax.run.cli import run_cli

    _define_flags()
    run_cli("synth", main)
