"""The production recipes' batch arithmetic, computed from the recipe files and the measured statistics.

    python benchmarks/recipe_figures.py       # prints each figure: stated in the recipe's comments vs computed

`recipes/sft.yaml` and `recipes/dpo.yaml` state their figures (conversations or pairs per
update, updates per epoch, ...) in a comment block, one `#   NAME   NUMBER` line each.
`computed_figures` derives the same figures from the recipe's batch keys, the process count of
the accelerate config the recipe is launched with, and the data statistics
(benchmarks/results/sft_recipe_stats.json for SFT; UltraFeedback's published pair count for
DPO); tests/test_recipes.py holds the two equal, so a recipe cannot change without its
comments. benchmarks/gpu.py turns the same figures into wall times.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"sft": REPO / "recipes" / "sft.yaml", "dpo": REPO / "recipes" / "dpo.yaml"}
LAUNCH_CONFIG = REPO / "accelerate_configs" / "zero2.yaml"  # what both recipes' headers launch with
SFT_STATS = REPO / "benchmarks" / "results" / "sft_recipe_stats.json"
ULTRAFEEDBACK_PAIRS = 60_917  # argilla/ultrafeedback-binarized-preferences-cleaned, as data_scripts reads it
DPO_VAL_SPLIT = 0.05  # data_scripts/prepare_dpo.py's default
DPO_TRAIN_PAIRS = ULTRAFEEDBACK_PAIRS - round(ULTRAFEEDBACK_PAIRS * DPO_VAL_SPLIT)

FIGURE_LINE = re.compile(r"^#\s{3}([a-z][a-z ]*[a-z])\s{2,}([\d,]+)\s*$")


def stated_figures(recipe: Path) -> dict[str, int]:
    """The `#   name   number` lines of a recipe's comments."""
    figures = {}
    for line in recipe.read_text().splitlines():
        m = FIGURE_LINE.match(line)
        if m:
            figures[m.group(1)] = int(m.group(2).replace(",", ""))
    return figures


def gpus(launch_config: Path = LAUNCH_CONFIG) -> int:
    config = yaml.safe_load(launch_config.read_text())
    return config["num_processes"] * config.get("num_machines", 1)


def updates_per_epoch(examples: int, per_device: int, accumulation: int, processes: int) -> int:
    """As the Trainer counts them: each process gets ceil(batches / processes) micro-batches (accelerate
    evens them out), and a last partial accumulation still makes an update."""
    micro_batches = math.ceil(math.ceil(examples / per_device) / processes)
    return math.ceil(micro_batches / accumulation)


def warmup_updates(warmup_steps: float, total_updates: int) -> int:
    """transformers' get_warmup_steps: a value below 1 is a fraction of all updates."""
    return math.ceil(total_updates * warmup_steps) if warmup_steps < 1 else int(warmup_steps)


def computed_figures(stage: str, recipe_path: Path | None = None, stats_path: Path = SFT_STATS) -> dict[str, int]:
    recipe = yaml.safe_load((recipe_path or RECIPES[stage]).read_text())
    n = gpus()
    per_device, accumulation = recipe["per_device_train_batch_size"], recipe["gradient_accumulation_steps"]
    per_update = per_device * accumulation * n
    if stage == "sft":
        stats = json.loads(stats_path.read_text())
        rows, tokens = stats["packing"]["packed_rows"], stats["real_tokens_per_epoch"]
        per_epoch = updates_per_epoch(rows, per_device, accumulation, n)
        figures = {
            "conversations per update": round(per_update * stats["packing"]["conversations_per_row"]),
            "real tokens per update": round(tokens / rows * per_update),
        }
    else:
        per_epoch = updates_per_epoch(DPO_TRAIN_PAIRS, per_device, accumulation, n)
        figures = {"pairs per update": per_update}
    total = per_epoch * recipe["num_train_epochs"]
    return figures | {
        "updates per epoch": per_epoch,
        "updates in all": total,
        "warmup updates": warmup_updates(recipe["warmup_steps"], total),
    }


if __name__ == "__main__":
    for stage, path in RECIPES.items():
        stated, computed = stated_figures(path), computed_figures(stage)
        for name, value in computed.items():
            print(f"{stage}  {name:<26} computed {value:>8,}  stated {stated.get(name, 'missing'):>8}")
