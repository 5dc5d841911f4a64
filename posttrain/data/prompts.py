"""Prompts to generate from: the messages of a conversation before its final assistant turn.

    prompts = load_prompts("data/sft_alpaca", system_prompt=SYSTEM)   # a data_scripts dir or a .jsonl
    # [{"messages": [system, user, ...], "reference": "the answer the data gives"}, ...]

Read from `messages` rows (SFT data) or preference rows (`prompt` messages, `chosen` as the
reference), so the held-out split of either stage serves generation health, evaluation and
sampling alike.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.data.loading import check_json_file, read_json_rows
from posttrain.data.messages import ContentProblem, as_turns, text_messages
from posttrain.outputs.errors import PosttrainError


def prompt_of(row: dict, system_prompt: str | None = None) -> dict | None:
    """{messages, reference} for a `messages` row (the messages before its final assistant turn,
    reference = that turn), a preference row (`prompt`, reference = `chosen`) or a prompt-completion row
    (reference = `completion`); None when the row has no assistant turn with something before it, or a
    content that is not text. TRL's string forms are one turn (a string prompt the user's), content parts
    are read as text (posttrain.data.messages). The system prompt is added only to a prompt that has no
    system message anywhere."""
    try:
        if isinstance(row.get("messages"), list):
            messages, _ = text_messages(row["messages"])
            last = max((i for i, m in enumerate(messages) if _role(m) == "assistant"), default=None)
            if not last:
                return None
            prompt, reference = messages[:last], messages[last]["content"]
        elif isinstance(row.get("prompt"), (list, str)) and row["prompt"]:
            prompt, _ = text_messages(as_turns(row["prompt"], "user"))
            answer = row.get("chosen", row.get("completion"))
            answer, _ = text_messages(as_turns(answer, "assistant"))
            reference = answer[-1]["content"] if isinstance(answer, list) and answer else None
        else:
            return None
    except (ContentProblem, TypeError, KeyError, AttributeError):
        return None
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt):
        return None
    if system_prompt and not any(_role(m) == "system" for m in prompt):
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return {"messages": [{"role": m.get("role"), "content": m["content"]} for m in prompt], "reference": reference}


def _role(message) -> str | None:
    return message.get("role") if isinstance(message, dict) else None


def prompts_from_rows(rows, system_prompt: str | None, limit: int | None, source: str) -> list[dict]:
    """The first `limit` (all if None) prompts of `rows` (see prompt_of); none is a one-line error."""
    prompts = []
    for row in rows:
        if limit is not None and len(prompts) >= limit:
            break
        prompt = prompt_of(row, system_prompt)
        if prompt is not None:
            prompts.append(prompt)
    if not prompts:
        raise PosttrainError(
            f"{source}: no row has messages that end before an assistant turn (a `messages` conversation with "
            "an assistant reply, or a conversational `prompt`), so there is nothing to generate from"
        )
    return prompts


def load_prompts(path: str | Path, system_prompt: str | None = None, limit: int | None = None) -> list[dict]:
    """Prompts from a JSONL of `messages` (or preference) rows, or a data_scripts directory's test.jsonl."""
    path = Path(path)
    file = path / "test.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise PosttrainError(f"prompts: {file} not found (a .jsonl of messages rows or a data_scripts directory)")
    check_json_file(file)
    rows = [row for _, row in read_json_rows(file)]
    return prompts_from_rows(rows, system_prompt, limit, f"prompts {file}")
