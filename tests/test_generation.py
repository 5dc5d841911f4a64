"""Batched generation: the same replies as one conversation at a time, in the caller's order."""

from __future__ import annotations

import pytest

from posttrain.demo import fixtures
from posttrain.generation.generate import generate_batch, generate_ids, load_model
from posttrain.outputs.errors import PosttrainError


@pytest.fixture(scope="module")
def model_and_tokenizer(memorised_sft):
    return load_model(memorised_sft[1], device="cpu", dtype="float32")


def conversations() -> list[list[dict]]:
    """Prompts of very different lengths (the two-turn one is the longest), so batches are left-padded."""
    rows = fixtures.sft_rows()
    return [row["messages"][:-1] for row in rows]


def test_batched_greedy_replies_equal_one_at_a_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    convs = conversations()
    batched = generate_batch(model, tokenizer, convs, max_new_tokens=16, batch_size=3)
    single = [generate_ids(model, tokenizer, c, max_new_tokens=16, do_sample=False) for c in convs]
    assert [replies[0] for replies in batched] == single
    assert sum(stopped for (_, stopped) in single) >= len(convs) - 1  # the memorised model stops: a real check


def test_sampling_is_seeded_and_gives_each_conversation_its_samples(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    convs = conversations()[:3]
    first = generate_batch(
        model, tokenizer, convs, max_new_tokens=8, batch_size=2, do_sample=True, num_return_sequences=3, seed=5
    )
    again = generate_batch(
        model, tokenizer, convs, max_new_tokens=8, batch_size=2, do_sample=True, num_return_sequences=3, seed=5
    )
    assert first == again and [len(r) for r in first] == [3, 3, 3]
    hot = generate_batch(
        model,
        tokenizer,
        convs,
        max_new_tokens=8,
        batch_size=2,
        do_sample=True,
        temperature=50.0,
        num_return_sequences=3,
        seed=6,
    )
    assert any(len({tuple(ids) for ids, _ in replies}) > 1 for replies in hot)  # samples differ at a high temperature
    for replies in first + hot:
        for ids, stopped in replies:
            assert len(ids) <= 8 and stopped == (
                bool(ids) and ids[-1] in (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id)
            )


def test_a_conversation_longer_than_the_context_is_refused(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    long = [{"role": "user", "content": "bees " * model.config.max_position_embeddings}]
    with pytest.raises(PosttrainError, match="conversation 2 is .* tokens, and the model's context is"):
        generate_batch(model, tokenizer, [conversations()[0], long], max_new_tokens=4)
