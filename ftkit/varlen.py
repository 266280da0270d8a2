"""Padding-free, variable-length batches: a micro-batch's samples laid end to end in one row.

TRL's padding-free collator flattens the samples, restarts `position_ids` per sample and hands the
model the sample boundaries (`cu_seq_lens_q/k`, `max_length_q/k`, computed on the CPU). Attention
runs through transformers' attention interface under one of two names:

- `ftkit_varlen`: PyTorch's own flash kernel, `torch.nn.attention.varlen.varlen_attn` (CUDA, torch
  >= 2.10; no flash-attn build);
- `ftkit_varlen_reference`: the same attention computed sample by sample with SDPA. It runs where
  the kernel cannot (a CPU), so the equality tests run in CI.

No token attends across a sample boundary, and the collator masks the label at each sample's start,
so a step trains on the samples and loss of the padded path. The mask function registered for both
names builds no 4D mask: the boundaries are all the kernel needs.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

from ftkit.errors import UserError
from ftkit.hardware import Hardware
from ftkit.recipe import Recipe

KERNEL = "ftkit_varlen"
REFERENCE = "ftkit_varlen_reference"
STAGES = ("sft", "pt")
# Methods that put virtual tokens in front of every sample: in a flat row only the first sample would get them.
VIRTUAL_TOKEN_METHODS = ("prefix", "prompt")


@dataclass(frozen=True)
class Plan:
    """What a run does about padding: `attention` is KERNEL, REFERENCE or None (the padded path)."""

    attention: str | None
    reason: str

    @property
    def enabled(self) -> bool:
        return self.attention is not None

    def describe(self) -> str:
        if self.attention == KERNEL:
            return "padding-free (varlen flash kernel)"
        if self.attention == REFERENCE:
            return "padding-free (per-sample SDPA reference)"
        return f"padded ({self.reason})"

    def as_metrics(self) -> dict:
        return {"enabled": self.enabled, "attention": self.attention, "reason": self.reason}


def _boundaries(query, attention_mask, cu_seq_lens_q, max_length_q):
    """(cu_seqlens int32, longest sample) over the flattened batch*tokens axis."""
    import torch

    batch, _, tokens, _ = query.shape
    if cu_seq_lens_q is not None:
        if batch != 1:
            raise RuntimeError(f"{KERNEL}: a padding-free batch is one row, got {batch}")
        cu = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
        longest = int(max_length_q) if max_length_q is not None else int(cu.diff().max())
        return cu, longest
    if attention_mask is not None and not bool(attention_mask.all()):
        # Padded batches come only from callers that bypass the padding-free collator (generation
        # restores the model's own attention first); computing them here would silently attend to pads.
        raise RuntimeError(f"{KERNEL}: padded batch given to the padding-free attention; use sdpa for it")
    # Every row is one whole sample.
    return torch.arange(0, (batch + 1) * tokens, tokens, device=query.device, dtype=torch.int32), tokens


def _flat(x):
    """(batch, heads, tokens, dim) -> (batch*tokens, heads, dim), the varlen layout."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


@functools.cache
def _kernel_params() -> frozenset:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def call_kernel(q, k, v, cu, longest: int, scale: float | None, kernel=None):
    """varlen_attn, causal, over (tokens, heads, dim) tensors. torch 2.10 spells causal `is_causal=True`
    and has no `scale`/`enable_gqa`; later releases take `window_size=(-1, 0)`, `scale`, `enable_gqa`."""
    if kernel is None:
        from torch.nn.attention.varlen import varlen_attn as kernel
        params = _kernel_params()
    else:
        params = frozenset(inspect.signature(kernel).parameters)
    kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    default = q.shape[-1] ** -0.5
    if "scale" in params:
        kw["scale"] = scale
    elif scale is not None and abs(scale - default) > 1e-12 * default:
        q = q * (scale / default)  # the kernel scales by 1/sqrt(dim); fold the model's scale into q
    return kernel(q, k, v, cu, cu, longest, longest, **kw)


def half_inputs(*xs):
    """q, k, v in one half dtype, as the flash kernel takes them. Under bf16/fp16 autocast with fp32 norms
    (full/freeze fp32 master weights, QLoRA's upcast norms) RoPE leaves q and k in fp32 while v comes out
    of an autocast matmul in half: SDPA is on autocast's cast list, the varlen op is not."""
    import torch

    halves = (torch.bfloat16, torch.float16)
    device = xs[0].device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in halves:
        target = torch.get_autocast_dtype(device)
    else:
        target = next((x.dtype for x in xs if x.dtype in halves), torch.bfloat16)
    return [x.to(target) for x in xs]


def kernel_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                   max_length_q=None, **kwargs):
    """transformers attention-interface signature; returns (batch, tokens, heads, dim)."""
    cu, longest = _boundaries(query, attention_mask, cu_seq_lens_q, max_length_q)
    q, k, v = half_inputs(_flat(query), _flat(key), _flat(value))
    out = call_kernel(q, k, v, cu, longest, scaling)
    return out.reshape(query.shape[0], query.shape[2], query.shape[1], -1), None


def reference_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                      max_length_q=None, **kwargs):
    """The same attention as kernel_forward, one SDPA call per sample."""
    import torch
    import torch.nn.functional as F

    cu, _ = _boundaries(query, attention_mask, cu_seq_lens_q, max_length_q)
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (_flat(query), _flat(key), _flat(value)))  # (1, H, N, D)
    gqa = k.shape[1] != q.shape[1]
    bounds = cu.tolist()
    outs = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, scale=scaling,
                                           enable_gqa=gqa) for s, e in zip(bounds[:-1], bounds[1:])]
    out = torch.cat(outs, dim=2).squeeze(0).transpose(0, 1)  # (N, H, D)
    return out.reshape(query.shape[0], query.shape[2], query.shape[1], -1), None


def no_mask(*args, attention_mask=None, **kwargs):
    """Mask interface: the boundaries travel as cu_seq_lens; an all-ones 2D mask means no padding."""
    if attention_mask is not None and bool(attention_mask.all()):
        return None
    return attention_mask


@functools.cache
def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name, fn in ((KERNEL, kernel_forward), (REFERENCE, reference_forward)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, no_mask)


# ---------------------------------------------------------------------------- the decision


def kernel_problem(hw: Hardware, dtype: str, head_dim: int) -> str | None:
    """Why the varlen kernel cannot run here (None: it can); tries one tiny call on the GPU."""
    if hw.device != "cuda":
        return f"the varlen kernel needs a CUDA GPU; this run is on {hw.device_name}"
    import torch

    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.10)"
    if dtype not in ("bfloat16", "float16"):
        return f"the varlen kernel runs in bf16/fp16, this run is {dtype}"
    if head_dim % 8 or head_dim > 256:
        return f"head dim {head_dim} (the flash kernel takes multiples of 8 up to 256)"
    if torch.cuda.get_device_capability() < (8, 0):
        return f"{torch.cuda.get_device_name()} is older than sm80 (flash attention needs Ampere or newer)"
    return _smoke_test(getattr(torch, dtype), head_dim)


@functools.cache
def _smoke_test(dtype, head_dim: int) -> str | None:
    import torch

    q = torch.randn(8, 2, head_dim, device="cuda", dtype=dtype)
    cu = torch.tensor([0, 3, 8], device="cuda", dtype=torch.int32)
    try:
        call_kernel(q, q, q, cu, 5, None)
    except Exception as exc:  # noqa: BLE001 - any failure means: fall back, and say why
        return f"the varlen kernel failed a test call ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return None


def architecture_problem(model) -> str | None:
    """Why this model cannot take the custom attention (None: it can)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    if not getattr(base, "_supports_attention_backend", False) or not base._can_set_attn_implementation():
        return f"{cfg.model_type} does not use transformers' attention interface"
    for field in ("attn_logit_softcapping", "attention_logit_softcapping"):
        if getattr(cfg, field, None):
            return f"{cfg.model_type} caps attention logits ({field})"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return f"{cfg.model_type} uses sliding-window attention"
    if getattr(cfg, "attention_dropout", 0.0):
        return f"{cfg.model_type} uses attention dropout"
    if any(n.endswith("sinks") for n, _ in base.named_parameters()):
        return f"{cfg.model_type} has attention sinks"
    return None


def method_problem(recipe: Recipe) -> str | None:
    if recipe.method.type in VIRTUAL_TOKEN_METHODS:
        return f"method.type {recipe.method.type} puts virtual tokens before every sample, not once per row"
    if getattr(recipe.train, "neftune_noise_alpha", None) is not None:
        # NEFTune scales its noise by 1/sqrt(row length): a flat row of many samples would get less of it.
        return "train.neftune_noise_alpha scales its noise by the row's length, which a flat row changes"
    return None


def plan(recipe: Recipe, hw: Hardware, model) -> Plan:
    """auto: on for sft/pt where the kernel runs (CUDA); true: on wherever the method and model allow, with
    the per-sample reference where the kernel cannot run; false: off. Call after the method is applied."""
    want = recipe.train.padding_free
    if want is False:
        return Plan(None, "padding_free: false")
    if recipe.stage not in STAGES:
        return Plan(None, f"stage {recipe.stage} batches its own way")
    problem = method_problem(recipe) or architecture_problem(model)
    if problem is not None:
        if want is True:
            raise UserError(f"{recipe.where('train', 'padding_free')}: train.padding_free: true: {problem}; "
                            "use padding_free: auto (falls back to padded batches) or false")
        return Plan(None, problem)
    cfg = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    problem = kernel_problem(hw, hw.dtype, head_dim)
    if problem is None:
        return Plan(KERNEL, "varlen kernel")
    if want is True:
        return Plan(REFERENCE, problem)
    return Plan(None, problem)


def use(model, attention: str) -> str:
    """Switch the model's attention to `attention`; returns the one it had, for restore()."""
    register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    base.set_attn_implementation(attention)
    return before


def restore(model, attention: str) -> None:
    """Back to the model's own attention before generation or saving: those see padded batches."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation in (KERNEL, REFERENCE):
        base.set_attn_implementation(attention)


def config_kwargs(p: Plan, packing: bool) -> dict:
    """SFTConfig fields. Without packing, TRL refuses a max_length it would not enforce on flat rows;
    ftkit's data is already truncated to data.max_length, so none is passed. A flat row (TRL's bfd
    packing makes one too) holds no padding, and the Trainer's "non_padding" count would drop every
    real token that equals the pad id (often EOS), so all tokens are counted."""
    flat = {"include_num_input_tokens_seen": "all"} if p.enabled or packing else {}
    if not p.enabled:
        return flat
    return {**flat, "padding_free": True, **({} if packing else {"max_length": None})}
