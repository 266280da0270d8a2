"""Reward models in use: load an rm run dir (or a merged reward model), score replies with it, and
merge its LoRA into the base classifier (verified on scores). Training one is the rm stage's job."""

from __future__ import annotations

import json
from pathlib import Path

from ftkit.atomic import publish, staged_dir
from ftkit.errors import UserError, VerificationFailed
from ftkit.runmeta import adapter_base_name, is_adapter_dir, is_reward_adapter, run_trust_remote_code


def load_reward_model(target: str, dtype: str = "float32", log=print):
    """(model, tokenizer) for an rm run dir (base + adapter, merged in memory) or a merged reward model dir."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ftkit.models import load_tokenizer, resolve_model, torch_dtype
    from ftkit.ui import quiet_libraries

    quiet_libraries()
    path = Path(target).expanduser()
    if not path.is_dir():
        raise UserError(f"{target}: not a directory (expected an rm run dir or a merged reward model dir)")
    trust = run_trust_remote_code(path)
    if is_adapter_dir(path):
        if not is_reward_adapter(path):
            raise UserError(f"{target}: a causal-LM adapter, not a reward model; train one with ftkit rm")
        from peft import PeftModel

        base_dir = resolve_model(adapter_base_name(path), log=log)
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch_dtype(dtype),
                                                                   trust_remote_code=trust)
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        tok = load_tokenizer(str(path) if (path / "tokenizer_config.json").is_file() else base_dir, trust)
    elif (path / "config.json").is_file():
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        archs = getattr(cfg, "architectures", None) or []
        if not any(a.endswith("ForSequenceClassification") for a in archs) or cfg.num_labels != 1:
            raise UserError(f"{target}: not a reward model (architectures {archs}, num_labels {cfg.num_labels}); "
                            "expected a sequence classifier with one output")
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype(dtype),
                                                                   trust_remote_code=trust)
        tok = load_tokenizer(str(path), trust)
    else:
        raise UserError(f"{target}: neither an rm run dir (adapter_config.json) nor a model dir (config.json)")
    model.config.pad_token_id = tok.pad_token_id
    model.eval()
    return model, tok


def encode(tok, prompt: str, response: str, system: str | None = None) -> list[int]:
    """Token ids exactly as the RewardTrainer built them: the chat template, else prompt + response + EOS."""
    if getattr(tok, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    text = prompt + response
    if tok.eos_token and not text.endswith(tok.eos_token):
        text += tok.eos_token
    return list(tok(text=text)["input_ids"])


def score(model, tok, pairs: list[tuple[str, str]], system: str | None = None) -> list[float]:
    import torch

    out = []
    with torch.no_grad():
        for prompt, response in pairs:  # one at a time: no padding to get wrong
            ids = torch.tensor([encode(tok, prompt, response, system)], device=model.device)
            out.append(float(model(input_ids=ids).logits[0, 0]))
    return out


PROBES = [("What is the capital of France?", "Paris."), ("Say something kind.", "You are doing great!"),
          ("Write a haiku.", "Autumn moonlight / a worm digs silently / into the chestnut.")]


def merge_reward_model(src: Path, output: str, base: str | None = None, dtype: str = "auto",
                       overwrite: bool = False, log=print) -> dict:
    """Fold an rm run's LoRA into its base classifier; verify scores before and after saving."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from ftkit.merge import TOLERANCE, merge_inputs
    from ftkit.models import torch_dtype
    from ftkit.ui import quiet_libraries

    quiet_libraries()
    out, base_name, base_dir, dtype, trust, tok = merge_inputs(src, output, base, dtype, overwrite, log)
    log(f"merging reward model {src} into {base_name} ({dtype})")
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch_dtype(dtype),
                                                               trust_remote_code=trust)
    model.config.pad_token_id = tok.pad_token_id
    model = PeftModel.from_pretrained(model, str(src))
    model.eval()
    ref = score(model, tok, PROBES)
    merged = model.merge_and_unload()
    with staged_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        del merged, model
        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp, dtype=torch_dtype(dtype),
                                                                      trust_remote_code=trust)
        reloaded.eval()
        diff = max(abs(a - b) for a, b in zip(score(reloaded, tok, PROBES), ref))
        tol = TOLERANCE[dtype]
        report = {"max_abs_score_diff": diff, "tolerance": tol, "dtype": dtype, "base": base_name,
                  "adapter": str(src), "kind": "reward model (AutoModelForSequenceClassification, num_labels 1)"}
        (tmp / "ftkit_merge.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if not diff <= tol:
            raise VerificationFailed(f"merged reward model scores differ from base+adapter by {diff:.3g} > {tol:g} "
                                     f"({dtype}); nothing written to {out}")
        publish(tmp, out)
    log(f"verified: max |score diff| merged vs base+adapter = {diff:.2e} (tolerance {tol:g}, {dtype})")
    log(f"[green]merged reward model:[/] {out} (loads with AutoModelForSequenceClassification)")
    return report
