"""Online RLHF: a thin adapter onto TRL's GRPOTrainer / RLOOTrainer. TRL 1.16 has no PPO.

The policy samples `rl.num_generations` replies per prompt; each reply is scored by the
reward model and/or reward functions (weighted sum), and the policy moves towards the
replies that beat their group's average.
"""

from __future__ import annotations

from pathlib import Path

from ftkit.errors import UserError
from ftkit.recipe import Recipe, resolve_path
from ftkit.rewards import (accuracy_reward, format_reward, import_function, length_reward, soft_overlong_reward,
                           think_format_reward)
from ftkit.runmeta import is_reward_model_dir
from ftkit.stages import policy
from ftkit.stages.base import Built, Context
from ftkit.stages.common import finite
from ftkit.ui import log


def _search_dirs(recipe: Recipe) -> list[Path]:
    dirs = [Path.cwd()]
    if recipe._source:
        dirs.append(Path(recipe._source).resolve().parent)
    return dirs


def check(recipe: Recipe, produced: frozenset[str] = frozenset()) -> None:
    policy.stage_format(recipe)
    policy.check_rows(recipe)
    rl, t = recipe.rl, recipe.train
    if not rl.reward_model and not rl.rewards:
        raise UserError(f"{recipe.where('rl')}: rl: no reward: set rl.reward_model (an rm run dir) and/or "
                        "rl.rewards (format, length or function rewards)")
    if rl.reward_model and rl.reward_model not in produced:
        path = resolve_path(rl.reward_model, recipe._source)
        if not path.is_dir():
            raise UserError(f"{recipe.where('rl', 'reward_model')}: rl.reward_model: not a directory: {rl.reward_model}")
        if not is_reward_model_dir(path):
            raise UserError(f"{recipe.where('rl', 'reward_model')}: rl.reward_model: {rl.reward_model} is not a "
                            "reward model (an ftkit rm run dir, or a merged sequence classifier)")
    if (t.batch_size * t.grad_accum) % rl.num_generations:
        raise UserError(f"{recipe.where('train', 'batch_size')}: train.batch_size x train.grad_accum "
                        f"({t.batch_size} x {t.grad_accum}) counts replies per step and must be a multiple of "
                        f"rl.num_generations ({rl.num_generations}), so every prompt's group is complete")
    for i, spec in enumerate(rl.rewards):
        if spec.type == "function":
            import_function(spec.function, _search_dirs(recipe), recipe.where("rl", "rewards", i, "function"))
        elif spec.type == "accuracy":
            _check_accuracy(recipe, i, spec.column or "solution")
        elif spec.type == "soft_overlong" and spec.cache_tokens >= rl.max_completion_length:
            raise UserError(f"{recipe.where('rl', 'rewards', i, 'cache_tokens')}: rl.rewards[{i}].cache_tokens "
                            f"({spec.cache_tokens}) must be below rl.max_completion_length ({rl.max_completion_length})")


def _check_accuracy(recipe: Recipe, i: int, column: str) -> None:
    import importlib.util

    where = recipe.where("rl", "rewards", i)
    if importlib.util.find_spec("math_verify") is None:
        raise UserError(f"{where}: rl.rewards[{i}]: an accuracy reward needs the math-verify package: "
                        "pip install math-verify (or pip install 'ftkit[math]')")
    rows = policy.read_stage_rows(recipe, "train")
    missing = sum(1 for r in rows if (r.get("extra") or {}).get(column) in (None, ""))
    if missing:
        raise UserError(f"{where}: rl.rewards[{i}]: an accuracy reward compares each reply with the prompt file's "
                        f"{column!r} column; {missing} of {len(rows)} rows have none (set column: to the answer's "
                        "column name)")


def _rewards(recipe: Recipe, dtype: str) -> tuple[list, list, list[float], list[str]]:
    """(reward_funcs, reward_processing_classes, weights, names) for TRL."""
    from ftkit.reward_model import load_reward_model

    funcs, tokenizers, weights, names = [], [], [], []
    rl = recipe.rl
    if rl.reward_model:
        path = resolve_path(rl.reward_model, recipe._source)
        model, tok = load_reward_model(str(path), dtype=dtype, log=log)
        model.config._name_or_path = "reward_model"  # TRL names its metric after this
        funcs.append(model)
        tokenizers.append(tok)
        weights.append(rl.reward_model_weight)
        names.append("reward_model")
    for i, spec in enumerate(rl.rewards):
        if spec.type == "format":
            fn = format_reward(spec.pattern)
        elif spec.type == "length":
            fn = length_reward(spec.target_chars)
        elif spec.type == "think_format":
            fn = think_format_reward()
        elif spec.type == "accuracy":
            fn = accuracy_reward(spec.column or "solution")
        elif spec.type == "soft_overlong":
            fn = soft_overlong_reward(rl.max_completion_length, spec.cache_tokens)
        else:
            fn = import_function(spec.function, _search_dirs(recipe), recipe.where("rl", "rewards", i, "function"))
        funcs.append(fn)
        tokenizers.append(None)
        weights.append(spec.weight)
        names.append(getattr(fn, "__name__", spec.type))
    return funcs, tokenizers, weights, names


def _reward_printer():
    from transformers import TrainerCallback

    class RewardLine(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                log(f"step {state.global_step}/{state.max_steps} · reward {logs['reward']:.4f} "
                    f"(std {logs.get('reward_std', 0):.3f}) · reply length {logs.get('completions/mean_length', 0):.0f}")

    return RewardLine()


def trainer_classes(recipe: Recipe):
    if recipe.rl.algorithm == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        return GRPOConfig, GRPOTrainer
    from trl import RLOOConfig, RLOOTrainer

    return RLOOConfig, RLOOTrainer


def build(recipe: Recipe, hw, use_cache: bool = True) -> Built:
    built = policy.build(recipe, hw, drop_long=True)
    funcs, tokenizers, weights, names = _rewards(recipe, hw.dtype)
    log("rewards: " + ", ".join(f"{n} x{w:g}" for n, w in zip(names, weights)))
    built.trainer_args = {"reward_funcs": funcs, "reward_processing_classes": tokenizers}
    built.info.update(weights=weights, names=names)
    built.callbacks.append(_reward_printer())
    return built


def config_args(recipe: Recipe, built: Built) -> dict:
    rl = recipe.rl
    extra = {"beta": rl.beta} if rl.beta is not None else {}
    extra.update(epsilon=rl.epsilon, epsilon_high=rl.epsilon_high, mask_truncated_completions=rl.mask_truncated_completions)
    if rl.algorithm == "grpo":
        extra.update(loss_type=rl.loss_type, scale_rewards=rl.scale_rewards)
    return dict(num_generations=rl.num_generations, max_completion_length=rl.max_completion_length,
                temperature=rl.temperature, reward_weights=built.info["weights"], **extra)


def evaluate(trainer, built: Built, when: str) -> dict:
    if when == "before" or built.eval is None:
        return {}
    return trainer.evaluate()


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 6) if xs else None


def summarize(ctx: Context) -> dict:
    rewards = policy.series(ctx.history, "reward")
    quarter = max(1, len(rewards) // 4)

    def quarters(key: str) -> dict:
        xs = policy.series(ctx.history, key)
        return {"mean_first_quarter": _mean(xs[:quarter]), "mean_last_quarter": _mean(xs[-quarter:])}

    return {
        "algorithm": ctx.recipe.rl.algorithm,
        "reward_first": rewards[0] if rewards else None,
        "reward_last": rewards[-1] if rewards else None,
        "reward_mean_first_quarter": _mean(rewards[:quarter]),
        "reward_mean_last_quarter": _mean(rewards[-quarter:]),
        "reward_quarter_steps": quarter,
        "reward_by_step": rewards,
        "rewards": {n: {"weight": w, **quarters(f"rewards/{n}/mean")}
                    for n, w in zip(ctx.built.info["names"], ctx.built.info["weights"])},
        "eval_reward": finite(ctx.after.get("eval_reward")),
        "prompts": len(ctx.built.train),
    }


def done_line(m: dict) -> str:
    return policy.change(f"mean reward (first → last {m['reward_quarter_steps']} steps)",
                         m["reward_mean_first_quarter"], m["reward_mean_last_quarter"], ".4f")
