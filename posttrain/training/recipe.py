"""Recipes: one YAML file of TRL dataclass fields, overridable from the command line.

    recipe = parse_stage_recipe(trl.SFTConfig, ["recipes/sft.yaml", "--learning_rate", "1e-5"])

Parsing is TRL's `TrlParser` over its own dataclasses (`ScriptArguments`, `SFTConfig`/`DPOConfig`,
`ModelConfig`, `DatasetMixtureConfig`) plus this project's few keys. What is added here: a positional
YAML path, a short `--help` (usage, what the command does, the keys a recipe sets most; `--help-all` is
HfArgumentParser's full list), one-line errors instead of argparse's usage dump (an unknown key names the
closest known one), refusals at parse time of a local path that is not there and of a `report_to` tracker
that is not installed, defaults that depend on the launch, and the resolved recipe saved next to the
model so that a run can be repeated from its output alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trl
import yaml

from posttrain.outputs.atomic import atomic_write_text
from posttrain.outputs.errors import PosttrainError
from posttrain.outputs.flags import PROG_ENV, did_you_mean, hub_model_problem, refuse_missing_local_paths

RESOLVED_RECIPE_NAME = "recipe.resolved.yaml"
MERGED_DIR = "merged"


@dataclass
class ScriptArguments(trl.ScriptArguments):
    """TRL's ScriptArguments plus the keys this project's stages add."""

    merge_lora_after_training: bool = field(
        default=False,
        metadata={
            "help": f"With use_peft: also save the base model with the adapter merged in, in OUTPUT_DIR/{MERGED_DIR}."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an output_dir that holds checkpoints of an earlier run (they are deleted)."},
    )
    allow_recipe_change: bool = field(
        default=False,
        metadata={
            "help": "With resume_from_checkpoint: continue with a recipe that differs from the checkpoint's (a new "
            "learning rate, schedule, length); the change applies from the checkpoint's step and the saved recipe "
            "records it. The batch shape, data and model cannot change on resume."
        },
    )
    health_prompts: int = field(
        default=0,
        metadata={
            "help": "At each evaluation, greedy replies to this many held-out prompts of the eval split: logs "
            "eval_stop_rate, eval_truncated_rate, eval_mean_length, eval_repeat_4gram_rate (posttrain/training/callbacks.py)."
        },
    )


@dataclass
class Recipe:
    """What `parse_stage_recipe` decided: the four argument groups TRL's scripts take, and the launch-dependent
    defaults it applied (re-derived at each launch, so they are left out of the saved recipe)."""

    script_args: ScriptArguments
    training_args: trl.SFTConfig | trl.DPOConfig
    model_args: trl.ModelConfig
    dataset_args: trl.DatasetMixtureConfig
    launch_defaults: dict = field(default_factory=dict)

    @property
    def arguments(self) -> tuple:
        """(script_args, training_args, model_args, dataset_args), as TRL's scripts take them."""
        return self.script_args, self.training_args, self.model_args, self.dataset_args


def launch_defaults() -> dict:
    """Defaults that depend on how the script was launched.

    Several processes without a GPU (the CPU tests and the demo): with no backend named, Accelerate 1.15
    records one process on every rank although the launcher started a process group; under DeepSpeed the
    `train_batch_size` it writes into the DeepSpeed config is then short by the world size and the first
    engine DeepSpeed builds fails its own batch-size check. Naming the gloo backend makes Accelerate count the
    processes. Plain DDP (a MULTI_GPU launch config on CPU processes) also needs `use_cpu`: without it
    Accelerate counts the processes but makes them DistributedType.NO, so no rank synchronises with another
    (no gradient all-reduce, each trains alone) and each writes into the output directory. On GPUs nothing
    changes (NCCL is found as before). Nothing here is written into recipe.resolved.yaml.

    FSDP on processes without a GPU is refused: Accelerate 1.15 applies an FSDP config only to GPU-type
    processes (its state sets FSDP for MULTI_GPU, MULTI_NPU, ...; CPU processes become MULTI_CPU or NO), so
    each rank would train alone, neither sharded nor synchronised, and all of them would write the model.
    """
    import torch

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available():
        raise PosttrainError(
            "an FSDP launch needs GPUs: accelerate applies FSDP to GPU processes only, and on CPU processes "
            "each would train alone, unsharded and unsynchronised; on CPU use accelerate_configs/zero3.yaml "
            "(DeepSpeed ZeRO-3 runs there) or a single process"
        )
    if torch.cuda.is_available():
        return {}
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return {"ddp_backend": "gloo"}
    return {"ddp_backend": "gloo", "use_cpu": True} if several else {}


def read_recipe_yaml(path: str) -> dict:
    """The recipe's mapping, or one line naming the file (and the line of a YAML syntax error)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise PosttrainError(f"recipe {path} not found") from None
    except IsADirectoryError:
        raise PosttrainError(f"recipe {path} is a directory; pass a .yaml file") from None
    except PermissionError:
        raise PosttrainError(f"recipe {path}: permission denied") from None
    except UnicodeDecodeError as err:
        raise PosttrainError(f"recipe {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PosttrainError(f"recipe {path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PosttrainError(f"recipe {path} must be a YAML mapping of key: value")
    return data


def _scalar_kinds(hint) -> tuple[str, ...] | None:
    """The names of the scalar types a field's type hint allows (int, float, str, bool, an enum, a Literal),
    or None when it allows a list or mapping too (or cannot be told)."""
    import enum
    import types
    import typing

    if hint is None:
        return None
    if typing.get_origin(hint) is typing.Literal:
        return ("one of " + ", ".join(map(repr, typing.get_args(hint))),)
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = []
    for arg in args:
        if arg is type(None):
            continue
        if typing.get_origin(arg) is typing.Literal:
            kinds.append("one of " + ", ".join(map(repr, typing.get_args(arg))))
        elif arg in (int, float, str, bool):
            kinds.append(arg.__name__)
        elif isinstance(arg, type) and issubclass(arg, enum.Enum):
            kinds.append("one of " + ", ".join(repr(m.value) for m in arg))
        else:
            return None
    return tuple(kinds) or None


def check_yaml_value_kinds(data: dict, dataclass_types: Sequence[type], path: str) -> None:
    """A YAML list or mapping given for a key that takes one number, word or flag is one line naming the key
    (TRL passes such a value through unchecked, and the trainer fails on it with a traceback)."""
    import dataclasses
    import typing

    hints = {}
    for cls in dataclass_types:
        try:
            resolved = typing.get_type_hints(cls)
        except Exception:  # a hint that does not resolve: that class's keys are left to TRL
            continue
        for f in dataclasses.fields(cls):
            hints.setdefault(f.name, resolved.get(f.name))
    for key, value in data.items():
        kinds = _scalar_kinds(hints.get(key)) if isinstance(value, (list, dict)) else None
        if kinds:
            shape = "list" if isinstance(value, list) else "mapping"
            raise PosttrainError(f"recipe {path}: {key} takes {' or '.join(kinds)}, not a {shape} ({value!r})"[:300])


def _recipe_argv(argv: Sequence[str] | None) -> tuple[list[str], str | None]:
    """argv with a positional `RECIPE.yaml` turned into `--config RECIPE.yaml` (TRL's form), and the recipe's
    path (None when there is no recipe)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml")):
        argv = ["--config", *argv]
    elif argv and not argv[0].startswith("-"):  # TRL would ignore it and train on the defaults
        raise PosttrainError(f"{argv[0]}: the first argument must be a recipe .yaml file (or a --key value flag)")
    if "--config" not in argv:
        return argv, None
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise PosttrainError("--config needs a recipe path")
    return argv, argv[i + 1]


# ------------------------------------------------------------------ help


@dataclass(frozen=True)
class RecipeHelp:
    """What a command's `--help` says before the full field list: two lines on what it does, and the recipe
    keys a user sets most ({key: a few words}, or a text of `key  a few words` lines); the defaults are read
    from the dataclasses."""

    description: str
    keys: dict | str

    def __post_init__(self):
        if isinstance(self.keys, str):
            lines = [line.split(None, 1) for line in self.keys.strip().splitlines()]
            object.__setattr__(self, "keys", {key: text for key, text in lines})


def program_name() -> str:
    """How the user ran this command: `posttrain sft`, or the script as given (`posttrain/sft.py`)."""
    if os.environ.get(PROG_ENV):
        return os.environ[PROG_ENV]
    prog = sys.argv[0] if sys.argv and sys.argv[0] else "posttrain"
    if prog.endswith(".py"):
        path = Path(prog)
        if path.is_absolute():
            try:
                path = path.relative_to(Path.cwd())
            except ValueError:
                pass
        return str(path)
    return prog


def usage_line(prog: str) -> str:
    return f"usage: {prog} RECIPE.yaml [--key value ...]  (or --config RECIPE.yaml)"


def _field_default(dataclass_types: Sequence[type], key: str):
    for cls in dataclass_types:
        for f in dataclasses.fields(cls):
            if f.name == key:
                if f.default is not dataclasses.MISSING:
                    return f.default
                if f.default_factory is not dataclasses.MISSING:
                    return f.default_factory()
                return None
    raise KeyError(key)


def short_help(prog: str, help: RecipeHelp, dataclass_types: Sequence[type]) -> str:
    """Usage, the description, the common keys with their defaults, and how to see every field."""
    lines = [
        f"usage: {prog} RECIPE.yaml [--key value ...]",
        f"   or: {prog} --config RECIPE.yaml [--key value ...]",
        "",
    ]
    lines += [*help.description.strip().splitlines(), ""]
    lines.append("The keys a recipe sets most (YAML `key: value`, or `--key value` / `--key-name value` here):")
    width = max(len(k) for k in help.keys) + 2
    for key, text in help.keys.items():
        default = _field_default(dataclass_types, key)
        shown = "" if default in (None, "", [], {}) else f" [default: {_plain(default)}]"
        lines.append(f"  {key:<{width}}{text}{shown}")
    count = sum(len(dataclasses.fields(cls)) for cls in dataclass_types)
    lines += ["", f"Every field ({count}), with its help: {prog} --help-all"]
    return "\n".join(lines)


def parse_recipe(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None = None,
    defaults: dict | None = None,
    help: RecipeHelp | None = None,
):
    """Parse `RECIPE.yaml [--key value ...]` (or `--config RECIPE.yaml ...`) into TRL dataclasses.

    Returns (dataclass instances, the keys the user set in the YAML or on the command line). YAML keys
    become defaults and command-line flags override them; `defaults` replace the dataclasses' own. An
    unknown key or a rejected value is a PosttrainError naming it (and the closest known key). `-h`/`--help`
    prints `help` (the short form) and `--help-all` every field, then exit 0.
    """
    prog = program_name()
    raw = list(sys.argv[1:] if argv is None else argv)
    parser = trl.TrlParser(list(dataclass_types), prog=prog)
    if "--help-all" in raw or (help is None and {"-h", "--help"} & set(raw)):
        parser.print_help()
        raise SystemExit(0)
    if {"-h", "--help"} & set(raw):
        print(short_help(prog, help, dataclass_types))
        raise SystemExit(0)
    argv, path = _recipe_argv(raw)
    if not argv:
        raise PosttrainError(f"{usage_line(prog)}; {prog} --help lists the keys")
    user_keys = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--") and a != "--config"}
    if path:
        data = read_recipe_yaml(path)  # also the one-line errors TRL's own reading lacks
        check_yaml_value_kinds(data, dataclass_types, path)
        user_keys |= set(data)
    where = f"recipe {path} or the command line" if path else "the command line"
    known_keys = [a.dest for a in parser._actions if a.dest != "help"]

    def one_line_error(message: str):  # argparse would print the whole usage (~150 lines) first
        raise PosttrainError(f"{message} (in {where})")

    parser.error = one_line_error
    if defaults:
        parser.set_defaults_with_config(**defaults)
    try:
        parsed = parser.parse_args_and_config(args=argv)
    except (ValueError, TypeError) as err:  # an unknown key, or a dataclass rejected a value
        msg = str(err)
        if msg.startswith("Unknown arguments from config file"):
            unknown = sorted(a[2:] for a in msg.split("[", 1)[1].split("]", 1)[0].split("'")[1::2] if a[:2] == "--")
            named = ", ".join(f"{key}{did_you_mean(key, known_keys)}" for key in unknown)
            raise PosttrainError(
                f"recipe {path}: unknown key(s) {named} "
                f"(not a field of {', '.join(t.__name__ for t in dataclass_types)})"
            ) from None
        if "not used by the HfArgumentParser" in msg:
            words = msg.split("[", 1)[1].rsplit("]", 1)[0].split("'")[1::2]
            flags = [a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"]
            named = ", ".join(f"{w}{did_you_mean(w.split('=')[0], flags)}" for w in words if w.startswith("-"))
            named = named or " ".join(words)  # a stray word that is not a flag
            raise PosttrainError(f"unknown command-line argument(s): {named}") from None
        raise PosttrainError(f"{msg.splitlines()[0] if msg else type(err).__name__} (in {where})") from None
    return parsed, user_keys


def parse_stage_recipe(config_cls: type, argv: Sequence[str] | None = None, help: RecipeHelp | None = None) -> Recipe:
    """A training stage's recipe: ScriptArguments, `config_cls` (SFTConfig/DPOConfig), ModelConfig and the
    dataset mixture, with the launch defaults the user did not override recorded in the result."""
    defaults = launch_defaults()
    groups, user_keys = parse_recipe(
        [ScriptArguments, config_cls, trl.ModelConfig, trl.DatasetMixtureConfig], argv, defaults, help
    )
    applied = {k: v for k, v in defaults.items() if k not in user_keys}
    recipe = Recipe(*groups, launch_defaults=applied)
    check_stage_values(recipe)
    return recipe


DTYPES = ("auto", "bfloat16", "float16", "float32")


# The keys of every training stage's short --help (each stage adds its own after them).
STAGE_KEYS = {
    "model_name_or_path": "the model to start from: a directory (convert-checkpoint's or a stage's output) or hub id",
    "dataset_name": "a data_scripts directory, a .jsonl/.json/.parquet file or a hub dataset",
    "datasets": "instead of dataset_name, in the YAML: a mixture [{path: ..., fraction: ...}, ...]",
    "per_device_train_batch_size": "rows per process per micro-batch",
    "gradient_accumulation_steps": "micro-batches per update (batch = this x the above x processes)",
    "learning_rate": "peak learning rate",
    "num_train_epochs": "passes over the training data (max_steps > 0 overrides)",
    "output_dir": "where the model, its checkpoints and recipe.resolved.yaml go",
    "report_to": "none, tensorboard, wandb, mlflow, trackio, ... (an extra: pip install -e '.[wandb]')",
}

# report_to name -> (transformers' availability check, the pip package, this project's extra or None).
TRACKERS = {
    "wandb": ("is_wandb_available", "wandb", "wandb"),
    "mlflow": ("is_mlflow_available", "mlflow", "mlflow"),
    "trackio": ("is_trackio_available", "trackio", "trackio"),
    "comet_ml": ("is_comet_available", "comet_ml", "comet"),
    "clearml": ("is_clearml_available", "clearml", "clearml"),
    "neptune": ("is_neptune_available", "neptune", "neptune"),
    "dvclive": ("is_dvclive_available", "dvclive", "dvclive"),
    "swanlab": ("is_swanlab_available", "swanlab", "swanlab"),
    "tensorboard": ("is_tensorboard_available", "tensorboard", None),
    "codecarbon": ("is_codecarbon_available", "codecarbon", None),
    "azure_ml": ("is_azureml_available", "azureml-core", None),
    "dagshub": ("is_dagshub_available", "dagshub", None),
    "flyte": ("is_flyte_deck_standard_available", "flytekit flytekitplugins-deck-standard", None),
    "kubeflow": ("is_kubeflow_available", "kubeflow", None),
}


def check_trackers(report_to) -> None:
    """Refuse a `report_to` tracker that transformers does not know or that is not installed, in one line with
    the command that installs it (transformers would fail with a traceback when the trainer is built)."""
    from transformers.integrations import integration_utils

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    known = set(integration_utils.INTEGRATION_TO_CALLBACK) | {"all", "none"}
    for name in names:
        if name not in known:
            raise PosttrainError(
                f"report_to {name}: not a tracker transformers knows{did_you_mean(name, known)}; "
                f"one of {', '.join(sorted(known))}"
            )
        check, package, extra = TRACKERS.get(name, (None, name, None))
        available = getattr(integration_utils, check, None) if check else None
        if available is None or available():
            continue
        install = f'pip install -e ".[{extra}]" (or pip install {package})' if extra else f"pip install {package}"
        raise PosttrainError(
            f"report_to {name}: {package.split()[0]} is not installed; {install}, or set report_to: none"
        )


def check_stage_values(recipe: Recipe) -> None:
    """Refuse, before any model loads, values the trainers would accept and then fail or mistrain on."""
    args = recipe.training_args
    refuse_missing_local_paths(
        {
            "model_name_or_path": recipe.model_args.model_name_or_path,
            "chat_template_path": getattr(args, "chat_template_path", None),
        }
    )
    check_trackers(args.report_to)
    hub_error = hub_model_problem(
        "model_name_or_path", recipe.model_args.model_name_or_path, recipe.model_args.model_revision
    )
    if hub_error:
        raise hub_error
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise PosttrainError(f"learning_rate must be a positive number (got {args.learning_rate})")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, key) < 1:
            raise PosttrainError(f"{key} must be at least 1 (got {getattr(args, key)})")
    if recipe.model_args.dtype not in (None, *DTYPES):
        raise PosttrainError(f"dtype {recipe.model_args.dtype!r} is not one of {', '.join(DTYPES)}")
    if args.max_steps <= 0 and not args.num_train_epochs > 0:
        raise PosttrainError(
            f"num_train_epochs: {args.num_train_epochs} with max_steps: {args.max_steps} trains 0 steps; "
            "set num_train_epochs > 0 or max_steps > 0"
        )
    mixture = recipe.dataset_args.datasets or []
    if not mixture and not recipe.script_args.dataset_name:
        raise PosttrainError("the recipe names no data: set dataset_name or a non-empty datasets: mixture")
    for entry in mixture:
        if entry.fraction is not None and not 0 < entry.fraction <= 1:
            raise PosttrainError(f"datasets: {entry.path} has fraction {entry.fraction}; a fraction must be in (0, 1]")
    if "min_lr" in (args.lr_scheduler_kwargs or {}) and args.deepspeed_plugin is not None:
        # transformers computes min_lr / optimizer.defaults["lr"], and ZeRO optimizers have no defaults
        raise PosttrainError(
            "lr_scheduler_kwargs min_lr crashes under DeepSpeed; give the floor as a fraction of "
            "learning_rate instead: lr_scheduler_kwargs: {min_lr_rate: MIN_LR / LEARNING_RATE}"
        )


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
            # to_dict masks every `*_token` field as "<NAME>"; keep the real values (eos_token matters to
            # training) but never the secret, and drop aliases that would warn on re-parse.
            items.update({k: getattr(config, k) for k in items if k.endswith("_token")})
            for key in _NOT_SAVED:
                items.pop(key, None)
        else:
            items = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
        for key, value in items.items():
            merged[key] = _plain(value)
    return merged


def save_resolved_recipe(
    output_dir: str | Path,
    *configs,
    overrides: dict | None = None,
    launch: dict | None = None,
    script: str = "posttrain/<stage>.py",
    notes: Sequence[str] = (),
) -> Path:
    """Write the resolved recipe as YAML next to the model: rerunnable with `sft.py THIS.yaml`.

    `overrides` replace settings that must not be repeated by a rerun (a resume path, launch defaults).
    `launch` (processes, distributed type, ZeRO stage, precision) is recorded as a comment header: it comes
    from the accelerate config, not the recipe, but the effective batch depends on it; so are `notes` (the
    changes made on resuming). `script` is the stage script the header's rerun command names.
    """
    path = Path(output_dir) / RESOLVED_RECIPE_NAME
    text = f"# Every effective setting of this run; rerun with: accelerate launch {script} {path.name}\n"
    for key, value in (launch or {}).items():
        text += f"# launched with {key}: {value}\n"
    for note in notes:
        text += f"# {note}\n"
    settings = {**resolved_recipe(*configs), **{k: _plain(v) for k, v in (overrides or {}).items()}}
    text += yaml.safe_dump(settings, sort_keys=True)
    atomic_write_text(path, text)
    return path
