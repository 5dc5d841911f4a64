"""One kind of error for bad input, printed as a single line with a non-zero exit.

Library errors (tracebacks) are for bugs; a user who gave a wrong path, key or
file should read one line that names it and says what to do.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_BAD_INPUT = 2


class PosttrainError(Exception):
    """An input problem the user can fix (bad file, key, shape, value)."""


def die(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


def run_cli(main: Callable[[], object]) -> None:
    """Run a CLI entry point; turn a PosttrainError into one line on stderr and exit 2."""
    try:
        main()
    except PosttrainError as err:
        die(str(err).replace("\n", " "))
