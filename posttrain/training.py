"""The plumbing every training stage shares, so `sft.py` and `dpo.py` differ only where SFT and DPO do.

A stage script is: `parse()` its recipe, `setup()` logging and seed, `resume_checkpoint()`,
`load_tokenizer()`, then `train_stage()` (`load_data()`, `make_trainer()`, `train_and_save()`);
its trainer may drop rows it cannot train with `drop_unfit_rows()`. Everything
heavy is a TRL / transformers / PEFT call; this module adds the checks that turn bad
input into one line before any training starts, and the saving that makes the output
directory a complete, reproducible record of the run.

Output directory contract: the resolved recipe (`recipe.resolved.yaml`) is written
*last*, after the model, tokenizer, generation config, trainer state and (with LoRA)
the merged model. A directory without it is an unfinished or interrupted run; a
stale one is deleted when a run starts in that directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trl

from posttrain.chat_template import IM_END
from posttrain.errors import PosttrainError
from posttrain.recipe import RESOLVED_RECIPE_NAME, explicit_keys, parse_recipe, save_resolved_recipe

logger = logging.getLogger("posttrain")

MERGED_DIR = "merged"
_CHECKPOINT_RE = re.compile(r"^checkpoint-\d+$")


@dataclass
class ScriptArguments(trl.ScriptArguments):
    """TRL's ScriptArguments plus what our stages need and TRL lacks."""

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


def launch_defaults() -> dict:
    """Recipe defaults that depend on how the script was launched.

    DeepSpeed on processes without a GPU (the CPU tests and demo): with no backend named,
    Accelerate 1.15 lets DeepSpeed create the process group (gloo, all ranks) but records
    `num_processes=1, process_index=0` on every rank. The Trainer then writes `train_batch_size =
    1 x micro-batch x accumulation` into the DeepSpeed config, and the first DeepSpeed engine
    built from it (the DPO reference model, the `precompute_ref_log_probs` pass, a ZeRO-3
    `from_pretrained`, the training engine) fails DeepSpeed's check `train_batch_size ==
    micro-batch x accumulation x world_size`; every rank would also believe it is the main one.
    Naming the backend (`ddp_backend: gloo`) makes Accelerate count the processes. On GPUs
    nothing changes (NCCL is found as before).
    """
    import torch

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not torch.cuda.is_available():
        return {"ddp_backend": "gloo"}
    return {}


# Launch defaults this run took (the user set none of these keys): left out of the resolved recipe,
# which is re-derived at each launch (a CPU run's gloo must not follow its recipe onto GPUs).
_applied_launch_defaults: dict = {}


def parse(config_cls: type, argv=None):
    """(script_args, training_args, model_args, dataset_args) from `RECIPE.yaml [--key value ...]`."""
    defaults = launch_defaults()
    parsed = parse_recipe([ScriptArguments, config_cls, trl.ModelConfig, trl.DatasetMixtureConfig], argv, defaults)
    user_keys = explicit_keys(argv)
    _applied_launch_defaults.clear()
    _applied_launch_defaults.update({k: v for k, v in defaults.items() if k not in user_keys})
    return parsed


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


def setup(training_args) -> None:
    """Log like the TRL scripts (only the main process at INFO) and seed everything."""
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if "min_lr" in (training_args.lr_scheduler_kwargs or {}) and training_args.deepspeed_plugin is not None:
        # transformers computes min_lr / optimizer.defaults["lr"], and ZeRO optimizers have no defaults
        raise PosttrainError(
            "lr_scheduler_kwargs min_lr crashes under DeepSpeed; give the floor as a fraction of "
            "learning_rate instead: lr_scheduler_kwargs: {min_lr_rate: MIN_LR / LEARNING_RATE}"
        )
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.set_seed(training_args.seed)


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def resume_checkpoint(script_args, training_args) -> str | None:
    """The checkpoint to resume from, or None for a fresh run (whose output_dir must hold no earlier run).

    `resume_from_checkpoint: true` means the newest `checkpoint-N` in output_dir (an error if there is
    none); any other value is a checkpoint path. Also deletes a stale completion marker, so an
    output_dir that is being rewritten never looks finished.
    """
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(training_args.output_dir)
    value = training_args.resume_from_checkpoint
    value = None if value is None or str(value).lower() in ("", "false", "none") else str(value)
    earlier = (
        [p for p in out.glob("checkpoint-*") if p.is_dir() and _CHECKPOINT_RE.match(p.name)] if out.is_dir() else []
    )
    earlier.sort(key=lambda p: int(p.name.split("-")[1]))
    if value is None:
        if earlier and not script_args.overwrite_output_dir:
            raise PosttrainError(
                f"output_dir {out} holds checkpoints of an earlier run ({earlier[-1].name}); pass "
                "--resume_from_checkpoint true to continue it, or --overwrite_output_dir true to start over"
            )
        stale = earlier
    elif value.lower() == "true":
        value = get_last_checkpoint(str(out)) if out.is_dir() else None
        if value is None:
            raise PosttrainError(f"--resume_from_checkpoint true: no checkpoint-N directory in {out} to resume from")
        stale = []
    else:
        if not (Path(value) / "trainer_state.json").is_file():
            raise PosttrainError(
                f"--resume_from_checkpoint {value}: not a checkpoint directory (no trainer_state.json)"
            )
        stale = []
    if _is_main_process():
        for path in stale:
            shutil.rmtree(path)
        (out / RESOLVED_RECIPE_NAME).unlink(missing_ok=True)
    _wait_for_everyone()
    if value:
        logger.info("resuming from %s", value)
    return value


def load_tokenizer(model_args, training_args, require_generation_markers: bool = True):
    """The model directory's tokenizer; refuse one whose chat template cannot mask the loss to assistant turns."""
    from transformers import AutoTokenizer
    from trl.chat_template_utils import has_generation_markers

    name = model_args.model_name_or_path
    if not name:
        raise PosttrainError("the recipe names no model: set model_name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise PosttrainError(f"model {name}: cannot load its tokenizer ({str(err).splitlines()[0]})") from None
    template = tokenizer.chat_template
    path = getattr(training_args, "chat_template_path", None)
    if path and path.endswith((".jinja", ".j2")) and os.path.isfile(path):
        template = Path(path).read_text(encoding="utf-8")
    if require_generation_markers and not (template and has_generation_markers(template)):
        raise PosttrainError(
            f"model {name}: its chat template has no {{% generation %}} markers, so the loss cannot be limited to "
            "assistant turns; convert the model with convert-checkpoint (it installs the ChatML training template) "
            "or set chat_template_path to a .jinja template that has them"
        )
    return tokenizer


def load_data(script_args, dataset_args, training_args, validate):
    """(train, eval-or-None) as the recipe names them, every row checked by `validate` before training."""
    import datasets

    from posttrain.data import load_train_eval

    train, evaluation = load_train_eval(script_args, dataset_args, want_eval=training_args.eval_strategy != "no")
    source = (
        script_args.dataset_name
        if not dataset_args.datasets
        else "mixture " + ",".join(d.path for d in dataset_args.datasets)
    )
    for split, ds in (("train", train), ("eval", evaluation)):
        if isinstance(ds, datasets.Dataset):  # a streamed dataset is checked by the trainer as it goes
            validate(ds, f"{source} ({split})")
    return train, evaluation


def model_init_kwargs(model_args, training_args) -> dict:
    """`from_pretrained` kwargs from ModelConfig, as TRL's scripts build them; the recipe's own model_init_kwargs win."""
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    return {**kwargs, **(training_args.model_init_kwargs or {})}


def make_trainer(trainer_cls, training_args, model_args, **kwargs):
    """`trainer_cls` on the recipe's model (loaded by TRL, so ZeRO-3 init and device placement are TRL's),
    with LoRA when `use_peft` is set. The parsed `model_init_kwargs` are left as the recipe said, so
    the saved recipe re-parses to the same run."""
    parsed = training_args.model_init_kwargs
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    try:
        return trainer_cls(
            model=model_args.model_name_or_path,
            args=training_args,
            peft_config=trl.get_peft_config(model_args),
            quantization_config=trl.get_quantization_config(model_args),
            **kwargs,
        )
    finally:
        training_args.model_init_kwargs = parsed


def _stop_on_im_end(generation_config, tokenizer) -> None:
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
    """Let one process call from_pretrained alone: under ZeRO-3 transformers would build the model
    inside deepspeed.zero.Init, a collective the other ranks never join (the run hangs)."""
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


def _save_merged(trainer, model_args, training_args) -> Path:
    """Base model + the saved adapter, merged, in OUTPUT/merged (reloaded from disk on the main
    process, so the same under any ZeRO stage)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.atomic import atomic_output_dir

    out = Path(training_args.output_dir)
    with _without_zero3_init(trainer):
        base = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            dtype=model_args.dtype or "auto",
            trust_remote_code=training_args.trust_remote_code,
        )
        merged = PeftModel.from_pretrained(base, out).merge_and_unload()
    _stop_on_im_end(merged.generation_config, trainer.processing_class)
    with atomic_output_dir(out / MERGED_DIR, overwrite=True) as tmp:
        merged.save_pretrained(tmp)
        trainer.processing_class.save_pretrained(tmp)
    return out / MERGED_DIR


def train_and_save(trainer, resume: str | None, script_args, training_args, model_args, dataset_args) -> None:
    """Train (resuming if asked), then save everything a later stage or a rerun needs; the recipe last."""
    from accelerate.utils import is_peft_model

    result = trainer.train(resume_from_checkpoint=resume)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)

    out = training_args.output_dir
    model = trainer.model
    _stop_on_im_end(model.generation_config, trainer.processing_class)
    # Every process calls save_model: under ZeRO-3 it gathers the shards; it writes on the main process.
    trainer.save_model(out)  # model (or LoRA adapter), tokenizer with its chat template
    trainer.save_state()  # trainer_state.json: the log history
    if trainer.accelerator.is_main_process:
        model.generation_config.save_pretrained(out)  # also next to a LoRA adapter
        if is_peft_model(model) and script_args.merge_lora_after_training:
            logger.info("merged model saved to %s", _save_merged(trainer, model_args, training_args))
        training_args.resume_from_checkpoint = None  # a rerun from the recipe starts from scratch
        for key in _applied_launch_defaults:  # re-derived at each launch, not part of the recipe
            setattr(training_args, key, None)
        launch = _launch_summary(trainer.accelerator)
        save_resolved_recipe(out, script_args, training_args, model_args, dataset_args, launch=launch)
        trainer.accelerator.print(f"saved the model, tokenizer, trainer state and {RESOLVED_RECIPE_NAME} to {out}")
    trainer.accelerator.wait_for_everyone()
    trainer.end()  # finish the trackers, destroy the process group


def drop_unfit_rows(
    dataset, keep, *, stage: str, noun: str, why: str, max_length: int, before: int | None, **filter_kwargs
):
    """`dataset.filter(keep)` for rows that cannot be trained within max_length: one process
    writes the cache (as TRL's own maps), the count of `before` rows dropped is printed with
    `why`, and a dataset with none left is a one-line error. `before=None` (a streamed
    dataset) filters without counting."""
    from accelerate import PartialState
    from trl.trainer.utils import global_then_local_main_first

    with global_then_local_main_first():
        dataset = dataset.filter(keep, **filter_kwargs)
    if before is None:
        return dataset
    if len(dataset) < before:
        PartialState().print(f"{stage}: dropped {before - len(dataset)} of {before} {noun}s {why}")
    if len(dataset) == 0:
        raise PosttrainError(f"no {noun} fits in max_length={max_length}; raise max_length")
    return dataset


def train_stage(
    trainer_cls, tokenizer, validate_rows, resume, script_args, training_args, model_args, dataset_args
) -> None:
    """The tail every stage shares: load and check the data (one-line errors, before the model
    loads), build `trainer_cls` on the recipe's model, train (resuming if asked) and save."""
    train_dataset, eval_dataset = load_data(script_args, dataset_args, training_args, validate_rows)
    trainer = make_trainer(
        trainer_cls,
        training_args,
        model_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    train_and_save(trainer, resume, script_args, training_args, model_args, dataset_args)


def run(main, config_cls, argv=None) -> None:
    """The stage CLI: parse the recipe and run `main`, bad input as one line and exit 2."""
    from posttrain.errors import run_cli

    run_cli(lambda: main(*parse(config_cls, argv)))
