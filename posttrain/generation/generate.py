"""Loading a model directory for generation, and one assistant reply from its chat template.

    model, tokenizer = load_model("runs/dpo", device="cpu")
    ids, stopped = generate_ids(model, tokenizer, messages, max_new_tokens=256, do_sample=False)

Shared by chat, generation health, evaluation and the demo. A reply stops at `<|im_end|>` (the
end-of-turn token SFT trains the model to emit) or `<|endoftext|>`. A conversation longer than the
model's context is refused, never cut silently; max_new_tokens is capped at the room the context
leaves, with a note.
"""

from __future__ import annotations

import sys
from pathlib import Path

from posttrain.conversion.chat_template import ENDOFTEXT, IM_END, check_template_renders
from posttrain.data.loading import load_errors
from posttrain.outputs.errors import PosttrainError


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
    check_template_renders(tokenizer, str(model_dir))
    with load_errors(f"{model_dir}: the model cannot be loaded"):  # a corrupt or truncated weights file, ...
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", ()) if k not in _tied_keys(model)]
    if missing:  # transformers would start these from random values, with a warning
        raise PosttrainError(
            f"{model_dir}: its weights lack {len(missing)} of the model's tensors (e.g. {sorted(missing)[0]}); "
            "it is not a model of the architecture its config.json names"
        )
    return model.to(device).eval(), tokenizer


def _tied_keys(model) -> set[str]:
    """Parameters that share another's tensor (an lm_head tied to the embeddings): saved once, never missing."""
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or ()
    return set(tied.keys() if isinstance(tied, dict) else tied)


def _stop_token_ids(tokenizer) -> list[int]:
    """End of turn (`<|im_end|>`) and end of text both stop a reply."""
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id, vocab.get(IM_END), vocab.get(ENDOFTEXT)}
    return sorted(i for i in ids if i is not None)


_CAPS_NOTED: set[int] = set()  # the max_new_tokens values whose cap has been noted in this process


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
        if max_new_tokens not in _CAPS_NOTED:  # once per value: a chat would repeat it every turn
            _CAPS_NOTED.add(max_new_tokens)
            print(
                f"note: --max-new-tokens {max_new_tokens} capped at {context - n_prompt}: the conversation takes "
                f"{n_prompt} of the model's {context} context tokens (later replies: capped at the room left, "
                "without this note)",
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


def generate_batch(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    seed: int | None = None,
    **generate_kwargs,
) -> list[list[tuple[list[int], bool]]]:
    """For each conversation, in order, `num_return_sequences` replies as generate_ids gives one: (token ids,
    the stop token included; whether it ended on one). Batched by prompt length: the conversations are sorted
    by their rendered length and cut into left-padded batches of `batch_size`, so little is padding. Each
    batch's max_new_tokens is capped at the room its longest prompt leaves (with a note). With `seed`, each
    batch samples after `torch.manual_seed(seed + its index)`: the same call gives the same replies."""
    import torch

    rendered = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    context = model.config.max_position_embeddings
    too_long = next((i for i, x in enumerate(ids) if len(x) >= context), None)
    if too_long is not None:
        raise PosttrainError(
            f"conversation {too_long + 1} is {len(ids[too_long])} tokens, and the model's context is {context}: "
            "no room for a reply"
        )
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    stop = _stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    results: list = [None] * len(ids)
    capped = False
    for b, start in enumerate(range(0, len(order), batch_size)):
        members = order[start : start + batch_size]
        width = max(len(ids[i]) for i in members)
        budget = min(max_new_tokens, context - width)
        capped |= budget < max_new_tokens
        input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in members], device=model.device)
        mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in members], device=model.device)
        if seed is not None:
            torch.manual_seed(seed + b)
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=budget,
                eos_token_id=stop,
                pad_token_id=pad,
                num_return_sequences=num_return_sequences,
                **sampling,
                **generate_kwargs,
            )
        new = output[:, width:].tolist()
        for j, i in enumerate(members):
            replies = []
            for row in new[j * num_return_sequences : (j + 1) * num_return_sequences]:
                end = next((k + 1 for k, token in enumerate(row) if token in stop), len(row))
                replies.append((row[:end], end > 0 and row[end - 1] in stop))
            results[i] = replies
    if capped:
        print(
            f"note: max_new_tokens {max_new_tokens} capped where a prompt left less room in the context",
            file=sys.stderr,
        )
    return results


def generate_turn(model, tokenizer, messages: list[dict], **kwargs) -> tuple[str, bool]:
    """(the assistant's next message without special tokens, whether it ended with a stop token);
    kwargs as generate_ids."""
    new_tokens, stopped = generate_ids(model, tokenizer, messages, **kwargs)
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip(), stopped


def generate_reply(model, tokenizer, messages: list[dict], **kwargs) -> str:
    """The assistant's next message for `messages` (role/content dicts); kwargs as generate_turn."""
    return generate_turn(model, tokenizer, messages, **kwargs)[0]


def check_text(text: str, what: str) -> str:
    """Refuse text that cannot be encoded (argv or input bytes Python could only decode to lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PosttrainError(f"{what} is not valid UTF-8 text") from None
    return text
