"""Every training stage, once: its name, help, data format and headline metrics, and the module that
supplies the rest of the stage contract (see ftkit/stages/base.py). The CLI commands, the recipe's
`stage:` values, pipeline support and the stage checks all come from this table.

This module stays light (no torch, no recipe): the recipe schema reads the stage names from it.
"""

from __future__ import annotations

from ftkit.stages.base import StageSpec

_PREFERENCE_LOSS = (("train_reward_accuracy_last", "train acc"),)

STAGES: dict[str, StageSpec] = {}


def register(spec: StageSpec) -> StageSpec:
    STAGES[spec.name] = spec
    return spec


def get(name: str) -> StageSpec:
    return STAGES[name]


register(StageSpec("sft", "Supervised fine-tuning (chat, instruction or completion data).", "ftkit.stages.sft",
                   headline=(("last_loss", "loss"),), speed_levers=True))
register(StageSpec("pt", "Continued pretraining on raw text (loss on every token).", "ftkit.stages.sft",
                   headline=(("last_loss", "loss"),), speed_levers=True))
register(StageSpec("rm", "Reward model: a one-output classifier head trained on preference pairs "
                   "(reports pairwise accuracy).", "ftkit.stages.rm", data_format="preference", preference=True,
                   headline=(("pairwise_accuracy_before", "acc before"), ("pairwise_accuracy_after", "acc after"),
                             ("mean_margin_after", "margin"))))
register(StageSpec("dpo", "Direct preference optimisation on prompt/chosen/rejected pairs.",
                   "ftkit.stages.preference", data_format="preference", preference=True, headline=_PREFERENCE_LOSS))
register(StageSpec("kto", "KTO on unpaired replies labelled desirable (true) or not (false).",
                   "ftkit.stages.preference", data_format="unpaired", preference=True,
                   headline=(("train_reward_margin_last", "train margin"),)))
register(StageSpec("orpo", "ORPO: SFT and preference in one loss, no reference model (TRL experimental).",
                   "ftkit.stages.preference", data_format="preference", preference=True, headline=_PREFERENCE_LOSS))
register(StageSpec("cpo", "CPO or SimPO (preference.loss_type: simpo) on preference pairs, no reference model "
                   "(TRL experimental).", "ftkit.stages.cpo", data_format="preference", preference=True,
                   headline=_PREFERENCE_LOSS))
register(StageSpec("rl", "Online RLHF (GRPO or RLOO) against a reward model and/or reward functions. "
                   "TRL 1.16 has no PPO.", "ftkit.stages.rl", data_format="prompt", preference=True,
                   headline=(("reward_mean_first_quarter", "reward first ¼"),
                             ("reward_mean_last_quarter", "reward last ¼"))))

STAGE_NAMES = tuple(STAGES)
