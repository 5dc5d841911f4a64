"""Talk to a converted or trained model: `python -m posttrain.chat MODEL_DIR`.

An interactive REPL that streams the reply token by token, formatted with the
model's own chat template (the ChatML template every model here carries), and
a `--prompt` one-shot mode for scripts that prints only the reply. Generation
stops at `<|im_end|>`, the end-of-turn token SFT trains the model to emit.

The default system prompt is the one the model was trained with, read from its
training_info.json (the most common system message of the training data; none
if its rows had none), which the training stages write; for a directory without
one (a converted base model), the one data_scripts adds to every training
conversation without one. A model answers best in the setting it was trained in.
REPL commands: `/system TEXT` sets the system prompt and starts over, `/reset`
clears the conversation (keeps the system prompt), `/quit` (or Ctrl-D) exits.

A conversation longer than the model's context is refused (in the REPL: that
turn, with a hint to /reset), never cut silently; --max-new-tokens is capped at
the room the context leaves, with a note.
"""

from __future__ import annotations

import re
import sys

from posttrain.conversion.chat_template import SPECIAL_TOKENS
from posttrain.data.adapters import DEFAULT_SYSTEM_PROMPT
from posttrain.generation.generate import check_device, check_dtype, check_text, generate_reply, load_model
from posttrain.outputs.errors import PosttrainError, run_cli
from posttrain.outputs.flags import ArgumentParser
from posttrain.training.model_card import INFO_NAME, read_training_info

HELP = "commands: /system TEXT (set system prompt, new conversation), /reset, /quit"


def special_tokens(tokenizer) -> list[str]:
    """Every special token of the tokenizer (its named ones and the added tokens marked special) and the
    ChatML control tokens, longest first."""
    tokens = set(SPECIAL_TOKENS) | set(getattr(tokenizer, "all_special_tokens", ()))
    tokens |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return sorted((t for t in tokens if t), key=len, reverse=True)


def refuse_control_tokens(text: str, tokenizer, what: str) -> None:
    """Text a user typed may not hold a special token (`<|im_end|>`, `<|im_start|>`, ...): the tokenizer
    would read it as the token itself, so one message could end its turn and forge others. Refused, not
    escaped: any escape would change what the user wrote, and the model never saw it in training (which
    refuses such text too)."""
    found = re.search("|".join(map(re.escape, special_tokens(tokenizer))), text)
    if found:
        raise PosttrainError(
            f"{what} holds the control token {found.group()}, which would end the turn and could forge others; "
            "remove it"
        )


def repl(
    model, tokenizer, system: str | None, gen_kwargs: dict, stdin=None, stdout=None, system_source: str = "--system"
) -> None:
    """Read a line, answer it with streamed tokens, keep the conversation; until /quit or EOF."""
    from transformers import TextStreamer

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    history: list[dict] = []
    interactive = stdin.isatty()
    encoding = getattr(stdin, "encoding", None) or "utf-8"
    read = stdin.buffer.readline if hasattr(stdin, "buffer") else stdin.readline  # bytes: decoded per line below
    print(HELP, file=stdout, flush=True)
    print(f"[system prompt ({system_source}): {repr(system) if system else 'none'}]", file=stdout, flush=True)
    while True:
        if interactive:
            print(">>> ", end="", file=stdout, flush=True)
        line = read()
        if not line:  # EOF (Ctrl-D or end of piped input)
            break
        try:
            line = (line.decode(encoding) if isinstance(line, bytes) else line).strip()
            check_text(line, "the line")
        except (UnicodeError, PosttrainError):
            print(f"[that line is not valid {encoding} text; ignored]", file=stdout, flush=True)
            continue
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history = []
            print("[conversation reset]", file=stdout, flush=True)
            continue
        if line == "/system" or line.startswith("/system "):
            new_system = line[len("/system") :].strip() or None
            try:
                refuse_control_tokens(new_system or "", tokenizer, "the system prompt")
            except PosttrainError as err:
                print(f"[{err}; not set]", file=stdout, flush=True)
                continue
            system, history = new_system, []
            print(f"[system prompt {'set' if system else 'cleared'}; conversation reset]", file=stdout, flush=True)
            continue
        if line.startswith("/"):
            print(f"[unknown command {line.split()[0]}] {HELP}", file=stdout, flush=True)
            continue
        try:
            refuse_control_tokens(line, tokenizer, "that line")
        except PosttrainError as err:
            print(f"[{err}; not sent]", file=stdout, flush=True)
            continue
        history.append({"role": "user", "content": line})
        head = [{"role": "system", "content": system}] if system else []
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            reply = generate_reply(model, tokenizer, head + history, streamer=streamer, **gen_kwargs)
        except PosttrainError as err:
            history.pop()
            print(f"[{err}; /reset starts a new conversation]", file=stdout, flush=True)
            continue
        history.append({"role": "assistant", "content": reply})
        stdout.flush()


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m posttrain.chat", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="a Hugging Face model directory (convert-checkpoint, SFT or DPO output)")
    p.add_argument("--prompt", help="one-shot: answer this prompt, print only the reply, exit")
    p.add_argument(
        "--system",
        default=None,
        help=f"system prompt ('' for no system message); default: the one the model was trained with "
        f"(MODEL_DIR/{INFO_NAME}), else the one data_scripts puts in every training conversation that has none",
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--do-sample", dest="do_sample", action="store_true", default=True, help="sample (default)")
    mode.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding (deterministic)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible replies)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto (as saved), bfloat16, float32, ...")
    return p


def default_system_prompt(model_dir) -> tuple[str | None, str]:
    """(the system prompt the model was trained with, where that comes from)."""
    info = read_training_info(model_dir)
    if info is not None and "system_prompt" in info:
        return info["system_prompt"], f"as trained, from {INFO_NAME}"
    return DEFAULT_SYSTEM_PROMPT, f"data_scripts' default: {model_dir} has no {INFO_NAME}"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    source = "--system"
    if args.system is None:
        args.system, source = default_system_prompt(args.model_dir)
    if args.max_new_tokens < 1:
        raise PosttrainError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.do_sample and not (args.temperature > 0 and 0 < args.top_p <= 1):
        raise PosttrainError("sampling needs --temperature > 0 and 0 < --top-p <= 1 (or pass --greedy)")
    for flag in ("prompt", "system"):
        if getattr(args, flag):
            check_text(getattr(args, flag), f"--{flag}")
    check_device(args.device)
    check_dtype(args.dtype)
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    model, tokenizer = load_model(args.model_dir, device=args.device, dtype=args.dtype)
    for flag in ("prompt", "system"):
        refuse_control_tokens(getattr(args, flag) or "", tokenizer, f"--{flag}")
    gen_kwargs = dict(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p
    )
    if args.prompt is not None:
        head = [{"role": "system", "content": args.system}] if args.system else []
        print(generate_reply(model, tokenizer, head + [{"role": "user", "content": args.prompt}], **gen_kwargs))
        return
    repl(model, tokenizer, args.system, gen_kwargs, system_source=source)


if __name__ == "__main__":
    run_cli(main)
