"""The plumbing `data_scripts/prepare_sft.py` and `prepare_dpo.py` share.

load (hub id, a local copy of the hub repo, or local files in the dataset's own
schema) -> adapt each row (`posttrain.prep_adapters`), counting drops by reason
-> drop duplicates by normalised content -> [drop rows holding an evaluation
item, `--decontaminate`] -> [token lengths with the chat
template; DPO drops prompts that leave no room for a response] -> seeded
shuffle, `--max-samples` -> test split -> train.jsonl, test.jsonl, meta.json,
written to a temporary directory and renamed.

Heavy steps are `datasets` batched maps (`--num-proc` workers) and batched
fast-tokenizer calls; what stays in Python is one pass over a column of hashes.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import json
import math
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from posttrain.conversion.chat_template import find_control_token
from posttrain.conversion.tokenizer import load_chat_tokenizer
from posttrain.data import adapters
from posttrain.data.decontaminate import DEFAULT_NGRAM, MIN_NGRAM, Matcher, evaluation_texts
from posttrain.data.lengths import conversation_fits, count_chat_tokens, prompt_fits
from posttrain.data.loading import EmptyRowsError, check_json_file, load_errors, load_source
from posttrain.data.messages import NON_TEXT_PART
from posttrain.outputs.atomic import atomic_output_dir, check_output_dir
from posttrain.outputs.errors import PosttrainError, die, run_cli
from posttrain.outputs.flags import ArgumentParser
from posttrain.outputs.lock import output_lock

MAX_SEED = 2**32 - 1  # numpy's seed range, which datasets' shuffle uses
# The drop reason of a row holding an evaluation item: `evaluation_overlap:FILE`, one per --decontaminate file.
EVALUATION_OVERLAP = "evaluation_overlap"


@dataclass(frozen=True)
class Source:
    """Where one `--dataset NAME` lives and which adapter reads its schema."""

    adapter: Callable[[dict, str | None], dict]
    hub_id: str | None = None  # None: local files only (--data-files)
    train_split: str = "train"
    test_split: str | None = None  # the source's own held-out split, used for test.jsonl when present
    config: str | None = None
    regroup: Callable | None = None  # Dataset -> rows, before adapting (oasst message trees)


@dataclass(frozen=True)
class Kind:
    """What differs between SFT and DPO preparation."""

    name: str
    columns: tuple[str, ...]
    drop_reasons: tuple[str, ...]
    val_split: float


SFT = Kind("sft", ("messages",), adapters.SFT_DROP_REASONS, 0.02)
DPO = Kind("dpo", ("prompt", "chosen", "rejected"), adapters.DPO_DROP_REASONS, 0.05)


# ------------------------------------------------------------------------ arguments


def parse_args(kind: Kind, sources: dict[str, Source], argv=None, description: str | None = None):
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(sources), help="source schema and hub dataset")
    p.add_argument("--output-dir", required=True, help="written atomically: train.jsonl, test.jsonl, meta.json")
    p.add_argument(
        "--data-files",
        nargs="+",
        help="local .jsonl/.json/.parquet files in the dataset's own schema (one train split), "
        "or one directory holding a local copy of the hub repository (its own splits)",
    )
    p.add_argument("--hub-id", help="another hub repository with the same schema (e.g. OpenAssistant/oasst1)")
    p.add_argument(
        "--system-prompt",
        default=adapters.DEFAULT_SYSTEM_PROMPT,
        help="put first in every conversation that has no system message of its own ('' for none)",
    )
    p.add_argument(
        "--max-samples",
        type=int,
        help="keep at most N rows of the train split (seeded shuffle, before the val split and the DPO prompt-length filter)",
    )
    p.add_argument(
        "--val-split",
        type=float,
        help="test rows as a fraction of the kept rows, taken from the source's test split when it has one "
        f"(default {kind.val_split})",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--tokenizer",
        help="tokenizer directory, e.g. the converted model (runs/converted), or qwen3 (the built-in Qwen3 "
        "tokenizer): token statistics in meta.json, measured with the ChatML training template",
    )
    p.add_argument("--max-length", type=int, default=2048, help="with --tokenizer: the training sequence length")
    p.add_argument("--num-proc", type=int, default=1, help="worker processes for the batched maps")
    p.add_argument(
        "--decontaminate",
        nargs="+",
        metavar="FILE",
        help="evaluation test splits (.jsonl/.json/.parquet in their hub schema: ARC, OpenBookQA, TruthfulQA, GSM8K, "
        "IFEval, or any with a question or prompt field): drop every row any of whose messages shares a run of "
        "--decontaminate-ngram words with one of their questions, counted per file in meta.json",
    )
    p.add_argument(
        "--decontaminate-ngram",
        type=int,
        default=DEFAULT_NGRAM,
        metavar="N",
        help=f"words in a shared run that make a row contaminated (default {DEFAULT_NGRAM}, as GPT-3 and Tulu 3; "
        f"at least {MIN_NGRAM}); a question shorter than N words counts when it appears whole",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    args = p.parse_args(argv)
    args.val_split_asked = args.val_split is not None  # a default that gives 0 test rows is only a note
    if not args.val_split_asked:
        args.val_split = kind.val_split
    if not 0 <= args.val_split < 1:
        die(f"--val-split must be in [0, 1), got {args.val_split}")
    if not 0 <= args.seed <= MAX_SEED:
        die(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
    for flag in ("max_samples", "max_length", "num_proc"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            die(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.decontaminate_ngram < MIN_NGRAM:
        die(
            f"--decontaminate-ngram must be at least {MIN_NGRAM}, got {args.decontaminate_ngram}: shorter runs of words "
            "are shared by unrelated sentences"
        )
    token = find_control_token(args.system_prompt or "")
    if token:
        die(f"--system-prompt holds the ChatML control token {token} as text")
    return args


# ---------------------------------------------------------------------------- load


@contextlib.contextmanager
def _naming_fields(source: Source, args):
    """A file of empty rows is told which fields --dataset reads."""
    try:
        yield
    except EmptyRowsError as err:
        fields = getattr(source.regroup or source.adapter, "fields", ())
        raise PosttrainError(f"{err}; --dataset {args.dataset} reads the fields {', '.join(fields)}") from None


def load_splits(source: Source, args):
    """(train, held-out test or None) in the source's own schema."""
    with _naming_fields(source, args):
        return _load_splits(source, args)


def _load_splits(source: Source, args):
    import datasets

    if args.data_files and not (len(args.data_files) == 1 and Path(args.data_files[0]).is_dir()):
        for f in args.data_files:
            if Path(f).suffix not in (".jsonl", ".json", ".parquet"):
                raise PosttrainError(f"--data-files {f}: expected .jsonl, .json or .parquet files, or one directory")
        parts = [load_source(f, split="train") for f in args.data_files]
        for f, part in zip(args.data_files[1:], parts[1:]):
            if set(part.column_names) != set(parts[0].column_names):
                raise PosttrainError(
                    f"--data-files {args.data_files[0]} and {f} have different columns "
                    f"({', '.join(parts[0].column_names)} vs {', '.join(part.column_names)})"
                )
        try:
            return datasets.concatenate_datasets(parts), None
        except ValueError as err:
            raise PosttrainError(f"--data-files do not share one schema ({err})".splitlines()[0]) from None
    if args.data_files:  # a local copy of the hub repository
        path = args.data_files[0]
        for f in sorted(p for p in Path(path).rglob("*") if p.suffix in (".jsonl", ".json")):
            check_json_file(f)
        available = datasets.get_dataset_split_names(path, source.config)
        if source.train_split not in available:
            raise PosttrainError(f"{path} has no split {source.train_split!r} (it has {', '.join(available)})")
        test = source.test_split if source.test_split in available else None
    else:
        path = args.hub_id or source.hub_id
        if path is None:
            raise PosttrainError(f"--dataset {args.dataset} reads local files: pass --data-files")
        test = source.test_split
    with load_errors(f"dataset {path}: cannot be loaded"):  # unreachable hub, a schema clash, a corrupt parquet file
        return tuple(
            datasets.load_dataset(path, source.config, split=s) if s else None for s in (source.train_split, test)
        )


# -------------------------------------------------------------------------- clean


def _adapt_batch(batch: dict, adapter, system_prompt, columns):
    """Batched map: adapt each row; dropped rows keep an empty shell and their reason."""
    out = {c: [] for c in (*columns, "_drop", "_key", "_parts")}
    for values in zip(*batch.values()):
        try:
            row, reason = adapter(dict(zip(batch, values)), system_prompt), ""
        except adapters.Drop as drop:
            row, reason = dict.fromkeys(columns, []), drop.reason
        for c in columns:
            out[c].append(row[c])
        out["_drop"].append(reason)
        out["_parts"].append(row.get(adapters.PARTS_KEY, 0))
        normalised = [[m["role"], adapters.normalise(m["content"])] for c in columns for m in row[c]]
        out["_key"].append(hashlib.sha1(json.dumps(normalised).encode()).hexdigest() if not reason else "")
    return out


def _features(kind: Kind, extra: dict):
    from datasets import Features, List, Value

    message = {"role": Value("string"), "content": Value("string")}
    return Features({**{c: List(message) for c in kind.columns}, **extra})


def clean(dataset, source: Source, kind: Kind, args, dropped: Counter, seen: set, parts: Counter):
    """Adapted rows without drops or duplicates (of rows seen before, in this or an earlier split); the
    non-text content parts dropped from the rows kept are counted in `parts`."""
    from datasets import Value

    if source.regroup is not None:
        from datasets import Dataset

        dataset = Dataset.from_list(source.regroup(dataset))
    adapted = _map(
        dataset,
        _adapt_batch,
        args,
        f"Adapting {args.dataset}",
        remove_columns=dataset.column_names,
        features=_features(kind, {"_drop": Value("string"), "_key": Value("string"), "_parts": Value("int64")}),
        fn_kwargs={"adapter": source.adapter, "system_prompt": args.system_prompt, "columns": kind.columns},
    )
    keep = []
    for i, (reason, key, n_parts) in enumerate(zip(adapted["_drop"][:], adapted["_key"][:], adapted["_parts"][:])):
        if not reason and key in seen:
            reason = adapters.DUPLICATE
        if reason:
            dropped[reason] += 1
        else:
            seen.add(key)
            keep.append(i)
            parts[NON_TEXT_PART] += n_parts
    return len(dataset), adapted.select(keep).remove_columns(["_drop", "_key", "_parts"])


def _map(dataset, function, args, desc: str, **kwargs):
    """A batched map over --num-proc worker processes."""
    num_proc = min(args.num_proc, len(dataset)) if args.num_proc > 1 and len(dataset) > 1 else None
    return dataset.map(function, batched=True, num_proc=num_proc, desc=desc, **kwargs)


# ------------------------------------------------------------------ decontamination


@dataclass(frozen=True)
class EvaluationItems:
    """The questions of the --decontaminate files in one matcher; `starts[k]` is file k's first item."""

    files: tuple[str, ...]
    matcher: Matcher
    starts: tuple[int, ...]

    @classmethod
    def read(cls, files: list[str], n: int) -> EvaluationItems:
        texts, starts = [], []
        for path in files:
            starts.append(len(texts))
            texts += evaluation_texts(path)
        return cls(tuple(files), Matcher(texts, n), tuple(starts))

    def reason(self, k: int) -> str:
        return f"{EVALUATION_OVERLAP}:{self.files[k]}"

    def items_per_file(self) -> dict[str, int]:
        ends = (*self.starts[1:], self.matcher.size)
        return {f: end - start for f, start, end in zip(self.files, self.starts, ends)}


def _overlap_batch(batch: dict, evaluation: EvaluationItems, columns):
    """Batched map: the index of the first --decontaminate file with an item in any message of each row, or -1."""
    found = []
    for values in zip(*(batch[c] for c in columns)):
        hits = [i for messages in values for m in messages if (i := evaluation.matcher.find(m["content"])) is not None]
        found.append(bisect.bisect_right(evaluation.starts, min(hits)) - 1 if hits else -1)
    return {"_overlap": found}


def decontaminate(dataset, evaluation: EvaluationItems | None, kind: Kind, args, dropped: Counter):
    """The rows none of whose messages shares a run of n words with an evaluation item; the others counted
    under their file's reason (the first file, in the order given, that has the item)."""
    if evaluation is None or not len(dataset):
        return dataset
    flagged = _map(
        dataset,
        _overlap_batch,
        args,
        "Decontaminating",
        fn_kwargs={"evaluation": evaluation, "columns": kind.columns},
    )
    keep = []
    for i, k in enumerate(flagged["_overlap"][:]):
        if k < 0:
            keep.append(i)
        else:
            dropped[evaluation.reason(k)] += 1
    return dataset.select(keep)


# ------------------------------------------------------------------------- tokens


def _lengths_batch(batch: dict, tokenizer, kind_name: str):
    """Token lengths as the trainers tokenize: the chat template, the prompt with the generation header."""

    if kind_name == "sft":
        return {"_sequence": count_chat_tokens(tokenizer, batch["messages"])}
    chosen = count_chat_tokens(tokenizer, [p + c for p, c in zip(batch["prompt"], batch["chosen"])])
    rejected = count_chat_tokens(tokenizer, [p + r for p, r in zip(batch["prompt"], batch["rejected"])])
    return {
        "_prompt": count_chat_tokens(tokenizer, batch["prompt"], add_generation_prompt=True),
        "_sequence": [max(c, r) for c, r in zip(chosen, rejected)],
    }


def add_lengths(dataset, tokenizer, kind: Kind, args, dropped: Counter):
    """Length columns; for DPO also drop pairs whose prompt fills --max-length (TRL would drop them silently)."""
    dataset = _map(
        dataset, _lengths_batch, args, "Counting tokens", fn_kwargs={"tokenizer": tokenizer, "kind_name": kind.name}
    )
    if "_prompt" in dataset.column_names:  # DPO
        keep = [i for i, n in enumerate(dataset["_prompt"][:]) if prompt_fits(n, args.max_length)]
        dropped[adapters.PROMPT_TOO_LONG] += len(dataset) - len(keep)
        dataset = dataset.select(keep)
    return dataset


def token_stats(lengths: list[int], max_length: int) -> dict:
    """total, mean, nearest-rank p50 / p95, max, and how many exceed max_length."""
    if not lengths:
        return {"rows": 0}
    s = sorted(lengths)

    def rank(p: float) -> int:
        return s[max(math.ceil(p * len(s)) - 1, 0)]

    return {
        "rows": len(s),
        "total": sum(s),
        "mean": round(sum(s) / len(s), 2),
        "p50": rank(0.5),
        "p95": rank(0.95),
        "max": s[-1],
        "over_max_length": sum(not conversation_fits(n, max_length) for n in s),
    }


# ------------------------------------------------------------------------ prepare


def split(train, test, args):
    """Seeded shuffle, --max-samples, and the test rows: from the source's test split when it has one.

    Returns (train, test, unused): unused counts the clean rows left out, past --max-samples or
    past the test rows --val-split asks of a source test split."""
    clean_rows = len(train) + (len(test) if test is not None else 0)
    train = train.shuffle(seed=args.seed)
    if args.max_samples is not None:
        train = train.select(range(min(args.max_samples, len(train))))
    n_test = round(len(train) * args.val_split)
    if len(train) and args.val_split and not n_test:
        message = f"--val-split {args.val_split} of {len(train)} rows is 0 test rows"
        if args.val_split_asked:
            raise PosttrainError(f"{message}; pass a larger --val-split, or 0 for no test split")
        print(f"note: {message}; no test.jsonl is written", file=sys.stderr)
    if test is None and len(train) and n_test >= len(train):
        raise PosttrainError(f"--val-split {args.val_split} of {len(train)} rows leaves no train rows")
    if test is None:
        train, test = train.select(range(n_test, len(train))), train.select(range(n_test))
    else:
        test = test.shuffle(seed=args.seed)
        test = test.select(range(min(n_test, len(test))))
        if n_test and not len(test) and args.val_split_asked:
            raise PosttrainError(f"--val-split {args.val_split}: the source's test split has no usable rows")
    return train, test, clean_rows - len(train) - len(test)


def write_jsonl(path: Path, dataset, columns) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for batch in dataset.select_columns(list(columns)).iter(batch_size=1000):
            for values in zip(*batch.values()):
                fh.write(json.dumps(dict(zip(batch, values)), ensure_ascii=False) + "\n")


@contextlib.contextmanager
def _no_map_cache():
    """Map results go to temporary files, not next to the hub cache (and the global flag is restored)."""
    import datasets

    was_enabled = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_caching()


def prepare(kind: Kind, sources: dict[str, Source], args) -> dict:
    """Run the whole preparation; returns meta (also written as meta.json)."""
    inputs = [*(args.data_files or ()), *([args.tokenizer] if args.tokenizer else ()), *(args.decontaminate or ())]
    check_output_dir(args.output_dir, args.overwrite, inputs)
    source = sources[args.dataset]
    evaluation = EvaluationItems.read(args.decontaminate, args.decontaminate_ngram) if args.decontaminate else None
    tokenizer = load_chat_tokenizer(args.tokenizer) if args.tokenizer else None
    raw_train, raw_test = load_splits(source, args)

    dropped, seen, parts = Counter(dict.fromkeys(kind.drop_reasons, 0)), set(), Counter({NON_TEXT_PART: 0})
    if evaluation is not None:  # every file's reason is listed, a zero count too
        dropped.update({evaluation.reason(k): 0 for k in range(len(evaluation.files))})
    n_source, train = clean(raw_train, source, kind, args, dropped, seen, parts)
    train = decontaminate(train, evaluation, kind, args, dropped)
    test = None
    if raw_test is not None:
        n_test_source, test = clean(raw_test, source, kind, args, dropped, seen, parts)
        test = decontaminate(test, evaluation, kind, args, dropped)
        n_source += n_test_source
    train, test, unused = split(train, test, args)
    if tokenizer is not None:  # after the split: only rows that are written are tokenized
        train, test = (add_lengths(ds, tokenizer, kind, args, dropped) for ds in (train, test))
    if len(train) == 0:
        reasons = ", ".join(f"{r}: {n}" for r, n in dropped.items() if n)
        raise PosttrainError(f"--dataset {args.dataset}: no usable rows in {n_source} source rows ({reasons})")

    meta = {
        "kind": kind.name,
        "dataset": args.dataset,
        "source": {"data_files": args.data_files}
        if args.data_files
        else {"hub_id": args.hub_id or source.hub_id, "config": source.config},
        "source_splits": {"train": source.train_split, "test": source.test_split if raw_test is not None else None},
        "system_prompt": args.system_prompt,
        "seed": args.seed,
        "max_samples": args.max_samples,
        "val_split": args.val_split,
        # source_rows = dropped + unused + train + test
        "counts": {
            "source_rows": n_source,
            "dropped": sum(dropped.values()),
            "unused": unused,
            "train": len(train),
            "test": len(test),
        },
        "dropped": dict(dropped),
        # Not rows: the non-text content parts (images, audio, ...) left out of rows that are kept.
        "dropped_parts": dict(parts),
    }
    if evaluation is not None:
        meta["decontamination"] = {"ngram": args.decontaminate_ngram, "items": evaluation.items_per_file()}
    if tokenizer is not None:
        meta["tokens"] = {"tokenizer": args.tokenizer, "max_length": args.max_length}
        for name, ds in (("train", train), ("test", test)):
            meta["tokens"][name] = {
                col[1:]: token_stats(ds[col][:], args.max_length)
                for col in ("_prompt", "_sequence")
                if col in ds.column_names
            }
    with atomic_output_dir(args.output_dir, overwrite=args.overwrite, inputs=inputs) as tmp:
        write_jsonl(tmp / "train.jsonl", train, kind.columns)
        if len(test):
            write_jsonl(tmp / "test.jsonl", test, kind.columns)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


def main(kind: Kind, sources: dict[str, Source], argv=None, description: str | None = None) -> None:
    """A prepare_*.py entry point: parse, prepare, one summary line; bad input is one error line, exit 2."""
    args = parse_args(kind, sources, argv, description)

    def run():
        with output_lock(args.output_dir), _no_map_cache():  # before any input is read: one run per directory
            meta = prepare(kind, sources, args)
        c = meta["counts"]
        print(
            f"{args.output_dir}: {c['train']} train, {c['test']} test rows; dropped {c['dropped']}"
            + (f", left {c['unused']} unused" if c["unused"] else "")
            + f" of {c['source_rows']}"
        )

    run_cli(run)
