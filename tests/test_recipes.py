"""The production recipes' stated figures (conversations or pairs per update, updates per epoch,
updates in all, warmup) equal what their batch keys, the launch config's process count and the
measured data statistics give (benchmarks/recipe_figures.py), so a recipe cannot change without
its comments."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import REPO


@pytest.fixture()
def figures(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import recipe_figures

    return recipe_figures


@pytest.mark.parametrize("stage", ["sft", "dpo", "reward", "generate_pairs", "dpo_on_policy", "evaluate"])
def test_stated_figures_match_the_recipe(figures, stage):
    stated, computed = figures.stated_figures(figures.RECIPES[stage]), figures.computed_figures(stage)
    assert stated == computed and stated


def test_sampling_arithmetic_by_hand(figures, monkeypatch):
    """4 prompts x 2 samples, 2 prompts per generate call: each call decodes its longest reply x 4 sequences."""
    import common

    real_draw = common.reply_lengths
    monkeypatch.setattr(common, "reply_lengths", lambda n, cap, seed=0: [10, 50, 20, 20, 5, 5, 5, 90][:n])
    recipe = dict(num_prompts=4, num_samples=2, generation_batch_size=2, max_new_tokens=64)
    computed = figures.sampling_figures(recipe, gpus=1)
    assert computed["samples"] == 8 and computed["sampled tokens"] == 205
    assert computed["decoded slots"] == 50 * 4 + 90 * 4
    assert max(real_draw(1000, 64)) == 64  # a real draw is cut at max_new_tokens


def test_evaluation_arithmetic_by_hand(figures):
    """2 models, 2 GPUs: IFEval's 541 items are 271 per GPU, 5 calls of 64 x 100 tokens (max_gen_toks), per
    model and mode; health: 10 prompts are 5 per GPU, one call of 8 x 32 tokens per model."""
    recipe = dict(models=["a", "b"], tasks=["ifeval", "arc_easy"], max_gen_toks=100, num_prompts=10, max_new_tokens=32)
    computed = figures.evaluation_figures(recipe, gpus=2, step_s=0.06)
    assert computed["generation items per model"] == 541
    assert computed["decoding steps per gpu"] == 5 * 100 * 2 * 2 + 1 * 32 * 2 == 2_064
    assert computed["generation minutes"] == round(2_064 * 0.06 / 60) == 2
    assert computed["judge forwards"] == 1 * 10 * 2  # one pair of models, both orders


def test_the_evaluation_recipe_parses_and_names_registered_tasks():
    """recipes/evaluate.yaml's keys are EvalArguments fields and every task is one the harness knows, the
    generation tasks that post-training is judged by among them."""
    from posttrain.evaluate import EvalArguments
    from posttrain.evaluation import harness
    from posttrain.training.recipe import parse_recipe

    (args,), _ = parse_recipe([EvalArguments], [str(REPO / "recipes" / "evaluate.yaml")])
    assert {"ifeval", "gsm8k"} <= set(args.tasks) and args.num_fewshot is None and args.max_gen_toks is None
    index = harness.task_manager(tuple(args.tasks)).task_index
    assert [task for task in args.tasks if task not in index] == []


def test_sft_updates_are_about_128_conversations(figures):
    """The Alpaca / Tulu / old-system batch: ~128 examples per update, ~1,000 updates over 3 epochs."""
    computed = figures.computed_figures("sft")
    assert 120 <= computed["conversations per update"] <= 160
    assert computed["updates in all"] >= 900


def test_a_changed_recipe_no_longer_matches_its_comments(figures, tmp_path):
    recipe = yaml.safe_load(figures.RECIPES["sft"].read_text())
    recipe["gradient_accumulation_steps"] = 16  # the 128-row batch
    changed = tmp_path / "sft.yaml"
    changed.write_text(figures.RECIPES["sft"].read_text().split("\n# --- model")[0] + "\n" + yaml.safe_dump(recipe))
    stated, computed = figures.stated_figures(changed), figures.computed_figures("sft", changed)
    assert stated["updates per epoch"] == 341 and computed["updates per epoch"] == 22  # ceil(341 / 16)
    assert computed["conversations per update"] == round(128 * 50962 / 2725)
    assert stated != computed


def test_arithmetic_by_hand(figures, tmp_path):
    """100 packed rows of 10 conversations, 1 row per GPU x 2 accumulation x 8 GPUs, 2 epochs."""
    stats = tmp_path / "stats.json"
    stats.write_text(
        json.dumps({"real_tokens_per_epoch": 190_000, "packing": {"packed_rows": 100, "conversations_per_row": 10}})
    )
    recipe = tmp_path / "r.yaml"
    keys = dict(per_device_train_batch_size=1, gradient_accumulation_steps=2, num_train_epochs=2, warmup_steps=0.1)
    recipe.write_text(yaml.safe_dump(keys))
    assert figures.computed_figures("sft", recipe, stats) == {
        "conversations per update": 160,  # 16 rows x 10
        "real tokens per update": 30_400,  # 1,900 per row x 16
        "updates per epoch": 7,  # 13 micro-batches per process (ceil(100 / 8)), 2 per update, the last alone
        "updates in all": 14,
        "warmup updates": 2,  # ceil(1.4)
    }
    assert figures.warmup_updates(5, 14) == 5  # >= 1: a count, not a fraction
