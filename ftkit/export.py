"""export: a run dir or model -> GGUF (llama.cpp runtimes) or a safetensors checkpoint, verified on the way out.

LoRA run dirs are merged first with ftkit.merge (which proves its own merge). The written
artifact is then loaded back the way a user would load it -- transformers'
`from_pretrained(..., gguf_file=...)` or plain `from_pretrained` -- and its logits are compared
with the source model's; the difference is printed and anything over the per-format
tolerance fails the export (exit 1) with nothing left at the output path.

GGUF layout follows llama.cpp's convert_hf_to_gguf for the llama architecture: tensor names
from gguf's own name map, Q/K rows permuted to llama.cpp's rotary layout, 1-D tensors kept
f32, the tokenizer as a gpt2-style BPE vocabulary with merges, token types and special ids.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ftkit.atomic import publish, staged_dir
from ftkit.errors import UserError, VerificationFailed
from ftkit.runmeta import is_adapter_dir
from ftkit.merge import PROBES
from ftkit.models import load_tokenizer, resolve_model

GGUF_QUANTS = ("f32", "f16", "q8_0")
SAFETENSORS_QUANTS = ("f32", "f16", "bnb-4bit")

# Max |logit difference| against the fp32 source on the probe prompts. f32 stores the same
# numbers; f16 rounds each weight to 11 significant bits; q8_0 keeps 8 bits per weight with one
# scale per 32; nf4 keeps 4 bits. Measured on the embedded 135M model (logits span ~+-20):
# f32 0, f16 0.035, q8_0 1.06, bnb-4bit 13.1 (greedy next token still agrees on 100/100/100/67%).
# The bounds leave ~1.5-2x headroom for fine-tuned weights; for 4-bit the check only catches
# gross breakage (a file that no longer computes this model), not quality -- evaluate for that.
TOLERANCE = {"f32": 1e-4, "f16": 0.25, "q8_0": 2.0, "bnb-4bit": 20.0}

# What llama.cpp's llama loader and transformers' GGUF reader both understand.
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama"}


def _pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp picks its pre-tokenizer regex by name (tokenizer.ggml.pre); name the one this tokenizer uses."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds and kinds[0] == "Split":
        regex = (steps[0].get("pattern") or {}).get("Regex", "")
        if regex.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"):
            return "llama-bpe"
        if regex.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"):
            return "qwen2"
    raise UserError(
        f"the tokenizer's pre-tokenizer ({kinds or 'none'}) is not one llama.cpp knows by name; a GGUF would "
        "tokenize differently from the model's training. Export with --format safetensors instead."
    )


def check_architecture(config) -> str:
    """The GGUF architecture name, or a UserError saying why this model cannot be exported."""
    archs = list(getattr(config, "architectures", None) or [])
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise UserError(
            f"GGUF export supports {', '.join(SUPPORTED_ARCHITECTURES)}; this model is "
            f"{', '.join(archs) or config.model_type}. Use --format safetensors for other architectures."
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UserError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not supported yet "
                        "(transformers' GGUF reader would drop it); use --format safetensors")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError("GGUF export: llama with attention/mlp biases is not supported; use --format safetensors")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(f"GGUF export: llama with hidden_act={config.hidden_act!r} is not supported (llama.cpp uses silu)")
    return SUPPORTED_ARCHITECTURES[arch]


def _permute_rotary(w, n_head: int, n_head_kv: int | None):
    """HF keeps rotary halves split ([x0..x63 | x64..]); llama.cpp wants them interleaved per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _add_tokenizer(writer, model_dir: Path, tok, vocab_size: int) -> None:
    import gguf

    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise UserError(f"{model_dir}: no tokenizer.json; GGUF export needs a fast (tokenizers) BPE tokenizer")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"{tj_path}: GGUF export supports byte-level BPE tokenizers (gpt2-style) only")
    pre = _pre_tokenizer_name(tj)

    # Same scheme as llama.cpp's get_vocab_base: pad to the embedding size, special added
    # tokens are CONTROL, other added tokens USER_DEFINED, padding UNUSED.
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if tok.chat_template and not special.chat_template:
        special.chat_template = tok.chat_template
    # Say explicitly whether bos/eos wrap a prompt, as the HF tokenizer does; llama.cpp's default
    # for a missing key differs between versions and vocab types.
    ids = tok("x")["input_ids"]
    special.add_special_token["bos"] = tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id]
    special.add_special_token["eos"] = tok.eos_token_id is not None and ids[-1:] == [tok.eos_token_id]
    special.add_to_gguf(writer, quiet=True)


def write_gguf(model, tok, model_dir: Path, out_file: Path, quant: str, name: str) -> None:
    import gguf
    import numpy as np
    import torch

    config = model.config
    arch_name = check_architecture(config)
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    n_layers = config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(arch, n_layers)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]

    writer = gguf.GGUFWriter(out_file, arch_name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, model_dir, tok, config.vocab_size)

    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        base, suffix = hf_name.rsplit(".", 1)
        gguf_base = name_map.get_name(base)
        if gguf_base is None:
            raise UserError(f"GGUF export: no llama.cpp name for tensor {hf_name}; use --format safetensors")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if base.endswith("q_proj"):
            data = _permute_rotary(data, n_head, n_head)
        elif base.endswith("k_proj"):
            data = _permute_rotary(data, n_head, n_kv)
        # llama.cpp keeps norms (1-D) in f32 at every file type; matrices take the requested type.
        if data.ndim == 1 or quant == "f32":
            qtype, out = gguf.GGMLQuantizationType.F32, data
        elif quant == "f16":
            qtype, out = gguf.GGMLQuantizationType.F16, data.astype(np.float16)
        else:
            qtype = gguf.GGMLQuantizationType.Q8_0
            if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                qtype, out = gguf.GGMLQuantizationType.F16, data.astype(np.float16)
            else:
                out = gguf.quants.quantize(data, qtype)
        writer.add_tensor(f"{gguf_base}.{suffix}", out, raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _probe(model, tok):
    import torch

    enc = tok(PROBES, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits.float()
    return logits, enc["attention_mask"].bool()


def compare(ref, got) -> dict:
    ref_logits, mask = ref
    got_logits, _ = got
    diff = (got_logits - ref_logits).abs().amax(-1)[mask].max().item()
    agree = (got_logits.argmax(-1) == ref_logits.argmax(-1))[mask].float().mean().item()
    return {"max_abs_logit_diff": diff, "top1_agreement": agree}


@contextmanager
def _source(target: str, log):
    """An HF model dir for `target`; a LoRA run dir is merged (and verified) into a temp dir first."""
    path = Path(target).expanduser()
    if path.is_dir() and is_adapter_dir(path):
        from ftkit.merge import merge_lora

        with tempfile.TemporaryDirectory(prefix="ftkit-export-") as tmp:
            merged = Path(tmp) / "merged"
            merge_lora(str(path), str(merged), dtype="float32", log=log)
            yield merged, path.name
    else:
        if path.is_dir() and not (path / "config.json").is_file():
            raise UserError(f"{target}: neither a run dir (adapter_config.json) nor a model dir (config.json)")
        yield Path(resolve_model(target, log=log)), path.stem if path.exists() else target.replace("/", "-")


def _check_args(fmt: str, quant: str, out: Path, overwrite: bool) -> None:
    allowed = {"gguf": GGUF_QUANTS, "safetensors": SAFETENSORS_QUANTS}
    if fmt not in allowed:
        raise UserError(f"--format: must be gguf or safetensors, not {fmt!r}")
    if quant not in allowed[fmt]:
        raise UserError(f"--quantize: {fmt} supports {', '.join(allowed[fmt])}, not {quant!r}")
    if fmt == "gguf" and out.suffix != ".gguf":
        raise UserError(f"-o: a GGUF export is one file; name it *.gguf (got {out})")
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise UserError(f"-o: {out} already exists; pass --overwrite to replace it")


def export(target: str, fmt: str, quant: str, output: str, overwrite: bool = False, log=print) -> dict:
    out = Path(output).expanduser()
    _check_args(fmt, quant, out, overwrite)  # before the heavy imports: a typo costs no time

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ftkit.ui import quiet_libraries

    quiet_libraries()
    out.parent.mkdir(parents=True, exist_ok=True)
    with _source(target, log) as (src_dir, name):
        if fmt == "gguf":
            check_architecture(AutoConfig.from_pretrained(src_dir))  # exit 2 before any heavy work
        tok = load_tokenizer(str(src_dir))
        model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32)
        model.eval()
        ref = _probe(model, tok)
        with staged_dir(out) as tmp:
            if fmt == "gguf":
                gguf_file = tmp / out.name
                log(f"writing GGUF ({quant}) ...")
                write_gguf(model, tok, src_dir, gguf_file, quant, name)
                del model
                loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=out.name, dtype=torch.float32)
            else:
                loaded = _write_safetensors(model, tok, src_dir, tmp, quant, log)
                del model
            loaded.eval()
            report = compare(ref, _probe(loaded, tok))
            del loaded
            report.update(format=fmt, quantize=quant, tolerance=TOLERANCE[quant], source=str(target))
            log(f"verified by reloading with transformers: max |logit diff| vs source = "
                f"{report['max_abs_logit_diff']:.3g} (tolerance {TOLERANCE[quant]:g}), greedy next-token "
                f"agreement {report['top1_agreement']:.1%}")
            if not report["max_abs_logit_diff"] <= TOLERANCE[quant]:
                raise VerificationFailed(
                    f"the {fmt} ({quant}) export does not reproduce the source model: max |logit diff| "
                    f"{report['max_abs_logit_diff']:.3g} (tolerance {TOLERANCE[quant]:g}), top-1 agreement "
                    f"{report['top1_agreement']:.1%}; nothing written to {out}"
                )
            if fmt == "gguf":
                publish(gguf_file, out)
            else:
                (tmp / "ftkit_export.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
                publish(tmp, out)
    size = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    report["bytes"] = size
    log(f"[green]exported:[/] {out} ({size / 2**20:.1f} MiB)")
    return report


def _write_safetensors(model, tok, src_dir: Path, tmp: Path, quant: str, log):
    import torch
    from transformers import AutoModelForCausalLM

    if quant == "bnb-4bit":
        from transformers import BitsAndBytesConfig

        log("quantizing to bitsandbytes 4-bit (nf4) ...")
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        q = AutoModelForCausalLM.from_pretrained(src_dir, quantization_config=bnb, device_map="cpu")
        q.save_pretrained(tmp, safe_serialization=True)
        del q
        tok.save_pretrained(tmp)
        return AutoModelForCausalLM.from_pretrained(tmp, device_map="cpu")
    dtype = {"f32": torch.float32, "f16": torch.float16}[quant]
    model.to(dtype).save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    # Compare in fp32 so the check measures what the stored weights lost, not fp16 arithmetic on CPU.
    return AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
