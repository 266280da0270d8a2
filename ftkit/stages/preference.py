"""The offline preference stages: thin adapters onto TRL's DPOTrainer, KTOTrainer and ORPOTrainer
(ORPO lives in trl.experimental in TRL 1.16). One module, three registry entries."""

from __future__ import annotations

from ftkit.errors import UserError
from ftkit.recipe import Recipe
from ftkit.stages import policy
from ftkit.stages.base import Built, Context
from ftkit.stages.common import finite


def check(recipe: Recipe, produced: frozenset[str] = frozenset()) -> None:
    policy.stage_format(recipe)
    policy.check_rows(recipe)
    if recipe.stage == "kto" and recipe.train.batch_size < 2:
        raise UserError(f"{recipe.where('train', 'batch_size')}: train.batch_size: kto needs at least 2 "
                        "(its KL estimate pairs each row with another row of the same batch)")


def trainer_classes(recipe: Recipe):
    if recipe.stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    if recipe.stage == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOConfig, KTOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOConfig, ORPOTrainer


def build(recipe: Recipe, hw, use_cache: bool = True) -> Built:
    # DPO and KTO drop rows whose prompt fills max_length themselves; ORPO would train on empty replies.
    return policy.build(recipe, hw, drop_long=recipe.stage == "orpo")


def config_args(recipe: Recipe, built: Built) -> dict:
    p = recipe.preference
    args = {"max_length": recipe.data.max_length, "beta": p.beta}
    if recipe.stage == "dpo":
        args.update(loss_type=[p.loss_type], label_smoothing=p.label_smoothing)
    elif recipe.stage == "kto":
        args.update(desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight)
    if recipe.stage in ("dpo", "kto"):
        args.update(precompute_ref_log_probs=p.precompute_ref_log_probs)
    return args


def evaluate(trainer, built: Built, when: str) -> dict:
    if built.eval is None:
        return {}
    ev = trainer.evaluate()
    return {"reward_accuracy": finite(ev.get("eval_rewards/accuracies")),
            "reward_margin": finite(ev.get("eval_rewards/margins")),
            "eval_loss": finite(ev.get("eval_loss"))}


def summarize(ctx: Context) -> dict:
    acc, margin = policy.series(ctx.history, "rewards/accuracies"), policy.series(ctx.history, "rewards/margins")
    return {
        "train_reward_accuracy_first": acc[0] if acc else None,
        "train_reward_accuracy_last": acc[-1] if acc else None,
        "train_reward_margin_first": margin[0] if margin else None,
        "train_reward_margin_last": margin[-1] if margin else None,
        "eval_before": ctx.before or None,
        "eval_after": ctx.after or None,
        "eval_pairs": len(ctx.built.eval) if ctx.built.eval is not None else 0,
        "reference_model": "none (orpo needs none)" if ctx.recipe.stage == "orpo" else
                           policy.reference_model(ctx.built),
    }


def done_line(m: dict) -> str:
    before, after = m["eval_before"] or {}, m["eval_after"] or {}
    return (policy.change("eval reward accuracy", before.get("reward_accuracy"), after.get("reward_accuracy"), ".2f")
            + policy.change("margin", before.get("reward_margin"), after.get("reward_margin"), ".3f"))
