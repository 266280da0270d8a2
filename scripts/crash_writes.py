"""kill -9 `ftkit merge-lora` / `ftkit export` at random points; the destination must be absent or complete.

    python scripts/crash_writes.py [--runs 20] [--model DIR] [--work DIR]

Builds a small LoRA adapter on --model (default: the tests' tiny random model, built here), times
one clean run of each command, then --runs times per command starts it (half of them with
--overwrite over a finished output), SIGKILLs it after a random fraction of that time, and checks:
the destination is absent, or it is complete (config.json, loadable safetensors, the command's
report file) and not half-replaced; after all kills a plain rerun succeeds. Prints one JSON line.
Everything is written under --work (default: a temp dir), outside the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def build_inputs(work: Path, model: str | None) -> tuple[Path, Path]:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny  # noqa: E402
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftkit.models import resolve_model

    base = Path(model) if model else build_tiny(work / "tiny", Path(resolve_model("smollm2-135m-instruct")))
    adapter = work / "adapter"
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(adapter)
    return base, adapter


def command(kind: str, base: Path, adapter: Path, out: Path) -> list[str]:
    if kind == "merge-lora":
        return [sys.executable, "-m", "ftkit", "merge-lora", str(adapter), "--output", str(out)]
    return [sys.executable, "-m", "ftkit", "export", str(base), "--format", "safetensors", "--quantize", "f16",
            "--output", str(out)]


def complete(kind: str, out: Path) -> bool:
    from safetensors import safe_open

    report = out / ("ftkit_merge.json" if kind == "merge-lora" else "ftkit_export.json")
    try:
        json.loads((out / "config.json").read_text())
        json.loads(report.read_text())
        for f in out.glob("*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                list(fh.keys())
        return any(out.glob("*.safetensors"))
    except (OSError, ValueError, Exception):
        return False


def one_kill(kind: str, base: Path, adapter: Path, out: Path, clean_s: float, rng: random.Random) -> dict:
    overwrite = rng.random() < 0.5 and out.exists()
    args = command(kind, base, adapter, out) + (["--overwrite"] if overwrite else [])
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    delay = rng.uniform(0.05, 1.1) * clean_s
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = "absent" if not out.exists() else ("complete" if complete(kind, out) else "HALF-WRITTEN")
    return {"kind": kind, "overwrite": overwrite, "killed_at_s": round(delay, 2), "rc": proc.returncode,
            "destination": state}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="kills per command")
    ap.add_argument("--model", help="base model dir (default: a tiny random model built here)")
    ap.add_argument("--work", help="scratch dir (default: a new temp dir, removed at the end)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="ftkit-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    base, adapter = build_inputs(work, args.model)
    results, reruns = [], {}
    for kind in ("merge-lora", "export"):
        out = work / f"out-{kind}"
        t0 = time.monotonic()
        subprocess.run(command(kind, base, adapter, out), check=True, capture_output=True, env=ENV)
        clean_s = time.monotonic() - t0
        shutil.rmtree(out)
        results += [one_kill(kind, base, adapter, out, clean_s, rng) for _ in range(args.runs)]
        rerun = subprocess.run(command(kind, base, adapter, out) + ["--overwrite"], capture_output=True, env=ENV)
        reruns[kind] = {"rc": rerun.returncode, "complete": complete(kind, out), "clean_run_s": round(clean_s, 1)}
    bad = [r for r in results if r["destination"] == "HALF-WRITTEN"]
    summary = {"kills": len(results), "half_written": len(bad),
               "absent": sum(r["destination"] == "absent" for r in results),
               "complete": sum(r["destination"] == "complete" for r in results), "reruns": reruns, "bad": bad}
    print(json.dumps(summary))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if bad or any(r["rc"] != 0 or not r["complete"] for r in reruns.values()) else 0)


if __name__ == "__main__":
    main()
