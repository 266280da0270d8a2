"""`ftkit plan`: parameters and memory per GPU for a recipe, before any weight is loaded.

The model is built on the meta device from its config (shapes, no storage) and wrapped by the
recipe's method exactly as training would, so the parameter counts are exact. Memory is arithmetic
on those counts; the assumptions are spelled out beside each formula and in docs/scale.md, with the
error measured against real runs.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ftkit.errors import UserError
from ftkit.recipe import Recipe

GIB = 2**30
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# bitsandbytes nf4 with double quantization: 4 bits per weight, an 8-bit absmax per 64 weights and an
# fp32 scale per 256 absmax values.
_NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
_INT8_BYTES = 1.0 + 4 / 4096  # LLM.int8: one byte per weight plus a per-row fp32 scale (rows ~ 4k)
CUDA_OVERHEAD = int(0.75 * GIB)  # CUDA context, cuBLAS workspace, allocator slack (typical, not measured here)


def parse_size(text: str) -> int:
    """'80GiB', '80GB', '24g', '81920MiB' -> bytes (GB and GiB both mean 2**30, as GPU specs do)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise UserError(f"--gpu-memory {text!r}: expected a size such as 80GiB, 24GB or 40960MiB")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2)]
    return int(float(m.group(1)) * scale)


@dataclass
class Plan:
    model: str
    method: str
    strategy: str
    world_size: int
    dtype: str
    batch_size: int
    seq_len: int
    activation_checkpointing: bool
    total_params: int
    trainable_params: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    gpu_memory: int | None

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total <= self.gpu_memory

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "fits": self.fits}


def _config(recipe: Recipe):
    from transformers import AutoConfig

    from ftkit.models import ALIASES, is_cached, resolve_model

    name = recipe.model.name
    if name in ALIASES:  # an alias's config, without fetching its weights
        name = is_cached(name) or ALIASES[name].hub_id
    elif name.endswith(".gguf") or name.startswith((".", "/", "~")):
        name = resolve_model(name)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=recipe.model.trust_remote_code,
                                          revision=recipe.model.revision)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{recipe.where('model', 'name')}: model.name: cannot read the config of {name!r}: {first}") from None


def meta_model(recipe: Recipe):
    """The base built on the meta device (no memory) and wrapped by the recipe's method."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftkit.methods import apply_method

    cfg = _config(recipe)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=recipe.model.trust_remote_code)
        # qlora's adapters are lora's; the 4-bit storage is accounted for below, not simulated.
        method = recipe.method.model_copy(update={"type": "lora"}) if recipe.method.type == "qlora" else recipe.method
        model = apply_method(model, method, log=lambda _s: None)
    return model


def _split_params(model, quantized_method: bool) -> tuple[int, int, int]:
    """(frozen params that would be quantized, other frozen params, trainable params)."""
    import torch.nn as nn

    head = model.get_output_embeddings()
    quantizable = set()
    if quantized_method:
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and mod is not head and "lora_" not in name:
                quantizable.add(id(mod.weight))
    q = other = trainable = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:  # tied embeddings count once
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel()
        elif id(p) in quantizable:
            q += p.numel()
        else:
            other += p.numel()
    return q, other, trainable


def _optimizer_bytes_per_param(optim: str, param_bytes: int) -> float:
    name = optim.lower()
    if "8bit" in name:
        return 2.0  # two 8-bit Adam states
    if name.startswith("sgd"):
        return 0.0
    if "adafactor" in name:
        return 0.0  # factored second moment: rows + columns, negligible next to the weights
    return 2.0 * param_bytes  # Adam: exp_avg and exp_avg_sq in the parameter's dtype


def activation_bytes(cfg, tokens: int, seq_len: int, w: int, checkpointing: bool, attention_scores: bool) -> int:
    """What backward needs kept, per layer, for a llama-style block (Korthikanti et al. 2022, adapted):
    ~10 hidden-sized tensors, 2 key/value-sized, 4 MLP-sized in the compute dtype, the RMSNorms' fp32
    copies (2 x 2 hidden in fp32), plus the attention scores when the kernel materialises them (eager,
    or SDPA's math path on CPU). With checkpointing a layer keeps only its input and one layer at a time
    is recomputed. The loss adds logits in the compute dtype, their fp32 upcast (none when already fp32)
    and its gradient."""
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    inter = getattr(cfg, "intermediate_size", 4 * h)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", heads) * (getattr(cfg, "head_dim", None) or h // heads)
    per_token = (10 * h + 2 * kv + 4 * inter) * w + 4 * h * 4
    scores = 2 * heads * seq_len * w if attention_scores else 0  # per token: a row of scores + softmax
    layer = tokens * (per_token + scores)
    body = (tokens * h * w * layers + layer) if checkpointing else layer * layers
    upcast = 4 if w != 4 else 0  # .float() of fp32 logits is the same tensor, not a copy
    logits = tokens * cfg.vocab_size * (w + upcast + 4)
    return int(body + logits)


def plan(recipe: Recipe, gpus: int | None = None, gpu_memory: int | None = None) -> Plan:
    from ftkit.hardware import detect

    hw = detect(recipe.model.dtype)
    on_gpu = bool(gpus) or hw.device == "cuda"
    dtype = recipe.model.dtype if recipe.model.dtype != "auto" else ("bfloat16" if on_gpu else hw.dtype)
    w = _BYTES[dtype]
    world = gpus or max(1, hw.num_gpus)
    model = meta_model(recipe)
    qlora = recipe.method.type == "qlora"
    quantized, frozen, trainable = _split_params(model, qlora)
    if qlora:
        # prepare_model_for_kbit_training keeps the layers it does not quantize (embeddings, norms, head) in fp32.
        weights = quantized * (_NF4_BYTES if recipe.method.bits == 4 else _INT8_BYTES) + frozen * 4
    else:
        weights = (quantized + frozen) * w
    tw = 4  # trained weights are fp32 masters under bf16/fp16 autocast (peft's adapters, methods._fp32_master_weights)
    weights += trainable * tw
    grads = trainable * tw
    optim = trainable * _optimizer_bytes_per_param(recipe.train.optim, tw)
    strategy = recipe.distributed if world > 1 else "single"
    zero = recipe.zero_stage if strategy == "deepspeed" else 0
    if strategy == "fsdp" or zero == 3:
        weights, grads, optim = weights / world, grads / world, optim / world
    elif zero == 2:
        grads, optim = grads / world, optim / world
    batch = recipe.train.batch_size if isinstance(recipe.train.batch_size, int) else \
        (max(1, 65536 // recipe.data.max_length) if on_gpu else 4)
    ckpt = recipe.train.activation_checkpointing is True
    eager = recipe.model.attn_implementation == "eager" or not on_gpu
    acts = activation_bytes(model.config, batch * recipe.data.max_length, recipe.data.max_length, w, ckpt, eager)
    return Plan(recipe.model.name, recipe.method.type, strategy, world, dtype, batch, recipe.data.max_length, ckpt,
                quantized + frozen + trainable, trainable, int(weights), int(grads), int(optim), acts,
                CUDA_OVERHEAD if on_gpu else 0, gpu_memory)
