"""What the stages that read preference-style rows share (rm, dpo, kto, orpo, rl): their row format,
their data as TRL datasets, the starting model (a base, or an earlier run dir merged in) wrapped with
the recipe's method, and saving the trained adapter folded onto the original base."""

from __future__ import annotations

from dataclasses import dataclass

from ftkit.errors import UserError
from ftkit.recipe import Recipe
from ftkit.stages.base import Built
from ftkit.stages.registry import get
from ftkit.stages.start import check_new_adapter, fold_adapters, merge_start_adapter, resolve_start
from ftkit.ui import log

FORMAT_HELP = {
    "preference": "prompt + chosen + rejected",
    "unpaired": "prompt + completion + label true/false",
    "prompt": "prompt only",
}


def stage_format(recipe: Recipe) -> str:
    want = get(recipe.stage).data_format
    fmt = recipe.data.format
    if fmt == "auto":
        return want
    if fmt != want:
        raise UserError(f"{recipe.where('data', 'format')}: data.format: stage {recipe.stage} reads {want} rows "
                        f"({FORMAT_HELP[want]}), not {fmt}")
    return fmt


def read_stage_rows(recipe: Recipe, field: str) -> list[dict]:
    """data.train or data.eval as canonical rows of the stage's format (the data layer's one reader)."""
    from ftkit.data import read_canonical
    from ftkit.data.preference import check_extra_columns

    fmt = stage_format(recipe)
    _, rows = read_canonical(recipe, field, fmt)
    if fmt == "prompt":
        check_extra_columns(rows)
    return rows


def check_rows(recipe: Recipe) -> None:
    """Bad rows fail here, before any model loads."""
    read_stage_rows(recipe, "train")
    if recipe.data.eval:
        read_stage_rows(recipe, "eval")


@dataclass
class StageData:
    train: list[dict]  # TRL rows
    eval: list[dict]
    conversational: bool
    eval_source: str  # "eval file" | "eval_split" | "none"


def load_stage_data(recipe: Recipe, template: str | None) -> StageData:
    from ftkit.data import split_eval
    from ftkit.data.preference import to_trl_rows

    train_rows = read_stage_rows(recipe, "train")
    if recipe.data.eval:
        eval_rows, source = read_stage_rows(recipe, "eval"), "eval file"
    else:
        train_rows, eval_rows = split_eval(train_rows, recipe.data.eval_split, recipe.train.seed)
        source = "eval_split" if eval_rows else "none"
    conv = template is not None
    train = to_trl_rows(train_rows, conv, recipe.data.system)
    evals = to_trl_rows(eval_rows, conv, recipe.data.system) if eval_rows else []
    return StageData(train, evals, isinstance(train[0]["prompt"], list), source)


def drop_long_prompts(recipe: Recipe, tok, rows: list[dict], name: str) -> list[dict]:
    """Rows whose prompt alone fills data.max_length leave no room for a reply: drop them, and say so."""
    limit = recipe.data.max_length

    def length(prompt) -> int:
        if isinstance(prompt, list):
            return len(tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"])
        return len(tok(text=prompt)["input_ids"])

    kept = [r for r in rows if length(r["prompt"]) < limit]
    if rows and not kept and name == "train":
        raise UserError(f"{recipe.where('data', 'max_length')}: no training rows left: every prompt fills "
                        f"data.max_length={limit} tokens on its own; raise it")
    if len(kept) < len(rows):
        log(f"[yellow]warning:[/] {len(rows) - len(kept)} of {len(rows)} {name} rows dropped: their prompt fills "
            f"data.max_length={limit} tokens")
    return kept


def _load_model(recipe: Recipe, hw, base_dir: str, tok, reward_head: bool):
    from ftkit.methods import weights_dtype
    from ftkit.models import load_causal_lm, torch_dtype

    m = recipe.model
    if not reward_head:
        return load_causal_lm(base_dir, weights_dtype(base_dir, recipe.method, hw, m.trust_remote_code),
                              trust_remote_code=m.trust_remote_code, revision=m.revision,
                              attn_implementation=m.attn_implementation)
    from transformers import AutoModelForSequenceClassification

    extra = {"attn_implementation": m.attn_implementation} if m.attn_implementation else {}
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=1, dtype=torch_dtype(hw.dtype), trust_remote_code=m.trust_remote_code,
        revision=m.revision, **extra)
    model.config.pad_token_id = tok.pad_token_id
    return model


def build(recipe: Recipe, hw, reward_head: bool = False, drop_long: bool = False) -> Built:
    """The starting model (base, or base + merged earlier adapter) with the method, and the stage's data."""
    from datasets import Dataset
    from transformers import set_seed

    from ftkit.data.templates import resolve_template
    from ftkit.methods import apply_method, count_params
    from ftkit.models import load_tokenizer, resolve_model

    start = resolve_start(recipe)
    m = recipe.model
    base_dir = resolve_model(start.base_name, log=log)
    tok_src = str(start.run_dir) if start.run_dir and (start.run_dir / "tokenizer_config.json").is_file() else base_dir
    tok = load_tokenizer(tok_src, m.trust_remote_code, None if start.run_dir else m.revision)
    template = resolve_template(tok, recipe.data.template, recipe.where("data", "template"))
    if template is not None:
        tok.chat_template = template  # TRL renders conversations with the tokenizer's template
    data = load_stage_data(recipe, template)
    if drop_long:
        data.train = drop_long_prompts(recipe, tok, data.train, "train")
        data.eval = drop_long_prompts(recipe, tok, data.eval, "eval")
    log(f"data: {len(data.train)} train rows, {len(data.eval)} eval rows ({data.eval_source}) · "
        f"{'conversations' if data.conversational else 'plain text'}")
    set_seed(recipe.train.seed)  # a reward head starts random: make it reproducible
    model = merge_start_adapter(_load_model(recipe, hw, base_dir, tok, reward_head), start, log=log)
    model = apply_method(model, recipe.method, log=log, task_type="SEQ_CLS" if reward_head else "CAUSAL_LM")
    check_new_adapter(model, start)
    params = count_params(model)
    log(f"trainable params: {params['trainable_params']:,} of {params['total_params']:,} "
        f"({params['trainable_percent']:.2f}%)")
    return Built(model, tok, Dataset.from_list(data.train), Dataset.from_list(data.eval) if data.eval else None,
                 base_name=start.base_name, base_dir=base_dir, params=params,
                 info={"start": start, "data": data}, save=lambda trainer, work: save_adapter(trainer, work, start))


def save_adapter(trainer, work, start) -> dict:
    """The trained adapter only (DPO/KTO add a "ref" copy for the reference model), folded onto the
    original base when the run started from another run dir."""
    from ftkit.lora_init import save_converted
    from ftkit.ui import is_main_process

    model = trainer.model
    if not is_main_process():
        return {"started_from": None}
    if save_converted(model, work, selected_adapters=["default"]):
        pass  # a PiSSA/OLoRA adapter, saved as a plain LoRA on the original base
    elif hasattr(model, "peft_config"):
        model.save_pretrained(work, safe_serialization=True, selected_adapters=["default"])
    else:
        model.save_pretrained(work, safe_serialization=True)
    return {"started_from": fold_adapters(start.run_dir, work) if start.run_dir is not None else None}


def series(history: list[dict], key: str) -> list[float]:
    return [h[key] for h in history if isinstance(h.get(key), (int, float)) and "eval_loss" not in h]


def change(label: str, before, after, spec: str) -> str:
    """' · label a → b' for the done line, or '' when there is nothing to show."""
    if after is None:
        return ""
    return f" · {label} {format(before, spec) + ' → ' if before is not None else ''}{format(after, spec)}"


def reference_model(built: Built) -> str:
    return ("the starting run (its adapter merged)" if built.info["start"].run_dir else "the base model")
