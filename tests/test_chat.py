"""The chat CLI on the tiny converted model: one-shot mode, the REPL over stdin, bad input."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, run_main_here

from posttrain import chat
from posttrain.generation import generate
from posttrain.outputs.errors import PosttrainError, run_cli


def run_chat(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m posttrain.chat ARGS`: a real process for the REPL (its stdin), else in this process."""
    if stdin is None:
        return run_main_here(lambda: run_cli(chat.main), list(args), "python -m posttrain.chat")
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


# ------------------------------------------------------------------ faults: one line, the REPL goes on


@pytest.fixture
def broken_model(tmp_path, tiny_model_dir):
    """A copy of the tiny model directory, to be damaged by the test."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "config.json").write_text('{"model_type": "llama",'), "its config.json cannot be read ("),
        (
            lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
            "the model cannot be loaded (",
        ),
        (lambda d: (d / "model.safetensors").unlink(), "the model cannot be loaded ("),
    ],
    ids=["corrupt_config", "truncated_weights", "no_weights"],
)
def test_a_model_dir_with_corrupt_weights_or_config_is_one_line(broken_model, damage, message):
    damage(broken_model)
    assert_one_line_error(run_chat(broken_model, "--prompt", "hi"), f"error: {broken_model}: {message}")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "cuda:7"], "--device cuda:7: this machine has "),
        (["--device", "gpu0"], "--device 'gpu0' is not a device name (cpu, cuda, cuda:N, mps, ...)"),
        (["--dtype", "float64x"], "--dtype 'float64x' is not auto or a floating-point dtype"),
        (["--dtype", "int8"], "--dtype 'int8' is not auto or a floating-point dtype"),
    ],
)
def test_a_device_or_dtype_that_is_not_there_is_refused_before_loading(tmp_path, flags, message):
    with pytest.raises(PosttrainError) as err:  # the model directory does not exist: checked first
        chat.main([str(tmp_path / "no_model"), "--prompt", "hi", *flags])
    assert str(err.value).startswith(message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(tmp_path):
    with pytest.raises(PosttrainError, match=r"^--device cuda: this machine has no CUDA device; use --device cpu$"):
        chat.main([str(tmp_path), "--device", "cuda"])


def test_a_prompt_longer_than_the_context_is_refused(tiny_model_dir, model_and_tokenizer):
    context = model_and_tokenizer[0].config.max_position_embeddings
    proc = run_chat(tiny_model_dir, "--prompt", "bees " * context, "--device", "cpu")
    assert_one_line_error(proc, f"and the model's context is {context}: no room for a reply")
    assert proc.stdout == ""


def test_max_new_tokens_is_capped_at_what_the_context_leaves(model_and_tokenizer, capsys):
    model, tokenizer = model_and_tokenizer
    context = model.config.max_position_embeddings
    messages = [{"role": "user", "content": "bees " * (context // 8)}]
    n_prompt = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
    assert context // 8 < n_prompt < context
    generate.generate_turn(model, tokenizer, messages, max_new_tokens=10 * context, do_sample=False)
    assert capsys.readouterr().err == (
        f"note: --max-new-tokens {10 * context} capped at {context - n_prompt}: the conversation takes "
        f"{n_prompt} of the model's {context} context tokens (later replies: capped at the room left, "
        "without this note)\n"
    )
    # The next turn of a chat is capped again, without the note.
    longer = [*messages, {"role": "assistant", "content": "bees"}, {"role": "user", "content": "bees bees"}]
    ids, _ = generate.generate_ids(model, tokenizer, longer, max_new_tokens=10 * context, do_sample=False)
    assert capsys.readouterr().err == ""
    n_longer = len(tokenizer.apply_chat_template(longer, add_generation_prompt=True, return_dict=True)["input_ids"])
    assert len(ids) <= context - n_longer


def test_the_repl_reports_undecodable_input_and_goes_on(tiny_model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain.chat", str(tiny_model_dir), "--max-new-tokens", "4", "--device", "cpu"],
        input=b"caf\xe9 \xff\nWhat do bees make?\n/reset\n",
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = proc.stdout.decode()
    ignored = out.index("[that line is not valid utf-8 text; ignored]\n")
    assert ignored < out.index("[conversation reset]")
    assert out[ignored:].split("\n", 1)[1].split("[conversation reset]")[0].strip()  # the next line got a reply


def test_the_repl_refuses_a_turn_past_the_context_and_goes_on(model_and_tokenizer, monkeypatch):
    """The refused turn is reported and left out of the conversation the next turn is generated from."""
    model, tokenizer = model_and_tokenizer
    context = model.config.max_position_embeddings
    seen, real = [], chat.generate_reply

    def recording_reply(model, tokenizer, messages, **kwargs):
        seen.append([m["content"] for m in messages])
        return real(model, tokenizer, messages, **kwargs)

    monkeypatch.setattr(chat, "generate_reply", recording_reply)
    stdout = io.StringIO()
    stdin = io.StringIO(f"{'bees ' * context}\nHi\n")
    chat.repl(model, tokenizer, None, {"max_new_tokens": 3, "do_sample": False}, stdin, stdout)
    lines = stdout.getvalue().splitlines()
    assert lines[1] == "[system prompt (--system): none]"
    assert len(lines) == 3 and lines[2].startswith("[the conversation is ")
    assert lines[2].endswith(
        f"the model's context is {context}: no room for a reply; /reset starts a new conversation]"
    )
    assert seen == [[("bees " * context).strip()], ["Hi"]]
