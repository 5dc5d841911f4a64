#!/usr/bin/env python
"""Preference data: a hub dataset or local files in its schema -> train.jsonl / test.jsonl of
{"prompt": [system, user, ...], "chosen": [assistant], "rejected": [assistant]} plus meta.json.

    python data_scripts/prepare_dpo.py --dataset ultrafeedback --output-dir data/dpo_ultrafeedback \\
        --tokenizer runs/converted --max-length 2048

--tokenizer is the converted model directory (or `qwen3`, the built-in Qwen3 tokenizer):
prompt_too_long and the token statistics are measured with the ChatML template training uses
(another template is replaced, with a note).
"""

from __future__ import annotations

from posttrain.data import adapters as a
from posttrain.data import prep

# NAME -> where it lives and which adapter reads its schema (see posttrain/data/adapters.py).
SOURCES = {
    "ultrafeedback": prep.Source(a.chosen_rejected_lists, "argilla/ultrafeedback-binarized-preferences-cleaned"),
    "hh_rlhf": prep.Source(a.hh_rlhf, "Anthropic/hh-rlhf", test_split="test"),
    "orca_dpo": prep.Source(a.orca_dpo, "Intel/orca_dpo_pairs"),
    "capybara": prep.Source(a.chosen_rejected_lists, "argilla/distilabel-capybara-dpo-7k-binarized"),
    "preference": prep.Source(a.preference_rows, test_split="test"),
}


def main(argv=None) -> None:
    prep.main(prep.DPO, SOURCES, argv, description=__doc__)


if __name__ == "__main__":
    main()
