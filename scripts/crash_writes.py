"""kill -9 ftkit in the middle of its writes; every destination must be absent or complete, and a rerun succeed.

    python scripts/crash_writes.py [--runs 20] [--kinds merge-lora,export,checkpoint,rename] [--work DIR]

Write kinds (each on the tests' tiny random model, built here):
  merge-lora  `ftkit merge-lora ADAPTER --output OUT` (half of the runs with --overwrite over a finished OUT)
  export      `ftkit export BASE --format safetensors --quantize f16 --output OUT` (same)
  checkpoint  `ftkit sft` saving a checkpoint every step, killed anywhere in the run; the next run is
              `--resume`, so kills land in resumed runs too
  rename      `ftkit sft`, killed around the final save and the `.partial` -> final rename (half of the
              runs with --overwrite over a finished run dir)

The commands run in forked children of this process, which has imported ftkit, torch and
transformers once, so a run costs its work, not its imports; kills are drawn mostly inside the
window where the clean run was seen writing. After each kill: the destination is absent or
complete (every safetensors tensor reads, config/report/recipe parse; for a run dir also the
adapter), the checkpoint `--resume` would pick loads (weights, optimizer with weights_only=True,
trainer_state), and the output's lock is free (a killed holder never leaves it stuck). After all
kills of a kind a plain rerun (--resume / --overwrite) exits 0 with a complete destination and no
lock file left. Prints one JSON line per kind and a summary; exit 1 on any violation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")  # fork-safe torch
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
KINDS = ("merge-lora", "export", "checkpoint", "rename")
MARK = "old-output.marker"  # put into a finished output before an --overwrite run: tells the old copy from the new


def fork(fn, log: Path) -> int:
    """Run fn() in a forked child with its output in log; returns the pid (its exit code is fn's)."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        fn()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def cli(argv: list[str]):
    def run():
        from ftkit.cli import main

        sys.argv = ["ftkit", *argv]
        main()
    return run


def wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


class Kind:
    """One write kind: its command, its destination and what complete means there."""

    def __init__(self, name: str, work: Path, base: Path, adapter: Path, recipe: Path):
        self.name, self.work = name, work
        self.out = work / f"out-{name}"
        self.partial = self.out.parent / f"{self.out.name}.partial"
        if name == "merge-lora":
            self.argv = ["merge-lora", str(adapter), "--output", str(self.out)]
        elif name == "export":
            self.argv = ["export", str(base), "--format", "safetensors", "--quantize", "f16", "--output", str(self.out)]
        else:
            self.argv = ["sft", str(recipe), "--output", str(self.out)]

    def rerun_args(self) -> list[str]:
        if self.name in ("checkpoint", "rename") and not self.out.exists():
            return ["--resume"]
        return ["--overwrite"] if self.out.exists() else []

    def complete(self) -> bool:
        return _complete(self.name, self.out)


def _tensors(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return sum(fh.get_tensor(k).numel() >= 0 for k in fh.keys())


def _complete(kind: str, out: Path) -> bool:
    """Every file a user loads is there and reads."""
    try:
        if kind in ("checkpoint", "rename"):
            from ftkit import safe_yaml

            json.loads((out / "adapter_config.json").read_text())
            json.loads((out / "metrics.json").read_text())
            safe_yaml.load_mapping_file(out / "recipe.yaml")
            return _tensors(out / "adapter_model.safetensors") > 0
        json.loads((out / "config.json").read_text())
        json.loads((out / ("ftkit_merge.json" if kind == "merge-lora" else "ftkit_export.json")).read_text())
        files = list(out.glob("*.safetensors"))
        return bool(files) and all(_tensors(f) > 0 for f in files)
    except Exception:
        return False


def checkpoint_state(partial: Path) -> str:
    """'none', 'ok' (the checkpoint --resume picks loads), or 'BAD: ...'."""
    from ftkit.resume import latest_checkpoint

    ckpt = latest_checkpoint(partial) if partial.is_dir() else None
    if ckpt is None:
        return "none"
    try:
        import torch

        json.loads((ckpt / "trainer_state.json").read_text())
        assert _tensors(ckpt / "adapter_model.safetensors") > 0
        torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
        return "ok"
    except Exception as exc:
        return f"BAD: {ckpt.name}: {type(exc).__name__}: {str(exc)[:120]}"


def lock_free(out: Path) -> bool:
    from ftkit.locks import OutputLocked, lock_output, release_output

    try:
        lock_output(out)
    except OutputLocked:
        return False
    release_output(out)
    return True


def _ckpts(kind: Kind) -> dict[str, bool]:
    """checkpoint dir name -> has its trainer_state.json (written last) yet."""
    base = kind.partial / "checkpoints"
    try:
        return {p.name: (p / "trainer_state.json").exists() for p in base.iterdir() if p.name.startswith("checkpoint-")}
    except OSError:
        return {}


def clean_run(kind: Kind) -> dict:
    """When an unkilled run writes what, polling its output's folder every 5 ms: the first write, the
    final save into .partial (adapter_model.safetensors), the destination, and a checkpoint's write."""
    log = kind.work / f"{kind.name}.clean.log"
    ours = (kind.out.name, f"{kind.out.name}.partial", f".{kind.out.name}.")
    t0 = time.monotonic()
    pid = fork(cli(kind.argv), log)
    seen: dict[str, float] = {}
    ckpt_start: dict[str, float] = {}
    done_ckpts: set[str] = set()
    ckpt_writes = []
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        now = time.monotonic() - t0
        if "first" not in seen and any(p.name.startswith(ours) and not p.name.endswith(".lock")
                                       for p in kind.work.iterdir()):
            seen["first"] = now
        if "save" not in seen and (kind.partial / "adapter_model.safetensors").exists():
            seen["save"] = now
        if "final" not in seen and kind.out.exists():
            seen["final"] = now
        for name, finished in _ckpts(kind).items():
            ckpt_start.setdefault(name, now)
            if finished and name not in done_ckpts:
                done_ckpts.add(name)
                ckpt_writes.append(now - ckpt_start[name])
        if done:
            break
        time.sleep(0.002)
    total = time.monotonic() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{kind.name}: the clean run failed, see {log}:\n{log.read_text()[-2000:]}")
    first = seen.get("first", 0.0)
    return {"total": total, "first": first, "save": seen.get("save", first), "final": seen.get("final", total),
            # The shortest: a poll that waited for a core only makes a write look longer (~0.1 s here).
            "ckpt_write": min(ckpt_writes, default=0.2)}


def _exited(pid: int) -> bool:
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None  # without reaping it


def _trigger(kind: Kind, timing: dict):
    """(has the write begun?, how long it lasts in the clean run): the kill strikes in that span."""
    if kind.name == "checkpoint":
        before = set(_ckpts(kind))
        return (lambda: bool(set(_ckpts(kind)) - before)), 1.2 * timing["ckpt_write"]
    if kind.name == "rename":  # the final save into .partial, then the rename
        return (lambda: (kind.partial / "adapter_model.safetensors").exists()), timing["final"] - timing["save"] + 0.1
    prefix = f".{kind.out.name}.tmp-"  # merge/export stage into a temp dir beside the output
    return (lambda: any(p.name.startswith(prefix) for p in kind.work.iterdir())), timing["total"] - timing["first"]


def kill(pid: int, kind: Kind, timing: dict, rng: random.Random) -> float:
    """SIGKILL pid at a random point: mostly within the write (from the moment it is seen to begin,
    a random part of the time it took in the clean run), sometimes anywhere in the run. Returns the
    seconds from the start, or -1 when the run ended before it could be killed."""
    t0 = time.monotonic()
    if rng.random() < 0.2:
        time.sleep(rng.uniform(0, timing["total"]))  # anywhere: loading, tokenizing, training too
    else:
        begun, span = _trigger(kind, timing)
        while not begun():
            if _exited(pid) or time.monotonic() - t0 > 3 * timing["total"]:
                return -1.0
            time.sleep(0.002)
        time.sleep(rng.uniform(0, max(span, 0.05)))
    if _exited(pid):
        return -1.0
    os.kill(pid, signal.SIGKILL)
    return time.monotonic() - t0


def one_kill(kind: Kind, timing, rng: random.Random, i: int) -> dict:
    if kind.name == "checkpoint":  # killed runs go on: --resume, or --overwrite of a finished one
        overwrite = kind.out.exists()
    else:  # half of the runs replace a finished output (--overwrite), half write a fresh one
        overwrite = rng.random() < 0.5
        if not overwrite or not kind.complete():
            for p in (kind.out, kind.partial):
                shutil.rmtree(p, ignore_errors=True)
        if overwrite and not kind.out.exists() and wait(fork(cli(kind.argv), kind.work / f"{kind.name}.kills.log")):
            raise SystemExit(f"{kind.name}: a clean run failed, see {kind.work / f'{kind.name}.kills.log'}")
    if overwrite:
        (kind.out / MARK).write_text("old")
    args = kind.argv + (["--overwrite"] if overwrite else ["--resume"] if kind.name == "checkpoint" else [])
    pid = fork(cli(args), kind.work / f"{kind.name}.kills.log")
    delay = kill(pid, kind, timing, rng)
    rc = wait(pid)
    if not kind.out.exists():
        state = "absent"
    elif kind.complete():
        state = "complete (old)" if (kind.out / MARK).exists() else "complete (new)"
    else:
        state = "HALF-WRITTEN"
    record = {"i": i, "killed_at_s": round(delay, 3), "rc": rc, "killed": rc == -signal.SIGKILL, "overwrite": overwrite, "destination": state,
              "lock_free": lock_free(kind.out)}
    if kind.name in ("checkpoint", "rename"):
        record["checkpoint"] = checkpoint_state(kind.partial)
        record["cut_checkpoints"] = sum(not done for done in _ckpts(kind).values())  # the kill hit mid-write
    return record


def run_kind(kind: Kind, runs: int, rng: random.Random, timings: dict) -> dict:
    family = "sft" if kind.name in ("checkpoint", "rename") else kind.name  # one clean sft run times both
    if family not in timings:
        timings[family] = clean_run(kind)
        shutil.rmtree(kind.out)  # the first kill lands in a fresh run
    timing = timings[family]
    kills, tries = [], 0
    while sum(k["killed"] for k in kills) < runs and tries < 3 * runs:  # count kills that landed
        kills.append(one_kill(kind, timing, rng, tries))
        tries += 1
    log = kind.work / f"{kind.name}.rerun.log"
    again = kind.rerun_args()
    rc = wait(fork(cli(kind.argv + again), log))
    from ftkit.locks import lock_path

    rerun = {"args": again, "rc": rc, "complete": kind.complete(),
             "lock_file_left": lock_path(kind.out).exists()}
    states: dict[str, int] = {}
    for k in (k for k in kills if k["killed"]):  # a run that ended before its kill says nothing
        states[k["destination"]] = states.get(k["destination"], 0) + 1
        if "checkpoint" in k:
            states[f"checkpoint {k['checkpoint'].split(':')[0]}"] = states.get(
                f"checkpoint {k['checkpoint'].split(':')[0]}", 0) + 1
    if kind.name in ("checkpoint", "rename"):
        states["kill inside a checkpoint write"] = sum(k.get("cut_checkpoints", 0) > 0 for k in kills if k["killed"])
    bad = [k for k in kills if k["destination"] == "HALF-WRITTEN" or not k["lock_free"]
           or k.get("checkpoint", "").startswith("BAD")]
    ok = not bad and rc == 0 and rerun["complete"] and not rerun["lock_file_left"]
    return {"kind": kind.name, "kills": sum(k["killed"] for k in kills), "tries": len(kills), "states": states, "clean_run_s": {k: round(v, 2) for k, v in timing.items()},
            "rerun": rerun, "bad": bad, "ok": ok, "rerun_log": None if rc == 0 else log.read_text()[-1500:]}


def build_inputs(work: Path) -> tuple[Path, Path, Path]:
    """The tiny model, a LoRA adapter on it and an sft recipe, made in a child (torch stays unused here)."""
    base, adapter, recipe = work / "tiny", work / "adapter", work / "sft.yaml"

    def make():
        from conftest import CHAT_ROWS, build_tiny, write_recipe
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from ftkit.models import resolve_model

        build_tiny(base, Path(resolve_model("smollm2-135m-instruct")))
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                              LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        peft.save_pretrained(adapter)
        data = work / "chat.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS), encoding="utf-8")
        write_recipe(recipe, base, data, train={"max_steps": 2, "save_steps": 1, "save_total_limit": 2,
                                                 "logging_steps": 1, "batch_size": 4, "learning_rate": 1e-3},
                     output={"samples": 0})

    if wait(fork(make, work / "setup.log")) != 0:
        raise SystemExit(f"building the inputs failed:\n{(work / 'setup.log').read_text()[-2000:]}")
    return base, adapter, recipe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="kills per write kind")
    ap.add_argument("--train-runs", type=int, help="kills for checkpoint and rename (default: --runs)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    ap.add_argument("--work", help="scratch dir (default: a new temp dir, removed at the end)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="ftkit-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    import importlib

    # Imported once here, so every forked run starts warm and a kill lands in work, not in imports.
    for mod in ("ftkit.cli", "ftkit.stages.lifecycle", "ftkit.stages.sft", "ftkit.merge", "ftkit.export",
                "ftkit.report", "peft", "transformers", "trl", "bitsandbytes", "matplotlib.pyplot"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass

    rng = random.Random(args.seed)
    t0 = time.monotonic()
    base, adapter, recipe = build_inputs(work)
    results, timings = [], {}
    for name in args.kinds.split(","):
        runs = args.train_runs if args.train_runs is not None and name in ("checkpoint", "rename") else args.runs
        results.append(run_kind(Kind(name, work, base, adapter, recipe), runs, rng, timings))
        print(json.dumps(results[-1]), flush=True)
    ok = all(r["ok"] for r in results)
    print(json.dumps({"kills": {r["kind"]: r["kills"] for r in results}, "ok": ok,
                      "seconds": round(time.monotonic() - t0, 1)}), flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
