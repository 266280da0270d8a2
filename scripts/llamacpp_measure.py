"""Export the embedded model at every GGUF type and print llama.cpp's verification numbers as a table
(the measurements behind ftkit.llamacpp.MIN_AGREEMENT and docs/deploy.md). Outputs go to a temp dir.

    python scripts/llamacpp_measure.py [QUANT ...]    # default: every GGUF type
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from ftkit.errors import VerificationFailed
from ftkit.export import GGUF_QUANTS, export


def main() -> int:
    rows = ["| quantize | minimum | measured agreement | greedy identical | chat turn stops | size |",
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="ftkit-measure-") as tmp:
        for quant in sys.argv[1:] or GGUF_QUANTS:  # e.g. `q4_k_m q8_0` to measure a few first
            out = Path(tmp) / f"smollm2-{quant}.gguf"
            t0 = time.time()
            try:
                r = export("smollm2-135m-instruct", "gguf", quant, str(out), log=lambda s: None)
            except VerificationFailed as exc:
                rows.append(f"| {quant} | | FAILED: {exc} | | | |")
                continue
            chat = r.get("chat") or {}
            rows.append(f"| {quant} | {r['min_agreement']:.0%} | {r['next_token_agreement']:.1%} of {r['positions']} "
                        f"| {r['greedy_identical']} | {chat.get('finish_reason')} | {r['bytes'] / 2**20:.0f} MiB |")
            print(rows[-1], f"({time.time() - t0:.0f} s)", file=sys.stderr)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
