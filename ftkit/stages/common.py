"""What every stage shares: hardware setup, TRL args from the recipe, progress, run-dir output."""

from __future__ import annotations

import json
import math
import os
import resource
import time
from contextlib import contextmanager
from pathlib import Path

from ftkit import optim
from ftkit.errors import UserError
from ftkit.hardware import Hardware, detect
from ftkit.recipe import Recipe
from ftkit.speed import batch_size
from ftkit.ui import console, is_main_process, log, quiet_libraries


def setup_hardware(recipe: Recipe) -> Hardware:
    import torch

    quiet_libraries()
    threads = recipe.train.num_threads
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if threads is None and local_procs > 1:
        # N processes on one machine share its cores; all-cores each would oversubscribe them.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // local_procs)
    hw = detect(recipe.model.dtype, threads)
    if hw.device == "cpu":
        torch.set_num_threads(hw.threads)
    log(f"device: {hw.device_name} · precision: {hw.dtype} ({hw.dtype_reason})")
    from transformers import set_seed

    # Before the model exists: adapter init draws from the global RNG, and the Trainer seeds only later.
    set_seed(recipe.train.seed, deterministic=recipe.train.deterministic)
    return hw


def activation_bytes(config, tokens: int, bytes_per_value: int) -> int:
    """Activations kept for the backward pass: ~34 values per token per hidden unit per layer (Korthikanti
    et al. 2022, with attention scores not materialized by sdpa/flash), plus the fp32 logits and their grad."""
    layers = getattr(config, "num_hidden_layers", None) or 1
    hidden = getattr(config, "hidden_size", None) or 1
    vocab = getattr(config, "vocab_size", None) or 1
    return tokens * (34 * hidden * layers * bytes_per_value // 2 + 2 * 4 * vocab)


def use_activation_checkpointing(recipe: Recipe, hw: Hardware, model=None) -> bool:
    """train.activation_checkpointing, with auto decided from memory: recompute costs ~30% more compute,
    so it is on only on a CUDA GPU where the step's activations would not fit in half the free memory
    (measured after the model is loaded)."""
    ckpt = recipe.train.activation_checkpointing
    if ckpt != "auto":
        return bool(ckpt)
    if hw.device != "cuda" or model is None:
        return False
    import torch

    free, _ = torch.cuda.mem_get_info()
    tokens = batch_size(recipe, hw) * recipe.data.max_length
    need = activation_bytes(model.config, tokens, 4 if hw.dtype == "float32" else 2)
    on = need > free / 2
    log(f"activation checkpointing: {'on' if on else 'off'} (auto: ~{need / 2**30:.1f} GiB of activations, "
        f"{free / 2**30:.1f} GiB free)")
    return on


def trainer_kwargs(recipe: Recipe, hw: Hardware, out_dir: Path, has_eval: bool, model=None) -> dict:
    """TrainingArguments fields shared by every TRL config, chosen from the recipe and the hardware."""
    t = recipe.train
    return dict(
        output_dir=str(out_dir / "checkpoints"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=batch_size(recipe, hw),
        per_device_eval_batch_size=batch_size(recipe, hw),
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5 takes a float < 1 as a ratio
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if (has_eval and t.eval_steps) else "no",
        eval_steps=t.eval_steps,
        # Checkpoints are for resuming; without save_steps one is written only when interrupted.
        save_strategy="steps" if t.save_steps else "no",
        **({"save_steps": t.save_steps} if t.save_steps else {}),
        save_total_limit=t.save_total_limit,
        full_determinism=t.deterministic,
        report_to=[] if t.report_to == "none" else [t.report_to],
        ddp_find_unused_parameters=False,  # LoRA freezes the base on purpose; the search only costs time
        disable_tqdm=True,
        bf16=hw.dtype == "bfloat16",
        fp16=hw.dtype == "float16",
        use_cpu=hw.device == "cpu",
        activation_checkpointing=use_activation_checkpointing(recipe, hw, model),
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=hw.device == "cuda",
        remove_unused_columns=False,
        **distributed_kwargs(recipe),
        **optim.training_kwargs(recipe),
    )


# DeepSpeed ZeRO-2 with every size left to the Trainer ("auto"); the same settings as
# recipes/accelerate/deepspeed_zero2.yaml.
DEEPSPEED_ZERO2 = {
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
}


def distributed_kwargs(recipe: Recipe) -> dict:
    """TrainingArguments for recipe.distributed; ddp needs none (the Trainer wraps the model itself)."""
    if world_size() == 1:
        return {}  # one process has nothing to shard; the same recipe still runs anywhere
    return {"ddp_timeout": recipe.distributed_timeout, **_strategy_kwargs(recipe)}


def _strategy_kwargs(recipe: Recipe) -> dict:
    # What cannot work (deepspeed without the package or GPUs, FSDP + QLoRA on CPU) was refused before loading.
    from ftkit.distributed_strategy import fsdp_config

    if recipe.distributed == "fsdp":
        return {"fsdp": True, "fsdp_config": fsdp_config(recipe)}
    if recipe.distributed == "deepspeed":
        zero = {**DEEPSPEED_ZERO2["zero_optimization"], "stage": recipe.zero_stage}
        return {"deepspeed": {**DEEPSPEED_ZERO2, "zero_optimization": zero}}
    return {}


def setup_reporting(recipe: Recipe, work: Path) -> None:
    """Point the chosen tracker inside the run dir; the default (none) writes nothing anywhere."""
    where = recipe.where("train", "report_to")
    if recipe.train.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            try:
                import tensorboardX  # noqa: F401
            except ImportError:
                raise UserError(f"{where}: train.report_to: tensorboard needs the tensorboard package "
                                "(pip install tensorboard)") from None
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(work / "tensorboard")
    elif recipe.train.report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError(f"{where}: train.report_to: wandb needs the wandb package (pip install wandb)") from None
        os.environ.setdefault("WANDB_MODE", "offline")  # CI jobs rarely have a key; `wandb sync` uploads later
        os.environ.setdefault("WANDB_DIR", str(work))


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextmanager
def explain_write_errors(work: Path):
    """Disk full / permissions while writing the run: one clear message; the final run dir is never created."""
    import errno

    from ftkit.atomic import disk_full

    try:
        yield
    except Exception as exc:  # safetensors and torch report a full disk as their own error types
        if not disk_full(exc) and getattr(exc, "errno", None) not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        why = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0][:200]
        raise UserError(f"cannot write the run under {work}: {why}. Nothing was written to the "
                        f"final run dir; checkpoints (if any) stay in {work} for --resume once fixed") from None


@contextmanager
def explain_oom(recipe: Recipe):
    """Turn a GPU out-of-memory error into the recipe knobs that lower memory."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    try:
        yield
    except oom:
        t, d = recipe.train, recipe.data
        raise UserError(
            f"out of GPU memory (train.batch_size={t.batch_size}, data.max_length={d.max_length}, "
            f"method.type={recipe.method.type}). To use less: lower train.batch_size ({recipe.where('train', 'batch_size')}) "
            f"and raise train.grad_accum to keep the effective batch; lower data.max_length "
            f"({recipe.where('data', 'max_length')}); set train.activation_checkpointing: true; or load the base "
            f"in 4 bits (QLoRA)."
        ) from None


def peak_memory_mb(hw: Hardware) -> float:
    if hw.device == "cuda":
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def attach_progress(trainer, metrics_path: Path):
    """Swap the trainer's log printer for our progress line; returns the callback (it keeps the history)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    cb = make_progress_callback(metrics_path)
    trainer.add_callback(cb)
    return cb


def finish_run_dir(work: Path, keep_checkpoints: bool = False) -> None:
    """A finished run needs no checkpoints (60 MB for the 135M model): they exist to resume an
    interrupted run, which keeps them in its .partial dir. output.keep_checkpoints keeps them."""
    import shutil

    ckpt = work / "checkpoints"
    if ckpt.is_dir() and (not keep_checkpoints or not any(ckpt.iterdir())):
        shutil.rmtree(ckpt)


def progress_every_s() -> float:
    """Seconds between plain progress lines when the output is not a terminal (a CI log)."""
    try:
        return max(0.0, float(os.environ.get("FTKIT_PROGRESS_EVERY", "30")))
    except ValueError:
        return 30.0


def _read_history(path: Path) -> list[dict]:
    """Records already in metrics.jsonl: a resumed run's earlier steps (trimmed to its checkpoint)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by the kill that interrupted the run
    return out


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _plain_line(state, elapsed: float, step0: int, loss: float | None, tokens_per_s: float) -> str:
    """`train step 12/26 · loss 0.41 · 52 tok/s · elapsed 0:01:40 · ETA 0:01:56`, ETA from this process's steps."""
    done = state.global_step - step0
    eta = (state.max_steps - state.global_step) * elapsed / done if done else None
    shown = f" · loss {loss:.4f}" if loss is not None else ""
    return (f"train step {state.global_step}/{state.max_steps}{shown} · {tokens_per_s:,.0f} tok/s"
            f" · elapsed {_clock(elapsed)} · ETA {_clock(eta) if eta is not None else '-'}")


def _log_record(state, logs: dict, elapsed: float) -> dict:
    """One metrics.jsonl line."""
    kind = "summary" if "train_loss" in logs else "eval" if any(k.startswith("eval_") for k in logs) else "train"
    return {"step": state.global_step, "kind": kind, "epoch": round(state.epoch or 0, 4),
            "elapsed_s": round(elapsed, 2), "tokens_seen": state.num_input_tokens_seen or 0,
            **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}


def make_progress_callback(metrics_path: Path):
    """The progress line (step, loss, lr, tokens/s, ETA) and metrics.jsonl, main process only.

    On a terminal a rich bar; otherwise (CI logs, `| tee`) a plain line every FTKIT_PROGRESS_EVERY
    seconds and at the last step, so a captured log shows a live job. Rates and the ETA count only
    the steps and tokens of this process, so a resumed run reports its own speed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        def __init__(self):
            self.progress = None
            self.task = None
            self.t0 = time.perf_counter()
            self.history: list[dict] = _read_history(metrics_path)
            self.step0 = 0  # where this process started (the resumed step)
            self.tokens0 = 0
            self.last_line = 0.0
            self.loss = None
            self.pending = False  # a plain line waits for this step's loss

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = self.last_line = time.perf_counter()
            self.step0, self.tokens0 = state.global_step, state.num_input_tokens_seen or 0
            if not is_main_process() or not console.is_terminal:
                return
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                TimeRemainingColumn(), console=console, transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("", total=state.max_steps, completed=state.global_step)

        def tokens_per_s(self, state) -> float:
            elapsed = time.perf_counter() - self.t0
            return ((state.num_input_tokens_seen or 0) - self.tokens0) / elapsed if elapsed > 0 else 0.0

        def on_step_end(self, args, state, control, **kw):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step)
            elif is_main_process():
                now, last = time.perf_counter(), state.global_step >= state.max_steps
                if last or now - self.last_line >= progress_every_s():
                    self.last_line = now
                    # A logging step's loss arrives in on_log, just after this: print the line there.
                    steps = args.logging_steps if args.logging_strategy == "steps" else 0
                    self.pending = bool(steps) and state.global_step % steps == 0
                    if not self.pending:
                        self.print_line(state)

        def print_line(self, state):
            self.pending = False
            console.print(_plain_line(state, time.perf_counter() - self.t0, self.step0, self.loss,
                                      self.tokens_per_s(state)))

        def on_log(self, args, state, control, logs=None, **kw):
            if not is_main_process() or not logs:
                return
            rec = _log_record(state, logs, time.perf_counter() - self.t0)
            self.history.append(rec)
            with metrics_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
            if "loss" in logs:
                self.loss = logs["loss"]
                if self.pending:
                    self.print_line(state)
            if self.progress is not None and "loss" in logs:
                self.progress.update(
                    self.task,
                    description=f"loss {logs['loss']:.4f} · lr {logs.get('learning_rate', 0):.2e} · "
                                f"{self.tokens_per_s(state):,.0f} tok/s",
                )

        def on_train_end(self, args, state, control, **kw):
            if self.progress is not None:
                self.progress.stop()
            elif self.pending:
                self.print_line(state)

    return RichProgress()


def finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def env_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("ftkit", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
