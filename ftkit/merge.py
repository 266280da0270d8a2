"""merge-lora: fold W0 + BA into the base so inference costs nothing extra, and prove it.

One model is held in memory at a time: reference logits come from base+adapter; a LoRA adapter
is then merged tensor by tensor from the base's shards (ftkit.merge_stream, memory ~ one tensor),
anything else (QLoRA's de-quantized base, DoRA) in memory by PEFT; the saved dir is reloaded with
plain AutoModelForCausalLM to check that what landed on disk is what was verified.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from ftkit.atomic import publish, staged_dir
from ftkit.errors import UserError, VerificationFailed
from ftkit.methods import hold_4bit_compute_dtype, quantization_kwargs
from ftkit.models import load_causal_lm, load_tokenizer, resolve_model
from ftkit.runmeta import adapter_base_name, is_adapter_dir, run_bits, run_method, run_trust_remote_code

# Max |logit difference| accepted per dtype: merging reorders float ops, so exact equality
# only holds in exact arithmetic; lower precisions round more.
TOLERANCE = {"float32": 1e-3, "float16": 0.1, "bfloat16": 0.5}

PROBES = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


def _probe_logits(model, tok):
    import torch

    enc = tok(PROBES, return_tensors="pt", padding=True).to(model.device)
    with torch.no_grad():
        logits = model(**enc).logits.float()
    # On the CPU so logits of models on different devices (quantized on GPU, reloaded on CPU) compare.
    return (logits * enc["attention_mask"].unsqueeze(-1)).cpu()


NOT_MERGEABLE = {"PREFIX_TUNING": "prefix-tuning", "PROMPT_TUNING": "prompt-tuning", "P_TUNING": "p-tuning"}


@contextmanager
def _train_mode_4bit_kernels(model):
    """4-bit layers on their training path while de-quantizing and verifying (see methods.hold_4bit_compute_dtype):
    the packed layout bitsandbytes switches to in eval mode is one `dequantize()` cannot read."""
    held = hold_4bit_compute_dtype(model)
    try:
        yield
    finally:
        for m, was in held:
            m.training = was


def _dequantized_with_adapter(base_dir: str, adapter_dir: Path, bits: int, dtype: str, trust: bool, tok):
    """(dequantized base + adapter, its logits, logits of the model as trained: quantized base + adapter).

    The adapter learned to correct the *quantized* weights, so it is merged into those weights
    de-quantized (not into the original full-precision ones): the merged model then computes
    what the QLoRA model computed, and the reference is that trained model itself.
    """
    from peft import PeftModel
    from transformers.pytorch_utils import Conv1D

    from ftkit.models import torch_dtype

    model = load_causal_lm(base_dir, dtype, trust_remote_code=trust, **quantization_kwargs(bits, dtype, "cpu"))
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    with _train_mode_4bit_kernels(model):
        trained = _probe_logits(model, tok)
        base = model.unload()  # drops the adapter layers, keeps the quantized base
        quantized = [n for n, m in base.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
        base = base.dequantize(dtype=torch_dtype(dtype))
    weights = {n: base.get_submodule(n).weight.detach() for n in quantized}
    del base, model
    # bitsandbytes swaps each layer for its own Linear (a Conv1D comes back transposed), so the
    # de-quantized values go into a plain instance of the architecture, not the swapped one.
    plain = load_causal_lm(base_dir, dtype, trust_remote_code=trust)
    for name, w in weights.items():
        target = plain.get_submodule(name)
        w = w.t() if isinstance(target, Conv1D) else w
        target.weight.data.copy_(w.to(target.weight.dtype))
    del weights
    model = PeftModel.from_pretrained(plain, str(adapter_dir))
    model.eval()
    return model, _probe_logits(model, tok), trained


def _base_dtype(base_dir: str) -> str:
    cfg_path = Path(base_dir) / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        d = cfg.get("dtype") or cfg.get("torch_dtype")
        if d in TOLERANCE:
            return d
    return "float32"


def merge_inputs(src: Path, output: str, base: str | None, dtype: str, overwrite: bool, log):
    """What every merge needs, checked before any weights load: the output path, the base (name and
    local dir), the dtype, the run's trust_remote_code and its tokenizer (with its chat template)."""
    out = Path(output).expanduser()
    if out.resolve() == src.resolve():
        raise UserError("--output must differ from the adapter dir")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--output: {out} already exists and is not empty; pass --overwrite to replace it")
    base_name = base or adapter_base_name(src)
    base_dir = resolve_model(base_name, log=log)
    if dtype == "auto":
        dtype = _base_dtype(base_dir)
    if dtype not in TOLERANCE:
        raise UserError(f"--dtype: must be one of auto, {', '.join(TOLERANCE)}")
    trust = run_trust_remote_code(src)
    tok = load_tokenizer(str(src) if (src / "tokenizer_config.json").is_file() else base_dir, trust)
    return out, base_name, base_dir, dtype, trust, tok


def _write_merged(tmp: Path, model, ref, base_dir: str, src: Path, dtype: str, trust: bool, tok) -> float | None:
    """Merged weights + tokenizer into `tmp`: streamed from the shards when the adapter allows (memory ~ one
    tensor), else PEFT's merge_and_unload in memory; returns the in-memory merge's logit diff (None if streamed)."""
    from peft import PeftModel

    from ftkit.merge_stream import stream_merge

    diff_in_memory = None
    if model is not None or trust or not stream_merge(Path(base_dir), src, tmp, dtype):
        if model is None:  # an adapter the streaming merge cannot express (DoRA, rank patterns, ...)
            model = PeftModel.from_pretrained(load_causal_lm(base_dir, dtype, trust_remote_code=trust), str(src))
        merged = model.merge_and_unload()
        diff_in_memory = (_probe_logits(merged, tok) - ref).abs().max().item()
        merged.save_pretrained(tmp, safe_serialization=True)
        del merged
    tok.save_pretrained(tmp)
    return diff_in_memory


def merge_lora(adapter: str, output: str, base: str | None = None, dtype: str = "auto",
               overwrite: bool = False, log=print) -> dict:
    from peft import PeftModel

    src = Path(adapter).expanduser()
    if not src.is_dir():
        raise UserError(f"{adapter}: not a directory")
    method = run_method(src)
    if not is_adapter_dir(src):
        if (src / "config.json").is_file():
            trained = f" (a method.type: {method} run dir)" if method else ""
            raise UserError(f"{adapter}: already a full model{trained}, nothing to merge; use the dir directly: "
                            f"`ftkit generate {adapter}` or AutoModelForCausalLM.from_pretrained")
        raise UserError(f"{adapter}: not a run or adapter dir (no adapter_config.json)")
    peft_cfg = json.loads((src / "adapter_config.json").read_text(encoding="utf-8"))
    peft_type = peft_cfg.get("peft_type")
    if peft_type in NOT_MERGEABLE:
        raise UserError(
            f"{adapter}: a {NOT_MERGEABLE[peft_type]} adapter is not mergeable: it adds trained virtual tokens to "
            "every forward pass instead of changing weights, so there is nothing to fold into the base. Serve it "
            f"as base + adapter: `ftkit generate {adapter}`, or in Python "
            f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), {str(src)!r})"
        )
    if peft_type not in ("LORA", None):
        raise UserError(f"{adapter}: merge-lora merges LoRA adapters; this one is {peft_type}")
    if peft_cfg.get("task_type") == "SEQ_CLS":
        raise UserError(f"{adapter}: a reward model (a classifier, not a causal LM); merge it with "
                        f"`ftkit merge-lora {adapter} -o MERGED`, which verifies it on scores")
    out, base_name, base_dir, dtype, trust, tok = merge_inputs(src, output, base, dtype, overwrite, log)
    if method == "qlora":
        bits = run_bits(src)
        log(f"merging {src} into {base_name}, de-quantized from {bits}-bit to {dtype}")
        model, ref, trained = _dequantized_with_adapter(base_dir, src, bits, dtype, trust, tok)
    else:
        log(f"merging {src} into {base_name} ({dtype})")
        model = load_causal_lm(base_dir, dtype, trust_remote_code=trust)
        model = PeftModel.from_pretrained(model, str(src))
        model.eval()
        ref = _probe_logits(model, tok)
        del model  # the merge streams from the shards; only the reference logits are kept
        model = None

    with staged_dir(out) as tmp:
        diff_in_memory = _write_merged(tmp, model, ref, base_dir, src, dtype, trust, tok)
        del model
        # Verify the artifact a user will load, with the plain transformers path.
        from transformers import AutoModelForCausalLM

        from ftkit.models import torch_dtype

        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype(dtype), trust_remote_code=trust)
        reloaded.eval()
        got = _probe_logits(reloaded, tok)
        del reloaded
        diff = (got - ref).abs().max().item()
        tol = TOLERANCE[dtype]
        report = {"max_abs_logit_diff": diff, "in_memory_diff": diff_in_memory, "tolerance": tol, "dtype": dtype,
                  "base": base_name, "adapter": str(src), "method": method or "lora"}
        if method == "qlora":
            # vs the quantized model as trained: 4-bit layers compute with exactly the de-quantized
            # weights, so the gap is rounding; LLM.int8 also quantizes activations, so 8-bit has a
            # real (reported, not gated) gap.
            report["dequantized_from_bits"] = bits
            report["quantized_gap"] = gap = (got - trained).abs().max().item()
            log(f"merged vs the {bits}-bit model as trained: max |logit diff| {gap:.2e}")
            if bits == 4 and not gap <= tol:
                raise VerificationFailed(
                    f"merged model differs from the 4-bit base + adapter it was trained as: max |logit diff| "
                    f"{gap:.3g} > tolerance {tol:g} ({dtype}); nothing written to {out}")
        (tmp / "ftkit_merge.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if not diff <= tol:
            raise VerificationFailed(
                f"merged model differs from base+adapter: max |logit diff| {diff:.3g} > tolerance {tol:g} ({dtype}); "
                f"nothing written to {out}"
            )
        publish(tmp, out)
    log(f"verified: max |logit diff| merged vs base+adapter = {diff:.2e} (tolerance {TOLERANCE[dtype]:g}, {dtype})")
    log(f"[green]merged model:[/] {out}")
    return report
