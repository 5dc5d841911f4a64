"""Talk to a converted or trained model: `python -m posttrain.chat MODEL_DIR`.

An interactive REPL that streams the reply token by token, formatted with the
model's own chat template (the ChatML template every model here carries), and
a `--prompt` one-shot mode for scripts that prints only the reply. Generation
stops at `<|im_end|>`, the end-of-turn token SFT trains the model to emit.

The default system prompt is the one data_scripts adds to every training
conversation without one: a model answers best in the setting it was trained in.
REPL commands: `/system TEXT` sets the system prompt and starts over, `/reset`
clears the conversation (keeps the system prompt), `/quit` (or Ctrl-D) exits.

A conversation longer than the model's context is refused (in the REPL: that
turn, with a hint to /reset), never cut silently; --max-new-tokens is capped at
the room the context leaves, with a note.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from posttrain.chat_template import ENDOFTEXT, IM_END
from posttrain.data import load_errors
from posttrain.errors import PosttrainError, run_cli
from posttrain.prep_adapters import DEFAULT_SYSTEM_PROMPT

HELP = "commands: /system TEXT (set system prompt, new conversation), /reset, /quit"


def check_device(device: str | None) -> str:
    """The device to generate on (default: cuda if there is one); one that is not here is one line."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise PosttrainError(f"--device {device!r} is not a device name (cpu, cuda, cuda:N, mps, ...)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise PosttrainError(f"--device {device}: this machine has no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise PosttrainError(
                f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    else:
        try:
            torch.empty(0, device=dev)
        except Exception as err:  # mps, xpu, ... without the hardware or the build
            raise PosttrainError(f"--device {device} is not available here ({str(err).splitlines()[0]})") from None
    return device


def check_dtype(dtype: str) -> str:
    """`auto` or the name of a torch floating-point dtype."""
    import torch

    value = getattr(torch, dtype, None)
    if dtype != "auto" and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise PosttrainError(f"--dtype {dtype!r} is not auto or a floating-point dtype (bfloat16, float16, float32)")
    return dtype


def load_model(model_dir: str | Path, device: str | None = None, dtype: str = "auto"):
    """Load a Hugging Face model directory and its tokenizer for generation (eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise PosttrainError(f"{model_dir} is not a model directory (no config.json); pass a convert/SFT/DPO output")
    device, dtype = check_device(device), check_dtype(dtype)
    with load_errors(f"{model_dir}: its config.json cannot be read"):
        AutoConfig.from_pretrained(model_dir)
    with load_errors(f"{model_dir}: its tokenizer cannot be loaded"):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise PosttrainError(f"{model_dir}: the tokenizer has no chat template; convert it with convert-checkpoint")
    with load_errors(f"{model_dir}: the model cannot be loaded"):  # a corrupt or truncated weights file, ...
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval(), tokenizer


def _stop_token_ids(tokenizer) -> list[int]:
    """End of turn (`<|im_end|>`) and end of text both stop a reply."""
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id, vocab.get(IM_END), vocab.get(ENDOFTEXT)}
    return sorted(i for i in ids if i is not None)


def generate_ids(
    model,
    tokenizer,
    messages: list[dict],
    max_new_tokens: int = 256,
    do_sample: bool = True,
    temperature: float = 0.7,
    top_p: float = 0.9,
    streamer=None,
    **generate_kwargs,
) -> tuple[list[int], bool]:
    """(the token ids of the assistant's next message, its stop token included; whether it ended with one);
    `generate_kwargs` go to model.generate."""
    import torch

    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    n_prompt, context = inputs["input_ids"].shape[1], model.config.max_position_embeddings
    if n_prompt >= context:
        raise PosttrainError(
            f"the conversation is {n_prompt} tokens, and the model's context is {context}: no room for a reply"
        )
    if n_prompt + max_new_tokens > context:
        print(
            f"note: --max-new-tokens {max_new_tokens} capped at {context - n_prompt}: the conversation takes "
            f"{n_prompt} of the model's {context} context tokens",
            file=sys.stderr,
        )
        max_new_tokens = context - n_prompt
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    stop = _stop_token_ids(tokenizer)
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0],
            streamer=streamer,
            **sampling,
            **generate_kwargs,
        )
    new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
    return new_tokens, len(new_tokens) > 0 and new_tokens[-1] in stop


def generate_turn(model, tokenizer, messages: list[dict], **kwargs) -> tuple[str, bool]:
    """(the assistant's next message without special tokens, whether it ended with a stop token);
    kwargs as generate_ids."""
    new_tokens, stopped = generate_ids(model, tokenizer, messages, **kwargs)
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip(), stopped


def generate_reply(model, tokenizer, messages: list[dict], **kwargs) -> str:
    """The assistant's next message for `messages` (role/content dicts); kwargs as generate_turn."""
    return generate_turn(model, tokenizer, messages, **kwargs)[0]


def repl(model, tokenizer, system: str | None, gen_kwargs: dict, stdin=None, stdout=None) -> None:
    """Read a line, answer it with streamed tokens, keep the conversation; until /quit or EOF."""
    from transformers import TextStreamer

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    history: list[dict] = []
    interactive = stdin.isatty()
    encoding = getattr(stdin, "encoding", None) or "utf-8"
    read = stdin.buffer.readline if hasattr(stdin, "buffer") else stdin.readline  # bytes: decoded per line below
    print(HELP, file=stdout, flush=True)
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
            system = line[len("/system") :].strip() or None
            history = []
            print(f"[system prompt {'set' if system else 'cleared'}; conversation reset]", file=stdout, flush=True)
            continue
        if line.startswith("/"):
            print(f"[unknown command {line.split()[0]}] {HELP}", file=stdout, flush=True)
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


def check_text(text: str, what: str) -> str:
    """Refuse text that cannot be encoded (argv or input bytes Python could only decode to lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PosttrainError(f"{what} is not valid UTF-8 text") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m posttrain.chat", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="a Hugging Face model directory (convert-checkpoint, SFT or DPO output)")
    p.add_argument("--prompt", help="one-shot: answer this prompt, print only the reply, exit")
    p.add_argument(
        "--system",
        default=DEFAULT_SYSTEM_PROMPT,
        help="system prompt; default: the one data_scripts puts in every training conversation that has none "
        "('' for no system message)",
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


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
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
    gen_kwargs = dict(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p
    )
    if args.prompt is not None:
        head = [{"role": "system", "content": args.system}] if args.system else []
        print(generate_reply(model, tokenizer, head + [{"role": "user", "content": args.prompt}], **gen_kwargs))
        return
    repl(model, tokenizer, args.system, gen_kwargs)


if __name__ == "__main__":
    run_cli(main)
