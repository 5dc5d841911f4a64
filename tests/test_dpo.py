"""DPO on the tiny converted model: it learns the preferences (reward accuracy and margin
computed here from the saved policy and the reference, not read from TRL's logs), a
precomputed reference equals a live one, resume equals an uninterrupted run, the
reference-free and LoRA variants, every recipe loss type, the sequences TRL builds (system
prompt once, multi-turn prompts), pairs that cannot fit are dropped and counted, and bad
input is one line before training.

One training run (module fixture) serves the learning, output-directory, precompute and
resume tests.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
import torch
import yaml
from helpers import (
    REPO,
    RESUMABLE,
    build_stage_trainer,
    log_history,
    one_error_line,
    parse_production_recipe,
    parse_stage,
    run_stage,
)
from safetensors.torch import load_file

from posttrain.conversion.chat_template import IM_END, IM_START
from posttrain.demo import fixtures
from posttrain.outputs.errors import run_cli
from posttrain.training.recipe import MERGED_DIR, RESOLVED_RECIPE_NAME

DPO_SCRIPT = REPO / "posttrain" / "dpo.py"
BETA = 0.1
MAX_LENGTH = 128  # the demo recipe's
STEPS = 12  # 7 kept pairs, 2 per step: 4 steps per epoch, 3 epochs
DROP_MESSAGE = re.compile(r"dpo: dropped 2 of 9 train pairs that leave no room within max_length=128")


write_recipe = functools.partial(helpers.write_recipe, "dpo")
run_dpo = functools.partial(run_stage, "dpo")
SHORT_RUN = dict(eval_strategy="no", save_strategy="no")  # train and save the final model only


def parse(*argv):
    return parse_stage("dpo", *argv).arguments


def train_logs(out: Path) -> list[dict]:
    return [e for e in log_history(out) if "loss" in e]


# ----------------------------------------------------------------------------- data


def multi_turn_row() -> dict:
    """A second question after an answered first one: the prompt holds an assistant turn."""
    (q1, a1), (q2, a2), r2 = fixtures.QA_PAIRS[0], fixtures.QA_PAIRS[4], fixtures.REJECTED_ANSWERS[4]
    prompt = [
        {"role": "system", "content": fixtures.SYSTEM_PROMPT},
        {"role": "user", "content": q1},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": q2},
    ]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": a2}],
        "rejected": [{"role": "assistant", "content": r2}],
    }


def unfit_rows(tokenizer) -> list[dict]:
    """Two pairs nothing can be learnt from within MAX_LENGTH: a prompt longer than it, and a prompt
    two tokens short of it whose responses share their first words ("The sky is ...")."""
    system = {"role": "system", "content": fixtures.SYSTEM_PROMPT}

    def prompt_len(text):
        return len(
            tokenizer.apply_chat_template(
                [system, {"role": "user", "content": text}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        )

    long_text = "Please answer the question. " * 20
    assert prompt_len(long_text) > MAX_LENGTH
    words = fixtures.QA_PAIRS[1][0]
    while prompt_len(words) < MAX_LENGTH - 2:
        words += " sky"
    assert prompt_len(words) == MAX_LENGTH - 2
    same_start = {
        "chosen": [{"role": "assistant", "content": "The sky is blue."}],
        "rejected": [{"role": "assistant", "content": "The sky is green."}],
    }
    return [
        {"prompt": [system, {"role": "user", "content": long_text}], **same_start},
        {"prompt": [system, {"role": "user", "content": words}], **same_start},
    ]


@pytest.fixture(scope="module")
def pref_dir(tmp_path_factory, tiny_model_dir):
    """The six demo pairs, a multi-turn pair and two that cannot fit (train); two demo pairs (test)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = fixtures.preference_rows() + [multi_turn_row()]
    for row in rows:  # the learnable pairs fit whole: nothing of them is truncated
        for key in ("chosen", "rejected"):
            assert (
                len(tok.apply_chat_template(row["prompt"] + row[key], tokenize=True, return_dict=True)["input_ids"])
                <= MAX_LENGTH
            )
    d = tmp_path_factory.mktemp("dpo_data")
    fixtures.write_jsonl(d / "train.jsonl", rows + unfit_rows(tok))
    fixtures.write_jsonl(d / "test.jsonl", rows[:2])
    return d


def response_logps(model, tokenizer, rows) -> torch.Tensor:
    """[n, 2]: log p(chosen | prompt), log p(rejected | prompt), summed over the response tokens
    (the assistant's text, <|im_end|> and newline), rendered with the chat template here, not by TRL."""
    out = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        pair = []
        for key in ("chosen", "rejected"):
            ids = tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=True, return_dict=True)["input_ids"]
            assert ids[: len(prompt)] == prompt
            x = torch.tensor([ids])
            with torch.no_grad():
                logp = model(x).logits[0, :-1].float().log_softmax(-1).gather(-1, x[0, 1:, None])[:, 0]
            pair.append(logp[len(prompt) - 1 :].sum().item())
        out.append(pair)
    return torch.tensor(out)


# ------------------------------------------------------------------ the main run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, pref_dir):
    """DPO for STEPS steps with a live reference model, checkpoints every 6 steps; its stdout."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("dpo_run")
    out = tmp / "out"
    recipe = write_recipe(
        tmp / "r.yaml", tiny_model_dir, pref_dir, out, max_steps=STEPS, learning_rate=1e-3, save_steps=6, **RESUMABLE
    )
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        run_dpo(recipe)
    return out, recipe, stdout.getvalue()


def test_policy_learns_the_preferences(trained, tiny_model_dir):
    """Reward accuracy >= 0.9 on the training pairs and a positive margin, computed from the saved
    policy and the starting (reference) model; the logged margin grows over training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = trained
    tok = AutoTokenizer.from_pretrained(out)
    rows = fixtures.preference_rows() + [multi_turn_row()]
    policy = response_logps(AutoModelForCausalLM.from_pretrained(out).eval(), tok, rows)
    reference = response_logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tok, rows)
    rewards = BETA * (policy - reference)  # [n, (chosen, rejected)]
    margins = rewards[:, 0] - rewards[:, 1]
    accuracy = (margins > 0).float().mean().item()
    assert accuracy >= 0.9, margins
    assert margins.mean() > 0.3, margins

    logged = [e["rewards/margins"] for e in train_logs(out)]
    assert len(logged) == STEPS and logged[0] == pytest.approx(0.0, abs=1e-6)  # step 1: policy == reference
    assert sum(logged[-3:]) / 3 > sum(logged[1:4]) / 3 > 0
    assert margins.mean() > sum(logged[1:4]) / 3  # at the end, above the early-training margin
    assert min(e["rewards/accuracies"] for e in train_logs(out)[-4:]) == 1.0


def test_output_directory(trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out, _, _ = trained
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "generation_config.json",
        "trainer_state.json",
        RESOLVED_RECIPE_NAME,
    ):
        assert (out / name).is_file(), name
    assert (out / "chat_template.jinja").read_text() == (Path(tiny_model_dir) / "chat_template.jinja").read_text()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == IM_END
    assert tok.convert_tokens_to_ids(IM_END) in GenerationConfig.from_pretrained(out).eos_token_id
    AutoModelForCausalLM.from_pretrained(out)

    history = log_history(out)
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ):
        assert all(math.isfinite(e[key]) for e in train_logs(out)), key
    evals = [e for e in history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [6, 12] and all("eval_rewards/accuracies" in e for e in evals)

    saved = yaml.safe_load((out / RESOLVED_RECIPE_NAME).read_text())
    assert saved["beta"] == BETA and saved["loss_type"] == ["sigmoid"] and saved["reference_free"] is False
    assert saved["max_length"] == MAX_LENGTH and saved["model_name_or_path"] == str(tiny_model_dir)
    reparsed = parse(out / RESOLVED_RECIPE_NAME)[1]  # the saved recipe re-parses to the same run
    assert reparsed.max_steps == STEPS and reparsed.learning_rate == saved["learning_rate"]


def test_unfit_pairs_are_dropped_and_counted(trained):
    _, _, stdout = trained
    assert DROP_MESSAGE.search(stdout), stdout[-3000:]
    # 7 pairs were trained on: 4 steps per epoch at 2 pairs per step.
    assert train_logs(trained[0])[3]["epoch"] == pytest.approx(1.0)


def test_precomputed_reference_equals_live_reference(trained, tmp_path):
    out, recipe, _ = trained
    pre = tmp_path / "pre"
    run_dpo(recipe, "--precompute_ref_log_probs", "true", "--output_dir", pre, "--save_strategy", "no")
    a, b = load_file(out / "model.safetensors"), load_file(pre / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    live, precomputed = train_logs(out), train_logs(pre)
    assert [e["rewards/margins"] for e in precomputed] == pytest.approx([e["rewards/margins"] for e in live], abs=1e-5)


def test_resume_equals_uninterrupted(trained, tmp_path):
    out, recipe, _ = trained
    # A run stopped after step 6 leaves exactly checkpoint-6 on disk; resume it for the other 6 steps.
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-6", resumed / "checkpoint-6")
    run_dpo(recipe, "--output_dir", resumed, "--resume_from_checkpoint", "true")
    a, b = load_file(out / "model.safetensors"), load_file(resumed / "model.safetensors")
    half = load_file(resumed / "checkpoint-6" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(a[n], half[n]) for n in a)  # the resumed run did train
    assert [e["step"] for e in train_logs(resumed)] == list(range(1, STEPS + 1))


# ------------------------------------------------------------------ DPO variants


def test_reference_free_trains_and_saves(tmp_path, tiny_model_dir, pref_dir):
    out = tmp_path / "out"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model_dir,
        pref_dir,
        out,
        max_steps=4,
        **SHORT_RUN,
        reference_free=True,
    )
    run_dpo(recipe)
    assert (out / "model.safetensors").is_file() and (out / RESOLVED_RECIPE_NAME).is_file()
    logs = train_logs(out)
    assert len(logs) == 4
    # The reference log-probs are 0: each reward is beta * the policy's own log-prob (never so with a reference).
    for e in logs:
        assert e["rewards/chosen"] == pytest.approx(BETA * e["logps/chosen"], rel=1e-5)
        assert e["rewards/rejected"] == pytest.approx(BETA * e["logps/rejected"], rel=1e-5)
    assert logs[0]["rewards/chosen"] < -1  # ~ beta * -50 at the start, where a reference would give 0


def test_lora_reference_is_the_base_and_run_saves(tmp_path, tiny_model_dir, pref_dir):
    from accelerate.utils import is_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    lora = dict(
        use_peft=True,
        lora_r=8,
        lora_alpha=16,
        lora_target_modules=["q_proj", "v_proj"],
        merge_lora_after_training=True,
    )
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model_dir,
        pref_dir,
        out,
        max_steps=4,
        **SHORT_RUN,
        learning_rate=1e-2,
        **lora,
    )

    # With use_peft, TRL keeps no reference model: the reference is the policy with the adapter disabled.
    trainer = build_stage_trainer("dpo", recipe)
    assert trainer.ref_model is None and is_peft_model(trainer.model)
    del trainer

    run_dpo(recipe)
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    lora_b = [v for k, v in load_file(out / "adapter_model.safetensors").items() if "lora_B" in k]
    assert len(lora_b) == 4 and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it trained
    assert (out / RESOLVED_RECIPE_NAME).is_file() and (out / "generation_config.json").is_file()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / MERGED_DIR)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    assert not torch.allclose(merged, base, atol=1e-4)


# The loss of step 1, where the policy still equals the reference (every log-ratio is 0).
LOSS_AT_START = {
    "sigmoid": math.log(2),  # -log sigmoid(0)
    "ipo": (1 / (2 * BETA)) ** 2,  # (0 - 1/(2 beta))^2
    "hinge": 1.0,  # relu(1 - 0)
    "robust": math.log(2),  # ((1-e) log 2 - e log 2) / (1 - 2e)
    "apo_zero": 1.0,  # (1 - sigmoid(0)) + sigmoid(0)
}


@pytest.mark.parametrize(
    "loss_type, extra",
    [
        ("ipo", {}),
        ("hinge", {}),
        ("robust", {"label_smoothing": 0.1}),
        ("apo_zero", {}),
        (["sigmoid", "sft"], {"loss_weights": [1.0, 0.5]}),  # RPO
    ],
    ids=["ipo", "hinge", "robust", "apo_zero", "rpo"],
)
def test_loss_types_from_the_recipe(tmp_path, tiny_model_dir, pref_dir, loss_type, extra):
    out = tmp_path / "out"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model_dir,
        pref_dir,
        out,
        max_steps=2,
        **SHORT_RUN,
        loss_type=loss_type,
        **extra,
    )
    run_dpo(recipe)
    logs = train_logs(out)
    assert len(logs) == 2 and all(math.isfinite(e["loss"]) for e in logs)
    first = logs[0]["loss"]
    if isinstance(loss_type, str):
        assert first == pytest.approx(LOSS_AT_START[loss_type], rel=1e-4)
    else:  # log 2 plus half the chosen responses' token-mean NLL (~log 400 for the near-random model)
        assert math.log(2) + 0.5 * 3 < first < math.log(2) + 0.5 * 8
    assert yaml.safe_load((out / RESOLVED_RECIPE_NAME).read_text())["loss_type"] == (
        [loss_type] if isinstance(loss_type, str) else loss_type
    )


# ------------------------------------------------------- the sequences TRL builds


def test_sequences_system_prompt_once_and_drop_count(tmp_path, tiny_model_dir, pref_dir, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, pref_dir, tmp_path / "out", eval_strategy="no")
    trainer = build_stage_trainer("dpo", recipe)
    tok = trainer.processing_class
    assert DROP_MESSAGE.search(capsys.readouterr().out)

    rows = fixtures.preference_rows() + [multi_turn_row()]
    ds = trainer.train_dataset
    assert len(ds) == len(rows)  # the two unfit pairs are gone, nothing else
    for row, example in zip(rows, ds):
        prompt = tok.decode(example["prompt_ids"])
        assert prompt == tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        for key in ("chosen", "rejected"):
            full = tok.decode(example["prompt_ids"] + example[f"{key}_ids"])
            assert full.count(f"{IM_START}system\n") == 1 and full.startswith(
                f"{IM_START}system\n{fixtures.SYSTEM_PROMPT}{IM_END}"
            )
            # The response is the assistant text and its end-of-turn: what DPO scores.
            assert tok.decode(example[f"{key}_ids"]) == row[key][0]["content"] + IM_END + "\n"
    multi = tok.decode(ds[len(rows) - 1]["prompt_ids"])
    assert (
        multi.count(f"{IM_START}user\n") == 2 and multi.count(f"{IM_START}assistant\n") == 2
    )  # earlier answer + generation prompt

    # The collated batch: chosen rows then rejected rows, the loss mask exactly on the responses.
    batch = trainer.data_collator([ds[0], ds[1]])
    assert batch["input_ids"].shape[0] == 4
    for i, (example, key) in enumerate(
        [(ds[0], "chosen"), (ds[1], "chosen"), (ds[0], "rejected"), (ds[1], "rejected")]
    ):
        mask = batch["completion_mask"][i].bool()
        assert batch["input_ids"][i][mask].tolist() == example[f"{key}_ids"]


# ------------------------------------------------------------------- bad input


def test_prompt_and_response_ids_on_the_qwen3_vocabulary(tmp_path, qwen3_model_dir, preference_data_dir):
    """Real ids: the prompt is system and user turns and the generation header <|im_start|>assistant\\n
    (151644 77091 198); each response is the answer's ids, <|im_end|> (151645) and its newline (198)."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", qwen3_model_dir, preference_data_dir, out, eval_strategy="no")
    trainer = build_stage_trainer("dpo", recipe)
    tok = trainer.processing_class

    def text_ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    rows = fixtures.preference_rows()
    assert len(trainer.train_dataset) == len(rows)
    for row, example in zip(rows, trainer.train_dataset):
        system, user = (m["content"] for m in row["prompt"])
        turns = [[151644, 8948, 198, *text_ids(system), 151645, 198], [151644, 872, 198, *text_ids(user), 151645, 198]]
        assert example["prompt_ids"] == turns[0] + turns[1] + [151644, 77091, 198]
        for key in ("chosen", "rejected"):
            assert example[f"{key}_ids"] == text_ids(row[key][0]["content"]) + [151645, 198]


def test_bad_input_is_one_line_before_training(tmp_path, tiny_model_dir, pref_dir, capsys):

    # A misspelt loss type, through the real command line: exit 2, one line, nothing written.
    out = tmp_path / "out_loss"
    recipe = write_recipe(tmp_path / "loss.yaml", tiny_model_dir, pref_dir, out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(DPO_SCRIPT), str(recipe), "--loss_type", "sigmod"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    error = one_error_line(proc.stderr)
    assert proc.stderr.rstrip().endswith(error)
    assert "loss_type sigmod: not one of sigmoid" in error
    assert not out.exists()

    # Rows or settings the trainer cannot use, in-process through the same CLI wrapper.
    good = fixtures.preference_rows()[:2]
    hi = [{"role": "user", "content": "Hi"}]
    cases = {
        "no_rejected": (
            good + [{"prompt": hi, "chosen": [{"role": "assistant", "content": "Hello."}]}],
            {},
            r"row 3 rejected: expected a non-empty list of messages",
        ),
        "user_chosen": (
            good
            + [
                {
                    "prompt": hi,
                    "chosen": [{"role": "user", "content": "x"}],
                    "rejected": [{"role": "assistant", "content": "y"}],
                }
            ],
            {},
            r"row 3 chosen: the last message must be the assistant's",
        ),
        "robust_smoothing": (
            good,
            {"loss_type": "robust", "label_smoothing": 0.5},
            r"loss_type robust needs 0 <= label_smoothing < 0.5 \(got 0.5\)",
        ),
        "nothing_fits": (good, {"max_length": 10}, r"no train pair fits in max_length=10; raise max_length"),
    }
    for name, (rows, extra, message) in cases.items():
        data = tmp_path / name
        fixtures.write_jsonl(data / "train.jsonl", rows)
        recipe = write_recipe(
            tmp_path / f"{name}.yaml", tiny_model_dir, data, tmp_path / f"out_{name}", eval_strategy="no", **extra
        )
        with pytest.raises(SystemExit) as exc:
            run_cli(lambda recipe=recipe: run_stage("dpo", recipe))
        err = capsys.readouterr().err
        assert exc.value.code == 2 and re.search(message, one_error_line(err)), err
        assert not (tmp_path / f"out_{name}").exists()


# ------------------------------------------------------------------- recipes


def test_production_recipe():
    script_args, args, model_args, _ = parse_production_recipe("dpo")
    gpus = 8
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * gpus == 128
    assert args.beta == 0.1 and args.loss_type == ["sigmoid"] and not args.reference_free
    assert args.learning_rate == 5e-7 and args.lr_scheduler_type.value == "cosine_with_min_lr"
    assert args.lr_scheduler_kwargs == {"min_lr_rate": 0.2}  # 1e-7; min_lr would crash under DeepSpeed
    assert 0 < args.warmup_steps < 1 and args.num_train_epochs == 1 and args.max_steps == -1
    assert args.bf16 and args.activation_checkpointing and args.max_length == 2048
    assert args.eval_strategy.value == "steps" and script_args.dataset_test_split == "test"
    assert args.save_steps > 0 and args.report_to == ["tensorboard"]
    assert model_args.attn_implementation in ("sdpa", "flash_attention_2")
    assert args.padding_free and args.train_sampling_strategy == "random"  # no padding: nothing to group


# ------------------------------------------------------------ ZeRO-3, 2 processes


@pytest.mark.slow
def test_precompute_under_zero3_on_two_processes(tmp_path, tiny_model_dir, pref_dir):
    """precompute_ref_log_probs under ZeRO-3 on 2 CPU processes: DeepSpeed's batch-size check failed until
    recipe.launch_defaults named the gloo backend, so that Accelerate counts both processes."""
    config = tmp_path / "zero3_cpu.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "compute_environment": "LOCAL_MACHINE",
                "distributed_type": "DEEPSPEED",
                "mixed_precision": "no",
                "num_machines": 1,
                "num_processes": 2,
                "deepspeed_config": {"zero_stage": 3, "zero3_init_flag": True, "zero3_save_16bit_model": True},
            }
        )
    )
    out = tmp_path / "out"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model_dir,
        pref_dir,
        out,
        max_steps=4,
        save_strategy="no",
        eval_steps=4,
        precompute_ref_log_probs=True,
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(config),
        str(DPO_SCRIPT),
        str(recipe),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    resolved_text = (out / RESOLVED_RECIPE_NAME).read_text()
    # gloo was this CPU launch's default, not the recipe's: left out so a GPU rerun uses NCCL.
    assert yaml.safe_load(resolved_text)["ddp_backend"] is None
    assert "# launched with num_processes: 2\n" in resolved_text and "# launched with zero_stage: 3\n" in resolved_text
    logs = train_logs(out)
    # 7 pairs over 2 processes x 2 per step: 2 steps per epoch (one process alone would need 4).
    assert len(logs) == 4 and logs[1]["epoch"] == pytest.approx(1.0)
    assert all(math.isfinite(e["loss"]) for e in logs)
    before = {k: v for f in Path(tiny_model_dir).glob("*.safetensors") for k, v in load_file(f).items()}
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and all(
        after[k].shape == before[k].shape for k in before
    )  # gathered, not empty ZeRO-3 shards
