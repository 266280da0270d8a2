"""What the rm, dpo, kto, orpo and rl stages share (data, starting model, run dir), and the
offline preference stages themselves: thin adapters onto TRL's DPOTrainer, KTOTrainer and
ORPOTrainer (ORPO lives in trl.experimental in TRL 1.16)."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

from ftkit import optim
from ftkit.data.formats import to_canonical
from ftkit.data.preference import STAGE_FORMAT, check_extra_columns, to_trl_rows
from ftkit.data.sources import read_rows
from ftkit.data.templates import resolve_template
from ftkit.errors import UserError
from ftkit.recipe import Recipe, as_list, resolve_path
from ftkit.rundir import RunDir
from ftkit.stages.common import (attach_progress, default_output_dir, env_versions, finish_run_dir, finite,
                                 peak_memory_mb, setup_hardware, trainer_kwargs, write_json)
from ftkit.stages.start import Start, check_new_adapter, fold_adapters, merge_start_adapter, resolve_start
from ftkit.ui import log

PREFERENCE_STAGES = ("rm", "dpo", "kto", "orpo", "rl")


# ---------------------------------------------------------------------------- checks without a model


def stage_format(recipe: Recipe) -> str:
    want = STAGE_FORMAT[recipe.stage]
    fmt = recipe.data.format
    if fmt == "auto":
        return want
    if fmt != want:
        raise UserError(f"{recipe.where('data', 'format')}: data.format: stage {recipe.stage} reads {want} rows "
                        f"({_FORMAT_HELP[want]}), not {fmt}")
    return fmt


_FORMAT_HELP = {
    "preference": "prompt + chosen + rejected",
    "unpaired": "prompt + completion + label true/false",
    "prompt": "prompt only",
}


def check_stage(recipe: Recipe, produced: set[str] = frozenset()) -> None:
    """Stage-specific checks that load no model. `produced`: paths an earlier pipeline stage will create."""
    stage_format(recipe)
    read_stage_rows(recipe, "train")  # bad rows fail here, before any model loads
    if recipe.data.eval:
        read_stage_rows(recipe, "eval")
    t = recipe.train
    if recipe.stage == "kto" and t.batch_size < 2:
        raise UserError(f"{recipe.where('train', 'batch_size')}: train.batch_size: kto needs at least 2 "
                        "(its KL estimate pairs each row with another row of the same batch)")
    if recipe.stage == "rl":
        from ftkit.stages.rl import check_rl

        check_rl(recipe, produced)


# ---------------------------------------------------------------------------- data


def read_stage_rows(recipe: Recipe, field: str) -> list[dict]:
    fmt = stage_format(recipe)
    rows = []
    for item in as_list(getattr(recipe.data, field)):
        path = resolve_path(item, recipe._source)
        if not path.exists():
            raise UserError(f"{recipe.where('data', field)}: data.{field}: file not found: {item}")
        rows += read_rows(path)
    _, canonical = to_canonical(rows, fmt, recipe.data.columns, None, recipe_where=recipe.where("data", "columns"))
    if fmt == "prompt":
        check_extra_columns(canonical)
    return canonical


@dataclass
class StageData:
    train: object  # datasets.Dataset
    eval: object | None
    conversational: bool
    rows: int
    eval_rows: int
    eval_source: str  # "eval file" | "eval_split" | "none"


def load_stage_data(recipe: Recipe, template: str | None) -> StageData:
    from datasets import Dataset

    from ftkit.data import split_eval

    train_rows = read_stage_rows(recipe, "train")
    if recipe.data.eval:
        eval_rows, source = read_stage_rows(recipe, "eval"), "eval file"
    else:
        train_rows, eval_rows = split_eval(train_rows, recipe.data.eval_split, recipe.train.seed)
        source = "eval_split" if eval_rows else "none"
    conv = template is not None
    train = to_trl_rows(train_rows, conv, recipe.data.system)
    evals = to_trl_rows(eval_rows, conv, recipe.data.system) if eval_rows else []
    return StageData(Dataset.from_list(train), Dataset.from_list(evals) if evals else None,
                     conversational=isinstance(train[0]["prompt"], list), rows=len(train), eval_rows=len(evals),
                     eval_source=source)


# ---------------------------------------------------------------------------- model


@dataclass
class Prepared:
    model: object
    tokenizer: object
    template: str | None
    start: Start
    base_dir: str
    params: dict


def prepare_model(recipe: Recipe, hw, reward_head: bool = False) -> Prepared:
    """The starting model (base, or base + merged SFT adapter) wrapped with the recipe's method."""
    from transformers import set_seed

    from ftkit.methods import apply_method, count_params, weights_dtype
    from ftkit.models import load_causal_lm, load_tokenizer, resolve_model, torch_dtype

    start = resolve_start(recipe)
    m = recipe.model
    base_dir = resolve_model(start.base_name, log=log)
    tok_src = str(start.run_dir) if start.run_dir and (start.run_dir / "tokenizer_config.json").is_file() else base_dir
    tok = load_tokenizer(tok_src, m.trust_remote_code, None if start.run_dir else m.revision)
    template = resolve_template(tok, recipe.data.template, recipe.where("data", "template"))
    if template is not None:
        tok.chat_template = template  # TRL renders conversations with the tokenizer's template
    set_seed(recipe.train.seed)  # the reward head starts random: make it reproducible
    if reward_head:
        from transformers import AutoModelForSequenceClassification

        extra = {"attn_implementation": m.attn_implementation} if m.attn_implementation else {}
        model = AutoModelForSequenceClassification.from_pretrained(
            base_dir, num_labels=1, dtype=torch_dtype(hw.dtype), trust_remote_code=m.trust_remote_code,
            revision=m.revision, **extra)
        model.config.pad_token_id = tok.pad_token_id
    else:
        model = load_causal_lm(base_dir, weights_dtype(base_dir, recipe.method, hw, m.trust_remote_code),
                               trust_remote_code=m.trust_remote_code, revision=m.revision,
                               attn_implementation=m.attn_implementation)
    model = merge_start_adapter(model, start, log=log)
    model = apply_method(model, recipe.method, log=log, task_type="SEQ_CLS" if reward_head else "CAUSAL_LM")
    check_new_adapter(model, start)
    params = count_params(model)
    log(f"trainable params: {params['trainable_params']:,} of {params['total_params']:,} "
        f"({params['trainable_percent']:.2f}%)")
    return Prepared(model, tok, template, start, base_dir, params)


# ---------------------------------------------------------------------------- run dir


def save_run(recipe: Recipe, hw, run_dir: RunDir, work: Path, trainer, prep: Prepared, wall: float,
             metrics: dict) -> Path:
    """Adapter (folded onto the base when starting from a run), tokenizer, recipe, metrics; then commit."""
    model = trainer.model
    from ftkit.lora_init import save_converted

    if save_converted(model, work, selected_adapters=["default"]):
        pass  # a PiSSA/OLoRA adapter, saved as a plain LoRA on the original base
    elif hasattr(model, "peft_config"):
        # DPO/KTO add a "ref" adapter copy for the reference model; only the trained one is the result.
        model.save_pretrained(work, safe_serialization=True, selected_adapters=["default"])
    else:
        model.save_pretrained(work, safe_serialization=True)
    fold = fold_adapters(prep.start.run_dir, work) if prep.start.run_dir is not None else None
    prep.tokenizer.save_pretrained(work)
    (work / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    tokens = trainer.state.num_input_tokens_seen or 0
    full = {
        "stage": recipe.stage,
        "method": recipe.method.type,
        "base_model": prep.start.base_name,
        "base_model_path": prep.base_dir,
        "started_from": fold,
        **metrics,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 4),
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "peak_memory_mb": peak_memory_mb(hw),
        "device": hw.device,
        "precision": hw.dtype,
        "precision_reason": hw.dtype_reason,
        **prep.params,
        "versions": env_versions(),
    }
    write_json(work / "metrics.json", full)
    finish_run_dir(work)
    return run_dir.commit()


def series(history: list[dict], key: str) -> list[float]:
    return [h[key] for h in history if isinstance(h.get(key), (int, float)) and "eval_loss" not in h]


def change(label: str, before, after, spec: str) -> str:
    """' · label a → b' for the done line, or '' when there is nothing to show."""
    if after is None:
        return ""
    return f" · {label} {format(before, spec) + ' → ' if before is not None else ''}{format(after, spec)}"


def free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ---------------------------------------------------------------------------- dpo / kto / orpo


def _trainer_classes(stage: str):
    if stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    if stage == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOConfig, KTOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOConfig, ORPOTrainer


def _stage_args(recipe: Recipe) -> dict:
    p = recipe.preference
    args = {"max_length": recipe.data.max_length, "beta": p.beta}
    if recipe.stage == "dpo":
        args.update(loss_type=[p.loss_type], label_smoothing=p.label_smoothing)
    elif recipe.stage == "kto":
        args.update(desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight)
    if recipe.stage in ("dpo", "kto"):
        args.update(precompute_ref_log_probs=p.precompute_ref_log_probs)
    return args


def _eval_summary(ev: dict) -> dict:
    return {"reward_accuracy": finite(ev.get("eval_rewards/accuracies")),
            "reward_margin": finite(ev.get("eval_rewards/margins")),
            "eval_loss": finite(ev.get("eval_loss"))}


def run(recipe: Recipe, output: str | None = None, overwrite: bool = False) -> Path:
    """dpo, kto or orpo."""
    if recipe.stage not in ("dpo", "kto", "orpo"):
        raise UserError(f"stage {recipe.stage} is not an offline preference stage")
    check_stage(recipe)
    config_cls, trainer_cls = _trainer_classes(recipe.stage)
    run_dir = RunDir(output or default_output_dir(recipe), overwrite=overwrite)
    hw = setup_hardware(recipe)
    prep = prepare_model(recipe, hw)
    data = load_stage_data(recipe, prep.template)
    log(f"data: {data.rows} train rows, {data.eval_rows} eval rows ({data.eval_source}) · "
        f"{'conversations' if data.conversational else 'plain text'}")

    work = run_dir.start()
    args = config_cls(**trainer_kwargs(recipe, hw, work, data.eval is not None), **_stage_args(recipe))
    trainer = trainer_cls(model=prep.model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                          processing_class=prep.tokenizer)
    optim.configure_trainer(trainer, recipe)
    progress = attach_progress(trainer, work / "metrics.jsonl")
    before = _eval_summary(trainer.evaluate()) if data.eval is not None else {}
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    after = _eval_summary(trainer.evaluate()) if data.eval is not None else {}

    acc, margin = series(progress.history, "rewards/accuracies"), series(progress.history, "rewards/margins")
    metrics = {
        "train_loss": finite(result.training_loss),
        "train_reward_accuracy_first": acc[0] if acc else None,
        "train_reward_accuracy_last": acc[-1] if acc else None,
        "train_reward_margin_first": margin[0] if margin else None,
        "train_reward_margin_last": margin[-1] if margin else None,
        "eval_before": before or None,
        "eval_after": after or None,
        "eval_pairs": data.eval_rows,
        "reference_model": "none (orpo needs none)" if recipe.stage == "orpo" else
                           ("the starting run (its adapter merged)" if prep.start.run_dir else "the base model"),
    }
    final = save_run(recipe, hw, run_dir, work, trainer, prep, wall, metrics)
    log(f"[green]done[/] in {wall:.1f}s · {trainer.state.global_step} steps"
        + change("eval reward accuracy", before.get("reward_accuracy"), after.get("reward_accuracy"), ".2f")
        + change("margin", before.get("reward_margin"), after.get("reward_margin"), ".3f")
        + f" · run dir: {final}")
    del trainer, prep
    free_memory()
    return final
