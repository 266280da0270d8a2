"""Resuming a checkpoint under another world size or strategy: what the checkpoint's files say about the
run that wrote it, and whether this run can continue it. Checked before the model loads.

The Trainer does not record the world size; its files do: one `rng_state_<rank>.pth` per process of a
multi-process run (`rng_state.pth` for one process), a `global_step<N>/` folder of ZeRO partitions for
DeepSpeed, and `pytorch_model_fsdp*` / `optimizer_0/` (torch.distributed.checkpoint) for FSDP.

What each strategy allows, and why:
- plain (one process or DDP): the weights and optimizer state are whole copies, so any world size
  loads them. The Trainer places the data by optimizer steps: it skips `global_step % steps_per_epoch`
  steps' worth of batches counted in the *new* run's batches, so the data position (and the run) is
  the uninterrupted one only when the global batch (batch_size x grad_accum x processes) is unchanged.
- FSDP2 (on GPUs): sharded state dicts are written with torch.distributed.checkpoint, which re-shards on
  load. On CPU processes accelerate does not shard, and the checkpoints are plain ones.
- DeepSpeed ZeRO: optimizer partitions are tied to the data-parallel size that wrote them; DeepSpeed's
  loader refuses another size (a universal checkpoint conversion is needed, outside ftkit).
- Across strategies: the Trainer reads each strategy's own layout (an FSDP checkpoint only under FSDP).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ftkit.errors import UserError
from ftkit.ui import log

_RNG = re.compile(r"^rng_state_(\d+)\.pth$")


def checkpoint_layout(ckpt: Path) -> tuple[str, int | None]:
    """(strategy family: 'deepspeed' | 'fsdp' | 'plain', world size or None when no RNG file says)."""
    names = [p.name for p in ckpt.iterdir()]
    if any(n.startswith("global_step") and (ckpt / n).is_dir() for n in names):
        family = "deepspeed"
    elif any(n.startswith("pytorch_model_fsdp") or n == "optimizer_0" for n in names):
        family = "fsdp"
    else:
        family = "plain"
    ranks = [int(m.group(1)) for m in map(_RNG.match, names) if m]
    world = max(ranks) + 1 if ranks else (1 if "rng_state.pth" in names else None)
    return family, world


def _family(recipe, world_size: int, device: str | None) -> str:
    """The layout this run's Trainer will read and write."""
    if world_size <= 1 or recipe.distributed == "ddp":
        return "plain"
    if recipe.distributed == "fsdp":
        if device is None:
            from ftkit.hardware import detect

            device = detect().device
        return "fsdp" if device == "cuda" else "plain"  # accelerate does not shard CPU processes: plain files
    return "deepspeed"


def _per_process_batch(ckpt: Path) -> int | None:
    try:
        return int(json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))["train_batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_resume(recipe, ckpt: Path | None, world_size: int, device: str | None = None) -> None:
    """Refuse (exit 2) a checkpoint this run cannot load; say what a world-size change does to the run.
    device: where training runs (default: detected)."""
    if ckpt is None:
        return
    family, old = checkpoint_layout(ckpt)
    new = _family(recipe, world_size, device)
    where = f"{recipe.where('distributed')}: --resume {ckpt.name}"
    written = f"written by {old or 'an unknown number of'} process{'es' if old != 1 else ''}"
    if family != new:
        said = {"plain": "DDP or one process", "fsdp": "FSDP", "deepspeed": "DeepSpeed"}
        raise UserError(f"{where} was {written} under {said[family]}, and this run uses {said[new]} "
                        f"(distributed: {recipe.distributed}, {world_size} process(es)): the Trainer reads each "
                        f"strategy's own checkpoint layout. Resume with the strategy that wrote it, or start over "
                        f"with --overwrite")
    if old is None or old == world_size:
        return
    if family == "deepspeed":
        raise UserError(f"{where} was {written}, this run has {world_size}: DeepSpeed ZeRO's optimizer partitions "
                        f"are tied to the number of processes that wrote them. Resume with {old} processes in all "
                        f"(-n/--nnodes), or start over with --overwrite")
    _note_world_change(recipe, ckpt, family, old, world_size)


def _note_world_change(recipe, ckpt: Path, family: str, old: int, new: int) -> None:
    if family == "fsdp":
        log(f"[yellow]note:[/] resuming a {old}-process FSDP checkpoint on {new} processes: "
            "torch.distributed.checkpoint re-shards the weights and optimizer state")
        return
    accum = recipe.train.grad_accum
    before = _per_process_batch(ckpt)
    now = recipe.train.batch_size if isinstance(recipe.train.batch_size, int) else None
    head = (f"[yellow]note:[/] resuming a {old}-process checkpoint on {new} process(es): the weights and optimizer "
            "state load whole; ranks without an RNG file start from fresh random seeds (dropout draws differ)")
    if not (before and now):
        log(head)
    elif before * old == now * new:
        log(f"{head}; the global batch is unchanged ({now * new * accum} rows), so the data continues where it was")
    else:
        keep = f"; train.batch_size: {before * old // new} keeps it" if (before * old) % new == 0 else ""
        log(f"{head}; the global batch changes from {before * old * accum} to {now * new * accum} rows: the Trainer "
            f"skips as many of the new batches as steps were done, so this epoch repeats or skips rows{keep}")
