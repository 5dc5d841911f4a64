"""The shape of a conversation every stage accepts, checked in one place.

`data_scripts` drops a row with a problem and counts it under the reason's name (meta.json `dropped`);
training refuses it in one line naming the file and row. Both ask `message_problem`.
"""

from __future__ import annotations

from posttrain.conversion.chat_template import ROLES

# Problems, named as the drop reasons of meta.json.
EMPTY_FIELD = "empty_or_missing_field"
UNKNOWN_ROLE = "unknown_role"
NO_FINAL_ASSISTANT = "no_final_assistant_turn"
EMPTY_FINAL_ASSISTANT = "empty_final_assistant_turn"

DESCRIPTIONS = {
    EMPTY_FIELD: "expected a non-empty list of messages",
    UNKNOWN_ROLE: f"each message needs a role in {ROLES} and a string content",
    NO_FINAL_ASSISTANT: "the last message must be the assistant's",
    EMPTY_FINAL_ASSISTANT: "the last (assistant) message is empty",
}


def message_problem(messages, final_assistant: bool = False) -> str | None:
    """The first problem of a message list (one of the names above), or None for a usable one.

    Usable: a non-empty list of {role in ROLES, content: str}; with `final_assistant`, ending on a
    non-empty assistant message.
    """
    if not isinstance(messages, list) or not messages:
        return EMPTY_FIELD
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return UNKNOWN_ROLE
    if final_assistant and messages[-1]["role"] != "assistant":
        return NO_FINAL_ASSISTANT
    if final_assistant and not messages[-1]["content"].strip():
        return EMPTY_FINAL_ASSISTANT
    return None


def reads(*fields: str):
    """Declare the fields a reader of rows (a schema adapter, a training-row check) needs: named when a file
    has none of them."""

    def mark(function):
        function.fields = fields
        return function

    return mark
