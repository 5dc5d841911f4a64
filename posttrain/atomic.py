"""Write outputs to a temporary sibling path and rename them into place.

A crash, a Ctrl-C or a bad input must never leave a half-written model or
dataset where the next stage would pick it up.

Paths are resolved first, so `.`, `..` and `foo/..` name a real directory, and
an output directory that is a symlink has its *target* replaced (the link stays
and points at the new contents). An output directory is replaced as a whole,
so one that holds an input (a checkpoint, a tokenizer, a data file) is refused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from posttrain.errors import PosttrainError


def _umask() -> int:
    """The process umask, read without setting it where Linux allows (os.umask briefly
    sets it to 0 for every thread)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            return int(next(ln for ln in fh if ln.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_dir(path: str | os.PathLike, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """The resolved output directory; refuse a non-empty one unless overwrite is set, and
    refuse one that is or holds any of `inputs` (replacing it would delete them)."""
    final = Path(path).resolve()
    if not final.name:
        raise PosttrainError(f"output directory {path} is the file system root")
    for item in inputs:
        resolved = Path(item).resolve()
        if resolved == final or final in resolved.parents:
            raise PosttrainError(
                f"input {item} is inside the output directory {path}, which is replaced as a whole; "
                "choose another --output-dir"
            )
    if final.exists() and not final.is_dir():
        raise PosttrainError(f"output path {path} exists and is not a directory")
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise PosttrainError(f"output directory {path} is not empty; pass --overwrite to replace it")
    return final


@contextlib.contextmanager
def atomic_output_dir(
    path: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success it replaces `path`.

    On any exception (in the body or in the renames) the temporary directory is
    removed and `path` is as it was. The result gets the usual mode (0777 less
    the umask), not mkdtemp's 0700, so other users and servers can read it.
    """
    final = check_output_dir(path, overwrite, inputs)
    cwd = None
    with contextlib.suppress(OSError):  # the current directory may itself have been deleted
        cwd = Path.cwd()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    moved = False
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())
        if final.exists():
            final.rename(old)
            moved = True
        tmp.rename(final)
    except BaseException:
        if moved and not final.exists():
            old.rename(final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if moved:
        shutil.rmtree(old, ignore_errors=True)
    if cwd is not None and (cwd == final or final in cwd.parents):  # this process stands in the deleted one
        os.chdir(cwd if cwd.is_dir() else final)
        print(
            f"note: {path} was replaced by a new directory; a shell inside it must `cd {final}` to see it",
            file=sys.stderr,
        )


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary file and an atomic rename (mode 0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
