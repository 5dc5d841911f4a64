"""Schema adapters: one source row -> one conversation or one preference pair.

One pure function per schema, each readable against its dataset card and
tested on rows written in that schema. An adapter returns the output row or
raises `Drop(reason)`; `posttrain.data.prep` counts the reasons in meta.json.

Conventions shared by every adapter:
- contents are stripped; a turn with no text is a drop, never a silent skip;
- content may be a list of parts (`posttrain.data.messages.text_content`): the text parts are
  joined, the others dropped and counted (meta.json `dropped_parts`, from the row's `PARTS_KEY`);
  null content is a missing field, a number or an object is `content_not_text`;
- a turn holding a ChatML control token as text (`<|im_end|>`, ...) is a drop:
  the tokenizer would read it as the token itself;
- a source's own (non-empty) system message is kept where it is, first or
  mid-conversation; only a conversation without any gets `system_prompt`
  first (None or '' adds nothing);
- TRL's standard string forms are read as one turn each: a string prompt is
  the user's, a string chosen / rejected / completion the assistant's;
- SFT rows are `{"messages": [...]}` ending on a non-empty assistant turn;
  preference rows are `{"prompt": [...], "chosen": [assistant], "rejected":
  [assistant]}`, the prompt being the whole dialogue before the final turn.
"""

from __future__ import annotations

import re
from collections import defaultdict

from posttrain.conversion.chat_template import ROLES, find_control_token
from posttrain.data.messages import (
    CONTENT_NOT_TEXT,
    EMPTY_FIELD,
    EMPTY_FINAL_ASSISTANT,
    NO_FINAL_ASSISTANT,
    NON_TEXT_ONLY,
    UNKNOWN_ROLE,
    ContentProblem,
    as_turns,
    message_problem,
    reads,
    text_content,
)

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, harmless, and honest assistant. Always answer as helpfully as possible while being safe."
)

# Drop reasons: the keys of meta.json "dropped" (those of the message shape are posttrain.messages').
PROMPT_MISMATCH = "chosen_rejected_prompt_mismatch"
SAME_RESPONSE = "chosen_equals_rejected"
DUPLICATE = "duplicate"
PROMPT_TOO_LONG = "prompt_too_long"
CONTROL_TOKEN = "chatml_control_token_in_text"
SFT_DROP_REASONS = (
    EMPTY_FIELD,
    UNKNOWN_ROLE,
    CONTENT_NOT_TEXT,
    NON_TEXT_ONLY,
    NO_FINAL_ASSISTANT,
    EMPTY_FINAL_ASSISTANT,
    CONTROL_TOKEN,
    DUPLICATE,
)
# An adapted row may carry the count of non-text content parts it dropped under this key (popped by prep).
PARTS_KEY = "_non_text_parts"
DPO_DROP_REASONS = SFT_DROP_REASONS + (PROMPT_MISMATCH, SAME_RESPONSE, PROMPT_TOO_LONG)

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class Drop(Exception):
    """This row cannot become a clean example; `reason` is counted, the row skipped."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def normalise(text: str) -> str:
    """Case- and whitespace-insensitive form, for duplicate and chosen==rejected checks."""
    return " ".join(text.split()).casefold()


# ------------------------------------------------------------------ building blocks


def _messages(turns, parts: list | None = None) -> list[dict]:
    """(role, content) pairs -> messages with known roles and stripped text content (see text_content);
    the count of non-text parts dropped is added to `parts[0]`.

    A source's empty system message first counts as no system message.
    """
    messages = []
    for role, content in turns:
        if role not in ROLES:
            raise Drop(UNKNOWN_ROLE)
        if content is None and role == "system" and not messages:
            content = ""  # a source's null system field (orca_dpo_pairs): no system message
        try:
            content, dropped = text_content(content)
        except ContentProblem as problem:
            raise Drop(problem.reason) from None
        if parts is not None:
            parts[0] += dropped
        content = content.strip()
        if find_control_token(content):
            raise Drop(CONTROL_TOKEN)
        messages.append({"role": role, "content": content})
    if messages and messages[0]["role"] == "system" and not messages[0]["content"]:
        del messages[0]
    return messages


def _list(row: dict, key: str) -> list:
    value = row.get(key)
    if not isinstance(value, list) or not value:
        raise Drop(EMPTY_FIELD)
    return value


def _pairs(items: list, role_key: str, content_key: str, roles: dict | None = None):
    """(role, content) from a list of dicts, mapping source role names (unknown ones stay unknown)."""
    for item in items:
        if not isinstance(item, dict):
            raise Drop(UNKNOWN_ROLE)
        role = item.get(role_key)
        yield (roles.get(role, role) if roles else role), item.get(content_key)


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """`system_prompt` first, unless the conversation has a system message of its own (anywhere)."""
    if any(m["role"] == "system" for m in messages) or not system_prompt:
        return messages
    return [{"role": "system", "content": system_prompt}] + messages


def _check_filled(messages: list[dict]) -> None:
    if not messages or any(not m["content"] for m in messages):
        raise Drop(EMPTY_FIELD)


def _split_final(messages: list[dict]) -> tuple[list[dict], str]:
    """(everything before the final assistant turn, its content)."""
    problem = message_problem(messages, final_assistant=True)
    if problem:
        raise Drop(problem)
    return messages[:-1], messages[-1]["content"]


def _with_parts(row: dict, parts: list) -> dict:
    if parts[0]:
        row[PARTS_KEY] = parts[0]
    return row


def conversation(turns, system_prompt: str | None) -> dict:
    """An SFT row: every turn kept, ending on a non-empty assistant turn."""
    parts = [0]
    messages = _messages(turns, parts)
    _split_final(messages)
    _check_filled(messages)
    return _with_parts({"messages": _with_system(messages, system_prompt)}, parts)


def preference(chosen_turns, rejected_turns, system_prompt: str | None) -> dict:
    """A preference row from two whole dialogues that differ only in the final assistant turn (the shared
    prompt's non-text parts are counted once)."""
    chosen_parts, rejected_parts = [0], [0]
    prompt, chosen = _split_final(_messages(chosen_turns, chosen_parts))
    rejected_prompt, rejected = _split_final(_messages(rejected_turns, rejected_parts))
    if prompt != rejected_prompt:
        raise Drop(PROMPT_MISMATCH)
    _check_filled(prompt)
    if normalise(chosen) == normalise(rejected):
        raise Drop(SAME_RESPONSE)
    row = {
        "prompt": _with_system(prompt, system_prompt),
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }
    return _with_parts(row, [max(chosen_parts[0], rejected_parts[0])])


def _with_input(instruction, extra) -> str:
    """Alpaca-style: `{instruction}\\n\\nInput:\\n{input}` when there is an input."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise Drop(EMPTY_FIELD)
    extra = extra.strip() if isinstance(extra, str) else ""
    return f"{instruction.strip()}\n\nInput:\n{extra}" if extra else instruction.strip()


# ------------------------------------------------------------------------- SFT


@reads("instruction", "input", "output")
def alpaca(row: dict, system_prompt: str | None) -> dict:
    """tatsu-lab/alpaca, yahma/alpaca-cleaned: instruction, input, output (`text` is ignored)."""
    user = _with_input(row.get("instruction"), row.get("input"))
    return conversation([("user", user), ("assistant", row.get("output"))], system_prompt)


@reads("instruction", "context", "response")
def dolly(row: dict, system_prompt: str | None) -> dict:
    """databricks/databricks-dolly-15k: instruction, context, response, category."""
    user = _with_input(row.get("instruction"), row.get("context"))
    return conversation([("user", user), ("assistant", row.get("response"))], system_prompt)


@reads("messages")
def messages(row: dict, system_prompt: str | None) -> dict:
    """`messages`: [{role, content}] (HuggingFaceH4/ultrachat_200k, local files, oasst threads)."""
    return conversation(_pairs(_list(row, "messages"), "role", "content"), system_prompt)


@reads("prompt", "completion")
def prompt_completion(row: dict, system_prompt: str | None) -> dict:
    """TRL's prompt-completion form: `prompt` and `completion`, each a string (one user turn, one assistant
    turn) or a list of messages; the conversation is the prompt followed by the completion."""
    prompt, completion = as_turns(row.get("prompt"), "user"), as_turns(row.get("completion"), "assistant")
    if not isinstance(prompt, list) or not prompt or not isinstance(completion, list) or not completion:
        raise Drop(EMPTY_FIELD)
    return conversation(_pairs(prompt + completion, "role", "content"), system_prompt)


@reads("conversations")
def sharegpt(row: dict, system_prompt: str | None) -> dict:
    """`conversations`: [{from, value}] with from in system/human/user/gpt/assistant (Open-Orca/SlimOrca)."""
    return conversation(_pairs(_list(row, "conversations"), "from", "value", SHAREGPT_ROLES), system_prompt)


_OASST_COLUMNS = ("message_id", "parent_id", "role", "text", "rank", "deleted", "review_result")


@reads("message_id", "parent_id", "role", "text")
def oasst_threads(dataset) -> list[dict]:
    """OpenAssistant/oasst1, oasst2: flat message rows -> one `messages` row per conversation tree.

    From each root, follow the best-ranked child (rank 0 best, unranked last, ties
    in source order) to a leaf. Deleted messages and those that failed review are
    left out with their subtrees. A thread that ends on the prompter stays as it
    is, so `messages` drops and counts it.
    """
    columns = [c for c in _OASST_COLUMNS if c in dataset.column_names]
    children, roots = defaultdict(list), []
    for row in dataset.select_columns(columns):
        if row.get("deleted") or row.get("review_result") is False:
            continue
        (children[row["parent_id"]] if row.get("parent_id") else roots).append(row)
    threads = []
    for node in roots:
        path = [node]
        while children[node["message_id"]]:
            node = min(children[node["message_id"]], key=lambda r: (r.get("rank") is None, r.get("rank") or 0))
            path.append(node)
        threads.append(
            {"messages": [{"role": OASST_ROLES.get(r["role"], r["role"]), "content": r["text"]} for r in path]}
        )
    return threads


# ------------------------------------------------------------------------- DPO


@reads("chosen", "rejected")
def chosen_rejected_lists(row: dict, system_prompt: str | None) -> dict:
    """`chosen` / `rejected` as whole message lists sharing the prompt turns
    (argilla/ultrafeedback-binarized-preferences-cleaned, argilla/distilabel-capybara-dpo-7k-binarized)."""
    return preference(
        _pairs(_list(row, "chosen"), "role", "content"),
        _pairs(_list(row, "rejected"), "role", "content"),
        system_prompt,
    )


_HH_SPEAKER = re.compile(r"\n\n(Human|Assistant):")


def _hh_turns(transcript) -> list[tuple[str, str]]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> (role, content); text before the first speaker has no role."""
    if not isinstance(transcript, str) or not transcript.strip():
        raise Drop(EMPTY_FIELD)
    head, *rest = _HH_SPEAKER.split(transcript)
    if head.strip():
        raise Drop(UNKNOWN_ROLE)
    return [(HH_ROLES[speaker], text) for speaker, text in zip(rest[::2], rest[1::2])]


@reads("chosen", "rejected")
def hh_rlhf(row: dict, system_prompt: str | None) -> dict:
    """Anthropic/hh-rlhf: chosen / rejected full transcripts; the whole dialogue before the final
    assistant turn is the prompt, and it must be the same in both."""
    return preference(_hh_turns(row.get("chosen")), _hh_turns(row.get("rejected")), system_prompt)


@reads("system", "question", "chosen", "rejected")
def orca_dpo(row: dict, system_prompt: str | None) -> dict:
    """Intel/orca_dpo_pairs: system, question, chosen, rejected strings."""
    prompt = [("system", row.get("system")), ("user", row.get("question"))]
    return preference(
        prompt + [("assistant", row.get("chosen"))], prompt + [("assistant", row.get("rejected"))], system_prompt
    )


@reads("prompt", "chosen", "rejected")
def preference_rows(row: dict, system_prompt: str | None) -> dict:
    """Local files in the output form or in TRL's standard one: prompt (messages, or a string: one user
    turn), chosen and rejected (messages, or strings: one assistant turn each). A row without a prompt is
    TRL's implicit-prompt form, chosen and rejected whole dialogues (as `chosen_rejected_lists`)."""
    if "prompt" not in row and isinstance(row.get("chosen"), list):
        return chosen_rejected_lists(row, system_prompt)
    prompt = as_turns(row.get("prompt"), "user")
    if not isinstance(prompt, list) or not prompt:
        raise Drop(EMPTY_FIELD)
    prompt = list(_pairs(prompt, "role", "content"))
    answers = {}
    for key in ("chosen", "rejected"):
        value = as_turns(row.get(key), "assistant")
        if not isinstance(value, list) or not value:
            raise Drop(EMPTY_FIELD)
        answers[key] = list(_pairs(value, "role", "content"))
    return preference(prompt + answers["chosen"], prompt + answers["rejected"], system_prompt)
