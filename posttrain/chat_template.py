"""The ChatML chat template every converted and trained model carries, and the tokenizer loaders.

Each assistant message, *including its closing `<|im_end|>`*, sits inside `{% generation %}` markers,
so TRL's assistant-only loss (which reads those markers through `return_assistant_tokens_mask`) trains
the model to stop: a model whose `<|im_end|>` is masked out of the loss never learns to end a reply.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from posttrain.errors import PosttrainError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
ROLES = ("system", "user", "assistant")  # the roles the template renders (any other raises)

_CONTROL_TOKEN = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))


def find_control_token(text: str) -> str | None:
    """The first ChatML control token written as literal text in `text`, if any. The tokenizer turns
    it into the control token itself, so an answer would end mid-way, or a prompt forge a turn."""
    found = _CONTROL_TOKEN.search(text)
    return found.group() if found else None


CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{{- message['content'] + '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def install_chat_template(tokenizer) -> None:
    """Make a tokenizer a chat tokenizer: ChatML template, eos `<|im_end|>`, pad `<|endoftext|>`, no BOS."""
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}")
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.eos_token = IM_END
    tokenizer.pad_token = ENDOFTEXT
    tokenizer.bos_token = None


def is_builtin_qwen3(path: str | os.PathLike) -> bool:
    """True when `path` names the built-in Qwen3 tokenizer: the word `qwen3` with no directory
    of that name here (a directory wins, as in from_pretrained; `./qwen3` always means one)."""
    return str(path) == "qwen3" and not Path(path).is_dir()


def load_chat_tokenizer(path: str | os.PathLike):
    """A local tokenizer directory, or `qwen3` (the built-in Qwen3 tokenizer, see
    posttrain/qwen3_tokenizer.py), with the ChatML training template installed.

    Used by convert-checkpoint and data_scripts, so token counts are measured with
    the template training uses: a raw Qwen3 tokenizer's own template is replaced
    (with a note). A missing directory is never tried as a hub repository.
    """
    from transformers import AutoTokenizer

    if is_builtin_qwen3(path):
        from posttrain.qwen3_tokenizer import load_qwen3_tokenizer

        return load_qwen3_tokenizer()
    if str(path) == "qwen3":
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


def load_training_tokenizer(model_args, training_args, require_generation_markers: bool = True):
    """The model directory's tokenizer for a training stage; refuse one whose chat template cannot mask the
    loss to assistant turns (no `{% generation %}` markers), unless the stage does not need them."""
    from transformers import AutoTokenizer
    from trl.chat_template_utils import has_generation_markers

    name = model_args.model_name_or_path
    if not name:
        raise PosttrainError("the recipe names no model: set model_name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise PosttrainError(f"model {name}: cannot load its tokenizer ({str(err).splitlines()[0]})") from None
    template = tokenizer.chat_template
    path = getattr(training_args, "chat_template_path", None)
    if path and path.endswith((".jinja", ".j2")) and os.path.isfile(path):
        template = Path(path).read_text(encoding="utf-8")
    if require_generation_markers and not (template and has_generation_markers(template)):
        raise PosttrainError(
            f"model {name}: its chat template has no {{% generation %}} markers, so the loss cannot be limited to "
            "assistant turns; convert the model with convert-checkpoint (it installs the ChatML training template) "
            "or set chat_template_path to a .jinja template that has them"
        )
    if not template:
        raise PosttrainError(f"model {name}: its tokenizer has no chat template to render the prompts with")
    return tokenizer
