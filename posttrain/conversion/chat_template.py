"""The ChatML chat template every converted and trained model carries, and what makes a tokenizer a chat tokenizer.

Each assistant message, *including its closing `<|im_end|>`*, sits inside `{% generation %}` markers,
so TRL's assistant-only loss (which reads those markers through `return_assistant_tokens_mask`) trains
the model to stop: a model whose `<|im_end|>` is masked out of the loss never learns to end a reply.
"""

from __future__ import annotations

import re

from posttrain.outputs.errors import is_template_error, template_error

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
ROLES = ("system", "user", "assistant")  # the roles the template renders (any other raises)

_CONTROL_TOKEN = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))


def find_control_token(text: str) -> str | None:
    """The first ChatML control token written as literal text in `text`, if any. The tokenizer turns
    it into the control token itself, so an answer would end mid-way, or a prompt forge a turn."""
    found = _CONTROL_TOKEN.search(text)
    return found.group() if found else None


CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{{- message['content'] + '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


# A conversation every chat template must render: a template that cannot is refused before any model loads.
PROBE_CONVERSATION = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
)


def check_template_renders(tokenizer, what: str) -> None:
    """One line naming `what` when the tokenizer's chat template cannot render PROBE_CONVERSATION: a
    template that does not parse, that Jinja's sandbox stops (`__class__` and the like), or that raises."""
    try:
        tokenizer.apply_chat_template(list(PROBE_CONVERSATION), tokenize=False, add_generation_prompt=True)
    except Exception as err:
        if not is_template_error(err):
            raise
        raise template_error(err, what) from None


def install_chat_template(tokenizer) -> None:
    """Make a tokenizer a chat tokenizer: ChatML template, eos `<|im_end|>`, pad `<|endoftext|>`, no BOS."""
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}")
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.eos_token = IM_END
    tokenizer.pad_token = ENDOFTEXT
    tokenizer.bos_token = None
