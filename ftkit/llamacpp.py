"""llama.cpp's own code, through llama-cpp-python: k-quant quantization and the consumer-side check.

Quantization is llama.cpp's `llama_model_quantize` (the code behind `llama-quantize`), not a
re-implementation. Verification loads the written GGUF in llama.cpp -- the runtime Ollama and
LM Studio embed -- and compares it with the HF source on fixed prompts: tokenization, next-token
agreement at every position, greedy continuations, and one chat turn through llama-cpp-python's
chat handling with the template stored in the file, which must end on an end-of-generation token.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from ftkit.errors import UserError

INSTALL = ("GGUF export runs llama.cpp (to quantize and to check the file the way llama.cpp, Ollama and "
           "LM Studio will load it); install it with: pip install 'ftkit[gguf]'  (builds llama.cpp from "
           "source, ~10-20 minutes on 2 cores; CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" for a portable build)")

# llama.cpp's llama_ftype values (include/llama.h) for the file types ftkit offers.
FTYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "bf16": 32}

# Minimum greedy next-token agreement with the fp32 HF model over every position of the probe
# prompts. Measured on SmolLM2-135M-Instruct (docs/deploy.md, scripts/llamacpp_check.sh):
# f32/f16/q8_0 100%, bf16 96.7%, q6_k 90%, q5_k_m 86.7%, q4_k_m 80%; each bound sits ~10
# points below, since a fine-tuned model has other near-ties than the one measured.
MIN_AGREEMENT = {"f32": 0.95, "f16": 0.95, "q8_0": 0.9, "bf16": 0.85, "q6_k": 0.8, "q5_k_m": 0.75, "q4_k_m": 0.7}

PROBES = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:",
    "Once upon a time, in a small village, there lived",
    "1, 2, 3, 4, 5,",
    "Water boils at 100 degrees",
]
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]
GREEDY_TOKENS = 12
CHAT_TOKENS = 48


def require():
    """llama_cpp, or a UserError with the install line."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(INSTALL) from None
    return llama_cpp


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def quantize(src: Path, dst: Path, quant: str, imatrix: dict | None = None) -> None:
    """llama.cpp's llama_model_quantize: `src` (an f32 GGUF) -> `dst` at file type `quant`."""
    llama_cpp = require()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[quant]
    params.nthread = _threads()
    keep = None
    if imatrix:
        # A null-terminated array of (tensor name, per-column importance) that llama.cpp copies.
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        keep = []
        for i, (name, values) in enumerate(imatrix.items()):
            arr = (ctypes.c_float * len(values))(*values)
            keep.append(arr)
            entries[i].name, entries[i].data, entries[i].size = name.encode(), arr, len(values)
        entries[len(imatrix)].name = None
        params.imatrix = entries
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keep
    if rc != 0 or not dst.is_file():
        raise RuntimeError(f"llama.cpp could not quantize {src.name} to {quant} (llama_model_quantize returned {rc})")


def load(path: Path, n_ctx: int = 512):
    """The GGUF as llama.cpp loads it; a refusal (bad vocab, unknown arch) becomes a clear error."""
    llama_cpp = require()
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                               n_threads=_threads(), seed=0)
    except (ValueError, RuntimeError) as exc:
        raise RuntimeError(f"llama.cpp cannot load {path.name}: {exc}") from None


def is_eog(llm, token_id: int) -> bool:
    llama_cpp = require()
    return bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, token_id))


def _hf_greedy(model, tok, ids: list[int], n: int, stop: set[int]) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=sorted(stop) or None,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return out[0, len(ids):].tolist()


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    out = []
    llm.reset()
    for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if is_eog(llm, t) or len(out) >= n:
            if is_eog(llm, t) and len(out) < n:
                out.append(t)
            break
        out.append(t)
    return out


def _agreement(llm, model, tok) -> tuple[int, int, list[str]]:
    """(positions agreeing, positions, tokenization mismatches) over the probe prompts."""
    import numpy as np
    import torch

    agree = total = 0
    mismatched = []
    for text in PROBES:
        ids = tok(text)["input_ids"]
        got = llm.tokenize(text.encode("utf-8"), add_bos=bool(tok.bos_token_id is not None and
                                                              ids[:1] == [tok.bos_token_id]), special=True)
        if list(got) != ids:
            mismatched.append(text)
        llm.reset()
        llm.eval(ids)
        cpp = np.asarray(llm.scores[:len(ids)]).argmax(-1)
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].float().argmax(-1).numpy()
        agree += int((cpp == ref[:len(cpp)]).sum())
        total += len(ids)
    return agree, total, mismatched


def _chat_turn(llm, model, tok, stop_ids: set[int]) -> dict:
    """One chat turn in llama.cpp (its chat handling, the file's template) next to HF's, same greedy decoding."""
    reply = llm.create_chat_completion(CHAT, max_tokens=CHAT_TOKENS, temperature=0.0, top_k=1, seed=0,
                                       repeat_penalty=1.0)
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, dict):
        ids = ids["input_ids"]
    hf = _hf_greedy(model, tok, list(ids), CHAT_TOKENS, stop_ids)
    hf_stopped = bool(hf) and hf[-1] in stop_ids
    choice = reply["choices"][0]
    return {"reply": choice["message"]["content"], "finish_reason": choice["finish_reason"],
            "hf_reply": tok.decode([t for t in hf if t not in stop_ids], skip_special_tokens=True),
            "hf_stopped": hf_stopped}


def verify(path: Path, model, tok, quant: str, eot: str | None) -> dict:
    """Numbers from llama.cpp running `path` against the HF `model`; the caller gates on `failures`."""
    llm = load(path)
    try:
        agree, total, mismatched = _agreement(llm, model, tok)
        stop_ids = {i for i in (tok.eos_token_id, tok.convert_tokens_to_ids(eot) if eot else None) if i is not None}
        greedy_same = 0
        samples = []
        for text in PROBES:
            ids = tok(text)["input_ids"]
            a, b = _llama_greedy(llm, ids, GREEDY_TOKENS), _hf_greedy(model, tok, ids, GREEDY_TOKENS, stop_ids)
            greedy_same += a == b
            samples.append({"prompt": text, "llama_cpp": tok.decode(a), "transformers": tok.decode(b)})
        eot_id = tok.convert_tokens_to_ids(eot) if eot else None
        eot_is_eog = eot_id is not None and is_eog(llm, eot_id)
        chat = _chat_turn(llm, model, tok, stop_ids) if tok.chat_template else None
    finally:
        llm.close()
    report = {"next_token_agreement": agree / total, "positions": total, "min_agreement": MIN_AGREEMENT[quant],
              "greedy_identical": f"{greedy_same}/{len(PROBES)}", "greedy": samples,
              "tokenization_mismatches": mismatched, "end_of_turn": eot,
              "end_of_turn_is_eog": eot_is_eog, "chat": chat}
    report["failures"] = _failures(report)
    return report


def _failures(r: dict) -> list[str]:
    out = []
    if r["tokenization_mismatches"]:
        out.append(f"llama.cpp tokenizes {len(r['tokenization_mismatches'])} probe(s) differently from the HF "
                   f"tokenizer, e.g. {r['tokenization_mismatches'][0]!r}")
    if r["next_token_agreement"] < r["min_agreement"]:
        out.append(f"next-token agreement {r['next_token_agreement']:.1%} < {r['min_agreement']:.0%}")
    if r["end_of_turn"] and not r["end_of_turn_is_eog"]:
        out.append(f"llama.cpp does not stop at the template's end-of-turn token {r['end_of_turn']!r}")
    chat = r["chat"]
    if chat and chat["hf_stopped"] and chat["finish_reason"] != "stop":
        out.append(f"the chat turn in llama.cpp did not end at the end-of-turn token (finish_reason "
                   f"{chat['finish_reason']!r}) while transformers' did")
    return out
