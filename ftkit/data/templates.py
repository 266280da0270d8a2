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

# ChatML with Hermes/Qwen2.5-style tool use, for models whose own template has none: the tools in a
# system block, each call as a <tool_call> JSON block, each result as a <tool_response> in a user turn.
# Contents are only pasted (never tested), so plain rows keep the fast render path.
CHATML_TOOLS = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first and tools %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{%- if message['tool_calls'] %}{%- for call in message['tool_calls'] %}"
    "{{- ('\n' if not loop.first else '') + '<tool_call>\n{\"name\": \"' + call['function']['name'] + "
    "'\", \"arguments\": ' + (call['function']['arguments'] | tojson) + '}\n</tool_call>' }}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

BUILTIN = {"chatml": CHATML, "chatml-tools": CHATML_TOOLS, "alpaca": ALPACA}


def resolve_template(tokenizer, override: str | None, where: str = "data.template") -> str | None:
    """The template to use, or None when the tokenizer has none and none was asked for."""
    if override:
        if override in BUILTIN:
            return BUILTIN[override]
        if "{%" in override or "{{" in override:
            return override
        raise UserError(f"{where}: unknown template {override!r}; use chatml, chatml-tools, alpaca, "
                        "or a Jinja template string")
    return getattr(tokenizer, "chat_template", None)


def require_template(tokenizer, template: str | None, where: str = "data.template") -> str:
    if template is None:
        raise UserError(
            f"{where}: the model's tokenizer has no chat template and the data is chat-formatted; "
            "set data.template: chatml (or alpaca, or a Jinja string)"
        )
    return template


_PROBE_TOOLS = [{"type": "function", "function": {"name": "ftkit_probe_tool", "description": "probe",
                                                  "parameters": {"type": "object", "properties": {}}}}]
_PROBE = [
    {"role": "user", "content": "probe question"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_probe1", "type": "function",
         "function": {"name": "ftkit_probe_tool", "arguments": {"probe_arg": "probe_value_17"}}}]},
    {"role": "tool", "tool_call_id": "call_probe1", "name": "ftkit_probe_tool", "content": "probe_result_42"},
    {"role": "assistant", "content": "probe answer"},
]


def renders_tools(tokenizer, template: str) -> bool:
    """Whether a template shows tool calls and results (rendering a probe conversation), e.g. SmolLM2's does not."""
    try:
        text = tokenizer.apply_chat_template(_PROBE, tools=_PROBE_TOOLS, chat_template=template, tokenize=False)
    except Exception:  # a template that raises on tool turns cannot render them either
        return False
    return all(s in text for s in ("ftkit_probe_tool", "probe_value_17", "probe_result_42"))


def template_name(override: str | None) -> str:
    if not override:
        return "the tokenizer's own chat template"
    return f"data.template {override}" if override in BUILTIN else "the data.template Jinja string"


def require_tool_template(tokenizer, template: str | None, override: str | None, where: str) -> None:
    """Tool-calling data needs a template that renders tools: refuse the others before any model loads."""
    if template is not None and renders_tools(tokenizer, template):
        return
    raise UserError(
        f"{where}: the data has tool calls, but {template_name(override)} cannot render them "
        f"(a probe conversation's tool call and tool result did not appear in its text); "
        "set data.template: chatml-tools (ChatML with <tool_call> JSON blocks) or a template with tool support"
    )
