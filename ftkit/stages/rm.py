"""Reward model: a sequence-classification head (one output) on a causal LM, trained on preference
pairs with TRL's RewardTrainer. Using one (load, score, merge) lives in ftkit/reward_model.py."""

from __future__ import annotations

from ftkit.recipe import Recipe
from ftkit.stages import policy
from ftkit.stages.base import Built, Context
from ftkit.stages.common import finite
from ftkit.ui import log


def check(recipe: Recipe, produced: frozenset[str] = frozenset()) -> None:
    policy.stage_format(recipe)
    policy.check_rows(recipe)


def trainer_classes(recipe: Recipe):
    from trl import RewardConfig, RewardTrainer

    return RewardConfig, RewardTrainer


def build(recipe: Recipe, hw, use_cache: bool = True) -> Built:
    built = policy.build(recipe, hw, reward_head=True)
    if built.eval is None:
        log("[yellow]note:[/] no eval pairs (data.eval or data.eval_split): accuracy is measured on the "
            "training pairs, which says little about generalisation")
    return built


def config_args(recipe: Recipe, built: Built) -> dict:
    return {"max_length": recipe.data.max_length, "center_rewards_coefficient": recipe.preference.center_rewards}


def evaluate(trainer, built: Built, when: str) -> dict:
    """Pairwise accuracy before and after training, on the eval pairs (else the kept train pairs)."""
    ev = trainer.evaluate(trainer.eval_dataset if built.eval is not None else trainer.train_dataset)
    return {"pairwise_accuracy": finite(ev.get("eval_accuracy")), "mean_margin": finite(ev.get("eval_margin")),
            "loss": finite(ev.get("eval_loss"))}


def summarize(ctx: Context) -> dict:
    acc = policy.series(ctx.history, "accuracy")
    has_eval = ctx.built.eval is not None
    return {
        "pairwise_accuracy_before": ctx.before["pairwise_accuracy"],
        "pairwise_accuracy_after": ctx.after["pairwise_accuracy"],
        "mean_margin_before": ctx.before["mean_margin"],
        "mean_margin_after": ctx.after["mean_margin"],
        "accuracy_measured_on": "eval pairs" if has_eval else "train pairs",
        "eval_pairs": len(ctx.trainer.eval_dataset) if has_eval else len(ctx.trainer.train_dataset),
        "train_pairs": len(ctx.trainer.train_dataset),
        "train_accuracy_first": acc[0] if acc else None,
        "train_accuracy_last": acc[-1] if acc else None,
    }


def done_line(m: dict) -> str:
    return (policy.change(f"pairwise accuracy ({m['accuracy_measured_on']})", m["pairwise_accuracy_before"],
                          m["pairwise_accuracy_after"], ".2f")
            + policy.change("mean margin", m["mean_margin_before"], m["mean_margin_after"], ".3f"))
