"""LoRA SFT on the embedded model: ftkit vs plain TRL (defaults) vs plain TRL hand-tuned (fp32).

Same data, same LoRA config, same steps, one process; prints real (non-padding) tokens/s
of each and the ratios. Not a test: speed targets live here, not in the test suite.

    python benchmarks/sft_cpu.py [--steps 4] [--skip-trl-defaults]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data_templates" / "quickstart" / "train.jsonl"


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def run_trl(model_dir: str, rows: list[dict], steps: int, batch: int, tuned: bool, out: str,
            packing: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    extra = dict(bf16=False, fp16=False, activation_checkpointing=False) if tuned else {}
    if packing:
        extra.update(packing=True, packing_strategy="bfd")
    args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=2e-4,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, max_length=256,
                     assistant_only_loss=False, include_num_input_tokens_seen="non_padding", disable_tqdm=True,
                     **extra)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora_config())
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    tokens = trainer.state.num_input_tokens_seen
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "bf16": bool(args.bf16),
            "activation_checkpointing": bool(args.activation_checkpointing)}


def run_ftkit(rows_file: Path, steps: int, batch: int, out: str) -> dict:
    from ftkit.recipe import load_recipe
    from ftkit.stages import sft

    recipe = load_recipe(None, [f"data.train={rows_file}", f"train.max_steps={steps}", f"train.batch_size={batch}",
                                "data.max_length=256", "method.r=16", "method.alpha=32", "train.learning_rate=2e-4"])
    run_dir = sft.run(recipe, output=out, overwrite=True)
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"tokens": m["tokens"], "wall_s": m["wall_s"], "tokens_per_s": m["tokens_per_s"],
            "precision": m["precision"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--skip-trl-defaults", action="store_true", help="TRL defaults take ~30 s/step here")
    ap.add_argument("--json", type=Path, help="write the results here too")
    a = ap.parse_args()

    sys.path.insert(0, str(REPO))
    import torch

    from ftkit.models import resolve_model

    torch.set_num_threads(torch.get_num_threads())
    model_dir = resolve_model("smollm2-135m-instruct")
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        # One untimed step first: the first training in a process pays one-off kernel/thread warm-up,
        # which would otherwise count against whichever variant runs first.
        run_trl(model_dir, rows, 1, a.batch, True, f"{tmp}/warmup")
        results["trl_tuned_fp32"] = run_trl(model_dir, rows, a.steps, a.batch, True, f"{tmp}/trl_tuned")
        results["trl_tuned_fp32_packing"] = run_trl(model_dir, rows, a.steps, a.batch, True, f"{tmp}/trl_pack",
                                                    packing=True)
        results["ftkit"] = run_ftkit(DATA, a.steps, a.batch, f"{tmp}/ftkit")
        if not a.skip_trl_defaults:
            results["trl_defaults"] = run_trl(model_dir, rows, a.steps, a.batch, False, f"{tmp}/trl_defaults")
    print(f"\nLoRA SFT, SmolLM2-135M, {a.steps} steps x batch {a.batch}, {torch.get_num_threads()} threads")
    print(f"{'variant':<24} {'tokens/s':>10} {'wall s':>8}")
    for name, r in results.items():
        print(f"{name:<24} {r['tokens_per_s']:>10.1f} {r['wall_s']:>8.1f}")
    base = results["ftkit"]["tokens_per_s"]
    for name in ("trl_defaults", "trl_tuned_fp32", "trl_tuned_fp32_packing"):
        if name in results:
            ratio = base / results[name]["tokens_per_s"]
            results[f"ratio_vs_{name}"] = ratio
            print(f"ftkit / {name}: {ratio:.2f}x")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
