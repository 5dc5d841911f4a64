"""posttrain/reward.py on the tiny model: it learns a preference it can learn (a marker in the chosen replies) and
ranks held-out pairs it never saw, checked here with a forward of the saved model; TRL's held-out accuracy and
margin are logged at every evaluation; the output loads as a one-score sequence classifier with its chat template;
pairs too long are dropped and counted; bad input is one line before anything changes."""

from __future__ import annotations

import functools

import helpers
import pytest
import torch
from helpers import REPO, log_history, parse_production_recipe, parse_stage, run_stage, tree_hashes

from posttrain.conversion.chat_template import CHATML_TEMPLATE
from posttrain.demo import fixtures
from posttrain.outputs.errors import run_cli
from posttrain.training.recipe import RESOLVED_RECIPE_NAME

write_recipe = functools.partial(helpers.write_recipe, "reward")


def scores(out, rows) -> torch.Tensor:
    """[n, 2]: the saved model's score of prompt + chosen and of prompt + rejected, one conversation per forward."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    result = []
    for row in rows:
        pair = []
        for key in ("chosen", "rejected"):
            ids = tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=True, return_dict=True)["input_ids"]
            with torch.no_grad():
                pair.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
        result.append(pair)
    return torch.tensor(result)


def test_learns_the_marker_and_ranks_held_out_pairs(marker_reward):
    _, out, held_out = marker_reward
    pair_scores = scores(out, held_out)
    margins = pair_scores[:, 0] - pair_scores[:, 1]
    assert (margins > 1.0).all(), pair_scores  # new questions and replies: only the marker is known
    evaluations = [e for e in log_history(out) if "eval_accuracy" in e]
    assert [e["step"] for e in evaluations] == [6, 12, 18, 24]  # accuracy and margin at every evaluation
    assert all("eval_margin" in e for e in evaluations)
    assert evaluations[-1]["eval_accuracy"] == 1.0
    # TRL's logged margin is the saved model's mean margin on the held-out pairs
    assert evaluations[-1]["eval_margin"] == pytest.approx(margins.mean().item(), abs=1e-3)
    # and it was learnt: the first evaluation's margin is well below the last
    assert evaluations[0]["eval_margin"] < evaluations[-1]["eval_margin"] - 1.0


def test_output_is_a_one_score_classifier_with_the_chat_template(marker_reward):
    from transformers import AutoConfig, AutoTokenizer

    recipe, out, _ = marker_reward
    config = AutoConfig.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert config.architectures == ["LlamaForSequenceClassification"] and config.num_labels == 1
    assert config.pad_token_id == tokenizer.pad_token_id is not None  # the model finds each row's last token by it
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert not (out / "generation_config.json").exists()  # a classifier does not generate
    assert (out / RESOLVED_RECIPE_NAME).is_file() and (out / "trainer_state.json").is_file()
    rerun = parse_stage("reward", out / RESOLVED_RECIPE_NAME)  # the saved recipe reruns the run
    assert rerun.training_args.learning_rate == parse_stage("reward", recipe).training_args.learning_rate


def test_pairs_longer_than_max_length_are_dropped_and_counted(tmp_path, memorised_sft, capsys):
    import datasets
    from transformers import AutoTokenizer

    from posttrain.reward import RewardModelTrainer
    from posttrain.training.trainers import build_trainer

    rows = fixtures.preference_rows()
    rows[0]["chosen"][0]["content"] = "Paris. " * 40  # ~80 tokens more than the others
    recipe = parse_stage(
        "reward",
        write_recipe(
            tmp_path / "r.yaml", memorised_sft[1], "data", tmp_path / "out", max_length=64, eval_strategy="no"
        ),
    )
    tokenizer = AutoTokenizer.from_pretrained(memorised_sft[1])
    trainer = build_trainer(RewardModelTrainer, recipe, tokenizer, datasets.Dataset.from_list(rows))
    assert len(trainer.train_dataset) == 5
    line = "reward: dropped 1 of 6 train pairs whose chosen or rejected conversation is longer than max_length=64"
    assert line in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--health_prompts", "2"], "health_prompts: a reward model does not generate replies"),
        (["--use_peft", "true"], "use_peft: the reward model is trained in full here"),
        (["--dataset_name", "SFT_DATA"], "preference data needs columns prompt, chosen, rejected"),
        (["--model_name_or_path", "MISSING"], "cannot find this local path"),
    ],
)
def test_bad_input_is_one_line_and_leaves_a_finished_run_as_it_was(
    tmp_path, marker_reward, sft_data_dir, flags, message, capsys
):
    recipe, finished, _ = marker_reward
    before = tree_hashes(finished)
    flags = [{"SFT_DATA": str(sft_data_dir), "MISSING": str(tmp_path / "missing")}.get(f, f) for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: run_stage("reward", recipe, "--overwrite_output_dir", "true", *flags))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in helpers.one_error_line(err) and "Traceback" not in err
    assert tree_hashes(finished) == before


def test_production_recipe():
    script_args, training_args, model_args, _ = parse_production_recipe("reward")
    assert model_args.model_name_or_path == "runs/sft" and script_args.dataset_name == "data/dpo_ultrafeedback"
    assert training_args.max_length == 2048 and training_args.bf16 and training_args.center_rewards_coefficient == 0.01
    assert (REPO / "recipes" / "demo" / "reward.yaml").is_file()
