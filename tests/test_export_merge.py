"""The streaming LoRA merge (merge-lora and export): the same weights PEFT's merge_and_unload computes,
and a peak memory bounded by one shard plus the adapter, measured on a model written in several shards."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from archs import build_arch


def make_adapter(base: Path, out: Path, targets, seed: int = 1, **lora) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **lora))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # trained, not the zero init
    peft_model.save_pretrained(out)
    return out


@pytest.mark.parametrize("family,targets,lora", [
    ("llama", ["q_proj", "v_proj", "down_proj"], {}),
    ("llama", ["q_proj", "k_proj"], {"use_rslora": True}),
    ("gpt2", ["c_attn", "c_fc"], {"fan_in_fan_out": True}),  # Conv1D: delta transposed
])
def test_streaming_merge_equals_peft(embedded_dir, tmp_path, family, targets, lora):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ftkit.merge_stream import stream_merge

    base = build_arch(family, tmp_path / family, embedded_dir)
    adapter = make_adapter(base, tmp_path / "adapter", targets, **lora)
    assert stream_merge(base, adapter, tmp_path / "merged", "float32")
    want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                     str(adapter)).merge_and_unload().state_dict()
    got = load_file(tmp_path / "merged" / "model.safetensors")
    changed = 0
    for k, v in got.items():
        assert torch.allclose(v, want[k], atol=1e-6), k
        changed += not torch.equal(v, load_file(base / "model.safetensors")[k])
    assert changed >= 4  # the adapter's modules moved (2 layers x 2+ targets)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)  # a loadable model
    assert reloaded.config.model_type == family


def test_dora_is_not_streamed(embedded_dir, tmp_path):
    from ftkit.merge_stream import stream_merge

    base = build_arch("llama", tmp_path / "llama", embedded_dir)
    adapter = make_adapter(base, tmp_path / "adapter", ["q_proj"], use_dora=True)
    assert stream_merge(base, adapter, tmp_path / "merged", "float32") is False
    assert not (tmp_path / "merged").exists()  # PEFT's in-memory merge takes it from here


PEAK = textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    import torch, safetensors.torch  # imported before the baseline
    from ftkit.merge_stream import stream_merge

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    peak, done = [0], [False]
    def sample():
        while not done[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)
    base = rss()
    t = threading.Thread(target=sample); t.start()
    ok = stream_merge(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), "float32")
    done[0] = True; t.join()
    print(json.dumps({"ok": ok, "peak_over_baseline": max(peak[0], rss()) - base}))
""")


def test_streaming_merge_peak_memory_is_bounded_by_a_shard(tmp_path):
    """~84 MB of fp32 weights in 8 shards: loading the model would take all of it; the merge may take
    at most 1.5x the largest shard plus the adapter (the issue's bound)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = tmp_path / "base"
    LlamaForCausalLM(cfg).save_pretrained(base, max_shard_size="12MB")
    shards = sorted(base.glob("*.safetensors"))
    assert len(shards) >= 6
    adapter = make_adapter(base, tmp_path / "adapter", ["q_proj", "v_proj", "up_proj", "down_proj"])
    total = sum(s.stat().st_size for s in shards)
    bound = 1.5 * max(s.stat().st_size for s in shards) + (adapter / "adapter_model.safetensors").stat().st_size
    r = subprocess.run([sys.executable, "-c", PEAK, str(base), str(adapter), str(tmp_path / "merged")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["ok"]
    print(f"peak RSS over baseline {m['peak_over_baseline'] / 2**20:.1f} MiB; bound {bound / 2**20:.1f} MiB; "
          f"model {total / 2**20:.1f} MiB in {len(shards)} shards")
    assert m["peak_over_baseline"] <= bound
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors")) == [s.name for s in shards]
