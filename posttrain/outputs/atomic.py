"""Whole results: an output directory (or file) appears complete or not at all.

    with output_lock(out):                      # one writer per output directory (posttrain.outputs.lock)
        ...check every input...
        with atomic_output_dir(out, overwrite, inputs, needed_bytes=n) as tmp:
            ...write into tmp...                # renamed over `out` only when the body succeeds

A crash, a Ctrl-C, a full disk or a bad input must never leave a half-written model or dataset
where the next stage would pick it up. An output directory that is a symlink has its *target*
replaced (the link stays and points at the new contents). An output directory is replaced as a
whole, so one that holds an input (a checkpoint, a tokenizer, a data file), or lies inside an
input directory, is refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from posttrain.outputs.errors import PosttrainError, file_system_error, human_bytes, os_errno
from posttrain.outputs.lock import output_lock
from posttrain.outputs.paths import make_readable, resolve_output, umask


def check_output_dir(path: str | os.PathLike, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """The resolved output directory; refuse a non-empty one unless overwrite is set, and refuse
    one that is or holds any of `inputs` (replacing it would delete them) or lies inside an input
    directory (a later read of that input would find this output in it)."""
    final = resolve_output(path)
    for item in inputs:
        resolved = Path(item).resolve()
        if resolved == final or final in resolved.parents:
            raise PosttrainError(
                f"input {item} is inside the output directory {path}, which is replaced as a whole; "
                "choose another --output-dir"
            )
        if resolved in final.parents and resolved.is_dir():
            raise PosttrainError(
                f"output directory {path} is inside the input directory {item}; choose an --output-dir outside it"
            )
    if final.exists() and not final.is_dir():
        raise PosttrainError(f"output path {path} exists and is not a directory")
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise PosttrainError(f"output directory {path} is not empty; pass --overwrite to replace it")
    return final


def check_free_space(where: Path, needed_bytes: int, what: str) -> None:
    free = shutil.disk_usage(where).free
    if free < needed_bytes:
        raise PosttrainError(
            f"cannot write {what}: about {human_bytes(needed_bytes)} needed, {human_bytes(free)} free ({where})"
        )


@contextlib.contextmanager
def atomic_output_dir(
    path: str | os.PathLike,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    needed_bytes: int | None = None,
) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success it replaces `path`.

    Holds `output_lock(path)` (a no-op if the caller already does). With `needed_bytes`, too
    little free space is refused before anything is written. On any exception (in the body or
    in the renames) the temporary directory is removed and `path` is as it was; a full disk,
    a read-only location and the like are one line naming the path. The result gets the usual
    modes (0777/0666 less the umask), not the private ones of temporary files.
    """
    cwd = None
    with contextlib.suppress(OSError):  # the current directory may itself have been deleted
        cwd = Path.cwd()
    with output_lock(path):
        final = check_output_dir(path, overwrite, inputs)
        try:
            if needed_bytes is not None:
                check_free_space(final.parent, needed_bytes, f"output directory {path}")
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        except OSError as err:
            raise file_system_error(err, f"output directory {path}", final.parent) or err from None
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        moved = False
        try:
            yield tmp
            make_readable(tmp)
            if final.exists():
                final.rename(old)
                moved = True
            tmp.rename(final)
        except BaseException as err:
            if moved and not final.exists():
                old.rename(final)
            shutil.rmtree(tmp, ignore_errors=True)
            fs_error = file_system_error(err, f"output directory {path}", final.parent)
            if fs_error is not None and os_errno(err) in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                if needed_bytes is not None:
                    fs_error = PosttrainError(f"{fs_error}; about {human_bytes(needed_bytes)} needed")
                raise PosttrainError(f"{fs_error}; nothing was written") from None
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
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_output_file(path: str | os.PathLike, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """The resolved output file; refuse an existing one unless overwrite is set, a directory, an input
    itself, and a path inside an input directory (a later read of that input would find it there)."""
    final = resolve_output(path)
    for item in inputs:
        resolved = Path(item).resolve()
        if resolved == final:
            raise PosttrainError(f"output {path} is the input {item}; choose another output path")
        if resolved in final.parents and resolved.is_dir():
            raise PosttrainError(f"output {path} is inside the input directory {item}; choose a path outside it")
    if final.is_dir():
        raise PosttrainError(f"output {path} is a directory; name the file to write")
    if final.exists() and not overwrite:
        raise PosttrainError(f"output {path} exists; pass --overwrite to replace it")
    return final


@contextlib.contextmanager
def atomic_output_file(
    path: str | os.PathLike,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    needed_bytes: int | None = None,
) -> Iterator[Path]:
    """Yield a temporary file path next to `path`; on success it is renamed over `path`.

    The file counterpart of `atomic_output_dir`, with the same lock, checks and promises: on any
    exception the temporary file is removed and `path` is as it was, a file-system fault is one line,
    and the result gets mode 0666 less the umask.
    """
    with output_lock(path):
        final = check_output_file(path, overwrite, inputs)
        try:
            if needed_bytes is not None:
                check_free_space(final.parent, needed_bytes, f"output {path}")
            fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
            os.close(fd)
        except OSError as err:
            raise file_system_error(err, f"output {path}", final.parent) or err from None
        tmp = Path(name)
        try:
            yield tmp
            os.chmod(tmp, 0o666 & ~umask())
            os.replace(tmp, final)
        except BaseException as err:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            fs_error = file_system_error(err, f"output {path}", final.parent)
            if fs_error is not None and os_errno(err) in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise PosttrainError(f"{fs_error}; nothing was written") from None
            raise
