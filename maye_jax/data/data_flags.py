"""The data options of the tools that take no --config (`evaluate`, `score`, `data check`), as
absl flags with the names, defaults and meanings of `config.data.*` (declared once, in
maye_jax/config/options.py): `--layout=geo3k_verl --question_key=... --format=parquet`."""

from __future__ import annotations

FLAG_NAMES = (
    "format",
    "layout",
    "question_key",
    "answer_key",
    "solution_key",
    "images_key",
    "id_key",
    "ground_truth",
)


def define_data_flags(names=FLAG_NAMES) -> None:
    """One string flag per `config.data.<name>` of `names`."""
    from absl import flags

    from maye_jax.config.options import DataSettings, options_of

    for option in options_of(DataSettings):
        if option.key in names:
            flags.DEFINE_string(
                option.key, option.default, f"config.data.{option.key}: {option.meaning}"
            )


def data_settings_from_flags(names=FLAG_NAMES, **values):
    """The checked data settings of the flags (and `values`, e.g. a tool's prompt_template),
    the layout's defaults filled in (maye_jax/data/layouts.py)."""
    from absl import flags

    from maye_jax.config.settings import section_settings

    given = {name: getattr(flags.FLAGS, name) for name in names}
    given.update(values)
    return section_settings("data", **{k: v for k, v in given.items() if v is not None})
