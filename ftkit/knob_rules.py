"""Cross-field rules for the peer knobs (LoRA init, LoRA+, NEFTune, GaLore/APOLLO, preference and GRPO
variants). Pure checks on the parsed recipe sections, raised as ValueError so the schema reports them
at the field's line; kept out of recipe.py so the schema module stays a list of fields."""

from __future__ import annotations

import importlib.util
import re

LORA_INITS = ("default", "gaussian", "pissa", "olora", "eva", "loftq")
# Inits that move part of the base weights into the adapter: the base in memory is a residual.
RESIDUAL_INITS = ("pissa", "olora")
# transformers' optim name prefix -> (import name, pip package)
LOWRANK_OPTIMS = {"galore_": ("galore_torch", "galore-torch"), "apollo_": ("apollo_torch", "apollo-torch")}
# transformers' names for them (TrainingArguments.optim)
CPO_LOSSES = ("sigmoid", "hinge", "ipo", "simpo")
LOWRANK_NAMES = ("galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
                 "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "apollo_adamw", "apollo_adamw_layerwise")


def init_kind(init: str) -> str:
    """'pissa_niter_16' -> 'pissa'; other names are their own kind."""
    return "pissa" if init.startswith("pissa_niter_") else init


def check_lora_init(method) -> None:
    init = method.init
    if init not in LORA_INITS and not re.fullmatch(r"pissa_niter_[1-9]\d*", init):
        raise ValueError(f"method.init: {init!r} is not one of {' | '.join(LORA_INITS[:3])} | pissa_niter_N | "
                         f"{' | '.join(LORA_INITS[3:])}")
    kind = init_kind(init)
    dora = method.use_dora or method.type == "dora"
    if kind in RESIDUAL_INITS and (dora or method.type == "qlora"):
        raise ValueError(f"method.init: {init} works with method.type: lora only (peft converts a {kind} adapter "
                         "to a plain LoRA on save, which has no DoRA or quantized-base form)")
    if kind == "loftq" and (method.type != "qlora" or method.bits != 4):
        raise ValueError("method.init: loftq initializes LoRA against a 4-bit quantized base: it needs "
                         "method.type: qlora with bits: 4")


def lowrank_package(optim: str) -> tuple[str, str] | None:
    """(module, pip name) a GaLore/APOLLO optimizer needs, or None for other optimizers."""
    for prefix, pkg in LOWRANK_OPTIMS.items():
        if optim.startswith(prefix):
            return pkg
    return None


def check_recipe(recipe) -> None:
    """Rules that tie a knob to the stage or method it works with."""
    stage, m, t, p = recipe.stage, recipe.method, recipe.train, recipe.preference
    if t.neftune_noise_alpha is not None and stage not in ("sft", "pt"):
        raise ValueError(f"train.neftune_noise_alpha applies to the sft and pt stages, not {stage}")
    if m.type in ("lora", "dora", "qlora"):
        kind = init_kind(m.init)
        if kind == "eva" and stage not in ("sft", "pt"):
            raise ValueError(f"method.init: eva runs its data pass on tokenized sft/pt rows; stage {stage} "
                             "has none (use pissa or default)")
        if kind == "loftq" and stage not in ("sft", "pt"):
            raise ValueError(f"method.init: loftq is wired for the sft and pt stages (it reads the base's "
                             f"full-precision safetensors beside the 4-bit load), not {stage}")
        if kind in RESIDUAL_INITS and stage in ("dpo", "kto", "rl"):
            raise ValueError(f"method.init: {m.init} cannot be used in stage {stage}: its reference model is the "
                             f"policy with the adapter switched off, which after {kind} is the residual base, not "
                             "the starting model")
    _check_optim(recipe)
    if p.precompute_ref_log_probs and stage not in ("dpo", "kto"):
        raise ValueError(f"preference.precompute_ref_log_probs applies to dpo and kto, not {stage}")
    if stage == "cpo" and p.loss_type not in CPO_LOSSES:
        raise ValueError(f"preference.loss_type: cpo takes {' | '.join(CPO_LOSSES)}, not {p.loss_type!r}")


def _check_optim(recipe) -> None:
    t = recipe.train
    pkg = lowrank_package(t.optim)
    if pkg is None:
        if t.optim_target_modules is not None:
            raise ValueError(f"train.optim_target_modules applies to GaLore/APOLLO optimizers (galore_*, apollo_*), "
                             f"not {t.optim}")
        return
    if t.optim not in LOWRANK_NAMES:
        raise ValueError(f"train.optim: {t.optim!r} is not a GaLore/APOLLO optimizer transformers knows; one of: "
                         f"{', '.join(LOWRANK_NAMES)}")
    if recipe.method.type != "full":
        raise ValueError(f"train.optim: {t.optim} projects the gradients of full weight matrices; it trains with "
                         f"method.type: full, not {recipe.method.type}")
    module, pip_name = pkg
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"train.optim: {t.optim} needs the {pip_name} package: pip install {pip_name} "
                         "(or pip install 'ftkit[lowrank]')")
