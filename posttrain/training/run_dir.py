"""The training output directory's contract: what makes it finished, resumable, or free to start in.

A finished run's directory holds the model, tokenizer, generation config, trainer state and, written
*last*, the resolved recipe (`recipe.resolved.yaml`): a directory without it is unfinished. Checkpoints
are `checkpoint-N` directories written by the Trainer. Nothing here deletes anything until
`claim_output_dir`, which a stage calls only after every input has been checked.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import shutil
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from posttrain.outputs.errors import (
    EXIT_BAD_INPUT,
    Interrupted,
    PosttrainError,
    Terminated,
    file_system_error,
    run_cli,
    stop_cause,
)
from posttrain.outputs.lock import launch_output_lock
from posttrain.outputs.paths import make_readable
from posttrain.training.recipe import parse_stage_recipe, resolved_recipe
from posttrain.training.runtime import is_main_process, wait_for_everyone

logger = logging.getLogger("posttrain")

_CHECKPOINT_RE = re.compile(r"^checkpoint-\d+$")
TRAINER_STATE = "trainer_state.json"


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` directories in output_dir, oldest step first."""
    out = Path(output_dir)
    found = (
        [p for p in out.glob("checkpoint-*") if p.is_dir() and _CHECKPOINT_RE.match(p.name)] if out.is_dir() else []
    )
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


# What the Trainer writes into a checkpoint, trainer_state.json last: a checkpoint holds its model
# weights (full, sharded, LoRA adapter, or DeepSpeed's `latest` pointer) and a readable trainer state.
_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "pytorch_model.bin",
    "latest",
)


def incomplete_reason(checkpoint: Path) -> str | None:
    """Why a `checkpoint-N` cannot be resumed from (it was being written when the run stopped), or None."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {TRAINER_STATE}"
    except (OSError, ValueError):
        return f"unreadable {TRAINER_STATE}"
    if not isinstance(state, dict) or "global_step" not in state:
        return f"unreadable {TRAINER_STATE}"
    if not any((checkpoint / name).exists() for name in _WEIGHTS):
        return "no model weights"
    return None


def resume_checkpoint(script_args, training_args) -> str | None:
    """The checkpoint to resume from, or None for a fresh run (whose output_dir must then hold no earlier
    run's checkpoints unless overwrite_output_dir is set). Deletes nothing.

    `resume_from_checkpoint: true` means the newest complete `checkpoint-N` in output_dir (an error if there
    is none); incomplete ones, cut short by a kill while saving, are named and skipped. Any other value is
    a checkpoint path, which must be complete.
    """
    out = Path(training_args.output_dir)
    value = training_args.resume_from_checkpoint
    value = None if value is None or str(value).lower() in ("", "false", "none") else str(value)
    if value is None:
        earlier = checkpoints(out)
        if earlier and not script_args.overwrite_output_dir:
            raise PosttrainError(
                f"output_dir {out} holds checkpoints of an earlier run ({earlier[-1].name}); pass "
                "--resume_from_checkpoint true to continue it, or --overwrite_output_dir true to start over"
            )
        return None
    if value.lower() != "true":
        reason = incomplete_reason(Path(value)) if Path(value).is_dir() else "not a directory"
        if reason:
            raise PosttrainError(f"--resume_from_checkpoint {value}: not a complete checkpoint ({reason})")
        return value
    skipped = []
    for checkpoint in reversed(checkpoints(out)):
        reason = incomplete_reason(checkpoint)
        if reason is None:
            return str(checkpoint)
        skipped.append(checkpoint.name)
        if is_main_process():
            print(
                f"note: skipping {checkpoint.name}: incomplete ({reason}), interrupted while it was saved",
                file=sys.stderr,
            )
    only = f" (only {len(skipped)} incomplete one{'s' * (len(skipped) > 1)})" if skipped else ""
    raise PosttrainError(f"--resume_from_checkpoint true: no checkpoint-N directory in {out} to resume from{only}")


def claim_output_dir(training_args, resume: str | None) -> None:
    """Remove the checkpoints this run will not continue (all of them for a fresh run; the incomplete ones newer
    than the resumed one). Called once every input has passed its checks and the model has loaded. The completion
    marker stays: a finished run stays finished until `save_run` has the new model to replace it with."""
    out = Path(training_args.output_dir)
    announce_resume(training_args, resume)
    if is_main_process():
        step = int(Path(resume).name.split("-")[1]) if resume and _CHECKPOINT_RE.match(Path(resume).name) else None
        for path in checkpoints(out):
            newer = step is not None and int(path.name.split("-")[1]) > step
            if resume is None or (newer and incomplete_reason(path)):
                shutil.rmtree(path)
    wait_for_everyone()


def announce_resume(training_args, resume: str | None) -> None:
    """One line on resuming: the checkpoint, its step and epoch, and what is skipped (the incomplete newer
    checkpoints, the batches already trained on)."""
    if not resume or not is_main_process():
        return
    state = json.loads((Path(resume) / TRAINER_STATE).read_text(encoding="utf-8"))
    step, epoch = state.get("global_step", 0), state.get("epoch") or 0
    newer = [
        c.name
        for c in checkpoints(training_args.output_dir)
        if int(c.name.split("-")[1]) > step and incomplete_reason(c) is not None
    ]
    skipped = f"the incomplete {', '.join(newer)} and " if newer else ""
    print(
        f"resuming from {resume} (step {step}, epoch {epoch:.2f}): skipping {skipped}the {step} steps' batches "
        "already trained on",
        file=sys.stderr,
    )


# ------------------------------------------------------------------ resuming with a changed recipe

# What a resumed run may differ in from its checkpoint's without changing what is trained: where and how often it
# logs, saves and evaluates, and how it is launched apart from the batch.
_FREE = {
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "allow_recipe_change", "report_to", "run_name",
    "disable_tqdm", "health_prompts", "merge_lora_after_training", "per_device_eval_batch_size", "prediction_loss_only",
    "load_best_model_at_end", "metric_for_best_model", "greater_is_better", "push_to_hub", "ddp_backend", "project",
    "dataset_num_proc", "ddp_timeout", "use_cpu", "torch_compile", "local_rank", "dataset_test_split", "do_eval",
    "do_predict", "do_train", "skip_memory_metrics", "batch_eval_metrics", "bf16_full_eval", "fp16_full_eval", "debug",
    "torch_empty_cache_steps", "activation_checkpointing", "activation_checkpointing_kwargs", "activation_offloading",
}  # fmt: skip
_FREE_PREFIXES = ("logging_", "log_", "save_", "eval_", "hub_", "dataloader_", "trackio_", "include_")
# What a resumed run cannot change even when meant: the checkpoint's position in the data (batches of this shape,
# in this order, from these rows) and its optimizer and model (the saved state has their shapes and kinds).
FIXED_ON_RESUME = {
    "per_device_train_batch_size", "gradient_accumulation_steps", "num_processes", "auto_find_batch_size",
    "dataset_name", "dataset_config", "dataset_train_split", "dataset_streaming", "datasets", "streaming",
    "max_length", "packing", "packing_strategy", "padding_free", "seed", "data_seed", "group_by_length",
    "train_sampling_strategy", "model_name_or_path", "model_revision", "use_peft", "lora_r", "lora_alpha",
    "lora_target_modules", "lora_modules_to_save", "lora_task_type", "use_rslora", "use_dora",
    "load_in_4bit", "load_in_8bit", "optim", "shuffle_dataset", "test_split_size", "dataset_kwargs",
}  # fmt: skip
RECIPE_CALLBACK = "RunRecipe"  # the class name, under which the trainer state keeps its state


def run_settings(recipe) -> dict:
    """The recipe as a checkpoint records it: every setting that shapes training, and the number of processes."""
    from accelerate import PartialState

    settings = resolved_recipe(*recipe.arguments)
    settings["num_processes"] = PartialState().num_processes
    return {k: v for k, v in settings.items() if k not in _FREE and not k.startswith(_FREE_PREFIXES)}


def _recorded(checkpoint: str) -> dict | None:
    """What the checkpoint's run recorded in its trainer state ({"recipe": ..., "changes": [...]}), or None."""
    state = json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))
    found = (state.get("stateful_callbacks") or {}).get(RECIPE_CALLBACK)
    return found.get("attributes") if isinstance(found, dict) else None


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def check_recipe_change(recipe, resume: str | None) -> dict:
    """Compare the recipe with the one the resumed checkpoint was trained with; returns what the run records
    ({"recipe", "changes"}: its settings and the changes of earlier resumes, with this one's step).

    A difference is refused in one line naming the keys, unless `allow_recipe_change` is set: then it applies
    from the checkpoint's step on (`RunRecipe` gives the optimizer the new values). The batch shape, the
    data and the model are refused even then: the checkpoint's place in the data and its saved state depend on them.
    """
    settings = run_settings(recipe)
    record = {"recipe": settings, "changes": []}
    if not resume:
        return record
    old = _recorded(resume)
    if old is None:
        if is_main_process():
            print(
                f"note: {resume} records no recipe (an older version saved it); the recipe is not compared",
                file=sys.stderr,
            )
        return record
    previous = old.get("recipe") or {}
    record["changes"] = list(old.get("changes") or [])
    changed = {k: [previous.get(k), settings.get(k)] for k in sorted(set(previous) | set(settings))}
    changed = {k: v for k, v in changed.items() if v[0] != v[1]}
    if not changed:
        return record
    listed = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in changed.items())
    step = json.loads((Path(resume) / TRAINER_STATE).read_text(encoding="utf-8")).get("global_step")
    fixed = sorted(set(changed) & FIXED_ON_RESUME)
    if fixed and recipe.script_args.allow_recipe_change:
        raise PosttrainError(
            f"--resume_from_checkpoint: {', '.join(fixed)} cannot change on resume ({Path(resume).name} depends on "
            f"them: its place in the data, its optimizer and model state); to train on from its weights, start a "
            f"new run with model_name_or_path: {resume}"
        )
    if not recipe.script_args.allow_recipe_change:
        raise PosttrainError(
            f"--resume_from_checkpoint: the recipe differs from the one {Path(resume).name} was trained with: "
            f"{listed}; resume with that recipe, or pass --allow_recipe_change true to apply the change from "
            f"step {step}"
        )
    record["changes"].append({"step": step, "checkpoint": Path(resume).name, "changed": changed})
    if is_main_process():
        print(f"note: resuming with a changed recipe from step {step}: {listed}", file=sys.stderr)
    return record


class RunRecipe(TrainerCallback, ExportableState):
    """Records the run's settings (and the changes made on resuming) in each checkpoint's trainer state, written
    with it; with a changed recipe, gives the restored optimizer and scheduler the recipe's values."""

    def __init__(self, record: dict | None = None):
        self.record = record or {"recipe": {}, "changes": []}

    def state(self) -> dict:
        return {"args": {}, "attributes": {"recipe": self.record["recipe"], "changes": self.record["changes"]}}


def apply_recipe_change(trainer, record: dict, resume: str | None) -> None:
    """Add the recipe record to the trainer; when resuming with a changed recipe, make the optimizer take the new
    recipe's values: loading the checkpoint restores its learning rate (scheduler base_lrs and param groups),
    weight decay and betas, so the fresh values are taken before and put back after (the moments stay)."""
    trainer.add_callback(RunRecipe(record))
    changes = record["changes"]
    if not resume or not changes or changes[-1]["checkpoint"] != Path(resume).name:
        return
    load = trainer._load_optimizer_and_scheduler  # private hook: the Trainer has no event between create and load

    def load_then_apply(checkpoint):
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups]
        scheduler = trainer.lr_scheduler
        base_lrs = list(getattr(scheduler, "base_lrs", []))
        load(checkpoint)
        for group, values in zip(trainer.optimizer.param_groups, fresh):
            group.update(values)
        if base_lrs and hasattr(scheduler, "lr_lambdas"):
            scheduler.base_lrs = base_lrs
            lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(base_lrs, scheduler.lr_lambdas)]
            for group, lr in zip(trainer.optimizer.param_groups, lrs):
                group["lr"] = lr
            scheduler._last_lr = lrs

    trainer._load_optimizer_and_scheduler = load_then_apply


def recipe_notes(record: dict) -> list[str]:
    """The saved recipe's header lines for the changes made on resuming."""
    return [
        f"resumed from {c['checkpoint']} at step {c['step']} with: "
        + ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in c["changed"].items())
        for c in record["changes"]
    ]


def _local_paths(recipe) -> list[tuple[str, Path]]:
    """(what, path) of the recipe's inputs that are on this file system: the model and the data."""
    named = [
        ("model_name_or_path", recipe.model_args.model_name_or_path),
        ("dataset_name", recipe.script_args.dataset_name),
    ]
    named += [("datasets", entry.path) for entry in recipe.dataset_args.datasets or []]
    return [(what, Path(p).resolve()) for what, p in named if p and Path(p).exists()]


def refuse_inputs_in_output_dir(recipe) -> None:
    """output_dir must not be, hold, or sit inside the model or data the run reads: saving there would
    overwrite or mix with them."""
    out = Path(recipe.training_args.output_dir).resolve()
    for what, path in _local_paths(recipe):
        if out == path or path in out.parents or out in path.parents:
            raise PosttrainError(
                f"output_dir {recipe.training_args.output_dir} overlaps the {what} {path} the run reads; "
                "write the run to a directory of its own"
            )


def newest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    return next((c for c in reversed(checkpoints(output_dir)) if incomplete_reason(c) is None), None)


def _what_was_kept(training_args) -> str:
    kept = newest_complete_checkpoint(training_args.output_dir)
    if kept is None:
        return f"no checkpoint was saved in {training_args.output_dir}; rerun to start over"
    return f"{kept} is the newest complete checkpoint; continue with --resume_from_checkpoint true"


class SafeStopCallback(TrainerCallback):
    """SIGTERM while training stops at the end of a step, never inside a checkpoint save: the handler only notes
    it, and at each step's end the processes agree (a tiny all-reduce) whether any got it, so all stop at the same
    step. No checkpoint is saved on the way out: a scheduler's grace period (SLURM: 30 s) may not hold one, and a
    save cut short by the SIGKILL that follows is an incomplete checkpoint. A second SIGTERM stops at once.
    Each checkpoint gets the umask's modes (safetensors writes 0600)."""

    def __init__(self, trainer):
        self.trainer, self.pending, self.training = trainer, False, False

    def on_signal(self, signum, frame):
        if self.pending or not self.training:
            raise Terminated()
        self.pending = True

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.pending
        accelerator = self.trainer.accelerator
        if accelerator.num_processes > 1:
            import torch

            flag = torch.tensor([float(stop)], device=accelerator.device)
            stop = bool(accelerator.reduce(flag, reduction="sum").item())
        if stop:
            raise Terminated()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            make_readable(Path(args.output_dir) / f"checkpoint-{state.global_step}")


@contextlib.contextmanager
def reporting_stops(trainer):
    """Ctrl-C, SIGTERM (at the end of a step: `SafeStopCallback`), or a file-system fault (a full disk, a read-only
    place) while training or saving, becomes one line that says what was kept and how to go on; only the main
    process prints it. Ctrl-C exits 130, SIGTERM 143."""
    args = trainer.args
    stopper = SafeStopCallback(trainer)
    trainer.add_callback(stopper)
    previous = signal.signal(signal.SIGTERM, stopper.on_signal)
    try:
        yield
    except KeyboardInterrupt as err:
        what, code = stop_cause(err)
        _stop(trainer, code)
        raise Interrupted(
            f"stopped by {what} at step {trainer.state.global_step}; {_what_was_kept(args)}", code
        ) from None
    except Exception as err:
        fault = _file_system_fault(err, args.output_dir)
        if fault is None:
            raise
        _stop(trainer, EXIT_BAD_INPUT)
        raise PosttrainError(f"{fault}; {_what_was_kept(args)}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _file_system_fault(err: Exception, output_dir) -> str | None:
    what = getattr(err, "filename", None) or "the run's files"
    if isinstance(err, RuntimeError) and ("inline_container" in str(err) or "PytorchStreamWriter" in str(err)):
        err = OSError(errno.ENOSPC, str(err))  # torch.save reports a full disk as a failed write, with no errno
    fault = file_system_error(err, what, output_dir)
    return str(fault) if fault else None


def _stop(trainer, exit_code: int) -> None:
    """Other ranks leave quietly; the main process closes the progress bar so that its message is the last line."""
    from transformers.trainer_callback import ProgressCallback

    if not is_main_process():
        raise SystemExit(exit_code)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
            callback.training_bar.close()
            callback.training_bar = None
    print(file=sys.stderr)


def run_stage_cli(main, config_cls) -> None:
    """`[accelerate launch] posttrain/<stage>.py RECIPE.yaml [--key value ...]`: parse the recipe, hold the
    output directory's lock for the whole launch (global rank 0 takes it), run `main`. Bad input is one line
    and exit 2."""

    def run():
        recipe = parse_stage_recipe(config_cls, help=getattr(sys.modules[main.__module__], "RECIPE_HELP", None))
        with launch_output_lock(recipe.training_args.output_dir):
            main(recipe)

    run_cli(run)
