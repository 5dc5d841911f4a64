"""Command-line input every tool shares: one spelling rule, a suggestion for a mistyped name, local paths.

- Every flag is accepted with dashes or underscores (`--output-dir` and `--output_dir`), as the stages'
  HfArgumentParser already does for their recipe keys; `ArgumentParser` gives the argparse tools the same.
- An unknown flag or key names the closest known one ("did you mean --learning_rate?").
- A model, tokenizer or data path that looks local is never sent to the Hub: `looks_local` says which
  names are paths, and `missing_local_path` refuses one that is not there, in one line.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from posttrain.outputs.errors import PosttrainError, die

# The program name a command shows in its usage line when `posttrain` started it under `accelerate launch`.
PROG_ENV = "POSTTRAIN_PROG"


def _plain(name: str) -> str:
    return name.lstrip("-").replace("-", "_").lower()


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name nearest to `name` (dashes and underscores count as the same), or None."""
    by_plain: dict[str, str] = {}
    for k in known:
        by_plain.setdefault(_plain(k), k)
    found = difflib.get_close_matches(_plain(name), list(by_plain), n=1, cutoff=0.6)
    return by_plain[found[0]] if found else None


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest known name, or ''."""
    found = closest(name, known)
    return f" (did you mean {found}?)" if found else ""


def respelled(flag: str, known: Iterable[str]) -> str:
    """`--output_dir` as `--output-dir` (or the other way round) when only that spelling is known."""
    known = set(known)
    if flag in known or not flag.startswith("--"):
        return flag
    for alt in ("--" + flag[2:].replace("_", "-"), "--" + flag[2:].replace("-", "_")):
        if alt in known:
            return alt
    return flag


class ArgumentParser(argparse.ArgumentParser):
    """argparse with both spellings of every flag and one-line errors that suggest the flag meant.

    `--output_dir X`, `--output-dir X` and `--output_dir=X` are the same flag; an unknown flag is one line
    `error: PROG: unrecognized argument --outptu-dir (did you mean --output-dir?)`, exit 2, also when a
    required flag is missing because it was misspelled.
    """

    _seen: list[str]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if os.environ.get(PROG_ENV):  # started as `posttrain COMMAND`
            self.prog = os.environ[PROG_ENV]

    def _long_flags(self) -> list[str]:
        return [s for s in self._option_string_actions if s.startswith("--")]

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        known = self._long_flags()
        out = []
        for i, arg in enumerate(args):
            if arg == "--":
                out += args[i:]
                break
            if arg.startswith("--"):
                flag, eq, value = arg.partition("=")
                arg = respelled(flag, known) + eq + value
            out.append(arg)
        self._seen = out
        return super().parse_known_args(out, namespace)

    def _unknown_flags(self, words: Iterable[str]) -> list[str]:
        known = self._long_flags()
        flags = [w.partition("=")[0] for w in words if w.startswith("--") and w != "--"]
        # argparse takes an unambiguous prefix (--over for --overwrite): that is not unknown
        return [f for f in flags if not any(k.startswith(f) for k in known)]

    def error(self, message: str):
        known = self._long_flags()
        unknown = self._unknown_flags(getattr(self, "_seen", []))
        if message.startswith("unrecognized arguments: ") and unknown:
            named = ", ".join(f"{flag}{did_you_mean(flag, known)}" for flag in unknown)
            message = f"unrecognized argument{'s' if len(unknown) > 1 else ''} {named}"
        elif unknown:  # e.g. a required flag reported missing because it was misspelled
            named = ", ".join(f"{flag}{did_you_mean(flag, known)}" for flag in unknown)
            message = f"{message}; not a flag: {named}"
        die(f"{self.prog}: {message} (see {self.prog} --help)")


# ------------------------------------------------------------------ local paths

# Suffixes of files a tool reads: a name ending in one is a local file, never a hub id.
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".yaml", ".yml", ".jinja", ".j2", ".pt", ".safetensors")


def looks_local(name: str | os.PathLike) -> bool:
    """Whether `name` is a local path rather than a hub id (`org/name` or `name`).

    Local: it exists; it starts with `.`, `~` or `/` (or is absolute); it has a backslash or more than one
    `/`; it ends in a file suffix (.jsonl, .json, .parquet, ...); or its first part is a local directory
    (`demo_runs/convertd` when `demo_runs/` is here). Anything else is left to the Hub.
    """
    text = os.fspath(name)
    if not text:
        return False
    path = Path(text)
    if path.exists() or text.startswith((".", "~", "/")) or path.is_absolute() or "\\" in text:
        return True
    parts = text.split("/")
    if len(parts) > 2 or not all(parts) or text.endswith(_FILE_SUFFIXES):
        return True
    return len(parts) == 2 and Path(parts[0]).is_dir()


def missing_local_path(key: str, name: str | os.PathLike | None) -> PosttrainError | None:
    """One line for a local-looking `name` (the value of `key`) that does not exist, else None.

    The line names the key and the path, and the nearest existing sibling when there is one
    (`demo_runs/convertd` -> did you mean demo_runs/converted?)."""
    if not name or not looks_local(name):
        return None
    path = Path(os.path.expanduser(os.fspath(name)))
    if path.exists():
        return None
    parent = path.parent
    hint = ""
    if parent.is_dir():
        with_sep = os.fspath(name).rstrip("/")
        siblings = [p.name for p in parent.iterdir()]
        found = closest(path.name, siblings)
        if found:
            hint = f" (did you mean {with_sep[: len(with_sep) - len(path.name)]}{found}?)"
    else:
        hint = f" ({parent} does not exist either)"
    return PosttrainError(f"{key}: {name}: cannot find this local path{hint} (a path, so not looked up on the Hub)")


def refuse_missing_local_paths(values: dict[str, object]) -> None:
    """Raise the one line of `missing_local_path` for the first missing local path of {key: value}."""
    for key, value in values.items():
        error = missing_local_path(key, value) if isinstance(value, (str, os.PathLike)) else None
        if error:
            raise error


def hub_model_problem(key: str, name: str | None, revision: str | None = None) -> PosttrainError | None:
    """For a name that looks like a hub id: one line when the Hub cannot be reached or has no such model, from
    one request without retries (transformers would retry five times, printing each, for ~25 s); None when it
    is there or cached, when offline mode is on (the libraries then fail at once, in one line), or for a path."""
    if not name or looks_local(name) or Path(name).exists():
        return None
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        HfApi().repo_info(name, revision=revision)
    except Exception as err:  # RepositoryNotFoundError, a connection error, ...
        if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
            return None  # the cache has it: transformers will use it
        detail = str(err).splitlines()[0] if str(err) else ""
        return PosttrainError(
            f"{key}: {name}: not found on the Hub ({type(err).__name__}: {detail}); "
            f"for a local directory, give its path (./{name})"
        )
    return None
