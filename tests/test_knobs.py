"""Peer knobs (issue 20), sft side: LoRA inits (PiSSA/OLoRA/EVA/gaussian), LoRA+, rank/alpha patterns,
NEFTune, GaLore/APOLLO, and the peer-key table. Each trains two steps on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CHAT_ROWS, ftkit, write_recipe
from safetensors.torch import load_file

from ftkit import optim, peers
from ftkit.errors import UserError
from ftkit.recipe import Recipe, load_recipe
from ftkit.stages import sft

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("knobs") / "chat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS), encoding="utf-8")
    return p


@pytest.fixture
def captured(monkeypatch):
    """The trainer each stage builds (seen through optim.configure_trainer, which every stage calls)."""
    seen = []
    real = optim.configure_trainer

    def spy(trainer, recipe):
        seen.append(trainer)
        real(trainer, recipe)

    monkeypatch.setattr(optim, "configure_trainer", spy)
    return seen


def train(tmp_path, model, data, method=None, train=None, dtype="float32") -> Path:
    path = write_recipe(tmp_path / "r.yaml", model, data, model={"dtype": dtype})
    recipe = yaml.safe_load(path.read_text())
    recipe["train"].update(max_steps=2, batch_size=2, num_threads=1, **(train or {}))
    if method is not None:
        recipe["method"] = method
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    out = sft.run(load_recipe(path), overwrite=True)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ------------------------------------------------------------------------------ schema and peers


@pytest.mark.parametrize("doc, expect", [
    ({"method": {"init": "pisa"}}, "method.init"),
    ({"method": {"init": "pissa_niter_0"}}, "pissa_niter_N"),
    ({"method": {"type": "dora", "init": "olora"}}, "lora only"),
    ({"method": {"type": "lora", "init": "loftq"}}, "qlora with bits: 4"),
    ({"method": {"type": "prefix", "loraplus_lr_ratio": 16}}, "method.loraplus_lr_ratio applies"),
    ({"stage": "dpo", "method": {"init": "pissa"}}, "residual base"),
    ({"stage": "dpo", "method": {"init": "eva"}}, "eva runs its data pass"),
    ({"stage": "orpo", "method": {"type": "qlora", "init": "loftq"}}, "loftq is wired for the sft and pt"),
    ({"stage": "dpo", "train": {"neftune_noise_alpha": 5}}, "train.neftune_noise_alpha applies"),
    ({"train": {"optim": "galore_adamw"}}, "method.type: full, not lora"),
    ({"method": {"type": "full"}, "train": {"optim": "galore_adam"}}, "not a GaLore/APOLLO optimizer"),
    ({"train": {"optim_target_modules": ["attn"]}}, "applies to GaLore/APOLLO"),
    ({"rl": {"algorithm": "rloo", "scale_rewards": "none"}}, "rl.scale_rewards applies to algorithm grpo"),
    ({"rl": {"loss_type": "ppo"}}, "rl.loss_type"),
    ({"stage": "sft", "preference": {"precompute_ref_log_probs": True}}, "applies to dpo and kto"),
])
def test_knob_rules(tmp_path, doc, expect):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    with pytest.raises(UserError, match="r.yaml:") as exc:
        load_recipe(path)
    assert expect in str(exc.value)


def test_lowrank_optimizer_missing_package_names_the_install(tmp_path, monkeypatch, chat):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "apollo_torch" else real(name, *a))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"method": {"type": "full"}, "train": {"optim": "apollo_adamw"}}), encoding="utf-8")
    with pytest.raises(UserError, match=r"r.yaml:\d+: train.optim: apollo_adamw needs the apollo-torch package: "
                                        r"pip install apollo-torch"):
        load_recipe(path)


def test_peer_keys_get_the_ftkit_name(tmp_path, chat):
    path = tmp_path / "peer.yaml"
    path.write_text("stage: sft\nlora_rank: 8\nmethod:\n  lora_target: [q_proj]\ndata:\n  train: x.jsonl\n"
                    "train:\n  neftune_noise_alpha: 5\n  gradient_accumulation_steps: 2\n", encoding="utf-8")
    res = ftkit("validate", str(path))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    err = " ".join(res.stderr.split())  # rich wraps long lines
    assert f"{path}:2: unknown key 'lora_rank'; lora_rank (LLaMA-Factory) is method.r in ftkit" in err
    assert f"{path}:4: unknown key 'method.lora_target'; lora_target (LLaMA-Factory) is method.target_modules" in err
    assert "is train.grad_accum in ftkit" in err
    assert "unknown key 'train.neftune_noise_alpha'" not in err  # a real field there


def test_peer_table_points_at_real_fields_and_docs_match():
    sections = Recipe.model_fields
    for pk in peers.PEER_KEYS:
        head, _, tail = pk.field.partition(".")
        assert head in sections, pk
        if tail:
            assert tail in sections[head].annotation.model_fields, pk
        assert pk.key not in sections or pk.key in ("rl",), f"{pk.key} is an ftkit top-level key"
    assert (REPO / "docs" / "peers.md").read_text(encoding="utf-8") == peers.document(), \
        "docs/peers.md is stale: python -m ftkit.peers --write docs/peers.md"
    for key, field in (("lora_rank", "method.r"), ("neftune_noise_alpha", "train.neftune_noise_alpha"),
                       ("lora_target", "method.target_modules")):
        assert peers.lookup(key).field == field


# ------------------------------------------------------------------------------ LoRA inits


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_saves_plain_lora_on_original_base(tiny_model, chat, tmp_path, captured, init):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftkit.merge import merge_lora

    out = train(tmp_path, tiny_model, chat, {"type": "lora", "r": 4, "alpha": 8, "init": init,
                                             "target_modules": ["q_proj", "v_proj"]})
    trained = captured[0].model.eval()
    original = load_file(str(Path(tiny_model) / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    in_memory_base = trained.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.allclose(in_memory_base, original[key]), "the base should hold the residual"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True  # rank 2r, a plain LoRA

    ids = torch.tensor([[1, 42, 7, 99, 3, 12]])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(out)).eval()
    assert (logits(reloaded, ids) - logits(trained, ids)).abs().max().item() < 1e-4
    report = merge_lora(str(out), str(tmp_path / "merged"), log=lambda s: None)
    assert report["max_abs_logit_diff"] <= report["tolerance"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(merged, ids) - logits(trained, ids)).abs().max().item() < 1e-4


def test_eva_init_from_training_rows(tiny_model, chat, tmp_path, captured):
    out = train(tmp_path, tiny_model, chat, {"type": "lora", "r": 4, "alpha": 8, "init": "eva"},
                {"learning_rate": 1e-12})
    model = captured[0].model
    # EVA's A rows are principal directions of the layer inputs: orthonormal (peft's default is Kaiming).
    a = model.get_base_model().model.layers[0].mlp.down_proj.lora_A["default"].weight.float()
    assert torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=1e-3)
    assert json.loads((out / "adapter_config.json").read_text())["init_lora_weights"] == "eva"


def test_gaussian_init_and_patterns(tiny_model, chat, tmp_path):
    out = train(tmp_path, tiny_model, chat, {"type": "lora", "r": 4, "alpha": 8, "init": "gaussian",
                                             "rank_pattern": {"q_proj": 8}, "alpha_pattern": {"q_proj": 32}})
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] == "gaussian"
    assert cfg["rank_pattern"] == {"q_proj": 8} and cfg["alpha_pattern"] == {"q_proj": 32}
    w = load_file(str(out / "adapter_model.safetensors"))
    assert w["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 8
    assert w["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].shape[0] == 4


def test_loftq_refused_off_cuda(tiny_model, chat, tmp_path):
    from ftkit.hardware import detect

    if detect("auto").device == "cuda":
        pytest.skip("this checks the refusal where there is no GPU")
    path = write_recipe(tmp_path / "r.yaml", tiny_model, chat, method={"type": "qlora", "init": "loftq"})
    res = ftkit("sft", str(path))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "loftq runs on a CUDA GPU only" in " ".join(res.stderr.split())
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ LoRA+, NEFTune


def test_loraplus_b_learns_at_ratio_times_lr(tiny_model, chat, tmp_path, captured):
    train(tmp_path, tiny_model, chat, {"type": "lora", "r": 4, "alpha": 8, "loraplus_lr_ratio": 16},
          {"learning_rate": 1e-3, "lr_scheduler": "constant"})
    trainer = captured[0]
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    lr_of = {}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            lr_of[names[id(p)]] = group["lr"]
    a = [lr for n, lr in lr_of.items() if "lora_A" in n]
    b = [lr for n, lr in lr_of.items() if "lora_B" in n]
    assert a and b and set(a) == {1e-3}
    assert all(lr == pytest.approx(16e-3) for lr in b)


def test_neftune_noises_embeddings_in_training_only(tiny_model, chat, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    checks = []

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            emb = model.get_input_embeddings()
            ids = torch.tensor([[5, 6, 7, 8]])
            clean = emb.weight[ids].detach()
            was = emb.training
            with torch.no_grad():
                emb.train()
                noised = emb(ids)
                emb.eval()
                plain = emb(ids)
            emb.train(was)
            checks.append(((noised - clean).abs().max().item(), (plain - clean).abs().max().item()))

    real = optim.configure_trainer

    def add_probe(trainer, recipe):
        real(trainer, recipe)
        trainer.add_callback(Probe())

    monkeypatch.setattr(optim, "configure_trainer", add_probe)
    train(tmp_path, tiny_model, chat, train={"neftune_noise_alpha": 5})
    assert len(checks) == 2
    assert all(noise > 0 and plain == 0 for noise, plain in checks), checks


# ------------------------------------------------------------------------------ GaLore / APOLLO


@pytest.mark.parametrize("optimizer", ["galore_adamw", "apollo_adamw"])
def test_lowrank_optimizers_train_full(tiny_model, chat, tmp_path, optimizer, captured):
    pytest.importorskip(optimizer.split("_")[0] + "_torch")
    out = train(tmp_path, tiny_model, chat, {"type": "full"},
                {"optim": optimizer, "optim_args": "rank=4,update_proj_gap=1", "learning_rate": 1e-2})
    inner = getattr(captured[0].optimizer, "optimizer", captured[0].optimizer)
    assert optimizer.split("_")[0] in type(inner).__module__.lower(), type(inner)
    before = load_file(str(Path(tiny_model) / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(before[key], after[key].float())


@pytest.mark.gpu
@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="peft computes LoftQ on CUDA only")
def test_loftq_on_qlora_gpu(tiny_model, chat, tmp_path, monkeypatch):
    from ftkit.merge import merge_lora

    b_at_start = []
    real = optim.configure_trainer

    def spy(trainer, recipe):  # runs before the first step
        layer = trainer.model.get_base_model().model.layers[0].self_attn.q_proj
        b_at_start.append(layer.lora_B["default"].weight.abs().sum().item())
        real(trainer, recipe)

    monkeypatch.setattr(optim, "configure_trainer", spy)
    out = train(tmp_path, tiny_model, chat, {"type": "qlora", "r": 4, "alpha": 8, "init": "loftq"}, dtype="auto")
    # LoftQ starts B non-zero (B A carries the quantization residual); peft's default starts B at zero.
    assert b_at_start[0] > 0
    report = merge_lora(str(out), str(tmp_path / "merged"), log=lambda s: None)
    assert report["quantized_gap"] <= report["tolerance"]


def test_written_recipes_with_knobs_load_again(tmp_path):
    from ftkit.recipe import Recipe

    for doc in ({"stage": "rl", "rl": {"algorithm": "rloo"}},
                {"method": {"init": "pissa_niter_4", "loraplus_lr_ratio": 16, "rank_pattern": {"q_proj": 8}},
                 "train": {"neftune_noise_alpha": 5}},
                {"method": {"type": "full"}, "train": {"optim": "galore_adamw", "optim_args": "rank=4"}}):
        path = tmp_path / "r.yaml"
        path.write_text(Recipe.model_validate(doc).to_yaml(), encoding="utf-8")
        again = load_recipe(path)
        assert again.model_dump() == Recipe.model_validate(doc).model_dump()
