"""Helpers several test modules share (pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def write_demo_recipe(stage: str, path: Path, model_dir, data_dir, output_dir, **overrides) -> Path:
    """recipes/demo/<stage>.yaml, pointed at the test's model, data and output directory."""
    recipe = yaml.safe_load((REPO / "recipes" / "demo" / f"{stage}.yaml").read_text())
    recipe.update(
        model_name_or_path=str(model_dir), dataset_name=str(data_dir), output_dir=str(output_dir), report_to="none"
    )
    recipe.update(overrides)
    path.write_text(yaml.safe_dump(recipe))
    return path
