"""method.type: schema rules, what each method trains and saves, merge-lora per method (tiny llama)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from archs import build_arch
from conftest import ftkit, write_recipe
from safetensors.torch import load_file

from ftkit.errors import UserError
from ftkit.inference import generate, load_for_inference
from ftkit.merge import merge_lora
from ftkit.recipe import load_recipe
from ftkit.stages import sft

REPO = Path(__file__).resolve().parent.parent


def _run(tmp_path, model, data, method: dict):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_recipe(tmp_path / "r.yaml", model, data)
    recipe = yaml.safe_load(path.read_text())
    recipe["train"].update(max_steps=2, batch_size=2, num_threads=1)
    recipe["method"] = method  # replace, not merge: LoRA keys are errors on other types
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return sft.run(load_recipe(path), overwrite=True)


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------ schema


@pytest.mark.parametrize("method, field", [
    ({"type": "lora", "num_virtual_tokens": 8}, "num_virtual_tokens"),
    ({"type": "prefix", "r": 8}, "method.r"),
    ({"type": "full", "trainable_layers": 2}, "trainable_layers"),
    ({"type": "prompt", "prompt_init": "text"}, "prompt_init_text"),
    ({"type": "freeze", "trainable_layers": 0}, "nothing would train"),
    ({"type": "qlora", "bits": 3}, "method.bits"),
    ({"type": "dora", "use_dora": False}, "contradicts"),
])
def test_fields_that_do_not_apply_are_errors(tmp_path, chat_file, method, field):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"method": method, "data": {"train": str(chat_file)}}), encoding="utf-8")
    res = ftkit("validate", str(path))
    assert res.returncode == 2, res.stderr
    assert field in res.stderr and f"{path}:" in res.stderr and "Traceback" not in res.stderr


def test_shipped_method_recipes_validate():
    names = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    for method in ("lora", "dora", "qlora", "prefix", "prompt", "full", "freeze"):
        assert method in names
        recipe = load_recipe(REPO / "recipes" / f"{method}.yaml")
        assert recipe.method.type == method


# ------------------------------------------------------------------------------ LoRA family


def test_target_modules_auto_all_linear_and_list(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from ftkit.methods import resolve_targets
    from ftkit.recipe import MethodSection

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    auto = resolve_targets(model, MethodSection(target_modules="auto"))
    assert auto == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert "lm_head" not in resolve_targets(model, MethodSection(target_modules="all-linear"))
    assert resolve_targets(model, MethodSection(target_modules=["q_proj", "v_proj"])) == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match="qq_proj not found.*q_proj"):
        resolve_targets(model, MethodSection(target_modules=["qq_proj"]))


def test_rslora_dora_and_modules_to_save_reach_the_adapter(tiny_model, chat_file, tmp_path):
    run = _run(tmp_path, tiny_model, chat_file,
               {"type": "dora", "r": 4, "alpha": 8, "rslora": True, "modules_to_save": ["norm"],
                "target_modules": ["q_proj", "v_proj"]})
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["use_rslora"] is True
    assert set(cfg["target_modules"]) == {"q_proj", "v_proj"} and cfg["modules_to_save"] == ["norm"]
    keys = load_file(run / "adapter_model.safetensors").keys()
    assert any("lora_magnitude_vector" in k for k in keys)  # DoRA's magnitude
    assert any(k.startswith("base_model.model.model.norm") for k in keys)  # the fully trained norm
    m = _metrics(run)
    assert m["method"] == "dora" and 0 < m["trainable_percent"] < 5


def test_modules_to_save_unknown_name_is_a_user_error(tiny_model, chat_file, tmp_path):
    with pytest.raises(UserError, match="modules_to_save: nrm not found.*norm"):
        _run(tmp_path, tiny_model, chat_file, {"type": "lora", "modules_to_save": ["nrm"]})


def test_qlora_trains_4bit_and_merges_into_dequantized_base(tiny_model, chat_file, tmp_path):
    run = _run(tmp_path, tiny_model, chat_file, {"type": "qlora", "r": 4, "alpha": 8})
    m = _metrics(run)
    assert m["method"] == "qlora" and 0 < m["trainable_params"] < m["total_params"]
    # peft counts packed 4-bit weights at their real size: same total as the fp32 model + LoRA.
    lora = _run(tmp_path / "l", tiny_model, chat_file, {"type": "lora", "r": 4, "alpha": 8})
    assert m["total_params"] == _metrics(lora)["total_params"]

    report = merge_lora(str(run), str(tmp_path / "merged"), log=lambda s: None)
    assert report["method"] == "qlora" and report["dequantized_from_bits"] == 4
    assert report["max_abs_logit_diff"] <= report["tolerance"]
    assert report["quantized_gap"] <= report["tolerance"]  # same function as the 4-bit model trained
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in cfg  # a plain model anyone can load
    # The merged weights are the NF4-rounded base, not the original: they differ from the base.
    base = load_file(Path(tiny_model) / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    k = "model.layers.0.mlp.up_proj.weight"
    assert (merged[k] - base[k]).abs().max() > 0
    # Served in float32, base + adapter computes what the merged model computes: bitsandbytes' CPU
    # eval kernel (bf16 on AVX512-BF16 CPUs whatever the dtype) is not used for a float32 request.
    import torch

    served, tok = load_for_inference(str(run), dtype="float32", log=lambda s: None)
    plain, _ = load_for_inference(str(tmp_path / "merged"), dtype="float32", log=lambda s: None)
    ids = tok(["What is 1 plus 1?"], return_tensors="pt")
    with torch.no_grad():
        assert (served(**ids).logits - plain(**ids).logits).abs().max().item() < 1e-4


def test_qlora_8bit_trains(tiny_model, chat_file, tmp_path):
    run = _run(tmp_path, tiny_model, chat_file, {"type": "qlora", "bits": 8, "r": 4, "alpha": 8})
    assert _metrics(run)["steps"] == 2
    assert yaml.safe_load((run / "recipe.yaml").read_text())["method"]["bits"] == 8
    report = merge_lora(str(run), str(tmp_path / "merged"), log=lambda s: None)
    assert report["dequantized_from_bits"] == 8 and report["max_abs_logit_diff"] <= report["tolerance"]
    assert report["quantized_gap"] > 0  # LLM.int8 quantizes activations too: reported, not gated


# ------------------------------------------------------------------------------ virtual tokens


def test_prefix_trains_only_the_prefix_and_is_not_mergeable(tiny_model, chat_file, tmp_path):
    run = _run(tmp_path, tiny_model, chat_file, {"type": "prefix", "num_virtual_tokens": 5})
    m = _metrics(run)
    # 2 layers x (key + value) x 5 tokens x (2 kv heads x 16 dims)
    assert m["trainable_params"] == 2 * 2 * 5 * 32
    assert json.loads((run / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    with pytest.raises(UserError, match="prefix-tuning adapter is not mergeable.*ftkit generate"):
        merge_lora(str(run), str(tmp_path / "merged"), log=lambda s: None)
    assert not (tmp_path / "merged").exists()
    gen = ftkit("generate", str(run), "-p", "What is 1 plus 1?", "--max-new-tokens", "3")
    assert gen.returncode == 0, gen.stderr


def test_prefix_projection_adds_the_mlp(tiny_model, chat_file, tmp_path):
    run = _run(tmp_path, tiny_model, chat_file,
               {"type": "prefix", "num_virtual_tokens": 5, "prefix_projection": True, "encoder_hidden_size": 16})
    # peft sizes the prefix by the key/value width (2 kv heads x 16 = 32): embedding 5x32,
    # MLP 32->16->(2 layers x key+value x 32)
    assert _metrics(run)["trainable_params"] == 5 * 32 + (32 * 16 + 16) + (16 * 128 + 128)


def test_prompt_tuning_from_text(tiny_model, chat_file, tmp_path):
    run = _run(tmp_path, tiny_model, chat_file,
               {"type": "prompt", "num_virtual_tokens": 6, "prompt_init": "text",
                "prompt_init_text": "Answer with a number."})
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert cfg["prompt_tuning_init"] == "TEXT" and cfg["num_virtual_tokens"] == 6
    assert _metrics(run)["trainable_params"] == 6 * 64
    with pytest.raises(UserError, match="prompt-tuning adapter is not mergeable"):
        merge_lora(str(run), str(tmp_path / "merged"), log=lambda s: None)


def test_unsupported_pair_is_refused_before_training(tmp_path, chat_file, embedded_dir):
    bloom = build_arch("bloom", tmp_path / "bloom", embedded_dir)
    path = write_recipe(tmp_path / "r.yaml", bloom, chat_file)
    recipe = yaml.safe_load(path.read_text())
    recipe["method"] = {"type": "prefix"}
    path.write_text(yaml.safe_dump(recipe))
    res = ftkit("sft", str(path))
    assert res.returncode == 2, res.stderr
    assert "prefix does not work on bloom" in res.stderr and "Use method.type" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()


def test_preflight_turns_an_unknown_peft_failure_into_a_user_error(tmp_path, chat_file, embedded_dir, monkeypatch):
    # As if bloom were a new architecture nobody listed: the test forward pass must catch it.
    monkeypatch.setattr("ftkit.methods.UNSUPPORTED", {})
    bloom = build_arch("bloom", tmp_path / "bloom", embedded_dir)
    with pytest.raises(UserError, match="prefix does not work on bloom.*test forward pass failed"):
        _run(tmp_path, bloom, chat_file, {"type": "prefix", "num_virtual_tokens": 4})
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


# ------------------------------------------------------------------------------ full / freeze


def test_full_saves_a_loadable_full_model(tiny_model, chat_file, tmp_path):
    from transformers import AutoModelForCausalLM

    run = _run(tmp_path, tiny_model, chat_file, {"type": "full"})
    m = _metrics(run)
    assert m["trainable_params"] == m["total_params"] and m["trainable_percent"] == 100.0
    assert not (run / "adapter_config.json").exists()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "metrics.json"):
        assert (run / name).is_file(), name
    AutoModelForCausalLM.from_pretrained(run)
    with pytest.raises(UserError, match="already a full model.*method.type: full"):
        merge_lora(str(run), str(tmp_path / "merged"), log=lambda s: None)
    model, tok = load_for_inference(str(run), log=lambda s: None)
    assert len(generate(model, tok, ["What is 1 plus 1?"], max_new_tokens=3)) == 1


def test_freeze_changes_only_the_last_blocks_and_named_modules(tiny_model, chat_file, tmp_path):
    run = _run(tmp_path, tiny_model, chat_file,
               {"type": "freeze", "trainable_layers": 1, "trainable_modules": ["norm"]})
    base = load_file(Path(tiny_model) / "model.safetensors")
    tuned = load_file(run / "model.safetensors")
    changed = {k for k in base if not (base[k] == tuned[k]).all()}
    assert changed, "nothing trained"
    for k in changed:
        assert k.startswith("model.layers.1.") or k == "model.norm.weight", k
    assert any(k.startswith("model.layers.1.") for k in changed) and "model.norm.weight" in changed
    m = _metrics(run)
    assert m["method"] == "freeze" and 0 < m["trainable_percent"] < 100


@pytest.mark.parametrize("method", [{"type": "freeze", "trainable_layers": 1, "trainable_modules": ["norm"]},
                                    {"type": "lora", "r": 4, "alpha": 8, "modules_to_save": ["norm"]}])
def test_trained_weights_are_fp32_masters_on_a_bf16_base(tiny_model, method):
    """A bf16 base (how hub models are stored and how adapters load their base): the trained weights
    are float32 and move under small updates; a bf16 norm weight of 1.0 would not move at lr 1e-3."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftkit.methods import apply_method
    from ftkit.recipe import MethodSection

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    model = apply_method(model, MethodSection(**method), log=lambda s: None)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    assert any(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    norm = next(p for n, p in trained.items() if n.endswith("model.norm.weight") or ".norm.modules_to_save." in n)
    before = norm.detach().clone()
    opt = torch.optim.AdamW(list(trained.values()), lr=1e-3)
    ids = torch.randint(0, 100, (2, 12))
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert (norm.detach() - before).abs().max().item() > 1e-4


def test_whole_model_methods_load_a_float32_base_in_float32(tiny_model, tmp_path):
    from ftkit.hardware import Hardware
    from ftkit.methods import weights_dtype
    from ftkit.recipe import MethodSection

    bf16 = Hardware("cpu", "test CPU", "bfloat16", "test", 1, 0)
    fp32 = Hardware("cpu", "test CPU", "float32", "test", 1, 0)
    bf16_base = tmp_path / "bf16-base"
    bf16_base.mkdir()
    (bf16_base / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "bfloat16"}))
    for kind in ("full", "freeze"):
        # Loaded in bf16, the weights a freeze run does not train would be saved rounded.
        assert weights_dtype(str(tiny_model), MethodSection(type=kind), bf16) == "float32"
        assert weights_dtype(str(bf16_base), MethodSection(type=kind), bf16) == "bfloat16"
        assert weights_dtype(str(tiny_model), MethodSection(type=kind), fp32) == "float32"
    # Adapter methods never save the base: it is loaded in the compute dtype.
    assert weights_dtype(str(tiny_model), MethodSection(type="lora"), bf16) == "bfloat16"


def test_arch_table_renders_what_ran():
    import importlib.util

    spec = importlib.util.spec_from_file_location("arch_table", REPO / "scripts" / "arch_matrix_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = {"versions": {"peft": "0.21"}, "results": {
        "bloom": {"lora": {"status": "ok", "checks": {"targets": ["dense", "query_key_value"]}},
                  "prefix": {"status": "unsupported", "reason": "ALiBi"}},
        "gpt2": {"lora": {"status": "failed"}}}}
    lines = mod.table(data).splitlines()
    bloom = next(line for line in lines if line.startswith("| bloom"))
    assert "| yes |" in bloom and "refused (exit 2) [1]" in bloom and "not run" in bloom
    assert "dense, query_key_value" in bloom
    assert "**FAILED**" in next(line for line in lines if line.startswith("| gpt2"))
    assert "[1] ALiBi" in lines[lines.index("") + 1]
