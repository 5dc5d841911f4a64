"""The ChatML chat template every converted and trained model carries.

Each assistant message, *including its closing `<|im_end|>`*, sits inside
`{% generation %}` markers, so TRL's assistant-only loss (which reads those
markers through `return_assistant_tokens_mask`) trains the model to stop. The
old system masked `<|im_end|>` out and its SFT model never stopped talking.
"""

from __future__ import annotations

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

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


def install_chat_template(tokenizer) -> None:
    """Make a tokenizer a chat tokenizer: ChatML template, eos `<|im_end|>`, pad `<|endoftext|>`, no BOS."""
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}")
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.eos_token = IM_END
    tokenizer.pad_token = ENDOFTEXT
    tokenizer.bos_token = None
