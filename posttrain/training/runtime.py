"""Process-level set-up shared by the stage scripts: logging like the TRL scripts, seeding, and the
main-process questions asked before a trainer exists."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("posttrain")


def setup_logging_and_seed(training_args) -> None:
    """Log like the TRL scripts (only the main process at INFO) and seed everything.

    Reading the log level sets up the distributed state with the recipe's backend, so this runs first.
    """
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.set_seed(training_args.seed)


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()
