#!/usr/bin/env python
"""SFT data: a hub dataset or local files in its schema -> train.jsonl / test.jsonl of
{"messages": [system, user, assistant, ...]} plus meta.json (counts, drops, token statistics).

    python data_scripts/prepare_sft.py --dataset alpaca --output-dir data/sft_alpaca --tokenizer runs/converted

--tokenizer is the converted model directory (or `qwen3`, the built-in Qwen3 tokenizer): it
carries the ChatML training template (another template, such as a raw Qwen3 tokenizer's, is
replaced, with a note).
"""

from __future__ import annotations

from posttrain.data import adapters as a
from posttrain.data import prep

# NAME -> where it lives and which adapter reads its schema (see posttrain/data/adapters.py).
SOURCES = {
    "alpaca": prep.Source(a.alpaca, "tatsu-lab/alpaca"),
    "alpaca_cleaned": prep.Source(a.alpaca, "yahma/alpaca-cleaned"),
    "dolly": prep.Source(a.dolly, "databricks/databricks-dolly-15k"),
    "ultrachat": prep.Source(
        a.messages, "HuggingFaceH4/ultrachat_200k", train_split="train_sft", test_split="test_sft"
    ),
    "slimorca": prep.Source(a.sharegpt, "Open-Orca/SlimOrca"),
    "oasst": prep.Source(a.messages, "OpenAssistant/oasst2", test_split="validation", regroup=a.oasst_threads),
    "messages": prep.Source(a.messages, test_split="test"),
    "prompt_completion": prep.Source(a.prompt_completion, test_split="test"),
    "sharegpt": prep.Source(a.sharegpt, test_split="test"),
}


def main(argv=None) -> None:
    prep.main(prep.SFT, SOURCES, argv, description=__doc__)


if __name__ == "__main__":
    main()
