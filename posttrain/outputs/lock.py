"""One writer per output directory: the lock file `.NAME.lock` beside it.

    with output_lock(out):                      # a second run into `out` is refused, naming the holder
        ...

Two runs writing into one directory would both report success and one result would be lost.
The lock is a file beside the output directory (the directory itself is replaced, so it cannot
hold its lock), holding "PID HOST". Its creator also holds an flock on it, released by the
kernel when the process dies however it dies, so a lock on this host whose flock is free is
stale and is taken over, with a note. A lock written on another host cannot be checked and is
refused with the command that removes it. Whoever holds the lock first removes what killed runs
left beside the directory (`.NAME.tmp-*`; `.NAME.old-*`, which is put back if the directory
itself is missing: a kill between the two renames of a replacement).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from posttrain.outputs.errors import PosttrainError, file_system_error
from posttrain.outputs.paths import resolve_output, umask

# Lock files held by this process or an ancestor ("LOCKFILE=PID" entries, os.pathsep-separated): a child
# started by the holder (a launcher's worker) writes under its parent's lock without taking it again.
LOCKS_ENV = "POSTTRAIN_OUTPUT_LOCKS"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def lock_file(path: str | os.PathLike) -> Path:
    """Where the lock of output directory `path` lives: `.NAME.lock` beside it."""
    final = resolve_output(path)
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
    """(pid, host) written in a lock file; (None, None) if it is unreadable, garbled or not a plain file."""
    with contextlib.suppress(OSError, ValueError):
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                pid, host = os.read(fd, 4096).decode("utf-8").split()
                return int(pid), host
        finally:
            os.close(fd)
    return None, None


def refuse_foreign(path: Path, kind: str) -> None:
    """Refuse, naming it, a lock or leftover path that this tool cannot have made: a symlink, or anything
    but a `kind` ("file" or "dir") owned by this user. Its target is never opened, read or changed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        what = f"a symlink (to {os.readlink(path)})"
    elif not (stat.S_ISREG(st.st_mode) if kind == "file" else stat.S_ISDIR(st.st_mode)):
        what = f"not a regular {'file' if kind == 'file' else 'directory'}"
    elif st.st_uid != os.getuid():
        what = f"owned by another user (uid {st.st_uid})"
    else:
        return
    raise PosttrainError(
        f"{path} is {what}, so this tool did not make it and will not follow or remove it; "
        f"if no run is writing there, remove it yourself: rm {'-r ' * stat.S_ISDIR(st.st_mode)}{path}"
    )


def _create_lock(lock: Path, owner: str) -> int | None:
    """Create the lock file, complete and flocked before its name appears; None if it exists."""
    fd, tmp = tempfile.mkstemp(prefix=f"{lock.name}.{os.getpid()}.", dir=lock.parent)
    try:
        os.write(fd, owner.encode())
        os.fchmod(fd, 0o666 & ~umask())
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
    refuse_foreign(lock, "file")
    pid, host = _owner(lock)
    me = socket.gethostname()
    if host is not None and host != me:
        raise PosttrainError(
            f"output directory {out} is locked by pid {pid} on host {host}, whose liveness cannot be checked "
            f"from {me}; if no run is writing there, remove the lock: rm {lock}"
        )
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the check and the open
        os.close(fd)
        refuse_foreign(lock, "file")
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
            # an old directory is a directory; a temporary one may be either (atomic_output_file's is a file)
            refuse_foreign(p, "dir" if ".old-" in p.name or (p.is_dir() and not p.is_symlink()) else "file")
            leftovers.append(p)
    olds = sorted((p for p in leftovers if ".old-" in p.name), key=lambda p: p.lstat().st_mtime)
    if olds and not final.exists() and not final.is_symlink():
        olds[-1].rename(final)
        leftovers.remove(olds[-1])
        print(
            f"note: {final} was put back from {olds[-1].name}, left by a run killed while replacing it",
            file=sys.stderr,
        )
    for p in leftovers:
        if stat.S_ISDIR(p.lstat().st_mode):
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
    final = resolve_output(path)
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
    return contextlib.nullcontext(resolve_output(path))
