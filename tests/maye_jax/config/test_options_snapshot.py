"""Every option as it stands: its key, default value and types, against a recorded snapshot.

The contract of the configuration is its keys: `default_config()` (146 keys, the path every
`configs/*.py` builds on, also as `maye_jax.defaults`), the experiment's section
(`default_experiment()`, 4 keys), the `--config.*` flags ml_collections derives from their
types, and the typed settings a run reads. `options_snapshot.json` records, per key (in ml_collections' sorted order):

    [key, default (JSON), ml_collections field type, declared as a placeholder (None until
     set), typed-settings annotation, typed-settings default (JSON)]

so a change to any default, type or key fails here and must be made on purpose (regenerate with `python -m tests.maye_jax.config.test_options_snapshot`).
The component configs of the math (advantages, losses, optimizer) default to the same values.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path

SNAPSHOT = Path(__file__).with_name("options_snapshot.json")


def _json(value):
    return json.loads(json.dumps(value))


def _annotation(hint) -> str:
    text = str(hint) if not isinstance(hint, type) else hint.__name__
    return text.replace("typing.", "")


def _config_entries(config, prefix: str) -> list[list]:
    """[key, value, type, placeholder] of every field of an ml_collections config, in order."""
    from ml_collections import ConfigDict, FieldReference

    entries = []
    for name in config.keys():
        value = config[name]
        if isinstance(value, ConfigDict):
            entries += _config_entries(value, f"{prefix}{name}.")
            continue
        field = config._fields[name]
        entries.append(
            [
                f"{prefix}{name}",
                _json(value),
                config.get_type(name).__name__,
                isinstance(field, FieldReference),
            ]
        )
    return entries


def _settings_fields() -> dict[str, tuple[str, object]]:
    """key -> (annotation, default) of the typed settings (`Settings` and its sections)."""
    from maye_jax.config.settings import Settings

    fields = {}
    hints = typing.get_type_hints(Settings)
    for field in dataclasses.fields(Settings):
        hint = hints[field.name]
        sections = [a for a in typing.get_args(hint) or (hint,) if dataclasses.is_dataclass(a)]
        if field.name == "config":
            continue
        if not sections:  # a top-level option
            fields[field.name] = (_annotation(hint), field.default)
            continue
        section_hints = typing.get_type_hints(sections[0])
        for option in dataclasses.fields(sections[0]):
            key = f"{field.name}.{option.name}"
            fields[key] = (_annotation(section_hints[option.name]), option.default)
    return fields


def current() -> list[list]:
    from maye_jax.config.defaults import default_config
    from maye_jax.experiment import default_experiment

    entries = _config_entries(default_config(), "")
    entries += _config_entries(default_experiment(), "experiment.")
    typed = _settings_fields()
    return [entry + [typed[entry[0]][0], _json(typed[entry[0]][1])] for entry in entries]


def test_every_option_matches_the_snapshot():
    recorded = json.loads(SNAPSHOT.read_text())
    found = current()
    assert len(found) == len(recorded) == 150
    assert [e[0] for e in found] == [e[0] for e in recorded]  # the same keys
    differing = [(ours, theirs) for ours, theirs in zip(found, recorded) if ours != theirs]
    assert not differing, differing


def test_every_typed_option_is_a_config_key():
    keys = {e[0] for e in current()}
    assert set(_settings_fields()) == keys


def test_the_math_configs_default_to_the_options_defaults():
    """AdvantageConfig(), LossConfig() and OptimizerConfig() are what the default config gives."""
    from maye_jax.config.defaults import default_config
    from maye_jax.config.settings import load_settings
    from maye_jax.rl.advantages import AdvantageConfig
    from maye_jax.rl.losses import LossConfig
    from maye_jax.training.optim import OptimizerConfig

    c = default_config()
    c.model.tiny_family = "qwen2_vl"
    settings = load_settings(c, kind="rl", check_files=False)
    assert settings.advantage_config() == AdvantageConfig()
    assert settings.loss_config() == LossConfig()
    assert settings.optimizer_config() == OptimizerConfig()


def test_every_default_has_its_declared_type_and_every_option_a_meaning():
    from maye_jax.config.options import all_options, option_lines

    options = all_options()
    assert len(options) == 150
    for option in options:
        assert option.meaning and "\n" not in option.meaning, option.key
        if option.default is None:
            assert option.optional, option.key
        else:
            kind = option.value_type
            assert isinstance(option.default, kind), option.key
            assert not (kind is int and isinstance(option.default, bool)), option.key
    lines = option_lines()
    assert len(lines) == 150
    batch = next(line for line in lines if line.startswith("rl.batch_size "))
    assert batch.split()[:4] == ["rl.batch_size", "int", "896", ">"]
    assert batch.endswith("responses per generation step (global)")
    estimator = next(line for line in lines if line.startswith("rl.advantage_estimator "))
    assert "grpo, reinforce_pp, reinforce_pp_baseline, rloo" in estimator  # the registry's


if __name__ == "__main__":  # re-records the snapshot (only on purpose)
    SNAPSHOT.write_text(
        "[\n" + ",\n".join(json.dumps(entry) for entry in current()) + "\n]\n", encoding="utf-8"
    )
    print(f"recorded {len(current())} options in {SNAPSHOT}", file=sys.stderr)
