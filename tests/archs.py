"""Tiny random causal LMs of each family, built from config (no download), sized to a real tokenizer."""

from __future__ import annotations

from pathlib import Path

# Families the issue asks for; those the installed transformers lacks are skipped, not failed.
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "bloom",
            "falcon", "opt", "glm"]

_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
_PER_FAMILY = {
    # GQA families: 2 kv heads exercise the k/v projection shapes that differ from q.
    "llama": dict(num_key_value_heads=2, intermediate_size=128, head_dim=16),
    "mistral": dict(num_key_value_heads=2, intermediate_size=128, head_dim=16),
    "qwen2": dict(num_key_value_heads=2, intermediate_size=128),
    "qwen3": dict(num_key_value_heads=2, intermediate_size=128, head_dim=16),
    "gemma": dict(num_key_value_heads=2, intermediate_size=128, head_dim=16),
    "gemma2": dict(num_key_value_heads=2, intermediate_size=128, head_dim=16, sliding_window=32),
    "phi3": dict(num_key_value_heads=2, intermediate_size=128),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "gpt_neox": dict(intermediate_size=128),
    "bloom": dict(n_layer=2, n_head=4),
    "falcon": dict(),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "glm": dict(num_key_value_heads=2, intermediate_size=128, head_dim=16),
}


def available_families() -> list[str]:
    from transformers import CONFIG_MAPPING

    return [f for f in FAMILIES if f in CONFIG_MAPPING]


def build_arch(family: str, out: Path, tokenizer_src: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_src)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    cfg = AutoConfig.for_model(family, **_COMMON, **_PER_FAMILY[family], vocab_size=len(tok), **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
