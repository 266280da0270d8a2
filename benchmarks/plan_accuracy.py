"""How far `ftkit plan`'s memory estimate is from a measured CPU peak, on small random models.

    python benchmarks/plan_accuracy.py [--steps 3] [--out plan_accuracy.json]

Each case runs in its own process: import everything, build the data, note the resident memory (RSS),
then train the recipe through ftkit's lifecycle for a few steps; measured = peak RSS - that baseline.
The plan is computed for the same recipe on this CPU (no GPU overhead line). RSS also holds allocator
slack and the libraries' scratch buffers, so the error here is an upper bound on the formula's own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

SHAPE = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 4, "head_dim": 64}
CASES = {
    "lora": {"method": {"type": "lora", "r": 16, "alpha": 32}},
    "full": {"method": {"type": "full"}},
    "lora_ckpt": {"method": {"type": "lora", "r": 16, "alpha": 32}, "train": {"activation_checkpointing": True}},
}


def build_model(out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ftkit.models import resolve_model

    src = resolve_model("smollm2-135m-instruct")
    cfg = AutoConfig.from_pretrained(src)
    for k, v in SHAPE.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def write_recipe(tmp: Path, model: Path, name: str, steps: int) -> Path:
    import yaml

    from conftest import CHAT_ROWS

    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS * 4))
    case = CASES[name]
    recipe = {"model": {"name": str(model), "dtype": "float32"}, "method": case["method"],
              "data": {"train": str(data), "max_length": 128},
              "train": {"max_steps": steps, "batch_size": 8, "logging_steps": 1, **case.get("train", {})},
              "output": {"dir": str(tmp / f"run-{name}")}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def measure(recipe_path: str) -> dict:
    """In this process: the plan, then a real run; returns both in bytes."""
    from ftkit.plan import plan
    from ftkit.recipe import load_recipe
    from ftkit.stages import lifecycle  # noqa: F401  (imports counted in the baseline, not the run)
    from ftkit.ui import quiet_libraries

    quiet_libraries()
    r = load_recipe(recipe_path)
    p = plan(r)
    base = _rss()
    lifecycle.run(r, overwrite=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"planned": p.total, "measured": peak - base, **{k: getattr(p, k) for k in
            ("weights", "gradients", "optimizer", "activations")}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode: measure one recipe
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="ftkit-plan-") as t:
        tmp = Path(t)
        model = build_model(tmp / "model")
        for name in args.cases.split(","):
            path = write_recipe(tmp, model, name, args.steps)
            res = subprocess.run([sys.executable, __file__, "--one", str(path)], capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr[-2000:], file=sys.stderr)
                continue
            row = {"case": name, **json.loads(res.stdout.strip().splitlines()[-1])}
            row["error_pct"] = round(100 * (row["planned"] - row["measured"]) / row["measured"], 1)
            rows.append(row)
            print(f"{name:10s} planned {row['planned'] / 2**20:8.1f} MiB  measured {row['measured'] / 2**20:8.1f} MiB"
                  f"  error {row['error_pct']:+.1f}%", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
