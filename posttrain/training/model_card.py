"""What a trained model directory says about itself: `training_info.json` and the model card (README.md).

`training_info.json` (written with the model) holds the stage, the model it started from, the datasets, and
the system prompt of the training data: the most common first system message of the training rows (None
when no row has one). `python -m posttrain.chat` and generation default to that prompt, the setting the
model was trained in.

The model card replaces TRL's (which names the base model only when it is a hub id, and otherwise links
`huggingface.co/None` and shows `pipeline(..., model="None")`). It is rendered from the directory's own files
(training_info.json, the recipe, trainer_state.json, train_results.json), so it can be rendered again:
`posttrain/evaluate.py`, once its report is written, re-renders the card of each training output it scored
with an Evaluation section (its headline scores and the report's path), one atomic rename of README.md.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import yaml

from posttrain.outputs.atomic import atomic_write_text

logger = logging.getLogger("posttrain")

INFO_NAME = "training_info.json"
RESOLVED_RECIPE_NAME = "recipe.resolved.yaml"  # posttrain.training.recipe's (not imported: chat reads this module, and that one imports TRL)
CARD_NAME = "README.md"
STAGES = {
    "sft": "supervised fine-tuning (SFT)",
    "dpo": "direct preference optimisation (DPO)",
    "reward": "a reward model",
}
TRAINERS = {"sft": "SFTTrainer", "dpo": "DPOTrainer", "reward": "RewardTrainer"}
STAGE_SCRIPTS = {"sft": "posttrain/sft.py", "dpo": "posttrain/dpo.py", "reward": "posttrain/reward.py"}

# The recipe values a reader wants first, by stage (the rest is in recipe.resolved.yaml).
COMMON_KEYS = (
    "learning_rate",
    "lr_scheduler_type",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "dtype",
    "bf16",
    "activation_checkpointing",
    "use_peft",
    "seed",
)
STAGE_KEYS = {
    "sft": ("assistant_only_loss", "packing", "packing_strategy"),
    "dpo": ("loss_type", "beta", "label_smoothing", "reference_free", "precompute_ref_log_probs", "padding_free"),
    "reward": ("center_rewards_coefficient",),
}
PEFT_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
# Logged figures that describe the machine, not the model.
_SPEED = ("runtime", "samples_per_second", "steps_per_second", "total_flos")


# ------------------------------------------------------------------ the system prompt of the training data


def _text(content) -> str | None:
    """A message's text: a string, or the text parts of a content-parts list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "".join(parts) if parts else None
    return None


def _first_system_message(row: dict) -> str | None:
    for column in ("messages", "prompt", "chosen"):
        messages = row.get(column)
        if isinstance(messages, list) and messages:
            first = messages[0]
            if isinstance(first, dict) and first.get("role") == "system":
                return _text(first.get("content"))
            return None
    return None


def training_system_prompt(dataset) -> dict:
    """{system_prompt: the most common first system message of the rows (None if no row has one),
    rows_with_it, rows, distinct_system_prompts}; a streamed dataset is not read (all None)."""
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        return {"system_prompt": None, "rows_with_it": None, "rows": None, "distinct_system_prompts": None}
    columns = [c for c in ("messages", "prompt", "chosen") if c in dataset.column_names][:1]
    counts = Counter(_first_system_message(row) for row in dataset.select_columns(columns)) if columns else Counter()
    counts.pop(None, None)
    prompt, k = counts.most_common(1)[0] if counts else (None, 0)
    return {"system_prompt": prompt, "rows_with_it": k, "rows": len(dataset), "distinct_system_prompts": len(counts)}


def training_info(stage: str, recipe, train_dataset) -> dict:
    """What training_info.json records about a run, computed before training (the rows are still raw)."""
    script_args, _, model_args, dataset_args = recipe.arguments
    if dataset_args.datasets:
        data = [entry.path for entry in dataset_args.datasets]
    else:
        data = [script_args.dataset_name]
    return {
        "stage": stage,
        "base_model": model_args.model_name_or_path,
        "datasets": data,
        "train_split": None if dataset_args.datasets else script_args.dataset_train_split,
        **training_system_prompt(train_dataset),
    }


def read_training_info(model_dir: str | Path) -> dict | None:
    """A model directory's training_info.json, or None (not a training output, or unreadable)."""
    try:
        info = json.loads((Path(model_dir) / INFO_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def write_training_info(model_dir: str | Path, info: dict) -> None:
    atomic_write_text(Path(model_dir) / INFO_NAME, json.dumps(info, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------- the card


def _fmt(value) -> str:
    """A value for the card: numbers compact, lists joined; an unset value is "not set", never None."""
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) or "none"
    return str(value)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "/" in name and Path(name).expanduser().exists()


def _lineage(base: str) -> str:
    """`base` named, with where it came from when it is a local directory this project wrote."""
    path = Path(base).expanduser()
    if not _looks_local(base):
        return f"[`{base}`](https://huggingface.co/{base}) (Hugging Face Hub)"
    earlier = read_training_info(path)
    if earlier and earlier.get("stage") in STAGES:
        return f"`{base}` (a local directory: {STAGES[earlier['stage']]} of `{earlier.get('base_model')}`)"
    try:
        source = json.loads((path / "conversion.json").read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        source = None
    if source:
        return f"`{base}` (a local directory: `convert-checkpoint` of `{Path(source).name}`)"
    return f"`{base}` (a local directory)"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def final_metrics(model_dir: Path) -> tuple[dict, dict]:
    """(final train figures, final eval figures) of the run, from train_results.json and the log history."""
    history = _read_json(model_dir / "trainer_state.json").get("log_history") or []
    train = {k: v for k, v in _read_json(model_dir / "train_results.json").items() if not k.endswith(_SPEED)}
    last_train = next((e for e in reversed(history) if "loss" in e and "eval_loss" not in e), {})
    if "loss" in last_train:
        train = {"last logged loss": last_train["loss"], **train}
    last_eval = next((e for e in reversed(history) if any(k.startswith("eval_") for k in e)), {})
    evaluation = {k: v for k, v in last_eval.items() if k.startswith("eval_") and not k.endswith(_SPEED)}
    if evaluation and "step" in last_eval:
        evaluation = {"step": last_eval["step"], **evaluation}
    return train, evaluation


def _table(rows: list[tuple[str, str]], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return "\n".join(lines + [f"| {k} | {v} |" for k, v in rows])


def evaluation_section(evaluation: dict) -> str:
    """The card's Evaluation section from one model's entry of evaluate.py's summary.json."""
    entry, lines = evaluation["entry"], []
    rows = []
    for task, modes in (entry.get("tasks") or {}).items():
        for mode, score in modes.items():
            if isinstance(score, dict) and score.get("acc") is not None:
                stderr = score.get("acc_stderr")
                spread = f" ± {100 * 1.96 * stderr:.1f}" if stderr is not None else ""
                rows.append(
                    (f"{task} ({mode}), acc %", f"{100 * score['acc']:.1f}{spread} (n={_fmt(score.get('n'))})")
                )
    for key, value in (entry.get("generation") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((f"generation {key}", _fmt(value)))
    for key, value in (entry.get("preference") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((f"preference {key}", _fmt(value)))
    lines.append(
        f"Scored by `posttrain/evaluate.py` as `{evaluation['name']}` on {evaluation['date']}; the full report, "
        f"with the paired comparisons against the other models: `{evaluation['report']}`. "
        "The ± is a 95% interval."
    )
    if rows:
        lines += ["", _table(rows, ("figure", "value"))]
    return "\n".join(lines)


def render_card(model_dir: Path, settings: dict, info: dict, evaluation: dict | None = None) -> str:
    """The README.md of a training output directory (`settings`: the resolved recipe's mapping)."""
    from huggingface_hub import ModelCard, ModelCardData

    stage = info.get("stage", "sft")
    base = str(info.get("base_model") or settings.get("model_name_or_path"))
    data = [str(d) for d in info.get("datasets") or []]
    where = str(settings.get("output_dir") or model_dir)
    name = Path(where).name or where
    hub_base = base if not _looks_local(base) else None
    card_data = ModelCardData(
        base_model=hub_base,
        datasets=[d for d in data if not _looks_local(d)] or None,
        library_name="transformers",
        pipeline_tag="text-classification" if stage == "reward" else "text-generation",
        tags=["posttrain", "trl", stage, "generated_from_trainer"],
    )
    launch = info.get("launch") or {}
    processes = launch.get("num_processes", 1)
    batch = settings.get("per_device_train_batch_size", 1) * settings.get("gradient_accumulation_steps", 1)
    keys = COMMON_KEYS + STAGE_KEYS.get(stage, ()) + (PEFT_KEYS if settings.get("use_peft") else ())
    values = [(k, _fmt(settings[k])) for k in keys if k in settings]
    per = f"{batch} per process x {processes} processes" if processes > 1 else "one process"
    values.insert(6, ("effective batch", f"{batch * processes} ({per})"))
    if launch:
        values.append(("launch", ", ".join(f"{k} {_fmt(v)}" for k, v in launch.items())))
    train, evaluated = final_metrics(model_dir)
    system = info.get("system_prompt")
    if system is None:
        system_line = "No training row had a system message; chat uses none by default."
    else:
        share = f" ({info['rows_with_it']} of {info['rows']} training rows)" if info.get("rows") else ""
        system_line = (
            f"Trained with this system prompt{share}; `python -m posttrain.chat` uses it by default:\n\n> {system}"
        )

    use = (
        "```python\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
        f'model = AutoModelForSequenceClassification.from_pretrained("{where}")  # one score per conversation\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n'
        "```\n\nIt is the `reward_model` of `posttrain/generate_pairs.py`."
        if stage == "reward"
        else "```bash\n"
        f"python -m posttrain.chat {where}\n"
        "```\n\n```python\n"
        "from transformers import pipeline\n\n"
        f'generator = pipeline("text-generation", model="{where}")\n'
        + (
            f'messages = [{{"role": "system", "content": {json.dumps(system, ensure_ascii=False)}}}, '
            '{"role": "user", "content": "What do bees make?"}]\n'
            if system is not None
            else 'messages = [{"role": "user", "content": "What do bees make?"}]\n'
        )
        + 'print(generator(messages, max_new_tokens=128, return_full_text=False)[0]["generated_text"])\n```'
    )
    script = STAGE_SCRIPTS.get(stage, "posttrain/sft.py")
    sections = [
        f"# {name}",
        f"{_sentence(STAGES.get(stage, stage))} of {_lineage(base)}, trained by posttrain (`{script}`, "
        f"TRL's {TRAINERS.get(stage, 'Trainer')}) "
        f"on {', '.join(f'`{d}`' for d in data) or 'its recipe datasets'}.",
        "## Use\n\n" + use,
        "## System prompt\n\n" + system_line,
        "## Training\n\n"
        f"Rerun: `python {script} {Path(where) / RESOLVED_RECIPE_NAME}` (every setting is there).\n\n"
        + _table(values, ("recipe key", "value")),
        "## Final metrics\n\n"
        + (_table([(k, _fmt(v)) for k, v in train.items()], ("train", "value")) if train else "No train metrics.")
        + "\n\n"
        + (
            _table([(k, _fmt(v)) for k, v in evaluated.items()], ("eval", "value"))
            if evaluated
            else "No evaluation during training (eval_strategy: no)."
        ),
        "## Evaluation\n\n"
        + (
            evaluation_section(evaluation)
            if evaluation
            else f"Not evaluated yet: `posttrain/evaluate.py` adds its headline scores here when it scores `{where}`."
        ),
    ]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return str(ModelCard(content))


def write_model_card(model_dir: str | Path, settings: dict | None = None, evaluation: dict | None = None) -> bool:
    """Render the card of a training output directory into its README.md (atomically); False when the directory
    is not one (no training_info.json or recipe). `settings` default to the saved recipe."""
    model_dir = Path(model_dir)
    info = read_training_info(model_dir)
    if info is None:
        return False
    if settings is None:
        try:
            settings = yaml.safe_load((model_dir / RESOLVED_RECIPE_NAME).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return False
        if not isinstance(settings, dict):
            return False
    atomic_write_text(model_dir / CARD_NAME, render_card(model_dir, settings, info, evaluation))
    return True


def add_evaluation_to_cards(summary: dict, report_path: str | Path) -> list[str]:
    """After evaluate.py wrote its report: re-render the card of every scored model that is a training output,
    with its headline scores. A directory it cannot write (another user's model) gets a note, not a failure.
    Returns the notes."""
    notes = []
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    for name, entry in (summary.get("models") or {}).items():
        path = Path(entry.get("path", ""))
        if not path.is_dir() or read_training_info(path) is None:
            continue
        evaluation = {"name": name, "entry": entry, "report": str(report_path), "date": date}
        try:
            write_model_card(path, evaluation=evaluation)
        except OSError as err:
            notes.append(f"note: the model card of {path} was left as it was ({err.strerror or err})")
    return notes
