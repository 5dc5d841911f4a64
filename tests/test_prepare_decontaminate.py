"""data_scripts' --decontaminate: a row holding an evaluation question (verbatim, inside other text) is dropped and
counted under its evaluation file's own reason; a row sharing fewer than N words in sequence is kept; bad flags and
evaluation files are one line before anything is written."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, one_error_line

from posttrain.data.adapters import DEFAULT_SYSTEM_PROMPT as SYS
from posttrain.demo.fixtures import write_jsonl

GSM8K_QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)
ARC_QUESTION = "Which gas do plants absorb from the air?"  # 8 words: contained only when whole
TWELVE_WORDS = "Natalia sold clips to 48 of her friends in April and then"  # the question's first 12 words


def messages(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def evaluation_files(tmp_path):
    gsm8k = write_jsonl(tmp_path / "eval" / "gsm8k_test.jsonl", [{"question": GSM8K_QUESTION, "answer": "#### 72"}])
    arc = write_jsonl(
        tmp_path / "eval" / "arc_test.jsonl",
        [
            {
                "id": "Mercury_1",
                "question": ARC_QUESTION,
                "choices": {"text": ["CO2"], "label": ["A"]},
                "answerKey": "A",
            }
        ],
    )
    return gsm8k, arc


def prepare(tmp_path, script: str, rows: list[dict], *flags) -> int:
    """data_scripts/<script>.py in this process; its exit code."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"data_scripts_{script}", REPO / "data_scripts" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    dataset = "messages" if script == "prepare_sft" else "preference"
    argv = ["--dataset", dataset, "--data-files", str(data), "--output-dir", str(tmp_path / "out"), "--val-split", "0"]
    try:
        module.main([*argv, *map(str, flags)])
    except SystemExit as done:
        return done.code
    return 0


def written(tmp_path) -> tuple[list[dict], dict]:
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "meta.json").read_text())


def test_rows_holding_an_evaluation_question_are_dropped_and_counted_per_file(tmp_path):
    gsm8k, arc = evaluation_files(tmp_path)
    rows = [
        messages(f"My homework, please: {GSM8K_QUESTION.upper()} Thanks!", "72 clips."),  # verbatim inside other text
        messages("Quiz time.", f"Here is one: {ARC_QUESTION} Carbon dioxide."),  # a short question, whole
        messages(f"{TWELVE_WORDS} we rested.", "Good for her."),  # 12 of 13 words in sequence: kept
        messages("Which gas do plants take in from the air?", "Carbon dioxide."),  # not the question's words in order
        messages("What is two plus two?", "Four."),
    ]
    assert prepare(tmp_path, "prepare_sft", rows, "--decontaminate", gsm8k, arc, "--system-prompt", "") == 0
    kept, meta = written(tmp_path)
    assert sorted(r["messages"][0]["content"] for r in kept) == sorted(r["messages"][0]["content"] for r in rows[2:])
    assert meta["dropped"][f"evaluation_overlap:{gsm8k}"] == 1 and meta["dropped"][f"evaluation_overlap:{arc}"] == 1
    assert meta["counts"] == {"source_rows": 5, "dropped": 2, "unused": 0, "train": 3, "test": 0}
    assert meta["decontamination"] == {"ngram": 13, "items": {str(gsm8k): 1, str(arc): 1}}

    # with runs of 4 words, the 12 shared words are enough
    assert (
        prepare(tmp_path, "prepare_sft", rows, "--decontaminate", gsm8k, "--decontaminate-ngram", 4, "--overwrite")
        == 0
    )
    kept, meta = written(tmp_path)
    assert meta["dropped"][f"evaluation_overlap:{gsm8k}"] == 2 and len(kept) == 3  # the ARC row is not checked now


def test_a_preference_row_is_checked_in_every_message(tmp_path):
    gsm8k, _ = evaluation_files(tmp_path)

    def pair(rejected: str, question: str = "Count the clips.") -> dict:
        return {
            "prompt": [{"role": "system", "content": SYS}, {"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": "72."}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }

    rows = [pair(f"Restating it: {GSM8K_QUESTION} No idea."), pair("71."), pair("70.", question=GSM8K_QUESTION)]
    assert prepare(tmp_path, "prepare_dpo", rows, "--decontaminate", gsm8k) == 0
    kept, meta = written(tmp_path)
    assert [r["rejected"][0]["content"] for r in kept] == ["71."]
    assert meta["dropped"][f"evaluation_overlap:{gsm8k}"] == 2


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--decontaminate-ngram", "3"], ["--decontaminate-ngram must be at least 4, got 3"]),
        (["--decontaminate", "NO_QUESTION"], ["no row has a question field (question, question_stem, prompt)"]),
        (["--decontaminate", "MISSING"], ["evaluation file", "not found"]),
    ],
)
def test_bad_flags_and_evaluation_files_are_one_line_and_write_nothing(tmp_path, flags, fragments, capsys):
    no_question = write_jsonl(tmp_path / "eval.jsonl", [{"text": "no question here"}])
    flags = [{"NO_QUESTION": str(no_question), "MISSING": str(tmp_path / "missing.jsonl")}.get(f, f) for f in flags]
    assert prepare(tmp_path, "prepare_sft", [messages("Hi", "Hello")], *flags) == 2
    line = one_error_line(capsys.readouterr().err)
    assert all(fragment in line for fragment in fragments), line
    assert not (tmp_path / "out").exists()
