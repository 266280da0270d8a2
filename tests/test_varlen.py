"""Padding-free batches: the varlen path (here its per-sample SDPA reference, which a CPU runs) gives the
padded path's loss and gradients, no sample sees another, and the decision falls back with a reason."""

from __future__ import annotations

import inspect
import json

import pytest
from conftest import ftkit, write_recipe

from ftkit import speed, varlen
from ftkit.errors import UserError
from ftkit.hardware import Hardware
from ftkit.recipe import Recipe

CPU = Hardware("cpu", "test CPU", "float32", "test", 2, 0)
GPU = Hardware("cuda", "test GPU", "bfloat16", "test", 1, 1)
SAMPLES = [[5, 17, 99, 3, 42, 8, 11], [7, 21, 4], [64, 13, 2, 9, 31]]


def _model(tiny_model, attention):
    import torch
    from transformers import AutoModelForCausalLM

    varlen.register()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attention)


def _batch(samples, padding_free):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)
    return collate([{"input_ids": s, "labels": s} for s in samples])


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_reference_gives_the_padded_loss_and_gradients(tiny_model):
    padded = _model(tiny_model, "sdpa")
    flat = _model(tiny_model, varlen.REFERENCE)
    flat_batch = _batch(SAMPLES, True)
    assert flat_batch["input_ids"].shape == (1, sum(map(len, SAMPLES)))  # one row, no padding
    assert flat_batch["position_ids"][0].tolist()[:8] == [0, 1, 2, 3, 4, 5, 6, 0]  # positions restart per sample
    want_loss, want = _loss_and_grads(padded, _batch(SAMPLES, False))
    got_loss, got = _loss_and_grads(flat, flat_batch)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert got.keys() == want.keys() and len(got) > 10
    for name, g in got.items():
        assert (g - want[name]).abs().max().item() < 1e-6, name


def test_no_sample_sees_another(tiny_model):
    import torch

    model = _model(tiny_model, varlen.REFERENCE).eval()
    changed = [SAMPLES[0], [8, 8, 8], SAMPLES[2]]  # only the middle sample differs
    with torch.no_grad():
        a = model(**{k: v for k, v in _batch(SAMPLES, True).items() if k != "labels"}).logits[0]
        b = model(**{k: v for k, v in _batch(changed, True).items() if k != "labels"}).logits[0]
    first, last = len(SAMPLES[0]), len(SAMPLES[0]) + len(SAMPLES[1])
    assert torch.equal(a[:first], b[:first]) and torch.equal(a[last:], b[last:])
    assert not torch.allclose(a[first:last], b[first:last])  # the perturbation is visible where it belongs


def _dense_fake_kernel(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False):
    """A torch-2.10-shaped stand-in (is_causal, no scale, no GQA) computing one masked SDPA over all tokens."""
    import torch
    import torch.nn.functional as F

    assert is_causal and k.shape[1] == q.shape[1] and max_q == int(cu_q.diff().max())
    seq = torch.repeat_interleave(torch.arange(len(cu_q) - 1), cu_q.diff())
    n = q.shape[0]
    mask = (seq[:, None] == seq[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)


def _dense_fake_kernel_new(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """The later signature: window_size=(-1, 0) means causal; scale and enable_gqa are passed through."""
    assert tuple(window_size) == (-1, 0)
    if enable_gqa:
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    return _dense_fake_kernel(q * (scale * q.shape[-1] ** 0.5 if scale else 1.0), k, v, cu_q, cu_k, max_q, max_k,
                              is_causal=True)


@pytest.mark.parametrize("kernel", [_dense_fake_kernel, _dense_fake_kernel_new], ids=["torch2.10", "torch2.11+"])
def test_kernel_call_adapts_to_each_signature_and_matches_the_reference(kernel):
    """The kernel itself needs CUDA; its call (layout, causal flag, GQA, scale) is checked against a dense stand-in."""
    import torch

    torch.manual_seed(0)
    lens = [5, 2, 6]
    q = torch.randn(1, 4, sum(lens), 8)
    k, v = torch.randn(1, 2, sum(lens), 8), torch.randn(1, 2, sum(lens), 8)  # 2 kv heads: GQA
    cu = torch.tensor([0, 5, 7, 13], dtype=torch.int32)
    want, _ = varlen.reference_forward(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=6)
    flat = [varlen._flat(x) for x in (q, k, v)]
    got = varlen.call_kernel(*flat, cu, 6, 0.3, kernel=kernel).reshape(want.shape)
    assert want.shape == (1, 13, 4, 8)
    assert (got - want).abs().max().item() < 1e-5
    assert "window_size" in inspect.signature(_dense_fake_kernel_new).parameters  # both spellings are covered


def test_kernel_inputs_share_one_half_dtype():
    """fp32 norms under bf16 autocast leave q/k in fp32 after RoPE and v in bf16; the flash kernel takes one half dtype."""
    import torch

    q, k, v = torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), torch.zeros(3, 2, 8, dtype=torch.bfloat16)
    assert {x.dtype for x in varlen.half_inputs(q, k, v)} == {torch.bfloat16}
    with torch.autocast("cpu", dtype=torch.float16):
        assert {x.dtype for x in varlen.half_inputs(q, k, v)} == {torch.float16}
    assert {x.dtype for x in varlen.half_inputs(q, k, v.float())} == {torch.bfloat16}


def test_the_decision_falls_back_with_a_reason(tiny_model):
    model = _model(tiny_model, "sdpa")
    assert varlen.plan(Recipe(), CPU, model) == varlen.Plan(None, "the varlen kernel needs a CUDA GPU; "
                                                                   "this run is on test CPU")
    assert varlen.plan(Recipe(train={"padding_free": True}), CPU, model).attention == varlen.REFERENCE
    assert varlen.plan(Recipe(train={"padding_free": False}), GPU, model).reason == "padding_free: false"
    fp32_gpu = Hardware("cuda", "test GPU", "float32", "test", 1, 1)
    assert "bf16/fp16" in varlen.plan(Recipe(), fp32_gpu, model).reason
    prefix = Recipe(method={"type": "prefix"})
    assert "virtual tokens" in varlen.plan(prefix, GPU, model).reason
    assert "neftune" in varlen.plan(Recipe(train={"neftune_noise_alpha": 5.0}), GPU, model).reason
    with pytest.raises(UserError, match="train.padding_free: true: method.type prefix"):
        varlen.plan(Recipe(method={"type": "prefix"}, train={"padding_free": True}), CPU, model)
    model.config.sliding_window = 16
    assert varlen.plan(Recipe(), GPU, model).reason == "llama uses sliding-window attention"


def test_auto_batch_sizes_padding_free_rows_by_the_mean_sample_length():
    r = Recipe(data={"max_length": 2048}, train={"batch_size": "auto"})
    assert speed.batch_size(r, GPU) == 32  # padded rows: 64k tokens of max_length rows
    assert speed.batch_size(r, GPU, mean_length=500) == 128  # flat rows cost their own tokens
    packed = Recipe(data={"max_length": 2048, "packing": True}, train={"batch_size": "auto"})
    assert speed.batch_size(packed, GPU, mean_length=500) == 32  # packed rows are full
    assert speed.batch_size(r, CPU, mean_length=500) == speed.AUTO_BATCH_CPU


def test_low_memory_checkpoints_and_is_refused_where_it_cannot_apply(tmp_path):
    assert speed.memory_kwargs(Recipe(train={"low_memory": True}), CPU) == (
        {"activation_checkpointing": True}, "low-memory: activation checkpointing")
    assert speed.memory_kwargs(Recipe(), GPU) == ({}, None)
    p = tmp_path / "r.yaml"
    p.write_text("model: {name: x}\ndata: {train: a.jsonl}\ntrain:\n  low_memory: true\n"
                 "  activation_checkpointing: false\n")
    res = ftkit("validate", str(p))
    assert res.returncode == 2 and "train.low_memory: true turns activation checkpointing on" in res.stderr


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_cli_padding_free_run_learns_what_the_padded_run_learns(tmp_path, tiny_model, chat_file):
    runs = {}
    for name, value in (("padded", False), ("flat", True)):
        r = write_recipe(tmp_path / f"{name}.yaml", tiny_model, chat_file, output={"dir": str(tmp_path / name)},
                         model={"name": str(tiny_model), "dtype": "float32"}, train={"padding_free": value},
                         data={"eval_split": 0.25})
        res = ftkit("sft", str(r), "--no-cache")
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
        assert ("padding-free (per-sample SDPA reference)" if value else "padded (padding_free: false)") in res.stdout
    flat = runs["flat"]["speed"]["padding_free"]
    assert flat["attention"] == varlen.REFERENCE and "needs a CUDA GPU" in flat["reason"]
    want, got = _losses(tmp_path / "padded"), _losses(tmp_path / "flat")
    assert len(want) == len(got) == 3
    assert got == pytest.approx(want, rel=1e-4)
    assert runs["flat"]["eval_loss"] == pytest.approx(runs["padded"]["eval_loss"], rel=1e-4)
    assert runs["flat"]["tokens"] == runs["padded"]["tokens"]  # the same real tokens, none of them padding
