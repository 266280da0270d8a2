"""Supervised fine-tuning and continued pretraining: a thin adapter from Recipe to TRL's SFTTrainer.

The stage contract (ftkit/stages/base.py): the lifecycle runs it; this module supplies the data,
the model, the config fields and the metrics that are SFT's own.
"""

from __future__ import annotations

from ftkit import speed, varlen
from ftkit.recipe import Recipe
from ftkit.stages.base import Built, Context
from ftkit.ui import log


def check(recipe: Recipe, produced: frozenset[str] = frozenset()) -> None:
    """Nothing beyond the schema and files: bad rows are reported while the data is prepared."""


def trainer_classes(recipe: Recipe):
    from trl import SFTConfig, SFTTrainer

    return SFTConfig, SFTTrainer


def build(recipe: Recipe, hw, use_cache: bool = True) -> Built:
    from ftkit.data import prepare
    from ftkit.distributed_strategy import sharded_load
    from ftkit.methods import apply_method, count_params, load_kwargs, weights_dtype
    from ftkit.models import load_causal_lm, load_tokenizer, resolve_model
    from ftkit.stages.common import world_size

    speed.check_levers(recipe, hw)
    m = recipe.model
    base = resolve_model(m.name, log=log)
    tok = load_tokenizer(base, m.trust_remote_code, m.revision)
    data = prepare(recipe, tok, log=log, cache=use_cache)
    ts = data.train_stats.summary()
    log(f"data: {ts['kept']} train rows ({data.format}), {len(data.eval)} eval rows · "
        f"{ts['trained_tokens']:,} of {ts['tokens']:,} tokens trained ({recipe.data.train_on})")
    if data.template is not None:
        tok.chat_template = data.template  # inference formats prompts exactly as training did
    extra = sharded_load(recipe, load_kwargs(base, recipe.method, hw, m.trust_remote_code), world_size())
    model = load_causal_lm(base, weights_dtype(base, recipe.method, hw, m.trust_remote_code),
                           trust_remote_code=m.trust_remote_code, revision=m.revision,
                           attn_implementation=m.attn_implementation, **extra)
    model = apply_method(model, recipe.method, log=log, tokenizer=tok, base_path=base, train_rows=data.train)
    params = count_params(model)
    log(f"trainable params: {params['trainable_params']:,} of {params['total_params']:,} "
        f"({params['trainable_percent']:.2f}%)")
    train_ds, eval_ds = data.to_datasets()
    fast = speed.sft_levers(recipe, hw, model, ts)
    log(fast.describe())
    # Padding-free batches attend through ftkit's varlen attention while training (ftkit/varlen.py).
    own_attention = varlen.use(model, fast.flat.attention) if fast.flat.enabled else None
    return Built(model, tok, train_ds, eval_ds, base_name=m.name, base_dir=base, params=params,
                 info={"data": data, "fast": fast, "own_attention": own_attention})


def config_args(recipe: Recipe, built: Built) -> dict:
    return dict(
        # Batch size, memory and padding-free levers override the shared TrainingArguments (and max_length:
        # flat rows without packing take none).
        **{"max_length": recipe.data.max_length, **built.info["fast"].kwargs},
        packing=recipe.data.packing,
        # bfd keeps sample boundaries and turns on padding-free batches with per-sample position_ids, from
        # which transformers builds a block-diagonal mask (sdpa/eager) or varlen kernels (flash attention):
        # no sample attends to another one packed beside it.
        packing_strategy="bfd",
        dataset_num_proc=None,
    )


def evaluate(trainer, built: Built, when: str) -> dict:
    if when == "before" or built.eval is None:
        return {}
    return trainer.evaluate()


def after_training(trainer, built: Built) -> None:
    if built.info["own_attention"] is not None:
        varlen.restore(trainer.model, built.info["own_attention"])  # generation and saving see padded batches


def summarize(ctx: Context) -> dict:
    from ftkit.stages.common import finite, world_size

    recipe, trainer, data = ctx.recipe, ctx.trainer, ctx.built.info["data"]
    batch = trainer._train_batch_size  # per device; batch_size: auto may have shrunk it
    return {
        "eval_loss": finite(ctx.after.get("eval_loss")),
        "batch_size": batch,
        "global_batch_size": batch * recipe.train.grad_accum * world_size(),
        "speed": ctx.built.info["fast"].metrics(),
        "packing": {"enabled": recipe.data.packing, "samples": len(ctx.built.train),
                    "rows": len(trainer.train_dataset)},
        "data": {"format": data.format, "train": data.train_stats.summary(), "eval": data.eval_stats.summary(),
                 "cache": data.cache, "sources": data.sources},
    }


def done_line(metrics: dict) -> str:
    first, last, ev = metrics["first_loss"], metrics["last_loss"], metrics["eval_loss"]
    return ((f" · loss {first:.4f} → {last:.4f}" if first is not None and last is not None else "")
            + (f" · eval_loss {ev:.4f}" if ev is not None else ""))


def write_samples(recipe: Recipe, work, model, tok) -> None:
    from ftkit.report import write_samples as write

    write(recipe, work, model, tok, log=log)


def run(recipe: Recipe, output: str | None = None, overwrite: bool = False, resume: str | None = None,
        use_cache: bool = True):
    """Train through the lifecycle (kept for callers that import the stage: bench, quickstart, tests)."""
    from ftkit.stages.lifecycle import run as run_stage

    return run_stage(recipe, output=output, overwrite=overwrite, resume=resume, use_cache=use_cache)
