"""Reward model: a scorer of replies, trained on preference pairs, for sampling on-policy pairs.

    accelerate launch [--config_file accelerate_configs/zero2.yaml] posttrain/reward.py recipes/reward.yaml [--key value ...]
    python posttrain/reward.py recipes/demo/reward.yaml            # one process
    posttrain reward RECIPE.yaml [--num_processes N | --config_file ACCELERATE.yaml] [--key value ...]

The recipe is a YAML file of TRL `ScriptArguments` / `RewardConfig` / `ModelConfig` / `DatasetMixtureConfig`
fields; command-line flags override it. TRL's RewardTrainer loads `model_name_or_path` (the SFT output) as a
sequence-classification model with one score (a new linear head on the last token's hidden state, in place of
the LM head), renders prompt + chosen and prompt + rejected with the tokenizer's chat template and trains
-log sigmoid(score(chosen) - score(rejected)). Each evaluation logs `eval_accuracy` (the held-out pairs whose
chosen outscores rejected) and `eval_margin` (their mean score difference). The output directory is that model
with its tokenizer and chat template: `AutoModelForSequenceClassification.from_pretrained(OUT)` scores a
conversation, and `posttrain/generate_pairs.py` takes it as `reward_model`.
"""

from __future__ import annotations

import trl

from posttrain.data.lengths import count_dropped
from posttrain.data.loading import validate_preference_rows
from posttrain.outputs.errors import PosttrainError
from posttrain.training.model_card import training_info
from posttrain.training.recipe import STAGE_KEYS, Recipe, RecipeHelp
from posttrain.training.run_dir import run_stage_cli
from posttrain.training.runtime import setup_logging_and_seed
from posttrain.training.stage import check_inputs, train_and_save
from posttrain.training.trainers import build_trainer, check_model

RECIPE_HELP = RecipeHelp(
    description="Reward model: train a scorer of replies on preference pairs (chosen should outscore rejected),\n"
    "for posttrain/generate_pairs.py to rank the policy's own samples with.",
    keys={
        **STAGE_KEYS,
        "max_length": "tokens of prompt + reply; longer pairs are dropped, counted",
        "center_rewards_coefficient": "pulls the mean score towards 0",
    },
)


class RewardModelTrainer(trl.RewardTrainer):
    """TRL's RewardTrainer, counting the pairs it drops for length (TRL 1.16 filters them silently)."""

    # Private hook: TRL 1.16 tokenizes and filters by max_length inside `_prepare_dataset` and reports nothing.
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        import datasets

        before = len(dataset) if isinstance(dataset, datasets.Dataset) else None
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if args.max_length is not None:
            count_dropped(
                dataset,
                stage="reward",
                noun=f"{dataset_name} pair",
                why=f"whose chosen or rejected conversation is longer than max_length={args.max_length} tokens",
                max_length=args.max_length,
                before=before,
            )
        return dataset


def refuse_unsupported(script_args, model_args) -> None:
    """What the other stages offer and a reward model cannot use, refused before anything loads."""
    if script_args.health_prompts:
        raise PosttrainError("health_prompts: a reward model does not generate replies; set health_prompts: 0")
    if model_args.use_peft:
        raise PosttrainError(
            "use_peft: the reward model is trained in full here (a LoRA adapter would leave the new score head "
            "untrained unless it is saved whole, and generate_pairs.py loads full models); set use_peft: false"
        )


def main(recipe: Recipe) -> None:
    script_args, training_args, model_args, _ = recipe.arguments
    setup_logging_and_seed(training_args)

    # Every input is checked, in one line each, before anything in output_dir changes or the model loads.
    # The pairs are whole conversations to score, so the template needs no {% generation %} markers.
    refuse_unsupported(script_args, model_args)
    resume, record, tokenizer, train_dataset, eval_dataset = check_inputs(
        recipe, validate_preference_rows, require_generation_markers=False
    )
    check_model(model_args, training_args)
    info = training_info("reward", recipe, train_dataset)  # the training system prompt, before tokenizing

    trainer = build_trainer(RewardModelTrainer, recipe, tokenizer, train_dataset, eval_dataset)
    train_and_save(trainer, recipe, resume, record, info)


if __name__ == "__main__":
    run_stage_cli(main, trl.RewardConfig)
