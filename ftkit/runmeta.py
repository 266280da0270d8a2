"""What a run dir (or adapter dir, or merged model dir) says about itself: is it an adapter, on which
base, with which method, is it a reward model. One reader for stages, merge, export, serve and
inference, so none of them imports another to ask."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ftkit.errors import UserError


def _recipe(run_dir: Path) -> dict:
    recipe = Path(run_dir) / "recipe.yaml"
    if not recipe.is_file():
        return {}
    return yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}


def _adapter_config(path: Path) -> dict:
    return json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base_name(adapter_dir: Path) -> str:
    """The base an adapter was trained on: the run's recipe (keeps aliases/gguf), else the adapter config."""
    name = (_recipe(adapter_dir).get("model") or {}).get("name")
    if name:
        if is_adapter_dir(Path(name).expanduser()):
            # Trained on top of another run (e.g. DPO after SFT), whose adapter was folded into this one.
            return adapter_base_name(Path(name).expanduser())
        return name
    name = _adapter_config(adapter_dir).get("base_model_name_or_path")
    if not name:
        raise UserError(f"{adapter_dir}: the adapter does not name its base model; pass --base")
    return name


def run_trust_remote_code(run_dir: Path) -> bool:
    return bool((_recipe(run_dir).get("model") or {}).get("trust_remote_code", False))


def run_method(run_dir: Path) -> str | None:
    """method.type a run dir was trained with (from its recipe.yaml), if known."""
    return (_recipe(run_dir).get("method") or {}).get("type")


def run_bits(run_dir: Path) -> int:
    return int((_recipe(run_dir).get("method") or {}).get("bits", 4))


def is_reward_adapter(path: Path) -> bool:
    return is_adapter_dir(path) and _adapter_config(path).get("task_type") == "SEQ_CLS"


def is_reward_model_dir(path: Path) -> bool:
    """An rm run dir, or a merged sequence classifier."""
    if is_reward_adapter(path):
        return True
    cfg = Path(path) / "config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text(encoding="utf-8"))
        return any(a.endswith("ForSequenceClassification") for a in data.get("architectures") or [])
    return False
