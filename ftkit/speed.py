"""Speed levers, each switchable in the recipe and chosen from the hardware when left on auto:
Liger fused kernels, torch.compile, padding-free batches (varlen.py), the batch size and the
low-memory mode. (Precision, threads and plain activation checkpointing are chosen in hardware.py /
stages/common.py; packing is data.packing.)"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ftkit import varlen
from ftkit.errors import UserError
from ftkit.hardware import Hardware
from ftkit.recipe import Recipe

# Rows of data.max_length tokens that `batch_size: auto` starts from on a GPU; the Trainer shrinks
# the batch on every out-of-memory until it fits (transformers' auto_find_batch_size).
AUTO_BATCH_TOKENS = 64 * 1024
AUTO_BATCH_CPU = 4  # on a CPU compute, not memory, is the limit: a bigger batch buys no tokens/s


def liger_supports(model_type: str) -> bool:
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    return model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def check_levers(recipe: Recipe, hw: Hardware) -> None:
    """What can be refused before the model loads."""
    if recipe.train.liger is not True:
        return
    from transformers.utils import is_liger_kernel_available

    where = recipe.where("train", "liger")
    if hw.device != "cuda":
        raise UserError(f"{where}: train.liger: true needs a CUDA GPU (Liger's kernels are Triton); "
                        f"this run is on {hw.device_name}. Use liger: auto to use it only where it runs")
    if not is_liger_kernel_available():
        raise UserError(f"{where}: train.liger: true needs the liger-kernel package (pip install liger-kernel)")


def use_liger(recipe: Recipe, hw: Hardware, model_type: str) -> bool:
    """auto: on for CUDA GPUs when liger-kernel is installed and knows the architecture. The kernels
    are Triton, so there is nothing to gain (or run) on a CPU."""
    want = recipe.train.liger
    if want is False:
        return False
    check_levers(recipe, hw)
    from transformers.utils import is_liger_kernel_available

    ready = hw.device == "cuda" and is_liger_kernel_available() and liger_supports(model_type)
    if want is True and not ready:
        raise UserError(f"{recipe.where('train', 'liger')}: train.liger: liger-kernel has no kernels for model "
                        f"type {model_type!r}; use liger: auto or false")
    return ready


def batch_size(recipe: Recipe, hw: Hardware, mean_length: float | None = None) -> int:
    """The per-device batch to start from (see auto_find_batch in speed_kwargs). A padded row costs
    data.max_length tokens at worst, so the token budget buys budget/max_length rows; a padding-free
    micro-batch costs its samples' own tokens, so pass the mean sample length to size it by that."""
    b = recipe.train.batch_size
    if b != "auto":
        return b
    if hw.device != "cuda":
        return AUTO_BATCH_CPU
    per_row = recipe.data.max_length if recipe.data.packing or not mean_length else max(1.0, mean_length)
    return max(1, 2 ** int(math.log2(max(1, AUTO_BATCH_TOKENS // per_row))))


def speed_kwargs(recipe: Recipe, hw: Hardware, model_type: str) -> dict:
    """SFTConfig fields for the levers."""
    auto_batch = recipe.train.batch_size == "auto" and hw.device == "cuda"
    return dict(
        use_liger_kernel=use_liger(recipe, hw, model_type),
        torch_compile=recipe.train.compile,
        auto_find_batch_size=auto_batch,
    )


def memory_kwargs(recipe: Recipe, hw: Hardware) -> tuple[dict, str | None]:
    """train.low_memory: activation checkpointing, and for full/freeze on a GPU (where optimizer state is
    two fp32 copies of every trained weight) bitsandbytes' paged AdamW, whose state moves to CPU memory
    under pressure. Returns (TrainingArguments fields, a note for the speed line)."""
    if not recipe.train.low_memory:
        return {}, None
    kw: dict = {"activation_checkpointing": True}
    if recipe.method.type not in ("full", "freeze") or hw.device != "cuda":
        return kw, "low-memory: activation checkpointing"
    if recipe.train.optim != "adamw_torch":
        return kw, f"low-memory: activation checkpointing (optimizer {recipe.train.optim} as the recipe says)"
    from transformers.utils import is_bitsandbytes_available

    if not is_bitsandbytes_available():
        return kw, "low-memory: activation checkpointing (pip install bitsandbytes for a paged optimizer)"
    kw["optim"] = "paged_adamw_32bit"  # the same AdamW arithmetic; only where its state lives changes
    return kw, "low-memory: activation checkpointing, paged AdamW"


@dataclass
class Levers:
    """Everything speed.py chose for one sft/pt run: SFTConfig fields, the speed line and metrics."""

    kwargs: dict
    flat: varlen.Plan
    memory_note: str | None

    def describe(self) -> str:
        k = self.kwargs
        on = [name for name, key in (("liger", "use_liger_kernel"), ("torch.compile", "torch_compile")) if k[key]]
        batch = f"batch {k['per_device_train_batch_size']}" + (
            " (auto: shrinks on out-of-memory)" if k["auto_find_batch_size"] else "")
        parts = [", ".join(on) or "no fused kernels, eager", self.flat.describe(), batch, self.memory_note]
        return "speed: " + " · ".join(p for p in parts if p)

    def metrics(self) -> dict:
        k = self.kwargs
        return {"liger": k["use_liger_kernel"], "compile": k["torch_compile"], "auto_batch": k["auto_find_batch_size"],
                "padding_free": self.flat.as_metrics(), "low_memory": self.memory_note}


def sft_levers(recipe: Recipe, hw: Hardware, model, train_summary: dict) -> Levers:
    """Call once the method is applied (the padding-free decision depends on the wrapped model)."""
    flat = varlen.plan(recipe, hw, model)
    mean = train_summary["tokens"] / train_summary["kept"] if flat.enabled and train_summary.get("kept") else None
    rows = batch_size(recipe, hw, mean)
    memory, note = memory_kwargs(recipe, hw)
    kwargs = {**speed_kwargs(recipe, hw, model.config.model_type), "per_device_train_batch_size": rows,
              "per_device_eval_batch_size": rows, **memory,
              **varlen.config_kwargs(flat, recipe.data.packing)}
    return Levers(kwargs, flat, note)
