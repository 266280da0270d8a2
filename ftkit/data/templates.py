"""Chat templates: the tokenizer's own, or a built-in one for base models that have none.

Whatever template training used is saved with the run's tokenizer, so `generate` (and any
HF runtime reading the run dir) formats prompts exactly as training did.
"""

from __future__ import annotations

from ftkit.errors import UserError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Alpaca-style prompt for base models; the EOS after each response teaches the model to stop.
ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

BUILTIN = {"chatml": CHATML, "alpaca": ALPACA}


def resolve_template(tokenizer, override: str | None, where: str = "data.template") -> str | None:
    """The template to use, or None when the tokenizer has none and none was asked for."""
    if override:
        if override in BUILTIN:
            return BUILTIN[override]
        if "{%" in override or "{{" in override:
            return override
        raise UserError(f"{where}: unknown template {override!r}; use chatml, alpaca, or a Jinja template string")
    return getattr(tokenizer, "chat_template", None)


def require_template(tokenizer, template: str | None, where: str = "data.template") -> str:
    if template is None:
        raise UserError(
            f"{where}: the model's tokenizer has no chat template and the data is chat-formatted; "
            "set data.template: chatml (or alpaca, or a Jinja string)"
        )
    return template
