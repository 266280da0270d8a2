"""ftkit push against a local stand-in of the Hub API (tests/hub_standin.py): what is uploaded, the model
card, private repos, a rejected token, offline mode and bad input -- all through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hub_standin import HubStandIn

TOKEN = "hf_standin_token"


def push(*args: str, endpoint: str, token: str | None = TOKEN, offline: bool = False, cwd=None):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="1" if offline else "0", COLUMNS="200",
               HF_HOME=str(Path(cwd or ".") / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "ftkit", "push", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=cwd)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A LoRA run dir as ftkit sft leaves it (the weights' content does not matter to push)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    (run / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (run / "tokenizer.json").write_text("{}")
    (run / "recipe.yaml").write_text(yaml.safe_dump({
        "stage": "sft", "model": {"name": "smollm2-135m-instruct"},
        "method": {"type": "lora", "r": 8, "alpha": 16},
        "data": {"train": "data/support.jsonl", "format": "messages", "system": "You are terse."}}))
    (run / "metrics.json").write_text(json.dumps({"train_loss": 1.2345, "eval_loss": 1.5, "steps": 30}))
    (run / "README.md").write_text("PEFT placeholder card")
    (run / "checkpoint-10").mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    return run


def test_push_adapter_uploads_files_and_a_real_card(run_dir, tmp_path):
    with HubStandIn(TOKEN) as hub:
        r = push(str(run_dir), "--repo", "acme/support-bot", "--private", endpoint=hub.url, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        repo = hub.repos["acme/support-bot"]
    assert repo["private"] is True
    files = repo["files"]
    assert {"adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "metrics.json",
            "README.md"} <= set(files)
    assert "metrics.jsonl" not in files and not any(f.startswith("checkpoint") for f in files)
    card = files["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["library_name"] == "peft"
    for fact in ("lora (r=8, alpha=16)", "data/support.jsonl", "You are terse.", "| train_loss | 1.234 |",
                 "| eval_loss | 1.5 |", "AutoPeftModelForCausalLM.from_pretrained('acme/support-bot')"):
        assert fact in card, fact
    assert TOKEN not in r.stdout + r.stderr


def test_push_gguf_takes_modelfile_and_report(tmp_path):
    gguf = tmp_path / "tuned-q4_k_m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    (tmp_path / "tuned-q4_k_m.Modelfile").write_text("FROM ./tuned-q4_k_m.gguf\n")
    (tmp_path / "tuned-q4_k_m.export.json").write_text(json.dumps({"quantize": "q4_k_m",
                                                                    "next_token_agreement": 0.9}))
    with HubStandIn(TOKEN) as hub:
        r = push(str(gguf), "--repo", "acme/tuned-gguf", endpoint=hub.url, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        files = hub.repos["acme/tuned-gguf"]["files"]
    assert files["tuned-q4_k_m.gguf"] == gguf.read_bytes()
    assert {"tuned-q4_k_m.Modelfile", "tuned-q4_k_m.export.json", "README.md"} <= set(files)
    card = files["README.md"].decode()
    assert "ollama create" in card and "next-token agreement" in card and "90.0%" in card


def test_rejected_token_is_exit_2_without_echoing_it(run_dir, tmp_path):
    with HubStandIn(TOKEN) as hub:
        r = push(str(run_dir), "--repo", "acme/x", endpoint=hub.url, token="hf_wrong_secret", cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "refused the token" in r.stderr and "hf_wrong_secret" not in r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_offline_and_unreachable_are_exit_2(run_dir, tmp_path):
    r = push(str(run_dir), "--repo", "acme/x", endpoint="http://127.0.0.1:9", offline=True, cwd=tmp_path)
    assert r.returncode == 2 and "HF_HUB_OFFLINE" in r.stderr, r.stderr
    r = push(str(run_dir), "--repo", "acme/x", endpoint="http://127.0.0.1:9", cwd=tmp_path)  # nothing listens
    assert r.returncode == 2 and "cannot reach the Hub" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args,msg", [(["--repo", "no-slash"], "org/name"), (["--repo", "a/b"], "neither a run dir")])
def test_bad_input_is_exit_2(tmp_path, args, msg):
    r = push(str(tmp_path), *args, endpoint="http://127.0.0.1:9", cwd=tmp_path)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_hostile_recipe_in_a_run_dir_is_a_user_error_not_a_crash(tmp_path):
    """A run dir may come from elsewhere: its recipe.yaml goes through the bounded YAML loader."""
    from ftkit.errors import UserError
    from ftkit.model_card import collect

    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    (run / "recipe.yaml").write_text("stage: sft\nmodel: &x [*x]\n")
    with pytest.raises(UserError, match=r"recipe\.yaml"):
        collect(run)
