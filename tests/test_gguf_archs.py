"""The GGUF writer across the architecture matrix: llama.cpp's names and layouts for every family it
runs, refusals with reasons for the ones it cannot, and (marked llamacpp) llama.cpp itself loading each
file with the HF tokenizer's token ids and the HF model's next tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from archs import available_families, build_arch
from conftest import ftkit
from gguf_helpers import llamacpp, sharpen

RUNS_IN_LLAMA_CPP = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "bloom",
                     "falcon"]
# transformers' own GGUF reader understands these families' files, a second opinion on the tensor layout
# that needs no llama.cpp (it lacks gemma/gptneox, and reads qwen3 head_dim / gpt2 context incompletely).
HF_READS = ["llama", "qwen2", "phi3", "bloom", "falcon"]
TEXTS = ["The capital of France is Paris.", "def add(a, b):\n    return a + b", "1234567 + 89 = ?",
         "<|im_start|>user\nhi<|im_end|>\n", "naïve café — 東京 🚀", "  leading spaces\tand tabs\n\n"]


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, embedded_dir):
    made = {}

    def make(family: str) -> Path:
        if family not in available_families():
            pytest.skip(f"transformers has no {family}")
        if family not in made:
            out = build_arch(family, tmp_path_factory.mktemp("arch") / family, embedded_dir)
            sharpen(out)
            made[family] = out
        return made[family]

    return make


def write(src: Path, out: Path, quant: str = "f32") -> Path:
    from transformers import AutoTokenizer

    from ftkit.gguf_writer import write_gguf

    write_gguf(src, out, AutoTokenizer.from_pretrained(src), quant, src.name)
    return out


@pytest.mark.parametrize("family", RUNS_IN_LLAMA_CPP)
def test_writer_uses_llama_cpp_names(family_dir, tmp_path, family):
    from gguf import GGUFReader

    from ftkit.gguf_writer import ARCHS

    src = family_dir(family)
    out = write(src, tmp_path / f"{family}.gguf")
    reader = GGUFReader(out)
    field = lambda k: bytes(reader.fields[k].parts[-1]).decode()  # noqa: E731
    arch = field("general.architecture")
    from transformers import AutoConfig

    assert arch == ARCHS[AutoConfig.from_pretrained(src).architectures[0]].gguf
    # The name llama.cpp's loader knows for the splitting the tokenizer really runs: the tiny models
    # share SmolLM2's tokenizer ("gpt-2", not "gpt2"), except that transformers' Qwen2Tokenizer
    # replaces it with Qwen2's own rule ("qwen2").
    from transformers import AutoTokenizer

    want = "qwen2" if type(AutoTokenizer.from_pretrained(src)).__name__.startswith("Qwen2") else "gpt-2"
    assert field("tokenizer.ggml.pre") == want
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "blk.1.ffn_down.weight" in names and "output_norm.weight" in names
    assert any(n.startswith("blk.1.attn_") for n in names)
    assert f"{arch}.block_count" in reader.fields and f"{arch}.context_length" in reader.fields


@pytest.mark.parametrize("family", HF_READS)
def test_transformers_reads_the_same_model_back(family_dir, tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = family_dir(family)
    out = write(src, tmp_path / f"{family}.gguf")
    tok = AutoTokenizer.from_pretrained(src)
    ids = tok(TEXTS[:3], return_tensors="pt", padding=True)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (ref(**ids).logits - got(**ids).logits).abs().max().item()
    assert diff < 1e-3, diff


def test_architecture_llama_cpp_cannot_run_is_exit_2_with_the_reason(family_dir, tmp_path):
    src = family_dir("opt")
    out = tmp_path / "opt.gguf"
    r = ftkit("export", str(src), "--format", "gguf", "-o", str(out))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "OPTForCausalLM" in r.stderr and "llama.cpp has no OPT architecture" in r.stderr
    assert "--format safetensors" in r.stderr and "Traceback" not in r.stderr and not out.exists()


@pytest.mark.parametrize("pre,name", [
    ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "add_prefix_space": False}]}, "smollm"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": (
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+")}},
        {"type": "ByteLevel", "use_regex": False}]}, "llama-bpe"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": (
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+")}},
        {"type": "ByteLevel", "use_regex": False}]}, "qwen2"),
])
def test_pre_tokenizer_names_are_llama_cpps(pre, name):
    from ftkit.gguf_vocab import pre_tokenizer_name

    assert pre_tokenizer_name({"pre_tokenizer": pre}) == name


@pytest.mark.parametrize("pre", [{"type": "Whitespace"}, {"type": "ByteLevel", "add_prefix_space": True}, None])
def test_unknown_pre_tokenizer_is_refused(pre):
    from ftkit.errors import UserError
    from ftkit.gguf_vocab import pre_tokenizer_name

    with pytest.raises(UserError, match="--format safetensors"):
        pre_tokenizer_name({"pre_tokenizer": pre})


@pytest.mark.parametrize("family", RUNS_IN_LLAMA_CPP)
@llamacpp
def test_llama_cpp_runs_every_family(family_dir, tmp_path, family):
    """llama.cpp loads the file, tokenizes as the HF tokenizer does and predicts the HF model's next tokens."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftkit import llamacpp as lc

    src = family_dir(family)
    out = write(src, tmp_path / f"{family}.gguf")
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    llm = lc.load(out)
    try:
        for text in TEXTS:
            assert list(llm.tokenize(text.encode(), add_bos=False, special=True)) == tok(text)["input_ids"], text
        agree = total = 0
        for text in TEXTS[:3]:
            ids = tok(text)["input_ids"]
            llm.reset()
            llm.eval(ids)
            cpp = np.asarray(llm.scores[:len(ids)])
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0].numpy()
            err = np.abs(cpp - ref).max(-1)
            assert err.max() < 0.05 * np.abs(ref).max() + 1e-2, (text, err.max())
            # A random tiny model has near-ties: where the reference's top two logits are closer than
            # twice this position's error, either order is the same model; every other position must agree.
            top2 = np.sort(ref, -1)[:, -2:]
            decisive = (top2[:, 1] - top2[:, 0]) > 2 * err
            agree += int((cpp.argmax(-1) == ref.argmax(-1))[decisive].sum())
            total += int(decisive.sum())
        assert total >= 24 and agree == total, (agree, total)
    finally:
        llm.close()
