"""Tiny template fixtures with three tool/reasoning syntaxes (written for these tests, no download):
Hermes (the built-in chatml-tools), Qwen3-style (native reasoning_content, old reasoning dropped,
<tool_call> blocks) and Llama-3.1-style (<|python_tag|> JSON calls, ipython results, trimmed contents)."""

QWEN3 = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n<tools>' }}{%- for t in tools %}{{- '\n' + (t | tojson) }}{%- endfor %}"
    "{{- '\n</tools><|im_end|>\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}{{- '<|im_start|>user\n' + m.content + '<|im_end|>\n' }}"
    "{%- elif m.role == 'assistant' %}{{- '<|im_start|>assistant\n' }}"
    "{%- if loop.index0 > ns.last_query and m.reasoning_content %}"
    "{{- '<think>\n' + m.reasoning_content.strip('\n') + '\n</think>\n\n' }}{%- endif %}"
    "{{- m.content }}"
    "{%- for c in m.tool_calls or [] %}{%- if not loop.first or m.content %}{{- '\n' }}{%- endif %}"
    "{{- '<tool_call>\n{\"name\": \"' + c.function.name + '\", \"arguments\": ' + (c.function.arguments | tojson)"
    " + '}\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\n' }}"
    "{%- elif m.role == 'tool' %}{{- '<|im_start|>user\n<tool_response>\n' + m.content + "
    "'\n</tool_response><|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

LLAMA31 = (
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{%- if tools %}{{- 'Answer with a JSON call {\"name\": name, \"parameters\": {...}} when a tool helps.\n' }}"
    "{%- for t in tools %}{{- (t | tojson) + '\n' }}{%- endfor %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] | trim }}{%- endif %}{{- '<|eot_id|>' }}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}"
    "{%- elif m['role'] == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- elif m['role'] == 'assistant' and m['tool_calls'] %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>' }}"
    "{%- for c in m['tool_calls'] %}{{- '{\"name\": \"' + c['function']['name'] + '\", \"parameters\": ' + "
    "(c['function']['arguments'] | tojson) + '}' }}{%- endfor %}{{- '<|eom_id|>' }}"
    "{%- else %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

LLAMA_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]
QWEN_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def call(cid: str, city: str) -> dict:
    return {"id": cid, "type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
