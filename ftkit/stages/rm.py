"""Reward model: a sequence-classification head (one output) on a causal LM, trained on
preference pairs with TRL's RewardTrainer; plus loading, scoring and merging such a model."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ftkit import optim
from ftkit.atomic import publish, staged_dir
from ftkit.errors import UserError, VerificationFailed
from ftkit.recipe import Recipe
from ftkit.rundir import RunDir
from ftkit.stages.common import attach_progress, default_output_dir, finite, setup_hardware, trainer_kwargs
from ftkit.stages.preference import (change, check_stage, free_memory, load_stage_data, prepare_model, save_run,
                                     series)
from ftkit.ui import log


def _pairwise(ev: dict) -> dict:
    return {"pairwise_accuracy": finite(ev.get("eval_accuracy")), "mean_margin": finite(ev.get("eval_margin")),
            "loss": finite(ev.get("eval_loss"))}


def run(recipe: Recipe, output: str | None = None, overwrite: bool = False) -> Path:
    from trl import RewardConfig, RewardTrainer

    check_stage(recipe)
    run_dir = RunDir(output or default_output_dir(recipe), overwrite=overwrite)
    hw = setup_hardware(recipe)
    prep = prepare_model(recipe, hw, reward_head=True)
    data = load_stage_data(recipe, prep.template)
    eval_ds, eval_on = (data.eval, "eval pairs") if data.eval is not None else (data.train, "train pairs")
    log(f"data: {data.rows} train pairs, {data.eval_rows} eval pairs ({data.eval_source}) · "
        f"{'conversations' if data.conversational else 'plain text'}")
    if data.eval is None:
        log("[yellow]note:[/] no eval pairs (data.eval or data.eval_split): accuracy is measured on the "
            "training pairs, which says little about generalisation")

    work = run_dir.start()
    args = RewardConfig(**trainer_kwargs(recipe, hw, work, data.eval is not None), max_length=recipe.data.max_length,
                        center_rewards_coefficient=recipe.preference.center_rewards)
    trainer = RewardTrainer(model=prep.model, args=args, train_dataset=data.train, eval_dataset=eval_ds,
                            processing_class=prep.tokenizer)
    optim.configure_trainer(trainer, recipe)
    kept = len(trainer.train_dataset)
    if kept == 0:
        raise UserError(f"{recipe.where('data', 'max_length')}: every train pair is longer than "
                        f"data.max_length={recipe.data.max_length} tokens (TRL drops those); raise it")
    if kept < data.rows:
        log(f"[yellow]warning:[/] {data.rows - kept} of {data.rows} train pairs dropped: longer than "
            f"data.max_length={recipe.data.max_length} tokens")
    progress = attach_progress(trainer, work / "metrics.jsonl")
    before = _pairwise(trainer.evaluate())
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    after = _pairwise(trainer.evaluate())
    acc = series(progress.history, "accuracy")
    metrics = {
        "train_loss": finite(result.training_loss),
        "pairwise_accuracy_before": before["pairwise_accuracy"],
        "pairwise_accuracy_after": after["pairwise_accuracy"],
        "mean_margin_before": before["mean_margin"],
        "mean_margin_after": after["mean_margin"],
        "accuracy_measured_on": eval_on,
        "eval_pairs": len(eval_ds),
        "train_pairs": kept,
        "train_accuracy_first": acc[0] if acc else None,
        "train_accuracy_last": acc[-1] if acc else None,
    }
    final = save_run(recipe, hw, run_dir, work, trainer, prep, wall, metrics)
    log(f"[green]done[/] in {wall:.1f}s · {trainer.state.global_step} steps"
        + change(f"pairwise accuracy ({eval_on})", before["pairwise_accuracy"], after["pairwise_accuracy"], ".2f")
        + change("mean margin", before["mean_margin"], after["mean_margin"], ".3f")
        + f" · run dir: {final}")
    del trainer, prep
    free_memory()
    return final


# ---------------------------------------------------------------------------- use


def is_reward_adapter(path: Path) -> bool:
    cfg = path / "adapter_config.json"
    return cfg.is_file() and json.loads(cfg.read_text(encoding="utf-8")).get("task_type") == "SEQ_CLS"


def load_reward_model(target: str, dtype: str = "float32", log=print):
    """(model, tokenizer) for an rm run dir (base + adapter, merged in memory) or a merged reward model dir."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ftkit.inference import adapter_base_name, is_adapter_dir, run_trust_remote_code
    from ftkit.models import load_tokenizer, resolve_model, torch_dtype
    from ftkit.ui import quiet_libraries

    quiet_libraries()
    path = Path(target).expanduser()
    if not path.is_dir():
        raise UserError(f"{target}: not a directory (expected an rm run dir or a merged reward model dir)")
    trust = run_trust_remote_code(path)
    if is_adapter_dir(path):
        if not is_reward_adapter(path):
            raise UserError(f"{target}: a causal-LM adapter, not a reward model; train one with ftkit rm")
        from peft import PeftModel

        base_dir = resolve_model(adapter_base_name(path), log=log)
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch_dtype(dtype),
                                                                   trust_remote_code=trust)
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        tok = load_tokenizer(str(path) if (path / "tokenizer_config.json").is_file() else base_dir, trust)
    elif (path / "config.json").is_file():
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        archs = getattr(cfg, "architectures", None) or []
        if not any(a.endswith("ForSequenceClassification") for a in archs) or cfg.num_labels != 1:
            raise UserError(f"{target}: not a reward model (architectures {archs}, num_labels {cfg.num_labels}); "
                            "expected a sequence classifier with one output")
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype(dtype),
                                                                   trust_remote_code=trust)
        tok = load_tokenizer(str(path), trust)
    else:
        raise UserError(f"{target}: neither an rm run dir (adapter_config.json) nor a model dir (config.json)")
    model.config.pad_token_id = tok.pad_token_id
    model.eval()
    return model, tok


def encode(tok, prompt: str, response: str, system: str | None = None) -> list[int]:
    """Token ids exactly as the RewardTrainer built them: the chat template, else prompt + response + EOS."""
    if getattr(tok, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    text = prompt + response
    if tok.eos_token and not text.endswith(tok.eos_token):
        text += tok.eos_token
    return list(tok(text=text)["input_ids"])


def score(model, tok, pairs: list[tuple[str, str]], system: str | None = None) -> list[float]:
    import torch

    out = []
    with torch.no_grad():
        for prompt, response in pairs:  # one at a time: no padding to get wrong
            ids = torch.tensor([encode(tok, prompt, response, system)], device=model.device)
            out.append(float(model(input_ids=ids).logits[0, 0]))
    return out


PROBES = [("What is the capital of France?", "Paris."), ("Say something kind.", "You are doing great!"),
          ("Write a haiku.", "Autumn moonlight / a worm digs silently / into the chestnut.")]


def merge_reward_model(src: Path, output: str, base: str | None = None, dtype: str = "auto",
                       overwrite: bool = False, log=print) -> dict:
    """Fold an rm run's LoRA into its base classifier; verify scores before and after saving."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from ftkit.merge import TOLERANCE, merge_inputs
    from ftkit.models import torch_dtype
    from ftkit.ui import quiet_libraries

    quiet_libraries()
    out, base_name, base_dir, dtype, trust, tok = merge_inputs(src, output, base, dtype, overwrite, log)
    log(f"merging reward model {src} into {base_name} ({dtype})")
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch_dtype(dtype),
                                                               trust_remote_code=trust)
    model.config.pad_token_id = tok.pad_token_id
    model = PeftModel.from_pretrained(model, str(src))
    model.eval()
    ref = score(model, tok, PROBES)
    merged = model.merge_and_unload()
    with staged_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        del merged, model
        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp, dtype=torch_dtype(dtype),
                                                                      trust_remote_code=trust)
        reloaded.eval()
        diff = max(abs(a - b) for a, b in zip(score(reloaded, tok, PROBES), ref))
        tol = TOLERANCE[dtype]
        report = {"max_abs_score_diff": diff, "tolerance": tol, "dtype": dtype, "base": base_name,
                  "adapter": str(src), "kind": "reward model (AutoModelForSequenceClassification, num_labels 1)"}
        (tmp / "ftkit_merge.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if not diff <= tol:
            raise VerificationFailed(f"merged reward model scores differ from base+adapter by {diff:.3g} > {tol:g} "
                                     f"({dtype}); nothing written to {out}")
        publish(tmp, out)
    log(f"verified: max |score diff| merged vs base+adapter = {diff:.2e} (tolerance {tol:g}, {dtype})")
    log(f"[green]merged reward model:[/] {out} (loads with AutoModelForSequenceClassification)")
    return report
