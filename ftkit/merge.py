"""merge-lora: fold W0 + BA into the base so inference costs nothing extra, and prove it.

One model is held in memory at a time: reference logits come from base+adapter, then the
same object is merged in place and probed again; the saved dir is reloaded with plain
AutoModelForCausalLM to check that what landed on disk is what was verified.
"""

from __future__ import annotations

import json
from pathlib import Path

from ftkit.atomic import publish, staged_dir
from ftkit.errors import UserError, VerificationFailed
from ftkit.inference import adapter_base_name, is_adapter_dir, run_trust_remote_code
from ftkit.models import load_causal_lm, load_tokenizer, resolve_model

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
    return logits * enc["attention_mask"].unsqueeze(-1)


def _base_dtype(base_dir: str) -> str:
    cfg_path = Path(base_dir) / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        d = cfg.get("dtype") or cfg.get("torch_dtype")
        if d in TOLERANCE:
            return d
    return "float32"


def merge_lora(adapter: str, output: str, base: str | None = None, dtype: str = "auto",
               overwrite: bool = False, log=print) -> dict:
    from peft import PeftModel

    src = Path(adapter).expanduser()
    if not src.is_dir():
        raise UserError(f"{adapter}: not a directory")
    if not is_adapter_dir(src):
        if (src / "config.json").is_file():
            raise UserError(f"{adapter}: already a full model (no adapter_config.json); nothing to merge")
        raise UserError(f"{adapter}: not a run or adapter dir (no adapter_config.json)")
    peft_cfg = json.loads((src / "adapter_config.json").read_text(encoding="utf-8"))
    if peft_cfg.get("peft_type") not in ("LORA", None):
        raise UserError(
            f"{adapter}: a {peft_cfg.get('peft_type')} adapter has no weights to fold into the base; "
            "serve it as base + adapter instead (ftkit generate RUN_DIR works on it directly)"
        )
    if peft_cfg.get("task_type") == "SEQ_CLS":  # a reward model: merged and verified on its scores
        from ftkit.stages.rm import merge_reward_model

        return merge_reward_model(src, output, base=base, dtype=dtype, overwrite=overwrite, log=log)
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
    log(f"merging {src} into {base_name} ({dtype})")
    tok = load_tokenizer(str(src) if (src / "tokenizer_config.json").is_file() else base_dir, trust)
    model = load_causal_lm(base_dir, dtype, trust_remote_code=trust)
    model = PeftModel.from_pretrained(model, str(src))
    model.eval()
    ref = _probe_logits(model, tok)
    merged = model.merge_and_unload()
    diff_in_memory = (_probe_logits(merged, tok) - ref).abs().max().item()

    with staged_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        del merged, model
        # Verify the artifact a user will load, with the plain transformers path.
        from transformers import AutoModelForCausalLM

        from ftkit.models import torch_dtype

        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype(dtype), trust_remote_code=trust)
        reloaded.eval()
        diff = (_probe_logits(reloaded, tok) - ref).abs().max().item()
        del reloaded
        tol = TOLERANCE[dtype]
        report = {"max_abs_logit_diff": diff, "in_memory_diff": diff_in_memory, "tolerance": tol, "dtype": dtype,
                  "base": base_name, "adapter": str(src)}
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
