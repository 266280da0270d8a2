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


def meta_model(recipe: Recipe, cfg=None):
    """The base built on the meta device (no memory) and wrapped by the recipe's method."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftkit.methods import apply_method

    cfg = cfg if cfg is not None else _config(recipe)
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


# TRL's SFTTrainer scores the LM head in tiles of up to 4096 tokens x 32768 vocabulary entries (its fused,
# chunked log-prob head) instead of materialising the logits; trl/trainer/utils.py, kernels/chunked_logprob.py.
_HEAD_TOKENS, _HEAD_VOCAB = 4096, 32768
_FUSED_HEAD_STAGES = ("sft", "pt")


def layer_bytes_per_token(cfg, w: int, trains_norms: bool, dropout: bool, attention_scores: bool, seq_len: int) -> int:
    """What backward keeps per token in one llama-style block, counted with autograd's saved-tensor hooks on
    this block (CPU, SDPA): 7 hidden-sized tensors (each RMSNorm's input, the attention input and output, the
    o-projection input, the residual), 2 key/value-sized, 4 MLP-sized, in the compute dtype; the RMSNorms' fp32
    upcasts under bf16/fp16; the norms' outputs when their weights train (full, freeze); LoRA dropout's
    output and mask at the input of each adapted linear (all seven); attention scores when the kernel
    materialises them (eager)."""
    h = cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", 4 * h)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", heads) * (getattr(cfg, "head_dim", None) or h // heads)
    out = (7 * h + 2 * kv + 4 * inter) * w
    out += 2 * 2 * h * 4 if w != 4 else 0
    out += 2 * h * w if trains_norms else 0
    out += (6 * h + inter) * (w + 1) if dropout else 0
    out += 2 * heads * seq_len * w if attention_scores else 0
    return out


def head_bytes(cfg, tokens: int, w: int, stage: str, on_gpu: bool) -> int:
    """The loss's peak. SFT/PT (TRL's fused head): one tile of logits; without Triton (CPU) its torch path holds
    ~7 fp32 tile-sized temporaries in backward (exp, differences, the gradient, the one-hot target), the
    compute-dtype tile, its fp32 copy under bf16/fp16 and a boolean tile; with Triton (GPU) the kernels work
    in place on the tile (estimated at 2 tiles, not measured). Other stages' trainers build the whole
    logits: logits in the compute dtype, their fp32 upcast (none when already fp32) and its gradient."""
    vocab = cfg.vocab_size
    if stage in _FUSED_HEAD_STAGES:
        tile = min(tokens, _HEAD_TOKENS) * min(vocab, _HEAD_VOCAB)
        return tile * 2 * w if on_gpu else tile * (7 * 4 + w + (4 if w != 4 else 0) + 1)
    return tokens * vocab * (w + (4 if w != 4 else 0) + 4)


def activation_bytes(recipe: Recipe, cfg, tokens: int, w: int, on_gpu: bool) -> int:
    """Activations at the loss's backward, the peak: every layer's saved tensors (with checkpointing only
    each layer's input, plus one layer recomputed) and the loss's own buffers."""
    m = recipe.method
    lora_like = m.type in ("lora", "qlora", "dora")
    eager = recipe.model.attn_implementation == "eager"  # SDPA (also on CPU) keeps no score matrix
    layer = tokens * layer_bytes_per_token(cfg, w, trains_norms=m.type in ("full", "freeze"),
                                            dropout=lora_like and m.dropout > 0, attention_scores=eager,
                                            seq_len=recipe.data.max_length)
    layers = cfg.num_hidden_layers
    body = (tokens * cfg.hidden_size * w * layers + layer) if recipe.train.activation_checkpointing is True \
        else layer * layers
    return int(body + head_bytes(cfg, tokens, w, recipe.stage, on_gpu))


def plan(recipe: Recipe, gpus: int | None = None, gpu_memory: int | None = None) -> Plan:
    from ftkit.hardware import detect

    hw = detect(recipe.model.dtype)
    on_gpu = bool(gpus) or hw.device == "cuda"
    dtype = recipe.model.dtype if recipe.model.dtype != "auto" else ("bfloat16" if on_gpu else hw.dtype)
    w = _BYTES[dtype]
    world = gpus or max(1, hw.num_gpus)
    cfg = _config(recipe)
    stored = str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "")  # read before building
    model = meta_model(recipe, cfg)
    qlora = recipe.method.type == "qlora"
    quantized, frozen, trainable = _split_params(model, qlora)
    if qlora:
        # prepare_model_for_kbit_training keeps the layers it does not quantize (embeddings, norms, head) in fp32.
        weights = quantized * (_NF4_BYTES if recipe.method.bits == 4 else _INT8_BYTES) + frozen * 4
    elif recipe.method.type in ("full", "freeze") and stored.endswith("float32"):
        weights = (quantized + frozen) * 4  # methods.weights_dtype: a float32 base stays float32 (it is saved whole)
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
    acts = activation_bytes(recipe, model.config, batch * recipe.data.max_length, w, on_gpu)
    return Plan(recipe.model.name, recipe.method.type, strategy, world, dtype, batch, recipe.data.max_length, ckpt,
                quantized + frozen + trainable, trainable, int(weights), int(grads), int(optim), acts,
                CUDA_OVERHEAD if on_gpu else 0, gpu_memory)
