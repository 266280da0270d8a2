"""The Ollama Modelfile: its TEMPLATE (a Go template) renders multi-turn chats exactly as the tokenizer's
Jinja chat template does, for the template families chat models ship; stop tokens and SYSTEM."""

from __future__ import annotations

import pytest

from ftkit.modelfile import modelfile, render_go, template_from_modelfile

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
         "{{ raise_exception('System role not supported') }}{% endif %}"
         "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
ZEPHYR = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
DEFAULT_SYSTEM = ("{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                  "<|im_start|>system\nYou are Bob.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
                  "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?\nShow work."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}],
]


@pytest.fixture(scope="module")
def base_tok(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


def with_template(tok, template: str, bos: str | None = None):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


@pytest.mark.parametrize("name,template", [("chatml", CHATML), ("llama3", LLAMA3), ("gemma", GEMMA),
                                           ("zephyr", ZEPHYR), ("default-system", DEFAULT_SYSTEM)])
def test_modelfile_template_renders_as_the_chat_template(base_tok, name, template):
    tok = with_template(base_tok, template)
    text = modelfile("m.gguf", tok, ["<|im_end|>"], None)
    go = template_from_modelfile(text)
    system = "You are Bob." if name == "default-system" else None
    if system:
        assert 'SYSTEM """You are Bob."""' in text  # the template's built-in system prompt becomes SYSTEM
    for chat in CHATS:
        if name == "gemma" and chat[0]["role"] == "system":
            chat = chat[1:]
        msgs = chat if chat[0]["role"] == "system" or not system else [{"role": "system", "content": system}] + chat
        want = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert render_go(go, msgs) == want, (name, chat)


def test_modelfile_has_from_stops_and_the_recipes_system(base_tok):
    text = modelfile("tuned-q4_k_m.gguf", base_tok, ["<|im_end|>", "<|im_end|>", "<|endoftext|>"], "You are terse.")
    lines = text.splitlines()
    assert lines[0] == "FROM ./tuned-q4_k_m.gguf"
    assert lines.count('PARAMETER stop "<|im_end|>"') == 1 and 'PARAMETER stop "<|endoftext|>"' in lines
    assert 'SYSTEM """You are terse."""' in text  # the recipe's system prompt wins over the template default


def test_go_renderer_subset():
    tpl = '{{- range .Messages }}{{ if eq .Role "user" }}U:{{ .Content }}\n{{- else }} A:{{ .Content }}{{ end }}{{ end }}!'
    assert render_go(tpl, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]) == "U:x A:y!"


def test_untranslatable_template_is_a_clear_error(base_tok):
    from ftkit.errors import UserError

    reorders = ("{% for m in messages|reverse %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    with pytest.raises(UserError, match="Ollama TEMPLATE"):
        modelfile("m.gguf", with_template(base_tok, reorders), [], None)
