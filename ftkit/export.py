"""export: a run dir or model -> GGUF (llama.cpp, Ollama, LM Studio) or a safetensors checkpoint, verified.

LoRA run dirs are merged first (ftkit.merge, streamed shard by shard). A GGUF is written by
ftkit.gguf_writer, quantized by llama.cpp itself (ftkit.llamacpp) and then judged by the
consumer: llama.cpp loads it and is compared with the source model on fixed prompts; an Ollama
Modelfile is written beside it. A safetensors export is reloaded with transformers and its
logits compared. Anything outside the stated tolerance fails (exit 1) with nothing written.
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

GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
SAFETENSORS_QUANTS = ("f32", "f16", "bnb-4bit")

# Max |logit difference| against the fp32 source on the probe prompts, for safetensors exports
# (reloaded with transformers). f32 stores the same numbers; f16 rounds each weight to 11
# significant bits; nf4 keeps 4 bits. Measured on the embedded 135M model (logits span ~+-20):
# f32 0, f16 0.035, bnb-4bit 13.1 (greedy next token still agrees on 100/100/67%). For 4-bit the
# check only catches gross breakage, not quality -- evaluate for that. GGUF files are judged by
# llama.cpp instead (ftkit.llamacpp.MIN_AGREEMENT).
TOLERANCE = {"f32": 1e-4, "f16": 0.25, "bnb-4bit": 20.0}


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


def _check_args(fmt: str, quant: str, out: Path, overwrite: bool, imatrix_text: str | None) -> None:
    allowed = {"gguf": GGUF_QUANTS, "safetensors": SAFETENSORS_QUANTS}
    if fmt not in allowed:
        raise UserError(f"--format: must be gguf or safetensors, not {fmt!r}")
    if quant not in allowed[fmt]:
        raise UserError(f"--quantize: {fmt} supports {', '.join(allowed[fmt])}, not {quant!r}")
    if fmt == "gguf" and out.suffix != ".gguf":
        raise UserError(f"-o: a GGUF export is one file; name it *.gguf (got {out})")
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise UserError(f"-o: {out} already exists; pass --overwrite to replace it")
    if imatrix_text is not None:
        if fmt != "gguf" or quant not in ("q6_k", "q5_k_m", "q4_k_m"):
            raise UserError("--imatrix-text: an importance matrix guides k-quants only; use it with "
                            "--format gguf --quantize q4_k_m | q5_k_m | q6_k")
        if not Path(imatrix_text).expanduser().is_file():
            raise UserError(f"--imatrix-text: {imatrix_text}: no such file (give a UTF-8 text file of calibration text)")


def _gguf_preflight(target: str) -> None:
    """check_architecture on the config of what would be exported (a run's base), without loading weights."""
    from transformers import AutoConfig

    from ftkit.gguf_writer import check_architecture
    from ftkit.runmeta import adapter_base_name

    path = Path(target).expanduser()
    if path.is_dir() and is_adapter_dir(path):
        cfg_dir = resolve_model(adapter_base_name(path), log=lambda s: None)
    elif path.is_dir() and (path / "config.json").is_file():
        cfg_dir = path
    else:
        return  # aliases, hub ids and .gguf files are checked once resolved
    check_architecture(AutoConfig.from_pretrained(cfg_dir))


def _run_system(target: str) -> str | None:
    """The recipe's data.system of a run dir (what the model was trained with), for the Modelfile's SYSTEM."""
    from ftkit import safe_yaml

    recipe = Path(target).expanduser() / "recipe.yaml"
    system = safe_yaml.section(safe_yaml.load_mapping_file(recipe), "data", recipe).get("system")
    if system is not None and not isinstance(system, str):
        raise UserError(f"{recipe}: data.system: expected text, found {system!r}")
    return system


def export(target: str, fmt: str, quant: str, output: str, overwrite: bool = False, log=print,
           imatrix_text: str | None = None) -> dict:
    out = Path(output).expanduser()
    _check_args(fmt, quant, out, overwrite, imatrix_text)  # before the heavy imports: a typo costs no time
    if fmt == "gguf":
        from ftkit.llamacpp import require

        _gguf_preflight(target)  # an architecture llama.cpp cannot run is refused first, with its reason
        require()  # then exit 2 with the install line, before any model loads

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ftkit.ui import quiet_libraries

    quiet_libraries()
    out.parent.mkdir(parents=True, exist_ok=True)
    with _source(target, log) as (src_dir, name):
        if fmt == "gguf":
            from ftkit.gguf_writer import check_architecture

            check_architecture(AutoConfig.from_pretrained(src_dir))  # exit 2 before any heavy work
        tok = load_tokenizer(str(src_dir))
        model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32)
        model.eval()
        if fmt == "gguf":
            report = _export_gguf(model, tok, src_dir, out, quant, name, _run_system(target), imatrix_text, log)
        else:
            report = _export_safetensors(model, tok, src_dir, out, quant, log)
        report["source"] = str(target)
    size = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    report["bytes"] = size
    log(f"[green]exported:[/] {out} ({size / 2**20:.1f} MiB)")
    return report


def _export_safetensors(model, tok, src_dir: Path, out: Path, quant: str, log) -> dict:
    ref = _probe(model, tok)
    with staged_dir(out) as tmp:
        loaded = _write_safetensors(model, tok, src_dir, tmp, quant, log)
        loaded.eval()
        report = compare(ref, _probe(loaded, tok))
        del loaded
        report.update(format="safetensors", quantize=quant, tolerance=TOLERANCE[quant])
        log(f"verified by reloading with transformers: max |logit diff| vs source = "
            f"{report['max_abs_logit_diff']:.3g} (tolerance {TOLERANCE[quant]:g}), greedy next-token "
            f"agreement {report['top1_agreement']:.1%}")
        if not report["max_abs_logit_diff"] <= TOLERANCE[quant]:
            raise VerificationFailed(
                f"the safetensors ({quant}) export does not reproduce the source model: max |logit diff| "
                f"{report['max_abs_logit_diff']:.3g} (tolerance {TOLERANCE[quant]:g}), top-1 agreement "
                f"{report['top1_agreement']:.1%}; nothing written to {out}")
        (tmp / "ftkit_export.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        publish(tmp, out)
    return report


def _export_gguf(model, tok, src_dir: Path, out: Path, quant: str, name: str, system: str | None,
                 imatrix_text: str | None, log) -> dict:
    """Write (f32), quantize (llama.cpp), verify (llama.cpp vs `model`), Modelfile; publish all or nothing."""
    from ftkit import llamacpp
    from ftkit.gguf_vocab import end_of_turn
    from ftkit.gguf_writer import write_gguf
    from ftkit.modelfile import write_modelfile

    eot = end_of_turn(tok)
    with staged_dir(out) as tmp:
        f32 = tmp / ("model.f32.gguf" if quant != "f32" else out.name)
        log("writing GGUF (f32) ...")
        write_gguf(src_dir, f32, tok, "f32", name)
        if quant != "f32":
            imatrix = None
            if imatrix_text:
                from ftkit.imatrix import compute_imatrix

                log(f"computing an importance matrix from {imatrix_text} ...")
                imatrix = compute_imatrix(model, tok, src_dir, Path(imatrix_text).expanduser())
            log(f"quantizing to {quant} with llama.cpp ...")
            llamacpp.quantize(f32, tmp / out.name, quant, imatrix)
            f32.unlink()
            report = {"imatrix_tensors": len(imatrix) if imatrix else 0}
        else:
            report = {}
        gguf_file = tmp / out.name
        log("verifying with llama.cpp ...")
        report.update(llamacpp.verify(gguf_file, model, tok, quant, eot), format="gguf", quantize=quant)
        _log_gguf_report(report, log)
        if report["failures"]:
            raise VerificationFailed(f"llama.cpp does not reproduce the source model ({quant}): "
                                     f"{'; '.join(report['failures'])}; nothing written to {out}")
        mf = tmp / f"{out.stem}.Modelfile"
        write_modelfile(mf, out.name, tok, [eot, tok.eos_token], system)
        (tmp / f"{out.stem}.export.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        for f in (mf, tmp / f"{out.stem}.export.json", gguf_file):  # the GGUF last: its presence means done
            publish(f, out.parent / f.name)
    log(f"Ollama: ollama create {out.stem} -f {out.parent / mf.name}")
    return report


def _log_gguf_report(r: dict, log) -> None:
    log(f"verified by llama.cpp: next-token agreement {r['next_token_agreement']:.1%} over {r['positions']} "
        f"positions (minimum {r['min_agreement']:.0%} for {r['quantize']}), greedy continuations identical "
        f"{r['greedy_identical']}, tokenization {'identical' if not r['tokenization_mismatches'] else 'DIFFERS'}")
    chat = r.get("chat")
    if chat:
        log(f"chat turn in llama.cpp: {chat['reply']!r} (finish_reason {chat['finish_reason']}; "
            f"end-of-turn {r['end_of_turn']!r} {'stops' if r['end_of_turn_is_eog'] else 'DOES NOT stop'} generation)")


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
