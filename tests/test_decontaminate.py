"""The n-gram matcher that finds evaluation items in training text."""

from __future__ import annotations

import json

import pytest

from posttrain.data.decontaminate import Matcher, evaluation_texts, words
from posttrain.outputs.errors import PosttrainError

GSM8K_QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)
ARC_QUESTION = "Which gas do plants absorb from the air?"  # 8 words: shorter than 13


def test_words_ignore_case_punctuation_and_spacing():
    assert words("Hello,  WORLD!\nIt's 4 o'clock.") == ["hello", "world", "it", "s", "4", "o", "clock"]


def test_a_question_inside_other_text_is_found_and_a_shorter_shared_run_is_not():
    matcher = Matcher([ARC_QUESTION, GSM8K_QUESTION], n=13)
    inside = f"Please solve this for me.\n\n{GSM8K_QUESTION.upper()}  Show your work."
    assert matcher.find(inside) == 1
    # twelve words in a row of the question, then something else: under the 13-word threshold
    twelve = " ".join(words(GSM8K_QUESTION)[:12])
    assert matcher.find(f"{twelve} pencils to her classmates") is None
    thirteen = " ".join(words(GSM8K_QUESTION)[5:18])
    assert matcher.find(f"Story: {thirteen}.") == 1


def test_items_shorter_than_n_match_only_verbatim():
    matcher = Matcher([ARC_QUESTION], n=13)
    assert matcher.find(f"Quiz time! {ARC_QUESTION} Answer: carbon dioxide.") == 0
    assert matcher.find("Which gas do plants take in from the air?") is None  # not all its words in sequence
    assert matcher.find("Which gas do plants absorb from the water?") is None


def test_the_first_item_wins_and_n_is_checked():
    matcher = Matcher(["alpha beta gamma delta", "beta gamma delta epsilon"], n=4)
    assert matcher.find("x beta gamma delta epsilon alpha beta gamma delta y") == 0
    assert matcher.find("gamma delta epsilon") is None
    with pytest.raises(PosttrainError, match="n >= 4"):
        Matcher([], n=3)


@pytest.mark.parametrize(
    "row, text",
    [
        ({"id": "Mercury_1", "question": ARC_QUESTION, "choices": {}, "answerKey": "A"}, ARC_QUESTION),  # ARC
        ({"id": "7-980", "question_stem": "The sun is a star", "choices": {}}, "The sun is a star"),  # OpenBookQA
        ({"question": GSM8K_QUESTION, "answer": "#### 72"}, GSM8K_QUESTION),  # GSM8K
        ({"key": 1000, "prompt": "Write a haiku.", "instruction_id_list": []}, "Write a haiku."),  # IFEval
    ],
)
def test_evaluation_texts_read_each_schema(tmp_path, row, text):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assert evaluation_texts(path) == [text]


def test_an_evaluation_file_without_a_question_field_is_one_line(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"text": "no question here"}) + "\n")
    with pytest.raises(PosttrainError, match=r"eval.jsonl: no row has a question field"):
        evaluation_texts(path)
    with pytest.raises(PosttrainError, match="not found"):
        evaluation_texts(tmp_path / "missing.jsonl")
