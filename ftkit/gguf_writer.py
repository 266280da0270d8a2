"""An HF causal-LM dir -> one GGUF file that llama.cpp loads, written tensor by tensor.

What every field must hold is what llama.cpp's own converter (convert_hf_to_gguf.py) writes for
the architecture: the `gguf` package's tensor-name maps, Q/K rows permuted where llama.cpp's
rope reads interleaved pairs, norms kept f32, and the tokenizer under the pre-tokenizer name
llama.cpp's vocab loader switches on. Weights are read from the safetensors shards one tensor at
a time, so writing costs one tensor of memory, not a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ftkit.errors import UserError


@dataclass(frozen=True)
class Arch:
    """How one HF architecture maps onto a llama.cpp one (a transform flag per difference)."""

    gguf: str
    permute_qk: bool = False  # llama.cpp's LLAMA rope reads (x0, x1) pairs; HF keeps halves apart
    norm_plus_one: bool = False  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp by w
    conv1d: bool = False  # GPT-2 stores Linear weights transposed (Conv1D)
    qkv: str = ""  # fused-QKV layout to reorder into [all q | all k | all v]: "head" or "falcon"
    strip_prefix: str = ""
    skip: tuple[str, ...] = field(default=())


ARCHS = {
    "LlamaForCausalLM": Arch("llama", permute_qk=True),
    "MistralForCausalLM": Arch("llama", permute_qk=True),
    "Qwen2ForCausalLM": Arch("qwen2"),
    "Qwen3ForCausalLM": Arch("qwen3"),
    "GemmaForCausalLM": Arch("gemma", norm_plus_one=True, skip=("lm_head.weight",)),
    "Gemma2ForCausalLM": Arch("gemma2", norm_plus_one=True, skip=("lm_head.weight",)),
    "Phi3ForCausalLM": Arch("phi3"),
    "GPT2LMHeadModel": Arch("gpt2", conv1d=True),
    "GPTNeoXForCausalLM": Arch("gptneox", qkv="head"),
    "BloomForCausalLM": Arch("bloom", qkv="head", strip_prefix="transformer."),
    "FalconForCausalLM": Arch("falcon", qkv="falcon"),
}

# Architectures people fine-tune that llama.cpp has no graph for: refused with this reason.
NO_LLAMA_CPP = {
    "OPTForCausalLM": "llama.cpp has no OPT architecture (learned positions offset by 2, no rope), so no "
                      "GGUF of it runs in llama.cpp, Ollama or LM Studio",
}


def check_architecture(config) -> Arch:
    """The mapping for this model, or a UserError saying why llama.cpp cannot run its GGUF."""
    archs = list(getattr(config, "architectures", None) or [])
    hf = next((a for a in archs if a in ARCHS), None)
    if hf is None:
        named = ", ".join(archs) or config.model_type
        reason = next((NO_LLAMA_CPP[a] for a in archs if a in NO_LLAMA_CPP), None)
        reason = reason or "ftkit's GGUF writer does not convert it"
        raise UserError(f"GGUF export: {named}: {reason}. GGUF export supports "
                        f"{', '.join(sorted(ARCHS))}; use --format safetensors for this model.")
    arch = ARCHS[hf]
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", "linear", None):
        raise UserError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not supported by ftkit's GGUF "
                        "writer (only none or linear); use --format safetensors")
    if arch.gguf == "llama" and getattr(config, "mlp_bias", False):
        raise UserError("GGUF export: llama with mlp_bias is not supported by llama.cpp; use --format safetensors")
    if arch.gguf in ("llama", "qwen2", "qwen3") and getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(f"GGUF export: hidden_act={config.hidden_act!r} differs from llama.cpp's silu for "
                        f"{arch.gguf}; use --format safetensors")
    if arch.gguf == "falcon" and (getattr(config, "alibi", False) or getattr(config, "bias", False)):
        raise UserError("GGUF export: Falcon with alibi or linear biases has no llama.cpp graph; "
                        "use --format safetensors")
    return arch


def _rope(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def _falcon_kv_heads(config) -> int:
    if getattr(config, "new_decoder_architecture", False):
        return config.num_kv_heads
    return 1 if getattr(config, "multi_query", True) else config.num_attention_heads


def _add_hparams(w, config, arch: Arch) -> None:
    """The hyper-parameters llama.cpp reads for this architecture (its converter's set_gguf_parameters)."""
    c = config
    n_embd = getattr(c, "hidden_size", None) or c.n_embd
    n_head = getattr(c, "num_attention_heads", None) or c.n_head
    head_dim = getattr(c, "head_dim", None) or n_embd // n_head
    ctx = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2048
    n_ff = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or getattr(c, "ffn_hidden_size", None)
    w.add_context_length(ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(getattr(c, "num_hidden_layers", None) or c.n_layer)
    w.add_feed_forward_length(n_ff or 4 * n_embd)
    w.add_head_count(n_head)
    kv = _falcon_kv_heads(c) if arch.gguf == "falcon" else getattr(c, "num_key_value_heads", None) or n_head
    w.add_head_count_kv(kv)
    rope = _rope(c)
    if arch.gguf not in ("gpt2", "bloom"):
        w.add_rope_freq_base(float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))))
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        if rope.get("rope_type") == "linear":
            import gguf

            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope["factor"]))
    if getattr(c, "rms_norm_eps", None) is not None:
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
    eps = getattr(c, "layer_norm_eps", None) or getattr(c, "layer_norm_epsilon", None)
    if eps is not None and arch.gguf in ("gpt2", "gptneox", "bloom", "falcon"):
        w.add_layer_norm_eps(eps)
    if getattr(c, "head_dim", None):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch.gguf == "gptneox":
        w.add_parallel_residual(bool(getattr(c, "use_parallel_residual", True)))
    if arch.gguf == "falcon":
        w.add_tensor_data_layout("jploski")  # q|k|v regrouped, see _reorder_qkv
    if arch.gguf == "phi3":
        w.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings",
                                                     getattr(c, "original_max_position_embeddings", ctx))))
        w.add_sliding_window(getattr(c, "sliding_window", None) or 0)
    if arch.gguf == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
        w.add_sliding_window(c.sliding_window)


def _reorder_qkv(data, layout: str, n_head: int, n_kv: int):
    """Fused QKV -> [all q heads | all k heads | all v heads], the layout llama.cpp's graphs split.

    GPT-NeoX and BLOOM interleave per head (q_h, k_h, v_h); Falcon groups per kv head
    (n_head/n_kv queries, then one k and one v). Biases follow their weights' rows.
    """
    import numpy as np

    rows = data.shape[0]
    rest = data.shape[1:]
    if layout == "head":
        g = data.reshape(n_head, 3, rows // (3 * n_head), *rest)
        return np.concatenate([g[:, i].reshape(-1, *rest) for i in range(3)], axis=0)
    per = n_head // n_kv
    hd = rows // (n_kv * (per + 2))
    g = data.reshape(n_kv, per + 2, hd, *rest)
    q, k, v = g[:, :per], g[:, per:per + 1], g[:, per + 1:]
    return np.concatenate([t.reshape(-1, *rest) for t in (q, k, v)], axis=0)


def _permute_rotary(w, n_head: int, n_head_kv: int | None):
    """HF keeps rotary halves split ([x0..x63 | x64..]); llama.cpp's LLAMA rope wants them interleaved per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _transform(name: str, data, arch: Arch, config):
    """One HF tensor as llama.cpp expects its values (layout only; names are mapped separately)."""
    n_head = getattr(config, "num_attention_heads", None) or config.n_head
    if arch.conv1d and name.endswith(".weight") and data.ndim == 2 and any(
            p in name for p in (".c_attn.", ".c_proj.", ".c_fc.")):
        data = data.T.copy()
    if arch.permute_qk and ("q_proj." in name or "k_proj." in name):
        kv = config.num_key_value_heads if "k_proj." in name else n_head
        data = _permute_rotary(data, n_head, kv)
    if arch.qkv and "query_key_value." in name:
        n_kv = _falcon_kv_heads(config) if arch.qkv == "falcon" else n_head
        data = _reorder_qkv(data, arch.qkv, n_head, n_kv)
    if arch.norm_plus_one and name.endswith("norm.weight"):
        data = data + 1.0
    if arch.gguf == "gemma2" and "q_proj." in name:
        # llama.cpp scales scores by 1/sqrt(head_dim); HF by query_pre_attn_scalar**-0.5. Folding the
        # ratio into W_q (rope is linear) gives the same scores without a key llama.cpp would ignore.
        head_dim = config.head_dim
        data = data * float((head_dim / config.query_pre_attn_scalar) ** 0.5)
    return data


def iter_hf_tensors(model_dir: Path):
    """(name, float32 numpy array) for every tensor in the model's safetensors shards, one at a time."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no *.safetensors weights; GGUF export reads safetensors only")
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name).float().numpy()


def name_mapper(config, arch: Arch):
    """HF tensor name -> llama.cpp tensor name (None for tensors llama.cpp does not store)."""
    import gguf

    kind = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf)
    n_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    name_map = gguf.get_tensor_name_map(kind, n_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))

    def gguf_name(name: str) -> str | None:
        if name in arch.skip or (tied and name == "lm_head.weight"):
            return None  # llama.cpp reuses token_embd when output.weight is absent
        if name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            return None  # causal-mask and rope buffers, recomputed by llama.cpp
        key = name[len(arch.strip_prefix):] if name.startswith(arch.strip_prefix) else name
        new = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(f"GGUF export: no llama.cpp tensor for {name} in {arch.gguf}; use --format safetensors")
        return new

    return gguf_name


def _gguf_tensors(model_dir: Path, config, arch: Arch):
    """(gguf name, array) in file order, transformed; tied/unused heads and buffers dropped."""
    gguf_name = name_mapper(config, arch)
    for name, data in iter_hf_tensors(model_dir):
        new = gguf_name(name)
        if new is not None:
            yield new, _transform(name, data, arch, config)


FILE_TYPES = ("f32", "f16", "bf16", "q8_0")


def _stored(data, quant: str):
    """(array as stored, ggml type): 1-D tensors stay f32 at every type, as llama.cpp keeps them."""
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    if data.ndim == 1 or quant == "f32":
        return data.astype(np.float32, copy=False), T.F32
    if quant == "f16":
        return data.astype(np.float16), T.F16
    qtype = {"bf16": T.BF16, "q8_0": T.Q8_0}[quant]
    if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return data.astype(np.float16), T.F16
    return gguf.quants.quantize(data, qtype), qtype


def _safe_name(name: str, tok) -> str:
    """general.name, unless llama.cpp would key Phi-3 token fix-ups on it: a name containing "phi3"/"phi-3"
    makes its vocab loader look up <s>, </s>, <unk>, <|endoftext|>, and abort when one is missing."""
    vocab = tok.get_vocab()
    if any(k in name.lower() for k in ("phi3", "phi-3")) and \
            not all(t in vocab for t in ("<s>", "</s>", "<unk>", "<|endoftext|>")):
        return name.lower().replace("phi-3", "phi 3").replace("phi3", "phi 3")
    return name


def write_gguf(model_dir: Path, out_file: Path, tok, quant: str = "f32", name: str = "model") -> None:
    """Write `model_dir` (an HF dir with safetensors) as a GGUF of file type `quant` (f32 | f16 | bf16 | q8_0)."""
    import gguf
    from transformers import AutoConfig

    from ftkit.gguf_vocab import add_tokenizer

    config = AutoConfig.from_pretrained(model_dir)
    arch = check_architecture(config)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    w = gguf.GGUFWriter(out_file, arch.gguf)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(_safe_name(name, tok))
    _add_hparams(w, config, arch)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(w, model_dir, tok, config.vocab_size)
    # Two passes over the shards (infos first, then data) so no more than one tensor is in memory.
    for new, data in _gguf_tensors(model_dir, config, arch):
        out, qtype = _stored(data, quant)
        w.add_tensor_info(new, out.shape, out.dtype, out.nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, data in _gguf_tensors(model_dir, config, arch):
        w.write_tensor_data(_stored(data, quant)[0])
    w.close()
