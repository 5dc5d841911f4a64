"""The chat CLI on the tiny converted model: one-shot mode, the REPL over stdin, bad input."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from posttrain import chat


def run_chat(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "posttrain.chat", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return chat.load_model(tiny_model_dir, device="cpu")


def test_one_shot_prints_only_the_reply(tiny_model_dir, model_and_tokenizer):
    proc = run_chat(tiny_model_dir, "--prompt", "What do bees make?", "--greedy", "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    # Greedy is deterministic: the CLI prints exactly what generate_reply returns, and nothing else;
    # by default under the system prompt data_scripts trains with.
    messages = [
        {"role": "system", "content": chat.DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "What do bees make?"},
    ]
    expected = chat.generate_reply(*model_and_tokenizer, messages, max_new_tokens=12, do_sample=False)
    assert expected
    assert proc.stdout == expected + "\n"


def test_generate_reply_stops_at_max_new_tokens_and_drops_special_tokens(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    reply = chat.generate_reply(model, tokenizer, messages, max_new_tokens=5, do_sample=False)
    assert "<|im_start|>" not in reply and "<|im_end|>" not in reply
    assert len(tokenizer(reply, add_special_tokens=False)["input_ids"]) <= 5 + 2  # re-tokenising may merge/split


def test_repl_over_stdin(tiny_model_dir):
    script = "/system Answer briefly.\nWhat color is the sky?\n/reset\n/nonsense\nWhat do bees make?\n/quit\n/reset\n"
    proc = run_chat(tiny_model_dir, "--max-new-tokens", "6", "--seed", "0", stdin=script)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("commands: /system")
    system_ack = "[system prompt set; conversation reset]\n"
    at_system, at_reset = out.index(system_ack), out.index("[conversation reset]\n")
    at_unknown = out.index("[unknown command /nonsense]")
    assert at_system < at_reset < at_unknown
    # A streamed reply between the system prompt and /reset, and one after the unknown command.
    assert out[at_system + len(system_ack) : at_reset].strip()
    assert out[at_unknown:].split("\n", 1)[1].strip()
    assert out.count("[conversation reset]") == 1  # the /reset after /quit is never read


def test_repl_keeps_history_and_reset_and_system_clear_it(monkeypatch):
    """The conversation each turn is generated from: history grows, /reset and /system start over."""
    seen = []

    def fake_reply(model, tokenizer, messages, streamer=None, **kwargs):
        seen.append([(m["role"], m["content"]) for m in messages])
        return f"answer {len(seen)}"

    monkeypatch.setattr(chat, "generate_reply", fake_reply)
    stdin = io.StringIO("q1\nq2\n/reset\nq3\n/system S2\nq4\n/system\nq5\n")
    chat.repl(None, None, "S1", {}, stdin=stdin, stdout=io.StringIO())
    assert seen == [
        [("system", "S1"), ("user", "q1")],
        [("system", "S1"), ("user", "q1"), ("assistant", "answer 1"), ("user", "q2")],
        [("system", "S1"), ("user", "q3")],
        [("system", "S2"), ("user", "q4")],
        [("user", "q5")],
    ]


def test_not_a_model_dir_is_one_line_error(tmp_path):
    proc = run_chat(tmp_path, "--prompt", "hi")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path} is not a model directory (no config.json); pass a convert/SFT/DPO output"
    )
