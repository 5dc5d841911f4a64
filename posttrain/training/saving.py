"""Save a trained run so that the next stage, a rerun and a reader find everything they need.

The model (or LoRA adapter), tokenizer with its chat template, generation config (stopping at
`<|im_end|>`), training_info.json (stage, base model, data, the training system prompt), trainer state,
optionally the merged LoRA model, the model card (README.md), and last the resolved recipe: its
presence marks the directory as a finished run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from pathlib import Path

from posttrain.conversion.chat_template import IM_END
from posttrain.outputs.atomic import atomic_output_dir
from posttrain.outputs.paths import make_readable
from posttrain.training.model_card import write_model_card, write_training_info
from posttrain.training.recipe import MERGED_DIR, RESOLVED_RECIPE_NAME, Recipe, resolved_recipe, save_resolved_recipe
from posttrain.training.run_dir import RunRecipe, recipe_notes

logger = logging.getLogger("posttrain")

FINAL_MODEL_TMP = ".final-model.tmp"


def stop_on_im_end(generation_config, tokenizer) -> None:
    """Make generation stop at the end of an assistant turn (`<|im_end|>`), keeping any other eos ids."""
    ids = generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if im_end not in ids:
        generation_config.eos_token_id = [im_end, *ids]
    if generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id


@contextlib.contextmanager
def _without_zero3_init(trainer):
    """Let one process call from_pretrained alone: under ZeRO-3 transformers would build the model inside
    deepspeed.zero.Init, a collective the other ranks never join (the run hangs)."""
    from transformers.integrations import unset_hf_deepspeed_config

    plugin = trainer.accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def save_merged_lora(trainer, recipe: Recipe) -> Path:
    """Base model + the saved adapter, merged, in OUTPUT/merged (reloaded from disk on the main process, so
    the same under any ZeRO stage)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_args, out = recipe.model_args, Path(recipe.training_args.output_dir)
    with _without_zero3_init(trainer):
        base = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            dtype=model_args.dtype or "auto",
            trust_remote_code=recipe.training_args.trust_remote_code,
        )
        merged = PeftModel.from_pretrained(base, out).merge_and_unload()
    stop_on_im_end(merged.generation_config, trainer.processing_class)
    with atomic_output_dir(out / MERGED_DIR, overwrite=True) as tmp:
        merged.save_pretrained(tmp)
        trainer.processing_class.save_pretrained(tmp)
    return out / MERGED_DIR


def _launch_summary(accelerator) -> dict:
    """How the run was launched (from the accelerate config): what the effective batch depends on."""
    state = accelerator.state
    summary = {
        "num_processes": state.num_processes,
        "distributed_type": str(state.distributed_type).split(".")[-1],
        "mixed_precision": state.mixed_precision,
    }
    if state.deepspeed_plugin is not None:
        summary["zero_stage"] = state.deepspeed_plugin.zero_stage
    return summary


@contextlib.contextmanager
def _final_model_dir(trainer, out: Path):
    """A directory inside output_dir for the final model (the same path on every rank); once everything is
    written, its files are renamed into output_dir. A save that fails (a full disk) leaves no model files."""
    tmp = out / FINAL_MODEL_TMP
    main = trainer.accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # a killed run's leftovers
    trainer.accelerator.wait_for_everyone()
    try:
        yield tmp
        trainer.accelerator.wait_for_everyone()
        if main:
            make_readable(tmp)  # safetensors writes 0600 files (through a private temporary file)
            for path in sorted(tmp.iterdir()):
                if (out / path.name).is_dir():
                    shutil.rmtree(out / path.name)
                os.replace(path, out / path.name)
            tmp.rmdir()
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def stage_script(recipe: Recipe) -> str:
    """The stage script that trains this recipe (the saved recipe's header names it)."""
    import trl

    for config, script in ((trl.DPOConfig, "dpo"), (trl.RewardConfig, "reward"), (trl.SFTConfig, "sft")):
        if isinstance(recipe.training_args, config):
            return f"posttrain/{script}.py"
    return "posttrain/<stage>.py"


def save_run(trainer, recipe: Recipe, train_result, info: dict | None = None) -> None:
    """Save the trained run into output_dir, the resolved recipe last; then end the trainer. `info`
    (posttrain.training.model_card.training_info) becomes training_info.json and the model card."""
    from accelerate.utils import is_peft_model

    out = Path(recipe.training_args.output_dir)
    if trainer.accelerator.is_main_process:  # from here on the directory holds a mix of the old run and this one
        (out / RESOLVED_RECIPE_NAME).unlink(missing_ok=True)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    model = trainer.model
    generation_config = getattr(model, "generation_config", None)  # a reward (sequence-classification) model has none
    if generation_config is not None:
        stop_on_im_end(generation_config, trainer.processing_class)
    launch = _launch_summary(trainer.accelerator)  # recorded in training_info.json and the saved recipe
    with _final_model_dir(trainer, out) as tmp:
        # Every process calls save_model: under ZeRO-3 it gathers the shards; it writes on the main process.
        trainer.save_model(str(tmp))  # model (or LoRA adapter), tokenizer with its chat template
        if trainer.accelerator.is_main_process and generation_config is not None:
            generation_config.save_pretrained(tmp)  # also next to a LoRA adapter
        if trainer.accelerator.is_main_process and info is not None:
            info = {**info, "launch": launch}
            write_training_info(tmp, info)
    trainer.save_state()  # trainer_state.json: the log history
    if trainer.accelerator.is_main_process:
        if is_peft_model(model) and recipe.script_args.merge_lora_after_training:
            merged = save_merged_lora(trainer, recipe)
            if info is not None:
                write_training_info(merged, info)
            logger.info("merged model saved to %s", merged)
        if info is not None:  # over the card TRL wrote at each checkpoint
            write_model_card(out, settings=resolved_recipe(*recipe.arguments))
        # A rerun from the saved recipe starts from scratch, and re-derives its launch defaults.
        defaults = {f.name: f.default for f in dataclasses.fields(recipe.training_args)}
        overrides = {
            "resume_from_checkpoint": None,
            "allow_recipe_change": False,
            **{key: defaults[key] for key in recipe.launch_defaults},
        }
        record = next((cb.record for cb in trainer.callback_handler.callbacks if isinstance(cb, RunRecipe)), {})
        save_resolved_recipe(
            out,
            recipe.script_args,
            recipe.training_args,
            recipe.model_args,
            recipe.dataset_args,
            overrides=overrides,
            launch=launch,
            script=stage_script(recipe),
            notes=recipe_notes(record) if record else (),
        )
        trainer.accelerator.print(f"saved the model, tokenizer, trainer state and {RESOLVED_RECIPE_NAME} to {out}")
    trainer.accelerator.wait_for_everyone()
    trainer.end()  # finish the trackers, destroy the process group
