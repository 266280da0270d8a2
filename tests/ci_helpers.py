"""Recipe and run-dir helpers shared by the CI tests (test_ci*, test_resume, test_ddp)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def recipe(path: Path, model: Path, train_file: Path, **sections) -> Path:
    """A tiny-model recipe; keyword sections (train=..., data=..., top-level keys) merge into the defaults."""
    r = {
        "stage": "sft",
        "model": {"name": str(model)},
        "method": {"type": "lora", "r": 4, "alpha": 8},
        "data": {"train": str(train_file), "max_length": 64},
        "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1},
        "output": {"dir": str(path.parent / "run")},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            r.setdefault(key, {}).update(value)
        else:
            r[key] = value
    path.write_text(yaml.safe_dump(r, sort_keys=False), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter_model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
