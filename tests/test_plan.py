"""`ftkit plan`: exact parameter counts from a meta-device model, memory arithmetic that follows the recipe
(method, strategy, checkpointing, GPUs), and a layer's activations equal to what autograd keeps. The whole
estimate against measured peaks (+0.3% to +10.8% on CPU) is benchmarks/plan_accuracy.py's."""

from __future__ import annotations

import json

import pytest
from conftest import ftkit, write_recipe

from ftkit.plan import parse_size, plan
from ftkit.recipe import load_recipe


def _recipe(tmp_path, tiny_model, chat_file, *sets: str):
    path = write_recipe(tmp_path / "r.yaml", tiny_model, chat_file)
    return load_recipe(path, list(sets))


@pytest.mark.parametrize("method", ["lora", "full", "prompt"])
def test_counts_equal_the_loaded_model(tmp_path, tiny_model, chat_file, method):
    import torch
    from transformers import AutoModelForCausalLM

    from ftkit.methods import apply_method, count_params

    sets = () if method == "lora" else (f"method={{type: {method}}}",)
    r = _recipe(tmp_path, tiny_model, chat_file, *sets)
    p = plan(r)
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), r.method,
                         log=lambda _s: None)
    real = count_params(model)
    assert (p.total_params, p.trainable_params) == (real["total_params"], real["trainable_params"])


def test_memory_follows_the_recipe(tmp_path, tiny_model, chat_file):
    base = _recipe(tmp_path, tiny_model, chat_file, "model.dtype=bfloat16")
    lora = plan(base, gpus=1)
    full = plan(_recipe(tmp_path, tiny_model, chat_file, "model.dtype=bfloat16", "method={type: full}"), gpus=1)
    qlora = plan(_recipe(tmp_path, tiny_model, chat_file, "model.dtype=bfloat16", "method.type=qlora"), gpus=1)
    # Trained weights are fp32 masters under bf16 autocast, so are their gradients and Adam's two states.
    assert full.optimizer == 2 * 4 * full.trainable_params and full.gradients == 4 * full.trainable_params
    assert lora.gradients == 4 * lora.trainable_params
    assert qlora.trainable_params == lora.trainable_params
    # The tiny model is mostly embeddings, which QLoRA keeps in fp32: 4-bit does not pay there.
    assert qlora.weights > lora.weights
    ckpt = plan(_recipe(tmp_path, tiny_model, chat_file, "model.dtype=bfloat16",
                        "train.activation_checkpointing=true"), gpus=1)
    assert ckpt.activations < lora.activations
    full_fsdp = plan(_recipe(tmp_path, tiny_model, chat_file, "model.dtype=bfloat16", "method={type: full}",
                             "distributed=fsdp"), gpus=4)
    assert full_fsdp.weights == full.weights // 4 and full_fsdp.optimizer == full.optimizer // 4
    zero2 = plan(_recipe(tmp_path, tiny_model, chat_file, "model.dtype=bfloat16", "method={type: full}",
                         "distributed=deepspeed"), gpus=4)
    assert zero2.weights == full.weights and zero2.optimizer == full.optimizer // 4
    # A float32 base stays float32 under full/freeze (saved whole), so its frozen weights cost 4 bytes too.
    freeze = plan(_recipe(tmp_path, tiny_model, chat_file, "model.dtype=bfloat16", "method={type: freeze}"), gpus=1)
    assert freeze.weights == 4 * freeze.total_params and lora.weights < 4 * lora.total_params
    assert plan(base, gpus=1, gpu_memory=full.total).fits is True
    assert plan(base, gpus=1, gpu_memory=lora.total - 1).fits is False


def test_qlora_saves_on_a_real_shape(tmp_path, embedded_dir, chat_file):
    lora = plan(_recipe(tmp_path, embedded_dir, chat_file, "model.dtype=bfloat16"), gpus=1)
    qlora = plan(_recipe(tmp_path, embedded_dir, chat_file, "model.dtype=bfloat16", "method.type=qlora"), gpus=1)
    assert lora.total_params == 134_515_008 + lora.trainable_params  # SmolLM2-135M, tied embeddings
    assert qlora.weights < 0.7 * lora.weights


def test_parse_size():
    assert parse_size("80GiB") == parse_size("80GB") == parse_size("80g") == 80 * 2**30
    assert parse_size("40960MiB") == 40 * 2**30


def test_cli_json_and_bad_size(tmp_path, tiny_model, chat_file):
    path = write_recipe(tmp_path / "r.yaml", tiny_model, chat_file)
    res = ftkit("plan", str(path), "--gpus", "8", "--gpu-memory", "80GiB", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["world_size"] == 8 and out["fits"] is True and out["total"] > out["weights"] > 0
    bad = ftkit("plan", str(path), "--gpu-memory", "lots")
    assert bad.returncode == 2 and "--gpu-memory 'lots'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("method", ["lora", "full"])
def test_layer_activations_are_what_autograd_saves(tmp_path, tiny_model, chat_file, method):
    """The per-layer activation formula against the tensors autograd really keeps for backward (counted with
    saved-tensor hooks, once per storage) in the tiny model's decoder layers, fp32, SDPA, training mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftkit.methods import apply_method
    from ftkit.plan import layer_bytes_per_token

    r = _recipe(tmp_path, tiny_model, chat_file, *(() if method == "lora" else ("method={type: full}",)))
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32,
                                                              attn_implementation="sdpa"), r.method, log=lambda _s: None)
    model.train()
    layers = [m for n, m in model.named_modules() if n.endswith("layers") and isinstance(m, torch.nn.ModuleList)][0]
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved, on = {}, [False]

    def pack(t):
        st = t.untyped_storage()
        if on[0] and st._cdata not in params:
            saved[st._cdata] = st.nbytes()
        return t

    layers[0].register_forward_pre_hook(lambda *_: on.__setitem__(0, True))
    layers[-1].register_forward_hook(lambda *_: on.__setitem__(0, False))
    batch, seq = 4, 48
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    cfg = model.config
    planned = batch * seq * len(layers) * layer_bytes_per_token(
        cfg, 4, trains_norms=method == "full", dropout=method == "lora", attention_scores=False, seq_len=seq)
    measured = sum(saved.values())
    assert abs(planned / measured - 1) < 0.10, f"planned {planned} vs saved {measured} bytes"
