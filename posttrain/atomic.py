"""Write outputs to a temporary sibling path and rename them into place.

A crash, a Ctrl-C or a bad input must never leave a half-written model or
dataset where the next stage would pick it up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from posttrain.errors import PosttrainError


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a non-empty output directory unless overwrite is set."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PosttrainError(f"output path {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise PosttrainError(f"output directory {path} is not empty; pass --overwrite to replace it")
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success it replaces `path`.

    On any exception the temporary directory is removed and `path` is untouched.
    """
    final = check_output_dir(path, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
