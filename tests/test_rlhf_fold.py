"""Starting a stage from an SFT run dir: the two LoRA adapters fold into one, exactly."""

from __future__ import annotations

import torch

from ftkit.stages.start import fold_adapters


def _randomize_lora(model, seed):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # LoRA starts with B = 0; make both adapters do something
            p.data = torch.randn(p.shape, generator=g) * 0.1


def test_folded_adapter_equals_sft_merged_plus_new_adapter(tiny_model, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 200, 300, 400, 500, 600]])
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                         LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    _randomize_lora(sft, 1)
    sft.save_pretrained(tmp_path / "sft")
    # The new stage: SFT merged into the base, a different LoRA (other modules, rank, rsLoRA scale) on top.
    merged = sft.merge_and_unload()
    new = get_peft_model(merged, LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=["v_proj", "up_proj"],
                                            task_type="CAUSAL_LM"))
    _randomize_lora(new, 2)
    with torch.no_grad():
        expected = new(input_ids=ids).logits
    new.save_pretrained(tmp_path / "new")

    info = fold_adapters(tmp_path / "sft", tmp_path / "new")
    assert info["rank_saved"] == 6
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        got = PeftModel.from_pretrained(base, str(tmp_path / "new"))(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-3  # the adapters matter, so the comparison means something
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
