"""The recipe schema (single source of truth) and its loader.

Errors point at the recipe's file:line: the YAML is composed once with SafeLoader to
record where each key sits, then loaded with the bounded ftkit/safe_yaml.py for the values.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveInt, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from ftkit import knob_rules, peers, safe_yaml
from ftkit.choices import DATA_FORMATS, DTYPES
from ftkit.errors import UserError
from ftkit.stages.registry import STAGE_NAMES, STAGES as _SPECS

STAGES = STAGE_NAMES  # one entry per stage in ftkit/stages/registry.py


class _Strict(BaseModel):
    # Misspelled keys are errors, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Strict):
    name: str = Field(
        "smollm2-135m-instruct",
        description="built-in alias, hub id, local HF dir, or path to a .gguf file",
    )
    dtype: Literal[DTYPES] = Field(  # type: ignore[valid-type]
        "auto", description="auto picks from the hardware: fp32 on CPUs without bf16, bf16/fp16 on GPUs"
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="run code shipped with a hub model; off unless asked")
    attn_implementation: str | None = Field(None, description="eager | sdpa | flash_attention_2 ... (None: transformers' default)")


METHODS = ("lora", "dora", "qlora", "prefix", "prompt", "full", "freeze")

# Which method.type each field means something for; setting it for another type is an error,
# because a silently ignored knob reads as "I tuned that" when nothing changed.
_METHOD_FIELDS = {
    ("r", "alpha", "dropout", "target_modules", "rslora", "use_dora", "modules_to_save", "init", "loraplus_lr_ratio",
     "rank_pattern", "alpha_pattern"): ("lora", "dora", "qlora"),
    ("bits",): ("qlora",),
    ("num_virtual_tokens",): ("prefix", "prompt"),
    ("prefix_projection", "encoder_hidden_size"): ("prefix",),
    ("prompt_init", "prompt_init_text"): ("prompt",),
    ("trainable_layers", "trainable_modules"): ("freeze",),
}


class MethodSection(_Strict):
    type: Literal[METHODS] = Field(  # type: ignore[valid-type]
        "lora", description="lora | dora | qlora | prefix | prompt | full | freeze")
    # LoRA family (lora, dora, qlora)
    r: int = Field(16, gt=0, description="LoRA rank")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    target_modules: Union[Literal["auto", "all-linear"], list[str]] = Field(
        "auto", description="auto (attention + MLP projections), all-linear, or a list of module names"
    )
    rslora: bool = Field(False, description="rank-stabilized LoRA: scale = alpha / sqrt(r)")
    use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA (also `type: dora`)")
    modules_to_save: list[str] = Field(
        default_factory=list, description="modules trained in full and saved with the adapter (e.g. lm_head)")
    init: str = Field(
        "default", description="LoRA weight init (peft init_lora_weights): default (B = 0) | gaussian | pissa "
        "(principal singular vectors; the base keeps the residual) | pissa_niter_N (randomized SVD, N iterations) | "
        "olora (QR) | eva (SVD of the layers' inputs on the recipe's training rows; sft/pt) | loftq (qlora 4-bit; "
        "CUDA). pissa/olora adapters are saved as a plain rank-2r LoRA on the original base")
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: the B matrices learn at this ratio x train.learning_rate (peft's LoRA+ "
        "optimizer; the paper suggests 16)")
    rank_pattern: dict[str, int] = Field(
        default_factory=dict, description="per-module ranks overriding r, keyed by module name or regex "
        "(peft rank_pattern), e.g. {q_proj: 8}")
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="per-module alphas overriding alpha, keyed like rank_pattern")
    # qlora
    bits: Literal[4, 8] = Field(4, description="qlora: load the base in 4-bit nf4 (double quant) or 8-bit")
    # prefix / prompt tuning
    num_virtual_tokens: int = Field(20, gt=0, description="prefix/prompt: number of virtual tokens")
    prefix_projection: bool = Field(False, description="prefix: reparametrize the prefix through a 2-layer MLP")
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="prefix: hidden size of that MLP (default: the model's hidden size)")
    prompt_init: Literal["random", "text"] = Field("random", description="prompt: soft prompt init")
    prompt_init_text: str | None = Field(None, description="prompt: text whose embeddings start the soft prompt")
    # freeze
    trainable_layers: int = Field(2, ge=0, description="freeze: train the last N transformer blocks")
    trainable_modules: list[str] = Field(
        default_factory=list, description="freeze: also train modules with these names (e.g. norm, lm_head)")

    @model_validator(mode="after")
    def _fields_match_type(self):
        for fields, types in _METHOD_FIELDS.items():
            for f in fields:
                if f in self.model_fields_set and self.type not in types:
                    raise ValueError(f"method.{f} applies to type {' | '.join(types)}, not {self.type!r}")
        if self.type == "prompt":
            if self.prompt_init == "text" and not self.prompt_init_text:
                raise ValueError("method.prompt_init: text needs method.prompt_init_text")
            if self.prompt_init_text and self.prompt_init != "text":
                raise ValueError("method.prompt_init_text is only used with prompt_init: text")
        if self.type == "freeze" and self.trainable_layers == 0 and not self.trainable_modules:
            raise ValueError("method.trainable_layers is 0 and trainable_modules is empty: nothing would train")
        if self.type == "dora" and "use_dora" in self.model_fields_set and not self.use_dora:
            raise ValueError("method.use_dora: false contradicts type: dora")
        knob_rules.check_lora_init(self)
        return self


def _method_field_applies(field: str, method_type: str) -> bool:
    if field == "use_dora" and method_type == "dora":
        return False  # implied by the type
    for fields, types in _METHOD_FIELDS.items():
        if field in fields:
            return method_type in types
    return True


class DataSection(_Strict):
    train: Union[str, list[str], None] = Field(
        None, description="source(s): .json, .jsonl, .csv, .parquet, .txt, a save_to_disk dir, or a hub dataset "
                          "id (org/name, org/name:split); several sources are mixed"
    )
    eval: Union[str, list[str], None] = Field(None, description="held-out source(s); else eval_split of train")
    format: Literal[DATA_FORMATS] = Field(  # type: ignore[valid-type]
        "auto", description="row format; auto detects from the columns (rm/dpo/orpo/cpo: preference, kto: unpaired, "
        "rl: prompt)"
    )
    columns: dict[str, str] = Field(default_factory=dict, description="map the format's column names to yours")
    roles: dict[str, str] = Field(
        default_factory=dict, description="map your role names to user | assistant | system | tool, e.g. {doctor: assistant}"
    )
    shuffle: bool = Field(True, description="shuffle the (mixed) training rows, deterministically by train.seed")
    eval_split: float = Field(0.0, ge=0, lt=1, description="fraction of train held out for eval when no eval file")
    max_length: int = Field(1024, gt=8, description="tokens per sample; longer samples are truncated")
    truncation: Literal["keep_start", "keep_end"] = Field(
        "keep_start", description="which end of a too-long sample to keep (keep_end drops the oldest turns' tokens)"
    )
    train_on: Literal["responses", "all"] = Field(
        "responses", description="loss on assistant replies only (every turn), or on every token"
    )
    train_on_reasoning: bool = Field(
        True, description="reasoning (reasoning_content, thinking, <think>…</think>) carries loss; false trains "
        "only each reply's answer and end-of-turn"
    )
    keep_empty_replies: bool = Field(
        False, description="keep rows whose reply is empty or whitespace (by default they are dropped and named: "
        "they teach the model to answer with nothing)")
    system: str | None = Field(None, description="system prompt added to rows that have none")
    template: str | None = Field(
        None, description="chat template override: chatml | chatml-tools (ChatML with <tool_call> blocks) | alpaca "
        "| a Jinja string (default: the tokenizer's)"
    )
    packing: bool = Field(
        False, description="pack several samples per row of max_length tokens (TRL bfd packing, padding-free)"
    )

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, v: dict[str, str]) -> dict[str, str]:
        targets = ("user", "assistant", "system", "tool")
        bad = {k: t for k, t in v.items() if t not in targets}
        if bad:
            raise ValueError(f"roles map onto one of {', '.join(targets)}; got {bad}")
        return v


class TrainSection(_Strict):
    epochs: float = Field(3.0, gt=0, description="passes over the training data (fractions allowed)")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps (overrides epochs)")
    learning_rate: float = Field(2.0e-4, gt=0, description="peak learning rate (after warmup)")
    batch_size: Union[Literal["auto"], PositiveInt] = Field(
        4, description="per-device batch size; auto (sft/pt): on a GPU start at 64k tokens (rows of max_length, or "
        "padding-free: of the mean sample length) and shrink by 10% on each "
        "out-of-memory, on a CPU 4")
    grad_accum: int = Field(1, gt=0, description="gradient accumulation steps")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="share of the steps spent ramping the learning rate up from 0")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay of the optimizer")
    max_grad_norm: float = Field(1.0, gt=0, description="clip the gradient norm to this")
    optim: str = Field("adamw_torch", description="transformers optimizer name")
    seed: int = Field(42, description="seed for adapter init, data order, eval split and dropout")
    logging_steps: int = Field(1, gt=0, description="log loss and learning rate every N steps (metrics.jsonl)")
    eval_steps: int | None = Field(None, gt=0, description="evaluate every N steps (default: at the end)")
    activation_checkpointing: Union[Literal["auto"], bool] = Field(
        "auto", description="recompute activations in the backward pass (~30% more compute, far less memory); "
        "auto: on a CUDA GPU when the estimated activations would not fit in half the free memory, else off"
    )
    liger: Union[Literal["auto"], bool] = Field(
        "auto", description="Liger fused kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy), sft/pt; "
        "auto: on for CUDA GPUs when liger-kernel is installed and supports the architecture")
    compile: bool = Field(False, description="torch.compile the model, sft/pt (the first steps pay the compile)")
    padding_free: Union[Literal["auto"], bool] = Field(
        "auto", description="sft/pt: lay each micro-batch's samples end to end in one row (no padding, positions "
        "restart per sample) with variable-length attention; auto: on for CUDA GPUs where the varlen kernel, model "
        "and method allow, else padded (the speed line says why); true: also on CPUs, via a per-sample SDPA reference")
    low_memory: bool = Field(
        False, description="sft/pt: activation checkpointing, plus a paged AdamW (bitsandbytes) for full/freeze "
        "on a GPU: trades speed for memory")
    num_threads: int | None = Field(None, gt=0, description="CPU threads (default: all cores)")
    save_steps: int | None = Field(
        None, gt=0, description="save a resumable checkpoint every N steps (default: only when interrupted)"
    )
    save_total_limit: int | None = Field(2, gt=0, description="keep the newest N checkpoints (None: keep all)")
    deterministic: bool = Field(
        False, description="deterministic kernels and seeding: same recipe + seed -> identical weights (slower)"
    )
    neftune_noise_alpha: float | None = Field(
        None, gt=0, description="NEFTune, sft/pt: uniform noise of scale alpha/sqrt(length x hidden) added to the "
        "input embeddings in training forward passes only (transformers/TRL; 5 is typical)")
    optim_target_modules: Union[Literal["all-linear"], list[str], None] = Field(
        None, description="GaLore/APOLLO (train.optim galore_* / apollo_*): the modules whose gradients are "
        "projected, names or regexes (default all-linear)")
    optim_args: str | None = Field(
        None, description="extra optimizer arguments as transformers takes them, e.g. 'rank=128,update_proj_gap=200'")
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "none", description="experiment tracker; logs go under the run dir (wandb runs offline unless WANDB_MODE is set)"
    )

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, v: str) -> str:
        known = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay")
        if v not in known:
            raise ValueError(f"unknown scheduler {v!r}; one of: {', '.join(known)}")
        return v


GATE_OPS = (">=", "<=", "==", "!=", ">", "<")


def parse_gate(expr: str) -> tuple[str, str, float]:
    """'eval_loss > 1.2' -> ('eval_loss', '>', 1.2). Raises ValueError with what is expected."""
    for op in GATE_OPS:
        if op in expr:
            name, _, value = (part.strip() for part in expr.partition(op))
            if not name.replace(".", "").replace("_", "").isalnum():
                break
            try:
                return name, op, float(value)
            except ValueError:
                break
    raise ValueError(f"gate {expr!r}: expected 'METRIC OP NUMBER', e.g. 'eval_loss > 1.2' (OP: {' '.join(GATE_OPS)})")


class Gate(_Strict):
    fail_if: str = Field(..., description="fail the run (exit 3) when this holds, e.g. 'eval_loss > 1.2'")

    @field_validator("fail_if")
    @classmethod
    def _parses(cls, v: str) -> str:
        parse_gate(v)
        return v


class OutputSection(_Strict):
    dir: str | None = Field(None, description="run dir (default: runs/<recipe name>)")
    samples: int = Field(3, ge=0, le=100, description="greedy replies to held-out prompts written to samples.jsonl "
                         "after training (0: none)")
    sample_tokens: int = Field(64, gt=0, le=2048, description="new tokens per sample reply at most (bounds the "
                               "time sampling takes)")
    keep_checkpoints: bool = Field(False, description="keep checkpoints/ in a finished run dir (by default they "
                                   "are removed once the run has succeeded; an interrupted run keeps them to resume)")


class PreferenceSection(_Strict):
    """Stages rm, dpo, kto, orpo, cpo."""

    beta: float = Field(0.1, gt=0, description="dpo/kto: strength of the pull towards the reference model; "
                        "orpo: weight of the odds-ratio term (lambda)")
    loss_type: str = Field("sigmoid", description="dpo loss: sigmoid | hinge | ipo | robust | ... (TRL's names); "
                           "cpo: sigmoid (CPO) | hinge | ipo | simpo (SimPO)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo: assumed share of flipped labels")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the loss on desirable (true) rows")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the loss on undesirable (false) rows")
    center_rewards: float | None = Field(None, ge=0, description="rm: pull mean rewards towards 0 (TRL "
                                         "center_rewards_coefficient, 0.01 is typical)")
    simpo_gamma: float = Field(0.5, description="cpo with loss_type simpo: the target reward margin")
    cpo_alpha: float = Field(1.0, ge=0, description="cpo: weight of the NLL term on the chosen reply (SimPO "
                             "proper: 0)")
    precompute_ref_log_probs: bool = Field(
        False, description="dpo/kto: compute the reference model's log-probs once before training (TRL), so no "
        "reference forward pass runs per step")


class RewardFunction(_Strict):
    type: Literal["format", "length", "function", "think_format", "accuracy", "soft_overlong"] = Field(
        ..., description="format: 1 when the reply matches pattern; length: 1 at target_chars, falling to 0 at 0 "
        "and 2x; function: a module:function callable; TRL's: think_format (1 for <think>...</think> then the "
        "answer), accuracy (math-verify against the answer column; needs math-verify), soft_overlong (DAPO's "
        "penalty, 0 up to max_completion_length - cache_tokens, falling to -1 at the limit)")
    pattern: str | None = Field(None, description="format: a Python regex searched in the reply (DOTALL)")
    target_chars: int | None = Field(None, gt=0, description="length: the reply length that scores 1")
    column: str | None = Field(None, description="accuracy: the prompt file's column with the reference answer "
                               "(default solution)")
    cache_tokens: int | None = Field(None, gt=0, description="soft_overlong: the soft band of tokens below "
                                     "rl.max_completion_length where the penalty grows")
    function: str | None = Field(None, description="function: module:function, imported from the working dir "
                                 "or beside the recipe; called as TRL reward functions are")
    weight: float = Field(1.0, description="weight in the summed reward")

    @model_validator(mode="after")
    def _fields_for_type(self):
        import re

        takes = {"format": "pattern", "length": "target_chars", "function": "function", "accuracy": "column",
                 "soft_overlong": "cache_tokens"}.get(self.type)
        if takes is not None and getattr(self, takes) is None and self.type != "accuracy":
            raise ValueError(f"a {self.type} reward needs {takes}")
        for other in {"pattern", "target_chars", "function", "column", "cache_tokens"} - {takes}:
            if getattr(self, other) is not None:
                raise ValueError(f"{other} does not apply to a {self.type} reward"
                                 + (f" (it takes {takes})" if takes else ""))
        if self.type == "format":
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern is not a valid regex: {exc}") from None
        if self.type == "function" and not re.fullmatch(r"[\w.]+:\w+", self.function):
            raise ValueError(f"function must look like package.module:function, got {self.function!r}")
        return self


class RLSection(_Strict):
    """Stage rl (online RLHF with TRL; TRL 1.16 has no PPO)."""

    algorithm: Literal["grpo", "rloo"] = Field("grpo", description="grpo | rloo")
    reward_model: str | None = Field(None, description="an rm run dir (or a merged reward model dir)")
    reward_model_weight: float = Field(1.0, description="weight of the reward model in the summed reward")
    rewards: list[RewardFunction] = Field(default_factory=list, description="built-in or Python reward functions")
    num_generations: int = Field(4, ge=2, description="replies sampled per prompt (the group compared)")
    max_completion_length: int = Field(64, gt=0, description="max new tokens per reply")
    temperature: float = Field(1.0, gt=0, description="sampling temperature for the replies")
    beta: float | None = Field(None, ge=0, description="KL pull towards the starting policy "
                               "(default: TRL's, grpo 0.0 = no reference model, rloo 0.05)")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field(
        "dapo", description="grpo: how token losses are averaged (TRL's names): grpo (per sequence, length-biased) | "
        "dr_grpo (by a constant, max_completion_length) | dapo (by the active tokens of the accumulated batch) | "
        "bnpo (by the active tokens of the local batch)")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="grpo: divide advantages by the reward std of the group, of the batch, or not at all "
                             "(Dr. GRPO)")
    epsilon: float = Field(0.2, gt=0, description="clipping range of the policy ratio (lower bound 1 - epsilon)")
    epsilon_high: float | None = Field(
        None, gt=0, description="upper clipping bound 1 + epsilon_high (DAPO's clip-higher, 0.28; default epsilon)")
    mask_truncated_completions: bool = Field(
        False, description="leave replies cut at max_completion_length out of the loss (DAPO)")

    @model_validator(mode="after")
    def _grpo_only(self):
        if self.algorithm != "grpo":
            for name in ("loss_type", "scale_rewards"):
                # The default is what a written recipe.yaml carries: only a changed value is a mistake.
                if name in self.model_fields_set and getattr(self, name) != type(self).model_fields[name].default:
                    raise ValueError(f"rl.{name} applies to algorithm grpo, not {self.algorithm}")
        return self


class Recipe(_Strict):
    stage: Literal[STAGES] = Field("sft", description="training stage")  # type: ignore[valid-type]
    model: ModelSection = Field(default_factory=ModelSection, description="the base model to train")
    method: MethodSection = Field(default_factory=MethodSection, description="how it is trained (PEFT method)")
    data: DataSection = Field(default_factory=DataSection, description="training and eval data")
    train: TrainSection = Field(default_factory=TrainSection, description="optimization and checkpoints")
    output: OutputSection = Field(default_factory=OutputSection, description="where the run dir goes")
    gates: list[Gate] = Field(default_factory=list, description="quality gates checked on metrics.json after training")
    distributed: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="multi-process strategy for --num-processes N / accelerate launch (ddp: plain data parallel)"
    )
    distributed_timeout: int = Field(
        600, gt=0, description="seconds a rank waits for the others (a collective, or node 0 at the rendezvous) "
        "before the whole job stops with a message naming the rank that stopped")
    zero_stage: Literal[2, 3] = Field(
        2, description="distributed: deepspeed: ZeRO stage 2 (shard optimizer state + gradients) or 3 (also weights)")
    preference: PreferenceSection = Field(default_factory=PreferenceSection,
                                          description="rm, dpo, kto, orpo, cpo settings")
    rl: RLSection = Field(default_factory=RLSection, description="rl stage settings (rewards, sampling)")

    _source: str | None = PrivateAttr(None)
    _located: Any = PrivateAttr(None)

    _origin: dict = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _speed_levers_for_sft(self) -> Recipe:
        if not _SPECS[self.stage].speed_levers:
            t = self.train
            where = " and ".join(s.name for s in _SPECS.values() if s.speed_levers)
            for name, bad in (("batch_size", t.batch_size == "auto"), ("liger", t.liger is True),
                              ("compile", t.compile), ("padding_free", t.padding_free is True),
                              ("low_memory", t.low_memory)):
                if bad:
                    raise ValueError(f"train.{name}: {getattr(t, name)} applies to the {where} stages, "
                                     f"not {self.stage}")
        if self.train.low_memory and self.train.activation_checkpointing is False:
            raise ValueError("train.low_memory: true turns activation checkpointing on; "
                             "drop train.activation_checkpointing: false")
        if "zero_stage" in self.model_fields_set and self.distributed != "deepspeed":
            raise ValueError(f"zero_stage applies to distributed: deepspeed, not {self.distributed}")
        return self

    @model_validator(mode="after")
    def _knobs_fit_stage(self) -> Recipe:
        knob_rules.check_recipe(self)
        return self

    def where(self, *path: Any) -> str:
        """'file:line' (or the --set item) for a field path, for error messages."""
        if path in self._origin:
            return self._origin[path]
        line = self._located.line_of(path) if self._located is not None else None
        src = self._source or "recipe"
        return f"{src}:{line}" if line else src

    def to_yaml(self) -> str:
        """Every field, resolved; method fields that do not apply to method.type are left out, since
        naming one is an error (so the written recipe loads again and reproduces the run)."""
        data = self.model_dump(mode="json")
        data["method"] = {k: v for k, v in data["method"].items() if _method_field_applies(k, self.method.type)}
        if self.distributed != "deepspeed":
            data.pop("zero_stage")
        return yaml.safe_dump(data, sort_keys=False)


# ---------------------------------------------------------------------------- loading


class _Located:
    """Where each key path of a YAML document sits: path tuple -> line (1-based)."""

    def __init__(self, text: str):
        self._text, self._lines = text, None

    @property
    def lines(self) -> dict[tuple, int]:
        # Composed on first use: a recipe that validates never needs its line numbers, and this
        # second parse of the text was half the cost of loading one.
        if self._lines is None:
            self._lines = {}
            # safe_yaml.load has bounded this text already, so libyaml's composer is safe (and fast) here.
            node = yaml.compose(self._text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            if node is not None:
                self._walk(node, ())
        return self._lines

    def _walk(self, node: yaml.Node, path: tuple) -> None:
        self._lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = path + (key.value,)
                self._lines[sub] = key.start_mark.line + 1
                self._walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, path + (i,))

    def line_of(self, path: tuple) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())


def parse_set(item: str, where: str = "--set") -> tuple[list[str], Any]:
    """'key.path=value' -> (['key', 'path'], value parsed as YAML); the one parser of --set items
    (the command line, and a pipeline stage's `set:` list)."""
    if not isinstance(item, str) or "=" not in item:
        raise UserError(f"{where} {item!r}: expected key.path=value, e.g. --set train.epochs=1")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"{where} {item!r}: empty key path")
    value = safe_yaml.load_value(raw, f"{where} {item!r}")
    return key.split("."), value


def apply_sets(data: dict, items: list[tuple[list[str], Any, str]]) -> dict[tuple, str]:
    """Set each (key path, value, where it was said) in place; returns path -> where, for error messages."""
    origin: dict[tuple, str] = {}
    for keys, value, place in items:
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise UserError(f"{place}: {'.'.join(keys)}: {k!r} is not a section")
            node = nxt
        node[keys[-1]] = value
        origin[tuple(keys)] = place
    return origin


def apply_overrides(data: dict, overrides: list[str]) -> dict[tuple, str]:
    """Apply --set items in place; returns path -> the --set text, for error messages."""
    return apply_sets(data, [(*parse_set(item), f"--set {item}") for item in overrides or []])


def read_yaml(path: Path) -> tuple[Any, _Located]:
    """A YAML file (bounded: aliases, depth, keys) and where its keys sit; bad YAML is a UserError at file:line."""
    text = safe_yaml.read_text(path, str(path))
    return safe_yaml.load(text, str(path)), _Located(text)  # bounded first: _Located walks the same tree


def _fields_at(loc: tuple) -> list[str]:
    """Field names valid at a location, for 'did you mean'; list items of sections count (rl.rewards.0)."""
    from typing import get_args

    model: type[BaseModel] = Recipe
    parts = list(loc)
    while parts:
        field = model.model_fields.get(str(parts.pop(0)))
        if field is None:
            break
        ann = field.annotation
        item = (get_args(ann) or [None])[0]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif parts and isinstance(parts[0], int) and isinstance(item, type) and issubclass(item, BaseModel):
            model = item
            parts.pop(0)
        else:
            return []
    return list(model.model_fields)


# pydantic names the member of a union that failed in the error's location (literal['auto'],
# constrained-int, list[str], ...); that is not part of the recipe's key path.
_UNION_TAG = re.compile(r"^([\w-]+\[.*\]|constrained-\w+|int|float|str|bool|none)$")


def _sections() -> dict[str, list[str]]:
    return {name: list(f.annotation.model_fields) for name, f in Recipe.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}


def _suggest(parent: tuple, key: str) -> list[str]:
    """Dotted keys the user probably meant by `key` under `parent`, best first."""
    here = _fields_at(parent)
    prefix = ".".join(map(str, parent))
    dotted = [f"{prefix}.{f}" if prefix else f for f in here]
    # An abbreviation of a field here (lr: learning_rate).
    initials = [d for f, d in zip(here, dotted) if len(key) > 1 and "".join(w[0] for w in f.split("_")) == key]
    close = difflib.get_close_matches(key, here, n=1, cutoff=0.6)
    if initials or close:
        return initials or [dotted[here.index(close[0])]]
    # The right key in the wrong section (a top-level learning_rate).
    sections = _sections()
    found = [f"{sec}.{key}" for sec, fields in sections.items() if key in fields and sec != prefix]
    if found:
        return found
    everywhere = {f"{sec}.{f}": f for sec, fields in sections.items() for f in fields}
    close = difflib.get_close_matches(key, list(everywhere.values()), n=1, cutoff=0.8)
    return [d for d, f in everywhere.items() if close and f == close[0]][:2]


def _unknown_key(loc: tuple, dotted: str) -> str:
    parent, key = loc[:-1], str(loc[-1])
    hint = _suggest(parent, key)
    hint_txt = peers.hint(key) or (f"; did you mean {' or '.join(repr(h) for h in hint)}?" if hint else "")
    choices = _fields_at(parent)
    valid = f"{'' if hint_txt else '.'} Valid keys here: {', '.join(choices)}." if choices else ""
    return f"unknown key {dotted!r}{hint_txt}{valid}"


def _expected(e: dict, in_union: bool) -> str:
    """What a failed check wanted, as a phrase that reads after 'must be'."""
    t, ctx = e["type"], e.get("ctx") or {}
    if t == "literal_error":
        expected = str(ctx.get("expected", ""))
        return expected if in_union or "," not in expected and " or " not in expected else f"one of: {expected}"
    bounds = {"greater_than": ("greater than", "gt"), "greater_than_equal": ("at least", "ge"),
              "less_than": ("less than", "lt"), "less_than_equal": ("at most", "le")}
    if t in bounds:
        words, k = bounds[t]
        bound = ctx.get(k)
        return f"{words} {bound:g}" if isinstance(bound, (int, float)) else f"{words} {bound}"
    phrases = {"int_parsing": "a whole number", "int_type": "a whole number", "int_from_float": "a whole number",
               "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
               "bool_type": "true or false", "string_type": "text", "list_type": "a list",
               "dict_type": "a mapping of keys to values", "model_type": "a section of keys",
               "model_attributes_type": "a section of keys"}
    if t in phrases:
        return phrases[t]
    msg = e["msg"].removeprefix("Input should be ").removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def _got(e: dict) -> str:
    got = e.get("input")
    return f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""


def _section_error(loc: tuple, dotted: str, e: dict) -> str | None:
    """A section (model:, train:, ...) given a value or left empty."""
    fields = _fields_at(loc)
    if not fields or e["type"] not in ("model_type", "model_attributes_type", "dict_type"):
        return None
    keys = ", ".join(fields[:5]) + (", ..." if len(fields) > 5 else "")
    got = e.get("input")
    if got is None:
        return f"{dotted}: is empty; give it keys ({keys}) or remove the line"
    hint = f"; did you mean {dotted}.name: {got}?" if "name" in fields and isinstance(got, str) else ""
    return f"{dotted}: is a section of keys ({keys}), not a single value (got {got!r}){hint}"


def _value_error(group: list[dict], loc: tuple, dotted: str) -> str:
    if any(e["type"] == "missing" for e in group):
        return f"{dotted}: is required"
    section = _section_error(loc, dotted, group[0]) if len(group) == 1 else None
    if section:
        return section
    phrases = list(dict.fromkeys(_expected(e, len(group) > 1) for e in group))
    wanted = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " or " + phrases[-1]
    got = group[0].get("input")
    hint = ""
    if isinstance(got, str):
        options = [o for e in group if e["type"] == "literal_error"
                   for o in re.findall(r"'([^']*)'", str(e.get("ctx", {}).get("expected", "")))]
        close = difflib.get_close_matches(got, options, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{dotted}: must be {wanted}{_got(group[0])}{hint}"


def _format_errors(err: ValidationError, where: str, located: _Located | None, origin: dict) -> str:
    """pydantic's errors in the recipe's words: one line per key, at its file:line (or --set item)."""
    groups: dict[tuple, list[dict]] = {}
    for e in err.errors():
        raw = tuple(e["loc"])
        last = raw[-1:] if e["type"] == "extra_forbidden" else ()  # an unknown key is the user's word, even `str:`
        loc = tuple(p for p in raw[:len(raw) - len(last)] if not (isinstance(p, str) and _UNION_TAG.match(p))) + last
        groups.setdefault(loc, []).append(e)
    out = []
    for loc, group in groups.items():
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if loc in origin:
            place = origin[loc]
        elif located is not None and located.line_of(loc):
            place = f"{where}:{located.line_of(loc)}"
        else:
            place = where
        for e in [e for e in group if e["type"] in ("extra_forbidden", "value_error")]:
            if e["type"] == "extra_forbidden":
                out.append(f"{place}: {_unknown_key(loc, dotted)}")
                continue
            msg = e["msg"].removeprefix("Value error, ")
            named = msg.split(":", 1)[0].split(" ", 1)[0]  # cross-field checks start with the field they blame
            field_path = tuple(named.split(".")) if "." in named else None
            if field_path and located is not None and located.line_of(field_path):
                out.append(f"{where}:{located.line_of(field_path)}: {msg}")
            else:
                out.append(f"{place}: {dotted}: {msg}{_got(e)}")
        rest = [e for e in group if e["type"] not in ("extra_forbidden", "value_error")]
        if rest:
            got = rest[0].get("input")
            peer = peers.hint(dotted) if len(loc) == 1 and not isinstance(got, dict) else ""
            out.append(f"{place}: {_value_error(rest, loc, dotted)}{peer}")
    return "\n".join(out)


def load_recipe(path: str | Path | None, overrides: list[str] | None = None, *, data: dict | None = None,
                located: Any = None, origin: dict | None = None) -> Recipe:
    """Read, override and validate a recipe. Raises UserError with file:line on bad input.

    `data` (with `located` and `origin`): a recipe already read, e.g. one stage of a pipeline file;
    `path` then only names where it came from."""
    where = str(path) if path is not None else "recipe"
    if data is None and path is not None:
        if not Path(path).is_file():
            raise UserError(f"recipe not found: {path}")
        data, located = read_yaml(Path(path))
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise UserError(f"{where}:1: a recipe is a mapping of sections (stage, model, method, data, train, output)")
    origin = {**(origin or {}), **apply_overrides(data, overrides or [])}
    _retype_method(data, origin, where)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise UserError(_format_errors(err, where, located, origin)) from None
    recipe._source = str(path) if path is not None else None
    recipe._located = located
    recipe._origin = origin
    return recipe


def _retype_method(data: dict, origin: dict[tuple, str], where: str) -> list[str]:
    """`--set method.type=prefix` on a LoRA recipe: the file's method fields that no longer apply
    (r, alpha, ...) would each be an error; the override says what the user wants, so they are
    dropped and named in a warning. Fields set on the command line too are kept (and checked)."""
    method = data.get("method")
    if ("method", "type") not in origin or not isinstance(method, dict) or not isinstance(method.get("type"), str):
        return []
    new = method["type"]
    dropped = [k for k in list(method) if k != "type" and ("method", k) not in origin
               and not _method_field_applies(str(k), new)]
    for k in dropped:
        del method[k]
    if dropped:
        from rich.console import Console

        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"[yellow]warning:[/] --set method.type={new}: dropped {where}'s method fields that do not apply to "
            f"{new}: {', '.join(map(str, dropped))}")
    return dropped


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError:  # e.g. a name longer than the filesystem allows (a fuzz finding): nothing there to read
        return False


def resolve_path(value: str, recipe_file: str | None) -> Path:
    """A relative data path is looked up from the working directory, then beside the recipe."""
    try:
        p = Path(value).expanduser()
    except RuntimeError:  # `~name/...` for a user this machine does not have (a fuzz finding)
        raise UserError(f"{value}: no user {value.split('/')[0][1:]!r} on this machine to expand "
                        f"{value.split('/')[0]!r} for; write the path out in full") from None
    if p.is_absolute() or _exists(p) or recipe_file is None:
        return p
    beside = Path(recipe_file).parent / p
    return beside if _exists(beside) else p


def as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def check_files(recipe: Recipe) -> None:
    """Existence checks that need no model: data files (and a local model path)."""
    src = recipe._source
    problems = []
    if not as_list(recipe.data.train):
        problems.append(f"{recipe.where('data')}: data.train: required (a data file, or a list of files)")
    from ftkit.data.sources import is_hub_id

    for field in ("train", "eval"):
        value = getattr(recipe.data, field)
        for i, item in enumerate(as_list(value)):
            if not _exists(resolve_path(item, src)) and not is_hub_id(item):
                path = ("data", field) if isinstance(value, str) else ("data", field, i)
                label = ".".join(map(str, path)).replace(f".{i}", f"[{i}]") if len(path) == 3 else f"data.{field}"
                problems.append(f"{recipe.where(*path)}: {label}: file not found: {item}")
    name = recipe.model.name
    if (name.endswith(".gguf") or name.startswith((".", "/", "~"))) and not _exists(resolve_path(name, src)):
        problems.append(f"{recipe.where('model', 'name')}: model.name: path not found: {name}")
    if problems:
        raise UserError("\n".join(problems))
