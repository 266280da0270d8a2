"""Fold a LoRA adapter into its base one tensor at a time: W = W0 + scale * B @ A, straight from the
base's safetensors shards into new ones.

Loading base + adapter as models costs the whole model (twice, when the merged copy is reloaded
to check it); here memory is one tensor plus the adapter, whatever the model's size. Adapters
this cannot express exactly (DoRA's magnitude vectors, per-module rank/alpha patterns, LoRA on
embeddings) return None, and the caller merges them in memory with PEFT.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _plan(adapter_dir: Path, base_keys: set[str]):
    """(scale, {base key: (A, B, fan_in_fan_out)}, {base key: replacement}) or None when not streamable."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern") \
            or cfg.get("layer_replication") or not (adapter_dir / "adapter_model.safetensors").is_file():
        return None
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    pairs: dict[str, dict] = {}
    replace = {}
    for key, t in weights.items():
        path = key.removeprefix("base_model.model.")
        if ".lora_A." in path or ".lora_B." in path:
            module, ab = (path.split(".lora_A.")[0], "A") if ".lora_A." in path else (path.split(".lora_B.")[0], "B")
            pairs.setdefault(f"{module}.weight", {})[ab] = t
        elif "lora_" in path:
            return None  # lora_embedding_*, lora_magnitude_*: not a plain B @ A on a weight
        else:
            replace[path] = t  # modules_to_save: trained copies that replace the base's
    if any(k not in base_keys for k in list(pairs) + list(replace)) or any(len(v) != 2 for v in pairs.values()):
        return None  # checkpoint names differ from module names: let PEFT do it
    fan = bool(cfg.get("fan_in_fan_out"))
    return scale, {k: (v["A"], v["B"], fan) for k, v in pairs.items()}, replace


_TORCH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _read_header(f) -> tuple[dict, int]:
    n = struct.unpack("<Q", f.read(8))[0]
    return json.loads(f.read(n)), 8 + n


def _merged(key: str, t, plan, dtype):
    """The merged tensor; the base tensor is updated in place (addmm_), so no delta-sized temporary."""
    import torch

    scale, deltas, replace = plan
    if key in replace:
        return replace[key].to(getattr(torch, dtype)).contiguous()
    if key in deltas:
        a, b, fan = deltas[key]
        t = t.float()
        if fan:  # Conv1D stores W transposed: W^T += scale * A^T B^T
            t.addmm_(a.float().T, b.float().T, alpha=scale)
        else:
            t.addmm_(b.float(), a.float(), alpha=scale)
    return t.to(getattr(torch, dtype)).contiguous()


def _write_shard(src: Path, dst: Path, plan, dtype: str) -> None:
    """One safetensors file: header first (shapes are known), then each tensor read, merged and written
    in turn with plain reads (no mmap), so memory holds one tensor at a time."""
    import torch

    with open(src, "rb") as f:
        header, data_start = _read_header(f)
        keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        out_header, offset = {}, 0
        for k in keys:
            kind = header[k]["dtype"]
            kind = _ST_DTYPES[dtype] if kind in _TORCH else kind  # floats take the merge dtype; ints stay
            n = math.prod(header[k]["shape"]) * (torch.finfo(getattr(torch, _TORCH[kind])).bits // 8
                                                 if kind in _TORCH else _nbytes(header[k]))
            out_header[k] = {"dtype": kind, "shape": header[k]["shape"], "data_offsets": [offset, offset + n]}
            offset += n
        out_header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(out_header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        with open(dst, "wb") as g:
            g.write(struct.pack("<Q", len(raw)))
            g.write(raw)
            for k in keys:
                start, end = header[k]["data_offsets"]
                f.seek(data_start + start)
                buf = bytearray(f.read(end - start))
                if header[k]["dtype"] not in _TORCH:
                    g.write(buf)
                    continue
                t = torch.frombuffer(buf, dtype=getattr(torch, _TORCH[header[k]["dtype"]])).reshape(header[k]["shape"])
                t = _merged(k, t, plan, dtype)
                del buf
                g.write(t.view(-1).view(torch.uint8).numpy())
                del t


def _nbytes(entry: dict) -> int:
    start, end = entry["data_offsets"]
    return (end - start) // max(1, math.prod(entry["shape"]))


def stream_merge(base_dir: Path, adapter_dir: Path, out: Path, dtype: str) -> bool:
    """Write the merged model's weights and config into `out`; False (nothing written) when not streamable."""
    shards = sorted(base_dir.glob("*.safetensors"))
    if not shards or dtype not in _ST_DTYPES:
        return False
    keys = set()
    for s in shards:
        with open(s, "rb") as f:
            keys.update(k for k in _read_header(f)[0] if k != "__metadata__")
    plan = _plan(adapter_dir, keys)
    if plan is None:
        return False
    out.mkdir(parents=True, exist_ok=True)
    for s in shards:
        _write_shard(s, out / s.name, plan, dtype)
    cfg = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    cfg["dtype"] = dtype
    cfg.pop("torch_dtype", None)
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    for extra in ("model.safetensors.index.json", "generation_config.json"):
        if (base_dir / extra).is_file():
            (out / extra).write_bytes((base_dir / extra).read_bytes())
    return True
