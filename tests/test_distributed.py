"""The accelerate configs and the SLURM launcher, and real multi-process SFT/DPO launches.

Fast tests: every config parses with accelerate's own schema and says what its
name promises; the SLURM script renders, for 2 nodes, the commands accelerate
then resolves to the right ranks, address and process counts.

Slow tests (`-m slow`): `accelerate launch` with the repo's ZeRO-2 / ZeRO-3
configs on 2 CPU processes, only the process count and precision overridden on
the command line, and assertions on the saved models; the FSDP config on CPU
processes, which accelerate would not shard, refused.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, accelerate_launch

CONFIGS = REPO / "accelerate_configs"
SLURM_SCRIPT = REPO / "recipes" / "launch.slurm"


def load_accelerate_config(path: Path):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(path))


# ------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "name, stage, offload",
    [("zero2", 2, "none"), ("zero3", 3, "none"), ("zero3_offload", 3, "cpu"), ("zero3_multinode", 3, "none")],
)
def test_deepspeed_configs(name, stage, offload):
    cfg = load_accelerate_config(CONFIGS / f"{name}.yaml")  # raises on keys accelerate does not know
    ds = cfg.deepspeed_config
    assert cfg.distributed_type.value == "DEEPSPEED"
    assert cfg.mixed_precision == "bf16"
    assert ds["zero_stage"] == stage
    assert ds["offload_optimizer_device"] == ds["offload_param_device"] == offload
    # One `accelerate launch` per node (torchrun), never pdsh/ssh.
    assert ds["deepspeed_multinode_launcher"] == "standard"
    if stage == 3:  # gather full 16-bit weights on save, build the model sharded
        assert ds["zero3_save_16bit_model"] is True and ds["zero3_init_flag"] is True
    # Accumulation and clipping belong to the recipe (DeepSpeed "auto" is filled from it).
    assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds
    expected = (2, 16) if name == "zero3_multinode" else (1, 8)
    assert (cfg.num_machines, cfg.num_processes) == expected


def test_ddp_config():
    cfg = load_accelerate_config(CONFIGS / "ddp.yaml")
    assert cfg.distributed_type.value == "MULTI_GPU"
    assert (cfg.mixed_precision, cfg.num_machines, cfg.num_processes) == ("bf16", 1, 8)
    assert cfg.deepspeed_config == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: NCCL is found")
@pytest.mark.parametrize(
    "env, expected",
    [
        ({"WORLD_SIZE": "2"}, {"ddp_backend": "gloo", "use_cpu": True}),  # ddp.yaml: else each rank trains alone
        ({"WORLD_SIZE": "1", "ACCELERATE_USE_DEEPSPEED": "true"}, {"ddp_backend": "gloo"}),
        ({"WORLD_SIZE": "1"}, {}),
        ({}, {}),
    ],
)
def test_cpu_launches_name_the_gloo_backend(monkeypatch, env, expected):
    """Accelerate 1.15 counts the processes of a CPU launch only when a backend is named: a 2-process
    plain-DDP launch would otherwise train two unsynchronised copies into one output directory."""
    from posttrain.training.recipe import launch_defaults

    for key in ("WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launch_defaults() == expected


def test_fsdp_config():
    """FSDP2, full shard, a full state dict on save (one loadable model.safetensors), bf16; activation
    checkpointing is left to the recipe (transformers refuses both at once)."""
    cfg = load_accelerate_config(CONFIGS / "fsdp.yaml")
    fsdp = cfg.fsdp_config
    assert cfg.distributed_type.value == "FSDP" and cfg.mixed_precision == "bf16"
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # FULL_SHARD
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT" and fsdp["fsdp_offload_params"] is False
    assert fsdp["fsdp_activation_checkpointing"] is False
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert (cfg.num_machines, cfg.num_processes) == (1, 8) and cfg.deepspeed_config == {}


def test_multinode_config_names_its_rendezvous():
    cfg = load_accelerate_config(CONFIGS / "zero3_multinode.yaml")
    assert cfg.machine_rank == 0 and cfg.main_process_ip and cfg.main_process_port == 29500
    # Identical to the single-node ZeRO-3 config except for where and how many.
    single = load_accelerate_config(CONFIGS / "zero3.yaml").to_dict()
    multi = cfg.to_dict()
    changed = {k for k in single.keys() | multi.keys() if single.get(k) != multi.get(k)}
    assert changed == {"num_machines", "num_processes", "main_process_ip", "main_process_port"}


# --------------------------------------------------------------------- SLURM


def render_slurm(tmp_path, nodes: int, *script_args, **env) -> list[list[str]]:
    """Run launch.slurm in DRY_RUN mode as inside an allocation of `nodes` nodes.

    SLURM is not installed here: the SLURM_* variables are set by hand and a
    stand-in `scontrol` expands the node list the way `scontrol show hostnames` does.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a17\\ngpu-a18\\n"\n')
    scontrol.chmod(0o755)
    full_env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NODELIST": "gpu-a[17-18]",
        "SLURM_GPUS_ON_NODE": "8",
        "DRY_RUN": "1",
        **env,
    }
    proc = subprocess.run(
        ["bash", str(SLURM_SCRIPT), *script_args], capture_output=True, text=True, env=full_env, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def resolve_launch(argv: list[str]):
    """What `accelerate launch ARGV` resolves to: accelerate's own parser and config merge."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    assert argv[:2] == ["accelerate", "launch"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv[2:]))
    return args


def test_slurm_renders_one_launch_per_node(tmp_path):
    commands = render_slurm(
        tmp_path, 2, "sft", "recipes/demo/sft.yaml", "--learning_rate", "1e-5", "--run_name", "a b"
    )
    assert len(commands) == 2
    for rank, argv in enumerate(commands):
        args = resolve_launch(argv)
        assert args.machine_rank == rank
        assert args.num_machines == 2 and args.num_processes == 16
        assert args.main_process_ip == "gpu-a17" and args.main_process_port == 29500
        assert args.same_network and args.rdzv_backend == "static"
        # From the multi-node config: ZeRO-3, 16-bit save, bf16, torchrun on each node.
        assert args.use_deepspeed and args.zero_stage == 3 and args.zero3_save_16bit_model
        assert args.mixed_precision == "bf16" and args.deepspeed_multinode_launcher == "standard"
        assert args.training_script == "posttrain/sft.py"
        assert args.training_script_args == ["recipes/demo/sft.yaml", "--learning_rate", "1e-5", "--run_name", "a b"]


def test_slurm_respects_overrides(tmp_path):
    """Another GPU count, address and port; and the single-node ZeRO-2 config, made multi-node by the command line."""
    commands = render_slurm(
        tmp_path,
        2,
        "dpo",
        "r.yaml",
        GPUS_PER_NODE="4",
        MASTER_ADDR="10.1.2.3",
        MASTER_PORT="30000",
        ACCELERATE_CONFIG="accelerate_configs/zero2.yaml",
    )
    for rank, argv in enumerate(commands):
        args = resolve_launch(argv)
        assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 8, rank)
        assert (args.main_process_ip, args.main_process_port, args.zero_stage) == ("10.1.2.3", 30000, 2)
        assert args.deepspeed_multinode_launcher == "standard" and args.training_script == "posttrain/dpo.py"


def test_slurm_rejects_bad_usage(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(SLURM_SCRIPT), "pretrain", "x.yaml"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "usage:" in proc.stderr
    proc = subprocess.run(["bash", str(SLURM_SCRIPT), "sft", "x.yaml"], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "SLURM_NNODES unset" in proc.stderr


# ------------------------------------------------------- real multi-process launches


def load_weights(model_dir: Path) -> dict:
    """Every tensor of a saved model, read from its safetensors files as written (no shape fix-ups)."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    assert files, f"no safetensors in {model_dir}"
    weights = {}
    for f in files:
        weights.update(load_file(f))
    return weights


def assert_trained_full_model(out: Path, start: Path) -> None:
    """The output loads, every tensor has its full shape (no empty ZeRO-3 shards), and every one moved."""
    from transformers import AutoModelForCausalLM

    before, after = load_weights(start), load_weights(out)
    assert set(after) == set(before)
    for name, tensor in after.items():
        assert tensor.shape == before[name].shape, (
            f"{name}: saved {tuple(tensor.shape)}, expected {tuple(before[name].shape)}"
        )
        assert not tensor.float().equal(before[name].float()), f"{name} was not trained (or not gathered on save)"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in before.values())


def assert_zero_checkpoint(out: Path, stage: int) -> None:
    """The DeepSpeed files of the run's checkpoint show the ZeRO stage and two ranks, each with its shard."""
    (step_dir,) = out.glob("checkpoint-*/global_step*")
    files = {p.name for p in step_dir.iterdir()}
    for rank in (0, 1):  # each rank's optimizer-state shard (ZeRO-2 and -3)
        assert {
            f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
            f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
        } & files, files
    param_shards = {f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" for rank in (0, 1)}
    if stage == 3:  # ... and its parameter shard
        assert param_shards <= files, files
    else:  # one replicated copy of the parameters
        assert "mp_rank_00_model_states.pt" in files and not param_shards & files, files


def train_under_deepspeed(tmp_path, config, stage, script, recipe, model_dir, data_dir, steps, *extra) -> list[dict]:
    """A short run of the repo's demo recipe, saving a checkpoint at its last step; checks the
    saved model and the ZeRO checkpoint and returns the trainer's log history."""
    out = tmp_path / "out"
    accelerate_launch(
        config,
        script,
        recipe,
        "--model_name_or_path",
        model_dir,
        "--dataset_name",
        data_dir,
        "--output_dir",
        out,
        "--max_steps",
        steps,
        "--num_train_epochs",
        "1",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "steps",
        "--save_steps",
        steps,
        "--report_to",
        "none",
        "--save_only_model",  # the sharded state, which these check (the demo recipe saves no checkpoint)
        "false",
        *extra,
        cwd=tmp_path,
    )
    assert_trained_full_model(out, model_dir)
    assert_zero_checkpoint(out, stage)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    # The gloo backend this CPU launch needed is re-derived at launch, not baked into the recipe
    # (rerun on GPUs, it must not force gloo over NCCL); a backend the user named is kept.
    resolved = yaml.safe_load((out / "recipe.resolved.yaml").read_text())
    assert resolved["ddp_backend"] == ("gloo" if "--ddp_backend" in extra else None)
    assert resolved["max_steps"] == steps
    return state["log_history"]


@pytest.mark.slow
@pytest.mark.parametrize("config, stage", [("zero2.yaml", 2), ("zero3.yaml", 3)])
def test_sft_under_deepspeed(tmp_path, tiny_model_dir, sft_data_dir, config, stage):
    named_backend = ("--ddp_backend", "gloo") if stage == 2 else ()  # a user's own choice is kept
    logs = train_under_deepspeed(
        tmp_path,
        config,
        stage,
        "posttrain/sft.py",
        "recipes/demo/sft.yaml",
        tiny_model_dir,
        sft_data_dir,
        4,
        *named_backend,
    )
    losses = [e["loss"] for e in logs if "loss" in e]
    assert len(losses) == 4 and losses[-1] < losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("config, stage", [("zero2.yaml", 2), ("zero3.yaml", 3)])
def test_dpo_with_live_reference_under_deepspeed(tmp_path, tiny_model_dir, preference_data_dir, config, stage):
    """DPO with a reference model loaded and prepared next to the policy (sharded too under ZeRO-3)."""
    logs = train_under_deepspeed(
        tmp_path,
        config,
        stage,
        "posttrain/dpo.py",
        "recipes/demo/dpo.yaml",
        tiny_model_dir,
        preference_data_dir,
        3,
        "--precompute_ref_log_probs",
        "false",
    )
    logs = [e for e in logs if "rewards/margins" in e]
    assert [e["step"] for e in logs] == [1, 2, 3]
    # Step 1: policy == reference, so every implicit reward is 0. Later the policy has moved away
    # from the reference it is measured against: the reference is a separate, frozen model.
    assert logs[0]["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert logs[0]["rewards/rejected"] == pytest.approx(0, abs=1e-6)
    assert abs(logs[-1]["rewards/chosen"]) > 1e-4 and logs[-1]["rewards/margins"] != 0


FSDP_ON_CPU = (
    "error: an FSDP launch needs GPUs: accelerate applies FSDP to GPU processes only, and on CPU processes each "
    "would train alone, unsharded and unsynchronised; on CPU use accelerate_configs/zero3.yaml (DeepSpeed ZeRO-3 "
    "runs there) or a single process"
)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: FSDP applies")
def test_an_fsdp_launch_on_cpu_processes_is_refused(tmp_path, tiny_model_dir, sft_data_dir):
    """Accelerate 1.15 applies an FSDP config to GPU processes only: on 2 CPU processes each rank would train
    alone (unsharded, unsynchronised) and both would write the model. Refused in one line, nothing written."""
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(CONFIGS / "fsdp.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        str(REPO / "posttrain/sft.py"),
        str(REPO / "recipes/demo/sft.yaml"),
        "--model_name_or_path",
        str(tiny_model_dir),
        "--dataset_name",
        str(sft_data_dir),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert {line for line in proc.stderr.splitlines() if line.startswith("error: ")} == {FSDP_ON_CPU}, proc.stderr
    assert not (tmp_path / "out").exists()
