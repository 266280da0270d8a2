"""`ftkit init`: a minimal, commented starter recipe for one stage, with a data file that exists.

A starter must validate the moment it is written, wherever it is written: its data path is
relative to the recipe (the loader looks beside the recipe), and when the user names no data
file a few sample rows in the stage's format are written next to it, to be replaced.
"""

from __future__ import annotations

import json
from pathlib import Path

from ftkit.errors import UserError

_CHAT = [
    ("What is the capital of France?", "Paris."),
    ("Give me a synonym for 'happy'.", "Joyful."),
    ("How many legs does a spider have?", "Eight."),
    ("Translate 'thank you' into Spanish.", "Gracias."),
]

# Per stage: what the data rows look like (the format ftkit detects from their keys).
_SAMPLES = {
    "sft": [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in _CHAT],
    "pt": [{"text": f"{q} {a}"} for q, a in _CHAT],
    "rm": [{"prompt": q, "chosen": a, "rejected": "I don't know."} for q, a in _CHAT],
    "kto": [row for q, a in _CHAT for row in ({"prompt": q, "completion": a, "label": True},
                                              {"prompt": q, "completion": "I don't know.", "label": False})],
    "rl": [{"prompt": q} for q, _ in _CHAT],
}
for _pair_stage in ("dpo", "orpo", "cpo"):
    _SAMPLES[_pair_stage] = _SAMPLES["rm"]

_FORMAT_NOTE = {
    "sft": "chat rows {messages: [{role, content}, ...]}; alpaca, sharegpt, CSV ... work too (docs/data.md)",
    "pt": "raw text rows {text: ...}; .txt files work too",
    "rm": "preference pairs {prompt, chosen, rejected}",
    "dpo": "preference pairs {prompt, chosen, rejected}",
    "orpo": "preference pairs {prompt, chosen, rejected}",
    "cpo": "preference pairs {prompt, chosen, rejected}",
    "kto": "rated replies {prompt, completion, label: true|false}",
    "rl": "prompts {prompt}; replies are sampled and scored while training",
}

_STAGE_EXTRA = {
    "dpo": "preference: {beta: 0.1}                   # pull towards the reference model\n",
    "orpo": "preference: {beta: 0.1}                   # weight of the odds-ratio term\n",
    "kto": "preference: {beta: 0.1}\n",
    "cpo": "preference: {loss_type: simpo, cpo_alpha: 0.0}   # SimPO; loss_type: sigmoid with cpo_alpha 1 is CPO\n",
    "rl": ("rl:\n"
           "  algorithm: grpo                          # grpo | rloo\n"
           "  rewards:                                 # or reward_model: runs/rm (an rm run dir)\n"
           "    - {type: length, target_chars: 40}     # 1 at 40 characters, 0 at 0 and 80\n"
           "  num_generations: 4                       # replies per prompt; batch_size must be a multiple\n"),
}


def recipe_text(stage: str, train: str) -> str:
    """The starter recipe's YAML, with a comment on each line a newcomer will want to change."""
    batch = 4 if stage != "rl" else 8
    return (
        f"# ftkit {stage} recipe. Check it: ftkit validate <this file>; run it: ftkit {stage} <this file>\n"
        "# Every field not written here has a default: `ftkit validate --print` shows them all,\n"
        "# README.md#recipe-reference explains each.\n"
        f"stage: {stage}\n"
        "model:\n"
        "  name: smollm2-135m-instruct              # an alias, a hub id (org/name) or a local model dir\n"
        "method:\n"
        "  type: lora                               # lora | qlora | dora | prefix | prompt | full | freeze\n"
        "  r: 16                                    # adapter rank: more = more capacity and memory\n"
        "data:\n"
        f"  train: {json.dumps(train)}" + " " * max(1, 33 - len(json.dumps(train))) + f"# {_FORMAT_NOTE[stage]}\n"
        "  max_length: 512                          # tokens per sample; longer ones are truncated\n"
        "train:\n"
        "  epochs: 1\n"
        "  learning_rate: 2.0e-4\n"
        f"  batch_size: {batch}\n"
        + _STAGE_EXTRA.get(stage, "")
    )


def write_starter(path: str, stage: str, train: str | None, force: bool) -> list[Path]:
    """Write the recipe (and sample data when no --train is given); returns the files written."""
    recipe = Path(path)
    if recipe.suffix not in (".yaml", ".yml"):
        raise UserError(f"{path}: a recipe is a .yaml file; try `ftkit init {recipe.with_suffix('.yaml')}`")
    sample = recipe.with_name(f"{recipe.stem}_data.jsonl") if train is None else None
    targets = [recipe] + ([sample] if sample else [])
    clash = [str(p) for p in targets if p.exists()]
    if clash and not force:
        raise UserError(f"{', '.join(clash)} exists; pass --force to overwrite, or name another file")
    if train is not None and not Path(train).exists() and not (recipe.parent / train).exists():
        raise UserError(f"--train {train}: file not found (give a path from here or from the recipe's folder, "
                        "or leave --train out to get a sample file)")
    recipe.parent.mkdir(parents=True, exist_ok=True)
    if sample is not None:
        sample.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in _SAMPLES[stage]),
                          encoding="utf-8")
        train = sample.name  # relative: the loader looks beside the recipe
    recipe.write_text(recipe_text(stage, train), encoding="utf-8")
    return targets


def starter_stages() -> list[str]:
    """The stages a starter can be written for: every registered stage with sample rows."""
    from ftkit.stages.registry import STAGES

    return [s for s in STAGES if s in _SAMPLES]
