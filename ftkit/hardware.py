"""What this machine can do: device, precision, threads. Decided once, printed, recorded."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass


def _cpu_has_fast_bf16() -> bool:
    # bf16 autocast without AVX512-BF16/AMX is emulated and ~30x slower than fp32.
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Hardware:
    device: str  # cpu | cuda | mps
    device_name: str
    dtype: str  # float32 | bfloat16 | float16: the precision training runs in
    dtype_reason: str
    threads: int
    num_gpus: int

    def as_dict(self) -> dict:
        return asdict(self)


def detect(requested_dtype: str = "auto", threads: int | None = None) -> Hardware:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        if torch.cuda.is_bf16_supported():
            dtype, why = "bfloat16", f"{name} supports bf16"
        else:
            dtype, why = "float16", f"{name} has no bf16"
        device, ngpu = "cuda", torch.cuda.device_count()
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device, name, ngpu = "mps", "Apple MPS", 0
        dtype, why = "float32", "mps: fp32 is the safe default"
    else:
        device, name, ngpu = "cpu", f"CPU ({cores} cores)", 0
        if _cpu_has_fast_bf16():
            # Measured on such a CPU (docs/performance.md): training 1.37x and generation 1.7x fp32's speed.
            dtype, why = "bfloat16", "CPU has native bf16 (AVX512-BF16/AMX), measured faster than fp32 here"
        else:
            dtype, why = "float32", "CPU without native bf16: bf16 would be emulated (~30x slower)"
    if requested_dtype != "auto":
        dtype, why = requested_dtype, "set in the recipe"
    return Hardware(device, name, dtype, why, threads or cores, ngpu)
