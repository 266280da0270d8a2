"""The tokenizer of a GGUF: every field as llama.cpp's vocab loader reads it.

llama.cpp picks its pre-tokenizer regex by name (`tokenizer.ggml.pre`), so the name must be one
its loader knows *and* the one whose regex splits text as the HF tokenizer does; a wrong or
unknown name makes the file unloadable or tokenize differently from training. llama.cpp's
converter finds the name by hashing a probe encoding; ftkit reads the pre-tokenizer's structure
instead, which also covers fine-tuned copies whose vocabulary changed.
"""

from __future__ import annotations

import json
from pathlib import Path

from ftkit.errors import UserError

_LLAMA3 = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
_QWEN2 = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer, or a UserError when it has none."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else {}
    if byte_level.get("add_prefix_space"):
        raise UserError("the tokenizer adds a prefix space before byte-level splitting, which no llama.cpp "
                        "pre-tokenizer does; export with --format safetensors instead")
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return "smollm"
    if kinds and kinds[0] == "Split":
        regex = (steps[0].get("pattern") or {}).get("Regex", "")
        if regex.startswith(_LLAMA3):
            return "llama-bpe"
        if regex.startswith(_QWEN2):
            return "qwen2"
    raise UserError(
        f"the tokenizer's pre-tokenizer ({kinds or 'none'}) is not one llama.cpp knows by name; a GGUF would "
        "tokenize differently from the model's training. Export with --format safetensors instead."
    )


def end_of_turn(tok) -> str | None:
    """The special token the chat template closes an assistant turn with (what makes the model stop).

    Found by rendering a turn with a sentinel reply and reading the token right after it, so it
    is the template's own terminator (<|im_end|>, <end_of_turn>, <|eot_id|>, ...), not a guess.
    """
    if not tok.chat_template:
        return tok.eos_token
    sentinel = "FTKIT_SENTINEL_REPLY"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}]
    try:
        text = tok.apply_chat_template(msgs, tokenize=False)
    except Exception:  # templates may reject a shape (e.g. a required system turn); eos is then the stop
        return tok.eos_token
    after = text.split(sentinel, 1)[1] if sentinel in text else ""
    ids = tok(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    first = next((i for i in ids if tok.convert_ids_to_tokens(i).strip()), None)
    if first is not None and first in special:
        return tok.convert_ids_to_tokens(first)
    return tok.eos_token


def add_tokenizer(writer, model_dir: Path, tok, vocab_size: int) -> None:
    """Tokens, types, merges, special ids, add-bos/eos, end-of-turn and chat template (llama.cpp's get_vocab_base)."""
    import gguf

    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise UserError(f"{model_dir}: no tokenizer.json; GGUF export needs a fast (tokenizers) BPE tokenizer")
    # The pipeline the loaded tokenizer really runs: transformers may rebuild a pre-tokenizer from its own
    # class (Qwen2Tokenizer splits digits and newlines its way whatever tokenizer.json says).
    backend = getattr(tok, "backend_tokenizer", None)
    tj = json.loads(backend.to_str()) if backend is not None else json.loads(tj_path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"{tj_path}: GGUF export supports byte-level BPE tokenizers (gpt2-style) only; "
                        "SentencePiece-style tokenizers are not converted yet. Use --format safetensors")
    pre = pre_tokenizer_name(tj)

    # Pad to the embedding size; special added tokens are CONTROL, other added tokens
    # USER_DEFINED, padding rows UNUSED -- the types llama.cpp's tokenizer treats as atomic.
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
    # for a missing key differs between pre-tokenizers (llama-bpe adds bos, gpt-2 does not).
    ids = tok("x")["input_ids"]
    special.add_special_token["bos"] = tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id]
    special.add_special_token["eos"] = tok.eos_token_id is not None and ids[-1:] == [tok.eos_token_id]
    special.add_to_gguf(writer, quiet=True)
    eot = end_of_turn(tok)
    eot_id = tok.convert_tokens_to_ids(eot) if eot else None
    if eot_id is not None and eot_id != tok.eos_token_id:
        writer.add_eot_token_id(eot_id)  # llama.cpp stops on eos *and* eot; the turn ends with this one
