"""CPO and SimPO: TRL's CPOTrainer (trl.experimental.cpo) on prompt/chosen/rejected pairs. Neither loads a
reference model: CPO's loss compares the policy's own log-likelihoods of the two replies (plus an NLL
term on the chosen one), and SimPO (preference.loss_type: simpo) compares their length-normalised
log-likelihoods against a target margin (preference.simpo_gamma)."""

from __future__ import annotations

from ftkit.recipe import Recipe
from ftkit.stages import policy, preference
from ftkit.stages.base import Built, Context

check = preference.check
evaluate = preference.evaluate
done_line = preference.done_line


def trainer_classes(recipe: Recipe):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return CPOConfig, CPOTrainer


def build(recipe: Recipe, hw, use_cache: bool = True) -> Built:
    # Like ORPO, CPO's NLL term would train on empty replies where the prompt fills max_length.
    return policy.build(recipe, hw, drop_long=True)


def config_args(recipe: Recipe, built: Built) -> dict:
    p = recipe.preference
    return {"max_length": recipe.data.max_length, "beta": p.beta, "loss_type": p.loss_type,
            "label_smoothing": p.label_smoothing, "simpo_gamma": p.simpo_gamma, "cpo_alpha": p.cpo_alpha}


def summarize(ctx: Context) -> dict:
    metrics = preference.summarize(ctx)
    metrics["reference_model"] = "none (cpo and simpo need none)"
    metrics["loss_type"] = ctx.recipe.preference.loss_type
    return metrics
