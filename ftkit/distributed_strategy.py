"""What each multi-process strategy (ddp | fsdp | deepspeed) can run, checked before any weight loads,
and the settings FSDP / ZeRO-3 + QLoRA need (the answer.ai recipe): 4-bit weights stored in the compute
dtype so they can be sharded like any other tensor, and the checkpoint read on rank 0 only."""

from __future__ import annotations

import os

from ftkit.errors import UserError


def shards_weights(recipe) -> bool:
    """FSDP and ZeRO-3 split every weight across ranks (ZeRO-2 and DDP keep a whole copy per rank)."""
    return recipe.distributed == "fsdp" or (recipe.distributed == "deepspeed" and recipe.zero_stage == 3)


def check(recipe, world_size: int, device: str) -> None:
    """Combinations that cannot work exit 2 here, before the model loads, with the reason and a way out."""
    if world_size <= 1 or recipe.distributed == "ddp":
        return
    where = f"{recipe.where('distributed')}: distributed: {recipe.distributed}"
    qlora = recipe.method.type == "qlora"
    if qlora and recipe.method.bits == 8 and shards_weights(recipe):
        raise UserError(f"{where} with method.bits: 8: bitsandbytes' 8-bit weights cannot be sharded (only 4-bit "
                        "ones can be stored in a shardable dtype); use method.bits: 4, or distributed: ddp")
    if qlora and recipe.distributed == "fsdp" and device == "cpu":
        raise UserError(f"{where} with method.type: qlora needs CUDA GPUs: on CPU processes FSDP2 re-creates the "
                        "4-bit weights without their quantization state (bitsandbytes Params4bit), and FSDP1 refuses "
                        "CPU devices. Use distributed: ddp here (every process holds the 4-bit model), or run on GPUs")
    if recipe.distributed == "deepspeed":
        if device != "cuda":
            raise UserError(f"{where} needs CUDA GPUs (DeepSpeed has no CPU training path here); on CPU use "
                            "distributed: ddp or fsdp")
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError(f"{where} needs the deepspeed package: pip install 'ftkit[deepspeed]' "
                            "(it builds against your CUDA toolkit)") from None


def sharded_load(recipe, load_kwargs: dict, world_size: int) -> dict:
    """from_pretrained kwargs for a base that FSDP / ZeRO-3 will shard. For QLoRA: nf4 weights stored
    as the compute dtype (bnb_4bit_quant_storage), so the sharder sees ordinary tensors; no per-rank
    device_map (the sharder places the shards). The checkpoint is read on rank 0 only, the other ranks
    build on the meta device and receive their shards (transformers reads this from the environment)."""
    if world_size <= 1 or not shards_weights(recipe):
        return load_kwargs
    out = dict(load_kwargs)
    q = out.get("quantization_config")
    if q is not None and getattr(q, "load_in_4bit", False):
        q.bnb_4bit_quant_storage = q.bnb_4bit_compute_dtype
        out.pop("device_map", None)
    if recipe.distributed == "fsdp":
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"
    return out


def fsdp_config(recipe) -> dict:
    """TrainingArguments.fsdp_config: FSDP2, one unit per decoder layer, rank-0 loading; LoRA's frozen base
    and its adapters share those units (activation checkpointing follows train.activation_checkpointing)."""
    return {"fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
            "cpu_ram_efficient_loading": True}
