"""bf16 vs fp32 on this machine, per operation class: training steps and generation.

    python benchmarks/precision.py [--model smollm2-135m-instruct] [--repeats 3] [--json out.json]

The two precisions are timed alternately (A B A B ...) in one process so that other load on the
machine falls on both alike; the ratio is bf16 speed / fp32 speed (> 1: bf16 is faster). ftkit's
choice per operation (`ftkit.hardware`) is recorded from these numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time


def _prompts(tok, n=4):
    texts = ["Review: Arrived broken and support never answered.", "Explain photosynthesis in one sentence.",
             "Write a haiku about the sea.", "What is 12 + 30?"][:n]
    return [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts]


def time_generation(model, tok, prompts, new_tokens: int) -> float:
    import torch

    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    dt = time.perf_counter() - t0
    return (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0] / dt


def time_training(model, tok, dtype, steps: int = 2, seq: int = 128, batch: int = 2) -> float:
    """LoRA-style step cost: forward + backward through the whole model under autocast (as ftkit trains)."""
    import torch

    ids = torch.randint(0, tok.vocab_size, (batch, seq))
    params = [p for p in model.parameters()][-4:]
    for p in params:
        p.requires_grad_(True)
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    return steps * batch * seq / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftkit.hardware import _cpu_has_fast_bf16
    from ftkit.models import resolve_model

    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = _prompts(tok)
    models = {"float32": AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
              "bfloat16": AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()}
    train_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen, train = {k: [] for k in models}, {k: [] for k in models}
    for name, m in models.items():  # warm-up, untimed
        time_generation(m, tok, prompts, 4)
    for _ in range(args.repeats):
        for name, m in models.items():
            gen[name].append(time_generation(m, tok, prompts, args.new_tokens))
            train[name].append(time_training(train_model, tok, name))
    result = {
        "cpu": platform.processor() or platform.machine(), "native_bf16": _cpu_has_fast_bf16(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "model": args.model,
        "generation_tok_s": {k: statistics.median(v) for k, v in gen.items()},
        "training_tok_s": {k: statistics.median(v) for k, v in train.items()},
    }
    result["generation_bf16_over_fp32"] = result["generation_tok_s"]["bfloat16"] / result["generation_tok_s"]["float32"]
    result["training_bf16_over_fp32"] = result["training_tok_s"]["bfloat16"] / result["training_tok_s"]["float32"]
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
