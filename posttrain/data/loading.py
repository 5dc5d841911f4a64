"""Load the training data a recipe names, and reject bad rows before training starts.

A recipe names data the way TRL does (`dataset_name`, or a `datasets:` mixture
with weights); each source may be a hub id, a local `.jsonl`/`.json`/`.parquet`
file, or a directory written by `data_scripts/` (`train.jsonl`, `test.jsonl`).
Everything is loaded through `datasets.load_dataset`; this module only maps
local paths to the right builder and turns bad input into one-line errors that
name the file and line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path

from posttrain.conversion.chat_template import find_control_token
from posttrain.data import messages as msg
from posttrain.data.messages import ContentProblem, as_turns, message_problem, reads, text_content, text_messages
from posttrain.outputs.errors import PosttrainError
from posttrain.outputs.flags import looks_local

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800-\udfff: half of a UTF-16 pair


class EmptyRowsError(PosttrainError):
    """Every row of a file is an empty object: the caller knows which fields were expected."""


def _parse_json(text: str, path, lineno: int | None = None):
    """json.loads, with what Python cannot use as text refused in one line: nesting too deep for the
    parser (RecursionError), and strings holding half of a UTF-16 surrogate pair ("\\ud800"), which
    json accepts but no UTF-8 writer or tokenizer can handle."""
    where = f"{path} line {lineno}" if lineno else str(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise PosttrainError(f"{path} line {lineno or err.lineno}: malformed JSON ({err.msg})") from None
    except RecursionError:
        raise PosttrainError(f"{where}: JSON nested too deeply to read") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise PosttrainError(f"{where}: a string holds a lone UTF-16 surrogate (e.g. \\ud800), not text") from None
    return value


def _check_rows_have_fields(path, rows: int, with_fields: int) -> None:
    if rows and not with_fields:
        raise EmptyRowsError(f"{path}: all {rows} rows are empty objects {{}}, with none of the fields the data needs")


def check_jsonl(path: str | Path) -> None:
    """Fail on the first malformed line of a JSON Lines file, naming file and line."""
    rows = with_fields = 0
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = _parse_json(line, path, lineno)
            if not isinstance(row, dict):
                raise PosttrainError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows, with_fields = rows + 1, with_fields + bool(row)
    _check_rows_have_fields(path, rows, with_fields)


def _first_char(path: str | Path) -> str:
    """The first non-space character of a text file ('' if it has none)."""
    with open(path, encoding="utf-8") as fh:
        while chunk := fh.read(1 << 16):
            if stripped := chunk.lstrip():
                return stripped[0]
    return ""


def _is_json_document(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            json.load(fh)
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


def check_json_file(path: str | Path) -> None:
    """Fail on an empty file, or on the first malformed line of a JSON Lines file, naming
    file and line. A `.json` file starting with `[` is an array that must parse (datasets'
    own error names no line); any other `.json` file is JSON Lines, unless it is one valid
    JSON document (a metadata file, say), which is left to datasets."""
    path = Path(path)
    try:
        first = _first_char(path)
        if not first:
            raise PosttrainError(f"{path}: file is empty")
        if path.suffix == ".json" and first == "[":
            rows = _parse_json(path.read_text(encoding="utf-8"), path)
            _check_rows_have_fields(path, len(rows), sum(bool(r) for r in rows if isinstance(r, dict)))
            return
        try:
            check_jsonl(path)
        except PosttrainError:  # read the whole file only when it is not clean JSON Lines
            if path.suffix == ".jsonl" or not _is_json_document(path):
                raise
    except json.JSONDecodeError as err:
        raise PosttrainError(f"{path} line {err.lineno}: malformed JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise PosttrainError(f"{path}: not UTF-8 text ({err.reason})") from None


def read_json_rows(path: str | Path):
    """(`line N` or `row N`, row) of a JSON Lines file or a JSON array (checked first with check_json_file)."""
    with open(path, encoding="utf-8") as fh:
        if fh.read(1 << 12).lstrip().startswith("["):
            fh.seek(0)
            yield from ((f"row {i}", row) for i, row in enumerate(json.load(fh), 1))
            return
        fh.seek(0)
        yield from ((f"line {i}", json.loads(line)) for i, line in enumerate(fh, 1) if line.strip())


def _local_data_files(name: str | Path) -> tuple[str, dict[str, str]] | None:
    """(builder, {split: file}) for a local file or data_scripts directory, else None (a hub id)."""
    path = Path(name)
    if path.is_dir():
        files = {split: path / f"{split}.jsonl" for split in ("train", "test")}
        files = {s: f for s, f in files.items() if f.exists()}
        if "train" not in files:
            raise PosttrainError(f"dataset directory {path} has no train.jsonl (write one with data_scripts/)")
        for f in files.values():
            check_json_file(f)
        return "json", {s: str(f) for s, f in files.items()}
    if path.suffix in _BUILDERS:
        if not path.exists():
            raise PosttrainError(f"dataset file {path} not found")
        if path.suffix in (".jsonl", ".json"):
            check_json_file(path)
        return _BUILDERS[path.suffix], {"train": str(path)}
    if path.exists():
        raise PosttrainError(f"dataset {path}: not a .jsonl/.json/.parquet file or a data_scripts directory")
    if looks_local(name):  # never sent to the Hub: a path that starts with . ~ /, or under a local directory
        raise PosttrainError(f"dataset {path} not found (prepare it with data_scripts/prepare_*.py)")
    return None


@contextlib.contextmanager
def load_errors(what: str):
    """Turn a `datasets` loading failure (ConnectionError offline, DatasetNotFoundError,
    FileNotFoundError, a schema clash) into one line that names what was being loaded."""
    try:
        yield
    except PosttrainError:
        raise
    except Exception as err:
        raise PosttrainError(
            f"{what} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None


def _json_encoded(value, path: list):
    """`value` with every non-null leaf at `path` (keys, 0 for each list item) as its JSON text."""
    if value is None:
        return None
    if not path:
        return json.dumps(value, ensure_ascii=False)
    head, *rest = path
    if head == 0:
        return [_json_encoded(v, rest) for v in value] if isinstance(value, list) else value
    return {**value, head: _json_encoded(value.get(head), rest)} if isinstance(value, dict) else value


def _exact_mixed_values(dataset, file: str):
    """The json builder stores a field whose type differs between rows (a content that is a string in one
    message and a list of parts in the next) as JSON text, but keeps a string that already parses as JSON
    unquoted, so "4" reads back as the number 4 and "null" as None. Such a file is read again here, every
    value of those fields quoted, so each reads back exactly as written. Files of one type per field are
    left as datasets loads them."""
    import datasets
    from datasets.utils.json import get_json_field_paths_from_feature

    paths = get_json_field_paths_from_feature(dataset.features)
    if not paths:
        return dataset
    columns = {name: [] for name in dataset.column_names}
    for _, row in read_json_rows(file):
        for name in columns:
            value = row.get(name)
            for path in paths:
                if path[0] == name:
                    value = _json_encoded(value, path[1:])
            columns[name].append(value)
    return datasets.Dataset.from_dict(columns, features=dataset.features)


def load_source(path: str, name: str | None = None, split: str | None = None, streaming: bool = False):
    """`datasets.load_dataset` for a hub id, a local file or a data_scripts directory.

    Returns a DatasetDict when split is None, else that split.
    """
    import datasets

    local = _local_data_files(path)
    if local is None:
        with load_errors(f"dataset {path}: no such local file or directory, and not loadable as a hub dataset"):
            return datasets.load_dataset(path, name=name, split=split, streaming=streaming)
    builder, files = local
    with load_errors(f"dataset {path}: cannot be loaded"):  # a schema clash between lines, a corrupt parquet file
        ds = datasets.load_dataset(builder, data_files=files, streaming=streaming)
        if builder == "json" and not streaming:
            ds = datasets.DatasetDict({s: _exact_mixed_values(d, files[s]) for s, d in ds.items()})
    if split is None:
        return ds
    if split not in ds:
        raise PosttrainError(f"dataset {path} has no split {split!r} (it has {', '.join(ds)})")
    return ds[split]


def load_datasets(script_args, mixture_args, training_args, validate_rows):
    """(train, eval-or-None) as the recipe names them, every row checked by `validate_rows` before any model
    loads (a streamed dataset is checked by the trainer as it goes)."""
    import datasets

    try:
        train, evaluation = load_train_eval(script_args, mixture_args, want_eval=training_args.eval_strategy != "no")
    except EmptyRowsError as err:
        raise PosttrainError(f"{err}; training reads {', '.join(validate_rows.fields)}") from None
    if mixture_args.datasets:
        source = "mixture " + ",".join(d.path for d in mixture_args.datasets)
    else:
        source = script_args.dataset_name
    checked = {}
    for split, ds in (("train", train), ("eval", evaluation)):
        if isinstance(ds, datasets.Dataset):
            ds = validate_rows(ds, f"{source} ({split})")
        checked[split] = ds
    return checked["train"], checked["eval"]


def load_train_eval(script_args, mixture_args, want_eval: bool):
    """The (train, eval-or-None) datasets a recipe names: `datasets:` mixture or `dataset_name`."""
    import datasets
    from trl import get_dataset

    if mixture_args.datasets:
        # Map local paths to the json/parquet builders, then let TRL mix (with `fraction` weights).
        resolved = []
        for cfg in mixture_args.datasets:
            local = _local_data_files(cfg.path)
            if local is not None:
                builder, files = local
                if cfg.split not in files:
                    raise PosttrainError(f"dataset {cfg.path} has no split {cfg.split!r}")
                cfg = dataclasses.replace(cfg, path=builder, data_files=files[cfg.split], split="train")
            resolved.append(cfg)
        sources = ", ".join(cfg.path for cfg in mixture_args.datasets)
        with load_errors(f"dataset mixture {sources}: cannot be loaded"):
            dsd = get_dataset(dataclasses.replace(mixture_args, datasets=resolved))
        train_split, test_split = "train", "test"
    elif script_args.dataset_name:
        dsd = load_source(
            script_args.dataset_name, script_args.dataset_config, streaming=script_args.dataset_streaming
        )
        train_split, test_split = script_args.dataset_train_split, script_args.dataset_test_split
    else:
        raise PosttrainError("the recipe names no data: set dataset_name or a datasets: mixture")
    if not isinstance(dsd, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        dsd = datasets.DatasetDict({train_split: dsd})
    if train_split not in dsd:
        raise PosttrainError(f"dataset has no split {train_split!r} (it has {', '.join(dsd)})")
    eval_ds = None
    if want_eval:
        if test_split not in dsd:
            raise PosttrainError(
                f"eval_strategy is set but the dataset has no {test_split!r} split; "
                "set eval_strategy: 'no', or test_split_size for a mixture"
            )
        eval_ds = dsd[test_split]
    return dsd[train_split], eval_ds


def _check_messages(messages, where: str, final_assistant: bool = False) -> None:
    problem = message_problem(messages, final_assistant)
    if problem == msg.UNKNOWN_ROLE:
        bad = next(m for m in messages if message_problem([m]))
        raise PosttrainError(f"{where}: {msg.DESCRIPTIONS[problem]}, got {bad!r}"[:300])
    if problem and problem != msg.EMPTY_FINAL_ASSISTANT:  # an empty response is named by the callers
        raise PosttrainError(f"{where}: {msg.DESCRIPTIONS[problem]}")


def _refuse_control_tokens(messages: list[dict], where: str) -> None:
    """A control token written as text would be tokenized as the token itself (see find_control_token)."""
    for j, m in enumerate(messages, 1):
        token = find_control_token(m["content"])
        if token:
            raise PosttrainError(
                f"{where}: message {j} ({m['role']}) holds the ChatML control token {token} as text; "
                "remove it (data_scripts drops such rows)"
            )


def _text_turns(value, role: str, where: str) -> list:
    """A column's value as messages with text content: TRL's string form is one `role` message, content
    parts are read as text (posttrain.data.messages.text_content); a content that is not text is one line."""
    turns = as_turns(value, role)
    try:
        return text_messages(turns)
    except ContentProblem as problem:
        bad = next(m for m in turns if isinstance(m, dict) and _content_problem(m.get("content")))
        raise PosttrainError(f"{where}: {msg.DESCRIPTIONS[problem.reason]}, got {bad!r}"[:300]) from None


def _content_problem(content) -> bool:
    try:
        text_content(content)
    except ContentProblem:
        return True
    return False


def _as_conversational(dataset, source: str, roles: dict[str, str], merged: str | None = None):
    """The dataset with each column of `roles` as messages with text content (see _text_turns); with
    `merged`, those columns joined, in order, into that one column instead. Rebuilt only when a row needed
    it; the non-text content parts left out are counted in one printed line."""
    columns = {c: dataset[c] for c in roles}
    converted, n_parts, changed = {c: [] for c in roles}, 0, merged is not None
    for c, role in roles.items():
        for i, value in enumerate(columns[c], 1):
            turns, parts = _text_turns(value, role, f"dataset {source} row {i} {c}")
            converted[c].append(turns)
            n_parts, changed = n_parts + parts, changed or turns != value
    if not changed:
        return dataset
    if n_parts:
        from accelerate import PartialState

        PartialState().print(
            f"note: dataset {source}: left out {n_parts} non-text content parts (images, audio, ...) "
            f"({msg.NON_TEXT_PART}); training reads the text parts"
        )
    if merged is not None:
        converted = {merged: [sum(turns, []) for turns in zip(*converted.values())]}
    for c, values in converted.items():  # added beside the old columns first: a table never has none
        dataset = dataset.add_column(f"_text_{c}", values)
    dataset = dataset.remove_columns(list(roles))
    return dataset.rename_columns({f"_text_{c}": c for c in converted})


@reads("messages")
def validate_sft_rows(dataset, source: str):
    """Every row is a conversation with at least one non-empty assistant turn; returns the dataset with
    text content (content parts joined) and TRL's prompt-completion rows as `messages`."""
    columns = set(dataset.column_names)
    if "messages" in columns:
        dataset = _as_conversational(dataset, source, {"messages": "user"})
    elif {"prompt", "completion"} <= columns:
        dataset = _as_conversational(dataset, source, {"prompt": "user", "completion": "assistant"}, "messages")
    else:
        raise PosttrainError(
            f"dataset {source}: SFT needs a 'messages' column, or 'prompt' and 'completion' "
            f"(has {', '.join(dataset.column_names)})"
        )
    for i, messages in enumerate(dataset["messages"], 1):
        where = f"dataset {source} row {i}"
        _check_messages(messages, where)
        _refuse_control_tokens(messages, where)
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise PosttrainError(f"{where}: no assistant turn to train on")
    return dataset


@reads("prompt", "chosen", "rejected")
def validate_preference_rows(dataset, source: str):
    """Every row has prompt messages and one non-empty assistant message each for chosen and rejected,
    and some pair differs (a pair whose chosen is its rejected carries no preference); returns the dataset
    with text content (content parts joined) and TRL's string form as messages (a string prompt is one user
    turn, a string chosen / rejected one assistant turn)."""
    missing = {"prompt", "chosen", "rejected"} - set(dataset.column_names)
    if missing:
        raise PosttrainError(
            f"dataset {source}: preference data needs columns prompt, chosen, rejected (missing {', '.join(sorted(missing))})"
        )
    dataset = _as_conversational(dataset, source, {"prompt": "user", "chosen": "assistant", "rejected": "assistant"})
    identical = 0
    for i, row in enumerate(dataset, 1):
        where = f"dataset {source} row {i}"
        _check_messages(row["prompt"], f"{where} prompt")
        for key in ("chosen", "rejected"):
            _check_messages(row[key], f"{where} {key}", final_assistant=True)
            if not row[key][-1]["content"].strip():
                raise PosttrainError(f"{where}: empty {key} response")
        for key in ("prompt", "chosen", "rejected"):
            _refuse_control_tokens(row[key], f"{where} {key}")
        identical += row["chosen"] == row["rejected"]
    if identical and identical == len(dataset):
        raise PosttrainError(
            f"dataset {source}: in every one of its {identical} pairs chosen is identical to rejected, "
            "so there is no preference to learn"
        )
    return dataset
