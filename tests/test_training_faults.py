"""What a training stage promises when things go wrong: bad values are refused at parse time, a rerun with
bad input never touches a finished run, outputs never overlap inputs, a kill while a checkpoint is written
resumes to the same weights, Ctrl-C and a full disk are one line saying what was kept.

The faults are injected into real runs of the tiny model: a small script runs the stage's `main` after
patching one Trainer method to kill, interrupt or fill the disk at a chosen moment.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import helpers
import pytest
import torch
from helpers import (
    REPO,
    RESUMABLE,
    assert_one_line_error,
    one_error_line,
    parse_stage,
    run_paused,
    small_tmpfs,
    tree_hashes,
)
from safetensors.torch import load_file

from posttrain.demo import fixtures
from posttrain.outputs.errors import PosttrainError
from posttrain.training.recipe import RESOLVED_RECIPE_NAME

write_recipe = functools.partial(helpers.write_recipe, "sft")
SHORT = dict(RESUMABLE, max_steps=6, save_steps=2, eval_strategy="no", learning_rate=1e-2)


def run_stage_script(tmp_path: Path, recipe: Path, *argv, patch: str = "", stage: str = "sft"):
    """Run the stage's command line as its script would: with a `patch` (Python source run first: a kill, a
    signal, a fault) in a subprocess of its own; without one in this process (helpers.run_stage_cli_here)."""
    if not patch:
        return helpers.run_stage_cli_here(stage, recipe, *argv)
    script = tmp_path / f"run_{stage}.py"
    script.write_text(
        "import os, sys, signal, errno\nimport transformers\n"
        + textwrap.dedent(patch)
        + textwrap.dedent(
            f"""
            from posttrain import {stage} as stage
            from posttrain.training.run_dir import run_stage_cli
            import trl
            run_stage_cli(stage.main, trl.SFTConfig if "{stage}" == "sft" else stage.DPOConfig)
            """
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(script), str(recipe), *map(str, argv)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def short_run_with_fault(tmp_path: Path, model_dir, data_dir, patch: str):
    """(output_dir, process) of a 6-step SFT run saving every 2 steps, with `patch` applied."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, data_dir, out, **SHORT)
    return out, run_stage_script(tmp_path, recipe, patch=patch)


# ------------------------------------------------------------------ values at parse time


@pytest.mark.parametrize(
    "stage, overrides, message",
    [
        ("sft", {"learning_rate": 0.0}, r"learning_rate must be a positive number \(got 0.0\)"),
        ("sft", {"learning_rate": float("nan")}, r"learning_rate must be a positive number \(got nan\)"),
        ("sft", {"per_device_train_batch_size": 0}, r"per_device_train_batch_size must be at least 1"),
        ("sft", {"gradient_accumulation_steps": 0}, r"gradient_accumulation_steps must be at least 1"),
        ("sft", {"dtype": "bf16"}, r"dtype 'bf16' is not one of auto, bfloat16, float16, float32"),
        ("sft", {"num_train_epochs": 0, "max_steps": -1}, r"num_train_epochs: 0 with max_steps: -1 trains 0 steps"),
        ("sft", {"dataset_name": None, "datasets": []}, r"names no data"),
        (
            "sft",
            {"dataset_name": None, "datasets": [{"path": "x.jsonl", "fraction": 1.5}]},
            r"fraction must be in \(0, 1\]",
        ),
        ("dpo", {"beta": -0.5}, r"beta must be > 0 \(got -0.5\)"),
        (
            "dpo",
            {"loss_type": "exo_pair", "label_smoothing": 0.5},
            r"loss_type exo_pair needs 0 <= label_smoothing < 0.5",
        ),
        (
            "dpo",
            {"loss_type": ["sigmoid", "aot"], "label_smoothing": -0.1},
            r"loss_type aot needs 0 <= label_smoothing",
        ),
    ],
)
def test_bad_values_are_refused_when_the_recipe_is_parsed(tmp_path, stage, overrides, message):
    (tmp_path / "model").mkdir()  # a local path that exists: the values are what is refused
    (tmp_path / "data").mkdir()
    recipe = helpers.write_recipe(
        stage, tmp_path / "r.yaml", tmp_path / "model", tmp_path / "data", tmp_path / "out", **overrides
    )
    with pytest.raises(PosttrainError, match=message):
        parse_stage(stage, recipe)


# ------------------------------------------------------------- a finished run stays as it is


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, sft_data_dir):
    tmp = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(tmp / "r.yaml", tiny_model_dir, sft_data_dir, tmp / "out", max_steps=2, eval_strategy="no")
    proc = run_stage_script(tmp, recipe)
    assert proc.returncode == 0, proc.stderr
    assert (tmp / "out" / RESOLVED_RECIPE_NAME).is_file()
    return tmp / "out"


def test_a_rerun_with_bad_input_leaves_a_finished_run_exactly_as_it_was(
    tmp_path, finished_run, tiny_model_dir, sft_data_dir
):
    before = tree_hashes(finished_run)
    corrupt_model = tmp_path / "corrupt_model"
    corrupt_model.mkdir()
    for f in tiny_model_dir.iterdir():
        (corrupt_model / f.name).write_bytes(f.read_bytes())
    (corrupt_model / "model.safetensors").write_bytes(b"not a safetensors file")
    no_answer = tmp_path / "no_answer.jsonl"
    fixtures.write_jsonl(no_answer, [{"messages": fixtures.sft_rows()[0]["messages"][:2]}])
    cases = {
        "missing data": (tiny_model_dir, tmp_path / "nowhere", r"nowhere not found"),
        "bad rows": (tiny_model_dir, no_answer, r"row 1: no assistant turn"),
        "corrupt model": (corrupt_model, sft_data_dir, r"model.safetensors is not readable"),
        "missing model": (tmp_path / "no_model", sft_data_dir, r"no_model: cannot"),
    }
    for name, (model, data, message) in cases.items():
        recipe = write_recipe(
            tmp_path / "r.yaml", model, data, finished_run, max_steps=2, eval_strategy="no", overwrite_output_dir=True
        )
        proc = helpers.run_stage_cli_here("sft", recipe)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (name, proc.stderr)
        assert re.search(message, one_error_line(proc.stderr)), (name, proc.stderr)
        assert tree_hashes(finished_run) == before, name


@pytest.mark.parametrize("where", ["model", "inside_model", "data", "holding_model"])
def test_output_dir_overlapping_an_input_is_refused(tmp_path, tiny_model_dir, sft_data_dir, where):
    model = tmp_path / "parent" / "model"
    model.parent.mkdir()
    for f in tiny_model_dir.iterdir():
        (model.parent / "model").mkdir(exist_ok=True)
        (model / f.name).write_bytes(f.read_bytes())
    out = {"model": model, "inside_model": model / "sft", "data": sft_data_dir, "holding_model": model.parent}[where]
    before = tree_hashes(model.parent), tree_hashes(sft_data_dir)
    recipe = write_recipe(tmp_path / "r.yaml", model, sft_data_dir, out, max_steps=1)
    with pytest.raises(PosttrainError, match=r"output_dir .* overlaps the (model_name_or_path|dataset_name) "):
        helpers.run_stage("sft", recipe)
    assert (tree_hashes(model.parent), tree_hashes(sft_data_dir)) == before


# ------------------------------------------------------------------------ kills and stops

KILL_WHILE_SAVING_STEP_4 = """
    # Die (as a kill -9 would) after checkpoint-4's weights and optimizer are written, before its state.
    original = transformers.Trainer._save_rng_state
    def dying(self, output_dir):
        if self.state.global_step == 4:
            os._exit(137)
        return original(self, output_dir)
    transformers.Trainer._save_rng_state = dying
"""


def test_a_kill_while_a_checkpoint_is_written_resumes_to_the_uninterrupted_weights(
    tmp_path, tiny_model_dir, sft_data_dir
):
    full = write_recipe(tmp_path / "full.yaml", tiny_model_dir, sft_data_dir, tmp_path / "full", **SHORT)
    assert run_stage_script(tmp_path, full).returncode == 0

    out = tmp_path / "killed"
    recipe = write_recipe(tmp_path / "killed.yaml", tiny_model_dir, sft_data_dir, out, **SHORT)
    killed = run_stage_script(tmp_path, recipe, patch=KILL_WHILE_SAVING_STEP_4)
    assert killed.returncode == 137
    assert (out / "checkpoint-4" / "model.safetensors").is_file()  # half-written: weights, no trainer state
    assert not (out / "checkpoint-4" / "trainer_state.json").exists()

    resumed = run_stage_script(tmp_path, recipe, "--resume_from_checkpoint", "true")
    assert resumed.returncode == 0, resumed.stderr
    assert "note: skipping checkpoint-4: incomplete (no trainer_state.json)" in resumed.stderr
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(out / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert (out / RESOLVED_RECIPE_NAME).is_file()


CTRL_C_AT_STEP_3 = """
    # Ctrl-C at a terminal. A shell starts background jobs with SIGINT ignored (CI may run so): restore
    # Python's own handler, as an interactive launch would have it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    original = transformers.Trainer.training_step
    def interrupted(self, *args, **kwargs):
        if self.state.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)
    transformers.Trainer.training_step = interrupted
"""


def test_ctrl_c_is_one_line_saying_what_was_kept_and_exit_130(tmp_path, tiny_model_dir, sft_data_dir):
    out, proc = short_run_with_fault(tmp_path, tiny_model_dir, sft_data_dir, CTRL_C_AT_STEP_3)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("interrupted:")]
    assert lines == [
        f"interrupted: stopped by Ctrl-C at step 3; {out / 'checkpoint-2'} is the newest complete checkpoint; "
        "continue with --resume_from_checkpoint true"
    ]
    assert not (out / RESOLVED_RECIPE_NAME).exists() and not (out / "model.safetensors").exists()


DISK_FULL_IN_FINAL_SAVE = """
    original = transformers.Trainer.save_model
    def filling(self, output_dir=None, _internal_call=False):
        if _internal_call:
            return original(self, output_dir, _internal_call)
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "config.json"), "w") as fh:
            fh.write("{}")
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(output_dir, "model.safetensors"))
    transformers.Trainer.save_model = filling
"""


def test_a_full_disk_while_saving_the_final_model_leaves_no_model(tmp_path, tiny_model_dir, sft_data_dir):
    out, proc = short_run_with_fault(tmp_path, tiny_model_dir, sft_data_dir, DISK_FULL_IN_FINAL_SAVE)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = one_error_line(proc.stderr)
    assert line.startswith(f"error: cannot write {out / '.final-model.tmp' / 'model.safetensors'}: no space left"), (
        line
    )
    assert "free there" in line, line
    assert f"{out / 'checkpoint-6'} is the newest complete checkpoint" in line
    assert not any((out / name).exists() for name in ("config.json", "model.safetensors", RESOLVED_RECIPE_NAME))
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary directory left


# ------------------------------------------------------------------ one writer, real faults


def test_two_runs_into_one_output_dir_at_once_exactly_one_runs(tmp_path, tiny_model_dir, sft_data_dir):
    """The first run holds the directory (paused as it builds its trainer) while the second starts."""
    out, ready, go = tmp_path / "out", tmp_path / "ready", tmp_path / "go"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, sft_data_dir, out, max_steps=2, eval_strategy="no")
    script = REPO / "posttrain" / "sft.py"
    first = run_paused("posttrain.training.trainers.build_trainer", [script, recipe], ready, go)
    try:
        while not ready.exists():
            assert first.poll() is None, first.communicate()
            time.sleep(0.1)
        second = subprocess.run(
            [sys.executable, str(script), str(recipe)], capture_output=True, text=True, timeout=300
        )
        assert_one_line_error(second, f"output directory {out} is being written by another run (pid {first.pid} ")
    finally:
        go.touch()
        _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert (out / RESOLVED_RECIPE_NAME).is_file()
    assert not (tmp_path / ".out.lock").exists()


def test_a_disk_that_fills_while_a_checkpoint_is_written_is_one_line(tmp_path, tiny_model_dir, sft_data_dir):
    """A real full disk: a tmpfs with room for the model but not for a checkpoint with its optimizer state."""
    model_bytes = (tiny_model_dir / "model.safetensors").stat().st_size
    with small_tmpfs(tmp_path / "disk", size=f"{model_bytes * 2 // 1024}k") as disk:
        recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, sft_data_dir, disk / "out", **SHORT)
        proc = run_stage_script(tmp_path, recipe)
        line = assert_one_line_error(proc, "cannot write the run's files", "free there")
        assert "no checkpoint was saved" in line, line
        assert not (disk / "out" / RESOLVED_RECIPE_NAME).exists()
