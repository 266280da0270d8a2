"""Supervised fine-tuning (and continued pretraining): a thin adapter from Recipe to TRL's SFTTrainer."""

from __future__ import annotations

import time
from pathlib import Path

from ftkit.data import prepare
from ftkit.methods import apply_method, count_params, load_kwargs, save_trained
from ftkit.models import load_causal_lm, load_tokenizer, resolve_model
from ftkit.recipe import Recipe
from ftkit.rundir import RunDir
from ftkit.stages.common import (attach_progress, default_output_dir, env_versions, finish_run_dir, finite,
                                 peak_memory_mb, setup_hardware, trainer_kwargs, write_json)
from ftkit.ui import log


def run(recipe: Recipe, output: str | None = None, overwrite: bool = False) -> Path:
    from trl import SFTConfig, SFTTrainer

    run_dir = RunDir(output or default_output_dir(recipe), overwrite=overwrite)
    hw = setup_hardware(recipe)
    base = resolve_model(recipe.model.name, log=log)
    tok = load_tokenizer(base, recipe.model.trust_remote_code, recipe.model.revision)
    data = prepare(recipe, tok, log=log)
    ts = data.train_stats.summary()
    log(f"data: {ts['kept']} train rows ({data.format}), {len(data.eval)} eval rows · "
        f"{ts['trained_tokens']:,} of {ts['tokens']:,} tokens trained ({recipe.data.train_on})")

    model = load_causal_lm(base, hw.dtype, trust_remote_code=recipe.model.trust_remote_code,
                           revision=recipe.model.revision, attn_implementation=recipe.model.attn_implementation,
                           **load_kwargs(base, recipe.method, hw, recipe.model.trust_remote_code))
    model = apply_method(model, recipe.method, log=log, tokenizer=tok, base_path=base)
    params = count_params(model)
    log(f"trainable params: {params['trainable_params']:,} of {params['total_params']:,} "
        f"({params['trainable_percent']:.2f}%)")

    work = run_dir.start()
    train_ds, eval_ds = data.to_datasets()
    args = SFTConfig(
        **trainer_kwargs(recipe, hw, work, eval_ds is not None),
        max_length=recipe.data.max_length,
        packing=recipe.data.packing,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tok)
    progress = attach_progress(trainer, work / "metrics.jsonl")
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    eval_metrics = trainer.evaluate() if eval_ds is not None else {}

    save_trained(trainer.model, work)
    if data.template is not None:
        tok.chat_template = data.template  # inference formats prompts exactly as training did
    tok.save_pretrained(work)
    (work / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")

    tokens = trainer.state.num_input_tokens_seen or 0
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
        "epochs": round(trainer.state.epoch or 0, 4),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "wall_s": round(wall, 2),
        "peak_memory_mb": peak_memory_mb(hw),
        "device": hw.device,
        "precision": hw.dtype,
        "precision_reason": hw.dtype_reason,
        **params,
        "data": {"format": data.format, "train": ts, "eval": data.eval_stats.summary()},
        "versions": env_versions(),
    }
    write_json(work / "metrics.json", metrics)
    finish_run_dir(work)
    final = run_dir.commit()
    first, last = metrics["first_loss"], metrics["last_loss"]
    log(f"[green]done[/] in {wall:.1f}s · {metrics['steps']} steps"
        + (f" · loss {first:.4f} → {last:.4f}" if first is not None and last is not None else "")
        + (f" · eval_loss {metrics['eval_loss']:.4f}" if metrics["eval_loss"] is not None else "")
        + f" · run dir: {final}")
    return final
