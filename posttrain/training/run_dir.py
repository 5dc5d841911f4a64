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
import sys
from pathlib import Path

from posttrain.outputs.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    Interrupted,
    PosttrainError,
    file_system_error,
    run_cli,
)
from posttrain.outputs.lock import launch_output_lock
from posttrain.training.recipe import RESOLVED_RECIPE_NAME, parse_stage_recipe
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
    skipped = 0
    for checkpoint in reversed(checkpoints(out)):
        reason = incomplete_reason(checkpoint)
        if reason is None:
            return str(checkpoint)
        skipped += 1
        if is_main_process():
            print(
                f"note: skipping {checkpoint.name}: incomplete ({reason}), interrupted while it was saved",
                file=sys.stderr,
            )
    only = f" (only {skipped} incomplete one{'s' * (skipped > 1)})" if skipped else ""
    raise PosttrainError(f"--resume_from_checkpoint true: no checkpoint-N directory in {out} to resume from{only}")


def claim_output_dir(training_args, resume: str | None) -> None:
    """Mark output_dir as being rewritten: remove its completion marker and the checkpoints this run will not
    continue (all of them for a fresh run; the incomplete ones newer than the resumed one).
    Called once every input has passed its checks."""
    out = Path(training_args.output_dir)
    if is_main_process():
        step = int(Path(resume).name.split("-")[1]) if resume and _CHECKPOINT_RE.match(Path(resume).name) else None
        for path in checkpoints(out):
            newer = step is not None and int(path.name.split("-")[1]) > step
            if resume is None or (newer and incomplete_reason(path)):
                shutil.rmtree(path)
        (out / RESOLVED_RECIPE_NAME).unlink(missing_ok=True)
    wait_for_everyone()
    if resume:
        logger.info("resuming from %s", resume)


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


@contextlib.contextmanager
def reporting_stops(trainer):
    """Ctrl-C, or a file-system fault (a full disk, a read-only place) while training or saving, becomes one
    line that says what was kept and how to go on; only the main process prints it."""
    args = trainer.args
    try:
        yield
    except KeyboardInterrupt:
        _stop(trainer, EXIT_INTERRUPTED)
        raise Interrupted(f"stopped by Ctrl-C at step {trainer.state.global_step}; {_what_was_kept(args)}") from None
    except Exception as err:
        fault = _file_system_fault(err, args.output_dir)
        if fault is None:
            raise
        _stop(trainer, EXIT_BAD_INPUT)
        raise PosttrainError(f"{fault}; {_what_was_kept(args)}") from None


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
