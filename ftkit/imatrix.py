"""An importance matrix for llama.cpp's k-quants, from the user's calibration text.

llama.cpp's `llama-imatrix` records, for every matrix a layer multiplies, the mean square of each
input column over calibration tokens; `llama_model_quantize` then spends precision where those
activations are large. llama-cpp-python does not expose that tool, so ftkit gathers the same
statistic from the HF model (forward hooks on every linear layer) and hands it to llama.cpp's
quantizer under the GGUF tensor names. Input columns are unchanged by the writer's row
permutations and QKV regrouping, so the statistic applies to the written tensors as is.
"""

from __future__ import annotations

from pathlib import Path

from ftkit.errors import UserError

CHUNK = 256  # tokens per forward pass (llama-imatrix's default context is 512)
MAX_CHUNKS = 32


def compute_imatrix(model, tok, src_dir: Path, text_file: Path) -> dict[str, list[float]]:
    import torch
    from transformers import AutoConfig
    from transformers.pytorch_utils import Conv1D

    from ftkit.gguf_writer import check_architecture, name_mapper

    text = text_file.read_text(encoding="utf-8", errors="strict")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 16:
        raise UserError(f"--imatrix-text: {text_file} has {len(ids)} tokens; give at least a few paragraphs")
    config = AutoConfig.from_pretrained(src_dir)
    gguf_name = name_mapper(config, check_architecture(config))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def record(_module, inputs, _output):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    for mod_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            target = gguf_name(f"{mod_name}.weight")
            if target is not None:
                hooks.append(module.register_forward_hook(hook(target)))
    try:
        with torch.no_grad():
            for start in range(0, min(len(ids), CHUNK * MAX_CHUNKS), CHUNK):
                chunk = ids[start:start + CHUNK]
                if len(chunk) >= 2:
                    model(torch.tensor([chunk]))
    finally:
        for h in hooks:
            h.remove()
    return {name: (sums[name] / counts[name]).tolist() for name in sums}
