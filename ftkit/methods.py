"""Training methods: how the loaded base is loaded (qlora), wrapped (peft) or frozen (full/freeze), and saved.

Adapter methods (lora, dora, qlora, prefix, prompt) save a peft adapter dir; full and freeze
save a whole model dir that AutoModelForCausalLM loads directly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ftkit import lora_init
from ftkit.errors import UserError
from ftkit.recipe import MethodSection

VIRTUAL_TOKEN_METHODS = ("prefix", "prompt")


def _installed_before(pkg: str, version: str) -> bool:
    """Whether the installed pkg is older than version (release numbers only; unknown counts as older)."""
    import importlib.metadata as md

    def release(v: str) -> tuple:
        return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])

    try:
        return release(md.version(pkg)) < release(version)
    except md.PackageNotFoundError:
        return True

# (model_type, method) combinations that cannot work with the installed peft/transformers, with
# the reason. Checked from config.json before any weight is loaded; `_preflight` catches the rest.
UNSUPPORTED = {
    ("bloom", "prefix"): "BLOOM's ALiBi attention sizes its bias from the input length, so the prefix's "
                         "extra key/value positions do not fit",
    ("bloom", "prompt"): "BLOOM's ALiBi attention mask does not cover the soft-prompt positions peft prepends",
    ("opt", "prompt"): "OPT derives its learned positions from the attention mask, which goes out of step with "
                       "the soft prompt in batched generation",
    # transformers 5.25's FalconConfig gained num_key_value_heads, from which peft sizes the prefix.
    **({("falcon", "prefix"): "Falcon keeps fewer key/value heads than peft's prefix cache is built for"}
       if _installed_before("transformers", "5.25") else {}),
    ("falcon", "qlora"): "Falcon's FalconLinear layers are not replaced by bitsandbytes, so nothing would be "
                         "quantized",
}
_ALTERNATIVE = {"prefix": "lora or prompt", "prompt": "lora or prefix", "qlora": "lora"}

# Router/gate layers of mixture-of-experts blocks steer token routing; adapting them is not
# what "attention + MLP" means and destabilizes training.
_NOT_AUTO = {"gate", "router", "w_gate"}


# ------------------------------------------------------------------------------ loading


def _base_config(base: str, trust_remote_code: bool = False) -> dict:
    cfg = Path(base) / "config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text(encoding="utf-8"))
    try:  # a hub id: its config is small and usually cached
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code).to_dict()
    except Exception:
        return {}  # loading will report the real problem


def model_type_of(base: str, trust_remote_code: bool = False) -> str | None:
    return _base_config(base, trust_remote_code).get("model_type")


def weights_dtype(base: str, method: MethodSection, hw, trust_remote_code: bool = False) -> str:
    """The dtype the base's weights are loaded in for training; the compute runs in hw.dtype either way
    (the Trainer's autocast).

    full and freeze save the whole model, so a base stored in float32 is loaded in float32: loaded
    in bf16, every weight the run does not train would come back rounded. Adapter methods never
    save the base, so it is loaded in the compute dtype (half the memory).
    """
    if method.type not in ("full", "freeze") or hw.dtype == "float32":
        return hw.dtype
    cfg = _base_config(base, trust_remote_code)
    return "float32" if (cfg.get("dtype") or cfg.get("torch_dtype")) == "float32" else hw.dtype


def check_supported(model_type: str | None, method: MethodSection) -> None:
    why = UNSUPPORTED.get((model_type, method.type))
    if why:
        raise UserError(
            f"method.type: {method.type} does not work on {model_type} models: {why} "
            f"(peft {_version('peft')}, transformers {_version('transformers')}). "
            f"Use method.type: {_ALTERNATIVE.get(method.type, 'lora')} for this model."
        )


def quantization_kwargs(bits: int, compute_dtype: str, device: str) -> dict:
    """from_pretrained kwargs that load the base 4-bit (nf4 + double quant) or 8-bit via bitsandbytes."""
    import os

    from transformers import BitsAndBytesConfig

    from ftkit.models import torch_dtype

    if device not in ("cpu", "cuda"):
        raise UserError(f"method.type: qlora needs a CPU or CUDA device; bitsandbytes does not run on {device}")
    if bits == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch_dtype(compute_dtype))
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    # Quantized weights cannot be moved after loading, so each process places its copy now.
    where = "cpu" if device == "cpu" else int(os.environ.get("LOCAL_RANK", "0"))
    return {"quantization_config": q, "device_map": {"": where}}


def hold_4bit_compute_dtype(model) -> list:
    """Keep bitsandbytes' 4-bit layers on their training path (de-quantize, multiply in the compute
    dtype) while the rest of `model` is in eval mode; returns (layer, previous flag) pairs.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit layer's weights into its own
    layout on the first eval-mode forward and from then on computes in bf16 whatever the compute
    dtype, and `dequantize()` reads that layout wrongly. The flag only picks the kernel (a
    Linear4bit has no dropout), so the math is the one the adapter was trained against.
    """
    import bitsandbytes as bnb

    held = [(m, m.training) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m, _ in held:
        m.training = True
    return held


def load_kwargs(base: str, method: MethodSection, hw, trust_remote_code: bool = False) -> dict:
    """Extra load_causal_lm kwargs for this method; refuses unsupported model/method pairs first."""
    check_supported(model_type_of(base, trust_remote_code), method)
    lora_init.check_device(method, hw.device)
    if method.type != "qlora":
        return {}
    return quantization_kwargs(method.bits, hw.dtype, hw.device)


# ------------------------------------------------------------------------------ modules


def decoder_blocks(model) -> tuple[str, list]:
    """(path, blocks) of the repeated transformer blocks, found as the ModuleList of num_hidden_layers."""
    import torch.nn as nn

    n = getattr(model.config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for name, m in lists:
        if len(m) == n:
            return name, list(m)
    if lists:  # configs without num_hidden_layers: the longest list is the block stack
        name, m = max(lists, key=lambda x: len(x[1]))
        return name, list(m)
    raise UserError(f"could not find the transformer blocks of {type(model).__name__}")


def _linear_types():
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def linear_module_names(model) -> list[str]:
    """Leaf names of every linear layer inside the model body (not the LM head)."""
    out_emb = model.get_output_embeddings()
    names = set()
    for full, module in model.named_modules():
        if module is out_emb or full.split(".")[-1] in ("lm_head", "score", "embed_out"):
            continue
        if isinstance(module, _linear_types()):
            names.add(full.split(".")[-1])
    return sorted(names)


def block_linear_names(model) -> list[str]:
    """Leaf names of the linear layers inside the transformer blocks: attention + MLP projections."""
    _, blocks = decoder_blocks(model)
    names = set()
    for block in blocks:
        for full, module in block.named_modules():
            if isinstance(module, _linear_types()):
                names.add(full.split(".")[-1])
    return sorted(names - _NOT_AUTO)


def resolve_targets(model, method: MethodSection) -> list[str]:
    available = linear_module_names(model)
    if not available:
        raise UserError(f"method.target_modules: found no linear layers in {type(model).__name__} to adapt")
    if method.target_modules == "all-linear":
        return available
    if method.target_modules == "auto":
        return block_linear_names(model) or available
    missing = [m for m in method.target_modules if m not in available]
    if missing:
        raise UserError(
            f"method.target_modules: {', '.join(missing)} not found in {type(model).__name__}; "
            f"its linear layers: {', '.join(available)}"
        )
    return list(method.target_modules)


def _top_level_names(model) -> list[str]:
    """Module leaf names outside the blocks (embeddings, final norm, head): what modules_to_save is for."""
    prefix, _ = decoder_blocks(model)
    names = set()
    for full, _m in model.named_modules():
        if full and not full.startswith(prefix + "."):
            names.add(full.split(".")[-1])
    return sorted(n for n in names if not n.isdigit())


def _check_module_names(model, names: list[str], field: str) -> None:
    leaves = {full.split(".")[-1] for full, _ in model.named_modules()}
    missing = [n for n in names if n not in leaves]
    if missing:
        raise UserError(f"method.{field}: {', '.join(missing)} not found in {type(model).__name__}; "
                        f"candidates: {', '.join(_top_level_names(model))}")


# ------------------------------------------------------------------------------ applying


def count_params(model) -> dict:
    if hasattr(model, "get_nb_trainable_parameters"):
        # peft counts 4-bit packed weights at their real size (two values per stored byte).
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total,
            "trainable_percent": round(100.0 * trainable / total, 4) if total else 0.0}


def _lora(model, method: MethodSection, log, task_type: str = "CAUSAL_LM", **init_inputs):
    from peft import LoraConfig, get_peft_model

    targets = resolve_targets(model, method)
    if method.modules_to_save:
        _check_module_names(model, method.modules_to_save, "modules_to_save")
    dora = method.use_dora or method.type == "dora"
    flavor = ("Q" if method.type == "qlora" else "") + ("DoRA" if dora else "LoRA") + (" (rsLoRA)" if method.rslora else "")
    log(f"{flavor} r={method.r} alpha={method.alpha:g} on: {', '.join(targets)}" + lora_init.describe(method)
        + (f" · trained in full: {', '.join(method.modules_to_save)}" if method.modules_to_save else ""))
    cfg = LoraConfig(
        r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout, target_modules=targets,
        use_rslora=method.rslora, use_dora=dora, modules_to_save=method.modules_to_save or None,
        task_type=task_type, bias="none", **lora_init.config_kwargs(method),
    )
    # EVA fills the adapter weights from a data pass, so peft need not initialise them first.
    model = get_peft_model(model, cfg, low_cpu_mem_usage=cfg.init_lora_weights == "eva")
    return lora_init.after_wrap(model, method, log, **init_inputs)


def _qlora(model, method: MethodSection, log, task_type: str = "CAUSAL_LM", **init_inputs):
    from peft import prepare_model_for_kbit_training

    quantized = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    if not quantized:
        raise UserError(f"method.type: qlora: bitsandbytes quantized no layer of {type(model).__name__}; "
                        "use method.type: lora for this model")
    log(f"base loaded {method.bits}-bit ({'nf4, double quant' if method.bits == 4 else 'LLM.int8'}): "
        f"{len(quantized)} linear layers quantized")
    # Checkpointing is the trainer's call (train.activation_checkpointing), not a side effect here.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return _lora(model, method, log, task_type, **init_inputs)


def _virtual_tokens(model, method: MethodSection, log, base_path: str | None):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    n = method.num_virtual_tokens
    if method.type == "prefix":
        cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                 prefix_projection=method.prefix_projection,
                                 encoder_hidden_size=method.encoder_hidden_size or model.config.hidden_size)
        log(f"prefix-tuning: {n} virtual tokens per layer"
            + (" through a projection MLP" if method.prefix_projection else ""))
    else:
        text = method.prompt_init == "text"
        if text and base_path is None:
            raise UserError("method.prompt_init: text needs the base model's tokenizer")
        cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                 prompt_tuning_init="TEXT" if text else "RANDOM",
                                 prompt_tuning_init_text=method.prompt_init_text if text else None,
                                 tokenizer_name_or_path=base_path if text else None)
        log(f"prompt-tuning: {n} virtual tokens, init "
            + (f"from text {method.prompt_init_text!r}" if text else "random"))
    return get_peft_model(model, cfg)


def _freeze(model, method: MethodSection, log):
    prefix, blocks = decoder_blocks(model)
    if method.trainable_modules:
        _check_module_names(model, method.trainable_modules, "trainable_modules")
    n = min(method.trainable_layers, len(blocks))
    first = len(blocks) - n
    block_re = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    wanted = set(method.trainable_modules)
    for name, p in model.named_parameters():
        m = block_re.match(name)
        in_last = m is not None and int(m.group(1)) >= first
        named = bool(wanted.intersection(name.split(".")[:-1]))
        p.requires_grad_(in_last or named)
    log((f"freeze: training the last {n} of {len(blocks)} blocks ({prefix}.{first}-{len(blocks) - 1})" if n
         else "freeze: all blocks frozen")
        + (f" + modules named {', '.join(method.trainable_modules)}" if method.trainable_modules else ""))
    return model


def apply_method(model, method: MethodSection, log=print, tokenizer=None, base_path: str | None = None,
                 task_type: str = "CAUSAL_LM", train_rows=None):
    """Wrap or freeze `model` for training as method.type asks; with a tokenizer, prefix/prompt are
    test-run on a tiny batch first so an unsupported architecture fails here, not mid-training.
    task_type SEQ_CLS: a reward model (LoRA methods only). train_rows: tokenized rows for method.init: eva."""
    check_supported(getattr(model.config, "model_type", None), method)
    init_inputs = {"base_path": base_path, "train_rows": train_rows,
                   "pad_id": getattr(tokenizer, "pad_token_id", None)}
    return _fp32_master_weights(_wrap(model, method, log, tokenizer, base_path, task_type, init_inputs))


def _wrap(model, method: MethodSection, log, tokenizer, base_path: str | None, task_type: str, init_inputs: dict):
    if method.type in ("lora", "dora"):
        return _lora(model, method, log, task_type, **init_inputs)
    if method.type == "qlora":
        return _qlora(model, method, log, **init_inputs)
    if method.type in VIRTUAL_TOKEN_METHODS:
        peft_model = _virtual_tokens(model, method, log, base_path)
        if tokenizer is not None:
            _preflight(peft_model, tokenizer, method)
        return peft_model
    if method.type == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        log("full fine-tuning: every weight is trained")
        return model
    if method.type == "freeze":
        return _freeze(model, method, log)
    raise UserError(f"method.type: {method.type!r} is not supported")


def _fp32_master_weights(model):
    """Trained parameters are held in float32; the Trainer's bf16/fp16 autocast still computes in half.

    A bf16 weight cannot take an update smaller than ~1/256 of its value (a norm weight of 1.0 does
    not move in 3 AdamW steps at lr 1e-3), and fp16 gradients cannot be unscaled by the fp16 grad
    scaler. peft already does this for LoRA matrices; this covers full, freeze and modules_to_save.
    """
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    return model


def _preflight(model, tok, method: MethodSection) -> None:
    """One padded forward pass and a short batched generate, so a model/method pair peft cannot handle
    becomes a clear error before the trainer starts (new architectures are not in UNSUPPORTED)."""
    import torch

    side = tok.padding_side
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tok.padding_side = "right"
            enc = tok(["a b c d", "a"], return_tensors="pt", padding=True).to(model.device)
            model(**enc, labels=enc["input_ids"])
            # Batched, left-padded, several steps: how `ftkit generate` decodes (some models only
            # fail once the cache holds the virtual tokens and a padded row).
            tok.padding_side = "left"
            enc = tok(["a b c d e f", "a"], return_tensors="pt", padding=True).to(model.device)
            model.generate(**enc, min_new_tokens=3, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    except Exception as exc:  # any failure here means the combination does not work
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        arch = getattr(model.base_model.config, "model_type", type(model.base_model).__name__)
        raise UserError(
            f"method.type: {method.type} does not work on {arch} models with peft {_version('peft')} "
            f"(a test forward pass failed: {type(exc).__name__}: {first}). "
            f"Use method.type: {_ALTERNATIVE[method.type]} for this model."
        ) from None
    finally:
        tok.padding_side = side
        model.train(was_training)


# ------------------------------------------------------------------------------ saving


def save_trained(model, out_dir, trainer=None) -> None:
    """An adapter dir for peft methods; a full safetensors model dir for full/freeze.

    With a trainer, its save_model writes: it gathers sharded (FSDP/DeepSpeed) weights and
    writes on rank 0 only."""
    out = Path(out_dir)
    if lora_init.save_converted(model, out, is_main=trainer is None or trainer.args.should_save):
        return
    if not hasattr(model, "peft_config"):
        # Trainers may switch the KV cache off while training; the saved model is for inference.
        model.config.use_cache = True
    if trainer is not None:
        trainer.save_model(str(out))
    else:
        model.save_pretrained(out, safe_serialization=True)


def _version(pkg: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "?"
