"""Shared by the GGUF tests: the llama.cpp marker, tiny models of each family, and their HF reference."""

from __future__ import annotations

import importlib.util

import pytest

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
# Checks made by llama.cpp itself: marked, and skipped where llama-cpp-python is not installed
# (CI cannot build llama.cpp in its budget; scripts/llamacpp_check.sh builds it once and runs them).
def llamacpp(fn):
    fn = pytest.mark.llamacpp(fn)
    return pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama_cpp not importable (scripts/llamacpp_check.sh)")(fn)


def sharpen(model_dir, seed: int = 0, std: float = 0.2) -> None:
    """Re-draw a tiny random model's matrices larger than init scale, so its next tokens are decided by
    clear margins (not near-ties that any rounding flips) and quantization error is visible."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, std)
    model.save_pretrained(model_dir)
