"""Recipes: one YAML file of TRL dataclass fields, overridable from the command line.

`sft.py` and `dpo.py` parse their recipe here, the same way: TRL's own
`TrlParser` and dataclasses (`ScriptArguments`, `SFTConfig`/`DPOConfig`,
`ModelConfig`, `DatasetMixtureConfig`), plus a positional YAML path (TRL only
reads `--config PATH`) and one-line errors for unknown keys. The resolved
recipe (every effective setting) is saved next to the model so a run can be
reproduced from its output alone.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from posttrain.atomic import atomic_write_text
from posttrain.errors import PosttrainError

RESOLVED_RECIPE_NAME = "recipe.resolved.yaml"


def _known_keys(parser) -> set[str]:
    return {action.dest for action in parser._actions}


def _read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise PosttrainError(f"recipe {path} not found") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PosttrainError(f"recipe {path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PosttrainError(f"recipe {path} must be a YAML mapping of key: value")
    return data


def _recipe_argv(argv: Sequence[str] | None) -> tuple[list[str], str | None]:
    """argv with a positional `RECIPE.yaml` turned into `--config RECIPE.yaml` (TRL's form), and
    the recipe's path (None when there is no recipe)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml")):
        argv = ["--config", *argv]
    if "--config" not in argv:
        return argv, None
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise PosttrainError("--config needs a recipe path")
    return argv, argv[i + 1]


def parse_recipe(dataclass_types: Sequence[type], argv: Sequence[str] | None = None, defaults: dict | None = None):
    """Parse `RECIPE.yaml [--key value ...]` (or `--config RECIPE.yaml ...`) into TRL dataclasses.

    YAML keys become defaults; command-line flags override them. An unknown key,
    in the YAML or on the command line, is a PosttrainError naming it. `defaults`
    replace the dataclasses' own defaults (the YAML and the command line still win).
    """
    from trl import TrlParser

    argv, path = _recipe_argv(argv)
    if not argv:
        raise PosttrainError("usage: RECIPE.yaml [--key value ...]  (or --help for every key)")
    parser = TrlParser(list(dataclass_types))
    where = f"recipe {path} or the command line" if path else "the command line"

    def one_line_error(message: str):  # argparse would print the whole usage (~150 lines) first
        raise PosttrainError(f"{message} (in {where})")

    parser.error = one_line_error
    if defaults:
        parser.set_defaults_with_config(**defaults)
    if path:
        unknown = sorted(set(_read_yaml(path)) - _known_keys(parser) - {"env"})
        if unknown:
            raise PosttrainError(
                f"recipe {path}: unknown key(s) {', '.join(unknown)} "
                f"(not a field of {', '.join(t.__name__ for t in dataclass_types)})"
            )
    try:
        return parser.parse_args_and_config(args=argv)
    except (ValueError, TypeError) as err:  # a dataclass rejected a value, or a `datasets:` entry a key
        msg = str(err)
        if "not used by the HfArgumentParser" in msg:
            raise PosttrainError(f"unknown command-line argument(s): {msg.split(':', 1)[1].strip()}") from None
        raise PosttrainError(f"{msg.splitlines()[0] if msg else type(err).__name__} (in {where})") from None


def _plain(value):
    """Make a dataclass value YAML-safe (enums, paths, nested dataclasses)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and type(value).__module__ != "builtins":  # Enum
        return _plain(value.value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# Secrets, and deprecated aliases that TrainingArguments mirrors from their new names
# (transformers 5: gradient_checkpointing* -> activation_checkpointing*).
_NOT_SAVED = ("hub_token", "gradient_checkpointing", "gradient_checkpointing_kwargs")


def resolved_recipe(*configs) -> dict:
    """Every effective setting of the given dataclasses, merged into one flat mapping."""
    merged: dict = {}
    for config in configs:
        if hasattr(config, "to_dict"):  # TrainingArguments: drops private/internal fields
            items = config.to_dict()
            names = {f.name for f in dataclasses.fields(config) if f.init}
            items = {k: v for k, v in items.items() if k in names}
            # to_dict masks every `*_token` field as "<NAME>"; keep the real values (eos_token
            # matters to training) but never the secret, and drop aliases that would warn on re-parse.
            items.update({k: getattr(config, k) for k in items if k.endswith("_token")})
            for key in _NOT_SAVED:
                items.pop(key, None)
        else:
            items = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
        for key, value in items.items():
            merged[key] = _plain(value)
    return merged


def explicit_keys(argv: Sequence[str] | None = None) -> set[str]:
    """The keys a user set: those of the recipe YAML and the `--key` flags of the command line."""
    argv, path = _recipe_argv(argv)
    keys = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--") and a != "--config"}
    return keys | (set(_read_yaml(path)) if path else set())


def save_resolved_recipe(output_dir: str | Path, *configs, launch: dict | None = None) -> Path:
    """Write the resolved recipe as YAML next to the model: rerunnable with `sft.py THIS.yaml`.

    `launch` (processes, distributed type, ZeRO stage, precision) is recorded as a comment
    header: it comes from the accelerate config, not the recipe, but the effective batch
    depends on it."""
    path = Path(output_dir) / RESOLVED_RECIPE_NAME
    text = (
        "# Every effective setting of this run; rerun with: accelerate launch posttrain/<stage>.py " + path.name + "\n"
    )
    for key, value in (launch or {}).items():
        text += f"# launched with {key}: {value}\n"
    text += yaml.safe_dump(resolved_recipe(*configs), sort_keys=True)
    atomic_write_text(path, text)
    return path
