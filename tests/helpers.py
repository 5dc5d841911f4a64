"""Helpers several test modules share (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def write_recipe(stage: str, path: Path, model_dir, data_dir, output_dir, **overrides) -> Path:
    """recipes/demo/<stage>.yaml, pointed at the test's model, data and output directory."""
    recipe = yaml.safe_load((REPO / "recipes" / "demo" / f"{stage}.yaml").read_text())
    recipe.update(
        model_name_or_path=str(model_dir), dataset_name=str(data_dir), output_dir=str(output_dir), report_to="none"
    )
    recipe.update(overrides)
    path.write_text(yaml.safe_dump(recipe))
    return path


def stage_module(stage: str):
    """posttrain.sft or posttrain.dpo."""
    return importlib.import_module(f"posttrain.{stage}")


def parse_stage(stage: str, *argv):
    """The stage's Recipe from `RECIPE.yaml [--key value ...]`, as its script parses it."""
    import trl

    from posttrain.recipe import parse_stage_recipe

    config_cls = trl.SFTConfig if stage == "sft" else stage_module(stage).DPOConfig
    return parse_stage_recipe(config_cls, [str(a) for a in argv])


def run_stage(stage: str, *argv) -> None:
    """Run the stage's `main` in this process."""
    stage_module(stage).main(parse_stage(stage, *argv))


def build_stage_trainer(stage: str, *argv):
    """The stage's trainer on its data, as its `main` builds it, without training."""
    from posttrain.chat_template import load_training_tokenizer
    from posttrain.data import load_datasets, validate_preference_rows, validate_sft_rows
    from posttrain.lengths import drop_overlong_conversations
    from posttrain.trainers import build_trainer

    recipe = parse_stage(stage, *argv)
    script_args, training_args, model_args, dataset_args = recipe.arguments
    sft = stage == "sft"
    tokenizer = load_training_tokenizer(model_args, training_args, require_generation_markers=sft)
    validate = validate_sft_rows if sft else validate_preference_rows
    train, evaluation = load_datasets(script_args, dataset_args, training_args, validate)
    if sft:
        train = drop_overlong_conversations(train, tokenizer, training_args, "train")
        evaluation = drop_overlong_conversations(evaluation, tokenizer, training_args, "eval")
    trainer_cls = __import__("trl").SFTTrainer if sft else stage_module(stage).PreferenceTrainer
    return build_trainer(trainer_cls, recipe, tokenizer, train, evaluation)


def log_history(out: Path) -> list[dict]:
    """The log history of a run's trainer_state.json."""
    return json.loads((Path(out) / "trainer_state.json").read_text())["log_history"]


def one_error_line(stderr: str) -> str:
    """The single `error: ...` line a refused command prints (asserting there is exactly one)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]
