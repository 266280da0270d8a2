"""PEFT methods: wrap a loaded base model as the recipe's method.type asks."""

from __future__ import annotations

from ftkit.errors import UserError
from ftkit.recipe import MethodSection


def linear_module_names(model) -> list[str]:
    """Leaf names of every linear layer inside the model body (not the LM head)."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    out_emb = model.get_output_embeddings()
    names = set()
    for full, module in model.named_modules():
        if module is out_emb or full.split(".")[-1] in ("lm_head", "score", "embed_out"):
            continue
        if isinstance(module, (nn.Linear, Conv1D)):
            names.add(full.split(".")[-1])
    return sorted(names)


def resolve_targets(model, method: MethodSection) -> list[str]:
    available = linear_module_names(model)
    if method.target_modules in ("auto", "all-linear"):
        # Attention + MLP projections of every block: the set LoRA papers and peers target.
        if not available:
            raise UserError(f"method.target_modules: found no linear layers in {type(model).__name__} to adapt")
        return available
    missing = [m for m in method.target_modules if m not in available]
    if missing:
        raise UserError(
            f"method.target_modules: {', '.join(missing)} not found in {type(model).__name__}; "
            f"its linear layers: {', '.join(available)}"
        )
    return list(method.target_modules)


def count_params(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total,
            "trainable_percent": round(100.0 * trainable / total, 4) if total else 0.0}


def apply_method(model, method: MethodSection, log=print, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig, get_peft_model

    if method.type == "lora":
        targets = resolve_targets(model, method)
        log(f"LoRA r={method.r} alpha={method.alpha:g} on: {', '.join(targets)}")
        cfg = LoraConfig(
            r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout, target_modules=targets,
            task_type=task_type, bias="none",
        )
        return get_peft_model(model, cfg)
    raise UserError(f"method.type: {method.type!r} is not supported")
