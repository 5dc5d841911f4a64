"""Length-grouped DPO micro-batches: the pair length, and a run with `train_sampling_strategy:
group_by_length` whose sampler really groups by the column (seeded, a permutation of every
pair) and which trains and saves."""

from __future__ import annotations

import contextlib
import io
import math

import torch
import yaml
from helpers import log_history, run_stage, write_recipe
from safetensors.torch import load_file

from posttrain import dpo
from posttrain.demo import fixtures
from posttrain.training.dpo_batching import pair_length
from posttrain.training.recipe import RESOLVED_RECIPE_NAME


def test_pair_length_is_prompt_plus_the_longer_response_cut_at_max_length():
    assert pair_length([1] * 10, [2] * 5, [3] * 7, max_length=None) == 17
    assert pair_length([1] * 10, [2] * 9, [3] * 2, max_length=128) == 19
    assert pair_length([1] * 10, [2] * 9, [3] * 2, max_length=15) == 15


def expected_lengths(tokenizer, rows, max_length) -> list[int]:
    """prompt (with the generation header) + the longer response, from the chat template, not from TRL."""

    def n(messages, **kw):
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])

    return [
        min(max(n(r["prompt"] + r["chosen"]), n(r["prompt"] + r["rejected"])), max_length)
        for r in rows
        if n(r["prompt"], add_generation_prompt=True) < max_length
    ]


def test_length_grouped_run_trains_and_saves(tmp_path, tiny_model_dir, preference_data_dir, monkeypatch):
    from transformers import AutoTokenizer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    samplers = []
    original = dpo.PreferenceTrainer._get_train_sampler

    def record(self, *args, **kwargs):
        samplers.append(original(self, *args, **kwargs))
        return samplers[-1]

    monkeypatch.setattr(dpo.PreferenceTrainer, "_get_train_sampler", record)
    out = tmp_path / "out"
    recipe = write_recipe(
        "dpo",
        tmp_path / "r.yaml",
        tiny_model_dir,
        preference_data_dir,
        out,
        max_steps=4,
        save_strategy="no",
        eval_strategy="steps",
        eval_steps=2,
        train_sampling_strategy="group_by_length",
    )
    with contextlib.redirect_stdout(io.StringIO()):
        run_stage("dpo", recipe)

    (sampler,) = samplers
    assert isinstance(sampler, LengthGroupedSampler) and sampler.generator is not None
    rows = fixtures.preference_rows()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert sorted(sampler.lengths) == sorted(expected_lengths(tok, rows, max_length=128))
    assert len(set(sampler.lengths)) > 1  # the fixture pairs differ in length: grouping has something to sort
    assert sorted(iter(sampler)) == list(range(len(rows)))  # each epoch: every pair once

    assert (out / "model.safetensors").is_file() and (out / RESOLVED_RECIPE_NAME).is_file()
    resolved = yaml.safe_load((out / RESOLVED_RECIPE_NAME).read_text())
    assert resolved["train_sampling_strategy"] == "group_by_length"
    trained, start = load_file(out / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(trained[k], start[k]) for k in trained)
    history = log_history(out)
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert any("eval_loss" in e for e in history)  # the length-grouped eval sampler ran too
