"""Where a post-SFT stage starts: a base model, or an earlier run dir (e.g. an SFT LoRA run).

Starting from a run dir, its LoRA adapter is *merged* into the base in memory, so the
policy trains a fresh adapter on top of the SFT model and the reference model of dpo/kto
(and rl's KL) is the SFT model itself. When the run is saved, both adapters are folded
into one LoRA of rank r_sft + r_new relative to the original base
(W0 + s1·B1A1 + s2·B2A2 = W0 + [s1·B1 | s2·B2]·[A1; A2], exact), so the run dir loads on
the base model alone and `generate` / `merge-lora` treat it like any other run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ftkit.errors import UserError
from ftkit.runmeta import adapter_base_name, is_adapter_dir
from ftkit.recipe import Recipe, resolve_path

ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class Start:
    base_name: str  # what model.name finally points at (alias, hub id, dir)
    run_dir: Path | None  # an earlier run whose adapter is merged in, or None


def _foldable(cfg: dict, where: str) -> None:
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"it is a {cfg.get('peft_type')} adapter")
    if cfg.get("use_dora"):
        problems.append("it uses DoRA")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        problems.append("it has per-module ranks")
    extra = [m for m in (cfg.get("modules_to_save") or []) if m not in ("classifier", "score")]
    if extra:
        problems.append(f"it fully trains {', '.join(extra)}")
    if problems:
        raise UserError(
            f"{where}: cannot start from this run: {'; '.join(problems)}, so its adapter cannot be folded into "
            "the new one exactly. Merge it first (ftkit merge-lora RUN_DIR -o MERGED) and set model.name to MERGED."
        )


def resolve_start(recipe: Recipe) -> Start:
    name = recipe.model.name
    path = resolve_path(name, recipe._source)
    if path.is_dir() and is_adapter_dir(path):
        cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        where = f"{recipe.where('model', 'name')}: model.name: {name}"
        if cfg.get("task_type") == "SEQ_CLS":
            raise UserError(f"{where} is a reward model run; a policy starts from a base model or an SFT run dir")
        _foldable(cfg, where)
        return Start(adapter_base_name(path), path)
    return Start(name, None)


def merge_start_adapter(model, start: Start, log=print):
    """Merge the starting run's adapter into the loaded base (causal LM or sequence classifier)."""
    if start.run_dir is None:
        return model
    from peft import PeftConfig, PeftModel

    cfg = PeftConfig.from_pretrained(str(start.run_dir))
    cfg.task_type = None  # plain PeftModel: the same LoRA weights apply to a causal LM or a classifier body
    merged = PeftModel.from_pretrained(model, str(start.run_dir), config=cfg).merge_and_unload()
    log(f"starting from {start.run_dir}: its adapter is merged into {start.base_name} for training "
        "(the reference model is that merged model); both adapters are folded into one when saving")
    return merged


def check_new_adapter(model, start: Start) -> None:
    if start.run_dir is None:
        return
    cfg = getattr(model, "peft_config", {}).get("default")
    if cfg is None:
        raise UserError("model.name: starting from a run dir needs a LoRA method for the new stage "
                        "(full fine-tuning would have to save the whole merged model)")
    _foldable(cfg.to_dict(), "method")


def _scale(cfg: dict) -> float:
    r, alpha = cfg["r"], cfg["lora_alpha"]
    return alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r


def _modules(sd: dict) -> set[str]:
    return {k.rsplit(".lora_A.", 1)[0] for k in sd if ".lora_A." in k}


def fold_adapters(first: Path, work: Path) -> dict:
    """Rewrite the adapter in `work` (trained on top of `first` merged) as one adapter on first's base."""
    import torch
    from safetensors.torch import load_file, save_file

    cfg1 = json.loads((first / "adapter_config.json").read_text(encoding="utf-8"))
    cfg2 = json.loads((work / "adapter_config.json").read_text(encoding="utf-8"))
    sd1, sd2 = load_file(str(first / ADAPTER_FILE)), load_file(str(work / ADAPTER_FILE))
    r1, r2, s1, s2 = cfg1["r"], cfg2["r"], _scale(cfg1), _scale(cfg2)
    out = {k: v for k, v in sd2.items() if ".lora_A." not in k and ".lora_B." not in k}  # e.g. a reward head
    for mod in sorted(_modules(sd1) | _modules(sd2)):
        a1, b1 = sd1.get(f"{mod}.lora_A.weight"), sd1.get(f"{mod}.lora_B.weight")
        a2, b2 = sd2.get(f"{mod}.lora_A.weight"), sd2.get(f"{mod}.lora_B.weight")
        ref_a, ref_b = (a1, b1) if a1 is not None else (a2, b2)
        dtype = ref_a.dtype
        # A module only one adapter touched gets zeros in the other's rows/columns: exact.
        a1 = a1 if a1 is not None else torch.zeros(r1, ref_a.shape[1], dtype=dtype)
        b1 = b1 if b1 is not None else torch.zeros(ref_b.shape[0], r1, dtype=dtype)
        a2 = a2 if a2 is not None else torch.zeros(r2, ref_a.shape[1], dtype=dtype)
        b2 = b2 if b2 is not None else torch.zeros(ref_b.shape[0], r2, dtype=dtype)
        out[f"{mod}.lora_A.weight"] = torch.cat([a1, a2.to(dtype)], 0).contiguous()
        out[f"{mod}.lora_B.weight"] = torch.cat([b1 * s1, (b2 * s2).to(dtype)], 1).contiguous()
    rank = r1 + r2
    targets = sorted(set(_as_list(cfg1["target_modules"])) | set(_as_list(cfg2["target_modules"])))
    cfg = {**cfg2, "r": rank, "lora_alpha": rank, "use_rslora": False, "target_modules": targets,
           "base_model_name_or_path": cfg1.get("base_model_name_or_path")}
    save_file(out, str(work / ADAPTER_FILE), metadata={"format": "pt"})
    (work / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return {"from": str(first), "rank_start": r1, "rank_new": r2, "rank_saved": rank}


def _as_list(targets) -> list[str]:
    if isinstance(targets, str):
        return [targets]
    return list(targets or [])
