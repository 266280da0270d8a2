"""Every method on every causal-LM family transformers provides: tiny random models, 2 training steps each.

Results (what ran, what passed, what was refused and why) are written as JSON to $FTKIT_ARCH_MATRIX
(merged into an existing file) so scripts/arch_matrix_table.py can render the README table from
what actually ran. In-process calls, not subprocesses, keep each case to a few seconds.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml
from archs import available_families, build_arch
from conftest import CHAT_ROWS

from ftkit.errors import UserError
from ftkit.inference import generate, load_for_inference
from ftkit.merge import merge_lora
from ftkit.methods import UNSUPPORTED
from ftkit.recipe import load_recipe
from ftkit.stages import sft

FAMILIES = available_families()
METHODS = ["lora", "qlora", "prefix", "prompt", "freeze"]
METHOD_SETTINGS = {
    "lora": {"type": "lora", "r": 4, "alpha": 8},
    "qlora": {"type": "qlora", "r": 4, "alpha": 8},
    "prefix": {"type": "prefix", "num_virtual_tokens": 4},
    "prompt": {"type": "prompt", "num_virtual_tokens": 4},
    "freeze": {"type": "freeze", "trainable_layers": 1},
}
# What `target_modules: auto` must pick: every attention and MLP projection of the family.
AUTO_TARGETS = {
    **{f: {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
       for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "glm": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},
    "opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
    **{f: {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"} for f in ("gpt_neox", "bloom", "falcon")},
}
PROMPTS = ["What is 1 plus 2?", "Hi"]

RESULTS: dict[str, dict[str, dict]] = {}


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    out = os.environ.get("FTKIT_ARCH_MATRIX")
    if not out or not RESULTS:
        return
    import importlib.metadata as md

    path = Path(out)
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"results": {}}
    for fam, methods in RESULTS.items():
        data["results"].setdefault(fam, {}).update(methods)
    data["versions"] = {p: md.version(p) for p in ("transformers", "peft", "bitsandbytes", "torch", "trl")}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def arch_root(tmp_path_factory, embedded_dir):
    root = tmp_path_factory.mktemp("archs")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS[:4]), encoding="utf-8")
    return root, embedded_dir


def _model(arch_root, family: str) -> Path:
    root, tok_src = arch_root
    path = root / family
    return path if (path / "config.json").is_file() else build_arch(family, path, tok_src)


def _recipe(arch_root, family: str, method: str) -> Path:
    root, _ = arch_root
    recipe = {
        "model": {"name": str(_model(arch_root, family))},
        "method": METHOD_SETTINGS[method],
        "data": {"train": str(root / "chat.jsonl"), "max_length": 48},
        "train": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "num_threads": 1},
        "output": {"dir": str(root / f"run-{family}-{method}")},
    }
    path = root / f"{family}-{method}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def _generate(target: Path) -> list[str]:
    model, tok = load_for_inference(str(target), log=lambda s: None)
    return generate(model, tok, PROMPTS, max_new_tokens=4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_method_on_arch(arch_root, family, method, tmp_path, monkeypatch):
    t0 = time.perf_counter()
    record = RESULTS.setdefault(family, {})[method] = {"status": "failed"}
    recipe = load_recipe(_recipe(arch_root, family, method))
    run_dir = Path(recipe.output.dir)

    if (family, method) in UNSUPPORTED:
        with pytest.raises(UserError, match="does not work on") as exc:
            sft.run(recipe, overwrite=True)
        # Refused before training: no run dir, nothing half-written.
        assert not run_dir.exists() and not Path(f"{run_dir}.partial").exists()
        # The entry is still needed: without it the pair fails too (caught by the pre-training checks).
        monkeypatch.setattr("ftkit.methods.UNSUPPORTED", {})
        with pytest.raises(UserError, match="does not work on|quantized no layer"):
            sft.run(recipe, overwrite=True)
        assert not run_dir.exists()
        record.update(status="unsupported", reason=UNSUPPORTED[(family, method)], message=str(exc.value))
        return

    out = sft.run(recipe, overwrite=True)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["steps"] == 2 and metrics["method"] == method
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    checks = {"sft_steps": 2, "trainable_percent": metrics["trainable_percent"]}

    if method in ("lora", "qlora"):
        targets = set(json.loads((out / "adapter_config.json").read_text())["target_modules"])
        assert targets == AUTO_TARGETS[family], f"auto targets on {family}: {sorted(targets)}"
        checks["targets"] = sorted(targets)
        merged = tmp_path / "merged"
        report = merge_lora(str(out), str(merged), log=lambda s: None)
        assert report["max_abs_logit_diff"] <= report["tolerance"]
        checks["merge_max_abs_logit_diff"] = report["max_abs_logit_diff"]
        # Greedy decoding from base+adapter and from the merged dir must agree token for token.
        replies = _generate(out)
        assert replies == _generate(merged)
    else:
        if method == "freeze":
            assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
        replies = _generate(out)
    assert len(replies) == len(PROMPTS) and all(isinstance(r, str) for r in replies)
    checks["generate"] = True
    record.update(status="ok", checks=checks, seconds=round(time.perf_counter() - t0, 1))


# PiSSA rewrites the base weights in memory; its saved adapter must still apply to the original base.
PISSA_FAMILIES = [f for f in ("llama", "mistral", "qwen2") if f in FAMILIES]


@pytest.mark.parametrize("family", PISSA_FAMILIES)
def test_pissa_on_llama_family(arch_root, family, tmp_path):
    root, _ = arch_root
    path = _recipe(arch_root, family, "lora")
    raw = yaml.safe_load(path.read_text())
    raw["method"] = {**METHOD_SETTINGS["lora"], "init": "pissa"}
    raw["model"]["dtype"] = "float32"
    raw["output"]["dir"] = str(root / f"run-{family}-pissa")
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    out = sft.run(load_recipe(path), overwrite=True)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 * METHOD_SETTINGS["lora"]["r"] and cfg["init_lora_weights"] is True
    report = merge_lora(str(out), str(tmp_path / "merged"), log=lambda s: None)
    assert report["max_abs_logit_diff"] <= 1e-4, report
    assert _generate(out) == _generate(tmp_path / "merged")
    RESULTS.setdefault(family, {})["lora+pissa"] = {
        "status": "ok", "checks": {"sft_steps": 2, "merge_max_abs_logit_diff": report["max_abs_logit_diff"]}}
