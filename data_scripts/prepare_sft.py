#!/usr/bin/env python
"""SFT data: a hub dataset or local files in its schema -> train.jsonl / test.jsonl of
{"messages": [system, user, assistant, ...]} plus meta.json (counts, drops, token statistics).

    python data_scripts/prepare_sft.py --dataset alpaca --output-dir data/sft_alpaca --tokenizer qwen3_tokenizer
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import posttrain  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from posttrain import prep  # noqa: E402
from posttrain import prep_adapters as a  # noqa: E402
from posttrain.prep import Source  # noqa: E402

# NAME -> where it lives and which adapter reads its schema (see posttrain/prep_adapters.py).
SOURCES = {
    "alpaca": Source(a.alpaca, "tatsu-lab/alpaca"),
    "alpaca_cleaned": Source(a.alpaca, "yahma/alpaca-cleaned"),
    "dolly": Source(a.dolly, "databricks/databricks-dolly-15k"),
    "ultrachat": Source(a.messages, "HuggingFaceH4/ultrachat_200k", train_split="train_sft", test_split="test_sft"),
    "slimorca": Source(a.sharegpt, "Open-Orca/SlimOrca"),
    "oasst": Source(a.messages, "OpenAssistant/oasst2", test_split="validation", regroup=a.oasst_threads),
    "messages": Source(a.messages, test_split="test"),
    "sharegpt": Source(a.sharegpt, test_split="test"),
}


def main(argv=None) -> None:
    prep.main(prep.SFT, SOURCES, argv, description=__doc__)


if __name__ == "__main__":
    main()
