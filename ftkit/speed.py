"""Speed levers, each switchable in the recipe and chosen from the hardware when left on auto:
Liger fused kernels, torch.compile and the batch size. (Precision, threads and activation
checkpointing are chosen in hardware.py / stages/common.py; padding-free packing is data.packing.)"""

from __future__ import annotations

import math

from ftkit.errors import UserError
from ftkit.hardware import Hardware
from ftkit.recipe import Recipe

# Rows of data.max_length tokens that `batch_size: auto` starts from on a GPU; the Trainer halves
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


def batch_size(recipe: Recipe, hw: Hardware) -> int:
    """The per-device batch to start from (see auto_find_batch in speed_kwargs)."""
    b = recipe.train.batch_size
    if b != "auto":
        return b
    if hw.device != "cuda":
        return AUTO_BATCH_CPU
    return max(1, 2 ** int(math.log2(max(1, AUTO_BATCH_TOKENS // recipe.data.max_length))))


def speed_kwargs(recipe: Recipe, hw: Hardware, model_type: str) -> dict:
    """SFTConfig fields for the levers."""
    auto_batch = recipe.train.batch_size == "auto" and hw.device == "cuda"
    return dict(
        use_liger_kernel=use_liger(recipe, hw, model_type),
        torch_compile=recipe.train.compile,
        auto_find_batch_size=auto_batch,
    )


def describe(kwargs: dict, start_batch: int) -> str:
    on = [name for name, key in (("liger", "use_liger_kernel"), ("torch.compile", "torch_compile")) if kwargs[key]]
    batch = f"batch {start_batch}" + (" (auto: halves on out-of-memory)" if kwargs["auto_find_batch_size"] else "")
    return f"speed: {', '.join(on) or 'no fused kernels, eager'} · {batch}"
