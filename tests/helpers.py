"""Helpers several test modules share (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


# Resumable checkpoints (with the optimizer state), all kept: the demo recipes save none.
RESUMABLE = dict(save_strategy="steps", save_only_model=False, save_total_limit=None)


def write_recipe(stage: str, path: Path, model_dir, data_dir, output_dir, **overrides) -> Path:
    """recipes/demo/<stage>.yaml, pointed at the test's model, data and output directory."""
    recipe = yaml.safe_load((REPO / "recipes" / "demo" / f"{stage}.yaml").read_text())
    recipe.update(
        model_name_or_path=str(model_dir), dataset_name=str(data_dir), output_dir=str(output_dir), report_to="none"
    )
    recipe.update(overrides)
    path.write_text(yaml.safe_dump(recipe))
    return path


def stage_module(stage: str):
    """posttrain.sft, posttrain.dpo or posttrain.reward."""
    return importlib.import_module(f"posttrain.{stage}")


def stage_config(stage: str):
    """The training-arguments class the stage's script parses its recipe with."""
    import trl

    return {"sft": trl.SFTConfig, "reward": trl.RewardConfig}.get(stage) or stage_module(stage).DPOConfig


def parse_stage(stage: str, *argv):
    """The stage's Recipe from `RECIPE.yaml [--key value ...]`, as its script parses it."""
    from posttrain.training.recipe import parse_stage_recipe

    return parse_stage_recipe(stage_config(stage), [str(a) for a in argv])


def parse_production_recipe(stage: str, name: str | None = None):
    """recipes/<name or stage>.yaml's argument groups, parsed as the stage's script does on the cluster (use_cpu
    only because this machine has no GPU for bf16), with deprecation warnings turned into errors."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        return parse_stage(stage, REPO / "recipes" / f"{name or stage}.yaml", "--use_cpu", "true").arguments


def run_stage(stage: str, *argv) -> None:
    """Run the stage's `main` in this process."""
    stage_module(stage).main(parse_stage(stage, *argv))


def run_main_here(main, argv: list, prog: str = "posttrain") -> subprocess.CompletedProcess:
    """A command-line entry point (`main(argv)`, or `main()` reading sys.argv) run in this process with its
    output captured, as the command would print and exit, without a new process's seconds of imports. For
    refusals: runs that train, stop or die use a real process."""
    import io
    import signal

    argv = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    saved_argv, sigterm = sys.argv, signal.getsignal(signal.SIGTERM)
    sys.argv = [prog, *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else 1
    finally:
        sys.argv = saved_argv
        signal.signal(signal.SIGTERM, sigterm)
    return subprocess.CompletedProcess([prog, *argv], code, out.getvalue(), err.getvalue())


def run_stage_cli_here(stage: str, *argv) -> subprocess.CompletedProcess:
    """`posttrain/<stage>.py RECIPE.yaml ...` (parse, lock, main, its one-line errors and exit codes) in this
    process (run_main_here)."""
    from posttrain.training.run_dir import run_stage_cli

    module, config = stage_module(stage), stage_config(stage)
    return run_main_here(lambda: run_stage_cli(module.main, config), list(argv), f"posttrain/{stage}.py")


def build_stage_trainer(stage: str, *argv):
    """The stage's trainer on its data, as its `main` builds it, without training."""
    from posttrain.data.lengths import drop_overlong_conversations
    from posttrain.data.loading import load_datasets, validate_preference_rows, validate_sft_rows
    from posttrain.training.trainers import build_trainer, load_training_tokenizer

    recipe = parse_stage(stage, *argv)
    script_args, training_args, model_args, dataset_args = recipe.arguments
    sft = stage == "sft"
    tokenizer = load_training_tokenizer(model_args, training_args, require_generation_markers=sft)
    validate = validate_sft_rows if sft else validate_preference_rows
    train, evaluation = load_datasets(script_args, dataset_args, training_args, validate)
    if sft:
        train = drop_overlong_conversations(train, tokenizer, training_args, "train")
        evaluation = drop_overlong_conversations(evaluation, tokenizer, training_args, "eval")
    trainer_cls = __import__("trl").SFTTrainer if sft else stage_module(stage).PreferenceTrainer
    return build_trainer(trainer_cls, recipe, tokenizer, train, evaluation)


def log_history(out: Path) -> list[dict]:
    """The log history of a run's trainer_state.json."""
    return json.loads((Path(out) / "trainer_state.json").read_text())["log_history"]


def one_error_line(stderr: str) -> str:
    """The single `error: ...` line a refused command prints (asserting there is exactly one)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


# ------------------------------------------------------------------ faults: one line, nothing changed


def assert_one_line_error(result, *fragments: str, code: int = 2) -> str:
    """A finished CLI run (CompletedProcess) that failed with `code`, no traceback, and whose only
    error line, its last stderr line, holds every fragment; returns that line. (Notes and progress
    bars may come before it.)"""
    lines = result.stderr.splitlines()
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert [ln for ln in lines if ln.startswith("error")] == lines[-1:], lines
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


def tree_hashes(*roots: Path) -> dict[str, str]:
    """sha256 and mode of every file, and every directory name, under each root (a file stands for itself)."""
    hashes = {}
    for root in map(Path, roots):
        for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            hashes[str(p)] = f"{digest} {oct(p.stat().st_mode)}"
    return hashes


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "1m"):
    """A tmpfs of `size` mounted at `path` for the body: a file system that fills up, or turns read-only
    (`make_read_only`). Skips the test where mounting is not allowed (not root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def make_read_only(path: Path) -> None:
    """A mounted tmpfs is remounted read-only; a plain directory (not root: chmod binds) loses its write bits."""
    if os.path.ismount(path):
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    elif os.geteuid() == 0:
        pytest.skip("root ignores permission bits: a read-only location needs a tmpfs mount")
    else:
        for p in [path, *path.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)


def run_paused(patch: str, argv: list, ready: Path, go: Path) -> subprocess.Popen:
    """Start a CLI whose function `patch` ("package.module.function"), when first called, creates `ready`
    and waits for `go` to exist: a run that holds its output directory as long as the test wants.
    argv[0] is a script (.py, run as __main__) or a module whose main() is the CLI."""
    module, function = patch.rsplit(".", 1)
    entry, *args = map(str, argv)
    run = (
        f"runpy.run_path({entry!r}, run_name='__main__')"
        if entry.endswith(".py")
        else f"import {entry}; {entry}.main()"
    )
    code = (
        "import runpy, sys, time\n"
        "from pathlib import Path\n"
        f"import {module} as m\n"
        f"real = m.{function}\n"
        "def paused(*args, **kwargs):\n"
        f"    Path({str(ready)!r}).touch()\n"
        f"    while not Path({str(go)!r}).exists():\n"
        "        time.sleep(0.05)\n"
        "    return real(*args, **kwargs)\n"
        f"m.{function} = paused\n"
        f"sys.argv = [{entry!r}, *{args!r}]\n"
        f"{run}\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def accelerate_launch(config: str, script: str, recipe: str, *overrides, cwd: Path) -> subprocess.CompletedProcess:
    """`accelerate launch` with a repo config, overriding only what a CPU needs: 2 processes, no bf16."""
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(REPO / "accelerate_configs" / config),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        str(REPO / script),
        str(REPO / recipe),
        *map(str, overrides),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc
