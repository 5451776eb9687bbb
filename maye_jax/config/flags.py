"""The `--config` flag of every CLI: an ml_collections config file plus `--config.x=y`
overrides, where `--config.x=None` turns an option off.

ml_collections parses an override with the field's type (float("None") fails), so the
parsers of float, int and str fields are wrapped to read "None" (any case) as None first.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags


class _NoneOr(flags.ArgumentParser):
    """Parses "None" as None, anything else with `inner`."""

    def __init__(self, inner: flags.ArgumentParser):
        self.inner = inner

    def parse(self, argument):
        if isinstance(argument, str) and argument.strip().lower() == "none":
            return None
        return self.inner.parse(argument)

    def flag_type(self) -> str:
        return self.inner.flag_type()


def define_config_flag(name: str = "config") -> None:
    """Defines `--config` (locked: an override of an unknown field is an error)."""
    for kind, parser in (
        (float, flags.FloatParser()),
        (int, flags.IntegerParser()),
        (str, flags.ArgumentParser()),
    ):
        config_flags.register_flag_parser_for_type(kind, _NoneOr(parser))
    config_flags.DEFINE_config_file(
        name, None, "Experiment config file (configs/*.py).", lock_config=True
    )
