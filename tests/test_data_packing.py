"""Packing must not change what is learned; the cache must be reused; the run keeps the training template."""

from __future__ import annotations

import json

import pytest
from conftest import CHAT_ROWS, ftkit, write_recipe

from ftkit.data.templates import CHATML
from ftkit.data.tokenize import IGNORE, encode_rows


def _loss_sum(model, batch) -> tuple[float, int]:
    """Summed next-token CE over trained labels (a sum, so batch composition does not matter)."""
    import torch

    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits.double()
    shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")
    return loss.item(), int((shift_labels != IGNORE).sum())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(tiny_model, attn):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from ftkit.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attn).eval()
    rows = [dict(r, where=f"r{i}") for i, r in enumerate(CHAT_ROWS[:6])]
    samples = encode_rows(rows, tok, CHATML, "responses", 64)

    unpacked = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)
    ref_loss, ref_n = _loss_sum(model, unpacked(samples))

    packed_ds = pack_dataset(Dataset.from_list(samples), seq_length=64, strategy="bfd")
    assert len(packed_ds) < len(samples)  # several samples really share a row
    collate = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)
    batch = collate(list(packed_ds))
    loss, n = _loss_sum(model, dict(batch))
    assert n == ref_n
    assert loss == pytest.approx(ref_loss, rel=1e-6)

    # The same packed tokens without their sample boundaries attend across samples: the loss moves.
    # (Shows the comparison above can fail.)
    leaky = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    leak_loss, _ = _loss_sum(model, leaky)
    assert abs(leak_loss - ref_loss) > 1e-3 * abs(ref_loss)


def test_cache_hit_on_second_prepare_and_miss_after_a_change(tmp_path, monkeypatch, tiny_model, chat_file):
    from ftkit.data import prepare
    from ftkit.models import load_tokenizer
    from ftkit.recipe import load_recipe

    monkeypatch.setenv("FTKIT_HOME", str(tmp_path / "home"))
    tok = load_tokenizer(str(tiny_model))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, chat_file)
    logs = []
    first = prepare(load_recipe(recipe), tok, log=logs.append)
    second = prepare(load_recipe(recipe), tok, log=logs.append)
    assert (first.cache, second.cache) == ("miss", "hit")
    assert list(second.train) == list(first.train) and second.train_stats.summary() == first.train_stats.summary()
    assert prepare(load_recipe(recipe), tok, cache=False).cache == "off"
    assert prepare(load_recipe(recipe, ["data.train_on=all"]), tok).cache == "miss"
    chat_file.write_text(chat_file.read_text() + json.dumps(CHAT_ROWS[0]) + "\n")
    changed = prepare(load_recipe(recipe), tok)
    assert changed.cache == "miss" and len(changed.train) == len(first.train) + 1


def test_sft_with_packing_reports_tokens_per_step_and_saves_the_training_template(tmp_path, monkeypatch, tiny_model, chat_file):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, chat_file,
                          data={"packing": True, "template": "chatml", "max_length": 128})
    monkeypatch.setenv("FTKIT_HOME", str(tmp_path / "home"))
    res = ftkit("sft", str(recipe), "--set", "train.max_steps=2", "--set", "train.batch_size=2")
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "run"
    m = json.loads((run / "metrics.json").read_text())
    assert m["packing"]["enabled"] and m["packing"]["rows"] < m["packing"]["samples"] == len(CHAT_ROWS)
    assert m["tokens_per_step"] == pytest.approx(m["tokens"] / m["steps"], rel=1e-3) and m["tokens_per_step"] > 0
    saved = json.loads((run / "tokenizer_config.json").read_text()).get("chat_template")
    if saved is None:
        saved = (run / "chat_template.jinja").read_text()
    assert saved == CHATML and m["data"]["cache"] == "miss"
