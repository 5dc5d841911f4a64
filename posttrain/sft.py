"""Supervised fine-tuning: teach the converted base model to follow instructions.

    accelerate launch [--config_file accelerate_configs/zero2.yaml] posttrain/sft.py recipes/sft.yaml [--key value ...]
    python posttrain/sft.py recipes/demo/sft.yaml            # one process
    posttrain sft RECIPE.yaml [--num_processes N | --config_file ACCELERATE.yaml] [--key value ...]

The recipe is a YAML file of TRL `ScriptArguments` / `SFTConfig` / `ModelConfig` / `DatasetMixtureConfig`
fields (plus `posttrain.training.recipe.ScriptArguments`' own); command-line flags override it. The loss covers the
assistant turns only, each with its closing `<|im_end|>` (`assistant_only_loss` with the ChatML template's
generation markers), so the model learns to answer and to stop; conversations are packed padding-free.
"""

from __future__ import annotations

import logging

import trl

from posttrain.data.lengths import drop_overlong_conversations
from posttrain.data.loading import validate_sft_rows
from posttrain.training.callbacks import add_health_callback, held_out_prompts
from posttrain.training.model_card import training_info
from posttrain.training.recipe import STAGE_KEYS, Recipe, RecipeHelp
from posttrain.training.run_dir import run_stage_cli
from posttrain.training.runtime import setup_logging_and_seed
from posttrain.training.stage import check_inputs, train_and_save
from posttrain.training.trainers import build_trainer, check_model

logger = logging.getLogger("posttrain.sft")

RECIPE_HELP = RecipeHelp(
    description="Supervised fine-tuning: teach a converted base model to follow instructions, with the loss on the\n"
    "assistant turns only (each with its closing <|im_end|>) and conversations packed padding-free.",
    keys={
        **STAGE_KEYS,
        "max_length": "tokens per packed row; longer conversations are dropped, counted",
        "packing": "pack conversations into rows of max_length",
        "assistant_only_loss": "the loss on assistant turns only",
        "use_peft": "train a LoRA adapter (lora_r, lora_alpha) instead of every weight",
    },
)


def main(recipe: Recipe) -> None:
    script_args, training_args, model_args, _ = recipe.arguments
    setup_logging_and_seed(training_args)
    if not training_args.assistant_only_loss:
        logger.warning("assistant_only_loss is false: the loss also covers system and user turns")

    # Every input is checked, in one line each, before anything in output_dir changes or the model loads.
    resume, record, tokenizer, train_dataset, eval_dataset = check_inputs(
        recipe, validate_sft_rows, require_generation_markers=training_args.assistant_only_loss
    )
    train_dataset = drop_overlong_conversations(train_dataset, tokenizer, training_args, "train")
    eval_dataset = drop_overlong_conversations(eval_dataset, tokenizer, training_args, "eval")
    health_prompts = held_out_prompts(eval_dataset, script_args.health_prompts)
    check_model(model_args, training_args)
    info = training_info("sft", recipe, train_dataset)  # the training system prompt, before tokenizing

    trainer = build_trainer(trl.SFTTrainer, recipe, tokenizer, train_dataset, eval_dataset)
    add_health_callback(trainer, health_prompts)
    train_and_save(trainer, recipe, resume, record, info)


if __name__ == "__main__":
    run_stage_cli(main, trl.SFTConfig)
