"""LoRA initialisations beyond peft's default (method.init): what LoraConfig gets, the work done right
after wrapping (PiSSA/OLoRA snapshot, EVA data pass, LoftQ), and the save that turns a PiSSA/OLoRA
adapter back into a plain LoRA on the original base.

PiSSA and OLoRA move the principal part of each adapted weight into the adapter, so the base held in
memory while training is a residual, not the model on disk. peft's remedy: save the adapter as it was
initialised, and at the end save `trained - initial` as one rank-2r LoRA (A = [A; A0], B = [B, -B0]),
which applies to the original base; merge-lora and `generate RUN` then need nothing special.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from ftkit.errors import UserError
from ftkit.knob_rules import RESIDUAL_INITS, init_kind

_SNAPSHOT_ATTR = "_ftkit_initial_adapter"
EVA_BATCH_SIZE = 8


def config_kwargs(method) -> dict:
    """LoraConfig kwargs for method.init (rank/alpha patterns included)."""
    kw = {}
    if method.rank_pattern:
        kw["rank_pattern"] = dict(method.rank_pattern)
    if method.alpha_pattern:
        kw["alpha_pattern"] = dict(method.alpha_pattern)
    kind = init_kind(method.init)
    if kind == "eva":
        from peft import EvaConfig

        # Every non-padding token's layer input counts, prompt tokens too: they are what the layers see.
        kw.update(init_lora_weights="eva", eva_config=EvaConfig(use_label_mask=False))
    elif kind not in ("default", "loftq"):  # loftq replaces the weights after wrapping (see after_wrap)
        kw["init_lora_weights"] = method.init
    return kw


def describe(method) -> str:
    return "" if method.init == "default" else f" · init {method.init}"


def check_device(method, device: str) -> None:
    """Before any weight loads: peft computes LoftQ with bitsandbytes on CUDA (or XPU) only."""
    if init_kind(method.init) == "loftq" and device != "cuda":
        import importlib.metadata as md

        raise UserError(f"method.init: loftq runs on a CUDA GPU only (peft {md.version('peft')} quantizes and "
                        f"decomposes each weight there); this run is on {device}. Use init: pissa or default "
                        "here, or run on a GPU")


def after_wrap(model, method, log, base_path: str | None = None, train_rows=None, pad_id: int | None = None):
    """The init work that needs the wrapped model: returns the model."""
    kind = init_kind(method.init)
    if kind in RESIDUAL_INITS:
        _snapshot(model)
        log(f"{kind}: the base now holds the residual weights; the adapter is saved as a rank-{2 * method.r} "
            "LoRA on the original base")
    elif kind == "eva":
        if not train_rows:
            raise UserError("method.init: eva needs the recipe's tokenized training rows (stages sft and pt)")
        _eva(model, train_rows, pad_id, log)
    elif kind == "loftq":
        from peft import replace_lora_weights_loftq

        if base_path is None or not (Path(base_path) / "model.safetensors").exists() and \
                not (Path(base_path) / "model.safetensors.index.json").exists():
            raise UserError(f"method.init: loftq reads the full-precision weights from the base's safetensors, "
                            f"and {base_path} has none")
        replace_lora_weights_loftq(model, model_path=str(base_path))
        log("loftq: LoRA initialised to cancel the 4-bit quantization error of each adapted weight")
    return model


def _snapshot(model) -> None:
    """Save the freshly initialised adapter for the conversion at save time."""
    tmp = tempfile.mkdtemp(prefix="ftkit-initial-adapter-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    cfg = model.peft_config["default"]
    init = cfg.init_lora_weights
    # Saved as a plain LoRA (peft's documented recipe), so loading it does not run the SVD again.
    cfg.init_lora_weights = True
    try:
        model.save_pretrained(tmp, safe_serialization=True)
    finally:
        cfg.init_lora_weights = init
    setattr(model, _SNAPSHOT_ATTR, tmp)


def _eva(model, rows, pad_id: int | None, log) -> None:
    from peft import initialize_lora_eva_weights

    batches = list(eva_batches(rows, pad_id or 0, model.device))
    before = sum(p.numel() for p in model.parameters() if p.requires_grad)
    initialize_lora_eva_weights(model, dataloader=batches, show_progress_bar=False)
    after = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"eva: LoRA initialised from the SVD of the layers' inputs on {len(rows)} training rows "
        f"({len(batches)} batches); ranks redistributed, trainable params {before:,} -> {after:,}")


def eva_batches(rows, pad_id: int, device, batch_size: int = EVA_BATCH_SIZE):
    """Padded input_ids/attention_mask batches of tokenized rows (peft iterates them until the SVDs converge)."""
    import torch

    rows = list(rows)
    for i in range(0, len(rows), batch_size):
        chunk = [list(r["input_ids"]) for r in rows[i:i + batch_size]]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, seq in enumerate(chunk):
            ids[j, :len(seq)] = torch.tensor(seq)
            mask[j, :len(seq)] = 1
        yield {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def save_converted(model, out_dir, is_main: bool = True, **kw) -> bool:
    """Save a PiSSA/OLoRA adapter as a plain LoRA on the original base; False when the model has none."""
    initial = getattr(model, _SNAPSHOT_ATTR, None)
    if initial is None:
        return False
    if is_main:
        model.save_pretrained(out_dir, safe_serialization=True, path_initial_model_for_weight_conversion=initial,
                              **kw)
    return True

