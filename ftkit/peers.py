"""Keys of peer fine-tuning tools (LLaMA-Factory, axolotl) and the ftkit field each corresponds to.

The recipe loader consults this table when it meets an unknown key, so a recipe copied from a peer
gets the ftkit name in its error; docs/peers.md is generated from the same table:

    python -m ftkit.peers --write docs/peers.md
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

LF, AX = "LLaMA-Factory", "axolotl"


class PeerKey(NamedTuple):
    key: str
    peers: tuple[str, ...]
    field: str  # the ftkit field (dotted path)
    note: str = ""  # how the value translates, when not one-to-one


PEER_KEYS: tuple[PeerKey, ...] = (
    # model
    PeerKey("model_name_or_path", (LF,), "model.name"),
    PeerKey("base_model", (AX,), "model.name"),
    PeerKey("flash_attn", (LF,), "model.attn_implementation", "fa2 -> flash_attention_2, sdpa -> sdpa"),
    PeerKey("flash_attention", (AX,), "model.attn_implementation", "true -> flash_attention_2"),
    PeerKey("bf16", (LF, AX), "model.dtype", "true -> bfloat16 (auto picks it where the hardware has it)"),
    PeerKey("fp16", (LF, AX), "model.dtype", "true -> float16"),
    # method
    PeerKey("finetuning_type", (LF,), "method.type", "lora | full | freeze"),
    PeerKey("adapter", (AX,), "method.type", "lora | qlora"),
    PeerKey("lora_rank", (LF,), "method.r"),
    PeerKey("lora_r", (AX,), "method.r"),
    PeerKey("lora_alpha", (LF, AX), "method.alpha"),
    PeerKey("lora_dropout", (LF, AX), "method.dropout"),
    PeerKey("lora_target", (LF,), "method.target_modules", "a list; `all` -> all-linear"),
    PeerKey("lora_target_modules", (AX,), "method.target_modules"),
    PeerKey("lora_target_linear", (AX,), "method.target_modules", "true -> all-linear"),
    PeerKey("additional_target", (LF,), "method.modules_to_save", "a list, not a comma-separated string"),
    PeerKey("lora_modules_to_save", (AX,), "method.modules_to_save"),
    PeerKey("use_dora", (LF,), "method.use_dora", "or method.type: dora"),
    PeerKey("peft_use_dora", (AX,), "method.use_dora", "or method.type: dora"),
    PeerKey("use_rslora", (LF,), "method.rslora"),
    PeerKey("peft_use_rslora", (AX,), "method.rslora"),
    PeerKey("pissa_init", (LF,), "method.init", "true -> pissa (pissa_iter N -> pissa_niter_N); the adapter is "
            "always converted to a plain LoRA on save (LLaMA-Factory's pissa_convert)"),
    PeerKey("pissa_iter", (LF,), "method.init", "pissa_niter_N"),
    PeerKey("loraplus_lr_ratio", (LF, AX), "method.loraplus_lr_ratio"),
    PeerKey("quantization_bit", (LF,), "method.bits", "with method.type: qlora"),
    PeerKey("load_in_4bit", (AX,), "method.type", "true -> qlora (bits: 4)"),
    PeerKey("load_in_8bit", (AX,), "method.bits", "true -> method.type: qlora with bits: 8"),
    PeerKey("freeze_trainable_layers", (LF,), "method.trainable_layers"),
    PeerKey("freeze_trainable_modules", (LF,), "method.trainable_modules"),
    # data
    PeerKey("dataset", (LF,), "data.train", "file paths or hub ids, not dataset_info.json names"),
    PeerKey("datasets", (AX,), "data.train", "file paths or hub ids; type -> data.format"),
    PeerKey("eval_dataset", (LF,), "data.eval"),
    PeerKey("test_datasets", (AX,), "data.eval"),
    PeerKey("val_size", (LF,), "data.eval_split"),
    PeerKey("val_set_size", (AX,), "data.eval_split"),
    PeerKey("cutoff_len", (LF,), "data.max_length"),
    PeerKey("sequence_len", (AX,), "data.max_length"),
    PeerKey("sample_packing", (AX,), "data.packing"),
    PeerKey("chat_template", (AX,), "data.template"),
    PeerKey("train_on_prompt", (LF,), "data.train_on", "true -> all"),
    PeerKey("train_on_inputs", (AX,), "data.train_on", "true -> all"),
    PeerKey("default_system", (LF,), "data.system"),
    # train
    PeerKey("num_train_epochs", (LF,), "train.epochs"),
    PeerKey("num_epochs", (AX,), "train.epochs"),
    PeerKey("per_device_train_batch_size", (LF,), "train.batch_size"),
    PeerKey("micro_batch_size", (AX,), "train.batch_size"),
    PeerKey("gradient_accumulation_steps", (LF, AX), "train.grad_accum"),
    PeerKey("lr_scheduler_type", (LF,), "train.lr_scheduler"),
    PeerKey("lr_scheduler", (AX,), "train.lr_scheduler"),
    PeerKey("optimizer", (AX,), "train.optim", "transformers' optimizer names"),
    PeerKey("gradient_checkpointing", (LF, AX), "train.activation_checkpointing"),
    PeerKey("neftune_noise_alpha", (LF, AX), "train.neftune_noise_alpha"),
    PeerKey("use_galore", (LF,), "train.optim", "true -> galore_adamw (with method.type: full)"),
    PeerKey("galore_target", (LF,), "train.optim_target_modules"),
    PeerKey("use_apollo", (LF,), "train.optim", "true -> apollo_adamw (with method.type: full)"),
    PeerKey("apollo_target", (LF,), "train.optim_target_modules"),
    PeerKey("enable_liger_kernel", (LF,), "train.liger"),
    PeerKey("output_dir", (LF, AX), "output.dir"),
    PeerKey("wandb_project", (AX,), "train.report_to", "wandb (the project comes from WANDB_PROJECT)"),
    PeerKey("deepspeed", (LF, AX), "distributed", "deepspeed (ZeRO-2 settings built in)"),
    PeerKey("fsdp", (AX,), "distributed", "fsdp"),
    # preference / rl
    PeerKey("rl", (AX,), "stage", "dpo | kto | orpo | grpo -> rl | simpo -> cpo with preference.loss_type: simpo"),
    PeerKey("pref_beta", (LF,), "preference.beta"),
    PeerKey("rl_beta", (AX,), "preference.beta"),
    PeerKey("pref_loss", (LF,), "preference.loss_type", "simpo -> stage: cpo with loss_type: simpo"),
    PeerKey("dpo_label_smoothing", (LF,), "preference.label_smoothing"),
    PeerKey("kto_chosen_weight", (LF,), "preference.desirable_weight"),
    PeerKey("kto_rejected_weight", (LF,), "preference.undesirable_weight"),
    PeerKey("cpo_alpha", (AX,), "preference.cpo_alpha"),
    PeerKey("simpo_gamma", (LF, AX), "preference.simpo_gamma"),
    PeerKey("reward_model", (LF,), "rl.reward_model"),
)

_BY_KEY = {}
for _pk in PEER_KEYS:
    _BY_KEY.setdefault(_pk.key, _pk)


def lookup(key: str) -> PeerKey | None:
    return _BY_KEY.get(key)


def hint(key: str) -> str:
    """'; lora_rank (LLaMA-Factory) is method.r in ftkit.' for a peer key, else ''."""
    pk = lookup(key)
    if pk is None:
        return ""
    return (f"; {key} ({', '.join(pk.peers)}) is {pk.field} in ftkit"
            + (f" ({pk.note})" if pk.note else "") + ".")


BEGIN, END = "<!-- peer-keys:begin -->", "<!-- peer-keys:end -->"

_INTRO = """# Coming from LLaMA-Factory or axolotl

ftkit reads one nested recipe (`stage`, `model`, `method`, `data`, `train`, `preference`, `rl`,
`output`); unknown keys are errors. When a recipe uses one of the keys below, the error names the
ftkit field instead. The table is generated from `ftkit/peers.py`
(`python -m ftkit.peers --write docs/peers.md`).

"""


def table() -> str:
    rows = ["| peer key | used by | ftkit field | note |", "|---|---|---|---|"]
    for pk in sorted(PEER_KEYS, key=lambda p: (p.field, p.key)):
        rows.append(f"| `{pk.key}` | {', '.join(pk.peers)} | `{pk.field}` | {pk.note.replace('|', chr(92) + '|')} |")
    return f"{BEGIN}\n" + "\n".join(rows) + f"\n{END}\n"


def document() -> str:
    return _INTRO + table()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        Path(sys.argv[2]).write_text(document(), encoding="utf-8")
        print(f"wrote {sys.argv[2]}")
    else:
        print(document())
