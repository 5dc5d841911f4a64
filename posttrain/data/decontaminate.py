"""Evaluation items in training data: the one n-gram matcher behind data_scripts' `--decontaminate` and
evaluate.py's overlap flag.

    matcher = Matcher(evaluation_texts("gsm8k_test.jsonl"), n=13)
    matcher.find("... a conversation ...")      # index of the first evaluation item it contains, or None

A text contains an evaluation item when they share a run of `n` words (13 by default, as GPT-3 and
Tulu 3 decontaminate); an item shorter than `n` words is contained when all of its words appear in
the text in order, side by side (verbatim, whatever surrounds it). Words are the text's runs of
letters and digits, case-folded, so punctuation, spacing and case do not hide a copy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from posttrain.outputs.errors import PosttrainError

DEFAULT_NGRAM = 13
MIN_NGRAM = 4  # shorter runs are shared by unrelated sentences ("what is the capital")
_WORD = re.compile(r"\w+")

# The field holding each evaluation schema's question: ARC, GSM8K, TruthfulQA (question),
# OpenBookQA (question_stem), IFEval (prompt); any other JSONL with a question or prompt field.
QUESTION_FIELDS = ("question", "question_stem", "prompt")


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


class Matcher:
    """Finds which evaluation item, if any, a text contains (see the module docstring)."""

    def __init__(self, items: Iterable[str], n: int = DEFAULT_NGRAM):
        if n < MIN_NGRAM:
            raise PosttrainError(f"an n-gram match needs n >= {MIN_NGRAM} words (got {n})")
        self.n = n
        self.ngrams: dict[tuple[str, ...], int] = {}  # each n-word run of the items -> its first item
        self.short: dict[int, dict[tuple[str, ...], int]] = {}  # items under n words, by their length
        self.size = 0
        for index, item in enumerate(items):
            self.size += 1
            item_words = tuple(words(item))
            if not item_words:
                continue
            if len(item_words) < n:
                self.short.setdefault(len(item_words), {}).setdefault(item_words, index)
                continue
            for i in range(len(item_words) - n + 1):
                self.ngrams.setdefault(item_words[i : i + n], index)

    def find(self, text: str) -> int | None:
        """The index of the first item `text` contains (in the order the items were given), or None."""
        text_words = words(text)
        found = None
        for length, table in ((self.n, self.ngrams), *self.short.items()):
            for i in range(len(text_words) - length + 1):
                index = table.get(tuple(text_words[i : i + length]))
                if index is not None and (found is None or index < found):
                    found = index
        return found


def evaluation_texts(path: str | Path) -> list[str]:
    """The question of every row of an evaluation file (.jsonl, .json or .parquet in the hub dataset's
    schema); one line naming the file when no row has a question field."""
    from posttrain.data.loading import check_json_file, read_json_rows

    path = Path(path)
    if not path.is_file():
        raise PosttrainError(f"evaluation file {path} not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        check_json_file(path)
        rows = [row for _, row in read_json_rows(path)]
    else:
        raise PosttrainError(f"evaluation file {path}: expected .jsonl, .json or .parquet")
    texts = []
    for row in rows:
        field = next((f for f in QUESTION_FIELDS if isinstance(row, dict) and isinstance(row.get(f), str)), None)
        if field is not None:
            texts.append(row[field])
    if not texts:
        raise PosttrainError(
            f"evaluation file {path}: no row has a question field ({', '.join(QUESTION_FIELDS)}), so there is "
            "nothing to match training rows against"
        )
    return texts
