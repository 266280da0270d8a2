"""Supervised fine-tuning (and continued pretraining): a thin adapter from Recipe to TRL's SFTTrainer."""

from __future__ import annotations

import time
from pathlib import Path

from ftkit import optim, speed, varlen
from ftkit.data import prepare
from ftkit.methods import apply_method, count_params, load_kwargs, save_trained, weights_dtype
from ftkit.models import load_causal_lm, load_tokenizer, resolve_model
from ftkit.recipe import Recipe
from ftkit.rundir import RunDir
from ftkit.stages.common import (attach_progress, barrier, default_output_dir, env_versions, explain_oom,
                                 explain_write_errors, finish_run_dir, finite, peak_memory_mb, setup_hardware, setup_reporting,
                                 trainer_kwargs, world_size, write_json)
from ftkit.ui import is_main_process, log


def run(recipe: Recipe, output: str | None = None, overwrite: bool = False, resume: str | None = None,
        use_cache: bool = True) -> Path:
    """Train and write the run dir. resume: None, "latest" (this run's newest checkpoint) or a path."""
    # First, before the slow imports: a second run into a live run's dir fails at once (ftkit/locks.py).
    run_dir = RunDir(output or default_output_dir(recipe), overwrite=overwrite, resume=resume is not None)
    from trl import SFTConfig, SFTTrainer

    from ftkit import resume as resuming

    hw = setup_hardware(recipe)
    speed.check_levers(recipe, hw)
    base = resolve_model(recipe.model.name, log=log)
    tok = load_tokenizer(base, recipe.model.trust_remote_code, recipe.model.revision)
    data = prepare(recipe, tok, log=log, cache=use_cache)
    ts = data.train_stats.summary()
    log(f"data: {ts['kept']} train rows ({data.format}), {len(data.eval)} eval rows · "
        f"{ts['trained_tokens']:,} of {ts['tokens']:,} tokens trained ({recipe.data.train_on})")

    model = load_causal_lm(base, weights_dtype(base, recipe.method, hw, recipe.model.trust_remote_code),
                           trust_remote_code=recipe.model.trust_remote_code,
                           revision=recipe.model.revision, attn_implementation=recipe.model.attn_implementation,
                           **load_kwargs(base, recipe.method, hw, recipe.model.trust_remote_code))
    model = apply_method(model, recipe.method, log=log, tokenizer=tok, base_path=base, train_rows=data.train)
    params = count_params(model)
    log(f"trainable params: {params['trainable_params']:,} of {params['total_params']:,} "
        f"({params['trainable_percent']:.2f}%)")

    train_ds, eval_ds = data.to_datasets()
    work = run_dir.work
    fast = speed.sft_levers(recipe, hw, model, ts)
    levers = fast.kwargs
    log(fast.describe())
    args = SFTConfig(  # in a multi-process run this joins the process group
        **{**trainer_kwargs(recipe, hw, work, eval_ds is not None), "max_length": recipe.data.max_length, **levers},
        packing=recipe.data.packing,
        # bfd keeps sample boundaries and turns on padding-free batches with per-sample position_ids, from
        # which transformers builds a block-diagonal mask (sdpa/eager) or varlen kernels (flash attention):
        # no sample attends to another one packed beside it.
        packing_strategy="bfd",
        dataset_num_proc=None,
    )
    work = run_dir.start(keep_partial=resume is not None, barrier=barrier)
    ckpt = resuming.resolve_resume(resume, work)
    resumed_from = resuming.checkpoint_step(ckpt) if ckpt is not None else None
    if ckpt is not None:
        log(f"resuming from {ckpt} (step {resumed_from})")
        if is_main_process():
            resuming.trim_metrics_log(work / "metrics.jsonl", resumed_from)
    barrier()
    setup_reporting(recipe, work)
    own_attention = varlen.use(model, fast.flat.attention) if fast.flat.enabled else None
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tok)
    optim.configure_trainer(trainer, recipe)
    progress = attach_progress(trainer, work / "metrics.jsonl")
    stopper = resuming.make_interrupt_callback()
    trainer.add_callback(stopper)
    t0 = time.perf_counter()
    stopper.install()
    try:
        with explain_oom(recipe), explain_write_errors(work):  # checkpoints are written while training
            result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt is not None else None)
    finally:
        stopper.uninstall()
    wall = time.perf_counter() - t0
    if stopper.stopped_at is not None:
        raise resuming.Interrupted(stopper.stopped_at, work)
    with explain_oom(recipe):
        eval_metrics = trainer.evaluate() if eval_ds is not None else {}
    if own_attention is not None:
        varlen.restore(trainer.model, own_attention)  # generation and saving see padded batches

    with explain_write_errors(work):
        save_trained(trainer.model, work, trainer=trainer)
        if is_main_process():
            (work / "training_args.bin").unlink(missing_ok=True)  # a pickle; the recipe says it all
            if data.template is not None:
                tok.chat_template = data.template  # inference formats prompts exactly as training did
            tok.save_pretrained(work)
            (work / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")

    tokens = trainer.state.num_input_tokens_seen or 0
    steps = trainer.state.global_step
    losses = [h["loss"] for h in progress.history if "loss" in h]
    metrics = {
        "stage": recipe.stage,
        "method": recipe.method.type,
        "base_model": recipe.model.name,
        "base_model_path": base,
        "train_loss": finite(result.training_loss),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "eval_loss": finite(eval_metrics.get("eval_loss")),
        "steps": trainer.state.global_step,
        "resumed_from_step": resumed_from,
        "world_size": world_size(),
        "distributed": recipe.distributed if world_size() > 1 else None,
        "batch_size": trainer._train_batch_size,  # per device; batch_size: auto may have shrunk it
        "global_batch_size": trainer._train_batch_size * recipe.train.grad_accum * world_size(),
        "speed": fast.metrics(),
        "epochs": round(trainer.state.epoch or 0, 4),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "tokens_per_step": round(tokens / steps, 1) if steps else None,
        "packing": {"enabled": recipe.data.packing, "samples": len(train_ds), "rows": len(trainer.train_dataset)},
        "wall_s": round(wall, 2),
        "peak_memory_mb": peak_memory_mb(hw),
        "device": hw.device,
        "precision": hw.dtype,
        "precision_reason": hw.dtype_reason,
        **params,
        "data": {"format": data.format, "train": ts, "eval": data.eval_stats.summary(), "cache": data.cache,
                 "sources": data.sources},
        "versions": env_versions(),
    }
    if is_main_process():
        with explain_write_errors(work):
            write_json(work / "metrics.json", metrics)
            finish_run_dir(work)
        write_extras(recipe, work, trainer.model, tok)
    final = run_dir.commit(barrier=barrier)
    first, last = metrics["first_loss"], metrics["last_loss"]
    log(f"[green]done[/] in {wall:.1f}s · {metrics['steps']} steps"
        + (f" · loss {first:.4f} → {last:.4f}" if first is not None and last is not None else "")
        + (f" · eval_loss {metrics['eval_loss']:.4f}" if metrics["eval_loss"] is not None else "")
        + f" · run dir: {final}")
    return final


def write_extras(recipe: Recipe, work: Path, model, tok) -> None:
    """Sample generations and the HTML report; a failure here must not cost the trained run."""
    from ftkit.report import write_report, write_samples

    try:
        if recipe.distributed == "ddp":  # sharded (FSDP/DeepSpeed) weights cannot generate on one rank
            write_samples(recipe, work, model, tok)
        write_report(work)
    except Exception as exc:  # noqa: BLE001
        log(f"[yellow]warning:[/] report not written: {exc}")
