"""Peer knobs (issue 20), preference/RL side: GRPO loss variants and clipping, TRL's built-in rewards by
name, DPO's precomputed reference log-probs. Two steps each on the tiny model."""

from __future__ import annotations

import pytest
from test_knobs import captured  # noqa: F401  (the trainer each stage builds)
from test_rlhf import ITEMS, pairs, run_stage, stage_recipe, write_jsonl

from ftkit.errors import UserError
from ftkit.recipe import load_recipe
from ftkit.rewards import accuracy_reward, soft_overlong_reward, think_format_reward


def test_trl_rewards_on_plain_and_chat_completions():
    think = think_format_reward()
    assert think(["<think>hm</think> 4", "4"]) == [1.0, 0.0]
    assert think([[{"role": "assistant", "content": "<think>a</think>b"}]]) == [1.0]
    acc = accuracy_reward("answer")
    assert acc([r"It is \boxed{3}", r"\boxed{4}"], answer=["3", "3"]) == [1.0, 0.0]
    overlong = soft_overlong_reward(10, 4)
    assert overlong(completion_ids=[[1] * 5, [1] * 8, [1] * 12]) == [0.0, -0.5, -1.0]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_grpo_variants_and_builtin_rewards(tiny_model, tmp_path, captured, loss_type):
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(len(ITEMS))])
    rl = {"num_generations": 2, "max_completion_length": 6, "loss_type": loss_type, "scale_rewards": "none",
          "epsilon": 0.1, "epsilon_high": 0.28, "mask_truncated_completions": True,
          "rewards": [{"type": "think_format"}, {"type": "accuracy", "column": "answer"},
                      {"type": "soft_overlong", "cache_tokens": 2}]}
    run = run_stage(stage_recipe(tmp_path, "rl", tiny_model, prompts, rl=rl))
    trainer = captured[0]
    assert (trainer.loss_type, trainer.args.scale_rewards) == (loss_type, "none")
    assert (trainer.epsilon_low, trainer.epsilon_high) == (0.1, 0.28)
    assert trainer.args.mask_truncated_completions is True
    import json

    m = json.loads((run / "metrics.json").read_text())
    assert len(m["reward_by_step"]) == 2
    assert set(m["rewards"]) == {"think_format", "accuracy", "soft_overlong_punishment_reward"}


def test_accuracy_reward_needs_the_answer_column(tiny_model, tmp_path):
    from ftkit.stages.lifecycle import check

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Review {it}."} for it in ITEMS])
    path = stage_recipe(tmp_path, "rl", tiny_model, prompts,
                        rl={"num_generations": 2, "rewards": [{"type": "accuracy"}]})
    with pytest.raises(UserError, match=r"rl.yaml:\d+: rl.rewards\[0\]: an accuracy reward compares each reply "
                                        r"with the prompt file's 'solution' column; 8 of 8 rows have none"):
        check(load_recipe(path))


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_precomputed_reference_log_probs(tiny_model, tmp_path, captured, stage):
    rows = pairs(8)
    if stage == "kto":  # unpaired: each pair becomes a desirable and an undesirable reply
        rows = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in rows
                for k in ("chosen", "rejected")]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    run_stage(stage_recipe(tmp_path, stage, tiny_model, data, preference={"precompute_ref_log_probs": True}))
    trainer = captured[0]
    assert trainer.args.precompute_ref_log_probs
    want = {"ref_chosen_logps", "ref_rejected_logps"} if stage == "dpo" else {"ref_logps"}
    assert want <= set(trainer.train_dataset.column_names)


@pytest.mark.parametrize("loss_type", ["simpo", "sigmoid"])
def test_cpo_and_simpo_load_no_reference_model(tiny_model, tmp_path, captured, monkeypatch, loss_type):
    import json

    import ftkit.models

    loads = []
    real = ftkit.models.load_causal_lm

    def counting(*a, **kw):
        loads.append(a[0] if a else kw.get("path"))
        return real(*a, **kw)

    monkeypatch.setattr(ftkit.models, "load_causal_lm", counting)
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(8))
    pref = {"loss_type": loss_type, "cpo_alpha": 0.0 if loss_type == "simpo" else 1.0, "simpo_gamma": 0.7}
    # CPO with PiSSA: the preference stages' save converts the adapter too (rank 2r on the original base).
    method = {"type": "lora", "r": 4, "alpha": 8, "init": "pissa" if loss_type == "sigmoid" else "default"}
    run = run_stage(stage_recipe(tmp_path, "cpo", tiny_model, data, preference=pref, method=method))
    trainer = captured[0]
    assert type(trainer).__name__ == "CPOTrainer"
    assert (trainer.loss_type, trainer.args.simpo_gamma, trainer.args.cpo_alpha) == (loss_type, 0.7, pref["cpo_alpha"])
    # One model loaded (the policy), no reference copy, and no "ref" adapter as DPO keeps with peft.
    assert len(loads) == 1 and getattr(trainer, "ref_model", None) is None
    assert list(trainer.model.peft_config) == ["default"]
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 2 and m["reference_model"].startswith("none")
    assert m["train_reward_accuracy_last"] is not None
    assert json.loads((run / "adapter_config.json").read_text())["r"] == (8 if loss_type == "sigmoid" else 4)


def test_cpo_takes_its_own_loss_types(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(4))
    path = stage_recipe(tmp_path, "cpo", tiny_model, data, preference={"loss_type": "robust"})
    with pytest.raises(UserError, match=r"cpo.yaml:\d+: preference.loss_type: cpo takes sigmoid \| hinge \| ipo \| simpo"):
        load_recipe(path)
