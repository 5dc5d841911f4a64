"""data_scripts/prepare_sft.py and prepare_dpo.py on a few rows in each dataset's real schema.

Every `--dataset NAME` is fed rows written here exactly as its hub dataset has
them (local files through `--data-files`, or a local copy of the hub repo for
ultrachat's split names), and the exact output rows, drop counts, token
statistics and error behaviour are checked.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from posttrain.data import load_source, validate_preference_rows, validate_sft_rows
from posttrain.fixtures import write_jsonl
from posttrain.prep_adapters import DEFAULT_SYSTEM_PROMPT as SYS


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
    assert dropped(meta) == {"empty_final_assistant_turn": 1}


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


def test_token_statistics_match_a_hand_count(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(tokenizer_dir)  # no chat template: prepare installs ChatML

    def count(text):
        return len(base(text, add_special_tokens=False)["input_ids"])

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
    _, meta = run(
        SFT_SCRIPT, tmp_path, "alpaca", rows, "--tokenizer", str(tokenizer_dir), "--max-length", str(lengths[1])
    )
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
        str(tokenizer_dir),
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
    proc = subprocess.run(
        [sys.executable, str(REPO / "posttrain" / f"{stage}.py"), str(path)],
        cwd=path.parent,
        capture_output=True,
        text=True,
    )
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
