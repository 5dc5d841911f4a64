"""A training run's directory under a rerun, a shared file system and a scheduler: a finished run survives a rerun
whose model cannot load, every file gets the umask's mode, lock and leftover paths are never followed, SIGTERM stops
at a safe point with one line, and a resume with a changed recipe is refused or applied for real.

Real runs of the tiny model (`run_stage_script`: a subprocess where a kill or signal is patched in), as in
test_training_faults.py.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
import torch
import yaml
from helpers import REPO, RESUMABLE, assert_one_line_error, tree_hashes
from safetensors.torch import load_file, save_file
from test_training_faults import run_stage_script

from posttrain.outputs.errors import EXIT_TERMINATED, run_cli
from posttrain.training.recipe import RESOLVED_RECIPE_NAME
from posttrain.training.run_dir import checkpoints, incomplete_reason

write_recipe = functools.partial(helpers.write_recipe, "sft")
# A quick run with no checkpoint (the demo recipes save none; tests that resume add RESUMABLE).
QUICK = dict(RESUMABLE, max_steps=2, eval_strategy="no", save_strategy="no", health_prompts=0)


def copy_model(src: Path, dst: Path, *skip: str) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


# --------------------------------------------------- a finished run survives a rerun whose model cannot load


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir, sft_data_dir):
    """A finished SFT run without checkpoints: a rerun into it needs no flag."""
    tmp = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(tmp / "r.yaml", tiny_model_dir, sft_data_dir, tmp / "out", **QUICK)
    proc = run_stage_script(tmp, recipe)
    assert proc.returncode == 0, proc.stderr
    assert (tmp / "out" / RESOLVED_RECIPE_NAME).is_file() and not checkpoints(tmp / "out")
    return tmp / "out"


class Refused:
    """Pickled with torch.save: the safe loader (weights_only) refuses a class it does not know."""


def broken_models(tmp_path: Path, tiny_model_dir: Path) -> dict:
    """name: (model directory, extra recipe keys, message)"""
    state = load_file(tiny_model_dir / "model.safetensors")
    cases = {}
    truncated = copy_model(tiny_model_dir, tmp_path / "truncated", "model.safetensors")
    torch.save(state, truncated / "pytorch_model.bin")
    data = (truncated / "pytorch_model.bin").read_bytes()
    (truncated / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    cases["truncated bin"] = (truncated, {}, r"pytorch_model.bin cannot be loaded")

    pickled = copy_model(tiny_model_dir, tmp_path / "pickled", "model.safetensors")
    torch.save({**state, "extra": Refused()}, pickled / "pytorch_model.bin")
    cases["pickle"] = (pickled, {}, r"pytorch_model.bin cannot be loaded \(the safe loader \(weights_only\) refuses")

    reshaped = copy_model(tiny_model_dir, tmp_path / "reshaped", "model.safetensors")
    key = next(k for k in state if k.endswith("mlp.up_proj.weight"))
    save_file({**state, key: torch.zeros(3, 5)}, reshaped / "model.safetensors", metadata={"format": "pt"})
    cases["shapes"] = (reshaped, {}, rf"weight {key} has shape \[3, 5\] but its config.json says")

    cases["lora"] = (
        tiny_model_dir,
        {"use_peft": True, "lora_target_modules": ["no_such_proj"]},
        r"lora_target_modules no_such_proj: no LoRA adapter fits model .* \(Target modules no_such_proj not found",
    )

    template = copy_model(tiny_model_dir, tmp_path / "template")
    config = json.loads((template / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% generation %}{{ raise_exception('no system turns here') }}{% endgeneration %}"
    (template / "tokenizer_config.json").write_text(json.dumps(config))
    (template / "chat_template.jinja").unlink(missing_ok=True)
    cases["template"] = (
        template,
        {},
        r"its chat template cannot render a conversation \(TemplateError: no system turns",
    )
    return cases


def test_a_rerun_whose_model_cannot_load_leaves_a_finished_run_as_it_was(
    tmp_path, finished, tiny_model_dir, sft_data_dir
):
    before = tree_hashes(finished)
    for name, (model, extra, message) in broken_models(tmp_path, tiny_model_dir).items():
        recipe = write_recipe(tmp_path / "r.yaml", model, sft_data_dir, finished, **QUICK, **extra)
        proc = helpers.run_stage_cli_here("sft", recipe)
        line = assert_one_line_error(proc)
        assert re.search(message, line), (name, line)
        assert tree_hashes(finished) == before, name


def test_the_completion_marker_stays_until_the_new_model_is_saved(tmp_path, tiny_model_dir, sft_data_dir):
    """A rerun that dies while training (after the model loaded) leaves the finished run finished."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, sft_data_dir, out, **QUICK)
    assert run_stage_script(tmp_path, recipe).returncode == 0
    marker = (out / RESOLVED_RECIPE_NAME).read_bytes()
    model = (out / "model.safetensors").read_bytes()
    dying = """
        original = transformers.Trainer.training_step
        def dying(self, *args, **kwargs):
            os._exit(137)
        transformers.Trainer.training_step = dying
    """
    assert run_stage_script(tmp_path, recipe, patch=dying).returncode == 137
    assert (out / RESOLVED_RECIPE_NAME).read_bytes() == marker and (out / "model.safetensors").read_bytes() == model


# ------------------------------------------------------------------------------ modes follow the umask


def test_trained_models_checkpoints_and_adapters_get_the_umask_mode(tmp_path, tiny_model_dir, sft_data_dir):
    runs = {
        "full": {},
        "lora": {"use_peft": True, "lora_target_modules": ["q_proj", "v_proj"], "merge_lora_after_training": True},
    }
    for name, extra in runs.items():
        out = tmp_path / name
        recipe = write_recipe(
            tmp_path / f"{name}.yaml",
            tiny_model_dir,
            sft_data_dir,
            out,
            **{**QUICK, "save_strategy": "steps", "save_steps": 1},
            **extra,
        )
        old = os.umask(0o022)
        try:
            proc = run_stage_script(tmp_path, recipe)
        finally:
            os.umask(old)
        assert proc.returncode == 0, proc.stderr
        weights = [p for p in out.rglob("*.safetensors")]
        assert {p.name for p in weights} >= ({"adapter_model.safetensors"} if extra else {"model.safetensors"})
        assert any("checkpoint-" in str(p) for p in weights)
        private = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in out.rglob("*")}
        private = {p: m for p, m in private.items() if m not in ("0o644", "0o755")}
        assert private == {}, (name, private)


# ----------------------------------------------------------------------------- lock paths not followed


def test_a_symlink_at_the_lock_is_refused_and_its_target_untouched(tmp_path, tiny_model_dir, sft_data_dir):
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    (tmp_path / ".out.lock").symlink_to(target)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, sft_data_dir, tmp_path / "out", **QUICK)
    proc = helpers.run_stage_cli_here("sft", recipe)
    assert_one_line_error(proc, f"{tmp_path / '.out.lock'} is a symlink (to {target})")
    assert target.read_text() == "keep me\n" and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- SIGTERM


def test_sigterm_outside_training_is_one_line_and_exit_143(capsys):
    with pytest.raises(SystemExit) as stopped:
        run_cli(lambda: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(5))
    assert stopped.value.code == EXIT_TERMINATED == 143
    assert capsys.readouterr().err == "interrupted: stopped by SIGTERM; no output was written\n"


SIGTERM_WHILE_SAVING_STEP_4 = """
    # SIGTERM (a scheduler's time limit) arrives while checkpoint-4 is being written.
    original = transformers.Trainer._save_rng_state
    def terminated(self, output_dir):
        if self.state.global_step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, output_dir)
    transformers.Trainer._save_rng_state = terminated
"""


def test_sigterm_while_a_checkpoint_is_written_stops_after_it_with_one_line_and_exit_143(
    tmp_path, tiny_model_dir, sft_data_dir
):
    out = tmp_path / "out"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model_dir,
        sft_data_dir,
        out,
        max_steps=8,
        save_steps=2,
        eval_strategy="no",
        **RESUMABLE,
    )
    proc = run_stage_script(tmp_path, recipe, patch=SIGTERM_WHILE_SAVING_STEP_4)
    assert proc.returncode == 143 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(("interrupted:", "error:"))]
    assert lines == [
        f"interrupted: stopped by SIGTERM at step 5; {out / 'checkpoint-4'} is the newest complete checkpoint; "
        "continue with --resume_from_checkpoint true"
    ]
    assert [c.name for c in checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert all(incomplete_reason(c) is None for c in checkpoints(out))  # nothing for resume to skip
    assert not (tmp_path / ".out.lock").exists() and not (out / RESOLVED_RECIPE_NAME).exists()
    resumed = run_stage_script(tmp_path, recipe, "--resume_from_checkpoint", "true")
    assert resumed.returncode == 0, resumed.stderr
    assert "note: skipping" not in resumed.stderr
    assert f"resuming from {out / 'checkpoint-4'} (step 4, epoch " in resumed.stderr


@pytest.mark.slow
def test_sigterm_under_accelerate_launch_stops_every_rank_at_the_same_step(tmp_path, tiny_model_dir, sft_data_dir):
    """SIGTERM to the launcher (which passes it to its ranks), as a scheduler's time limit would: every rank stops
    at the same step end, rank 0 prints the one line, the lock is released, no incomplete checkpoint is left."""
    out = tmp_path / "out"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model_dir,
        sft_data_dir,
        out,
        max_steps=200,
        save_steps=2,
        eval_strategy="no",
        **RESUMABLE,
    )
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(REPO / "accelerate_configs" / "ddp.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        str(REPO / "posttrain" / "sft.py"),
        str(recipe),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 500
        while not (out / "checkpoint-2" / "trainer_state.json").exists():
            assert launcher.poll() is None and time.time() < deadline, launcher.communicate()
            time.sleep(0.2)
        launcher.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    lines = [ln for ln in stderr.splitlines() if ln.startswith("interrupted:")]
    assert len(lines) == 1 and lines[0].startswith("interrupted: stopped by SIGTERM at step "), stderr[-4000:]
    assert "is the newest complete checkpoint; continue with --resume_from_checkpoint true" in lines[0]
    left = {c.name: (incomplete_reason(c), sorted(p.name for p in c.iterdir())) for c in checkpoints(out)}
    assert all(reason is None for reason, _ in left.values()), (left, stderr[-4000:])
    assert not (tmp_path / ".out.lock").exists()
    assert launcher.returncode != 0


# --------------------------------------------------------------------------- resume with a changed recipe


@pytest.fixture(scope="module")
def constant_lr_run(tmp_path_factory, tiny_model_dir, sft_data_dir):
    """(tmp, recipe, out) of a finished 4-step SFT run at a constant lr 1e-2 with checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("resume")
    out = tmp / "out"
    recipe = write_recipe(
        tmp / "r.yaml",
        tiny_model_dir,
        sft_data_dir,
        out,
        max_steps=4,
        save_steps=2,
        eval_strategy="no",
        logging_steps=1,
        **RESUMABLE,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        lr_scheduler_kwargs={},
        warmup_steps=0,
    )
    assert run_stage_script(tmp, recipe).returncode == 0
    return tmp, recipe, out


def test_resuming_with_a_changed_learning_rate_is_refused_naming_it(constant_lr_run):
    tmp, recipe, out = constant_lr_run
    before = tree_hashes(out)
    proc = run_stage_script(tmp, recipe, "--resume_from_checkpoint", out / "checkpoint-2", "--learning_rate", "1e-3")
    line = assert_one_line_error(proc, "the recipe differs from the one checkpoint-2 was trained with")
    assert "learning_rate 0.01 -> 0.001" in line and "--allow_recipe_change true" in line, line
    assert tree_hashes(out) == before


def test_a_changed_batch_shape_is_refused_even_when_meant(constant_lr_run):
    tmp, recipe, out = constant_lr_run
    proc = run_stage_script(
        tmp,
        recipe,
        "--resume_from_checkpoint",
        out / "checkpoint-2",
        "--gradient_accumulation_steps",
        "2",
        "--allow_recipe_change",
        "true",
    )
    assert_one_line_error(proc, "gradient_accumulation_steps cannot change on resume", "model_name_or_path:")


def test_a_meant_learning_rate_change_reaches_the_optimizer_and_is_recorded(constant_lr_run):
    tmp, recipe, out = constant_lr_run
    proc = run_stage_script(
        tmp,
        recipe,
        "--resume_from_checkpoint",
        out / "checkpoint-2",
        "--learning_rate",
        "1e-3",
        "--allow_recipe_change",
        "true",
    )
    assert proc.returncode == 0, proc.stderr
    assert f"resuming from {out / 'checkpoint-2'} (step 2, epoch " in proc.stderr
    rates = {e["step"]: e["learning_rate"] for e in helpers.log_history(out) if "learning_rate" in e}
    assert rates == {1: 1e-2, 2: 1e-2, 3: 1e-3, 4: 1e-3}, rates
    text = (out / RESOLVED_RECIPE_NAME).read_text()
    header = [ln for ln in text.splitlines() if ln.startswith("#")]
    assert header[0].endswith("rerun with: accelerate launch posttrain/sft.py recipe.resolved.yaml"), header
    assert "# resumed from checkpoint-2 at step 2 with: learning_rate 0.01 -> 0.001" in header, header
    saved = yaml.safe_load(text)
    assert saved["learning_rate"] == 1e-3 and saved["allow_recipe_change"] is False
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    changes = state["stateful_callbacks"]["RunRecipe"]["attributes"]["changes"]
    assert changes == [{"step": 2, "checkpoint": "checkpoint-2", "changed": {"learning_rate": [0.01, 0.001]}}]
