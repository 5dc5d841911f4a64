"""Data in the shapes real datasets have, read alike by data_scripts and by training: content as a list of
parts, numbers and null as content, TRL's standard string forms, a system message mid-conversation."""

from __future__ import annotations

import json

import pytest
from test_data_scripts import DPO_SCRIPT, SFT_SCRIPT, dropped, pair, run, sft

from posttrain.data.adapters import DEFAULT_SYSTEM_PROMPT as SYS
from posttrain.data.loading import load_source, validate_preference_rows, validate_sft_rows
from posttrain.data.prompts import prompt_of
from posttrain.demo.fixtures import write_jsonl
from posttrain.outputs.errors import PosttrainError


def text(t: str) -> dict:
    return {"type": "text", "text": t}


IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


def msg(role: str, content) -> dict:
    return {"role": role, "content": content}


PARTS_ROWS = [
    # the OpenAI form: a string system message, the user's turn in parts (two texts and an image)
    {
        "messages": [
            msg("system", "Be brief."),
            msg("user", [text("What is "), IMAGE, text("2+2?")]),
            msg("assistant", "4"),
        ]
    },
    # the Hugging Face form: every content in parts
    {"messages": [msg("user", [text("Hi")]), msg("assistant", [text("Hello"), text(" there.")])]},
]


def test_content_parts_are_joined_and_non_text_parts_counted(tmp_path):
    out, meta = run(SFT_SCRIPT, tmp_path, "messages", PARTS_ROWS)
    expected = [sft("What is 2+2?", "4", system="Be brief."), sft("Hi", "Hello there.")]
    assert sorted(map(json.dumps, out)) == sorted(map(json.dumps, expected))
    assert dropped(meta) == {}
    assert meta["dropped_parts"] == {"non_text_content_part": 1}
    assert meta["counts"]["train"] == 2


def test_content_parts_train_alike(tmp_path, capsys):
    data = write_jsonl(tmp_path / "parts.jsonl", PARTS_ROWS)
    dataset = validate_sft_rows(load_source(str(data), split="train"), str(data))
    assert dataset["messages"] == [
        sft("What is 2+2?", "4", system="Be brief.")["messages"],
        sft("Hi", "Hello there.", system=None)["messages"],
    ]
    assert "left out 1 non-text content parts" in capsys.readouterr().out


@pytest.mark.parametrize(
    "rows, reason",
    [
        ([{"messages": [msg("user", "Hi"), msg("assistant", 42)]}], "content_not_text"),
        ([{"messages": [msg("user", 7), msg("assistant", "Seven.")]}], "content_not_text"),
        ([{"messages": [msg("user", "Hi"), msg("assistant", True)]}], "content_not_text"),
        ([{"messages": [msg("user", "Hi"), msg("assistant", {"text": "x"})]}], "content_not_text"),
        ([{"messages": [msg("user", "Hi"), msg("assistant", None)]}], "empty_or_missing_field"),
        ([{"messages": [msg("user", None), msg("assistant", "Yes.")]}], "empty_or_missing_field"),
        ([{"messages": [msg("user", [IMAGE]), msg("assistant", "A cat.")]}], "only_non_text_content"),
        ([{"messages": [msg("user", [text("Hi"), "loose string"]), msg("assistant", "Yes.")]}], "content_not_text"),
    ],
    ids=[
        "number_answer",
        "number_question",
        "bool",
        "object",
        "null_answer",
        "null_question",
        "image_only",
        "bad_part",
    ],
)
def test_numbers_null_and_non_text_content_have_their_own_reasons(tmp_path, rows, reason):
    good = sft("Fine?", "Fine.")
    out, meta = run(SFT_SCRIPT, tmp_path, "messages", [*rows, good])
    assert out == [good]
    assert dropped(meta) == {reason: 1}
    # training refuses the same row in one line naming the row and what is wrong
    data = write_jsonl(tmp_path / "train.jsonl", [good, *rows])
    with pytest.raises(PosttrainError, match=r"row 2 messages: .*got \{'role'"):
        validate_sft_rows(load_source(str(data), split="train"), str(data))


def test_trl_string_preference_form(tmp_path):
    rows = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": "Capital of Italy?", "chosen": "Rome.", "rejected": "Milan."},
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "yes. "},
    ]
    out, meta = run(DPO_SCRIPT, tmp_path, "preference", rows)
    assert sorted(map(json.dumps, out)) == sorted(
        map(json.dumps, [pair(["What is 2+2?"], "4", "5"), pair(["Capital of Italy?"], "Rome.", "Milan.")])
    )
    assert dropped(meta) == {"chosen_equals_rejected": 1}
    # training: a string prompt is one user turn (no system prompt added), chosen / rejected one assistant turn
    data = write_jsonl(tmp_path / "strings.jsonl", rows[:2])
    dataset = validate_preference_rows(load_source(str(data), split="train"), str(data))
    assert dataset[0] == pair(["What is 2+2?"], "4", "5", system=None)


def test_trl_implicit_prompt_preference_form(tmp_path):
    chosen = [msg("user", "Hi"), msg("assistant", "Hello!")]
    rows = [{"chosen": chosen, "rejected": [msg("user", "Hi"), msg("assistant", "Go away.")]}]
    out, _ = run(DPO_SCRIPT, tmp_path, "preference", rows)
    assert out == [pair(["Hi"], "Hello!", "Go away.")]


def test_trl_prompt_completion_form(tmp_path):
    rows = [
        {"prompt": "What is 2+2?", "completion": "4"},
        {"prompt": [msg("user", "Hi")], "completion": [msg("assistant", [text("Hello")])]},
        {"prompt": "No answer", "completion": None},
    ]
    out, meta = run(SFT_SCRIPT, tmp_path, "prompt_completion", rows)
    assert sorted(map(json.dumps, out)) == sorted(map(json.dumps, [sft("What is 2+2?", "4"), sft("Hi", "Hello")]))
    assert dropped(meta) == {"empty_or_missing_field": 1}
    data = write_jsonl(tmp_path / "pc.jsonl", rows[:1])
    dataset = validate_sft_rows(load_source(str(data), split="train"), str(data))
    assert dataset.column_names == ["messages"]
    assert dataset[0] == sft("What is 2+2?", "4", system=None)


def test_a_system_message_mid_conversation_stays_where_it_is(tmp_path):
    row = {
        "messages": [
            msg("user", "Hi"),
            msg("assistant", "Hello."),
            msg("system", "From now on, answer in French."),
            msg("user", "Thanks"),
            msg("assistant", "Merci."),
        ]
    }
    out, _ = run(SFT_SCRIPT, tmp_path, "messages", [row])
    assert out == [row]  # no default system prompt before it
    prompt = {
        "prompt": row["messages"][:4],
        "chosen": [msg("assistant", "Merci.")],
        "rejected": [msg("assistant", "Non.")],
    }
    out, _ = run(DPO_SCRIPT, tmp_path, "preference", [prompt], out="dpo")
    assert out == [prompt]
    assert prompt_of(row, SYS)["messages"] == row["messages"][:4]  # generation and evaluation prompts alike
    assert prompt_of({"messages": row["messages"][:2]}, SYS)["messages"][0] == msg("system", SYS)


def test_prompts_read_content_parts_and_string_prompts():
    assert prompt_of({"messages": PARTS_ROWS[0]["messages"]})["messages"] == [
        msg("system", "Be brief."),
        msg("user", "What is 2+2?"),
    ]
    assert prompt_of({"prompt": "Hi", "chosen": "Hello"}) == {"messages": [msg("user", "Hi")], "reference": "Hello"}
    assert prompt_of({"prompt": "Hi", "completion": "Hello"})["reference"] == "Hello"
    assert prompt_of({"messages": [msg("user", 5), msg("assistant", "x")]}) is None
