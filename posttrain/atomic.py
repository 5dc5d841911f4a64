"""The output-directory contract: one writer, whole results, usual permissions.

    with output_lock(out):                      # one writer per output directory
        ...check every input...
        with atomic_output_dir(out, overwrite, inputs, needed_bytes=n) as tmp:
            ...write into tmp...                # renamed over `out` only when the body succeeds

A crash, a Ctrl-C, a full disk or a bad input must never leave a half-written
model or dataset where the next stage would pick it up, and two runs must never
write into one directory at the same time (both would report success, one result
would be lost).

Paths are resolved first, so `.`, `..` and `foo/..` name a real directory, and
an output directory that is a symlink has its *target* replaced (the link stays
and points at the new contents). An output directory is replaced as a whole,
so one that holds an input (a checkpoint, a tokenizer, a data file), or lies
inside an input directory, is refused.

The lock is a file `.NAME.lock` beside the output directory (the directory itself
is replaced, so it cannot hold its lock), holding "PID HOST". Its creator also
holds an flock on it, released by the kernel when the process dies however it
dies, so a lock on this host whose flock is free is stale and is taken over, with
a note. A lock written on another host cannot be checked and is refused with the
command that removes it. Whoever holds the lock first removes what killed runs
left beside the directory (`.NAME.tmp-*`; `.NAME.old-*`, which is put back if the
directory itself is missing: a kill between the two renames of a replacement).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from posttrain.errors import PosttrainError

# Lock files held by this process or an ancestor ("LOCKFILE=PID" entries, os.pathsep-separated): a child
# started by the holder (a launcher's worker) writes under its parent's lock without taking it again.
LOCKS_ENV = "POSTTRAIN_OUTPUT_LOCKS"

_FS_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a parent is not a directory",
    errno.EEXIST: "a parent is not a directory",
}
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _umask() -> int:
    """The process umask, read without setting it where Linux allows (os.umask briefly
    sets it to 0 for every thread)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            return int(next(ln for ln in fh if ln.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def os_errno(err: BaseException) -> int | None:
    """The errno of an OSError, or of a library error that only quotes it ("... (os error 28)", as
    safetensors' and tokenizers' Rust I/O errors do)."""
    if isinstance(err, OSError) and err.errno:
        return err.errno
    found = re.search(r"\(os error (\d+)\)", str(err))
    return int(found.group(1)) if found else None


def file_system_error(err: BaseException, what: str, where: str | os.PathLike) -> PosttrainError | None:
    """One line for a write that failed for a reason of the file system (full, read-only, not
    permitted, a parent that is a file) at `where`; None for any other error."""
    code = os_errno(err)
    if code not in _FS_REASONS:
        return None
    detail = ""
    if code in (errno.ENOSPC, errno.EDQUOT):
        with contextlib.suppress(OSError):
            detail = f", {human_bytes(shutil.disk_usage(where).free)} free there"
    return PosttrainError(f"cannot write {what}: {_FS_REASONS[code]} ({where}{detail})")


def _resolve_output(path: str | os.PathLike) -> Path:
    final = Path(path).resolve()
    if not final.name:
        raise PosttrainError(f"output directory {path} is the file system root")
    parent = next(p for p in final.parents if p.exists())
    if not parent.is_dir():
        raise PosttrainError(f"output directory {path}: {parent} is a file, not a directory")
    return final


def check_output_dir(path: str | os.PathLike, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """The resolved output directory; refuse a non-empty one unless overwrite is set, and refuse
    one that is or holds any of `inputs` (replacing it would delete them) or lies inside an input
    directory (a later read of that input would find this output in it)."""
    final = _resolve_output(path)
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


# ------------------------------------------------------------------------------------ the lock


def lock_file(path: str | os.PathLike) -> Path:
    """Where the lock of output directory `path` lives: `.NAME.lock` beside it."""
    final = _resolve_output(path)
    return final.with_name(f".{final.name}.lock")


def _flock(fd: int) -> bool | None:
    """Take the flock without waiting: True, False if another process holds it, None if unsupported here."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        if err.errno in _NO_FLOCK:
            return None
        raise
    return True


def _alive(pid: int | None) -> bool:
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _owner(lock: Path) -> tuple[int | None, str | None]:
    """(pid, host) written in a lock file; (None, None) if it is unreadable or garbled."""
    with contextlib.suppress(OSError, ValueError):
        pid, host = lock.read_text(encoding="utf-8").split()
        return int(pid), host
    return None, None


def _create_lock(lock: Path, owner: str) -> int | None:
    """Create the lock file, complete and flocked before its name appears; None if it exists."""
    fd, tmp = tempfile.mkstemp(prefix=f"{lock.name}.{os.getpid()}.", dir=lock.parent)
    try:
        os.write(fd, owner.encode())
        os.fchmod(fd, 0o666 & ~_umask())
        _flock(fd)
        try:
            os.link(tmp, lock)
        except FileExistsError:
            os.close(fd)
            return None
        except OSError as err:  # a file system without hard links: create in place (briefly empty)
            if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            os.close(fd)
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
            except FileExistsError:
                return None
            _flock(fd)
            os.write(fd, owner.encode())
        return fd
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    finally:
        os.unlink(tmp)


def _take_stale_lock(lock: Path, owner: str, out: Path) -> int | None:
    """Take over an existing lock whose owner is gone; refuse a live or unverifiable one.
    None: the lock file went away meanwhile (try creating it again)."""
    pid, host = _owner(lock)
    me = socket.gethostname()
    if host is not None and host != me:
        raise PosttrainError(
            f"output directory {out} is locked by pid {pid} on host {host}, whose liveness cannot be checked "
            f"from {me}; if no run is writing there, remove the lock: rm {lock}"
        )
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        got = _flock(fd)
        if got is False or (got is None and _alive(pid) and pid != os.getpid()):
            raise PosttrainError(
                f"output directory {out} is being written by another run (pid {pid} on this host); "
                "wait for it to finish or choose another output directory"
            )
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:  # still the lock, not one released meanwhile
                os.ftruncate(fd, 0)
                os.pwrite(fd, owner.encode(), 0)
                print(
                    f"note: {out}: took over the lock left by pid {pid}, which is no longer running", file=sys.stderr
                )
                return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def _inherited(lock: Path) -> bool:
    """Whether this process or an ancestor holds this lock (recorded in LOCKS_ENV, which children inherit)
    and still holds it."""
    for entry in os.environ.get(LOCKS_ENV, "").split(os.pathsep):
        name, _, pid = entry.rpartition("=")
        if name == str(lock) and pid.isdigit() and _owner(lock)[0] == int(pid) and _alive(int(pid)):
            return True
    return False


def _remove_leftovers(final: Path) -> None:
    """Remove what killed runs left beside `final`; put back a finished directory a kill left renamed away."""
    name = re.escape(final.name)
    pattern = re.compile(rf"\.{name}\.(tmp-\w+|old-\d+|lock\.(\d+)\.\w+)")
    leftovers = []
    for p in final.parent.iterdir():
        match = pattern.fullmatch(p.name)
        if match and not (match.group(2) and _alive(int(match.group(2)))):  # a lock being created now stays
            leftovers.append(p)
    olds = sorted((p for p in leftovers if ".old-" in p.name), key=lambda p: p.stat().st_mtime)
    if olds and not final.exists() and not final.is_symlink():
        olds[-1].rename(final)
        leftovers.remove(olds[-1])
        print(
            f"note: {final} was put back from {olds[-1].name}, left by a run killed while replacing it",
            file=sys.stderr,
        )
    for p in leftovers:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        print(f"note: removed {p}, left by a killed run", file=sys.stderr)


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the one-writer lock of output directory `path` for the body; yield its resolved path.

    A second run into the same directory is refused in one line naming the holder; a stale lock
    (its process is gone) is taken over with a note. Nested use in this process, and use in a
    child process started while the lock is held, does not lock again. On taking the lock,
    leftovers of killed runs beside the directory are removed. Creates the parent directory.
    """
    final = _resolve_output(path)
    lock = final.with_name(f".{final.name}.lock")
    if _inherited(lock):  # held by this process already (nested use), or by the one that started it
        yield final
        return
    owner = f"{os.getpid()} {socket.gethostname()}\n"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd = None
        for _ in range(5):  # a holder releasing at the same moment makes a round go nowhere
            fd = _create_lock(lock, owner)
            if fd is None:
                fd = _take_stale_lock(lock, owner, Path(path))
            if fd is not None:
                break
        if fd is None:
            raise PosttrainError(f"output directory {path}: its lock {lock} keeps changing; another run is starting")
    except OSError as err:
        raise file_system_error(err, f"output directory {path}", err.filename or final.parent) or err from None
    saved_env = os.environ.get(LOCKS_ENV)
    os.environ[LOCKS_ENV] = os.pathsep.join(filter(None, [saved_env, f"{lock}={os.getpid()}"]))
    try:
        _remove_leftovers(final)
        yield final
    finally:
        if saved_env is None:
            os.environ.pop(LOCKS_ENV, None)
        else:
            os.environ[LOCKS_ENV] = saved_env
        try:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    os.unlink(lock)
        finally:
            os.close(fd)


def launch_output_lock(path: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """`output_lock(path)` in the process of global rank 0 of a launch (torchrun / accelerate launch set
    RANK), a no-op in the other ranks: under a launcher, the launch as a whole holds one lock."""
    if os.environ.get("RANK", "0") == "0":
        return output_lock(path)
    return contextlib.nullcontext(_resolve_output(path))


# ------------------------------------------------------------------------------- atomic writes


def make_readable(root: Path) -> None:
    """Give every file and directory under `root` the mode the umask says (0666/0777 less it; a file
    with any execute bit keeps one): libraries that write through private temporary files (safetensors
    does, 0600) would leave a model other users and servers cannot load."""
    mask = _umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            mode = os.stat(p).st_mode
            os.chmod(p, (0o777 if mode & 0o111 else 0o666) & ~mask)


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
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
