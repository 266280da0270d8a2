"""Fuzz --set items: each line of the input is one item (bytes as a shell would pass them), over a shipped recipe."""

from __future__ import annotations

import os
from pathlib import Path

from _harness import instrumented, main

with instrumented("ftkit", "yaml"):
    from ftkit.recipe import load_recipe



def one(data: bytes) -> None:
    # Arguments reach Python decoded with surrogateescape: undecodable bytes survive as lone surrogates.
    items = [os.fsdecode(line) for line in data.split(b"\n")[:16]]
    recipe = load_recipe(None, items)  # onto the defaults: no file to read, so many more inputs per second
    recipe.to_yaml()


def write_seeds(out: Path) -> int:
    items = ["train.epochs=1", "method.r=8\nmethod.alpha=16", "data.columns={instruction: q, output: a}",
             "method.type=dora", "train.learning_rate=1e-4\ntrain.lr_scheduler=cosine", "data.train=[a.jsonl, b.jsonl]",
             "stage=dpo\ndata.format=preference", "model.name=smollm2-135m-instruct", "output.dir=runs/x",
             "train.max_steps=10\ntrain.batch_size=auto", "gates=[{metric: eval_loss, max: 2}]"]
    for i, text in enumerate(items):
        (out / f"set-{i}").write_text(text, encoding="utf-8")
    return len(items)


if __name__ == "__main__":
    main(one, write_seeds)
