"""How far `ftkit plan`'s memory estimate is from a measured CPU peak, on small random models.

    python benchmarks/plan_accuracy.py [--steps 3] [--out plan_accuracy.json]

Each case runs in its own process and trains the recipe through ftkit's lifecycle for a few steps. Measured:
the weights and buffers present when training starts plus the peak of every tensor created while training
(followed by a dispatch mode until freed): on CPU what torch.cuda.max_memory_allocated is on a GPU. The
peak RSS above the process's start is printed beside it; it also holds the loader's mapped files, allocator
slack and the libraries' buffers, which the plan does not model. Every row is longer than max_length, so a
step holds exactly batch x max_length tokens, the plan's assumption (short rows would make the plan's
activations a multiple of what ran, the mistake of this benchmark's first version). The plan is computed for
the same recipe on this CPU (no GPU overhead line).
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
    "lora_bf16": {"method": {"type": "lora", "r": 16, "alpha": 32}, "model": {"dtype": "bfloat16"}},
}
MAX_LENGTH = 128


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

    data = tmp / "text.jsonl"  # ~400 tokens a row, truncated to max_length: every step is full
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
    data.write_text("".join(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(300))}) + "\n"
                            for i in range(32)))
    case = CASES[name]
    recipe = {"model": {"name": str(model), "dtype": "float32", **case.get("model", {})}, "method": case["method"],
              "data": {"train": str(data), "max_length": MAX_LENGTH},
              "train": {"max_steps": steps, "batch_size": 8, "logging_steps": 1, **case.get("train", {})},
              "output": {"dir": str(tmp / f"run-{name}"), "samples": 0}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _tensor_peak_mode():
    """A dispatch mode that follows every CPU tensor storage an operation creates until it is freed, and keeps
    the peak of their sum: on CPU what torch.cuda.max_memory_allocated is on a GPU (RSS adds allocator slack,
    the loader's mapped files and the libraries' own buffers, which the plan does not claim to model)."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveTensorPeak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live: dict = {}
            self.cur = self.peak = 0

        def _free(self, key, n):
            if self.live.pop(key, None) is not None:
                self.cur -= n

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    st = t.untyped_storage()
                    if st._cdata not in self.live and st.nbytes():
                        n = st.nbytes()
                        self.cur += n
                        self.peak = max(self.peak, self.cur)
                        self.live[st._cdata] = weakref.ref(st, lambda _r, k=st._cdata, n=n: self._free(k, n))
            return out

    return LiveTensorPeak()


def _model_storages(model) -> dict:
    """Parameters and buffers present when training starts, by storage (tied weights once)."""
    out = {}
    for t in [*model.parameters(), *model.buffers()]:
        st = t.untyped_storage()
        out[st._cdata] = st.nbytes()
    return out


def measure(recipe_path: str) -> dict:
    """In this process: the plan, then a real run; returns both in bytes."""
    from ftkit.plan import plan
    from ftkit.recipe import load_recipe
    from ftkit.stages import lifecycle  # noqa: F401  (imports counted in the baseline, not the run)
    from ftkit.ui import quiet_libraries

    import transformers

    quiet_libraries()
    r = load_recipe(recipe_path)
    p = plan(r)
    seen: dict = {}
    train = transformers.Trainer.train

    def train_and_measure(self, *args, **kwargs):
        storages = _model_storages(self.model)
        seen["model"] = sum(storages.values())
        mode = _tensor_peak_mode()
        mode.live.update(dict.fromkeys(storages, None))  # counted above; a view of one is not a new tensor
        with mode:
            out = train(self, *args, **kwargs)
        seen["tensors"] = mode.peak
        seen["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # loading + training
        seen["tokens"] = self.state.num_input_tokens_seen / max(1, self.state.global_step)
        return out

    transformers.Trainer.train = train_and_measure
    base = _rss()
    lifecycle.run(r, overwrite=True)
    return {"planned": p.total, "measured": seen["model"] + seen["tensors"], "rss": seen["rss"] - base,
            "tokens_per_step": seen["tokens"],
            **{k: getattr(p, k) for k in ("weights", "gradients", "optimizer", "activations")}}


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
                  f"  error {row['error_pct']:+.1f}%  (peak RSS above the start {row['rss'] / 2**20:.0f} MiB,"
                  f" {row['tokens_per_step']:.0f} tokens a step)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
