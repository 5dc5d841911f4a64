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
from posttrain.data.loading import load_datasets, validate_sft_rows
from posttrain.training.callbacks import add_health_callback, held_out_prompts
from posttrain.training.model_card import training_info
from posttrain.training.recipe import STAGE_KEYS, Recipe, RecipeHelp
from posttrain.training.run_dir import (
    apply_recipe_change,
    check_recipe_change,
    claim_output_dir,
    refuse_inputs_in_output_dir,
    reporting_stops,
    resume_checkpoint,
    run_stage_cli,
)
from posttrain.training.runtime import setup_logging_and_seed
from posttrain.training.saving import save_run
from posttrain.training.trainers import build_trainer, check_model, check_renders, load_training_tokenizer

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
    script_args, training_args, model_args, dataset_args = recipe.arguments
    setup_logging_and_seed(training_args)
    if not training_args.assistant_only_loss:
        logger.warning("assistant_only_loss is false: the loss also covers system and user turns")

    # Every input is checked, in one line each, before anything in output_dir changes or the model loads.
    refuse_inputs_in_output_dir(recipe)
    resume = resume_checkpoint(script_args, training_args)
    record = check_recipe_change(recipe, resume)
    tokenizer = load_training_tokenizer(
        model_args, training_args, require_generation_markers=training_args.assistant_only_loss
    )
    train_dataset, eval_dataset = load_datasets(script_args, dataset_args, training_args, validate_sft_rows)
    check_renders(tokenizer, train_dataset, model_args.model_name_or_path)
    train_dataset = drop_overlong_conversations(train_dataset, tokenizer, training_args, "train")
    eval_dataset = drop_overlong_conversations(eval_dataset, tokenizer, training_args, "eval")
    health_prompts = held_out_prompts(eval_dataset, script_args.health_prompts)
    check_model(model_args, training_args)
    info = training_info("sft", recipe, train_dataset)  # the training system prompt, before tokenizing

    trainer = build_trainer(trl.SFTTrainer, recipe, tokenizer, train_dataset, eval_dataset)
    add_health_callback(trainer, health_prompts)
    apply_recipe_change(trainer, record, resume)
    claim_output_dir(training_args, resume)  # the model loaded: only now are old checkpoints removed
    with reporting_stops(trainer):  # Ctrl-C or a full disk: one line saying what was kept
        train_result = trainer.train(resume_from_checkpoint=resume)
        save_run(trainer, recipe, train_result, info)


if __name__ == "__main__":
    run_stage_cli(main, trl.SFTConfig)
