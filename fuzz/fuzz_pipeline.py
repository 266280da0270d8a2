"""Fuzz the pipeline loader: YAML bytes -> load_pipeline (references, per-stage set:, every stage validated)."""

from __future__ import annotations

from pathlib import Path

from _harness import REPO, SCRATCH, instrumented, main, seeds

with instrumented("ftkit", "yaml"):
    from ftkit.pipeline import load_pipeline

(SCRATCH / "recipes").mkdir(exist_ok=True)
if not (SCRATCH / "data_templates").exists():
    (SCRATCH / "data_templates").symlink_to(REPO / "data_templates")
for name in ("lora.yaml", "rm.yaml", "rl.yaml", "dpo.yaml"):  # recipe files a pipeline may name
    (SCRATCH / "recipes" / name).write_bytes((REPO / "recipes" / name).read_bytes())
PATH = SCRATCH / "recipes" / "pipe.yaml"


def one(data: bytes) -> None:
    PATH.write_bytes(data)
    load_pipeline(str(PATH))


def write_seeds(out: Path) -> int:
    files = seeds("recipes/pipeline*.yaml")
    for p in files:
        (out / p.name).write_bytes(p.read_bytes())
    (out / "by-file.yaml").write_text("stages:\n  sft: {recipe: lora.yaml, set: {train.max_steps: 2}}\n"
                                      "  dpo: {recipe: dpo.yaml, set: ['model.name=${sft.output}']}\n")
    return len(files) + 1


if __name__ == "__main__":
    main(one, write_seeds)
