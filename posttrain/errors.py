"""One kind of error for bad input, printed as a single line with a non-zero exit.

Library errors (tracebacks) are for bugs; a user who gave a wrong path, key or file should read one line
that names it and says what to do. Ctrl-C is one line too, with the shell's exit status for it (130).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class PosttrainError(Exception):
    """An input problem the user can fix (bad file, key, shape, value)."""

    exit_code = EXIT_BAD_INPUT
    prefix = "error"


class Interrupted(PosttrainError):
    """The user stopped the run (Ctrl-C); the message says what was kept."""

    exit_code = EXIT_INTERRUPTED
    prefix = "interrupted"


def die(message: str, exit_code: int = EXIT_BAD_INPUT, prefix: str = "error") -> NoReturn:
    print(f"{prefix}: {message}", file=sys.stderr)
    raise SystemExit(exit_code)


def run_cli(main: Callable[[], object]) -> None:
    """Run a CLI entry point; a PosttrainError becomes one line on stderr and exit 2, Ctrl-C exit 130."""
    try:
        main()
    except PosttrainError as err:
        die(str(err).replace("\n", " "), err.exit_code, err.prefix)
    except KeyboardInterrupt:
        die("stopped by Ctrl-C; no output was written", EXIT_INTERRUPTED, Interrupted.prefix)
