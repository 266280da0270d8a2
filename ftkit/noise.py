"""Third-party log lines that are not the user's business, dropped by targeted filters.

Each filter names one logger and the start of one message, so everything else those libraries log
(a real failure, a deprecation the user can act on) still reaches the user. Installed when
ftkit.models is imported, before peft/trl import bitsandbytes, which logs at import time.
"""

from __future__ import annotations

import logging

# (logger, message prefix, why it is noise)
NOISE = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward",
     "on AVX512-BF16 CPUs bitsandbytes tries, at import and whatever the method, to fetch an optional CPU "
     "kernel from the hub; without it its built-in kernel runs, so nothing is lost"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check",
     "the same optional fetch, offline"),
)


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_third_party_noise() -> None:
    for name, prefix, _why in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))
