"""LoRA SFT throughput: plain TRL vs ftkit on the same model, the same tokens, in one invocation.

    python benchmarks/sft_speed.py [--device auto|cpu|cuda] [--model 1b|7b] [--tiny] [--steps N]
                                   [--warmup W] [--variants a,b,...] [--json OUT]

Workloads (chosen by the device and --model):
  cpu       the embedded SmolLM2-135M-Instruct, the quickstart chat data, batch 4, max_length 256;
  cuda 1b   a Llama-3.2-1B-shaped random model (1.09B params, no download; the shape of
            ../shared/bench/trl_anchor.py), text rows with lognormal lengths (median ~400 tokens,
            cap 2048), batch 8;
  cuda 7b   a Llama-2-7B-shaped random model (32 layers, hidden 4096, MLP 11008, 32 heads; the
            SmolLM2 vocabulary) built on the GPU, the same rows; for the QLoRA variants (nf4, double
            quant, bf16 compute: the one BitsAndBytesConfig of ftkit.methods, given to both sides);
  --tiny    the cuda workload's code path with a tiny model and short rows, on any device (a dry run).
All use LoRA r16 / alpha 32 / dropout 0.05 on every linear layer of the blocks.

Every variant runs in its own process (so peak memory is its own) on the very same token ids:
ftkit prepares the data once and the TRL variants get those input_ids. tokens/s counts real
(non-padding) input tokens between the end of step W and the end of the last step. MFU uses
4 x params + attention FLOPs per token (frozen base: no weight gradients) against the chip's
dense bf16 peak where it is known. Not a test: speed targets live here, not in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
QUICKSTART = REPO / "data_templates" / "quickstart" / "train.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}

VARIANTS = {
    # name: (runner, settings). TRL settings are SFTConfig fields; ftkit settings are recipe --set items.
    "trl_defaults": ("trl", {}),
    "trl_fp32": ("trl", {"bf16": False, "fp16": False, "activation_checkpointing": False}),
    "trl_fp32_packing": ("trl", {"bf16": False, "fp16": False, "activation_checkpointing": False, "packing": True}),
    "trl_nopack": ("trl", {"activation_checkpointing": False}),
    "trl_tuned": ("trl", {"activation_checkpointing": False, "packing": True}),
    "trl_liger": ("trl", {"activation_checkpointing": False, "packing": True, "use_liger_kernel": True}),
    "trl_compile": ("trl", {"activation_checkpointing": False, "packing": True, "use_liger_kernel": True,
                            "torch_compile": True}),
    # QLoRA: TRL is handed the base loaded in 4-bit nf4 (double quant), as its docs show.
    "trl_qlora": ("trl", {"activation_checkpointing": False, "qlora": True}),
    "trl_qlora_defaults": ("trl", {"qlora": True}),  # plain TRL's defaults (activation checkpointing on)
    "trl_qlora_cpu": ("trl", {"bf16": False, "fp16": False, "activation_checkpointing": False, "qlora": True}),
    "ftkit": ("ftkit", []),  # defaults: on CUDA padding-free varlen batches + Liger
    "ftkit_padded": ("ftkit", ["train.padding_free=false"]),
    "ftkit_qlora": ("ftkit", ["method.type=qlora"]),
    "ftkit_qlora_lowmem": ("ftkit", ["method.type=qlora", "train.low_memory=true"]),
    "ftkit_packing": ("ftkit", ["data.packing=true"]),
    "ftkit_lowmem": ("ftkit", ["train.low_memory=true"]),
    "ftkit_compile": ("ftkit", ["train.compile=true"]),
    "ftkit_packing_compile": ("ftkit", ["data.packing=true", "train.compile=true"]),
}
DEFAULT = {
    "cpu": ["trl_defaults", "trl_fp32", "trl_fp32_packing", "ftkit", "ftkit_packing"],
    "cuda": ["trl_defaults", "trl_nopack", "trl_tuned", "trl_liger", "trl_compile",
             "ftkit", "ftkit_packing", "ftkit_lowmem", "ftkit_packing_compile"],
    "cuda7b": ["trl_qlora_defaults", "ftkit_qlora_lowmem", "ftkit_qlora", "trl_qlora"],
}
BASELINES = {"cpu": ("trl_defaults", "trl_fp32", "trl_fp32_packing", "trl_qlora_cpu"),
             "cuda": ("trl_defaults", "trl_nopack", "trl_tuned", "trl_liger", "trl_compile", "trl_qlora_defaults",
                      "trl_qlora")}


# LlamaConfig fields of each random model (no download). 7b: Llama-2-7B's shape.
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, tie_word_embeddings=False, rope_theta=10000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rope_theta=10000.0),
}


def workload(device: str, work: Path, base: str | None, model: str = "1b", tiny: bool = False) -> dict:
    """Model dir, recipe overrides and data for the device; written once into `work`."""
    from ftkit.models import resolve_model

    if device == "cpu" and not tiny:
        return {"model": resolve_model("smollm2-135m-instruct"), "data": str(QUICKSTART), "batch": 4,
                "max_length": 256, "set": ["data.format=messages"], "shape": SHAPES["1b"]}
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    shape = "tiny" if tiny else model
    model_dir = work / f"llama-{shape}-shaped"
    tok = AutoTokenizer.from_pretrained(base or resolve_model("smollm2-135m-instruct"))
    if not (model_dir / "config.json").exists():
        cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **SHAPES[shape])
        torch.manual_seed(0)
        with torch.device(device):  # a 7B init takes minutes on CPU cores, seconds on the GPU
            m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        m.save_pretrained(model_dir)
        del m
        if device == "cuda":
            torch.cuda.empty_cache()  # the variants run in their own processes and need this memory
        tok.save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    words = [w for w in tok.get_vocab() if w.isalpha() and 3 <= len(w) <= 8][:5000]
    median, cap, rows = (40, 255, 200) if tiny else (400, 2047, 4000)
    lens = np.clip(rng.lognormal(np.log(median), 0.8, rows).astype(int), 8, cap)
    data = work / "text.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, n))}) + "\n" for n in lens))
    return {"model": str(model_dir), "data": str(data), "batch": 8, "max_length": cap + 1,
            "set": ["data.format=text", "stage=pt"], "shape": SHAPES[shape]}


def recipe_items(w: dict, steps: int, out: Path, extra: list[str]) -> list[str]:
    return [f"model.name={w['model']}", f"data.train={w['data']}", f"data.max_length={w['max_length']}",
            f"train.batch_size={w['batch']}", f"train.max_steps={steps}", "train.learning_rate=2e-4",
            "train.logging_steps=1", "method.r=16", "method.alpha=32", "method.dropout=0.05",
            f"output.dir={out}", *w["set"], *extra]


def tokens_per_s(history: list[tuple[int, float, int]], warmup: int) -> tuple[float, float]:
    """(tokens/s, seconds) between the end of step `warmup` and the last step."""
    (_, t0, n0), (_, t1, n1) = next(h for h in history if h[0] == warmup), history[-1]
    return (n1 - n0) / (t1 - t0), t1 - t0


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (whole process)


def worker(name: str, device: str, w: dict, steps: int, warmup: int, out: Path) -> dict:
    kind, settings = VARIANTS[name]
    if kind == "ftkit":
        from ftkit.recipe import load_recipe
        from ftkit.stages import sft

        recipe = load_recipe(None, recipe_items(w, steps, out, settings))
        run_dir = sft.run(recipe, output=str(out), overwrite=True)
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        history = [(r["step"], r["elapsed_s"], r["tokens_seen"]) for r in rows if r.get("kind") == "train"]
        m = json.loads((run_dir / "metrics.json").read_text())
        info = {"precision": m["precision"], "speed": m.get("speed"), "batch": m.get("batch_size")}
        if "method.type=qlora" in settings:
            from ftkit.methods import quantization_kwargs

            info["bnb"] = quantization_kwargs(4, m["precision"], device)["quantization_config"].to_dict()
        n_params = m["total_params"]
    else:
        import torch
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoTokenizer, TrainerCallback
        from trl import SFTConfig, SFTTrainer

        from ftkit.data import prepare
        from ftkit.recipe import load_recipe

        tok = AutoTokenizer.from_pretrained(w["model"])
        settings = dict(settings)
        model = w["model"]
        bnb = None
        if settings.pop("qlora", False):
            from transformers import AutoModelForCausalLM

            from ftkit.methods import quantization_kwargs

            compute = "float32" if settings.get("bf16") is False else "bfloat16"
            q = quantization_kwargs(4, compute, device)  # the very BitsAndBytesConfig ftkit loads with
            bnb = q["quantization_config"].to_dict()
            model = AutoModelForCausalLM.from_pretrained(w["model"], dtype=getattr(torch, compute), **q)
        # The very tokens ftkit trains on (from its data cache after the first prepare).
        prepared = prepare(load_recipe(None, recipe_items(w, steps, out, [])), tok, log=lambda *_: None)
        train, _ = prepared.to_datasets()
        ids = Dataset.from_dict({"input_ids": train["input_ids"]})
        history = []

        class Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if device == "cuda":
                    torch.cuda.synchronize()
                history.append((state.global_step, time.perf_counter(), state.num_input_tokens_seen))

        args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=w["batch"],
                         learning_rate=2e-4, logging_steps=1, save_strategy="no", report_to=[],
                         use_cpu=device == "cpu", max_length=w["max_length"], disable_tqdm=True,
                         # a flat (packed) row holds no padding; "non_padding" would drop tokens equal to the pad id
                         include_num_input_tokens_seen="all" if settings.get("packing") else "non_padding",
                         dataloader_num_workers=0,
                         **({"packing_strategy": "bfd"} if settings.get("packing") else {}), **settings)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ids, processing_class=tok,
                             peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                                    task_type="CAUSAL_LM"),
                             callbacks=[Clock()])
        trainer.train()
        info = {"precision": "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32",
                "activation_checkpointing": bool(args.activation_checkpointing), "bnb": bnb}
        n_params = sum(p.numel() for p in trainer.model.parameters())
    tps, secs = tokens_per_s(history, warmup)
    return {"variant": name, "tokens_per_s": round(tps, 1), "timed_s": round(secs, 2),
            "timed_steps": steps - warmup, "peak_gib": round(peak_memory_gib(device), 2), "params": n_params, **info}


def mfu(res: dict, device: str, w: dict) -> float | None:
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    if peak is None:
        return None
    layers, hidden, ctx = w["shape"]["num_hidden_layers"], w["shape"]["hidden_size"], 400  # ~ the median row
    return res["tokens_per_s"] * (4 * res["params"] + 12 * layers * hidden * ctx) / peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--model", choices=["1b", "7b"], default="1b", help="cuda workload: the model's shape")
    ap.add_argument("--tiny", action="store_true", help="the cuda workload with a tiny model (a dry run, any device)")
    ap.add_argument("--steps", type=int, default=None, help="steps per variant (cpu 6, cuda 24)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps (cpu 2, cuda 6)")
    ap.add_argument("--variants", help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--base", help="cuda: a dir with the SmolLM2 tokenizer (default: the embedded model's)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    import torch

    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    steps = a.steps or (6 if device == "cpu" else 24)
    warmup = a.warmup if a.warmup is not None else (2 if device == "cpu" else 6)
    if a.worker:
        w = json.loads((a.work / "workload.json").read_text())
        print("RESULT " + json.dumps(worker(a.worker, device, w, steps, warmup, a.work / a.worker)), flush=True)
        return 0

    names = a.variants.split(",") if a.variants else DEFAULT["cuda7b" if a.model == "7b" else device]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    results, failed = {}, {}
    hw = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores"
    import transformers
    import trl

    header = {"device": hw, "model": "tiny" if a.tiny else a.model if device == "cuda" else "smollm2-135m",
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "transformers": transformers.__version__,
              "trl": trl.__version__, "steps": steps, "warmup": warmup}
    with tempfile.TemporaryDirectory(prefix="ftkit-sft-speed-") as tmp:
        work = Path(tmp)
        w = workload(device, work, a.base, a.model, a.tiny)
        (work / "workload.json").write_text(json.dumps(w))
        for name in names:
            cmd = [sys.executable, __file__, "--worker", name, "--work", str(work), "--device", device,
                   "--steps", str(steps), "--warmup", str(warmup)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                failed[name] = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                print(f"{name:<18} FAILED: {failed[name][0][:200]}", flush=True)
                continue
            res = json.loads(line[len("RESULT "):])
            res["mfu"] = mfu(res, device, w)
            res["process_s"] = round(time.perf_counter() - t0, 1)
            results[name] = res
            print(f"{name:<18} {res['tokens_per_s']:>10,.0f} tok/s  peak {res['peak_gib']:6.2f} GiB"
                  + (f"  MFU {res['mfu']:.3f}" if res["mfu"] else ""), flush=True)
            if a.json:  # after every variant: a run cut off by a time limit still leaves what it measured
                a.json.write_text(json.dumps({**header, "results": results, "failed": failed}, indent=2))
    print(f"\nLoRA SFT on {hw}: {steps} steps per variant, the first {warmup} untimed")
    ratios = {}
    trl = [n for n in BASELINES[device] if n in results]
    best = max(trl[1:] or trl, key=lambda n: results[n]["tokens_per_s"], default=None)  # best hand-tuned
    for f in (n for n in results if n.startswith("ftkit")):
        for b in trl:
            ratios[f"{f}/{b}"] = round(results[f]["tokens_per_s"] / results[b]["tokens_per_s"], 2)
            print(f"  {f} / {b}: {ratios[f'{f}/{b}']:.2f}x" + ("   (best hand-tuned TRL)" if b == best else ""))
    out = {**header, "results": results, "ratios": ratios, "failed": failed}
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
