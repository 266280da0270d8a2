"""ftkit export: the GGUF writer's layout (transformers reads back what it wrote), exports judged by
llama.cpp (marked llamacpp), k-quants and the importance matrix, LoRA merged on the way, bitsandbytes
4-bit, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ftkit
from gguf_helpers import llamacpp

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["The capital of France is Paris.", "def add(a, b):\n    return a + b", "Once upon a time, 42 cats sat.",
         "Hello, world! How are you today?"] * 20
PROBES = ["The capital of France", "def add(x, y):", "<|im_start|>user\nhi<|im_end|>\n"]


def build_small_llama(out: Path, tied: bool = True) -> Path:
    """A random 2-layer llama with its own 300-token byte-level BPE, so GGUF files stay small and fast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(out)
    cfg = LlamaConfig(vocab_size=len(tok) + 4, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger than init scale, so quantization error is visible in the logits
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory) -> Path:
    return build_small_llama(tmp_path_factory.mktemp("small") / "small-llama")


@pytest.fixture(scope="module")
def small_llama_untied(tmp_path_factory) -> Path:
    return build_small_llama(tmp_path_factory.mktemp("small") / "small-llama-untied", tied=False)


def logits(model, tok):
    enc = tok(PROBES, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits, enc["attention_mask"].bool()


def max_diff(a, b) -> float:
    (la, mask), (lb, _) = a, b
    return (la - lb).abs().amax(-1)[mask].max().item()


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def load_source(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def run_export(src, fmt, quant, out, **kw) -> dict:
    from ftkit.export import export

    return export(str(src), fmt, quant, str(out), log=lambda s: None, **kw)


def write(src: Path, out: Path, quant: str) -> Path:
    """ftkit's GGUF writer alone (no llama.cpp): what CI can check of the file's layout."""
    from transformers import AutoTokenizer

    from ftkit.gguf_writer import write_gguf

    write_gguf(src, out, AutoTokenizer.from_pretrained(src), quant, src.name)
    return out


@pytest.mark.parametrize("fixture", ["small_llama", "small_llama_untied"])
def test_gguf_writer_f32_round_trip(request, tmp_path, fixture):
    from gguf import GGUFReader

    src = request.getfixturevalue(fixture)
    out = write(src, tmp_path / "model.gguf", "f32")
    model, tok = load_source(src)
    g_model, g_tok = load_gguf(out)
    assert max_diff(logits(model, tok), logits(g_model, tok)) < 1e-4
    # The tokenizer travels too: same ids, same special tokens, same chat template.
    for text in PROBES + TEXTS[:4]:
        assert g_tok(text)["input_ids"] == tok(text)["input_ids"], text
    assert g_tok.eos_token == tok.eos_token and g_tok.bos_token == tok.bos_token
    msgs = [{"role": "user", "content": "hi"}]
    assert g_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    reader = GGUFReader(out)
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight", "output_norm.weight"} <= names
    assert ("output.weight" in names) == (fixture == "small_llama_untied")
    assert bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode() == "gpt-2"


def test_rotary_permutation_matches_what_llama_cpp_readers_undo():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from ftkit.gguf_writer import _permute_rotary

    w = np.arange(128 * 3, dtype=np.float32).reshape(128, 3)  # a k_proj: 2 kv heads x 64 rows
    permuted = _permute_rotary(w, 8, 2)
    assert not np.array_equal(permuted, w)
    undo = LlamaTensorProcessor(config={"num_attention_heads": 8, "num_key_value_heads": 2})
    assert np.array_equal(undo._reverse_permute_weights(permuted, 8, 2), w)
    # One head of 4 rows: halves (0, 1 | 2, 3) become pairs (0, 2), (1, 3), as llama.cpp's rope reads them.
    one = np.arange(4, dtype=np.float32).reshape(4, 1)
    assert _permute_rotary(one, 1, 1).ravel().tolist() == [0, 2, 1, 3]


@pytest.mark.parametrize("quant,tol", [("f16", 0.25), ("q8_0", 2.0)])
def test_writer_file_types_within_tolerance(small_llama, tmp_path, quant, tol):
    from gguf import GGMLQuantizationType, GGUFReader

    out = write(small_llama, tmp_path / f"model-{quant}.gguf", quant)
    model, tok = load_source(small_llama)
    diff = max_diff(logits(model, tok), logits(load_gguf(out)[0], tok))
    assert 0 < diff < tol  # lossy, but within the stated tolerance
    types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    want = GGMLQuantizationType.F16 if quant == "f16" else GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_q.weight"] == want and types["token_embd.weight"] == want
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32


def test_gguf_export_without_llama_cpp_is_exit_2_with_the_install_line(small_llama, tmp_path, monkeypatch):
    import sys

    from ftkit.errors import UserError

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    with pytest.raises(UserError, match=r"pip install 'ftkit\[gguf\]'"):
        run_export(small_llama, "gguf", "q4_k_m", tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


@llamacpp
@pytest.mark.parametrize("quant", ["f32", "q8_0", "q4_k_m"])
def test_export_is_judged_by_llama_cpp(small_llama, tmp_path, quant):
    from gguf import GGMLQuantizationType, GGUFReader

    from ftkit.llamacpp import FTYPES

    out = tmp_path / f"model-{quant}.gguf"
    r = ftkit("export", str(small_llama), "--format", "gguf", "--quantize", quant, "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verified by llama.cpp: next-token agreement" in r.stdout and "tokenization identical" in r.stdout
    report = json.loads((tmp_path / f"model-{quant}.export.json").read_text())
    assert report["next_token_agreement"] >= report["min_agreement"] and not report["failures"]
    assert report["end_of_turn"] == "<|im_end|>" and report["end_of_turn_is_eog"]
    assert report["chat"]["finish_reason"] in ("stop", "length")
    reader = GGUFReader(out)
    assert int(reader.fields["general.file_type"].parts[-1][0]) == FTYPES[quant]  # llama.cpp's own ftype
    q_type = {t.name: t.tensor_type for t in reader.tensors}["blk.0.attn_q.weight"]
    # k-quants pack rows in blocks of 256; this model's rows are 64 wide, so llama.cpp's quantizer picks its
    # own fallback for them (Q5_0 for q4_k_m) -- still quantized, still llama.cpp's choice.
    assert (q_type == GGMLQuantizationType.F32) == (quant == "f32")
    assert (tmp_path / f"model-{quant}.Modelfile").read_text().startswith(f"FROM ./model-{quant}.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [out.name, f"model-{quant}.Modelfile", f"model-{quant}.export.json"])  # no temp files left


@llamacpp
def test_imatrix_guides_k_quants(small_llama, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(TEXTS), encoding="utf-8")
    out = tmp_path / "m.gguf"
    report = run_export(small_llama, "gguf", "q4_k_m", out, imatrix_text=str(calib))
    assert report["imatrix_tensors"] >= 14  # 7 matrices per layer x 2 layers
    assert not report["failures"]


@llamacpp
def test_failed_verification_leaves_nothing(small_llama, tmp_path, monkeypatch):
    from ftkit import llamacpp as lc
    from ftkit.errors import VerificationFailed

    monkeypatch.setitem(lc.MIN_AGREEMENT, "q8_0", 1.01)  # unreachable: the check must fail and clean up
    out = tmp_path / "model.gguf"
    with pytest.raises(VerificationFailed, match="next-token agreement"):
        run_export(small_llama, "gguf", "q8_0", out)
    assert list(tmp_path.iterdir()) == []


@llamacpp
def test_lora_run_dir_is_merged_first(small_llama, tmp_path):
    import numpy as np
    from peft import LoraConfig, PeftModel, get_peft_model

    from ftkit import llamacpp as lc

    model, tok = load_source(small_llama)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter, not the zero init
    run = tmp_path / "run"
    peft_model.save_pretrained(run)
    tok.save_pretrained(run)
    (run / "recipe.yaml").write_text(f"model:\n  name: {small_llama}\ndata:\n  system: Be terse.\n", encoding="utf-8")
    out = tmp_path / "tuned.gguf"
    run_export(run, "gguf", "f32", out)
    assert 'SYSTEM """Be terse."""' in (tmp_path / "tuned.Modelfile").read_text()
    tuned = PeftModel.from_pretrained(load_source(small_llama)[0], str(run)).eval()
    base = load_source(small_llama)[0]
    ids = tok(PROBES[0])["input_ids"]
    llm = lc.load(out)
    try:
        llm.eval(ids)
        cpp = np.asarray(llm.scores[:len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        want, plain = tuned(torch.tensor([ids])).logits[0].numpy(), base(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(cpp - want).max() < 1e-2 < np.abs(cpp - plain).max()  # the adapter is in there


def test_bnb_4bit_checkpoint_loads(small_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bnb"
    run_export(small_llama, "safetensors", "bnb-4bit", out)
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["load_in_4bit"] is True
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    report = json.loads((out / "ftkit_export.json").read_text())
    assert 0 < report["max_abs_logit_diff"] <= report["tolerance"]


@pytest.mark.parametrize("args,msg", [
    (["--format", "gguf", "--quantize", "bnb-4bit"], "--quantize"),
    (["--format", "onnx"], "--format"),
    (["--format", "safetensors", "--quantize", "q8_0"], "--quantize"),
])
def test_bad_arguments_are_exit_2(small_llama, tmp_path, args, msg):
    out = tmp_path / "x.gguf" if "gguf" in args else tmp_path / "x"
    r = ftkit("export", str(small_llama), *args, "-o", str(out))
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr


def test_output_rules_are_exit_2(small_llama, tmp_path):
    r = ftkit("export", str(small_llama), "--format", "gguf", "-o", str(tmp_path / "model.bin"))
    assert r.returncode == 2 and "*.gguf" in r.stderr
    taken = tmp_path / "taken.gguf"
    taken.write_text("keep me")
    r = ftkit("export", str(small_llama), "--format", "gguf", "-o", str(taken))
    assert r.returncode == 2 and "--overwrite" in r.stderr and taken.read_text() == "keep me"


@llamacpp
@pytest.mark.e2e
def test_embedded_model_gguf_judged_by_llama_cpp(embedded_dir, tmp_path):
    """The embedded model leaves as a q8_0 GGUF that llama.cpp runs like the source and that stops after one turn."""
    out = tmp_path / "smollm2-q8_0.gguf"
    r = ftkit("export", "smollm2-135m-instruct", "--format", "gguf", "--quantize", "q8_0", "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "smollm2-q8_0.export.json").read_text())
    assert report["next_token_agreement"] >= 0.9 and not report["tokenization_mismatches"]
    chat = report["chat"]
    assert chat["hf_stopped"] and chat["finish_reason"] == "stop" and "Paris" in chat["reply"], chat


@llamacpp
@pytest.mark.e2e
def test_round_trip_gguf_in_finetune_gguf_out(embedded_dir, chat_file, tmp_path):
    """The documented loop: the embedded GGUF model is fine-tuned (LoRA) and leaves as a GGUF with the adapter in it."""
    from peft import PeftModel

    from conftest import write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", "smollm2-135m-instruct", chat_file)  # 3 LoRA steps
    r = ftkit("sft", str(recipe))
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "run"
    out = tmp_path / "tuned-f16.gguf"
    r = ftkit("export", str(run), "--format", "gguf", "--quantize", "f16", "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "merged" in r.stdout and "verified by llama.cpp" in r.stdout
    base, tok = load_source(embedded_dir)
    tuned = PeftModel.from_pretrained(load_source(embedded_dir)[0], str(run)).eval()
    g_model = load_gguf(out)[0]
    assert max_diff(logits(tuned, tok), logits(g_model, tok)) < 0.25
    assert max_diff(logits(tuned, tok), logits(g_model, tok)) < max_diff(logits(base, tok), logits(g_model, tok))
