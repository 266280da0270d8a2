"""Load what training produced (run dir, adapter dir, merged dir, or any base model) and generate."""

from __future__ import annotations

from pathlib import Path

from ftkit.errors import UserError
from ftkit.models import load_causal_lm, load_tokenizer, resolve_model
from ftkit.runmeta import (adapter_base_name, is_adapter_dir, is_reward_adapter, run_bits, run_method,
                           run_trust_remote_code)


def _quantized_like_training(run_dir: Path, dtype: str) -> dict:
    """A QLoRA adapter learned to correct the quantized base, so it is served on that same base."""
    from ftkit.methods import quantization_kwargs

    if run_method(run_dir) != "qlora":
        return {}
    import torch

    return quantization_kwargs(run_bits(run_dir), dtype, "cuda" if torch.cuda.is_available() else "cpu")


def load_for_inference(target: str, dtype: str = "float32", base: str | None = None, log=print):
    """(model, tokenizer) for a run/adapter dir (base + adapter), a merged/HF dir, an alias or a hub id."""
    path = Path(target).expanduser()
    if path.is_dir() and is_adapter_dir(path):
        from peft import PeftModel

        if is_reward_adapter(path):
            raise UserError(f"{target}: a reward model scores text, it does not generate; use ftkit score {target}")
        trust = run_trust_remote_code(path)
        base_dir = resolve_model(base or adapter_base_name(path), log=log)
        model = load_causal_lm(base_dir, dtype, trust_remote_code=trust, **_quantized_like_training(path, dtype))
        model = PeftModel.from_pretrained(model, str(path))
        tok_src = str(path) if (path / "tokenizer_config.json").is_file() else base_dir
        tok = load_tokenizer(tok_src, trust)
    else:
        if path.exists() and not path.is_dir():
            raise UserError(f"{target}: expected a run dir, a model dir or a model name")
        if path.is_dir() and not (path / "config.json").is_file():
            raise UserError(f"{target}: neither a run dir (adapter_config.json) nor a model dir (config.json)")
        src = resolve_model(target, log=log)
        trust = run_trust_remote_code(path) if path.is_dir() else False
        model = load_causal_lm(src, dtype, trust_remote_code=trust)
        tok = load_tokenizer(src, trust)
    model.eval()
    if dtype != "bfloat16" and getattr(model, "is_loaded_in_4bit", False):
        from ftkit.methods import hold_4bit_compute_dtype

        hold_4bit_compute_dtype(model)  # else bitsandbytes' CPU eval kernel computes in bf16, not in dtype
    return model, tok


def render_prompt(tok, messages: list[dict], tools: list[dict] | None = None) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=True)
    # No template (a raw base model): plain text continuation.
    return "\n".join(m["content"] for m in messages)


def generate(model, tok, prompts: list[list[dict]] | list[str], max_new_tokens: int = 128,
             temperature: float = 0.0, batch_size: int = 8, tools: list[dict] | None = None,
             prefill: str = "") -> list[str]:
    """Greedy by default (deterministic). Each prompt is a message list or a plain user string;
    `tools` (function schemas) are rendered by the chat template, as in training; `prefill` is the
    replies' forced start (written after the generation prompt, not repeated in the output)."""
    import torch

    texts = [render_prompt(tok, [{"role": "user", "content": p}] if isinstance(p, str) else p, tools) + prefill
             for p in prompts]
    side = tok.padding_side
    tok.padding_side = "left"  # decoder-only batches must end where generation starts
    outs: list[str] = []
    try:
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            # use_cache: a model fresh from training has it off (checkpointing), which makes every new
            # token recompute the whole sequence.
            kw = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      use_cache=True)
            if temperature > 0:
                kw.update(do_sample=True, temperature=temperature)
            else:
                kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.no_grad():
                gen = model.generate(**enc, **kw)
            new = gen[:, enc["input_ids"].shape[1]:]
            outs += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = side
    return outs
