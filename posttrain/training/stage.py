"""The steps every training stage (sft.py, dpo.py, reward.py) takes around its own: the inputs checked before
anything in output_dir changes, and the end (claim output_dir, train, save) that keeps a finished run safe."""

from __future__ import annotations

from posttrain.data.loading import load_datasets
from posttrain.training.run_dir import (
    apply_recipe_change,
    check_recipe_change,
    claim_output_dir,
    refuse_inputs_in_output_dir,
    reporting_stops,
    resume_checkpoint,
)
from posttrain.training.saving import save_run
from posttrain.training.trainers import check_renders, load_training_tokenizer


def check_inputs(recipe, validate_rows, require_generation_markers: bool) -> tuple:
    """(resume, recipe change record, tokenizer, train dataset, eval dataset), each input checked in one line
    before output_dir changes or the model loads: output_dir overlaps no input, the checkpoint to resume (and
    how the recipe differs from its run's), the tokenizer, the data rows (`validate_rows`), the template on them."""
    script_args, training_args, model_args, dataset_args = recipe.arguments
    refuse_inputs_in_output_dir(recipe)
    resume = resume_checkpoint(script_args, training_args)
    record = check_recipe_change(recipe, resume)
    tokenizer = load_training_tokenizer(model_args, training_args, require_generation_markers)
    train_dataset, eval_dataset = load_datasets(script_args, dataset_args, training_args, validate_rows)
    check_renders(tokenizer, train_dataset, model_args.model_name_or_path)
    return resume, record, tokenizer, train_dataset, eval_dataset


def train_and_save(trainer, recipe, resume, record, info: dict) -> None:
    """The model is loaded (the trainer built): only now is output_dir claimed and its old checkpoints removed;
    then train (Ctrl-C, SIGTERM or a full disk: one line saying what was kept) and save the run."""
    apply_recipe_change(trainer, record, resume)
    claim_output_dir(recipe.training_args, resume)
    with reporting_stops(trainer):
        train_result = trainer.train(resume_from_checkpoint=resume)
        save_run(trainer, recipe, train_result, info)
