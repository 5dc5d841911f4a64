"""Evaluation items that also appear in the training data: the report's overlap flag.

    files = training_files(["data/sft_tulu3", "data/dpo_ultrafeedback"])   # checked before a model loads
    overlap = task_overlap({"gsm8k": "gsm8k_test.jsonl"}, files)
    # {"gsm8k": {"items": 3, "n": 1319, "ngram": 13, "examples": [0, 17, 212]}}

A task's item overlaps when its question (the field data_scripts' `--decontaminate` reads: question,
question_stem or prompt) occurs in a training row, by the same matcher (posttrain/data/decontaminate.py):
a shared run of 13 words, or an item shorter than that verbatim. Only tasks read from a local file
(`task_files`) in a schema with such a field can be checked; the others are listed as not checked. A score on items the model trained on
measures memory, not skill, so the report marks every figure of such a task.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.data.decontaminate import DEFAULT_NGRAM, Matcher, evaluation_texts, words
from posttrain.outputs.errors import PosttrainError

TRAINING_SUFFIXES = (".jsonl", ".json", ".parquet")
EXAMPLES = 5


def training_files(paths) -> list[Path]:
    """The files `training_data` names: a data_scripts directory (its train.jsonl: what training reads)
    or a .jsonl / .json / .parquet file; one line naming the entry otherwise."""
    files = []
    for entry in paths or []:
        path = Path(entry)
        if path.is_dir():
            path = path / "train.jsonl"
        if not path.is_file():
            raise PosttrainError(
                f"training_data: {entry}: no such file (a data_scripts directory with train.jsonl, or a "
                f"{', '.join(TRAINING_SUFFIXES)} file of training rows)"
            )
        if path.suffix not in TRAINING_SUFFIXES:
            raise PosttrainError(f"training_data: {path} is not a {', '.join(TRAINING_SUFFIXES)} file")
        files.append(path)
    return files


def _strings(value):
    """Every string inside a row (message contents, prompt, chosen, rejected, text ...), in order."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _rows(path: Path):
    from posttrain.data.loading import check_json_file, read_json_rows

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
        return
    check_json_file(path)
    for _, row in read_json_rows(path):
        yield row


def contained(matcher: Matcher, text: str) -> set[int]:
    """Every item of `matcher` that `text` contains (Matcher.find gives only the first)."""
    text_words = words(text)
    found = set()
    for length, table in ((matcher.n, matcher.ngrams), *matcher.short.items()):
        for i in range(len(text_words) - length + 1):
            index = table.get(tuple(text_words[i : i + length]))
            if index is not None:
                found.add(index)
    return found


def task_overlap(task_files: dict[str, str], files: list[Path], n: int = DEFAULT_NGRAM) -> dict[str, dict]:
    """{task: {items, n, ngram, examples}} for each task read from a local file: how many of its items
    occur in any row of `files`, and the indices of the first few."""
    if not files:
        return {}
    matchers = {}
    for task, path in task_files.items():
        try:
            items = evaluation_texts(path)
        except PosttrainError:  # no question field (a task of another schema): listed as not checked
            continue
        matchers[task] = (Matcher(items, n), len(items), {})
    for path in files:
        for row in _rows(path):
            for text in _strings(row):  # each message on its own, as data_scripts' --decontaminate matches
                for matcher, _, hits in matchers.values():
                    for index in contained(matcher, text):
                        hits.setdefault(index, str(path))
    return {
        task: {"items": len(hits), "n": size, "ngram": n, "examples": sorted(hits)[:EXAMPLES]}
        for task, (_, size, hits) in matchers.items()
    }
