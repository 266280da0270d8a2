"""Optimizer and trainer knobs from the recipe: NEFTune, GaLore/APOLLO arguments (transformers'
TrainingArguments) and LoRA+ (peft's optimizer with its own learning rate for the B matrices)."""

from __future__ import annotations

from ftkit.errors import UserError
from ftkit.knob_rules import lowrank_package


def training_kwargs(recipe) -> dict:
    """TrainingArguments fields for these knobs; empty when none is set."""
    t = recipe.train
    kw = {}
    if t.neftune_noise_alpha is not None:
        kw["neftune_noise_alpha"] = t.neftune_noise_alpha
    if lowrank_package(t.optim) is not None:
        kw["optim_target_modules"] = t.optim_target_modules or "all-linear"
    if t.optim_args:
        kw["optim_args"] = t.optim_args
    return kw


def configure_trainer(trainer, recipe) -> None:
    """Called once per stage after the trainer is built: installs the LoRA+ optimizer when asked."""
    ratio = getattr(recipe.method, "loraplus_lr_ratio", None)
    if ratio is None:
        return
    import os

    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and recipe.distributed != "ddp":
        raise UserError(f"{recipe.where('method', 'loraplus_lr_ratio')}: method.loraplus_lr_ratio builds its "
                        f"optimizer before the model is sharded, which distributed: {recipe.distributed} does not "
                        "allow; use distributed: ddp")
    args = trainer.args
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, trainer.model)
    kwargs.pop("lr", None)
    # The Trainer keeps an optimizer it is given and builds its lr scheduler on top, which scales every
    # group's lr by the same factor: B stays at ratio x the lr of A through the schedule.
    trainer.optimizer = create_loraplus_optimizer(trainer.model, cls, lr=args.learning_rate, loraplus_lr_ratio=ratio,
                                                  loraplus_weight_decay=args.weight_decay, **kwargs)
