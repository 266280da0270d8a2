"""The stage contract: what a stage module supplies to the one lifecycle (ftkit/stages/lifecycle.py).

A stage is a StageSpec in the registry (light: names, help, data format, headline metrics) plus a
module that supplies only what differs between stages:

    check(recipe, produced)        model-free checks (data rows, stage-specific fields); UserError on bad input
    build(recipe, hw, use_cache)   -> Built: model, tokenizer, datasets, extra trainer arguments
    trainer_classes(recipe)        -> (TRL config class, TRL trainer class)
    config_args(recipe, built)     -> the config's stage-specific fields
    summarize(ctx)                 -> the stage's metrics (merged into metrics.json)
    done_line(metrics)             -> ' · ...' appended to the final log line

and optionally `evaluate(trainer, built, when)` (metrics before and after training) and
`write_samples(recipe, work, model, tokenizer)` (sample generations for the report). A stage that
saves more than the trained adapter or model sets Built.save.
Everything else (run dir, hardware, resume, interrupt checkpoint, OOM and write-error messages,
metrics files, report, gates, commit) belongs to the lifecycle, so every stage has it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable


@dataclass(frozen=True)
class StageSpec:
    name: str
    help: str  # the CLI command's help text
    module: str  # the stage module (imported only when the stage runs or is checked)
    data_format: str | None = None  # the row format it reads (None: sft/pt chat and text formats)
    preference: bool = False  # starts from a base or an earlier run dir and reads preference-style rows
    headline: tuple[tuple[str, str], ...] = ()  # (metric, label) pairs the pipeline summary shows
    speed_levers: bool = False  # train.batch_size: auto, train.liger and train.compile apply
    multi_process: str | None = None  # None: -n N works; else why this stage refuses it

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


@dataclass
class Built:
    """What a stage's build() hands the lifecycle."""

    model: Any
    tokenizer: Any
    train: Any  # a datasets.Dataset
    eval: Any | None
    trainer_args: dict = field(default_factory=dict)  # extra keyword arguments for the trainer class
    base_name: str = ""  # the base model as the user named it
    base_dir: str = ""  # where it was loaded from
    params: dict = field(default_factory=dict)  # count_params()
    info: dict = field(default_factory=dict)  # anything the stage's summarize/save needs later
    save: Callable[[Any, Path], dict | None] | None = None  # writes the weights; returns metrics to add
    callbacks: list = field(default_factory=list)  # extra TrainerCallbacks (e.g. a reward line)


@dataclass
class Context:
    """A run in progress, as the stage's summarize() sees it."""

    recipe: Any
    hw: Any
    built: Built
    trainer: Any
    result: Any  # TrainOutput
    history: list[dict]
    before: dict  # the stage's evaluation before training ({} if none)
    after: dict  # and after
    wall: float
