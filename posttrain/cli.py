"""`posttrain`: one installed command for every tool of the project.

    posttrain sft RECIPE.yaml [--key value ...]                      # one process
    posttrain sft RECIPE.yaml --num_processes 8                      # accelerate launch, 8 processes
    posttrain dpo RECIPE.yaml --config_file accelerate_configs/zero3.yaml [--key value ...]
    posttrain evaluate RECIPE.yaml
    posttrain chat runs/dpo
    posttrain convert CKPT --tokenizer qwen3 --output-dir runs/converted
    posttrain prepare-sft --dataset alpaca --output-dir data/sft_alpaca --tokenizer runs/converted

Each subcommand runs the same code as its script (`posttrain sft` is `posttrain/sft.py`, `posttrain convert`
is `convert-checkpoint`, `posttrain prepare-sft` is `data_scripts/prepare_sft.py`) with the same flags, which
`--help` after the subcommand lists; `posttrain --help` lists the subcommands. Subcommand names take dashes or
underscores (`generate-pairs`, `generate_pairs`).

Several processes: the stages, generate-pairs and evaluate take `accelerate launch`'s own options anywhere
after the subcommand: `--num_processes N`, `--config_file FILE`, `--num_machines`, `--machine_rank`,
`--main_process_ip`, `--main_process_port` (either spelling). With any of them the command is
`accelerate launch [those options] -m posttrain.<stage> RECIPE.yaml [--key value ...]`, exactly what the
documented `accelerate launch posttrain/sft.py ...` form runs; without them it runs in this process. Every
other accelerate setting comes from the `--config_file` (or accelerate's default config).
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

from posttrain.outputs.errors import EXIT_BAD_INPUT, die
from posttrain.outputs.flags import PROG_ENV, did_you_mean

# name -> (module or data_scripts file, one line for `posttrain --help`)
COMMANDS = {
    "sft": ("posttrain.sft", "supervised fine-tuning on a recipe (posttrain/sft.py)"),
    "dpo": ("posttrain.dpo", "direct preference optimisation on a recipe (posttrain/dpo.py)"),
    "reward": ("posttrain.reward", "train a reward model on preference pairs (posttrain/reward.py)"),
    "generate-pairs": (
        "posttrain.generate_pairs",
        "on-policy preference pairs: sample, score with a reward model (posttrain/generate_pairs.py)",
    ),
    "evaluate": ("posttrain.evaluate", "benchmarks, generation health and comparisons (posttrain/evaluate.py)"),
    "chat": ("posttrain.chat", "talk to a model directory, or answer one --prompt (posttrain/chat.py)"),
    "convert": ("posttrain.convert", "pre-training checkpoint -> Hugging Face directory (convert-checkpoint)"),
    "export": ("posttrain.export", "Hugging Face directory -> pre-training checkpoint (export-checkpoint)"),
    "prepare-sft": ("prepare_sft.py", "SFT data: a dataset -> train/test.jsonl (data_scripts/prepare_sft.py)"),
    "prepare-dpo": ("prepare_dpo.py", "DPO data: preference pairs -> train/test.jsonl (data_scripts/prepare_dpo.py)"),
}
LAUNCHED = {"sft", "dpo", "reward", "generate-pairs", "evaluate"}  # the commands accelerate can launch

# accelerate launch options taken from a stage's arguments: flag -> whether it takes a value
LAUNCH_OPTIONS = {
    "--num_processes": True,
    "--config_file": True,
    "--num_machines": True,
    "--machine_rank": True,
    "--main_process_ip": True,
    "--main_process_port": True,
}
DATA_SCRIPTS = Path(__file__).resolve().parent.parent / "data_scripts"


def usage() -> str:
    width = max(map(len, COMMANDS)) + 2
    lines = [
        "usage: posttrain COMMAND [ARGS ...]    (posttrain COMMAND --help: that command's arguments)",
        "",
        "Post-training on the Hugging Face stack: convert a checkpoint, prepare data, SFT, reward model,",
        "on-policy pairs, DPO, evaluate, chat, export. Several processes: add --num_processes N or",
        "--config_file accelerate_configs/zero2.yaml to a stage (it runs under `accelerate launch`).",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}{about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(lines)


def split_launch_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(accelerate launch options, the command's own arguments), each option in accelerate's spelling."""
    launch, rest = [], []
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        name = "--" + flag[2:].replace("-", "_") if flag.startswith("--") else flag
        if name in LAUNCH_OPTIONS:
            if eq:
                launch += [name, value]
            elif i + 1 < len(args):
                launch += [name, args[i + 1]]
                i += 1
            else:
                die(f"posttrain: {flag} needs a value")
            i += 1
            continue
        rest.append(args[i])
        i += 1
    return launch, rest


def accelerate_launch(command: str, module: str, launch: list[str], rest: list[str]) -> int:
    """`accelerate launch LAUNCH -m MODULE REST` in a child process; its exit status."""
    argv = [sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", module, *rest]
    env = {**os.environ, PROG_ENV: f"posttrain {command}"}
    try:
        return subprocess.run(argv, env=env).returncode
    except KeyboardInterrupt:
        return 130


def run_in_process(command: str, target: str, rest: list[str]) -> None:
    """Run the command's `__main__` on `rest`, with `posttrain COMMAND` as its program name."""
    saved_argv, saved_prog = sys.argv, os.environ.get(PROG_ENV)
    os.environ[PROG_ENV] = f"posttrain {command}"  # runpy sets sys.argv[0] to the file it runs
    sys.argv = [f"posttrain {command}", *rest]
    try:
        if target.endswith(".py"):
            script = DATA_SCRIPTS / target
            if not script.is_file():
                die(
                    f"posttrain {command}: {script} not found (the data scripts come with a checkout of the repository)"
                )
            runpy.run_path(str(script), run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved_argv
        if saved_prog is None:
            os.environ.pop(PROG_ENV, None)
        else:
            os.environ[PROG_ENV] = saved_prog


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        raise SystemExit(0 if args else EXIT_BAD_INPUT)
    command, rest = args[0].replace("_", "-"), args[1:]
    if command not in COMMANDS:
        die(f"posttrain: unknown command {args[0]!r}{did_you_mean(command, COMMANDS)}; posttrain --help lists them")
    (target, _), launchable = COMMANDS[command], command in LAUNCHED
    launch, own = split_launch_args(rest) if launchable else ([], rest)
    if launch:
        raise SystemExit(accelerate_launch(command, target, launch, own))
    run_in_process(command, target, own)


if __name__ == "__main__":
    main()
