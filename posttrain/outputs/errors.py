"""One kind of error for bad input, printed as a single line with a non-zero exit.

Library errors (tracebacks) are for bugs; a user who gave a wrong path, key or file should read one line
that names it and says what to do. Ctrl-C is one line too, with the shell's exit status for it (130), and so is
SIGTERM (what a scheduler sends at a time limit or preemption), handled like Ctrl-C, exit 143.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143


class PosttrainError(Exception):
    """An input problem the user can fix (bad file, key, shape, value)."""

    exit_code = EXIT_BAD_INPUT
    prefix = "error"


class Interrupted(PosttrainError):
    """The user stopped the run (Ctrl-C); the message says what was kept."""

    exit_code = EXIT_INTERRUPTED
    prefix = "interrupted"

    def __init__(self, message: str, exit_code: int = EXIT_INTERRUPTED):
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so that every clean-up made for Ctrl-C runs."""


def stop_cause(err: BaseException) -> tuple[str, int]:
    """("SIGTERM", 143) for a Terminated, ("Ctrl-C", 130) for any other KeyboardInterrupt."""
    return ("SIGTERM", EXIT_TERMINATED) if isinstance(err, Terminated) else ("Ctrl-C", EXIT_INTERRUPTED)


def raise_terminated(signum=None, frame=None) -> NoReturn:
    """The SIGTERM handler of every tool: stop as Ctrl-C does."""
    raise Terminated()


def die(message: str, exit_code: int = EXIT_BAD_INPUT, prefix: str = "error") -> NoReturn:
    print(f"{prefix}: {message}", file=sys.stderr)
    raise SystemExit(exit_code)


def first_line(err: BaseException) -> str:
    """`Type: first line of the message` of a library error (its cause's when it says nothing of its own)."""
    text = str(err).strip()
    cause = err.__cause__ or err.__context__
    if cause is not None and (not text or "An error occurred while generating the dataset" in text):
        return first_line(cause)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def is_template_error(err: BaseException) -> bool:
    """A Jinja error: a chat template (always the user's input) that does not parse, is stopped by the
    sandbox, or raises."""
    return any(c.__module__.startswith("jinja2") and c.__name__.endswith("Error") for c in type(err).__mro__)


def template_error(err: BaseException, what: str) -> BaseException:
    """One line for a chat template that cannot render; any other error is returned as it is."""
    if not is_template_error(err):
        return err
    return PosttrainError(f"{what}: its chat template cannot render a conversation ({first_line(err)})")


def run_cli(main: Callable[[], object]) -> None:
    """Run a CLI entry point; a PosttrainError becomes one line on stderr and exit 2, Ctrl-C exit 130, SIGTERM
    143. A chat template that Jinja cannot render where no check named it first is a line too (the template
    is input)."""
    with contextlib.suppress(ValueError):  # only the main thread can set a handler
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        main()
    except PosttrainError as err:
        die(str(err).replace("\n", " "), err.exit_code, err.prefix)
    except KeyboardInterrupt as err:
        what, code = stop_cause(err)
        die(f"stopped by {what}; no output was written", code, Interrupted.prefix)
    except Exception as err:
        if not is_template_error(err):
            raise
        die(f"a chat template cannot render a conversation ({first_line(err)})".replace("\n", " "))


# ------------------------------------------------------------------ file-system faults as one line

_FS_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a parent is not a directory",
    errno.EEXIST: "a parent is not a directory",
}


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
