"""What a trained directory says about itself: training_info.json (the training system prompt, which chat
defaults to) and the model card README.md, for SFT and DPO on the tiny model; evaluate's scores on the card."""

from __future__ import annotations

import json
import re

import datasets
import helpers
import pytest
import yaml

from posttrain import chat
from posttrain.data.adapters import DEFAULT_SYSTEM_PROMPT
from posttrain.demo import fixtures
from posttrain.training import model_card, recipe

QUESTION = "What do bees make?"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, sft_data_dir, preference_data_dir):
    """A short SFT run from the converted model (evaluated at its end), then DPO from it."""
    tmp = tmp_path_factory.mktemp("cards")
    short = dict(max_steps=3, eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3)
    sft_recipe = helpers.write_recipe("sft", tmp / "sft.yaml", tiny_model_dir, sft_data_dir, tmp / "sft", **short)
    helpers.run_stage("sft", sft_recipe)
    dpo_recipe = helpers.write_recipe(
        "dpo", tmp / "dpo.yaml", tmp / "sft", preference_data_dir, tmp / "dpo", **dict(short, max_steps=2)
    )
    helpers.run_stage("dpo", dpo_recipe)
    return {"sft": tmp / "sft", "dpo": tmp / "dpo", "base": tiny_model_dir}


def test_the_stages_save_the_training_system_prompt(runs, sft_data_dir, preference_data_dir):
    for stage, data, rows in (("sft", sft_data_dir, 7), ("dpo", preference_data_dir, 6)):
        info = json.loads((runs[stage] / model_card.INFO_NAME).read_text())
        assert info["stage"] == stage and info["datasets"] == [str(data)]
        assert info["system_prompt"] == fixtures.SYSTEM_PROMPT
        assert (info["rows_with_it"], info["rows"], info["distinct_system_prompts"]) == (rows, rows, 1)
        assert info["launch"]["num_processes"] == 1
    assert json.loads((runs["dpo"] / model_card.INFO_NAME).read_text())["base_model"] == str(runs["sft"])


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 3, (None, 0)),
        (
            [fixtures.qa_conversation([("q", "a")], "A")] * 2
            + [fixtures.qa_conversation([("q", "a")], "B")] * 3
            + [fixtures.qa_conversation([("q", "a")], None)] * 4,
            ("B", 3),
        ),
        ([fixtures.qa_preference("q", "a", "b", "P")] * 2 + [fixtures.qa_preference("q", "a", "b", None)], ("P", 2)),
        (
            [{"messages": [{"role": "system", "content": [{"type": "text", "text": "Parts."}]}]}],
            ("Parts.", 1),
        ),
    ],
    ids=["no_system", "most_common", "preference", "content_parts"],
)
def test_training_system_prompt_is_the_most_common_system_message(rows, expected):
    found = model_card.training_system_prompt(datasets.Dataset.from_list(rows))
    assert (found["system_prompt"], found["rows_with_it"]) == expected
    assert found["rows"] == len(rows)


def chat_messages(monkeypatch, *argv) -> list[dict]:
    """The messages `python -m posttrain.chat ... --prompt QUESTION` generates from."""
    seen = []
    monkeypatch.setattr(chat, "generate_reply", lambda model, tok, messages, **kw: seen.append(messages) or "ok")
    chat.main([*map(str, argv), "--prompt", QUESTION, "--greedy", "--device", "cpu"])
    return seen[0]


def test_chat_defaults_to_the_system_prompt_the_model_was_trained_with(runs, monkeypatch, tmp_path):
    user = {"role": "user", "content": QUESTION}
    assert chat_messages(monkeypatch, runs["dpo"]) == [{"role": "system", "content": fixtures.SYSTEM_PROMPT}, user]
    assert chat_messages(monkeypatch, runs["dpo"], "--system", "Be brief.") == [
        {"role": "system", "content": "Be brief."},
        user,
    ]
    assert chat_messages(monkeypatch, runs["dpo"], "--system", "") == [user]
    # A converted model has no training_info.json: data_scripts' default, as before.
    assert chat_messages(monkeypatch, runs["base"]) == [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, user]
    # A model trained on rows without a system message: none.
    info = json.loads((runs["dpo"] / model_card.INFO_NAME).read_text())
    no_system = tmp_path / "model"
    no_system.mkdir()
    for f in runs["dpo"].iterdir():
        if f.is_file():
            (no_system / f.name).write_bytes(f.read_bytes())
    model_card.write_training_info(no_system, {**info, "system_prompt": None})
    assert chat_messages(monkeypatch, no_system) == [user]


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_the_model_card_names_the_base_model_data_recipe_and_metrics(runs, stage):
    out = runs[stage]
    card = (out / "README.md").read_text()
    assert "None" not in card, card
    base = {"sft": runs["base"], "dpo": runs["sft"]}[stage]
    info = json.loads((out / model_card.INFO_NAME).read_text())
    settings = yaml.safe_load((out / recipe.RESOLVED_RECIPE_NAME).read_text())
    assert f"`{base}` (a local directory: " in card
    lineage = {
        "sft": "`convert-checkpoint` of `ckpt_000100.pt`",
        "dpo": f"supervised fine-tuning (SFT) of `{runs['base']}`",
    }
    assert lineage[stage] in card
    assert f"`{info['datasets'][0]}`" in card
    assert card.count(f'model="{out}"') == 1 and f"python -m posttrain.chat {out}" in card
    assert f"> {fixtures.SYSTEM_PROMPT}" in card
    assert f"| learning_rate | {settings['learning_rate']:.4g} |" in card
    assert f"| effective batch | {settings['per_device_train_batch_size']} (one process) |" in card
    if stage == "dpo":
        assert f"| beta | {settings['beta']:.4g} |" in card and "| loss_type | sigmoid |" in card
    else:
        assert "| packing | true |" in card
    train = json.loads((out / "train_results.json").read_text())
    assert f"| train_loss | {train['train_loss']:.4g} |" in card
    last_eval = [e for e in helpers.log_history(out) if "eval_loss" in e][-1]
    assert f"| eval_loss | {last_eval['eval_loss']:.4g} |" in card
    assert "Not evaluated yet" in card
    # The front matter is valid YAML with no local path posing as a hub id.
    front = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in front and stage in front["tags"]


def test_evaluate_adds_its_headline_scores_to_the_cards_it_scored(runs, tmp_path):
    before = (runs["base"] / "config.json").read_bytes()
    summary = {
        "models": {
            "base": {"path": str(runs["base"]), "tasks": {}},
            "sft": {
                "path": str(runs["sft"]),
                "tasks": {"arc_easy": {"plain": {"acc": 0.625, "acc_stderr": 0.1, "n": 8}}},
                "generation": {"stop_rate": 1.0},
            },
        }
    }
    report = tmp_path / "eval" / "report.md"
    assert model_card.add_evaluation_to_cards(summary, report) == []
    card = (runs["sft"] / "README.md").read_text()
    assert "None" not in card and "Not evaluated yet" not in card
    assert re.search(r"\| arc_easy \(plain\), acc % \| 62\.5 ± 19\.6 \(n=8\) \|", card), card
    assert "| generation stop_rate | 1 |" in card and f"`{report}`" in card
    assert not (runs["base"] / "README.md").exists()  # not a training output: left alone
    assert (runs["base"] / "config.json").read_bytes() == before
    # Rendered again without an evaluation (as a retrained run's is), the scores are gone.
    model_card.write_model_card(runs["sft"])
    assert "Not evaluated yet" in (runs["sft"] / "README.md").read_text()


def test_the_card_module_uses_the_recipe_file_name():
    assert model_card.RESOLVED_RECIPE_NAME == recipe.RESOLVED_RECIPE_NAME
