"""The GPU tier (`pytest -m gpu`, skipped without CUDA): every method on a tiny model in bf16 on the GPU,
QLoRA, the preference and RL stages, the varlen kernel against the padded path, Liger against plain,
and batch_size: auto shrinking after a real out-of-memory. Runs the CLI in-process (typer's runner):
one interpreter for the whole tier keeps it inside the device check's minutes."""

from __future__ import annotations

import gc
import json

import pytest
import yaml
from conftest import write_recipe

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MERGEABLE = ("lora", "qlora", "dora")


def cli(*args: str) -> str:
    from typer.testing import CliRunner

    from ftkit.cli import app

    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, f"ftkit {' '.join(args)}: exit {res.exit_code}\n{res.output[-3000:]}\n{res.exception!r}"
    return res.output


def metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


def losses(run) -> list[float]:
    return [h["loss"] for h in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in h]


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "prefix", "prompt", "full", "freeze"])
def test_every_method_trains_generates_and_merges_in_bf16(method, tmp_path, tiny_model, chat_file):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    extra = {"prompt": {"num_virtual_tokens": 4}, "prefix": {"num_virtual_tokens": 4}}.get(method, {})
    if method in MERGEABLE:
        extra = {"r": 4, "alpha": 8}
    r = write_recipe(tmp_path / "r.yaml", tiny_model, chat_file, train={"max_steps": 2})
    recipe = yaml.safe_load(r.read_text())
    recipe["method"] = {"type": method, **extra}  # replace, not merge: LoRA keys are errors on other types
    r.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    cli("sft", str(r))
    run = tmp_path / "run"
    m = metrics(run)
    assert m["device"] == "cuda" and m["precision"] == "bfloat16" and m["steps"] == 2
    flat = m["speed"]["padding_free"]
    if method in ("prefix", "prompt"):
        assert not flat["enabled"] and "virtual tokens" in flat["reason"]
    else:
        assert flat["attention"] == "ftkit_varlen", flat  # the kernel runs on this GPU, by default
    # Exit 0 is the check: a tiny random model's reply may well be blank.
    cli("generate", str(run), "-p", "What is 1 plus 2?", "--max-new-tokens", "4")
    if method in MERGEABLE:
        cli("merge-lora", str(run), "-o", str(tmp_path / "merged"))
        assert (tmp_path / "merged" / "config.json").exists()


def _pairs(path, n=8):
    rows = [{"prompt": f"Review item {i}.", "chosen": "It is great.", "rejected": "It is awful."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("stage", ["rm", "dpo", "kto", "orpo"])
def test_preference_stages_two_steps(stage, tmp_path, tiny_model):
    data = _pairs(tmp_path / "pairs.jsonl")
    if stage == "kto":
        rows = [{"prompt": f"Review item {i}.", "completion": "It is great." if i % 2 else "Awful.",
                 "label": bool(i % 2)} for i in range(8)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    r = write_recipe(tmp_path / "r.yaml", tiny_model, data, stage=stage, train={"max_steps": 2, "batch_size": 4})
    cli(stage, str(r))
    assert metrics(tmp_path / "run")["steps"] == 2


def test_rl_two_steps(tmp_path, tiny_model):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say hi {i}."}) + "\n" for i in range(8)), encoding="utf-8")
    r = write_recipe(tmp_path / "r.yaml", tiny_model, data, stage="rl", train={"max_steps": 2, "batch_size": 4},
                     rl={"num_generations": 2, "max_completion_length": 6,
                         "rewards": [{"type": "length", "target_chars": 10}]})
    cli("rl", str(r))
    assert metrics(tmp_path / "run")["steps"] == 2


def test_varlen_kernel_matches_the_reference_and_the_padded_loss(tiny_model):
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from ftkit import varlen

    torch.manual_seed(0)
    q = torch.randn(1, 4, 40, 16, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 40, 16, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu = torch.tensor([0, 7, 30, 40], device="cuda", dtype=torch.int32)
    got, _ = varlen.kernel_forward(None, q, k, v, None, scaling=0.25, cu_seq_lens_q=cu, max_length_q=23)
    want, _ = varlen.reference_forward(None, q, k, v, None, scaling=0.25, cu_seq_lens_q=cu, max_length_q=23)
    assert (got.float() - want.float()).abs().max().item() < 2e-2

    varlen.register()
    samples = [[5, 17, 99, 3, 42, 8, 11] * 5, [7, 21, 4], [64, 13, 2, 9, 31] * 3]
    loss = {}
    for attention, padding_free in (("sdpa", False), (varlen.KERNEL, True)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16, attn_implementation=attention)
        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)(
            [{"input_ids": s, "labels": s} for s in samples])
        loss[attention] = model.cuda()(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}).loss
    assert loss[varlen.KERNEL].item() == pytest.approx(loss["sdpa"].item(), rel=1e-2)  # bf16 tolerance


def test_cli_varlen_and_liger_learn_what_the_plain_padded_path_learns(tmp_path, tiny_model, chat_file):
    """plain: padded, no Liger; varlen: the kernel alone; defaults: varlen + Liger where liger-kernel is installed;
    liger: Liger alone."""
    from transformers.utils import is_liger_kernel_available

    runs = {}
    variants = [("plain", {"padding_free": False, "liger": False}), ("varlen", {"liger": False}), ("defaults", {})]
    if is_liger_kernel_available():
        variants.append(("liger", {"padding_free": False, "liger": True}))
    for name, train in variants:
        r = write_recipe(tmp_path / f"{name}.yaml", tiny_model, chat_file, output={"dir": str(tmp_path / name)},
                         train=train)
        cli("sft", str(r), "--no-cache")
        runs[name] = metrics(tmp_path / name)
        assert len(losses(tmp_path / name)) == 3
    assert runs["varlen"]["speed"]["padding_free"]["attention"] == "ftkit_varlen"
    assert runs["defaults"]["speed"]["padding_free"]["attention"] == "ftkit_varlen"
    assert runs["defaults"]["speed"]["liger"] is is_liger_kernel_available()
    for name, _ in variants[1:]:  # bf16 kernels: close, not bitwise
        assert losses(tmp_path / name) == pytest.approx(losses(tmp_path / "plain"), rel=2e-2), name


def test_auto_batch_shrinks_after_a_real_out_of_memory(tmp_path, tiny_model):
    from ftkit import speed

    data = tmp_path / "long.jsonl"
    words = " ".join(f"word{i}" for i in range(1500))
    data.write_text("".join(json.dumps({"text": words}) + "\n" for _ in range(64)), encoding="utf-8")
    r = write_recipe(tmp_path / "r.yaml", tiny_model, data, stage="pt", data={"max_length": 2048},
                     train={"batch_size": "auto", "max_steps": 1, "liger": False, "padding_free": False})
    gc.collect()  # earlier tests' models must not count against the cap
    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info()[1]
    # The start batch (64k tokens of 2048-token rows) needs ~13 GiB for its fp32 logits alone; 4 GiB does not hold it.
    torch.cuda.set_per_process_memory_fraction(4 * 2**30 / total)
    try:
        cli("pt", str(r), "--no-cache")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    m = metrics(tmp_path / "run")
    assert m["speed"]["auto_batch"] is True
    start = speed.AUTO_BATCH_TOKENS // 2048
    assert 0 < m["batch_size"] < start and m["steps"] == 1, m["batch_size"]



def test_compile_with_the_varlen_path_learns_what_eager_learns(tmp_path, tiny_model, chat_file):
    """Last in the file: compiling is the slowest test here, and a cut-off tier has reported the rest by then."""
    runs = {}
    for name, train in (("eager", {"liger": False}), ("compiled", {"liger": False, "compile": True})):
        r = write_recipe(tmp_path / f"{name}.yaml", tiny_model, chat_file, output={"dir": str(tmp_path / name)},
                         train=train)
        cli("sft", str(r), "--no-cache")
        runs[name] = metrics(tmp_path / name)
    assert runs["compiled"]["speed"]["compile"] is True
    assert runs["compiled"]["speed"]["padding_free"]["attention"] == "ftkit_varlen"
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=2e-2)
