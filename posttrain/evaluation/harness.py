"""Benchmark scores through lm-evaluation-harness.

    configs = task_configs(["arc_easy"], {"arc_easy": "arc_easy_test.jsonl"})   # checked, one-line errors
    lm = load_lm("runs/sft", batch_size="8")
    plain = score(lm, configs, chat=False)        # {task: TaskScore}; None off the main process
    chat = score(lm, configs, chat=True, system_prompt="You are ...")

Every score is the harness's own: its task definitions (prompt format, choices, metrics), its
`acc` / `acc_norm` and their standard errors, its data-parallel scoring under `accelerate
launch`. What this module adds is what the harness lacks: a task's hub dataset replaced by a local
file in the same schema (for clusters without hub access, and for tests), checked before any model
loads, and the per-item scores kept for the paired tests (posttrain.evaluation.stats).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from pathlib import Path

from posttrain.outputs.errors import PosttrainError

DEFAULT_TASKS = ("arc_easy", "arc_challenge", "openbookqa", "truthfulqa_mc2")
METRICS = ("acc", "acc_norm")
_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# ------------------------------------------------------------------------------------ tasks


@functools.lru_cache(maxsize=1)
def task_manager():
    """The harness's index of its registered tasks (built once per process: it reads ~10k YAML files)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _template_fields(template) -> set[str]:
    """The document fields a task's doc_to_text / doc_to_choice / doc_to_target reads: a Jinja
    template's free variables, or the field a bare name selects (the harness reads `doc[name]`)."""
    if not isinstance(template, str):  # an int target, a list of choices or a Python function
        return set()
    if "{{" in template or "{%" in template:
        import jinja2
        import jinja2.meta

        return set(jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template)))
    return {template} if template.isidentifier() else set()


def required_fields(config: dict) -> set[str]:
    return set().union(*(_template_fields(config.get(k)) for k in ("doc_to_text", "doc_to_choice", "doc_to_target")))


def _check_task_file(task: str, path: Path, fields: set[str]) -> None:
    """Every row of a local task file has the fields the task reads (one line naming file, row and field)."""
    from posttrain.data.loading import check_json_file, read_json_rows

    if not path.is_file():
        raise PosttrainError(f"task_files: {task}: {path} not found")
    if path.suffix not in _LOCAL_BUILDERS:
        raise PosttrainError(f"task_files: {task}: {path} is not a .jsonl, .json or .parquet file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        missing = sorted(fields - set(pq.read_schema(path).names))
        if missing:
            raise PosttrainError(
                f"task_files: {task}: {path} has no column {', '.join(missing)}, which the task reads "
                f"(it needs {', '.join(sorted(fields))}: the hub dataset's schema)"
            )
        return
    check_json_file(path)
    for where, row in read_json_rows(path):
        missing = sorted(fields - set(row))
        if missing:
            raise PosttrainError(
                f"task_files: {task}: {path} {where} has no field {', '.join(missing)}, which the task reads "
                f"(it needs {', '.join(sorted(fields))}: the hub dataset's schema)"
            )


def task_configs(tasks, task_files: dict[str, str] | None = None) -> list:
    """What `simple_evaluate(tasks=...)` takes: the task's name (its data from the hub), or its
    registered config with the test split read from the local file `task_files[name]`.

    Refused, in one line: a name the harness does not know, a group or a task that is not
    multiple choice (no acc / acc_norm), a task_files key not in `tasks`, and a local file that is
    missing or lacks a field the task's templates read.
    """
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    task_files = dict(task_files or {})
    if not tasks:
        raise PosttrainError("tasks: name at least one lm-evaluation-harness task")
    stray = sorted(set(task_files) - set(tasks))
    if stray:
        raise PosttrainError(f"task_files: {', '.join(stray)} not in tasks ({', '.join(tasks)})")
    index = task_manager().task_index
    configs = []
    for name in tasks:
        entry = index.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, index, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise PosttrainError(f"tasks: {name} is not an lm-evaluation-harness task{hint}")
        if entry.kind is not Kind.TASK or entry.yaml_path is None:
            raise PosttrainError(
                f"tasks: {name} is a {entry.kind.name.lower()}, not a task; name its tasks one by one"
            )
        config = load_yaml(str(entry.yaml_path), resolve_func=True)  # follows `include:` (arc_challenge)
        if config.get("output_type") != "multiple_choice":
            raise PosttrainError(
                f"tasks: {name} is a {config.get('output_type')} task; evaluate.py scores multiple-choice tasks "
                "(acc, acc_norm by log-probability)"
            )
        if name not in task_files:
            configs.append(name)
            continue
        path = Path(task_files[name])
        _check_task_file(name, path, required_fields(config))
        config.update(
            dataset_path=_LOCAL_BUILDERS[path.suffix],
            dataset_name=None,
            dataset_kwargs={"data_files": {"test": str(path.resolve())}},
            training_split=None,
            validation_split=None,
            test_split="test",
        )
        configs.append(config)
    return configs


# ---------------------------------------------------------------------------------- scoring


@dataclasses.dataclass
class TaskScore:
    """One model's score on one task in one scoring mode: the harness's aggregates and its per-item scores."""

    n: int
    acc: float | None = None
    acc_stderr: float | None = None
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    items: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)  # metric -> {doc_id: score}

    def summary(self) -> dict:
        return {k: getattr(self, k) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n")}


def load_lm(model_dir, batch_size: str = "8", dtype: str = "auto"):
    """The harness's Hugging Face model for `model_dir`: one process, or data-parallel under `accelerate launch`."""
    import torch
    from lm_eval.models.huggingface import HFLM

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the harness defaults to cuda, and asserts without it
    size = int(batch_size) if str(batch_size).isdigit() else batch_size
    return HFLM(pretrained=str(model_dir), device=device, batch_size=size, dtype=dtype)


def _number(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def score(lm, tasks: list, chat: bool, system_prompt: str | None = None, limit: int | None = None):
    """{task: TaskScore} of `lm` on `tasks` (from task_configs), with the chat template and the system
    prompt (`chat`) or without either; None on processes other than the main one."""
    import lm_eval

    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        apply_chat_template=chat,
        system_instruction=system_prompt if chat and system_prompt else None,
        limit=limit,
        log_samples=True,
        task_manager=task_manager(),
        bootstrap_iters=1000,  # acc's standard error is closed-form; this only bounds other metrics' cost
    )
    if results is None:
        return None
    scores = {}
    for task, metrics in results["results"].items():
        samples = results["samples"][task]
        names = [m for m in METRICS if f"{m},none" in metrics]
        scores[task] = TaskScore(
            n=int(results["n-samples"][task]["effective"]),
            **{m: _number(metrics.get(f"{m},none")) for m in names},
            **{f"{m}_stderr": _number(metrics.get(f"{m}_stderr,none")) for m in names},
            items={m: {int(s["doc_id"]): float(s[m]) for s in samples} for m in names},
        )
    return scores
