"""The one lifecycle every stage runs through:

    run dir -> hardware -> data + model + method (the stage's build) -> trainer -> train
    (interrupt checkpoint, resume) -> evaluate -> save -> metrics.json / metrics.jsonl, report -> commit

A stage module (see ftkit/stages/base.py) supplies only what differs; the failure messages
(out of memory, disk full, an emptied training set, an interrupted run) are the same for all.
Gates are applied to the committed run by the caller (the training command or the pipeline).
"""

from __future__ import annotations

import time
from pathlib import Path

from ftkit import optim
from ftkit import resume as resuming
from ftkit.distributed_resume import check_resume
from ftkit.errors import UserError
from ftkit.phase_clock import (EVALUATION, EXTRAS, LOADING, SAVING, STARTUP, TRAINER_IMPORT, TRAINER_PREP,
                               TRAINING, PhaseClock)
from ftkit.recipe import Recipe
from ftkit.rundir import RunDir, default_output_dir
from ftkit.stages.base import Built, Context
from ftkit.stages.common import (attach_progress, barrier, env_versions, explain_oom, explain_write_errors,
                                 finish_run_dir, finite, peak_memory_mb, setup_hardware, setup_reporting,
                                 trainer_kwargs, world_size, write_json)
from ftkit.stages.registry import get
from ftkit.ui import is_main_process, log


def check(recipe: Recipe, produced: frozenset[str] = frozenset()) -> None:
    """Everything that can be checked before a model loads. `produced`: run dirs an earlier pipeline
    stage will create (a stage may name one as its model or reward model)."""
    spec = get(recipe.stage)
    if spec.multi_process and world_size() > 1:
        raise UserError(f"{recipe.where('stage')}: stage {spec.name} runs in one process only: {spec.multi_process}")
    spec.load().check(recipe, produced)
    if world_size() > 1:
        from ftkit.distributed_strategy import check as check_strategy
        from ftkit.hardware import detect

        check_strategy(recipe, world_size(), detect().device)


def run(recipe: Recipe, output: str | None = None, overwrite: bool = False, resume: str | None = None,
        use_cache: bool = True, clock: PhaseClock | None = None) -> Path:
    """Train one stage and commit its run dir. resume: None, "latest" (this run's newest checkpoint) or a path.
    clock: where the phase times go (metrics.json has those up to its writing either way)."""
    t_start = time.perf_counter()
    clock = clock or PhaseClock()
    stage = get(recipe.stage).load()
    check(recipe)
    run_dir = RunDir(output or default_output_dir(recipe), overwrite=overwrite, resume=resume is not None)
    ckpt = resuming.resolve_resume(resume, run_dir.work)
    check_resume(recipe, ckpt, world_size())  # another world size or strategy: refused or explained, before loading
    with clock.phase(STARTUP):
        hw = setup_hardware(recipe)
    log(f"loading {recipe.model.name} and the data ...")
    with clock.phase(LOADING):
        built = stage.build(recipe, hw, use_cache)
    with clock.phase(TRAINER_IMPORT):
        config_cls, trainer_cls = stage.trainer_classes(recipe)
    with clock.phase(TRAINER_PREP):  # TRL tokenizes the data while the trainer is built
        trainer, work, resumed_from, progress = _prepare(recipe, stage, built, hw, run_dir, ckpt, resume is not None,
                                                         config_cls, trainer_cls)
    evaluate = getattr(stage, "evaluate", None)
    with explain_oom(recipe), clock.phase(EVALUATION):
        if evaluate and built.eval is not None:
            log("evaluating before training ...")
        before = evaluate(trainer, built, "before") if evaluate else {}
    with clock.phase(TRAINING):
        result, wall = _train(trainer, recipe, work, ckpt)
    with explain_oom(recipe), clock.phase(EVALUATION):
        if evaluate and built.eval is not None:
            log("evaluating ...")
        after = evaluate(trainer, built, "after") if evaluate else {}
    if hasattr(stage, "after_training"):
        stage.after_training(trainer, built)
    log("saving ...")
    with explain_write_errors(work), clock.phase(SAVING):
        saved = _save(trainer, work, built)
    ctx = Context(recipe, hw, built, trainer, result, progress.history, before, after, wall)
    metrics = {**_common_metrics(ctx, resumed_from, progress.tokens0), **(saved or {}), **stage.summarize(ctx),
               "phases_s": clock.rounded(), "total_s": round(time.perf_counter() - t_start, 2)}
    if is_main_process():
        with explain_write_errors(work):
            write_json(work / "metrics.json", metrics)
            finish_run_dir(work, keep_checkpoints=recipe.output.keep_checkpoints)
        with clock.phase(EXTRAS):
            _write_extras(stage, recipe, work, trainer, built, run_dir.final)
    final = run_dir.commit(barrier=barrier)
    log(f"[green]done[/] in {time.perf_counter() - t_start:.1f}s (training {wall:.1f}s) · {metrics['steps']} steps"
        f"{stage.done_line(metrics)} · run dir: {final}")
    del trainer, built
    _free_memory()
    return final


def _prepare(recipe: Recipe, stage, built: Built, hw, run_dir: RunDir, ckpt: Path | None, resuming_run: bool,
             config_cls, trainer_cls):
    """The trainer with its callbacks, in the started run dir; returns (trainer, work dir, the step of the
    checkpoint resumed from, the progress recorder)."""
    # The stage's fields override the shared ones (e.g. sft's batch size and memory levers). In a
    # multi-process run building the config joins the process group.
    args = config_cls(**{**trainer_kwargs(recipe, hw, run_dir.work, built.eval is not None, built.model),
                         **stage.config_args(recipe, built)})
    work = run_dir.start(keep_partial=resuming_run, barrier=barrier)
    resumed_from = _resume_point(ckpt, work)
    setup_reporting(recipe, work)
    trainer = trainer_cls(model=built.model, args=args, train_dataset=built.train, eval_dataset=built.eval,
                          processing_class=built.tokenizer, **built.trainer_args)
    _check_not_emptied(recipe, trainer, built)
    optim.configure_trainer(trainer, recipe)  # e.g. the LoRA+ optimizer
    progress = attach_progress(trainer, work / "metrics.jsonl")
    for cb in built.callbacks:
        trainer.add_callback(cb)
    if world_size() > 1:
        from ftkit.distributed import heartbeat_callback

        trainer.add_callback(heartbeat_callback())  # lets a rank whose peer stopped say which one
    return trainer, work, resumed_from, progress


def _resume_point(ckpt: Path | None, work: Path) -> int | None:
    step = resuming.checkpoint_step(ckpt) if ckpt is not None else None
    if ckpt is not None:
        log(f"resuming from {ckpt} (step {step})")
        if is_main_process():
            resuming.trim_metrics_log(work / "metrics.jsonl", step)
    barrier()
    return step


def _check_not_emptied(recipe: Recipe, trainer, built: Built) -> None:
    """TRL drops rows it cannot fit in max_length; an empty training set is bad input, not a crash later."""
    kept, given = len(trainer.train_dataset), len(built.train)
    if kept == 0:
        raise UserError(f"{recipe.where('data', 'max_length')}: no training rows left: every one of the {given} "
                        f"rows is too long for data.max_length={recipe.data.max_length} tokens; raise it")
    if kept < given and not recipe.data.packing:
        log(f"[yellow]warning:[/] {given - kept} of {given} training rows dropped: longer than "
            f"data.max_length={recipe.data.max_length} tokens")


def _train(trainer, recipe: Recipe, work: Path, ckpt: Path | None):
    """trainer.train with the interrupt checkpoint and clear messages; returns (TrainOutput, seconds)."""
    stopper = resuming.make_interrupt_callback()
    trainer.add_callback(stopper)
    t0 = time.perf_counter()
    stopper.install()
    try:
        with explain_oom(recipe), explain_write_errors(work):  # checkpoints are written while training
            result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt is not None else None)
    finally:
        stopper.uninstall()
    if stopper.stopped_at is not None:
        raise resuming.Interrupted(stopper.stopped_at, work)
    return result, time.perf_counter() - t0


def _save(trainer, work: Path, built: Built) -> dict | None:
    if built.save is not None:
        return built.save(trainer, work)
    from ftkit.methods import save_trained

    save_trained(trainer.model, work, trainer=trainer)
    return None


def _common_metrics(ctx: Context, resumed_from: int | None, tokens0: int = 0) -> dict:
    """tokens0: tokens already seen at the resumed checkpoint, so a resumed run's speed is its own."""
    recipe, trainer, hw = ctx.recipe, ctx.trainer, ctx.hw
    losses = [h["loss"] for h in ctx.history if "loss" in h and h.get("kind") == "train"]
    steps = trainer.state.global_step
    tokens = trainer.state.num_input_tokens_seen or 0
    return {
        "stage": recipe.stage,
        "method": recipe.method.type,
        "base_model": ctx.built.base_name,
        "base_model_path": ctx.built.base_dir,
        "train_loss": finite(ctx.result.training_loss),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "steps": steps,
        "resumed_from_step": resumed_from,
        "world_size": world_size(),
        "distributed": recipe.distributed if world_size() > 1 else None,
        "epochs": round(trainer.state.epoch or 0, 4),
        "tokens": tokens,
        "tokens_per_s": round((tokens - tokens0) / ctx.wall, 1) if ctx.wall > 0 else None,
        "tokens_per_step": round(tokens / steps, 1) if steps else None,
        "wall_s": round(ctx.wall, 2),
        "peak_memory_mb": peak_memory_mb(hw),
        "device": hw.device,
        "precision": hw.dtype,
        "precision_reason": hw.dtype_reason,
        **ctx.built.params,
        "versions": env_versions(),
    }


def _write_extras(stage, recipe: Recipe, work: Path, trainer, built: Built, final: Path) -> None:
    """The tokenizer, recipe and model card, then samples and the HTML report (their failure must not
    cost the run)."""
    from ftkit.report import write_report

    with explain_write_errors(work):
        (work / "training_args.bin").unlink(missing_ok=True)  # a pickle; the recipe says it all
        built.tokenizer.save_pretrained(work)
        (work / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        if recipe.stage != "rm":  # a reward model is scored (ftkit score), not loaded as a causal LM
            _write_card(recipe, work, final)
    try:
        samples = getattr(stage, "write_samples", None)
        if samples is not None and recipe.distributed == "ddp":  # sharded weights cannot generate on one rank
            samples(recipe, work, trainer.model, built.tokenizer)
        write_report(work)
    except Exception as exc:  # noqa: BLE001
        log(f"[yellow]warning:[/] report not written: {exc}")


def _write_card(recipe: Recipe, work: Path, final: Path) -> None:
    """README.md from what the run left (recipe, metrics), replacing peft's "[More Information Needed]"
    placeholder: the base model by name, method, data, steps, metrics and how to load the run dir."""
    from ftkit.model_card import collect, model_card

    kind, files, facts = collect(work)
    files = [final / f.name for f in files] + [final / "README.md"]
    intro = (f"Trained with `ftkit {recipe.stage}` from the recipe in `recipe.yaml` (rerun it to reproduce); "
             f"`ftkit push {final} --repo org/name` uploads it with this card.")
    (work / "README.md").write_text(model_card(kind, str(final), files, facts, intro=intro), encoding="utf-8")


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
