"""What a run dir (or adapter dir, or merged model dir) says about itself: is it an adapter, on which
base, with which method, is it a reward model. One reader for stages, merge, export, serve and
inference, so none of them imports another to ask."""

from __future__ import annotations

import json
from pathlib import Path

from ftkit import safe_yaml
from ftkit.errors import UserError


def _field(run_dir: Path, sec: str, key: str, kind: type | tuple, default=None):
    """recipe.yaml's sec.key of a run dir, of the given type; a hostile or damaged file is a UserError."""
    path = Path(run_dir) / "recipe.yaml"
    value = safe_yaml.section(safe_yaml.load_mapping_file(path), sec, path).get(key, default)
    if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is int)):
        raise UserError(f"{path}: {sec}.{key}: expected {getattr(kind, '__name__', kind)}, found {value!r}; "
                        "this file was not written by ftkit or was damaged")
    return value


def _adapter_config(path: Path) -> dict:
    return json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base_name(adapter_dir: Path) -> str:
    """The base an adapter was trained on: the run's recipe (keeps aliases/gguf), else the adapter config."""
    name = _field(adapter_dir, "model", "name", str)
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
    return bool(_field(run_dir, "model", "trust_remote_code", bool, False))


def run_method(run_dir: Path) -> str | None:
    """method.type a run dir was trained with (from its recipe.yaml), if known."""
    return _field(run_dir, "method", "type", str)


def run_bits(run_dir: Path) -> int:
    return _field(run_dir, "method", "bits", int, 4)


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
