"""The shape of a conversation every stage accepts, checked in one place.

`data_scripts` drops a row with a problem and counts it under the reason's name (meta.json `dropped`);
training refuses it in one line naming the file and row. Both ask `message_problem`, and both read the
shapes real datasets have through `text_content` and `as_conversation`:

- content as a list of parts (`[{"type": "text", "text": ...}, {"type": "image", ...}]`, the OpenAI and
  Hugging Face multimodal-chat form): the text parts are joined as the chat templates render them (one
  after the other, nothing between); the other parts are dropped and counted (`NON_TEXT_PART`), and a turn
  with nothing but such parts has no text to train on (`NON_TEXT_ONLY`);
- null content is a missing field (`EMPTY_FIELD`); a number, a boolean or an object is not text
  (`CONTENT_NOT_TEXT`), never read as an empty turn;
- TRL's standard (string) forms: a string `prompt` is one user turn, a string `chosen` / `rejected` /
  `completion` one assistant turn; an SFT `prompt` + `completion` row is the conversation prompt + completion.
"""

from __future__ import annotations

from posttrain.conversion.chat_template import ROLES

# Problems, named as the drop reasons of meta.json.
EMPTY_FIELD = "empty_or_missing_field"
UNKNOWN_ROLE = "unknown_role"
CONTENT_NOT_TEXT = "content_not_text"
NON_TEXT_ONLY = "only_non_text_content"
NO_FINAL_ASSISTANT = "no_final_assistant_turn"
EMPTY_FINAL_ASSISTANT = "empty_final_assistant_turn"
# Not a row's problem: the count of non-text content parts dropped from rows that are kept
# (meta.json `dropped_parts`).
NON_TEXT_PART = "non_text_content_part"

DESCRIPTIONS = {
    EMPTY_FIELD: "expected a non-empty list of messages, each with its content",
    UNKNOWN_ROLE: f"each message needs a role in {ROLES}",
    CONTENT_NOT_TEXT: "a message's content must be text (a string, or a list of parts with text parts)",
    NON_TEXT_ONLY: "a message has only non-text content parts (images, audio, ...): no text to train on",
    NO_FINAL_ASSISTANT: "the last message must be the assistant's",
    EMPTY_FINAL_ASSISTANT: "the last (assistant) message is empty",
}


class ContentProblem(ValueError):
    """A content that cannot be read as text; `reason` is one of the problems above."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def text_content(content) -> tuple[str, int]:
    """(the text of a message's content, how many non-text parts were dropped from it).

    A string is itself; a list of parts is its text parts joined; None raises ContentProblem(EMPTY_FIELD),
    anything else ContentProblem(CONTENT_NOT_TEXT), a list of nothing but non-text parts
    ContentProblem(NON_TEXT_ONLY)."""
    if isinstance(content, str):
        return content, 0
    if content is None:
        raise ContentProblem(EMPTY_FIELD)
    if not isinstance(content, list):
        raise ContentProblem(CONTENT_NOT_TEXT)
    texts, other = [], 0
    for part in content:
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ContentProblem(CONTENT_NOT_TEXT)
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise ContentProblem(CONTENT_NOT_TEXT)
            texts.append(part["text"])
        else:
            other += 1
    if other and not texts:
        raise ContentProblem(NON_TEXT_ONLY)
    return "".join(texts), other


def text_messages(messages) -> tuple[list[dict], int]:
    """A message list with every content as text (see text_content) and the count of non-text parts dropped;
    a list that is not one of messages is returned as it is, for message_problem to name."""
    if not isinstance(messages, list):
        return messages, 0
    out, dropped = [], 0
    for m in messages:
        if isinstance(m, dict) and not isinstance(m.get("content"), str):
            text, n = text_content(m.get("content"))
            m, dropped = {"role": m.get("role"), "content": text}, dropped + n
        out.append(m)
    return out, dropped


def as_turns(value, role: str):
    """TRL's standard form: a string is one `role` message; anything else is left as it is."""
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def message_problem(messages, final_assistant: bool = False) -> str | None:
    """The first problem of a message list (one of the names above), or None for a usable one.

    Usable: a non-empty list of {role in ROLES, content: str}; with `final_assistant`, ending on a
    non-empty assistant message.
    """
    if not isinstance(messages, list) or not messages:
        return EMPTY_FIELD
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return UNKNOWN_ROLE
        if not isinstance(m.get("content"), str):
            try:
                text_content(m.get("content"))
            except ContentProblem as problem:
                return problem.reason
            return CONTENT_NOT_TEXT  # parts that are text: read them with text_messages first
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
