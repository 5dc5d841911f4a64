"""The command line of daily use: each command's --help says how to run it, every tool takes both flag
spellings and names the flag meant, `posttrain` runs every tool, a missing local path is refused before
anything is loaded or the Hub is asked, and a tracker that is not installed is refused with its extra."""

from __future__ import annotations

import configparser
import os
import socket
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, one_error_line, parse_stage, write_recipe

from posttrain import cli
from posttrain.outputs.errors import PosttrainError
from posttrain.outputs.flags import PROG_ENV, ArgumentParser, looks_local, missing_local_path

STAGES = ["sft", "dpo", "reward", "generate-pairs", "evaluate"]
# The keys each stage's short help must name (model, data, batch, lr, epochs, output_dir, its own).
HELP_KEYS = {
    "sft": ["model_name_or_path", "dataset_name", "per_device_train_batch_size", "learning_rate", "num_train_epochs",
            "output_dir", "max_length", "packing"],
    "dpo": ["model_name_or_path", "dataset_name", "per_device_train_batch_size", "learning_rate", "num_train_epochs",
            "output_dir", "beta", "loss_type"],
    "reward": ["model_name_or_path", "dataset_name", "per_device_train_batch_size", "learning_rate",
               "num_train_epochs", "output_dir", "max_length"],
    "generate-pairs": ["policy", "reward_model", "prompts", "num_samples", "generation_batch_size", "output_dir"],
    "evaluate": ["models", "tasks", "prompts", "batch_size", "output_dir", "judge"],
}  # fmt: skip


@pytest.fixture()
def no_network(monkeypatch):
    """Fail the test on any network access; the Hub is not in offline mode, so nothing else stops it."""
    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def run_posttrain(capsys, *argv) -> tuple[int, str, str]:
    """`posttrain ARGV` in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_.value.code or 0, out.out, out.err


# ------------------------------------------------------------------ help


@pytest.mark.parametrize("stage", STAGES)
def test_help_opens_with_the_usage_the_description_and_the_common_keys(capsys, stage):
    code, out, _ = run_posttrain(capsys, stage, "--help")
    lines = out.splitlines()
    assert code == 0
    assert lines[0] == f"usage: posttrain {stage} RECIPE.yaml [--key value ...]"
    assert lines[1] == f"   or: posttrain {stage} --config RECIPE.yaml [--key value ...]"
    assert lines[2] == "" and lines[3] and lines[4] and lines[5] == ""  # the two-line description
    listed = [line.split()[0] for line in lines[7:] if line.startswith("  ")]
    assert set(HELP_KEYS[stage]) <= set(listed)
    assert lines[-1].startswith("Every field (") and lines[-1].endswith(f"posttrain {stage} --help-all")
    assert len(lines) < 40


def test_help_all_is_the_full_field_list(capsys):
    code, out, _ = run_posttrain(capsys, "sft", "--help-all")
    assert code == 0 and out.startswith("usage: posttrain sft")
    assert "--gradient_accumulation_steps" in out and "--lora_r" in out and len(out.splitlines()) > 300


def test_help_shows_the_defaults_the_stage_parses_with(capsys):
    import trl

    _, out, _ = run_posttrain(capsys, "sft", "--help")
    line = next(line for line in out.splitlines() if line.strip().startswith("learning_rate"))
    assert line.endswith(f"[default: {trl.SFTConfig.learning_rate}]")


def test_no_recipe_prints_the_usage_with_the_program_name():
    proc = subprocess.run([sys.executable, "posttrain/sft.py"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr).startswith("error: usage: posttrain/sft.py RECIPE.yaml [--key value ...]")
    assert "--config RECIPE.yaml" in proc.stderr and "posttrain/sft.py --help" in proc.stderr


def test_posttrain_without_a_recipe_names_itself(capsys):
    code, _, err = run_posttrain(capsys, "dpo")
    assert code == 2 and err.startswith("error: usage: posttrain dpo RECIPE.yaml")
    assert PROG_ENV not in os.environ and sys.argv[0] != "posttrain dpo"  # put back after the command


# ------------------------------------------------------------------ the posttrain command


def test_posttrain_help_lists_every_subcommand_in_one_line_each(capsys):
    code, out, _ = run_posttrain(capsys, "--help")
    assert code == 0 and out.startswith("usage: posttrain COMMAND")
    listed = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert list(listed) == list(cli.COMMANDS)
    expected = {"sft", "dpo", "reward", "generate-pairs", "evaluate", "chat", "convert", "export"}
    assert expected | {"prepare-sft", "prepare-dpo"} == set(listed)
    assert all(len(line.split()) > 2 for line in listed.values())


def test_posttrain_is_an_installed_command():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = dict(line.split(" = ") for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    assert scripts["posttrain"] == "posttrain.cli:main"


def test_posttrain_unknown_command_suggests_one(capsys):
    code, _, err = run_posttrain(capsys, "evalute", "x.yaml")
    assert code == 2 and "unknown command 'evalute' (did you mean evaluate?)" in err


@pytest.mark.parametrize("spelling", ["generate-pairs", "generate_pairs"])
def test_subcommands_take_either_spelling(capsys, spelling):
    code, out, _ = run_posttrain(capsys, spelling, "--help")
    assert code == 0 and out.startswith("usage: posttrain generate-pairs RECIPE.yaml")


def test_launch_options_go_to_accelerate_launch(monkeypatch):
    calls = []
    monkeypatch.setattr(
        cli.subprocess, "run", lambda argv, env: calls.append((argv, env)) or subprocess.CompletedProcess(argv, 3)
    )
    argv = [
        "recipes/sft.yaml",
        "--num-processes",
        "8",
        "--learning_rate",
        "1e-5",
        "--config_file=accelerate_configs/zero2.yaml",
    ]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sft", *argv])
    assert exit_.value.code == 3  # the launch's own exit status
    ((launched, env),) = calls
    assert launched == [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", "8", "--config_file", "accelerate_configs/zero2.yaml",
        "-m", "posttrain.sft", "recipes/sft.yaml", "--learning_rate", "1e-5",
    ]  # fmt: skip
    assert env[PROG_ENV] == "posttrain sft"


def test_without_launch_options_a_stage_runs_in_this_process(monkeypatch):
    ran = []
    monkeypatch.setattr(cli, "run_in_process", lambda *a: ran.append(a))
    monkeypatch.setattr(cli, "accelerate_launch", lambda *a: pytest.fail("launched"))
    cli.main(["dpo", "r.yaml", "--beta", "0.1"])
    cli.main(["chat", "runs/dpo", "--num_processes", "2"])  # not a stage: its own flag (refused by chat)
    assert ran == [("dpo", "posttrain.dpo", ["r.yaml", "--beta", "0.1"]),
                   ("chat", "posttrain.chat", ["runs/dpo", "--num_processes", "2"])]  # fmt: skip


# ------------------------------------------------------------------ both spellings, did you mean


def test_stage_flags_take_both_spellings(tmp_path, tiny_model_dir, sft_data_dir):
    recipe = write_recipe("sft", tmp_path / "r.yaml", tiny_model_dir, sft_data_dir, tmp_path / "out")
    for spelling in ("--learning_rate", "--learning-rate"):
        _, args, _, _ = parse_stage(
            "sft", recipe, spelling, "3e-4", "--output-dir", tmp_path / "o", "--max_length", 64
        ).arguments
        assert (args.learning_rate, args.output_dir, args.max_length) == (3e-4, str(tmp_path / "o"), 64)


def test_stage_unknown_flag_and_key_name_the_closest(tmp_path, tiny_model_dir, sft_data_dir):
    recipe = write_recipe("sft", tmp_path / "r.yaml", tiny_model_dir, sft_data_dir, tmp_path / "out")
    with pytest.raises(PosttrainError) as err:
        parse_stage("sft", recipe, "--lerning-rate", "1e-4")
    assert str(err.value) == "unknown command-line argument(s): --lerning-rate (did you mean --learning_rate?)"
    bad = write_recipe("sft", tmp_path / "bad.yaml", tiny_model_dir, sft_data_dir, tmp_path / "out", lerning_rate=1)
    with pytest.raises(
        PosttrainError, match=r"bad.yaml: unknown key\(s\) lerning_rate \(did you mean learning_rate\?\)"
    ):
        parse_stage("sft", bad)


def test_evaluate_and_generate_pairs_take_both_spellings(tmp_path, tiny_model_dir):
    from posttrain import evaluate, generate_pairs

    for flag in ("--output_dir", "--output-dir"):
        args = evaluate.parse(["--models", str(tiny_model_dir), flag, str(tmp_path / "e"), "--max-new-tokens", "7"])
        assert (args.output_dir, args.max_new_tokens) == (str(tmp_path / "e"), 7)
        args = generate_pairs.parse(
            ["--policy", str(tiny_model_dir), "--reward-model", str(tiny_model_dir), "--prompts", str(tiny_model_dir),
             flag, str(tmp_path / "p"), "--num_samples", "3"]
        )  # fmt: skip
        assert (args.output_dir, args.num_samples, args.reward_model) == (str(tmp_path / "p"), 3, str(tiny_model_dir))
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(yaml.safe_dump({"models": [str(tiny_model_dir)], "max_new_token": 4}))
    with pytest.raises(PosttrainError, match=r"unknown key\(s\) max_new_token \(did you mean max_new_tokens\?\)"):
        evaluate.parse([str(recipe)])


def run_tool(capsys, main, argv) -> tuple[int, str]:
    """A tool's `main(argv)`: (exit status, its stderr)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
        raise SystemExit(0)
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("spelling", ["--output-dir", "--output_dir"])
def test_convert_takes_both_spellings(capsys, tmp_path, spelling):
    from posttrain import convert

    code, err = run_tool(
        capsys, convert.main, [str(tmp_path / "no.pt"), "--tokenizer", "qwen3", spelling, str(tmp_path / "o")]
    )
    # the flag was taken: the refusal is about the checkpoint
    assert code == 2 and one_error_line(err) == f"error: checkpoint {tmp_path / 'no.pt'} does not exist"


def test_convert_names_the_flag_meant(capsys, tmp_path):
    from posttrain import convert

    code, err = run_tool(capsys, convert.main, ["x.pt", "--tokenizer", "qwen3", "--outptu-dir", "o"])
    line = one_error_line(err)
    assert code == 2 and "required: --output-dir" in line and "--outptu-dir (did you mean --output-dir?)" in line
    code, err = run_tool(capsys, convert.main, ["x.pt", "--tokenizer", "qwen3", "--output_dir", "o", "--verfy"])
    assert code == 2 and one_error_line(err) == (
        "error: convert-checkpoint: unrecognized argument --verfy (did you mean --verify?) (see convert-checkpoint --help)"
    )


@pytest.mark.parametrize("spelling", ["--iter-num", "--iter_num"])
def test_export_takes_both_spellings(capsys, tmp_path, spelling):
    from posttrain import export

    code, err = run_tool(
        capsys, export.main, [str(tmp_path / "none"), "--output", str(tmp_path / "c.pt"), spelling, "5"]
    )
    assert code == 2 and "iter" not in one_error_line(err) and "none" in one_error_line(err)


def test_chat_takes_both_spellings():
    from posttrain import chat

    for flags in (["--max-new-tokens", "9", "--top-p", "0.5"], ["--max_new_tokens", "9", "--top_p=0.5"]):
        args = chat.build_parser().parse_args(["runs/dpo", *flags])
        assert (args.max_new_tokens, args.top_p) == (9, 0.5)


def test_data_scripts_take_both_spellings(tmp_path, capsys):
    from posttrain.data import prep

    sources = {"messages": prep.Source(None, test_split="test")}
    for flags in (["--output-dir", "o", "--max-samples", "3"], ["--output_dir", "o", "--max_samples=3"]):
        args = prep.parse_args(prep.SFT, sources, ["--dataset", "messages", *flags])
        assert (args.output_dir, args.max_samples) == ("o", 3)
    code, err = run_tool(
        capsys,
        lambda a: prep.parse_args(prep.SFT, sources, a),
        ["--dataset", "messages", "--output_dir", "o", "--max-smaples", "3"],
    )
    assert code == 2 and "did you mean --max-samples?" in one_error_line(err)


def test_argparse_prefixes_and_values_are_left_alone():
    p = ArgumentParser(prog="t")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--system")
    args = p.parse_args(["--over", "--system=--not_a_flag"])  # a value is never respelled
    assert args.overwrite and args.system == "--not_a_flag"


# ------------------------------------------------------------------ local paths


def test_a_missing_local_model_is_refused_at_parse_time_without_the_network(
    tmp_path, no_network, tiny_model_dir, sft_data_dir
):
    runs = tmp_path / "demo_runs"
    (runs / "converted").mkdir(parents=True)
    recipe = write_recipe("sft", tmp_path / "r.yaml", runs / "convertd", sft_data_dir, tmp_path / "out")
    with pytest.raises(PosttrainError) as err:
        parse_stage("sft", recipe)
    assert str(err.value) == (
        f"model_name_or_path: {runs / 'convertd'}: cannot find this local path "
        f"(did you mean {runs / 'converted'}?) (a path, so not looked up on the Hub)"
    )
    assert not (tmp_path / "out").exists()


def test_a_relative_path_under_a_local_directory_is_local(tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo_runs").mkdir()
    assert looks_local("demo_runs/convertd") and looks_local("./x") and looks_local("~/m") and looks_local("a/b/c")
    assert not looks_local("Qwen/Qwen3-0.6B") and not looks_local("gpt2")
    assert "demo_runs/convertd: cannot find" in str(missing_local_path("policy", "demo_runs/convertd"))
    assert missing_local_path("policy", "Qwen/Qwen3-0.6B") is None


def test_a_missing_local_dataset_under_a_local_directory_is_not_tried_on_the_hub(tmp_path, monkeypatch, no_network):
    from posttrain.data.loading import load_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(PosttrainError, match=r"^dataset data/sft_typo not found \(prepare it with data_scripts"):
        load_source("data/sft_typo")


def test_generate_pairs_refuses_a_missing_local_policy(tmp_path, no_network, tiny_model_dir):
    from posttrain import generate_pairs

    with pytest.raises(PosttrainError, match=r"^policy: \./nowhere: cannot find this local path"):
        generate_pairs.parse(
            ["--policy", "./nowhere", "--reward_model", str(tiny_model_dir), "--prompts", str(tiny_model_dir)]
        )


def test_a_hub_failure_is_one_line(tmp_path, monkeypatch, sft_data_dir):
    import huggingface_hub

    def unreachable(self, repo_id, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known\nsecond line")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", unreachable)
    recipe = write_recipe("sft", tmp_path / "r.yaml", "nobody/no-such-model", sft_data_dir, tmp_path / "out")
    with pytest.raises(PosttrainError) as err:
        parse_stage("sft", recipe)
    assert str(err.value) == (
        "model_name_or_path: nobody/no-such-model: not found on the Hub (ConnectionError: [Errno -2] Name or service "
        "not known); for a local directory, give its path (./nobody/no-such-model)"
    )


def test_the_stage_script_refuses_a_missing_model_without_opening_a_socket(tmp_path, sft_data_dir):
    """The whole script, Hub offline mode off: exit 2, one line, and not one connection tried."""
    guard = tmp_path / "guard"
    guard.mkdir()
    touched = tmp_path / "network_touched"
    (guard / "sitecustomize.py").write_text(
        "import socket\n"
        "def refuse(*a, **k):\n"
        f"    open({str(touched)!r}, 'w').close()\n"
        "    raise OSError('network access attempted')\n"
        "socket.socket.connect = refuse\nsocket.getaddrinfo = refuse\n"
    )
    (tmp_path / "runs").mkdir()
    recipe = write_recipe("sft", tmp_path / "r.yaml", tmp_path / "runs" / "convertd", sft_data_dir, tmp_path / "out")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join([str(guard), env.get("PYTHONPATH", "")])
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.getaddrinfo('huggingface.co', 443)"], env=env)
    assert probe.returncode != 0 and touched.exists()  # the guard works
    touched.unlink()
    proc = subprocess.run(
        [sys.executable, "posttrain/sft.py", str(recipe)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert one_error_line(proc.stderr).startswith(
        f"error: model_name_or_path: {tmp_path / 'runs' / 'convertd'}: cannot find"
    )
    assert "Retrying" not in proc.stderr and not touched.exists()
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ trackers


def test_an_uninstalled_tracker_is_refused_with_its_extra(tmp_path, monkeypatch, tiny_model_dir, sft_data_dir):
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: False)
    recipe = write_recipe(
        "sft", tmp_path / "r.yaml", tiny_model_dir, sft_data_dir, tmp_path / "out", report_to="wandb"
    )
    with pytest.raises(PosttrainError) as err:
        parse_stage("sft", recipe)
    assert str(err.value) == (
        'report_to wandb: wandb is not installed; pip install -e ".[wandb]" (or pip install wandb), or set report_to: none'
    )
    with pytest.raises(
        PosttrainError, match=r"^report_to wandbb: not a tracker transformers knows \(did you mean wandb\?\)"
    ):
        parse_stage("sft", recipe, "--report_to", "wandbb")
    assert parse_stage("sft", recipe, "--report_to", "tensorboard").training_args.report_to == ["tensorboard"]


def test_every_extra_a_message_names_is_in_setup_cfg():
    from posttrain.training.recipe import TRACKERS

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    extras = {name: value.split() for name, value in cfg["options.extras_require"].items()}
    named = {extra: package for _, package, extra in TRACKERS.values() if extra}
    assert {"wandb", "mlflow", "trackio", "comet"} <= set(named)
    for extra, package in named.items():
        assert extras[extra] == [package], extra
