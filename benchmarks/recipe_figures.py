"""The production recipes' batch arithmetic: each figure stated in a recipe's comments vs computed.

    python benchmarks/recipe_figures.py

Each production recipe (`recipes/sft.yaml`, `dpo.yaml`, `reward.yaml`, `generate_pairs.yaml`,
`dpo_on_policy.yaml`, `evaluate.yaml`) states its figures (conversations or pairs per update, updates per
epoch, samples and minutes of sampling, decoding steps of the evaluation, ...) in a comment block, one
`#   NAME   NUMBER` line each.
`common.computed_figures` derives the same figures from the recipe's batch keys, the process count
of the accelerate config the recipe is launched with, and the data statistics
(benchmarks/results/sft_recipe_stats.json for SFT; UltraFeedback's published pair count for
DPO); tests/test_recipes.py holds the two equal, so a recipe cannot change without its
comments. benchmarks/gpu.py turns the same figures into wall times.
"""

from __future__ import annotations

from common import (  # noqa: F401  (the arithmetic, tested through this module)
    DPO_TRAIN_PAIRS,
    RECIPES,
    computed_figures,
    evaluation_figures,
    gpus,
    sampling_figures,
    stated_figures,
    updates_per_epoch,
    warmup_updates,
)

if __name__ == "__main__":
    for stage, path in RECIPES.items():
        stated, computed = stated_figures(path), computed_figures(stage)
        for name, value in computed.items():
            print(f"{stage}  {name:<26} computed {value:>8,}  stated {stated.get(name, 'missing'):>8}")
