"""Where an output goes and the modes it gets: the resolved output path, and the umask's modes.

Paths are resolved first, so `.`, `..` and `foo/..` name a real directory. Every file a tool
writes gets the mode the umask gives (0666/0777 less it), not the private 0600 of the temporary
files libraries write through, so another user of a shared cluster can load the model.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from posttrain.outputs.errors import PosttrainError


def umask() -> int:
    """The process umask, read without setting it where Linux allows (os.umask briefly
    sets it to 0 for every thread)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            return int(next(ln for ln in fh if ln.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def resolve_output(path: str | os.PathLike) -> Path:
    final = Path(path).resolve()
    if not final.name:
        raise PosttrainError(f"output directory {path} is the file system root")
    parent = next(p for p in final.parents if p.exists())
    if not parent.is_dir():
        raise PosttrainError(f"output directory {path}: {parent} is a file, not a directory")
    return final


def make_readable(root: Path) -> None:
    """Give every file and directory under `root` the mode the umask says (0666/0777 less it; a file
    with any execute bit keeps one): libraries that write through private temporary files (safetensors
    does, 0600) would leave a model other users and servers cannot load."""
    mask = umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            mode = os.stat(p).st_mode
            os.chmod(p, (0o777 if mode & 0o111 else 0o666) & ~mask)
