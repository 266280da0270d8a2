"""LoRA SFT end to end on a tiny model: run dir contents, adapter reload, merge equivalence, generate."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import ftkit, write_recipe

from ftkit.hardware import detect


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model):
    """One tiny SFT run shared by the tests that only read its outputs."""
    import json as _json

    from conftest import CHAT_ROWS

    d = tmp_path_factory.mktemp("sft")
    data = d / "chat.jsonl"
    data.write_text("".join(_json.dumps(r) + "\n" for r in CHAT_ROWS), encoding="utf-8")
    recipe = write_recipe(d / "recipe.yaml", tiny_model, data, data={"eval_split": 0.25})
    res = ftkit("sft", str(recipe))
    assert res.returncode == 0, res.stdout + res.stderr
    return d / "run", res


def test_run_dir_layout(sft_run):
    run, res = sft_run
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "recipe.yaml",
                 "metrics.json", "metrics.jsonl", "chat_template.jinja"):
        assert (run / name).is_file(), name
    assert not list(run.glob("*.bin")) and not list(run.glob("*.pt")), "safetensors only"
    assert not (run.parent / "run.partial").exists()
    m = json.loads((run / "metrics.json").read_text())
    hw = detect()  # bf16 on CPUs with AVX512-BF16/AMX, else fp32
    assert m["steps"] == 3 and m["precision"] == hw.dtype and m["device"] == "cpu"
    assert m["precision_reason"] == hw.dtype_reason
    assert m["tokens"] > 0 and m["tokens_per_s"] > 0 and m["eval_loss"] is not None
    assert 0 < m["trainable_params"] < m["total_params"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3]
    assert "trainable params" in res.stdout and f"precision: {hw.dtype}" in res.stdout
    # the resolved recipe reproduces the run
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["train"]["max_steps"] == 3 and resolved["method"]["r"] == 4


def test_plain_lora_prints_no_third_party_noise(sft_run):
    """bitsandbytes' optional-kernel fetch (and its offline trust notice) is not the user's business."""
    from ftkit.noise import NOISE

    _, res = sft_run
    out = res.stdout + res.stderr
    for _logger, prefix, _why in NOISE:
        assert prefix not in out, prefix
    assert "gemm_4bit_forward" not in out and "kernels-community" not in out
    assert not [line for line in res.stderr.splitlines() if "Warning" in line or "warnings.warn" in line]


def test_adapter_loads_with_plain_peft(sft_run, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, _ = sft_run
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "training moved the LoRA B matrices off zero"


def test_refuses_to_overwrite_without_flag(sft_run, tiny_model):
    run, _ = sft_run
    recipe = run.parent / "recipe.yaml"
    before = sorted(p.name for p in run.iterdir())
    res = ftkit("sft", str(recipe))
    assert res.returncode == 2 and "--overwrite" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in run.iterdir()) == before


def test_merge_matches_base_plus_adapter(sft_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from ftkit.inference import load_for_inference

    run, _ = sft_run
    out = tmp_path / "merged"
    res = ftkit("merge-lora", str(run), "--output", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "max |logit diff|" in res.stdout
    report = json.loads((out / "ftkit_merge.json").read_text())
    assert report["max_abs_logit_diff"] <= 1e-3
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    peft_model, tok = load_for_inference(str(run))
    ids = tok(["hello there, how are you?"], return_tensors="pt")
    with torch.no_grad():
        a = merged(**ids).logits
        b = peft_model(**ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not any("lora" in k for k in merged.state_dict())


def test_merge_bad_inputs(tmp_path, tiny_model):
    res = ftkit("merge-lora", str(tmp_path / "missing"), "--output", str(tmp_path / "o"))
    assert res.returncode == 2 and "not a directory" in res.stderr
    res = ftkit("merge-lora", str(tiny_model), "--output", str(tmp_path / "o"))
    assert res.returncode == 2 and "already a full model" in res.stderr
    assert not (tmp_path / "o").exists()


def test_generate_is_deterministic_and_uses_run_template(sft_run):
    run, _ = sft_run
    a = ftkit("generate", str(run), "--prompt", "What is 1 plus 2?", "--max-new-tokens", "6")
    b = ftkit("generate", str(run), "--prompt", "What is 1 plus 2?", "--max-new-tokens", "6")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    bad = ftkit("generate", str(run), "--prompt", "hi", "--dtype", "fp8")
    assert bad.returncode == 2 and "'fp8' is not one of 'auto', 'float32', 'bfloat16', 'float16'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_training_template_is_what_inference_uses(sft_run, tiny_model):
    from transformers import AutoTokenizer

    run, _ = sft_run
    trained = AutoTokenizer.from_pretrained(run)
    base = AutoTokenizer.from_pretrained(tiny_model)
    assert trained.chat_template == base.chat_template


def test_builtin_template_override_is_saved(tmp_path, tiny_model, chat_file):
    from transformers import AutoTokenizer

    from ftkit.data.templates import ALPACA

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, chat_file, data={"template": "alpaca"},
                          train={"max_steps": 1})
    res = ftkit("sft", str(recipe))
    assert res.returncode == 0, res.stderr
    assert AutoTokenizer.from_pretrained(tmp_path / "run").chat_template == ALPACA


def test_truncation_that_removes_all_labels_is_loud(tmp_path, tiny_model):
    rows = [{"messages": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, data, train={"max_steps": 1, "batch_size": 1})
    res = ftkit("sft", str(recipe))
    assert res.returncode == 0, res.stderr
    flat = " ".join(res.stdout.split())
    assert "1 of 2 train rows dropped" in flat and "long.jsonl:1" in flat
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["data"]["train"]["dropped_no_labels"] == 1 and m["last_loss"] > 0

    rows = rows[:1]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = ftkit("sft", str(recipe), "--overwrite")
    assert res.returncode == 2 and "no training rows left" in res.stderr and "Traceback" not in res.stderr


def test_pt_stage_trains_on_all_tokens(tmp_path, tiny_model):
    data = tmp_path / "corpus.txt"
    data.write_text("The quick brown fox.\n\nJumps over the lazy dog.\n\nAnd runs away.\n")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, data, stage="pt", data={"format": "text"})
    res = ftkit("pt", str(recipe))
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["stage"] == "pt"
    assert m["data"]["train"]["trained_tokens"] >= m["data"]["train"]["tokens"] - 3  # all but BOS
