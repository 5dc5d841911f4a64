"""Loading a chat tokenizer by name: a local directory, or `qwen3`, the built-in Qwen3 tokenizer.

Used by convert-checkpoint and data_scripts, so token counts are measured with the template
training uses. A missing directory is never tried as a hub repository.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from posttrain.conversion.chat_template import CHATML_TEMPLATE, install_chat_template
from posttrain.conversion.qwen3_tokenizer import NAME as QWEN3
from posttrain.conversion.qwen3_tokenizer import load_qwen3_tokenizer
from posttrain.outputs.errors import PosttrainError


def is_builtin_qwen3(path: str | os.PathLike) -> bool:
    """True when `path` names the built-in Qwen3 tokenizer: the word `qwen3` with no directory
    of that name here (a directory wins, as in from_pretrained; `./qwen3` always means one)."""
    return str(path) == QWEN3 and not Path(path).is_dir()


def load_chat_tokenizer(path: str | os.PathLike):
    """A local tokenizer directory, or `qwen3` (the built-in Qwen3 tokenizer, see
    posttrain/conversion/qwen3_tokenizer.py), with the ChatML training template installed.

    Used by convert-checkpoint and data_scripts, so token counts are measured with
    the template training uses: a raw Qwen3 tokenizer's own template is replaced
    (with a note). A missing directory is never tried as a hub repository.
    """
    from transformers import AutoTokenizer

    if is_builtin_qwen3(path):
        return load_qwen3_tokenizer()
    if str(path) == QWEN3:
        print("note: --tokenizer qwen3 is the directory ./qwen3, not the built-in Qwen3 tokenizer", file=sys.stderr)
    if not Path(path).is_dir():
        raise PosttrainError(f"tokenizer directory {path} not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # a missing or corrupt tokenizer.json: JSONDecodeError, ValueError, tokenizers' Exception
        raise PosttrainError(
            f"tokenizer {path} cannot be loaded ({type(err).__name__}: {err})".splitlines()[0]
        ) from None
    previous = tokenizer.chat_template
    try:
        install_chat_template(tokenizer)
    except ValueError as err:  # no <|im_start|> etc.
        raise PosttrainError(f"tokenizer {path} {str(err).removeprefix('tokenizer ')}") from None
    if previous not in (None, CHATML_TEMPLATE):
        print(
            f"note: tokenizer {path}: its own chat template was replaced by the ChatML training template",
            file=sys.stderr,
        )
    return tokenizer
