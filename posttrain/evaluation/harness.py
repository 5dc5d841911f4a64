"""Benchmark scores through lm-evaluation-harness: multiple-choice and generation tasks.

    configs = task_configs(["arc_easy", "gsm8k"], {"gsm8k": {"test": "gsm8k_test.jsonl"}}, num_fewshot=0)
    lm = load_lm("runs/sft", batch_size="8")
    plain = score(lm, configs, chat=False)        # {task: TaskScore}; None off the main process
    chat = score(lm, configs, chat=True, system_prompt="You are ...")
    write_samples(out_dir, {"sft": {"plain": plain, "chat": chat}})   # samples/sft/<task>.<mode>.jsonl

Every score is the harness's own: its task definitions (prompt format, choices, few-shot examples,
stop strings, filters, metrics), its aggregates and their standard errors, its batching (requests
sorted by length, longest first) and its data-parallel split of the items under `accelerate
launch`. Multiple-choice tasks (`output_type: multiple_choice`) are scored by log-probability;
generation tasks (`generate_until`: ifeval, gsm8k, gsm8k_cot_zeroshot, truthfulqa_gen, ...) by the
model's greedy reply, which ends at the model's stop tokens (its generation config's eos ids, and
the tokenizer's eos) or at the first of the task's `until` strings, cut off there.

What this module adds is what the harness lacks: a task's hub dataset replaced by local files in
the same schema (for clusters without hub access, and for tests), checked before any model loads,
with the few-shot examples' source checked too (the harness would otherwise take them from the test
split it scores); the recipe's `num_fewshot` and `max_gen_toks`; IFEval's sentence tokenizer from an
installed package and its language detection seeded (posttrain.evaluation.sentences); the per-item results kept for the paired tests
(posttrain.evaluation.stats) and written per item for a reader.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
from pathlib import Path

from posttrain.outputs.errors import PosttrainError

DEFAULT_TASKS = ("arc_easy", "arc_challenge", "openbookqa", "truthfulqa_mc2")
METRICS = ("acc", "acc_norm")
OUTPUT_TYPES = ("multiple_choice", "generate_until")
SAMPLES_DIR = "samples"
HFLM_MAX_GEN_TOKS = 256  # the harness's reply limit for a generation task that sets none (HFLM.max_gen_toks)
_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SPLITS = ("test", "train")  # a local task's scored split and the split its few-shot examples come from


# ------------------------------------------------------------------------------------ tasks


@functools.cache
def task_manager(names: tuple[str, ...] | None = None):
    """The harness's index of its registered tasks: of the directories that define `names` only, or of every
    task when `names` is None or one of them is not found that way (a task made in Python, a tag, a typo, whose
    did-you-mean needs every name). The whole index parses all ~14,000 task YAML files, 20-40 s on a CPU, in
    every process; finding the directories takes a text scan of well under a second."""
    from lm_eval.tasks import TaskManager

    if names:
        dirs = {_defining_dir(name) for name in names}
        if None not in dirs:
            manager = TaskManager(include_defaults=False, include_path=sorted(map(str, dirs)))
            if all(name in manager.task_index for name in names):
                return manager
        return task_manager(None)
    return TaskManager()


@functools.lru_cache(maxsize=1)
def _task_dirs() -> dict[str, set[Path]]:
    """{task name: the directories of the harness's YAML files that have the line `task: <name>`}."""
    import os
    import re

    import lm_eval.tasks

    line = re.compile(rb"^task:[ \t]*['\"]?([\w.\-]+)['\"]?[ \t]*$", re.M)
    dirs: dict[str, set[Path]] = {}
    for folder, _, files in os.walk(Path(lm_eval.tasks.__file__).parent):
        for file in files:
            if file.endswith((".yaml", ".yml")):
                for name in line.findall(Path(folder, file).read_bytes()):
                    dirs.setdefault(name.decode(), set()).add(Path(folder))
    return dirs


def _defining_dir(name: str) -> Path | None:
    """The one directory that defines task `name`, if one does."""
    found = _task_dirs().get(name, set())
    return next(iter(found)) if len(found) == 1 else None


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


def _check_rows(task: str, path: Path, config: dict) -> None:
    """Every row of a local task file has the fields the task's templates read, and (generation tasks with
    their own scoring function, such as IFEval's instruction checks) the harness's scoring accepts it: its
    `process_results` runs on the row with an empty reply. One line naming file, row and field otherwise."""
    from posttrain.data.loading import check_json_file, read_json_rows

    fields = required_fields(config)
    needs = f"(it needs {', '.join(sorted(fields))}: the hub dataset's schema)"
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        missing = sorted(fields - set(pq.read_schema(path).names))
        if missing:
            raise PosttrainError(
                f"task_files: {task}: {path} has no column {', '.join(missing)}, which the task reads {needs}"
            )
        return
    check_json_file(path)
    process = config.get("process_results")
    process = process if callable(process) and config.get("output_type") == "generate_until" else None
    for where, row in read_json_rows(path):
        missing = sorted(fields - set(row))
        if missing:
            raise PosttrainError(
                f"task_files: {task}: {path} {where} has no field {', '.join(missing)}, which the task reads {needs}"
            )
        if process is not None:
            try:
                process(row, [""])
            except Exception as err:  # the harness's own scoring code: any failure means it cannot score the row
                detail = f"{type(err).__name__}: {err}".splitlines()[0]
                raise PosttrainError(
                    f"task_files: {task}: {path} {where} cannot be scored by the task's checks ({detail}); "
                    "rows need the hub dataset's schema and values"
                ) from None


def local_task_files(value) -> dict[str, dict[str, str]]:
    """{task: {"test": file, "train": file?}} from the recipe's `task_files`: a mapping `task: file` or
    `task: {test: file, train: file}`, or command-line words `task=file` and `task:train=file`. The test
    file is scored; the train file, where a task takes few-shot examples from a split, gives them."""
    out: dict[str, dict[str, str]] = {}

    def put(task: str, split: str, path) -> None:
        if split not in _SPLITS:
            raise PosttrainError(f"task_files: {task}: split {split!r} is not test or train")
        if split in out.setdefault(task, {}):
            raise PosttrainError(f"task_files: {task}: its {split} file is named twice")
        out[task][split] = str(path)

    if isinstance(value, dict):
        for task, entry in value.items():
            if isinstance(entry, dict):
                for split, path in entry.items():
                    put(str(task), str(split), path)
            else:
                put(*_task_and_split(str(task)), entry)
    else:
        for word in value or []:
            key, sep, path = str(word).partition("=")
            if not sep:
                raise PosttrainError(f"task_files: {word!r} is not task=file (or task:train=file)")
            put(*_task_and_split(key), path)
    for task, splits in out.items():
        if "test" not in splits:
            raise PosttrainError(f"task_files: {task}: a train file without a test file; name the test file too")
    return out


def _task_and_split(key: str) -> tuple[str, str]:
    task, _, split = key.partition(":")
    return task, split or "test"


def _registered_config(name: str, index) -> dict:
    """The harness's config of task `name` (its YAML, `include:`s followed, functions resolved); one-line
    errors for an unknown name, a group and an output type evaluate.py does not score."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = index.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, index, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise PosttrainError(f"tasks: {name} is not an lm-evaluation-harness task{hint}")
    if entry.kind is not Kind.TASK or entry.yaml_path is None:
        raise PosttrainError(f"tasks: {name} is a {entry.kind.name.lower()}, not a task; name its tasks one by one")
    config = load_yaml(str(entry.yaml_path), resolve_func=True)  # follows `include:` (arc_challenge)
    if config.get("output_type", "generate_until") not in OUTPUT_TYPES:
        raise PosttrainError(
            f"tasks: {name} is a {config.get('output_type')} task; evaluate.py scores multiple-choice "
            "(log-probability) and generate_until (greedy reply) tasks"
        )
    config.setdefault("output_type", "generate_until")
    return config


def _fewshot_source(config: dict) -> str | None:
    """Where the harness takes a task's few-shot examples from: the examples in its config, or a split other
    than the scored one; None when it would take them from the scored split itself."""
    fewshot = config.get("fewshot_config") or {}
    split = fewshot.get("split") or config.get("fewshot_split")
    test = config.get("test_split")
    if split is None:
        if fewshot.get("samples") is not None:
            return "its config's examples"
        split = config.get("training_split") or config.get("validation_split")
    return f"the {split} split" if split is not None and split != test else None


def task_configs(
    tasks, task_files: dict | None = None, num_fewshot: int | None = None, max_gen_toks: int | None = None
) -> list:
    """What `simple_evaluate(tasks=...)` takes: the task's name (its data from the hub, its own settings), or
    its registered config with the test split (and the few-shot train split) read from `task_files[name]`
    (see local_task_files), `num_fewshot` (None: the task's own) and, for generation tasks, `max_gen_toks`
    (None: the task's own) set.

    Refused, in one line: a name the harness does not know, a group or a task that is neither multiple
    choice nor generate_until, a task_files key not in `tasks`, a local file that is missing or has a row
    the task cannot read or score, and few-shot examples that would come from the scored test split.
    """
    from posttrain.evaluation import sentences

    sentences.install_punkt()  # before a task's YAML imports IFEval's checks, which would download it
    sentences.seed_language_detection()
    files = task_files if task_files and all(isinstance(v, dict) for v in task_files.values()) else None
    files = files if files is not None else local_task_files(task_files)
    if not tasks:
        raise PosttrainError("tasks: name at least one lm-evaluation-harness task")
    stray = sorted(set(files) - set(tasks))
    if stray:
        raise PosttrainError(f"task_files: {', '.join(stray)} not in tasks ({', '.join(tasks)})")
    index = task_manager(tuple(tasks)).task_index
    configs = []
    for name in tasks:
        config = _registered_config(name, index)
        local = files.get(name)
        generating = config["output_type"] == "generate_until"
        if local is None and num_fewshot is None and (max_gen_toks is None or not generating):
            configs.append(name)
            continue
        if local is not None:
            if config.get("class") is not None or config.get("custom_dataset") is not None:
                raise PosttrainError(f"task_files: {name} is a Python task class; it reads its own data")
            paths = {split: Path(p) for split, p in local.items()}
            for path in paths.values():
                if not path.is_file():
                    raise PosttrainError(f"task_files: {name}: {path} not found")
                if path.suffix not in _LOCAL_BUILDERS:
                    raise PosttrainError(f"task_files: {name}: {path} is not a .jsonl, .json or .parquet file")
            builders = {_LOCAL_BUILDERS[p.suffix] for p in paths.values()}
            if len(builders) > 1:
                raise PosttrainError(f"task_files: {name}: its test and train files are of different formats")
            for path in paths.values():
                _check_rows(name, path, config)
            train = "train" in paths
            config.update(
                dataset_path=builders.pop(),
                dataset_name=None,
                dataset_kwargs={"data_files": {s: str(p.resolve()) for s, p in paths.items()}},
                training_split="train" if train else None,
                validation_split=None,
                test_split="test",
                fewshot_split="train" if train else None,
            )
            if isinstance(config.get("fewshot_config"), dict) and config["fewshot_config"].get("split"):
                config["fewshot_config"] = {**config["fewshot_config"], "split": "train" if train else None}
        if num_fewshot is not None and config.get("num_fewshot") != 0:  # as the harness: a task's own 0 stays
            config["num_fewshot"] = num_fewshot
        shots = config.get("num_fewshot") or 0
        if shots > 0 and _fewshot_source(config) is None:
            where = "its local test file is all it has" if local is not None else "it has no other split"
            raise PosttrainError(
                f"num_fewshot: {name} takes {shots} few-shot examples, but {where} and the harness would take them "
                f"from the items it scores; set num_fewshot 0"
                + (f" or give a train file (task_files: {{{name}: {{test: ..., train: ...}}}})" if local else "")
            )
        if generating and max_gen_toks is not None:
            config["generation_kwargs"] = {**(config.get("generation_kwargs") or {}), "max_gen_toks": max_gen_toks}
        configs.append(config)
    return configs


def _config_of(task) -> dict:
    return task if isinstance(task, dict) else _registered_config(task, task_manager((task,)).task_index)


def task_name(task) -> str:
    return task["task"] if isinstance(task, dict) else task


def generation_tasks(configs: list) -> list[str]:
    """The names of the generate_until tasks among `configs` (from task_configs)."""
    return [task_name(c) for c in configs if _config_of(c)["output_type"] == "generate_until"]


def reply_limits(configs: list, max_gen_toks: int | None = None) -> dict[str, int]:
    """{generation task: its reply limit in tokens}: `max_gen_toks`, else the task's own, else the harness's
    default for Hugging Face models (HFLM_MAX_GEN_TOKS)."""
    limits = {}
    for c in configs:
        config = _config_of(c)
        if config["output_type"] == "generate_until":
            own = (config.get("generation_kwargs") or {}).get("max_gen_toks")
            limits[task_name(c)] = int(max_gen_toks or own or HFLM_MAX_GEN_TOKS)
    return limits


def without_plain_prompt(configs: list) -> list[str]:
    """The generation tasks among `configs` that have no plain prompt: none of their own stop strings ends a
    reply (`until: []`, IFEval), because their prompt is an instruction to an assistant, not a text that a base
    model continues up to a marker (gsm8k's "Question:"); unprompted by a template, only an end-of-text token or
    max_gen_toks ends the reply. They are scored plain too beside chat scoring (as the harness scores a base
    model), but never plain alone."""
    out = []
    for c in configs:
        config = _config_of(c)
        until = (config.get("generation_kwargs") or {}).get("until")
        if config["output_type"] == "generate_until" and not until:
            out.append(task_name(c))
    return out


# ---------------------------------------------------------------------------------- scoring


@dataclasses.dataclass
class TaskScore:
    """One model's score on one task in one scoring mode: the harness's aggregates (`metrics`, named as in
    summary.json: `acc`, `acc_stderr`, `prompt_level_strict_acc`, `exact_match,strict-match`,
    `exact_match_stderr,strict-match`, ...), its per-item scores for the paired tests, and one row per item
    for samples/<model>/<task>.<mode>.jsonl."""

    n: int
    metrics: dict[str, float | None] = dataclasses.field(default_factory=dict)
    items: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)  # metric -> {doc_id: score}
    samples: list[dict] = dataclasses.field(default_factory=list)

    def summary(self) -> dict:
        return {**self.metrics, "n": self.n}

    def __getattr__(self, name: str):  # score.acc, score.acc_norm_stderr, ...: the metric of that name
        metrics = self.__dict__.get("metrics") or {}
        if name in metrics:
            return metrics[name]
        raise AttributeError(name)


def load_lm(model_dir, batch_size: str = "8", dtype: str = "auto", tokenizer=None):
    """The harness's Hugging Face model for `model_dir` (with `tokenizer`, one already loaded from it, or its
    own): one process, or data-parallel under `accelerate launch`."""
    import torch
    from lm_eval.models.huggingface import HFLM

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the harness defaults to cuda, and asserts without it
    size = int(batch_size) if str(batch_size).isdigit() else batch_size
    return HFLM(pretrained=str(model_dir), tokenizer=tokenizer, device=device, batch_size=size, dtype=dtype)


def _number(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _metric_name(metric: str, filter_name: str) -> str:
    """summary.json's name of the harness's `metric,filter` key: the metric alone for the default filter."""
    return metric if filter_name == "none" else f"{metric},{filter_name}"


def _value(value):
    """A per-item metric value as JSON: a number, or a list of numbers (IFEval's per-instruction results)."""
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return float(value)


def _reply(sample: dict, output_type: str) -> str:
    """What the model answered: the generated text (stop strings cut) or the chosen option of a multiple-choice
    item (the continuation of highest log-probability, acc's choice)."""
    if output_type == "generate_until":
        return sample["resps"][0][0]
    lls = [resp[0][0] for resp in sample["resps"]]
    best = max(range(len(lls)), key=lambda i: lls[i])
    return sample["arguments"][best][1].strip()


def _task_score(task: str, metrics: dict, samples: list[dict], n: int, output_type: str) -> TaskScore:
    aggregates, by_doc = {}, {}
    for key, value in metrics.items():
        metric, sep, filter_name = key.partition(",")
        if sep and (_number(value) is not None or metric.endswith("_stderr")):  # a stderr may be "N/A" (n = 1)
            aggregates[_metric_name(metric, filter_name)] = _number(value)
    items: dict[str, dict[int, float]] = {}
    for s in samples:
        doc_id = int(s["doc_id"])
        row = by_doc.setdefault(
            doc_id,
            {
                "doc_id": doc_id,
                "prompt": s["arguments"][0][0],
                "reply": _reply(s, output_type),
                "target": s["target"] if isinstance(s["target"], (str, int, float, list)) else str(s["target"]),
            },
        )
        if s["filter"] != "none":
            row.setdefault("filtered", {})[s["filter"]] = s["filtered_resps"][0]
        for metric in s["metrics"]:
            name = _metric_name(metric, s["filter"])
            row[name] = _value(s[metric])
            items.setdefault(name, {})[doc_id] = row[name]
    for name, values in items.items():
        if any(isinstance(v, list) for v in values.values()):
            # Instruction-level accuracy counts instructions, not prompts: each prompt's score is its followed
            # instructions times (prompts / instructions), so the mean over prompts is the harness's figure and
            # the paired tests still resample whole prompts (the instructions of one prompt are not independent).
            total = sum(len(v) for v in values.values())
            items[name] = {d: sum(v) * len(values) / total if total else 0.0 for d, v in values.items()}
    missing = sorted(set(items) - set(aggregates))
    if missing:
        raise PosttrainError(f"{task}: the harness reported no aggregate of {', '.join(missing)}")
    for name, values in items.items():
        # The harness has no standard error for a custom aggregation (IFEval's inst_level: "N/A"); this one is the
        # mean's over prompts of the values above, whole prompts as the units (a cluster-robust standard error).
        key = _metric_name(f"{name.partition(',')[0]}_stderr", name.partition(",")[2] or "none")
        if aggregates.get(key) is None and len(values) > 1:
            mean = sum(values.values()) / len(values)
            var = sum((v - mean) ** 2 for v in values.values()) / (len(values) - 1)
            aggregates[key] = math.sqrt(var / len(values))
    return TaskScore(n=n, metrics=aggregates, items=items, samples=[by_doc[d] for d in sorted(by_doc)])


def score(lm, tasks: list, chat: bool, system_prompt: str | None = None, limit: int | None = None):
    """{task: TaskScore} of `lm` on `tasks` (from task_configs), with the chat template and the system
    prompt (`chat`) or without either; None on processes other than the main one. In chat scoring a task's
    few-shot examples are turns of the conversation before its question (the harness's default)."""
    import lm_eval

    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        apply_chat_template=chat,
        system_instruction=system_prompt if chat and system_prompt else None,
        limit=limit,
        log_samples=True,
        task_manager=task_manager(tuple(task_name(t) for t in tasks)),
        bootstrap_iters=1000,  # acc's standard error is closed-form; this only bounds other metrics' cost
    )
    if results is None:
        return None
    scores = {}
    for task, metrics in results["results"].items():
        output_type = results["configs"][task].get("output_type", "generate_until")
        n = int(results["n-samples"][task]["effective"])
        scores[task] = _task_score(task, metrics, results["samples"][task], n, output_type)
    return scores


def write_samples(out_dir: Path, scores: dict[str, dict[str, dict[str, TaskScore]]]) -> list[Path]:
    """samples/<model>/<task>.<mode>.jsonl under `out_dir` for {model: {mode: {task: TaskScore}}}: one row per
    item, `doc_id`, `prompt` (the text given to the model, template and few-shot examples included), `reply`,
    `target`, `filtered` (a filter's extracted answer, where the task has filters) and each metric's value."""
    written = []
    for model, modes in scores.items():
        for mode, tasks in modes.items():
            for task, task_score in tasks.items():
                path = Path(out_dir) / SAMPLES_DIR / model / f"{task}.{mode}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                lines = [json.dumps(_finite(row), ensure_ascii=False) for row in task_score.samples]
                path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
                written.append(path)
    return written


def _finite(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
